"""One local Ray cluster per test session, and tiny models built from configs."""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
# Members compare against float32 references: keep `dtype: auto` at float32 on CPUs
# that multiply bfloat16 natively (test_member checks the rule itself). Set before Ray
# starts, so actors and CLI subprocesses inherit it.
os.environ.setdefault("RAY_ENSEMBLE_CPU_BFLOAT16", "0")


# The environment the session's Ray was started with: its workers have it.
_RAY_ENV: dict[str, str] = {}


def _start_ray():
    import ray

    if ray.is_initialized():
        return ray
    from jobs.cli import IDLE_WORKER_KEEP_MS

    # "local": never join a cluster another process started on this machine. Idle
    # workers are kept as long as by the Ray `ray-ensemble` starts (see jobs/cli.py): the
    # next job's read and write tasks reuse them, not new processes.
    ray.init(
        address="local",
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
    )
    _RAY_ENV.clear()
    _RAY_ENV.update(os.environ)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture(scope="session")
def ray_cluster():
    ray = _start_ray()
    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def no_ray():
    """For tests whose command starts a Ray of its own: two Ray instances on one machine
    make Ray Train and Data misbehave, so the session's is stopped meanwhile. It starts
    again before the next test that needs it (:func:`pytest_runtest_setup`), not after
    this one: such tests come in runs, and each start costs seconds."""
    import ray

    if ray.is_initialized():
        ray.shutdown()
    yield


@pytest.fixture
def ray_address(ray_cluster) -> str:
    """The session Ray's address, for a CLI subprocess that joins it (``--address``)
    rather than starting a Ray of its own: 7 s less a command (5.7 s start, 1.5 s stop
    on 2 CPUs), and the session's Ray need not stop and start again around it."""
    return ray_cluster.get_runtime_context().gcs_address


def session_ray_with(env: dict[str, str]) -> str:
    """The session's Ray, started again if its workers lack ``env`` (set in this
    process's environment first), for CLI subprocesses that join it; its address."""
    import ray

    assert all(os.environ.get(k) == v for k, v in env.items())
    if ray.is_initialized() and any(_RAY_ENV.get(k) != v for k, v in env.items()):
        ray.shutdown()
    return _start_ray().get_runtime_context().gcs_address


def session_ray_processes() -> list:
    """The processes of the session's Ray (its GCS, raylet, and their workers): children
    of this process, which started it."""
    import psutil

    return psutil.Process().children(recursive=True)


def _available_cpus() -> float:
    import ray

    return ray.available_resources().get("CPU", 0.0)


def free_cpus(settle_s: float = 30) -> float:
    """The session Ray's CPUs that no task or actor holds, once the actors of earlier
    tests have let theirs go (all CPUs free, or ``settle_s`` passed)."""
    import time

    import ray

    total = ray.cluster_resources().get("CPU", 0.0)
    deadline = time.monotonic() + settle_s
    while _available_cpus() < total - 1e-6 and time.monotonic() < deadline:
        time.sleep(0.1)
    return _available_cpus()


def wait_for_free_cpus(cpus: float, timeout: float = 120) -> None:
    """Until the session's Ray has ``cpus`` free again (what it had before a driver that
    joined it was killed): Ray then has ended the job's actors and tasks, every one of
    which holds CPUs (even a write task, 0.1), so none can still commit a part while the
    next command runs."""
    import time

    deadline = time.monotonic() + timeout
    while _available_cpus() < cpus - 1e-6:
        assert time.monotonic() < deadline, f"{_available_cpus()} CPUs free, waiting for {cpus}"
        time.sleep(0.1)


def pytest_runtest_setup(item: pytest.Item) -> None:
    """Start the session's Ray again for a test that needs it, after a ``no_ray`` test."""
    if "ray_cluster" in getattr(item, "fixturenames", ()) and "no_ray" not in item.fixturenames:
        _start_ray()


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Members with different architectures, label orders and label names."""
    from jobs.example import build_classifier

    root = tmp_path_factory.mktemp("models")
    return {
        # canonical order, by name
        "alpha": build_classifier(root / "alpha", id2label={0: "negative", 1: "positive"}, seed=1),
        # reversed order, upper case
        "beta": build_classifier(
            root / "beta", id2label={0: "POSITIVE", 1: "NEGATIVE"}, arch="distilbert", seed=2
        ),
        # default names: needs a label_map
        "gamma": build_classifier(
            root / "gamma", id2label={0: "LABEL_0", 1: "LABEL_1"}, seed=3, layers=1
        ),
        # three labels, in its own order
        "tri": build_classifier(
            root / "tri", id2label={0: "neutral", 1: "positive", 2: "negative"}, seed=4
        ),
        # a single-logit binary head
        "single": build_classifier(root / "single", id2label={0: "LABEL_0"}, seed=5),
        # an encoder for the embedding task
        "encoder": build_classifier(root / "encoder", id2label={}, seed=6, task="embedding"),
    }


# --- shared by the fault, storage and cluster tests -----------------------------------------

ROOT = Path(__file__).resolve().parents[1]
FAULT_ROWS = 6_000  # long enough to kill something in the middle of a job (12 parts)
S3_BUCKET = "scoring"
S3_MEMBERS = ("alpha", "beta", "gamma")


@pytest.fixture(scope="session")
def example(tmp_path_factory) -> Path:
    """The README's example (three tiny members) and a JSONL input long enough to kill
    something in the middle of it."""
    from jobs.example import make_texts, write_example

    work = tmp_path_factory.mktemp("faults")
    write_example(work / "examples")
    shutil.copytree(ROOT / "configs", work / "configs")
    texts = make_texts(FAULT_ROWS, seed=21, max_words=40)
    with open(work / "in.jsonl", "w") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"r{i}", "text": text}) + "\n")
    return work


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """moto's S3 server on a free loopback port; the environment a user would set."""
    import pyarrow.fs as pafs
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # a line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "RAY_ENSEMBLE_MODEL_CACHE": str(tmp_path_factory.mktemp("model-cache")),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fs = pafs.S3FileSystem(
        endpoint_override=env["AWS_ENDPOINT_URL"],
        access_key="testing",
        secret_key="testing",
        region="us-east-1",
        allow_bucket_creation=True,
    )
    fs.create_dir(S3_BUCKET)
    try:
        yield fs, env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.stop()


def s3_upload(fs, local: Path, key: str) -> None:
    import pyarrow.fs as pafs

    pafs.copy_files(str(local), f"{S3_BUCKET}/{key}", destination_filesystem=fs)


@pytest.fixture(scope="session")
def on_s3(s3, example):
    """The example's models and its long input, uploaded once."""
    fs, _ = s3
    for name in S3_MEMBERS:
        s3_upload(fs, example / "examples" / "models" / name, f"models/{name}")
    s3_upload(fs, example / "in.jsonl", "in/in.jsonl")
    return example
