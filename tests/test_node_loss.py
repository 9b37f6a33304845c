"""A node dies, for real: a two-node Ray cluster on this machine loses its worker node
mid-job, and every input row still comes out exactly once.

The cluster is two `ray start --block` processes with a temp dir and ports of their own:
a head with no CPUs (so every host actor, read and write task runs on the worker node)
and a worker node with two. `ray start` rather than ``ray.cluster_utils.Cluster``:
measured here (2 cores), ``Cluster`` had both nodes up in 4.5 s against 9.5 s, and both
see a killed node dead after the same 14 s of missed health checks (5 missed checks,
one every 3 s; the test's cluster checks every second: see ``HEALTH_CHECK_PERIOD_MS``);
but `ray start` is what users run, its nodes live outside the pytest process and its
Ray, and a node is lost as a machine is: its whole process tree (raylet, agents, and the
workers, each in a session of its own) is frozen, then killed at once.

This process never joins the cluster (its Ray reads auth settings once, and the
session's local Ray may run in it): every driver is a subprocess, the job being
`ray-ensemble score ... --address` as a user runs it. The node is lost at a point the
test observes (a committed part file), never after a sleep.
"""

from __future__ import annotations

import contextlib
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

RAY = Path(sys.executable).parent / "ray"
ROOT = Path(__file__).resolve().parents[1]
NODE_START_TIMEOUT_S = 120
JOB_TIMEOUT_S = 240
ROWS = 12_000
ROWS_PER_FILE = 500
WORKER_CPUS = 2
# The GCS declares a node dead after 5 health checks in a row fail (Ray's default), one
# every 3 s by default: 1 s in the test's cluster, so the job waits ~5 s rather than ~15 s
# for the loss to be seen. A check still waits Ray's default 10 s for an answer, so a busy
# raylet is not taken for a dead one. (bench/node_loss.py keeps Ray's defaults.)
HEALTH_CHECK_PERIOD_MS = 1000

pytestmark = pytest.mark.skipif(not RAY.exists(), reason=f"no `ray` executable at {RAY}")


def free_ports(n: int) -> list[int]:
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


def tree_of(pid: int) -> list[psutil.Process]:
    """A process and all its descendants (Ray's workers are the raylet's children)."""
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def freeze_and_kill(pid: int) -> int:
    """SIGKILL a process tree as a machine losing power would: every process is stopped
    first (until no new one appears), so a raylet cannot start a worker meanwhile, then
    all are killed. Returns how many were killed."""
    frozen: dict[int, psutil.Process] = {}
    while new := [p for p in tree_of(pid) if p.pid not in frozen]:
        for p in new:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGSTOP)
            frozen[p.pid] = p
    for p in frozen.values():
        with contextlib.suppress(psutil.NoSuchProcess):
            p.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(list(frozen.values()), timeout=30)
    assert not alive, f"still running after SIGKILL: {alive}"
    return len(frozen)


def named_in(pids: set[int], name: str) -> list[int]:
    """The processes among these whose title holds ``name`` (Ray titles an actor's
    worker ``ray::<class>``)."""
    found = []
    for pid in pids:
        with contextlib.suppress(psutil.NoSuchProcess):
            if name in " ".join(psutil.Process(pid).cmdline()):
                found.append(pid)
    return found


# A driver that waits until the cluster has this many CPUs.
WAIT_FOR_CPUS = f"""
import sys, time, ray
ray.init(address=sys.argv[1], log_to_driver=False)
deadline = time.monotonic() + {NODE_START_TIMEOUT_S}
while ray.cluster_resources().get("CPU", 0) < float(sys.argv[2]):
    assert time.monotonic() < deadline, ray.cluster_resources()
    time.sleep(0.2)
"""


