"""Offline throughput of a K=2 token-classification ensemble: ray-ensemble `score` vs a
plain transformers loop doing the same per-word work.

    python bench/token_throughput.py --rows 4000

Members: two small random BertForTokenClassification models (hidden 128, 4 layers),
one with a WordPiece vocabulary and one with a byte-level BPE vocabulary
(jobs/example.py), 5 BIO tags. Texts of mixed lengths from the toy vocabulary, with
punctuation. Both contenders do the same work per text: split the words
(`\\w+|[^\\w\\s]`), tokenise the raw text with offsets per member, map each word to its
first sub-token, softmax, average the members per word, argmax.

- plain loop: input order, batches of 64, `padding=True`, one process with all the
  torch threads;
- ray-ensemble: the real `score` pipeline into Parquet on a local Ray instance
  (`num_cpus` = the machine's cores here).

The pipeline's start-up (actors starting, models loading) is removed by also timing a
64-row run after a warm-up run: throughput = (N - 64) / (T_N - T_64). The loop's model
loading is not timed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
BATCH = 64
MAX_LENGTH = 128
WORD = re.compile(r"\w+|[^\w\s]")


def make_texts(n: int, seed: int = 0) -> list[str]:
    from jobs.example import WORDS

    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = min(90, max(3, int(rng.expovariate(1 / 18)) + 3))
        words = [rng.choice(WORDS) for _ in range(length)]
        for k in range(len(words)):
            if rng.random() < 0.08:
                words[k] += rng.choice([",", ".", "!", "'s"])
        out.append(" ".join(words))
    return out


def plain_loop(model_dirs: list[str], texts: list[str]) -> tuple[float, list[list[str]]]:
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    models = [
        (
            AutoTokenizer.from_pretrained(d),
            AutoModelForTokenClassification.from_pretrained(d).eval(),
        )
        for d in model_dirs
    ]
    started = time.perf_counter()
    tags_out: list[list[str]] = []
    with torch.inference_mode():
        for i in range(0, len(texts), BATCH):
            batch = texts[i : i + BATCH]
            spans = [[m.span() for m in WORD.finditer(t)] for t in batch]
            per_member = []
            for tok, model in models:
                enc = tok(
                    batch,
                    truncation=True,
                    max_length=MAX_LENGTH,
                    padding=True,
                    return_offsets_mapping=True,
                    return_tensors="pt",
                )
                offsets = enc.pop("offset_mapping").numpy()
                logits = model(**enc).logits.float().numpy()
                rows = []
                for r, words in enumerate(spans):
                    seq = enc.sequence_ids(r)
                    first = []
                    for ws, we in words:
                        pos = next(
                            (
                                k
                                for k, (s, e) in enumerate(offsets[r])
                                if seq[k] is not None and e > s and s < we and e > ws
                            ),
                            0,
                        )
                        first.append(pos)
                    z = logits[r, first]
                    p = np.exp(z - z.max(1, keepdims=True))
                    rows.append(p / p.sum(1, keepdims=True))
                per_member.append(rows)
            for r in range(len(batch)):
                p = np.mean([m[r] for m in per_member], axis=0)
                tags_out.append([TAGS[k] for k in p.argmax(1)])
    return time.perf_counter() - started, tags_out


def ray_score(config: Path, data: Path, out: Path) -> float:
    from pipelines.config import load_config
    from pipelines.offline import score
    from pipelines.plan import plan_ensemble

    plan = plan_ensemble(load_config(config))
    started = time.perf_counter()
    score(plan, data, out, overwrite=True)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=4000)
    parser.add_argument("--workdir", default=None)
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()

    import ray
    import torch
    import yaml

    from jobs.example import build_tagger

    cores = os.cpu_count() or 1
    work = Path(args.workdir or tempfile.mkdtemp(prefix="token-bench-"))
    dirs = [
        str(build_tagger(work / "wp", tags=TAGS, seed=1, hidden=128, layers=4)),
        str(build_tagger(work / "bpe", tags=TAGS, tokenizer="bpe", seed=2, hidden=128, layers=4)),
    ]
    config = work / "ner.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "name": "ner",
                "task": "token_classification",
                "labels": TAGS,
                "members": [
                    {"name": "wp", "model": dirs[0], "max_length": MAX_LENGTH, "dtype": "float32"},
                    {"name": "bpe", "model": dirs[1], "max_length": MAX_LENGTH, "dtype": "float32"},
                ],
                "reducer": {"combine": "mean", "output_members": False},
            }
        )
    )
    texts = make_texts(args.rows)
    data, small = work / "in.jsonl", work / "small.jsonl"
    data.write_text(
        "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts))
    )
    small.write_text(
        "".join(json.dumps({"id": str(i), "text": t}) + "\n" for i, t in enumerate(texts[:64]))
    )

    torch.set_num_threads(cores)
    plain_loop(dirs, texts[:64])  # warm-up
    t_plain, plain_tags = plain_loop(dirs, texts)

    ray.init(address="local", num_cpus=cores, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    ray_score(config, small, work / "out-small")
    t_small = ray_score(config, small, work / "out-small")
    t_full = ray_score(config, data, work / "out")
    ray.shutdown()

    import pyarrow.parquet as pq

    out = pq.read_table(work / "out").to_pylist()
    ours = {r["id"]: r["tags"] for r in out}
    same = np.mean([ours[str(i)] == t for i, t in enumerate(plain_tags)])
    ray_rps = (args.rows - 64) / max(t_full - t_small, 1e-9)
    plain_rps = args.rows / t_plain
    result = {
        "rows": args.rows,
        "cores": cores,
        "plain_loop_rows_per_s": round(plain_rps, 1),
        "ray_ensemble_rows_per_s": round(ray_rps, 1),
        "ratio": round(ray_rps / plain_rps, 2),
        "ray_ensemble_wall_s": round(t_full, 1),
        "same_tags_share": round(float(same), 4),
    }
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
