"""Members and ensemble side by side on a labelled set: `ray-ensemble evaluate`.

The set is scored by the real offline pipeline (`score`), then read back: what is
measured is exactly what `score` writes. Metrics come from scikit-learn where it has
them (accuracy, macro-F1, confusion matrix); NLL, Brier score and ECE are a line each.
"""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pandas as pd

from actors.tasks.classification import (
    ECE_BINS,
    NLL_FLOOR,
    brier,
    calibration_bins,
    ece,
)
from actors.tasks.classification import metrics as classification_metrics
from pipelines.fitting import check_single_label, label_indices
from pipelines.offline import score
from pipelines.output import read_output
from pipelines.plan import EnsemblePlan
from pipelines.storage import Location

__all__ = [
    "brier",
    "classification_metrics",
    "ece",
    "evaluate",
    "gain_over_best_member",
    "metrics_table",
    "render_report",
]

BOOTSTRAP_RESAMPLES = 2000
CONFIDENCE = 0.95
# The true label's column in the scored files: the input's own name may be `label`,
# which the scorer writes too.
TRUTH_COLUMN = "true_label"
# Where evaluate scores the set, inside the report folder; replaced on each run when it is
# an output of ours, refused otherwise.
SCORED_DIR = "scored"


def _save(fig, where: Location) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, dpi=110, format="png")
    where.write_bytes(buffer.getvalue())


