"""Driver memory while scoring 100k and 1M rows: streaming keeps it flat.

    python bench/driver_memory.py --rows 100000 1000000

Runs the real CLI (`python -m jobs.cli score`) on a Parquet file of short texts with a
tiny two-member ensemble, and reads the driver process's peak resident memory (VmHWM in
/proc, the kernel's own high-water mark) while it runs. Ray's own processes (raylet,
object store, workers) are not the driver and are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
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


def write_data(path: Path, rows: int) -> None:
    import random

    import pyarrow as pa
    import pyarrow.parquet as pq

    from jobs.example import WORDS

    rng = random.Random(0)
    writer = None
    chunk = 100_000
    for start in range(0, rows, chunk):
        n = min(chunk, rows - start)
        texts = [" ".join(rng.choices(WORDS, k=rng.randint(3, 16))) for _ in range(n)]
        table = pa.table({"text": texts})
        writer = writer or pq.ParquetWriter(path, table.schema)
        writer.write_table(table, row_group_size=20_000)
    writer.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[100_000, 1_000_000])
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-mem")
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import yaml

    from jobs.example import build_classifier

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
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
    results = []
    for rows in args.rows:
        data = work / f"data-{rows}.parquet"
        if not data.exists():
            write_data(data, rows)
        out = work / f"out-{rows}"
        start = time.perf_counter()
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "jobs.cli",
                "score",
                str(config),
                "--input",
                str(data),
                "--output",
                str(out),
                "--overwrite",
            ],
            cwd=ROOT,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, "RAY_DATA_DISABLE_PROGRESS_BARS": "1"},
        )
        peak = 0.0
        while proc.poll() is None:
            peak = max(peak, peak_rss_mb(proc.pid) or 0.0)
            time.sleep(0.2)
        took = time.perf_counter() - start
        err = proc.stderr.read()
        summary = [line for line in err.splitlines() if line.startswith("scored ")]
        if proc.returncode != 0:
            sys.exit(f"score failed ({proc.returncode}):\n{err[-3000:]}")
        import pyarrow.parquet as pq

        written = sum(pq.ParquetFile(f).metadata.num_rows for f in out.glob("*.parquet"))
        assert written == rows, (written, rows)
        results.append(
            {
                "rows": rows,
                "driver_peak_rss_mb": round(peak, 1),
                "wall_s": round(took, 1),
                "summary": summary[-1] if summary else "",
            }
        )
        print(json.dumps(results[-1]), flush=True)
    print("\n| rows | driver peak RSS (MiB) | wall time (s) |\n|---|---|---|")
    for r in results:
        print(f"| {r['rows']:,} | {r['driver_peak_rss_mb']:.0f} | {r['wall_s']:.0f} |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
