"""Many files against one: 10,000 JSONL files of 10 rows against one file of 100,000 rows.

    python bench/many_files.py                                  # both jobs, one after the other
    python bench/many_files.py --files 10000 --rows-per-input 10 --repeat 2

The same rows (short texts from the toy vocabulary, 3-16 words, no id column) and the same
tiny two-member ensemble as bench/driver_memory.py (1 layer, width 32). Each job runs in
a fresh driver process (this script with ``--run``) that starts a local Ray with 2 CPUs,
as the CLI does without ``--address``, and calls ``pipelines.offline.score``. Measured:

- the job's wall time (``score``: the input checks to ``_SUCCESS``), and the driver
  process's own, Ray's start included;
- the driver's peak resident memory: the kernel's high-water mark (VmHWM) of that
  process, read from /proc by this script while it runs. Ray's own processes (raylet,
  object store, workers) are not the driver and are not counted;
- the object store's peak use: the raylet's own figure (``object_store_bytes_used``, what
  ``ray memory --stats-only`` prints), polled every 0.2 s from a thread in the driver,
  and what was spilled to disk.

Every published row is checked: as many as the input, each id once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def peak_rss_mb(pid: int) -> float | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def build_config(work: Path) -> Path:
    import yaml

    from jobs.example import build_classifier

    for name, seed, labels in (
        ("a", 1, {0: "negative", 1: "positive"}),
        ("b", 2, {0: "POSITIVE", 1: "NEGATIVE"}),
    ):
        if not (work / name / "config.json").exists():
            build_classifier(work / name, id2label=labels, seed=seed, hidden=32, layers=1)
    config = work / "tiny.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "tiny",
                "labels": ["negative", "positive"],
                "members": [
                    {"name": "a", "model": "./a", "batch_size": 256},
                    {"name": "b", "model": "./b", "batch_size": 256},
                ],
                "reducer": {"output_members": False},
            }
        )
    )
    return config


def write_inputs(work: Path, files: int, per_file: int) -> tuple[Path, Path]:
    """One file of ``files * per_file`` rows, and the same rows in ``files`` files."""
    from jobs.example import WORDS

    one, many = work / f"one-{files}x{per_file}", work / f"many-{files}x{per_file}"
    done = many / "_complete"
    if done.exists():
        return one / "data.jsonl", many
    rng = random.Random(0)
    lines = [
        json.dumps({"text": " ".join(rng.choices(WORDS, k=rng.randint(3, 16)))}) + "\n"
        for _ in range(files * per_file)
    ]
    one.mkdir(parents=True, exist_ok=True)
    (one / "data.jsonl").write_text("".join(lines))
    many.mkdir(parents=True, exist_ok=True)
    width = len(str(files - 1))
    for i in range(files):
        chunk = lines[i * per_file : (i + 1) * per_file]
        (many / f"part-{i:0{width}d}.jsonl").write_text("".join(chunk))
    done.write_text("")  # a name starting with '_' is not read as input
    return one / "data.jsonl", many


def run_job(config: Path, data: Path, out: Path, result: Path) -> None:
    """The measured driver: Ray, the job, and a thread polling the object store."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    from pipelines.config import load_config
    from pipelines.offline import score
    from pipelines.plan import plan_ensemble

    started = time.perf_counter()
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray_s = time.perf_counter() - started
    state = get_state_from_address(ray.get_runtime_context().gcs_address)
    peak = {"used": 0, "objects": 0, "spilled": 0}
    stop = threading.Event()

    def poll() -> None:
        while not stop.is_set():
            try:
                stats = get_memory_info_reply(state, timeout_seconds=10).store_stats
                peak["used"] = max(peak["used"], stats.object_store_bytes_used)
                peak["objects"] = max(peak["objects"], stats.num_local_objects)
                peak["spilled"] = max(peak["spilled"], stats.spilled_bytes_total)
            except Exception:  # the raylet is busy or going away: skip this sample
                pass
            stop.wait(0.2)

    poller = threading.Thread(target=poll, daemon=True)
    poller.start()
    plan = plan_ensemble(load_config(config))
    begin = time.perf_counter()
    summary = score(plan, data, out, overwrite=True)
    job_s = time.perf_counter() - begin
    stop.set()
    poller.join()
    result.write_text(
        json.dumps(
            {
                "rows": summary.rows,
                "errors": summary.errors,
                "parts": summary.files,
                "job_s": job_s,
                "ray_start_s": ray_s,
                "store_peak_bytes": peak["used"],
                "store_peak_objects": peak["objects"],
                "spilled_bytes": peak["spilled"],
            }
        )
    )
    ray.shutdown()


def measure(config: Path, data: Path, out: Path, work: Path, label: str) -> dict:
    result = work / f"result-{label}.json"
    result.unlink(missing_ok=True)
    start = time.perf_counter()
    proc = subprocess.Popen(
        [sys.executable, __file__, "--run", str(config), str(data), str(out), str(result)],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
    )
    peak = 0.0
    # stderr is read by a thread, so a chatty driver never blocks on a full pipe.
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.append(proc.stderr.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
        time.sleep(0.1)
    process_s = time.perf_counter() - start
    reader.join()
    if proc.returncode != 0:
        sys.exit(f"{label} failed ({proc.returncode}):\n{''.join(err)[-4000:]}")
    doc = json.loads(result.read_text())
    import pyarrow.parquet as pq

    ids = pq.read_table(out, columns=["id"]).column("id").to_pylist()
    assert len(ids) == doc["rows"] == len(set(ids)), (len(ids), doc["rows"], len(set(ids)))
    return {
        "job": label,
        "rows": doc["rows"],
        "job_s": round(doc["job_s"], 1),
        "process_s": round(process_s, 1),
        "driver_peak_rss_mb": round(peak, 1),
        "store_peak_mb": round(doc["store_peak_bytes"] / 2**20, 1),
        "store_peak_objects": doc["store_peak_objects"],
        "spilled_mb": round(doc["spilled_bytes"] / 2**20, 1),
        "parts": doc["parts"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=10_000)
    parser.add_argument("--rows-per-input", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=1, help="run both jobs this many times")
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-many-files")
    )
    parser.add_argument("--json", default=None, help="also write the figures here")
    parser.add_argument("--run", nargs=4, metavar=("CONFIG", "INPUT", "OUT", "RESULT"))
    args = parser.parse_args()
    if args.run:
        run_job(*(Path(a) for a in args.run))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    config = build_config(work)
    one, many = write_inputs(work, args.files, args.rows_per_input)
    results = []
    for _ in range(args.repeat):
        for label, data in (("one file", one), (f"{args.files:,} files", many)):
            results.append(measure(config, data, work / "out", work, label))
            print(json.dumps(results[-1]), flush=True)
    print(
        "\n| job | rows | job wall (s) | driver process (s) | driver peak RSS (MiB) "
        "| object store peak (MiB) | spilled (MiB) |\n|---|---|---|---|---|---|---|"
    )
    for r in results:
        print(
            f"| {r['job']} | {r['rows']:,} | {r['job_s']} | {r['process_s']} | "
            f"{r['driver_peak_rss_mb']:.0f} | {r['store_peak_mb']} | {r['spilled_mb']} |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