class TwoNodeCluster:
    """A head (no CPUs: of a job, only its driver's 0-CPU actors run there) and worker
    nodes, each a `ray start --block` process in a session of its own, all with one temp
    dir, so that every process they start can be found and stopped. Never `ray stop`: it
    stops every Ray on the machine."""

    def __init__(self, *, worker_cpus: int = WORKER_CPUS, health_check_period_ms: int = 0):
        """``health_check_period_ms``: how often the GCS checks each node (0: Ray's
        default, 3 s)."""
        # Short: Ray's unix sockets live under it, and their paths are limited to ~107 bytes.
        self.temp = tempfile.mkdtemp(prefix="rn", dir="/tmp")
        self.worker_cpus = worker_cpus
        self.gcs_port = free_ports(1)[0]
        self.address = f"127.0.0.1:{self.gcs_port}"
        # This Ray turns token auth on by itself when ~/.ray/auth_token exists: make it
        # explicit, with a token of our own, whatever that file holds.
        self.client_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        self.env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        self.env.update(
            PATH=f"{Path(sys.executable).parent}{os.pathsep}{self.env.get('PATH', '')}",
            HF_HUB_OFFLINE="1",
            TOKENIZERS_PARALLELISM="false",
            RAY_USAGE_STATS_ENABLED="0",
            **self.client_env,
        )
        if health_check_period_ms:
            self.env["RAY_health_check_period_ms"] = str(health_check_period_ms)
        self.head: subprocess.Popen | None = None
        self.workers: list[subprocess.Popen] = []
        self.lost: list[subprocess.Popen] = []

    def driver_env(self) -> dict[str, str]:
        """The environment of a driver that joins this cluster."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        env.update(self.client_env, PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1")
        return env

    def run_driver(self, code: str, *args: str, timeout: float = 120) -> str:
        """Run Python ``code`` as a driver on the cluster (``sys.argv[1]`` is its
        address); its stdout."""
        done = subprocess.run(
            [sys.executable, "-c", code, self.address, *args],
            cwd=ROOT,
            env=self.driver_env(),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert done.returncode == 0, f"driver failed:\n{done.stderr[-4000:]}\n{self.logs()}"
        return done.stdout

    def _start(self, name: str, args: list[str]) -> subprocess.Popen:
        agent, agent_grpc, runtime_env, metrics, node_manager, object_manager = free_ports(6)
        cmd = [
            str(RAY),
            "start",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--dashboard-agent-listen-port={agent}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
            f"--node-manager-port={node_manager}",
            f"--object-manager-port={object_manager}",
            "--min-worker-port=0",  # OS-chosen: the default range is any other Ray's too
            "--max-worker-port=0",
            "--disable-usage-stats",
            *args,
        ]
        with open(Path(self.temp) / f"{name}.log", "wb") as log:
            return subprocess.Popen(
                cmd,
                env=self.env,
                cwd=self.temp,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def start_head(self) -> None:
        (client_server,) = free_ports(1)
        self.head = self._start(
            "head",
            [
                "--head",
                f"--port={self.gcs_port}",
                f"--temp-dir={self.temp}",
                "--num-cpus=0",
                "--num-gpus=0",
                "--include-dashboard=false",
                f"--ray-client-server-port={client_server}",
            ],
        )

    def add_worker(self) -> subprocess.Popen:
        node = self._start(
            f"worker{len(self.workers) + len(self.lost)}",
            [f"--address={self.address}", f"--num-cpus={self.worker_cpus}", "--num-gpus=0"],
        )
        self.workers.append(node)
        return node

    def wait_for_workers(self, n: int) -> None:
        """Until the cluster has ``n`` worker nodes' CPUs (a job sizes its hosts by the
        CPUs it sees when it starts)."""
        for p in [self.head, *self.workers]:
            if p is not None and p.poll() is not None:
                raise RuntimeError(f"`ray start` exited {p.returncode}:\n{self.logs()}")
        self.run_driver(WAIT_FOR_CPUS, str(n * self.worker_cpus), timeout=NODE_START_TIMEOUT_S + 30)

    def kill_worker(self, node: subprocess.Popen) -> int:
        """Lose a worker node: its `ray start`, raylet, agents and workers. Returns how many
        processes died."""
        killed = freeze_and_kill(node.pid)
        node.wait(timeout=10)
        self.workers.remove(node)
        self.lost.append(node)
        return killed

    def node_pids(self, node: subprocess.Popen | None) -> set[int]:
        return {p.pid for p in tree_of(node.pid)} if node is not None else set()

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}:\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted(Path(self.temp).glob("*.log"))
        )

    def _ours(self) -> list[psutil.Process]:
        """Processes started from our temp dir (by cwd or command line) that outlived
        their tree: a worker whose raylet died first is reparented."""
        found = []
        for p in psutil.process_iter(["pid", "cmdline", "cwd"]):
            if p.pid == os.getpid():
                continue
            cmdline = " ".join(p.info["cmdline"] or [])
            if self.temp in cmdline or (p.info["cwd"] or "").startswith(self.temp):
                found.append(p)
        return found

    def stop(self) -> list[str]:
        """Kill every process of ours; the ones that survive (none, we hope)."""
        for node in [*self.workers, *([self.head] if self.head else [])]:
            freeze_and_kill(node.pid)
            with contextlib.suppress(subprocess.TimeoutExpired):
                node.wait(timeout=10)
        left = self._ours()
        for p in left:
            with contextlib.suppress(psutil.NoSuchProcess):
                p.send_signal(signal.SIGKILL)
        psutil.wait_procs(left, timeout=10)
        alive = [f"{p.pid}: {' '.join(p.cmdline())[:200]}" for p in self._ours() if p.is_running()]
        shutil.rmtree(self.temp, ignore_errors=True)
        return alive


@pytest.fixture(scope="module")
def cluster():
    """The two-node cluster. The session's local Ray is stopped meanwhile (as ``no_ray``
    does): two Ray instances on one machine make Ray Data misbehave."""
    import ray

    from tests.conftest import _start_ray

    had_session_ray = ray.is_initialized()
    if had_session_ray:
        ray.shutdown()
    c = TwoNodeCluster(health_check_period_ms=HEALTH_CHECK_PERIOD_MS)
    try:
        c.start_head()
        c.add_worker()
        c.wait_for_workers(1)
        yield c
    finally:
        left = c.stop()
        if had_session_ray:
            _start_ray()
    assert not left, f"processes of the cluster at {c.temp} survived teardown: {left}"


# ---- the progress log (pipelines/progress.py), from a driver on the cluster

COUNTER_CHECKS = """
import json, logging, os, re, signal, sys, time
import ray
from pipelines.progress import progress_log

