"""Jobs whose data and models live on S3: a real S3 API server (moto's, on loopback)
reached by pyarrow's own S3 client over HTTP, through AWS_ENDPOINT_URL as a user sets it.

Each test runs `ray-ensemble score` as a user does on a cluster, as a driver that joins
the session's Ray (`--address`; a Ray of its own would cost 7 s a command), whose
workers were started with that environment, as a cluster's nodes are."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as ds
import pyarrow.fs as pafs
import pytest

from jobs.example import make_texts
from pipelines.config import load_config
from pipelines.output import read_output
from pipelines.storage import Location
from tests.conftest import S3_BUCKET as BUCKET
from tests.conftest import S3_MEMBERS as MEMBERS
from tests.conftest import free_cpus, session_ray_with, wait_for_free_cpus
from tests.conftest import s3_upload as upload
from tests.oracle import canonical_probs
from tests.test_faults import ROWS, ROWS_PER_FILE, expected_ids, kill_tree

ROOT = Path(__file__).resolve().parents[1]


def keys(fs: pafs.FileSystem, prefix: str) -> list[str]:
    infos = fs.get_file_info(pafs.FileSelector(f"{BUCKET}/{prefix}", allow_not_found=True))
    return sorted(Path(i.path).name for i in infos if i.type == pafs.FileType.File)


def s3_config(work: Path, tmp_path: Path) -> Path:
    """The example config with its members' models on S3."""
    text = (work / "configs" / "example.yaml").read_text()
    for name in MEMBERS:
        text = text.replace(f"../examples/models/{name}", f"s3://{BUCKET}/models/{name}")
    path = tmp_path / "s3.yaml"
    path.write_text(text)
    return path


@pytest.fixture
def ray_address(s3) -> str:
    """The session's Ray, its workers started with the S3 environment (see ``s3``)."""
    return session_ray_with(s3[1])


def score(
    config: Path,
    inp: str,
    out: str,
    env: dict,
    address: str,
    *flags: str,
    wait: bool = True,
    log=None,
):
    cmd = [
        sys.executable,
        "-m",
        "jobs.cli",
        "score",
        str(config),
        "--input",
        inp,
        "--output",
        out,
        "--address",
        address,
        "--rows-per-file",
        str(ROWS_PER_FILE),
        *flags,
    ]
    full_env = {**os.environ, **env, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    if wait:
        return subprocess.run(
            cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=full_env
        )
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        start_new_session=True,
    )


