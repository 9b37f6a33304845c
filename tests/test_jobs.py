"""Ray Jobs: `python -m jobs.score` submitted to a real local head over the Jobs API.

The head is a `ray start --head --block` subprocess of its own, with its own temp dir and
ports, so it never touches the session's cluster (conftest ``ray_cluster``); this module
never calls ``ray.init``: the Jobs client speaks HTTP. The job ships the project the way
`ray job submit --working-dir .` does (Ray honours .gitignore, so .venv stays behind).
Token auth is on, with a token of the head's own: this Ray turns it on by itself whenever
~/.ray/auth_token exists, so an explicit setting is the only reproducible one.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

try:
    import psutil
except ImportError:  # not in every venv; Ray ships one and puts it on sys.path on import
    import ray  # noqa: F401

    # isort: split
    import psutil

from jobs.example import make_texts
from tests.oracle import canonical_probs

RAY = Path(sys.executable).parent / "ray"
ROOT = Path(__file__).resolve().parents[1]
LABELS = ["negative", "positive"]
HEAD_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 180

pytestmark = pytest.mark.skipif(not RAY.exists(), reason=f"no `ray` executable at {RAY}")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _procs_of(temp: str) -> list[psutil.Process]:
    """Processes of our head: its temp dir on the command line, or working inside it."""
    found = []
    for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
        if p.pid == os.getpid():
            continue
        cmdline = " ".join(p.info["cmdline"] or [])
        if temp in cmdline or (p.info["cwd"] or "").startswith(temp):
            found.append(p)
    return found


def _stop_head(proc: subprocess.Popen, temp: str) -> list[str]:
    """Stop our head; the processes of it that survive (none, we hope).

    SIGTERM goes to `ray start --block` alone first: it stops its processes in order. (Were
    the whole group signalled at once, the GCS would go first and the node's drain would
    wait 30 s for it.) Then SIGTERM, and SIGKILL, to whatever is left in its process group
    or runs from its temp dir.
    """
    proc.terminate()
    try:
        proc.wait(45)
    except subprocess.TimeoutExpired:
        pass
    for sig in (signal.SIGTERM, signal.SIGKILL):
        deadline = time.monotonic() + 10  # raylet's workers and agents notice and exit
        while (left := _procs_of(temp)) and time.monotonic() < deadline:
            time.sleep(0.2)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)  # its group: the pgid is not reused while members live
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(sig)
        psutil.wait_procs(left, timeout=10)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(10)
    return [f"{p.pid}: {' '.join(p.cmdline())[:200]}" for p in _procs_of(temp) if p.is_running()]


@pytest.fixture(scope="module")
def head():
    # Short: Ray's unix sockets live under it, and their paths are limited to ~107 bytes.
    temp = tempfile.mkdtemp(prefix="rj", dir="/tmp")
    token = secrets.token_hex(32)
    gcs, dashboard, agent, agent_grpc, client_server, runtime_env, metrics = _free_ports(7)
    # No RAY_ADDRESS and no other Ray setting; the project's own RAY_ENSEMBLE_* stay.
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("RAY_") or k.startswith("RAY_ENSEMBLE_")
    }
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",  # job's `python`
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_USAGE_STATS_ENABLED="0",
        # This Ray turns token auth on when ~/.ray/auth_token exists (ray.init makes one):
        # make it explicit, with a token of our own, whatever that file holds.
        RAY_AUTH_MODE="token",
        RAY_AUTH_TOKEN=token,
        # Ray Data leaves detached actors (AutoscalingCoordinator, ActorLocationTracker)
        # holding leases, so a drain on SIGTERM always runs out its 30 s: skip it.
        RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S="0",
    )
    cmd = [
        str(RAY),
        "start",
        "--head",
        "--block",
        "--node-ip-address=127.0.0.1",
        f"--port={gcs}",
        f"--temp-dir={temp}",
        "--num-cpus=2",
        "--include-dashboard=true",
        "--dashboard-host=127.0.0.1",
        f"--dashboard-port={dashboard}",
        f"--dashboard-agent-listen-port={agent}",
        f"--dashboard-agent-grpc-port={agent_grpc}",
        f"--ray-client-server-port={client_server}",
        f"--runtime-env-agent-port={runtime_env}",
        f"--metrics-export-port={metrics}",
        "--min-worker-port=0",  # OS-chosen: the default 10002-19999 is the session cluster's
        "--max-worker-port=0",
        "--disable-usage-stats",
    ]
    log_path = Path(temp) / "head.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            cmd, env=env, cwd=temp, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        yield _Head(proc, temp, log_path, f"http://127.0.0.1:{dashboard}", token, gcs)
    finally:
        left = _stop_head(proc, temp)
        shutil.rmtree(temp, ignore_errors=True)
        assert not left, f"processes of the head at {temp} survived teardown: {left}"


class _Head:
    """Our head while it boots: ``client`` waits for its dashboard, so the models get built
    meanwhile."""

    def __init__(self, proc, temp, log_path, url, token, gcs_port):
        self.proc, self.temp, self.log_path, self.url = proc, temp, log_path, url
        self.token, self.gcs_port = token, gcs_port
        self.started = time.monotonic()

    @functools.cached_property
    def client(self):
        from ray.job_submission import JobSubmissionClient

        while True:
            if self.proc.poll() is not None:
                pytest.fail(
                    f"ray start exited {self.proc.returncode}:\n{self.log_path.read_text()}"
                )
            if time.monotonic() - self.started > HEAD_START_TIMEOUT_S:
                pytest.fail(
                    f"no dashboard at {self.url} in {HEAD_START_TIMEOUT_S}s:\n"
                    f"{self.log_path.read_text()}"
                )
            try:
                auth = {"Authorization": f"Bearer {self.token}"}
                return JobSubmissionClient(self.url, headers=auth)
            except ConnectionError:
                time.sleep(0.5)


def _submit(client, args: list[str]) -> str:
    return client.submit_job(
        entrypoint=" ".join(["python", "-m", "jobs.score", *args]),
        runtime_env={"working_dir": str(ROOT)},
    )


def _wait(client, job_id: str):
    from ray.job_submission import JobStatus

    deadline = time.monotonic() + JOB_TIMEOUT_S
    while (status := client.get_job_status(job_id)) not in {
        JobStatus.SUCCEEDED,
        JobStatus.FAILED,
        JobStatus.STOPPED,
    }:
        if time.monotonic() > deadline:
            client.stop_job(job_id)
            pytest.fail(
                f"job {job_id} still {status} after {JOB_TIMEOUT_S}s; logs:\n"
                f"{client.get_job_logs(job_id)}"
            )
        time.sleep(0.5)
    return status


MEMBERS = [  # what the job's config holds, less the model paths
    {"name": "alpha", "weight": 2.0, "batch_size": 8},
    {
        "name": "gamma",
        "temperature": 1.5,
        "max_length": 24,
        "label_map": {"LABEL_0": "negative", "LABEL_1": "positive"},
    },
]


@pytest.fixture(scope="module")
def submitted(head, models, tmp_path_factory):
    """All the module's jobs, submitted at once: the bad ones fail while the good one runs."""
    tmp = tmp_path_factory.mktemp("jobs")
    members = [{**m, "model": str(models[m["name"]])} for m in MEMBERS]
    config = tmp / "config.yaml"
    config.write_text(yaml.safe_dump({"name": "job", "labels": LABELS, "members": members}))
    texts = make_texts(24, seed=21, max_words=40)
    rows = [{"id": f"r{i}", "text": t} for i, t in enumerate(texts)]
    rows.insert(7, {"id": "empty", "text": ""})  # scored as an error, not a failed job
    source = tmp / "in.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))

    client = head.client  # up by now, or soon
    started = time.monotonic()
    good = _submit(client, [str(config), "--input", str(source), "--output", str(tmp / "out")])
    submit_s = time.monotonic() - started  # packs and uploads the working_dir
    missing = tmp / "no-such.yaml"
    bad = {
        "no --output": (
            _submit(client, [str(config), "--input", str(source)]),
            "python -m jobs.score: error: the following arguments are required: --output",
        ),
        "no config": (
            _submit(client, [str(missing), "--input", str(source), "--output", str(tmp / "o")]),
            f"ray-ensemble: error: cannot read config file {missing}",
        ),
    }
    return SimpleNamespace(
        good=good, bad=bad, submit_s=submit_s, tmp=tmp, texts=texts, rows=rows, started=started
    )


