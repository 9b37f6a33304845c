"""A node dies at scale: a 300,000-row job on a two-node Ray cluster on this machine loses
its worker node at 40%, a fresh worker node joins, and the job ends 0 with every row once.

    python bench/node_loss.py --rows 300000 [--baseline]

The cluster is the one `tests/test_node_loss.py` starts (its ``TwoNodeCluster``): a head
with no CPUs and a worker node with ``--worker-cpus`` CPUs, each a `ray start --block` of
its own, so every host actor, read and write task runs on the worker node. The job is
`ray-ensemble score configs/example.yaml --address HEAD` (three tiny members built by
`python -m jobs.example`), as a user runs it. "40%" is observed, not slept for: the
worker node (its `ray start`, raylet, agents and workers) is frozen and killed once the
committed part files hold 40% of the rows (their Parquet footers' row counts); a fresh
worker node is started at once. Then the published output is read back.

Figures: exit status, rows, unique ids, whether they equal the input's, wall time, when
the node was lost, the stall (from the loss to the next committed part: Ray declaring the
node dead, the host restarting on the fresh node, and scoring up to the next part), and
the progress lines the driver printed after the loss. ``--baseline`` first runs the same
job on a fresh cluster without the loss, for the wall time it costs. Exit 1 when a run
fails or loses or repeats a row.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.test_node_loss import (  # noqa: E402
    PROGRESS,
    TwoNodeCluster,
    committed_parts,
    named_in,
)


class Committed:
    """Rows in the committed parts, each footer read once."""

    def __init__(self, out: Path) -> None:
        self.out = out
        self.rows_of: dict[Path, int] = {}

    def rows(self) -> int:
        for part in committed_parts(self.out):
            if part not in self.rows_of:
                # A part moved (published) while it was read: count it under its new name.
                with contextlib.suppress(OSError, ValueError):
                    self.rows_of[part] = pq.ParquetFile(part).metadata.num_rows
        live = set(committed_parts(self.out))
        return sum(n for p, n in self.rows_of.items() if p in live)


def write_input(work: Path, rows: int) -> None:
    from jobs.example import make_texts, write_example

    if (work / "in.jsonl").is_file() and sum(1 for _ in open(work / "in.jsonl")) == rows:
        return
    work.mkdir(parents=True, exist_ok=True)
    write_example(work / "examples")
    shutil.copytree(ROOT / "configs", work / "configs", dirs_exist_ok=True)
    with open(work / "in.jsonl", "w") as f:
        for i, text in enumerate(make_texts(rows, seed=7, max_words=60)):
            f.write(json.dumps({"id": f"r{i}", "text": text}) + "\n")


def run(args: argparse.Namespace, work: Path, *, lose: bool) -> dict:
    """One job on a fresh two-node cluster; with ``lose``, its worker node is lost at
    ``args.at`` of the rows and a fresh one started."""
    out, log = work / "out", work / ("job.log" if lose else "baseline.log")
    shutil.rmtree(out, ignore_errors=True)
    cluster = TwoNodeCluster(worker_cpus=args.worker_cpus)
    proc = None
    log_at = 0
    result: dict = {"run": "worker node lost" if lose else "no loss (baseline)"}
    try:
        cluster.start_head()
        cluster.add_worker()
        cluster.wait_for_workers(1)
        cmd = [
            sys.executable, "-m", "jobs.cli", "score", str(work / "configs" / "example.yaml"),
            "--input", str(work / "in.jsonl"), "--output", str(out),
            "--address", cluster.address, "--rows-per-file", str(args.rows_per_file),
        ]  # fmt: skip
        committed = Committed(out)
        at = int(args.rows * args.at) if lose else args.rows + 1
        began = time.monotonic()
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                cmd, cwd=ROOT, env=cluster.driver_env(), stdout=subprocess.DEVNULL, stderr=f,
                start_new_session=True,
            )  # fmt: skip
        while (rows := committed.rows()) < at and proc.poll() is None:
            time.sleep(0.2)
        if lose:
            if proc.poll() is not None:
                sys.exit(f"the job ended (exit {proc.returncode}) before {at} rows were committed")
            worker = cluster.workers[0]
            on_worker, on_head = cluster.node_pids(worker), cluster.node_pids(cluster.head)
            result["hosts_on_worker"] = len(named_in(on_worker, "EnsembleHost"))
            result["hosts_on_head"] = len(named_in(on_head, "EnsembleHost"))
            result["progress_counter_on_head"] = bool(named_in(on_head, "_Progress"))
            log_at = log.stat().st_size
            lost = time.monotonic()
            result["node_lost_at_s"] = round(lost - began, 1)
            result["committed_at_loss"] = rows
            result["processes_killed"] = cluster.kill_worker(worker)
            cluster.add_worker()
            next_part = None
            while proc.poll() is None:
                if next_part is None and committed.rows() > rows:
                    next_part = time.monotonic()
                time.sleep(0.2)
            result["stall_s"] = round((next_part or time.monotonic()) - lost, 1)
        proc.wait()
        result["exit"] = proc.returncode
        result["wall_s"] = round(time.monotonic() - began, 1)
    finally:
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        left = cluster.stop()
        if left:
            print(f"left running: {left}", file=sys.stderr)

    text = log.read_text()
    after = text.encode()[log_at:].decode(errors="replace").splitlines()
    if lose:
        result["progress_lines_after_loss"] = sum(1 for line in after if PROGRESS.match(line))
        result["progress_after_loss"] = [
            line for line in after if PROGRESS.match(line) or line.startswith("scored ")
        ]
    summary = [line for line in text.splitlines() if line.startswith("scored ")]
    result["summary"] = summary[-1] if summary else text.strip().splitlines()[-1]
    if result["exit"] == 0:
        ids = [
            i
            for f in sorted(out.glob("part-*.parquet"))
            for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()
        ]
        success = json.loads((out / "_SUCCESS").read_text())
        result.update(
            rows=len(ids),
            unique_ids=len(set(ids)),
            ids_equal_input=set(ids) == {f"r{i}" for i in range(args.rows)},
            success_rows_written=success["rows_written"],
        )
    print(json.dumps(result, indent=1), flush=True)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--at", type=float, default=0.4, help="lose the node at this share")
    parser.add_argument("--rows-per-file", type=int, default=20_000)
    parser.add_argument("--worker-cpus", type=int, default=2)
    parser.add_argument(
        "--baseline", action="store_true", help="first run the same job without the loss"
    )
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-node-loss")
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    write_input(work, args.rows)
    results = [run(args, work, lose=False)] if args.baseline else []
    results.append(run(args, work, lose=True))
    print("\n| run | exit | rows | unique ids | = input ids | wall | node lost at | stall |")
    print("|---|---|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['run']} | {r['exit']} | {r.get('rows', 0):,} | {r.get('unique_ids', 0):,} | "
            f"{r.get('ids_equal_input')} | {r['wall_s']} s | {r.get('node_lost_at_s', '-')} s | "
            f"{r.get('stall_s', '-')} s |"
        )
    if any(r["exit"] != 0 or r.get("unique_ids") != args.rows for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