ray.init(address=sys.argv[1], log_to_driver=False)
here = ray.get_runtime_context().get_node_id()

# On which node ten counters run.
nodes = []
for _ in range(10):
    with progress_log(None, 0, 60) as counter:
        where = counter.handle.__ray_call__.remote(lambda _: ray.get_runtime_context().get_node_id())
        nodes.append(ray.get(where, timeout=60))

# The lines of a log whose counter is killed (say by the OOM killer) mid-job.
lines = []
handler = logging.Handler()
handler.emit = lambda record: lines.append(record.getMessage())
log = logging.getLogger("pipelines.offline")
log.addHandler(handler)
log.setLevel(logging.INFO)

def wait_for(pattern):
    deadline = time.monotonic() + 30
    while not any(re.match(pattern, line) for line in lines) and time.monotonic() < deadline:
        time.sleep(0.05)

with progress_log(None, 0, 0.2) as counter:
    counter.add(7)
    wait_for(r"score: 7 rows")
    pid = ray.get(counter.handle.__ray_call__.remote(lambda _: os.getpid()), timeout=60)
    os.kill(pid, signal.SIGKILL)
    while os.path.exists(f"/proc/{pid}"):
        time.sleep(0.01)
    counter.add(5)  # as a host would, while it restarts
    wait_for(r"score: 12 rows")
print(json.dumps({"driver": here, "counters": nodes, "lines": lines}))
"""


@pytest.fixture(scope="module")
def counter_checks(cluster) -> dict:
    return json.loads(cluster.run_driver(COUNTER_CHECKS).strip().splitlines()[-1])


def test_progress_counter_lives_on_the_drivers_node(counter_checks):
    """Left to the scheduler, a 0-CPU actor landed on the worker node 3 times in 10 here;
    the counter must stay on the driver's node, which lives as long as the job."""
    found = counter_checks
    assert found["counters"] == [found["driver"]] * 10, found


def test_progress_log_goes_on_when_its_counter_dies(counter_checks):
    """A counter killed on its own comes back under the handle the hosts hold (a new
    actor would never hear from them), and the log keeps counting from where it was."""
    lines = counter_checks["lines"]
    shown = [int(m.group(1)) for line in lines if (m := re.match(r"score: (\d+) rows", line))]
    assert 7 in shown and 12 in shown, lines
    assert shown == sorted(shown), f"the count went backwards: {lines}"