def test_score_job_matches_plain_transformers(head, submitted, models):
    from ray.job_submission import JobStatus

    client, job_id = head.client, submitted.good
    status = _wait(client, job_id)
    logs = client.get_job_logs(job_id)
    assert status == JobStatus.SUCCEEDED, f"job {job_id} {status}; logs:\n{logs}"
    print(
        f"submit {submitted.submit_s:.1f}s, job {time.monotonic() - submitted.started:.1f}s",
        file=sys.stderr,
    )
    # The entry point joined the job's cluster (RAY_ADDRESS) instead of starting its own.
    assert re.search(rf"Connecting to existing Ray cluster at address: \S+:{head.gcs_port}\b", logs)
    # A good job logs no error-level line from Ray's core worker ("[time E pid tid] ..."):
    # hosts once got their arguments as object-store refs, and every job said so (ray#53727).
    errors = re.findall(r"^\[[^\]]* E \d+ \d+\].*$", logs, flags=re.M)
    assert not errors, "\n".join(errors)

    # The working_dir went up without .venv and the other .gitignored paths.
    assert submitted.submit_s < 15, f"submit took {submitted.submit_s:.1f}s: uploading .venv?"
    pkg = client.get_job_info(job_id).runtime_env["working_dir"]
    assert re.fullmatch(r"gcs://_ray_pkg_\w+\.zip", pkg), pkg
    pkg_dirs = Path(head.temp).glob("session_*/runtime_resources/working_dir_files/" + pkg[6:-4])
    unpacked = next(pkg_dirs)
    shipped = [p.relative_to(unpacked) for p in unpacked.rglob("*") if p.is_file()]
    assert {p.parts[0] for p in shipped} >= {"jobs", "pipelines", "actors", "pyproject.toml"}
    assert not {p.parts[0] for p in shipped} & {".venv", ".git", "examples", "out"}
    assert sum((unpacked / p).stat().st_size for p in shipped) < 5 * 2**20

    files = sorted((submitted.tmp / "out").glob("*.parquet"))
    assert files, f"no Parquet written; logs:\n{logs}"
    out = pq.read_table(files)
    table = {r["id"]: r for r in out.to_pylist()}
    assert out.num_rows == len(table) == len(submitted.rows)
    assert set(table) == {r["id"] for r in submitted.rows}
    assert table["empty"]["error"].startswith("'text' is empty"), table["empty"]["error"]
    assert table["empty"]["probs"] is None and table["empty"]["label"] is None
    good = [f"r{i}" for i in range(len(submitted.texts))]
    assert [table[i]["error"] for i in good] == [None] * len(good)

    ref = {
        m["name"]: canonical_probs(
            models[m["name"]],
            submitted.texts,
            LABELS,
            label_map=m.get("label_map"),
            temperature=m.get("temperature", 1.0),
            max_length=m.get("max_length", 256),
        )
        for m in MEMBERS
    }
    for name, want in ref.items():
        got = np.array([table[i][f"probs__{name}"] for i in good])
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=name)
    weights = {m["name"]: m.get("weight", 1.0) for m in MEMBERS}
    ens = sum(weights[n] * ref[n] for n in ref) / sum(weights.values())
    np.testing.assert_allclose(np.array([table[i]["probs"] for i in good]), ens, atol=1e-5)
    assert [table[i]["label"] for i in good] == [LABELS[k] for k in ens.argmax(1)]