def _plots(
    report: Location, labels: list[str], probs: dict[str, np.ndarray], y: np.ndarray
) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import ConfusionMatrixDisplay

    fig, ax = plt.subplots(figsize=(6, 6))
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="perfect calibration")
    for name, p in probs.items():
        # A handful of rows says nothing about calibration: plot bins of 5 or more.
        shown = [(conf, acc) for conf, acc, n in calibration_bins(p, y) if n >= 5]
        xs, ys = [c for c, _ in shown], [a for _, a in shown]
        ensemble = name == "ensemble"
        ax.plot(
            xs,
            ys,
            marker="o",
            linewidth=2.5 if ensemble else 1.2,
            linestyle="-" if ensemble else "--",
            label=f"{name} (ECE {ece(p, y):.3f})",
        )
    ax.set_xlabel("confidence (top-label probability)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Reliability ({ECE_BINS} bins, bins of 5+ rows)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    fig.tight_layout()
    _save(fig, report.join("reliability.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2.5))
    ConfusionMatrixDisplay.from_predictions(
        y,
        np.nan_to_num(probs["ensemble"], nan=0.0).argmax(axis=1),
        labels=list(range(len(labels))),
        display_labels=labels,
        ax=ax,
        colorbar=False,
    )
    ax.set_title("Ensemble confusion matrix")
    fig.tight_layout()
    _save(fig, report.join("confusion.png"))
    plt.close(fig)
    return ["reliability.png", "confusion.png"]


def gain_over_best_member(
    probs: dict[str, np.ndarray], y: np.ndarray, members: list[str], seed: int = 0
) -> dict:
    """The ensemble's accuracy and NLL against its best member on this set (by accuracy,
    then NLL), with paired bootstrap intervals over rows: the same resampled rows score
    both, so an 8-row win on 2,500 rows reads as the noise it is."""
    from scipy.stats import bootstrap

    def per_row(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        p = np.nan_to_num(np.asarray(p, dtype=np.float64), nan=0.0)
        correct = (p.argmax(axis=1) == y).astype(np.float64)
        loss = -np.log(np.clip(p[np.arange(len(y)), y], NLL_FLOOR, 1.0))
        return correct, loss

    rows = {n: per_row(probs[n]) for n in [*members, "ensemble"]}
    best = min(members, key=lambda n: (-rows[n][0].mean(), rows[n][1].mean()))
    out: dict = {"best_member": best, "confidence": CONFIDENCE, "resamples": BOOTSTRAP_RESAMPLES}
    for k, what in enumerate(("accuracy", "nll")):
        ens, ref = rows["ensemble"][k], rows[best][k]
        delta = float(ens.mean() - ref.mean())
        if len(y) < 2 or np.all(ens == ref):
            low = high = delta  # nothing to resample: the two agree on every row
        else:
            ci = bootstrap(
                (ens, ref),
                lambda a, b, axis=-1: a.mean(axis=axis) - b.mean(axis=axis),
                paired=True,
                vectorized=True,
                n_resamples=BOOTSTRAP_RESAMPLES,
                confidence_level=CONFIDENCE,
                method="percentile",
                rng=np.random.default_rng(seed),
            ).confidence_interval
            low, high = float(ci.low), float(ci.high)
        out[what] = {
            "ensemble": float(ens.mean()),
            "best_member": float(ref.mean()),
            "delta": delta,
            "low": low,
            "high": high,
        }
    return out


def render_gain(gain: dict) -> str:
    """One line per metric: the ensemble minus its best member, with its interval."""
    pct = round(gain["confidence"] * 100)
    lines = [
        f"Ensemble vs its best member here, `{gain['best_member']}` "
        f"(paired bootstrap over rows, {gain['resamples']} resamples, {pct}% interval):",
        "",
    ]
    for what, better, sign in (("accuracy", "higher", 1), ("nll", "lower", -1)):
        g = gain[what]
        if g["low"] > 0 or g["high"] < 0:
            verdict = (
                f"the interval excludes 0: a real {'gain' if sign * g['delta'] > 0 else 'loss'}"
            )
        else:
            verdict = "the interval includes 0: no difference shown"
        lines.append(
            f"- {what}: {g['ensemble']:.4f} vs {g['best_member']:.4f}, difference "
            f"{g['delta']:+.4f} [{g['low']:+.4f}, {g['high']:+.4f}] ({better} is better; {verdict})"
        )
    return "\n".join(lines)


def metrics_table(metrics: dict) -> pd.DataFrame:
    """Members and ensemble as rows, their metrics as columns (``metrics.csv``), for a
    spreadsheet or ``pandas.read_csv(..., index_col="model")``."""
    rows = {**metrics["members"], "ensemble": metrics["ensemble"]}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("model")


def render_report(metrics: dict) -> str:
    """The members-vs-ensemble table (Markdown), and the gain over the best member."""
    cols = ("accuracy", "macro_f1", "nll", "brier", "ece")
    lines = [
        "| model | accuracy | macro-F1 | NLL | Brier | ECE |",
        "|---|---|---|---|---|---|",
    ]
    for name, m in [*metrics["members"].items(), ("**ensemble**", metrics["ensemble"])]:
        lines.append(f"| {name} | " + " | ".join(f"{m[c]:.4f}" for c in cols) + " |")
    if "gain" in metrics:
        lines += ["", render_gain(metrics["gain"])]
    return "\n".join(lines)


def evaluate(
    plan: EnsemblePlan,
    input_path: str | Path,
    label_column: str,
    report_dir: str | Path,
    *,
    cpu_fallback: bool = True,
) -> dict:
    """Score ``input_path`` into ``report_dir/scored`` and write metrics.json, metrics.csv,
    report.md
    and the plots there. Ray must be running. Returns the metrics.

    A token_classification ensemble is evaluated on entities instead
    (:func:`pipelines.tagging_evaluation.evaluate_tagging`)."""
    if not plan.task.takes_words:
        check_single_label(plan, "evaluate")
    cfg = plan.config
    report = Location.of(report_dir)
    if plan.task.takes_words:
        from pipelines.tagging_evaluation import evaluate_tagging

        return evaluate_tagging(
            plan, input_path, label_column, report_dir, cpu_fallback=cpu_fallback
        )
    report.mkdir()
    if not cfg.reducer.output_members:
        # Member metrics need the members' distributions.
        cfg = cfg.model_copy(
            update={"reducer": cfg.reducer.model_copy(update={"output_members": True})}
        )
        plan = dataclasses.replace(plan, config=cfg)
    summary = score(
        plan,
        input_path,
        report.join(SCORED_DIR),
        overwrite=True,
        rename={label_column: TRUTH_COLUMN},
        cpu_fallback=cpu_fallback,
    )
    names = [m.name for m in cfg.members]
    # The distributions are the task's declared output fields: the ensemble's and each
    # member's column of the field named `probs`.
    task = plan.task
    ensemble_field = next(f for f in task.fields if f.name == "probs" and not f.member)
    member_field = next(f for f in task.fields if f.name == "probs" and f.member)
    table = read_output(report.join(SCORED_DIR)).select(
        [
            TRUTH_COLUMN,
            "error",
            ensemble_field.column(),
            *(member_field.column(n) for n in names),
        ]
    )
    y_all = label_indices(table.column(TRUTH_COLUMN).to_pylist(), cfg.labels, label_column)
    ok = (y_all >= 0) & np.array([e is None for e in table.column("error").to_pylist()])
    y = y_all[ok]

    def matrix(column: str) -> np.ndarray:
        rows = table.column(column).to_pylist()
        return np.array([r for r, keep in zip(rows, ok, strict=True) if keep], dtype=np.float64)

    probs = {n: matrix(member_field.column(n)) for n in names}
    probs["ensemble"] = matrix(ensemble_field.column())
    if len(y) == 0:
        raise ValueError("no row had both a label and a score; nothing to evaluate")
    tops = {n: np.nan_to_num(probs[n], nan=0.0).argmax(axis=1) for n in names}
    metrics = {
        "members": {n: task.metrics(probs[n], y) for n in names},
        "ensemble": task.metrics(probs["ensemble"], y),
        "agreement": {
            f"{a}|{b}": float(np.mean(tops[a] == tops[b]))
            for i, a in enumerate(names)
            for b in names[i + 1 :]
        },
        "gain": gain_over_best_member(probs, y, names),
        "rows": int(len(y)),
        "skipped": int(summary.rows - len(y)),
        "combine": cfg.reducer.combine,
        "labels": list(cfg.labels),
    }
    report.join("metrics.json").write_bytes((json.dumps(metrics, indent=2) + "\n").encode())
    report.join("metrics.csv").write_bytes(metrics_table(metrics).to_csv().encode())
    images = _plots(report, list(cfg.labels), probs, y)
    pairs = "\n".join(
        f"| {k.replace('|', ' / ')} | {v:.4f} |" for k, v in metrics["agreement"].items()
    )
    md = [
        f"# Evaluation of `{cfg.name}`",
        "",
        f"{metrics['rows']} labelled rows scored ({metrics['skipped']} skipped: no label or "
        f"not scorable); combine: `{cfg.reducer.combine}`. NLL in nats; ECE over "
        f"{ECE_BINS} bins.",
        "",
        render_report(metrics),
        "",
        "## Agreement between members (share of rows with the same top label)",
        "",
        "| pair | agreement |",
        "|---|---|",
        pairs or "| (one member) | - |",
        "",
        *(f"![{Path(i).stem}]({i})" for i in images),
        "",
    ]
    report.join("report.md").write_bytes("\n".join(md).encode())
    return metrics
