"""Members and ensemble side by side on a tagged set: `ray-ensemble evaluate` for
token_classification ensembles.

The set is scored by the real offline pipeline (`score`) and read back, as for
classification. Entity precision, recall and F1 (micro and per type) come from
``seqeval`` in strict IOB2 mode; word accuracy is the share of words whose tag is right.
The ensemble's F1 gain over its best member gets a paired bootstrap interval over
sentences: the same resampled sentences score both.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from pipelines.config import ConfigError
from pipelines.io import (
    InputError,
    InputFiles,
    check_input,
    list_input_files,
    peek_columns,
    read_column,
    require_column,
)
from pipelines.plan import EnsemblePlan
from pipelines.storage import Location

__all__ = [
    "check_tagged_input",
    "entity_counts",
    "evaluate_tagging",
    "f1_gain",
    "render_tagging_report",
    "tag_metrics",
]

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
TRUTH_COLUMN = "true_tags"
SCORED_DIR = "scored"


def _tag_list_error(value: object, labels: set[str]) -> str | None:
    if value is None:
        return None  # an unlabelled row: skipped
    if not isinstance(value, (list, tuple)):
        return f"{value!r} is not a list of tags"
    unknown = [t for t in value if t not in labels]
    return f"tags {unknown[:3]} are not in the ensemble's labels" if unknown else None


def check_tagged_input(plan: EnsemblePlan, input_path: str | Path, label_column: str) -> InputFiles:
    """The input and its tag lists, checked before Ray starts (usage errors)."""
    if not plan.task.takes_words:
        raise ConfigError("tagged evaluation is for token_classification ensembles")
    files, fmt, _ = list_input_files(input_path)
    columns = peek_columns(files[0], fmt)
    require_column(files[0], fmt, columns, label_column, "--label-column")
    inputs = check_input(plan.config, input_path, allow=(label_column,))
    labels = set(plan.config.labels)
    values = read_column(files, fmt, label_column, as_text=False)
    for i, value in enumerate(values):
        why = _tag_list_error(value, labels)
        if why:
            raise InputError(
                f"--label-column {label_column}: row {i}: {why}; give each row the list of "
                f"its words' tags, in {sorted(labels)}"
            )
    if not any(v for v in values):
        raise InputError(f"--label-column {label_column}: no row has tags")
    return inputs


def entity_counts(
    truth: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per sentence: entities right, predicted, and true (strict IOB2, as seqeval counts
    them), so that micro F1 over any resample is ``2 Σ right / (Σ pred + Σ true)``."""
    from seqeval.scheme import IOB2, Entities

    true_sets = Entities([list(t) for t in truth], IOB2, suffix=False).entities
    pred_sets = Entities([list(p) for p in pred], IOB2, suffix=False).entities
    right = np.array(
        [
            len({e.to_tuple() for e in t} & {e.to_tuple() for e in p})
            for t, p in zip(true_sets, pred_sets, strict=True)
        ],
        dtype=np.float64,
    )
    return (
        right,
        np.array([len(p) for p in pred_sets], dtype=np.float64),
        np.array([len(t) for t in true_sets], dtype=np.float64),
    )


def tag_metrics(truth: Sequence[Sequence[str]], pred: Sequence[Sequence[str]]) -> dict:
    """Entity precision, recall and F1 (micro and per type, seqeval strict IOB2) and
    word accuracy."""
    from seqeval.metrics import classification_report
    from seqeval.scheme import IOB2

    report = classification_report(
        [list(t) for t in truth],
        [list(p) for p in pred],
        mode="strict",
        scheme=IOB2,
        output_dict=True,
        zero_division=0,
    )
    micro = report.get("micro avg", {"precision": 0.0, "recall": 0.0, "f1-score": 0.0})
    types = {
        k: {
            "precision": float(v["precision"]),
            "recall": float(v["recall"]),
            "f1": float(v["f1-score"]),
            "support": int(v["support"]),
        }
        for k, v in report.items()
        if not k.endswith(" avg")
    }
    words = sum(len(t) for t in truth)
    right = sum(a == b for t, p in zip(truth, pred, strict=True) for a, b in zip(t, p, strict=True))
    return {
        "precision": float(micro["precision"]),
        "recall": float(micro["recall"]),
        "f1": float(micro["f1-score"]),
        "word_accuracy": right / words if words else float("nan"),
        "per_type": types,
    }


def _f1(right: np.ndarray, pred: np.ndarray, true: np.ndarray) -> np.ndarray:
    total = pred + true
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(total > 0, 2 * right / total, 0.0)


def f1_gain(
    truth: Sequence[Sequence[str]],
    ensemble: Sequence[Sequence[str]],
    member: Sequence[Sequence[str]],
    *,
    seed: int = 0,
    resamples: int = BOOTSTRAP_RESAMPLES,
) -> dict:
    """Ensemble minus member micro F1, with a paired percentile bootstrap interval over
    sentences."""
    e = entity_counts(truth, ensemble)
    m = entity_counts(truth, member)
    n = len(truth)
    delta = float(_f1(*(c.sum() for c in e)) - _f1(*(c.sum() for c in m)))
    if n < 2:
        return {"delta": delta, "low": delta, "high": delta}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n, size=(resamples, n))
    # Counts summed over each resample's sentences: (resamples,) per count.
    es = [c[idx].sum(axis=1) for c in e]
    ms = [c[idx].sum(axis=1) for c in m]
    gains = _f1(*es) - _f1(*ms)
    alpha = (1 - CONFIDENCE) / 2
    low, high = np.quantile(gains, [alpha, 1 - alpha])
    return {"delta": delta, "low": float(low), "high": float(high)}