def test_bad_invocations_fail_with_a_usage_error(head, submitted):
    from ray.job_submission import JobStatus

    for what, (job_id, message) in submitted.bad.items():
        status = _wait(head.client, job_id)
        logs = head.client.get_job_logs(job_id)
        assert status == JobStatus.FAILED, f"{what}: job {job_id} {status}; logs:\n{logs}"
        assert message in logs, f"{what}: {message!r} not in logs:\n{logs}"
        assert "Traceback" not in logs, f"{what}: a traceback for a usage error:\n{logs}"
        info = head.client.get_job_info(job_id)
        assert info.driver_exit_code == 2, f"{what}: {info}"
        assert "exit code 2" in (info.message or ""), f"{what}: {info.message}"
    no_output = head.client.get_job_logs(submitted.bad["no --output"][0])
    assert "usage: python -m jobs.score [-h]" in no_output, no_output
    assert not (submitted.tmp / "o").exists()  # refused before anything was written


@pytest.mark.parametrize("command", ["score", "train", "fit", "evaluate"])
def test_every_job_entry_point_is_its_cli_command(command, tmp_path):
    """`python -m jobs.<command>` takes the command's arguments and exits 2 on misuse,
    naming itself in the usage line."""
    run = subprocess.run(
        [sys.executable, "-m", f"jobs.{command}", str(tmp_path / "missing.yaml")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode == 2, run.stderr
    assert f"usage: python -m jobs.{command} " in run.stderr
    assert "--input" in run.stderr and "Traceback" not in run.stderr