def test_a_job_from_s3_to_s3_with_members_on_s3(ray_address, s3, on_s3, tmp_path):
    fs, env = s3
    small = tmp_path / "small.jsonl"
    rows = [{"id": f"s{i}", "text": t} for i, t in enumerate(make_texts(300, seed=5))]
    small.write_text("".join(json.dumps(r) + "\n" for r in rows))
    upload(fs, small, "small/part.jsonl")

    done = score(
        s3_config(on_s3, tmp_path),
        f"s3://{BUCKET}/small/",
        f"s3://{BUCKET}/out-small",
        env,
        ray_address,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_output(f"s3://{BUCKET}/out-small")
    assert table.column("id").to_pylist() == [r["id"] for r in rows]  # every row once, in order

    # Each member scores as plain transformers does on the local copy of its model: what
    # was loaded from S3 is the model.
    local = load_config(on_s3 / "configs" / "example.yaml")
    texts = [r["text"] for r in rows]
    for m in local.members:
        want = canonical_probs(
            m.model,
            texts,
            local.labels,
            label_map=m.label_map,
            temperature=m.temperature,
            max_length=m.max_length,
        )
        got = np.array(table.column(f"probs__{m.name}").to_pylist())
        np.testing.assert_allclose(got, want, atol=1e-5, err_msg=m.name)

    # Each model was copied once into the node's cache, whole, and nothing else is there.
    cache = Path(env["RAY_ENSEMBLE_MODEL_CACHE"])
    copies = sorted(p.name.rsplit("-", 1)[0] for p in cache.iterdir())
    assert copies == sorted(MEMBERS)
    for name in MEMBERS:
        copy = next(cache.glob(f"{name}-*"))
        original = on_s3 / "examples" / "models" / name
        assert sorted(p.name for p in copy.iterdir()) == sorted(p.name for p in original.iterdir())

    # The folder reads as one table with pyarrow's own S3 dataset reader.
    whole = ds.dataset(f"{BUCKET}/out-small", filesystem=fs, format="parquet").to_table()
    assert sorted(whole.column("id").to_pylist()) == sorted(r["id"] for r in rows)
    assert keys(fs, "out-small")[0] == "_SUCCESS"


def wait_for_part(proc: subprocess.Popen, fs, prefix: str, log: Path) -> None:
    deadline = time.monotonic() + 300
    while not [k for k in keys(fs, prefix) if k.startswith("part-")]:
        assert proc.poll() is None, f"the job ended before committing a part:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no part committed in time:\n{log.read_text()}"
        time.sleep(0.05)
    assert "_SUCCESS" not in keys(fs, prefix), "the job finished before the kill"


def test_a_killed_driver_is_resumed_on_s3(ray_address, s3, on_s3, tmp_path):
    fs, env = s3
    config, out = s3_config(on_s3, tmp_path), f"s3://{BUCKET}/out-resume"
    log = tmp_path / "log"
    idle = free_cpus()
    proc = score(config, f"s3://{BUCKET}/in/in.jsonl", out, env, ray_address, wait=False, log=log)
    try:
        wait_for_part(proc, fs, "out-resume", log)
    finally:
        kill_tree(proc)  # the driver
    wait_for_free_cpus(idle)  # Ray has ended its job
    assert "_SUCCESS" not in keys(fs, "out-resume")

    resumed = score(config, f"s3://{BUCKET}/in/in.jsonl", out, env, ray_address, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "were committed before" in resumed.stderr
    assert read_output(out).column("id").to_pylist() == expected_ids()
    # The folder holds exactly the parts _SUCCESS names, and no staging.
    success = json.loads(Location.of(out).join("_SUCCESS").read_bytes())
    assert keys(fs, "out-resume") == sorted([*success["parts"], "_SUCCESS"])
    assert not keys(fs, "out-resume/_staging")
    assert success["rows_read"] == success["rows_written"] == ROWS


def test_overwrite_on_s3_after_a_failing_run_keeps_the_old_output(ray_address, s3, on_s3, tmp_path):
    fs, env = s3
    config, out = s3_config(on_s3, tmp_path), f"s3://{BUCKET}/out-overwrite"
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(40, seed=2)))
    upload(fs, small, "small40/small.jsonl")
    first = score(config, f"s3://{BUCKET}/small40/small.jsonl", out, env, ray_address)
    assert first.returncode == 0, first.stderr[-3000:]
    old_success = Location.of(out).join("_SUCCESS").read_bytes()
    old = read_output(out)
    assert old.num_rows == 40

    # The second run dies mid-job: the old output stays whole and marked complete.
    log = tmp_path / "log"
    idle = free_cpus()
    inp = f"s3://{BUCKET}/in/in.jsonl"
    proc = score(config, inp, out, env, ray_address, "--overwrite", wait=False, log=log)
    try:
        deadline = time.monotonic() + 300
        while len([k for k in keys(fs, "out-overwrite") if k.startswith("part-")]) < 2:
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, log.read_text()[-3000:]
            time.sleep(0.05)
    finally:
        kill_tree(proc)  # the driver
    wait_for_free_cpus(idle)  # Ray has ended its job
    assert Location.of(out).join("_SUCCESS").read_bytes() == old_success
    assert read_output(out).equals(old)

    # A new --overwrite replaces it: the new rows only, and none of the old or failed parts.
    new = tmp_path / "new.jsonl"
    ids = [f"n{i}" for i in range(30)]
    texts = make_texts(30, seed=3)
    new.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts, strict=True))
    )
    upload(fs, new, "new30/new.jsonl")
    again = score(config, f"s3://{BUCKET}/new30/new.jsonl", out, env, ray_address, "--overwrite")
    assert again.returncode == 0, again.stderr[-3000:]
    assert read_output(out).column("id").to_pylist() == ids
    whole = ds.dataset(f"{BUCKET}/out-overwrite", filesystem=fs, format="parquet").to_table()
    assert sorted(whole.column("id").to_pylist()) == sorted(ids)


def test_model_uris_in_the_config(s3, tmp_path):
    """A URI is kept as given (each node copies it); a member that trains writes its model,
    so it must be local; a model missing on S3 is a config error naming it."""
    from pipelines.config import ConfigError, config_from_dict
    from pipelines.plan import plan_ensemble

    base = {"name": "t", "labels": ["negative", "positive"]}
    uri = f"s3://{BUCKET}/models/nowhere"
    cfg = config_from_dict(
        {**base, "members": [{"name": "m", "model": uri, "tokenizer": f"{uri}-tok"}]},
        base_dir=tmp_path,
    )
    assert (cfg.members[0].model, cfg.members[0].tokenizer) == (uri, f"{uri}-tok")
    with pytest.raises(ConfigError, match=r"\(m\)\.model: a member with a train: block"):
        config_from_dict(
            {**base, "members": [{"name": "m", "model": uri, "train": {"base_model": "org/x"}}]},
            base_dir=tmp_path,
        )
    with pytest.raises(
        ConfigError, match=rf"members\[0\] \(m\): model: cannot copy {uri}: .*does not exist"
    ):
        plan_ensemble(cfg)
