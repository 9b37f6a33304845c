"""Jobs that lose processes on purpose: every input row still comes out exactly once.

Each test runs `ray-ensemble score` as a user does, as a driver that joins the
session's Ray (`--address`, as on a cluster: a Ray of its own would cost 7 s a command),
and kills at a point it observes: the first part file committed in the staging folder,
never after a sleep.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

from jobs.example import make_texts
from tests.conftest import FAULT_ROWS as ROWS
from tests.conftest import free_cpus, session_ray_processes, wait_for_free_cpus

ROOT = Path(__file__).resolve().parents[1]

ROWS_PER_FILE = 500


def score_cmd(work: Path, out: Path, address: str, *flags: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "jobs.cli",
        "score",
        str(work / "configs" / "example.yaml"),
        "--input",
        str(work / "in.jsonl"),
        "--output",
        str(out),
        "--address",
        address,
        "--rows-per-file",
        str(ROWS_PER_FILE),
        *flags,
    ]


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "w"),
        start_new_session=True,
    )


def wait_for_first_part(proc: subprocess.Popen, out: Path, log: Path) -> None:
    deadline = time.monotonic() + 240
    while not list((out / "_staging").glob("part-*.parquet")):
        assert proc.poll() is None, f"the job ended before committing a part:\n{log.read_text()}"
        assert time.monotonic() < deadline, f"no part committed in time:\n{log.read_text()}"
        time.sleep(0.02)
    assert not (out / "_SUCCESS").exists(), "the job finished before the kill: make it longer"


def ids_of(out: Path) -> list[str]:
    assert (out / "_SUCCESS").is_file()
    files = sorted(out.glob("*.parquet"))
    return [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


def expected_ids() -> list[str]:
    return [f"r{i}" for i in range(ROWS)]


def ensemble_hosts() -> set[psutil.Process]:
    """The session Ray's ensemble host processes (an idle worker may exit meanwhile)."""
    hosts = set()
    for p in session_ray_processes():
        with contextlib.suppress(psutil.NoSuchProcess):
            if "EnsembleHost" in " ".join(p.cmdline()):
                hosts.add(p)
    return hosts


def test_a_killed_host_actor_loses_no_row(ray_address, example, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    others = ensemble_hosts()  # of earlier tests, if any still ends
    proc = start(score_cmd(example, out, ray_address), log)
    try:
        wait_for_first_part(proc, out, log)
        hosts = ensemble_hosts() - others
        assert hosts, "no ensemble host process found"
        for host in hosts:
            host.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert ids_of(out) == expected_ids()  # every row once, in input order
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["rows_read"] == success["rows_written"] == ROWS
    assert success["files"] == {"in.jsonl": {"read": ROWS, "written": ROWS, "errors": 0}}


def kill_tree(proc: subprocess.Popen) -> None:
    """SIGKILL the command and every process it started (Ray's GCS, raylet, workers)."""
    tree = [proc, *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        try:
            p.send_signal(signal.SIGKILL) if isinstance(p, psutil.Process) else p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout=30)
    _, alive = psutil.wait_procs([p for p in tree if isinstance(p, psutil.Process)], timeout=30)
    assert not alive, f"still running: {alive}"


def test_a_killed_driver_is_resumed_exactly_once(ray_address, example, tmp_path):
    out, log = tmp_path / "out", tmp_path / "log"
    idle = free_cpus()
    proc = start(score_cmd(example, out, ray_address), log)
    try:
        wait_for_first_part(proc, out, log)
    finally:
        kill_tree(proc)  # the driver: it joined the session's Ray, and started none
    # Ray ends the dead driver's job: its hosts, readers and writers.
    wait_for_free_cpus(idle)
    assert not (out / "_SUCCESS").exists() and (out / "_staging").is_dir()
    assert not list(out.glob("*.parquet"))  # nothing is published before it is complete
    committed = len(list((out / "_staging").glob("part-*.parquet")))
    assert committed >= 1

    # Without --resume the interrupted job is neither lost nor silently restarted.
    again = subprocess.run(
        score_cmd(example, out, ray_address),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert again.returncode == 2 and "--resume" in again.stderr

    resumed = subprocess.run(
        score_cmd(example, out, ray_address, "--resume"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert ids_of(out) == expected_ids()
    # The committed rows were not scored again.
    assert "committed already" in resumed.stderr
    assert "were committed before" in resumed.stderr
    before = int(resumed.stderr.split("; ")[1].split(" were committed before")[0])
    assert ROWS_PER_FILE <= before < ROWS
    assert not (out / "_staging").exists()


def test_overwrite_after_a_failing_run_keeps_the_old_output(ray_address, example, tmp_path):
    small = tmp_path / "small.jsonl"
    small.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(40, seed=2)))
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}

    def run(config: Path, *flags: str) -> subprocess.CompletedProcess:
        cmd = [
            sys.executable,
            "-m",
            "jobs.cli",
            "score",
            str(config),
            "--input",
            str(small),
            "--output",
            str(out),
            "--address",
            ray_address,
            *flags,
        ]
        return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)

    first = run(example / "configs" / "example.yaml")
    assert first.returncode == 0, first.stderr[-2000:]
    old = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert "_SUCCESS" in old

    # A member whose weights are corrupt: the config checks pass, loading fails in the host.
    broken = example / "broken"
    shutil.copytree(example / "examples" / "models" / "alpha", broken / "alpha")
    weights = next((broken / "alpha").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    config = (example / "configs" / "example.yaml").read_text()
    (broken / "example.yaml").write_text(config.replace("../examples/models/alpha", "alpha"))
    failed = run(broken / "example.yaml", "--overwrite")
    assert failed.returncode == 1, failed.stderr[-2000:]
    kept = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    assert kept == old  # the old output, byte for byte, still marked complete