def _member_tags(rows: list, labels: list[str]) -> list[list[str]]:
    out = []
    for probs in rows:
        p = np.asarray(probs, dtype=np.float64)
        out.append([labels[k] for k in np.argmax(np.where(np.isnan(p), -1.0, p), axis=1)])
    return out


def _plot(report: Location, metrics: dict) -> str:
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = {**metrics["members"], "ensemble": metrics["ensemble"]}
    types = sorted({t for m in models.values() for t in m["per_type"]})
    fig, ax = plt.subplots(figsize=(max(5, 1.6 * len(types) + 2), 4))
    width = 0.8 / max(1, len(models))
    for i, (name, m) in enumerate(models.items()):
        xs = np.arange(len(types)) + i * width
        ys = [m["per_type"].get(t, {}).get("f1", 0.0) for t in types]
        ax.bar(xs, ys, width, label=name, hatch="//" if name == "ensemble" else None)
    ax.set_xticks(np.arange(len(types)) + width * (len(models) - 1) / 2, types)
    ax.set_ylim(0, 1)
    ax.set_ylabel("entity F1 (strict IOB2)")
    ax.set_title("Per-type F1: members and ensemble")
    ax.legend()
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    plt.close(fig)
    report.join("per_type_f1.png").write_bytes(buffer.getvalue())
    return "per_type_f1.png"


def render_tagging_report(metrics: dict) -> str:
    """The members-vs-ensemble table (Markdown), and the F1 gain over the best member."""
    lines = [
        "| model | entity P | entity R | entity F1 | word accuracy |",
        "|---|---|---|---|---|",
    ]
    for name, m in [*metrics["members"].items(), ("**ensemble**", metrics["ensemble"])]:
        lines.append(
            f"| {name} | {m['precision']:.4f} | {m['recall']:.4f} | {m['f1']:.4f} | "
            f"{m['word_accuracy']:.4f} |"
        )
    g = metrics["gain"]
    pct = round(CONFIDENCE * 100)
    verdict = (
        "the interval excludes 0"
        if g["low"] > 0 or g["high"] < 0
        else "the interval includes 0: no difference shown"
    )
    lines += [
        "",
        f"Ensemble vs its best member here, `{g['best_member']}` (entity F1, paired "
        f"bootstrap over sentences, {BOOTSTRAP_RESAMPLES} resamples, {pct}% interval): "
        f"{g['delta']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}] ({verdict})",
    ]
    return "\n".join(lines)


def evaluate_tagging(
    plan: EnsemblePlan,
    input_path: str | Path,
    label_column: str,
    report_dir: str | Path,
    *,
    cpu_fallback: bool = True,
) -> dict:
    """Score ``input_path`` (its ``label_column``: each row's list of tags, aligned to its
    words) into ``report_dir/scored``; write metrics.json, report.md and the per-type F1
    plot there. Ray must be running. Returns the metrics."""
    from pipelines.offline import score_for_report
    from pipelines.output import read_output

    report = Location.of(report_dir)
    report.mkdir()
    plan, summary = score_for_report(
        plan,
        input_path,
        label_column,
        report.join(SCORED_DIR),
        truth_column=TRUTH_COLUMN,
        cpu_fallback=cpu_fallback,
    )
    cfg = plan.config
    names = [m.name for m in cfg.members]
    table = read_output(report.join(SCORED_DIR))
    truth_all = table.column(TRUTH_COLUMN).to_pylist()
    tags_all = table.column("tags").to_pylist()
    keep = [
        i
        for i, (t, p) in enumerate(zip(truth_all, tags_all, strict=True))
        if t is not None and p is not None and len(t) == len(p)
    ]
    misaligned = sum(
        1
        for t, p in zip(truth_all, tags_all, strict=True)
        if t is not None and p is not None and len(t) != len(p)
    )
    if not keep:
        raise ValueError(
            "no row had tags as many as its words and a score; nothing to evaluate (are the "
            "tags aligned to input.words_column, or to the text's split words?)"
        )
    truth = [truth_all[i] for i in keep]
    preds = {"ensemble": [tags_all[i] for i in keep]}
    for n in names:
        rows = table.column(f"probs__{n}").to_pylist()
        preds[n] = _member_tags([rows[i] for i in keep], list(cfg.labels))
    per_model = {name: tag_metrics(truth, p) for name, p in preds.items()}
    best = max(names, key=lambda n: (per_model[n]["f1"], per_model[n]["word_accuracy"]))
    gain = {"best_member": best, **f1_gain(truth, preds["ensemble"], preds[best])}
    metrics = {
        "members": {n: per_model[n] for n in names},
        "ensemble": per_model["ensemble"],
        "gain": gain,
        "sentences": len(keep),
        "skipped": int(summary.rows - len(keep)),
        "misaligned": misaligned,
        "combine": cfg.reducer.combine,
        "labels": list(cfg.labels),
    }
    report.join("metrics.json").write_bytes((json.dumps(metrics, indent=2) + "\n").encode())
    image = _plot(report, metrics)
    md = [
        f"# Evaluation of `{cfg.name}` (token classification)",
        "",
        f"{metrics['sentences']} tagged sentences scored ({metrics['skipped']} skipped: no "
        f"tags, not scorable, or tags not aligned to the words ({misaligned})); combine: "
        f"`{cfg.reducer.combine}`. Entity metrics: seqeval, strict IOB2.",
        "",
        render_tagging_report(metrics),
        "",
        f"![per-type F1]({image})",
        "",
    ]
    report.join("report.md").write_bytes("\n".join(md).encode())
    return metrics
