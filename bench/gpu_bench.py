"""The GPU check's figures (issue 22): what one lent GPU shows, as one table.

    bash bench/gpu_check.sh              # the tests marked gpu, then this script
    bash bench/gpu_check.sh --dry-run    # the same end to end on CPU: tiny models and rows
    python bench/gpu_bench.py --dry-run  # this script alone

Two members built from a config with random weights (their scores mean nothing; their
shapes set the cost): a BERT-base-sized classifier (hidden 768, 12 layers, 12 heads,
intermediate 3072) and a MiniLM-sized one (hidden 384, 6 layers, 12 heads, intermediate
1536), both over all-MiniLM-L6-v2's BERT vocabulary (30,522 pieces). For each, with K = 1
and K = 3 members on the one GPU (``num_gpus`` 1 and 0.33, so K = 3 is one host):

- offline rows/s of the plain loop (``bench/offline_throughput.py``'s sorted loop:
  tokenise once, sort by length, batches of 64, same dtype, on the same GPU) and of
  ray-ensemble (the real ``score`` pipeline, Parquet in and out), whose steady rate is
  ``(N - 64) / (T_N - T_64)`` after a warm-up run, as in that script;
- the GPU's utilisation and memory, sampled by ``nvidia-smi -lms 200`` in a background
  process over the timed part of each run (ray-ensemble: the last ``T_N - T_64`` s);
- model FLOPs utilisation (MFU): useful FLOPs per second over the GPU's dense peak for the
  dtype (see :func:`forward_flops`; padding is not counted as useful).

Then online, the BERT-base ensemble of K = 3 on Serve: p50 at one client and req/s at
16 clients (``bench/online_latency.py``'s load generator).

``--dry-run`` shrinks the models (hidden 64 / 32) and the rows so the whole check runs on
a CPU in a few minutes: a rehearsal of the machinery, not GPU figures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench import offline_throughput as offline  # noqa: E402
from bench import online_latency as online  # noqa: E402

# name -> BertConfig shape. The dry run keeps the layout and shrinks every size.
MODELS = {
    "bert-base": {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072},
    "minilm": {"hidden": 384, "layers": 6, "heads": 12, "intermediate": 1536},
}
DRY_MODELS = {
    "bert-base": {"hidden": 64, "layers": 2, "heads": 4, "intermediate": 256},
    "minilm": {"hidden": 32, "layers": 1, "heads": 4, "intermediate": 128},
}
SMALL_ROWS = 64  # the short run whose time is subtracted: start-up and fixed costs cancel
LABELS = ("negative", "positive")

# Dense tensor-core peaks in TFLOP/s by GPU name (NVIDIA's datasheets, no sparsity);
# a dtype a GPU lacks (bf16 on T4 and V100), or a GPU not listed, gives no MFU.
PEAK_TFLOPS: tuple[tuple[str, dict[str, float]], ...] = (
    (r"\bh200\b(?!.*\bnvl\b)", {"bfloat16": 989.0, "float16": 989.0}),
    (r"\bh100\b.*\b(sxm|hbm3)", {"bfloat16": 989.0, "float16": 989.0}),
    (r"\ba100\b", {"bfloat16": 312.0, "float16": 312.0}),
    (r"\bl4\b", {"bfloat16": 121.0, "float16": 121.0}),
    (r"\ba10g\b", {"bfloat16": 125.0, "float16": 125.0}),
    (r"\bt4\b", {"float16": 65.0}),
    (r"\bv100\b", {"float16": 125.0}),
)


def log(message: str) -> None:
    """Progress goes to stderr; stdout carries only the table."""
    print(f"[gpu_bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def peak_tflops(gpu_name: str, dtype: str) -> float | None:
    """The dense peak of ``gpu_name`` for ``dtype``, or None when unknown.

    >>> peak_tflops("NVIDIA H200", "bfloat16"), peak_tflops("NVIDIA L40S", "bfloat16")
    (989.0, None)
    >>> peak_tflops("Tesla T4", "float16"), peak_tflops("Tesla T4", "bfloat16")
    (65.0, None)
    """
    name = gpu_name.lower()
    for pattern, peaks in PEAK_TFLOPS:
        if re.search(pattern, name):
            return peaks.get(dtype)
    return None


def forward_flops(
    lengths: np.ndarray, *, hidden: int, layers: int, intermediate: int, labels: int = 2
) -> float:
    """Forward FLOPs of a BERT classifier over rows of ``lengths`` real tokens.

    Per token, each weight of a matmul is one multiply-add (2 FLOPs): per layer Q, K, V
    and the attention output (4 h^2) and the feed-forward pair (2 h i). Attention adds,
    per token and layer, 2 x 2 x L x h: scores (QK^T) and their product with V, over the
    row's L tokens. Per row, the pooler (2 h^2) and the classifier (2 h labels) run on
    the first token only. Embedding lookups, layer norms and softmax are left out (a few
    percent).

    >>> forward_flops(np.array([10]), hidden=4, layers=1, intermediate=8, labels=2)
    4208.0
    """
    lengths = np.asarray(lengths, dtype=np.float64)
    matmul_weights = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
    per_row = (
        lengths * 2 * matmul_weights
        + layers * 4 * lengths * lengths * hidden
        + 2 * hidden * hidden
        + 2 * hidden * labels
    )
    return float(per_row.sum())


class GpuSampler:
    """``nvidia-smi`` utilisation and memory every 200 ms, in a background process, while
    the ``with`` block runs. Without nvidia-smi it records nothing (a CPU dry run)."""

    COMMAND = [
        "nvidia-smi",
        "--query-gpu=utilization.gpu,memory.used",
        "--format=csv,noheader,nounits",
        "-lms",
        "200",
    ]

    def __init__(self, gpu_index: str | None = None) -> None:
        self.gpu_index = gpu_index
        self.samples: list[tuple[float, float, float]] = []  # (monotonic s, util %, MiB)
        self.proc: subprocess.Popen | None = None
        self.reader: threading.Thread | None = None
        self.end = 0.0

    def __enter__(self) -> GpuSampler:
        if shutil.which("nvidia-smi"):
            command = list(self.COMMAND)
            if self.gpu_index is not None:
                command.append(f"--id={self.gpu_index}")
            self.proc = subprocess.Popen(
                command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
            )
            self.reader = threading.Thread(target=self._read, daemon=True)
            self.reader.start()
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            parts = [p.strip() for p in line.split(",")]
            try:
                util, mem = float(parts[0]), float(parts[1])
            except (ValueError, IndexError):
                continue  # "[N/A]" on some virtual GPUs, or a partial line at exit
            self.samples.append((time.monotonic(), util, mem))

    def __exit__(self, *exc: object) -> None:
        self.end = time.monotonic()
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.reader is not None:
            self.reader.join(timeout=2)

    def summary(self, last_s: float | None = None) -> dict | None:
        """Mean and max utilisation (%), max memory (MiB) over the last ``last_s`` seconds
        of the block (all of it when None); None without samples."""
        since = self.end - last_s if last_s and last_s > 0 else -np.inf
        chosen = [s for s in self.samples if s[0] >= since] or self.samples[-1:]
        if not chosen:
            return None
        util = np.array([s[1] for s in chosen])
        return {
            "util_mean": float(util.mean()),
            "util_max": float(util.max()),
            "mem_max_mib": float(max(s[2] for s in self.samples)),
            "samples": len(chosen),
        }


@dataclass
class Row:
    """One line of the table."""

    check: str
    model: str = "—"
    k: str = "—"
    result: str = "—"
    vs_plain: str = "—"
    gpu: dict | None = None
    mfu: str = "—"
    figures: dict = field(default_factory=dict)
    failed: bool = False

    def cells(self) -> list[str]:
        util = mem = "n/a"
        if self.gpu:
            util = f"{self.gpu['util_mean']:.0f} / {self.gpu['util_max']:.0f}"
            mem = f"{self.gpu['mem_max_mib']:,.0f}"
        if self.failed or self.result.startswith("skipped"):
            util = mem = "—"
        return [self.check, self.model, self.k, self.result, self.vs_plain, util, mem, self.mfu]


def tests_row(junit: str | None, rc: int | None) -> Row:
    """The pytest -m gpu run, from its JUnit XML."""
    row = Row("tests `pytest -m gpu`")
    if not junit or not Path(junit).is_file():
        row.result = "not run" if rc is None else f"no report (pytest exit {rc})"
        row.failed = rc not in (None, 0, 5)  # 5: nothing collected
        return row
    suites = ET.parse(junit).getroot()
    suite = suites if suites.tag == "testsuite" else suites.find("testsuite")
    assert suite is not None
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    passed = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failing = [
        case.get("name", "?")
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    parts = [f"{passed} passed", f"{counts['skipped']} skipped"]
    if failing:
        parts.insert(0, f"{len(failing)} FAILED ({', '.join(failing)})")
    row.result = ", ".join(parts)
    row.failed = bool(failing) or rc not in (None, 0, 5)
    row.figures = {**counts, "passed": passed, "failing": failing}
    return row


def build_model(folder: Path, shape: dict, seed: int = 0) -> Path:
    """A BERT classifier of ``shape`` with random weights and the MiniLM tokenizer."""
    import torch
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    if (folder / "config.json").is_file():
        return folder
    tokenizer = AutoTokenizer.from_pretrained(offline.minilm_path())
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape["hidden"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        intermediate_size=shape["intermediate"],
        max_position_embeddings=512,
        num_labels=len(LABELS),
        id2label=dict(enumerate(LABELS)),
        label2id={v: i for i, v in enumerate(LABELS)},
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def token_lengths(model_dir: Path, texts: list[str]) -> np.ndarray:
    """Real tokens per row as every contender sees them (truncated to max_length)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    ids = tok(texts, truncation=True, max_length=offline.MAX_LENGTH)["input_ids"]
    return np.array([len(x) for x in ids])


