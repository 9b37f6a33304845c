"""A scoring job submitted through the Ray Jobs API (`ray job submit`) to a Ray cluster
started by `ray start --head`, reading from and writing to S3 (moto's server)."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from jobs.example import make_texts
from pipelines.output import read_output
from tests.conftest import S3_BUCKET as BUCKET
from tests.conftest import s3_upload as upload
from tests.test_s3 import s3_config

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray"))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def head(no_ray, s3, tmp_path):
    """A one-node Ray cluster with its Jobs API on a free loopback port; its own
    processes are killed at the end (never `ray stop`, which stops every Ray here)."""
    _, env = s3
    port, dashboard = free_port(), free_port()
    # Token authentication, as the deploy manifests run it: the submitter needs the token.
    auth = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    temp = Path("/tmp") / f"rj{os.getpid()}"  # short: Ray's socket paths have a length limit
    proc = subprocess.Popen(
        [
            RAY, "start", "--head", "--block", f"--port={port}", "--num-cpus=2",
            "--include-dashboard=true", "--dashboard-host=127.0.0.1",
            f"--dashboard-port={dashboard}", f"--temp-dir={temp}", "--disable-usage-stats",
        ],
        env={
            **os.environ,
            **env,
            **auth,
            "HF_HUB_OFFLINE": "1",
            # The job's `python` is this one, activated or not.
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        },
        stdout=open(tmp_path / "head.log", "w"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )  # fmt: skip
    address = f"http://127.0.0.1:{dashboard}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            try:
                with socket.create_connection(("127.0.0.1", dashboard), timeout=1):
                    break
            except OSError:
                time.sleep(0.5)
        yield address, auth
    finally:
        tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
        os.killpg(proc.pid, signal.SIGKILL)
        for p in tree:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(tree, timeout=30)
        shutil.rmtree(temp, ignore_errors=True)


def test_a_job_submitted_through_the_jobs_api_reads_and_writes_s3(head, s3, on_s3, tmp_path):
    fs, env = s3
    address, auth = head
    rows = [{"id": f"j{i}", "text": t} for i, t in enumerate(make_texts(200, seed=9))]
    data = tmp_path / "in.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    upload(fs, data, "submitted/in.jsonl")
    config = s3_config(on_s3, tmp_path)
    out = f"s3://{BUCKET}/submitted-out"
    # The credentials and the endpoint reach the job the way a user passes them.
    runtime_env = {"env_vars": {k: env[k] for k in env if k.startswith("AWS_")}}
    submit = subprocess.run(
        [
            RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
            "--runtime-env-json", json.dumps(runtime_env), "--",
            "python", "-m", "jobs.score", str(config), "--input", f"s3://{BUCKET}/submitted/",
            "--output", out,
        ],
        cwd=ROOT,
        env={**os.environ, **auth, "RAY_ADDRESS": address},
        capture_output=True,
        text=True,
        timeout=600,
    )  # fmt: skip
    assert submit.returncode == 0, (submit.stdout + submit.stderr)[-4000:]
    assert "succeeded" in submit.stdout
    assert read_output(out).column("id").to_pylist() == [r["id"] for r in rows]
    # Without the token the Jobs API turns the caller away.
    refused = subprocess.run(
        [RAY, "job", "list", "--address", address],
        cwd=ROOT,
        env={k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode != 0 and "Authentication" in refused.stdout + refused.stderr