# ---- a scoring job that loses its worker node


@pytest.fixture(scope="module")
def job_input(models, tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("node-loss")
    members = [
        {"name": "alpha", "model": str(models["alpha"]), "weight": 2.0},
        {
            "name": "gamma",
            "model": str(models["gamma"]),
            "label_map": {"LABEL_0": "negative", "LABEL_1": "positive"},
            "max_length": 64,
        },
    ]
    config = {"name": "node-loss", "labels": ["negative", "positive"], "members": members}
    (work / "config.yaml").write_text(yaml.safe_dump(config))
    with open(work / "in.jsonl", "w") as f:
        for i, text in enumerate(make_texts(ROWS, seed=5, max_words=40)):
            f.write(json.dumps({"id": f"r{i}", "text": text}) + "\n")
    return work


def committed_parts(out: Path) -> list[Path]:
    """Committed part files anywhere under the output folder (staged or published, under
    whatever commit protocol), never one still being written (``.tmp*``)."""
    return [
        p
        for p in out.rglob("part-*.parquet")
        if not any(part.startswith(".tmp") for part in p.relative_to(out).parts)
    ]


def published_ids(out: Path) -> list[str]:
    assert (out / "_SUCCESS").is_file()
    files = sorted(out.glob("part-*.parquet"))
    return [i for f in files for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()]


# A progress line of pipelines/progress.py, not the summary line ("scored ...").
PROGRESS = re.compile(r"^score: (\d[\d,]* (of [\d,]+ )?rows|\d+s in)")


def test_a_lost_worker_node_loses_no_row(cluster, job_input, tmp_path):
    out, log = tmp_path / "out", tmp_path / "job.log"
    cmd = [
        sys.executable,
        "-m",
        "jobs.cli",
        "score",
        str(job_input / "config.yaml"),
        "--input",
        str(job_input / "in.jsonl"),
        "--output",
        str(out),
        "--address",
        cluster.address,
        "--rows-per-file",
        str(ROWS_PER_FILE),
    ]
    began = time.monotonic()
    with open(log, "wb") as f:
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=cluster.driver_env(),
            stdout=subprocess.DEVNULL,
            stderr=f,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while not committed_parts(out):
            assert proc.poll() is None, (
                f"the job ended before committing a part:\n{log.read_text()}"
            )
            assert time.monotonic() < deadline, f"no part committed in time:\n{log.read_text()}"
            time.sleep(0.02)
        worker = cluster.workers[0]
        on_worker, on_head = cluster.node_pids(worker), cluster.node_pids(cluster.head)
        assert named_in(on_worker, "EnsembleHost"), "no ensemble host on the worker node"
        assert not named_in(on_head, "EnsembleHost"), "an ensemble host runs on the head"
        assert named_in(on_head, "_Progress"), "the progress counter is not on the head"
        lost_at = time.monotonic() - began
        log_at = log.stat().st_size
        cluster.kill_worker(worker)
        assert not (out / "_SUCCESS").exists(), "the job finished before the loss: make it longer"
        cluster.add_worker()
        rc = proc.wait(timeout=JOB_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
    took = time.monotonic() - began
    text = log.read_text()
    assert rc == 0, f"exit {rc}:\n{text[-4000:]}\n{cluster.logs()}"

    ids = published_ids(out)
    assert len(ids) == ROWS and len(set(ids)) == ROWS, (len(ids), len(set(ids)))
    assert set(ids) == {f"r{i}" for i in range(ROWS)}
    success = json.loads((out / "_SUCCESS").read_text())
    assert success["rows_read"] == success["rows_written"] == ROWS

    # The progress log went on after the node died (the driver's node held its counter).
    after = text.encode()[log_at:].decode(errors="replace").splitlines()
    progress = [line for line in after if PROGRESS.match(line)]
    assert progress, f"no progress line after the worker node died:\n{text}"
    print(
        f"node lost at {lost_at:.1f}s, job {took:.1f}s, {len(progress)} progress lines after",
        file=sys.stderr,
    )