class Budget:
    """The check must end in time: a stage that would not fit is reported as skipped."""

    def __init__(self, deadline: float | None) -> None:
        self.deadline = deadline

    def allows(self, seconds: float) -> bool:
        return self.deadline is None or time.time() + seconds <= self.deadline


def guarded(row: Row, what: Callable[[], None]) -> Row:
    """Run one stage; a failure becomes its row's result, and the check goes on."""
    try:
        what()
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        row.result = f"error: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        row.failed = True
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny models and rows, any device")
    parser.add_argument("--rows", type=int, default=None, help="default 20,000 (dry run: 3,000)")
    parser.add_argument("--members", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument(
        "--batch-size", type=int, default=offline.BATCH, help="rows per pass, both contenders"
    )
    parser.add_argument(
        "--member-cpus",
        type=float,
        default=None,
        help="num_cpus of each member (default: the project's, 1 per GPU member)",
    )
    parser.add_argument("--online-members", type=int, default=3, help="K of the online row")
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "gpu-check"))
    parser.add_argument("--tests-junit", default=None, help="pytest -m gpu's --junitxml")
    parser.add_argument("--tests-rc", type=int, default=None, help="pytest -m gpu's exit code")
    parser.add_argument(
        "--deadline", type=float, default=None, help="epoch seconds; later stages are skipped"
    )
    args = parser.parse_args()
    # Ray, Serve and the libraries below write to stdout from C++ and from their own
    # threads too: everything but the table goes to stderr, at the file descriptor.
    table_out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    sys.stdout.flush()
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())

    import torch
    import transformers

    from actors.backends.base import resolve_dtype

    cuda = torch.cuda.is_available()
    if not cuda and not args.dry_run:
        log("torch sees no CUDA GPU: run with --dry-run for the CPU rehearsal")
        return 2
    device = "cuda" if cuda else "cpu"
    dtype = str(resolve_dtype("auto", device)).removeprefix("torch.")
    gpu_name = torch.cuda.get_device_name(0) if cuda else "no GPU"
    peak = peak_tflops(gpu_name, dtype) if cuda else None
    shapes = DRY_MODELS if args.dry_run else MODELS
    rows = args.rows or (3_000 if args.dry_run else 20_000)
    requests = (30, 4) if args.dry_run else (300, 40)  # at 1 client; per client at 16
    budget = Budget(args.deadline)
    offline.DEVICE = device
    offline.BATCH = args.batch_size
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0].strip()
    gpu_index = visible or ("0" if cuda and torch.cuda.device_count() > 1 else None)

    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    table: list[Row] = [tests_row(args.tests_junit, args.tests_rc)]
    log(f"device {device} ({gpu_name}), dtype {dtype}, {rows:,} rows; models in {work}")
    texts = offline.make_texts(rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    data, small = work / "data.parquet", work / "small.parquet"
    pq.write_table(pa.table({"text": texts}), data)
    pq.write_table(pa.table({"text": texts[:SMALL_ROWS]}), small)
    folders = {
        name: build_model(work / f"{name}-{'dry' if args.dry_run else 'full'}", shapes[name])
        for name in args.models
    }
    lengths = token_lengths(next(iter(folders.values())), texts)
    log(f"{int(lengths.sum()):,} real tokens, {lengths.mean():.1f} per row")

    def label(name: str) -> str:
        s = shapes[name]
        return name if not args.dry_run else f"{name} (dry: h{s['hidden']} L{s['layers']})"

    def members_of(name: str, k: int) -> list[dict]:
        # K members share the one GPU: 1/K each puts all K in one host (see plan_hosts).
        share = int(100 / k) / 100 if cuda else 0
        extra = {"num_cpus": args.member_cpus} if args.member_cpus else {}
        return [
            {
                "name": f"m{i}",
                "model": str(folders[name]),
                "batch_size": args.batch_size,
                "max_length": offline.MAX_LENGTH,
                "num_gpus": share,
                **extra,
            }
            for i in range(k)
        ]

    def mfu(name: str, k: int, rows_per_s: float) -> str:
        if peak is None:
            return "n/a"
        s = shapes[name]
        per_row = forward_flops(
            lengths, hidden=s["hidden"], layers=s["layers"], intermediate=s["intermediate"]
        ) / len(lengths)
        return f"{rows_per_s * k * per_row / (peak * 1e12):.1%}"

    # 1. The plain loops, before Ray starts: the GPU is theirs alone.
    plain: dict[tuple[str, int], Row] = {}
    for name in args.models:
        for k in args.members:
            row = Row("offline, plain loop (sorted)", label(name), str(k))
            plain[name, k] = row
            if not budget.allows(20):
                row.result = "skipped: time budget"
                continue

            def run_plain(row: Row = row, name: str = name, k: int = k) -> None:
                log(f"plain loop {name} K={k}")
                with GpuSampler(gpu_index) as gpu:
                    took = offline.sorted_loop([str(folders[name])] * k, texts, warmup=True)
                rate = rows / took
                row.result = f"{rate:,.0f} rows/s"
                row.vs_plain = "1.00x"
                row.gpu = gpu.summary(took)
                row.mfu = mfu(name, k, rate)
                row.figures = {"seconds": took, "rows_per_s": rate}

            guarded(row, run_plain)
    if cuda:
        torch.cuda.empty_cache()  # the driver's cached blocks would count as the actors' memory

    import ray

    ray.init(
        address="local",
        num_cpus=os.cpu_count(),
        num_gpus=torch.cuda.device_count() if cuda else 0,
        include_dashboard=False,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    try:
        # 2. ray-ensemble's score pipeline on the same rows.
        ours: list[Row] = []
        for name in args.models:
            for k in args.members:
                row = Row("offline, ray-ensemble `score`", label(name), str(k))
                ours.append(row)
                if not budget.allows(40 if cuda else 20):
                    row.result = "skipped: time budget"
                    continue

                def run_ours(row: Row = row, name: str = name, k: int = k) -> None:
                    members = members_of(name, k)
                    out_small, out = work / "out-small", work / "out"
                    log(f"ray-ensemble {name} K={k}: warm-up")
                    offline.ray_score(members, small, out_small)
                    t_small = offline.ray_score(members, small, out_small)
                    log(f"ray-ensemble {name} K={k}: {rows:,} rows")
                    with GpuSampler(gpu_index) as gpu:
                        t_full = offline.ray_score(members, data, out)
                    steady_s = t_full - t_small
                    row.figures = {
                        "t_small_s": t_small,
                        "t_full_s": t_full,
                        "end_to_end_rows_per_s": rows / t_full,
                    }
                    if steady_s <= 0:  # start-up noise above the rows' own time
                        row.result = f"n/a: T_N {t_full:.1f}s <= T_64 {t_small:.1f}s, raise --rows"
                        return
                    rate = (rows - SMALL_ROWS) / steady_s
                    row.figures["rows_per_s"] = rate
                    row.result = f"{rate:,.0f} rows/s"
                    base = plain[name, k].figures.get("rows_per_s")
                    row.vs_plain = f"{rate / base:.2f}x" if base else "—"
                    row.gpu = gpu.summary(steady_s)
                    row.mfu = mfu(name, k, rate)

                guarded(row, run_ours)
        # 3. Online: the first model's ensemble on Serve.
        name, k = args.models[0], args.online_members
        c1 = Row("online p50, 1 client", label(name), str(k))
        c16 = Row("online, 16 clients", label(name), str(k))
        if budget.allows(45 if cuda else 30):

            def run_online() -> None:
                run_serve(members_of(name, k), requests, gpu_index, c1, c16)

            guarded(c1, run_online)
            if c1.failed:
                c16.result, c16.failed = "error: see the row above", True
        else:
            c1.result = c16.result = "skipped: time budget"
    finally:
        ray.shutdown()

    table += [plain[name, k] for name in args.models for k in args.members] + ours + [c1, c16]
    header = (
        f"GPU check on {gpu_name} ({device}, {dtype}, dense peak "
        f"{f'{peak:g} TFLOP/s' if peak else 'n/a'}); {rows:,} rows, {lengths.mean():.0f} "
        f"tokens a row on average (max_length {offline.MAX_LENGTH}), batch {args.batch_size}; "
        f"torch {torch.__version__}, transformers {transformers.__version__}, ray {ray.__version__}"
    )
    if args.dry_run:
        header = (
            f"DRY RUN on {device}: tiny models and rows, a rehearsal, not GPU figures. {header}"
        )
    print_table(header, table, out=table_out)
    (work / "gpu_check.json").write_text(
        json.dumps(
            {
                "header": header,
                "rows": [{"cells": r.cells(), "figures": r.figures} for r in table],
            },
            indent=2,
        )
    )
    return 1 if any(r.failed for r in table) else 0


def run_serve(members: list[dict], requests: tuple[int, int], gpu_index, c1: Row, c16: Row):
    """p50 at one client and req/s at 16, the load generator of bench/online_latency.py."""
    from ray import serve

    from jobs.example import make_texts
    from pipelines.config import config_from_dict
    from pipelines.online import build_app
    from pipelines.plan import plan_ensemble

    cfg = config_from_dict(
        {
            "name": "gpu-check",
            "labels": list(LABELS),
            "members": members,
            "serve": {"max_ongoing_requests": 64, "max_queued_requests": 256},
        },
        base_dir=ROOT,
    )
    plan = plan_ensemble(cfg)
    texts = make_texts(500, seed=3, min_words=8, max_words=40)
    port = online.free_port()
    log(f"online: Serve on port {port}, K={len(members)}")
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(plan, cpu_fallback=True), name="gpu-check", route_prefix="/")
        url = online.replica_url("ensemble", f"http://127.0.0.1:{port}/v1/predict")
        online.load(url, texts, 4, requests[1])  # warm-up
        with GpuSampler(gpu_index) as gpu:
            one = online.load(url, texts, 1, requests[0])
        c1.result = f"{one['p50_ms']:.1f} ms (p99 {one['p99_ms']:.1f})"
        c1.gpu, c1.figures = gpu.summary(), one
        with GpuSampler(gpu_index) as gpu:
            many = online.load(url, texts, 16, requests[1])
        c16.result = f"{many['rps']:,.0f} req/s (p50 {many['p50_ms']:.1f} ms)"
        c16.gpu, c16.figures = gpu.summary(), many
        for row, got in ((c1, one), (c16, many)):
            if set(got["statuses"]) != {200}:
                row.result += f", statuses {got['statuses']}"
                row.failed = True
    finally:
        serve.shutdown()


def print_table(header: str, table: list[Row], out: TextIO) -> None:
    print(f"\n{header}\n", file=out)
    print(
        "| check | model | K | result | vs plain loop | GPU util % mean / max "
        "| GPU memory max MiB | MFU |",
        file=out,
    )
    print("|---|---|---|---|---|---|---|---|", file=out)
    for row in table:
        print("| " + " | ".join(row.cells()) + " |", file=out)
    print(
        "\nrows/s: plain loop N / T over N rows; ray-ensemble (N - 64) / (T_N - T_64), Parquet "
        "in and out. GPU util: nvidia-smi every 200 ms over the timed part of each run (n/a: "
        "no nvidia-smi). MFU = rows/s x K x FLOPs per row / dense peak for the dtype; FLOPs "
        "per token = 2 x matmul weights + 2 x 2 x L x hidden per layer (attention, L = the "
        "row's real tokens), padding not counted (bench/gpu_bench.py:forward_flops).",
        file=out,
        flush=True,
    )


if __name__ == "__main__":
    sys.exit(main())
