"""Faults at scale: a 300,000-row job whose host actor is killed at 40%, and one whose
driver (with every process it started) is killed at 40% and then resumed.

    python bench/faults.py --rows 300000

Both run `ray-ensemble score configs/example.yaml` (three tiny members built by
`python -m jobs.example`) as a user does, on a local Ray of its own. "40%" is observed,
not slept for: the kill comes once the committed parts hold 40% of the rows (read from
their footers). Each run then checks the published output: rows,
unique ids, and that they equal the input's ids in input order.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def committed_rows(out: Path) -> int:
    from pipelines.output import committed_rows as committed

    return committed(out)


def score_cmd(work: Path, out: Path, rows_per_file: int, *flags: str) -> list[str]:
    return [
        sys.executable, "-m", "jobs.cli", "score", str(work / "configs" / "example.yaml"),
        "--input", str(work / "in.jsonl"), "--output", str(out), "--num-cpus",
        str(os.cpu_count()), "--rows-per-file", str(rows_per_file), *flags,
    ]  # fmt: skip


def start(cmd: list[str], log: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"),
        start_new_session=True,
    )  # fmt: skip


def wait_for(proc: subprocess.Popen, out: Path, rows: int) -> float:
    started = time.monotonic()
    while committed_rows(out) < rows:
        if proc.poll() is not None:
            sys.exit(f"the job ended (rc {proc.returncode}) before {rows} rows were committed")
        time.sleep(0.2)
    return time.monotonic() - started


def check(out: Path, n: int) -> dict:
    ids = [
        i
        for f in sorted(out.glob("*.parquet"))
        for i in pq.read_table(f, columns=["id"]).column("id").to_pylist()
    ]
    success = json.loads((out / "_SUCCESS").read_text())
    return {
        "rows": len(ids),
        "unique_ids": len(set(ids)),
        "in_input_order": ids == [f"r{i}" for i in range(n)],
        "success_rows_written": success["rows_written"],
    }


def main() -> None:
    from jobs.example import make_texts, write_example

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=300_000)
    parser.add_argument("--at", type=float, default=0.4, help="kill once this share is committed")
    parser.add_argument("--rows-per-file", type=int, default=20_000)
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-faults")
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    if not (work / "in.jsonl").is_file():
        work.mkdir(parents=True, exist_ok=True)
        write_example(work / "examples")
        shutil.copytree(ROOT / "configs", work / "configs", dirs_exist_ok=True)
        with open(work / "in.jsonl", "w") as f:
            for i, text in enumerate(make_texts(args.rows, seed=7, max_words=60)):
                f.write(json.dumps({"id": f"r{i}", "text": text}) + "\n")
    at = int(args.rows * args.at)
    results = {}

    out, log = work / "out-host", work / "host.log"
    shutil.rmtree(out, ignore_errors=True)
    began = time.monotonic()
    proc = start(score_cmd(work, out, args.rows_per_file), log)
    waited = wait_for(proc, out, at)
    hosts = [
        p for p in psutil.Process(proc.pid).children(recursive=True)
        if "EnsembleHost" in " ".join(p.cmdline())
    ]  # fmt: skip
    for p in hosts:
        p.send_signal(signal.SIGKILL)
    rc = proc.wait()
    results["host killed"] = {
        "killed_at_s": round(waited, 1),
        "committed_at_kill": committed_rows(out) if rc else at,
        "hosts_killed": len(hosts),
        "exit": rc,
        "wall_s": round(time.monotonic() - began, 1),
        **(check(out, args.rows) if rc == 0 else {}),
    }
    print(json.dumps(results["host killed"]), flush=True)

    out, log = work / "out-driver", work / "driver.log"
    shutil.rmtree(out, ignore_errors=True)
    began = time.monotonic()
    proc = start(score_cmd(work, out, args.rows_per_file), log)
    waited = wait_for(proc, out, at)
    tree = [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    for p in tree:
        p.send_signal(signal.SIGKILL)
    _, alive = psutil.wait_procs(tree, timeout=30)
    proc.wait()
    committed = committed_rows(out)
    resumed_began = time.monotonic()
    resume = subprocess.run(
        score_cmd(work, out, args.rows_per_file, "--resume"),
        cwd=ROOT, capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"},
    )  # fmt: skip
    results["driver killed, then --resume"] = {
        "killed_at_s": round(waited, 1),
        "processes_killed": len(tree),
        "left_alive": len(alive),
        "committed_at_kill": committed,
        "resume_exit": resume.returncode,
        "resume_wall_s": round(time.monotonic() - resumed_began, 1),
        "summary": resume.stderr.strip().splitlines()[-1] if resume.stderr.strip() else "",
        **(check(out, args.rows) if resume.returncode == 0 else {}),
    }
    print(json.dumps(results["driver killed, then --resume"]), flush=True)
    print("\n| run | exit | rows | unique ids | input order | committed at the kill |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(
            f"| {name} | {r.get('exit', r.get('resume_exit'))} | {r.get('rows')} | "
            f"{r.get('unique_ids')} | {r.get('in_input_order')} | {r['committed_at_kill']:,} |"
        )


if __name__ == "__main__":
    main()
