"""Members and ensemble side by side on a labelled set: `ray-ensemble evaluate`.

The set is scored by the real offline pipeline (`score`), then read back: what is
measured is exactly what `score` writes. Metrics come from scikit-learn where it has
them (accuracy, macro-F1, confusion matrix); NLL, Brier score and ECE are a line each.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from actors.tasks.classification import (
    ECE_BINS,
    NLL_FLOOR,
    brier,
    calibration_bins,
    ece,
)
from actors.tasks.classification import metrics as classification_metrics
from pipelines.fitting import check_single_label, label_indices
from pipelines.offline import ScoreSummary, score_for_report
from pipelines.output import read_output
from pipelines.plan import EnsemblePlan, without_cascade
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
# With a cascade, the same set scored by every member, beside it.
FULL_DIR = "scored-full"


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
        cells = ("-" if m[c] is None else f"{m[c]:.4f}" for c in cols)
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if "gain" in metrics:
        lines += ["", render_gain(metrics["gain"])]
    return "\n".join(lines)


def _scored(
    plan: EnsemblePlan, where: Location, label_column: str
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """A scored set read back: its table, the labels of the usable rows and which rows
    those are (a label and a score)."""
    cfg = plan.config
    columns = [cfg.input.id_column, TRUTH_COLUMN, "error", _ensemble_probs(plan)]
    columns += [_member_probs(plan, m.name) for m in cfg.members]
    if cfg.cascade is not None:
        columns.append("cascade_stage")
    table = read_output(where).select(columns)
    y_all = label_indices(table.column(TRUTH_COLUMN).to_pylist(), cfg.labels, label_column)
    ok = (y_all >= 0) & np.array([e is None for e in table.column("error").to_pylist()])
    if not ok.any():
        raise ValueError("no row had both a label and a score; nothing to evaluate")
    return table, y_all[ok], ok


def _ensemble_probs(plan: EnsemblePlan) -> str:
    # The distributions are the task's declared output fields: the ensemble's and each
    # member's column of the field named `probs`.
    return next(f for f in plan.task.fields if f.name == "probs" and not f.member).column()


def _member_probs(plan: EnsemblePlan, member: str) -> str:
    return next(f for f in plan.task.fields if f.name == "probs" and f.member).column(member)


def _matrix(table: pa.Table, column: str, ok: np.ndarray) -> np.ndarray:
    """The ``ok`` rows of a list column as a matrix; a null row (a member a cascade did
    not reach) is NaN."""
    rows = [r for r, keep in zip(table.column(column).to_pylist(), ok, strict=True) if keep]
    width = next((len(r) for r in rows if r is not None), 0)
    return np.array([[np.nan] * width if r is None else r for r in rows], dtype=np.float64)


def cascade_metrics(
    ours: dict,
    full: dict | None,
    stages: list[int],
    num_stages: int,
    seconds: dict[str, float] | None,
    rows: int,
    full_seconds: dict[str, float] | None,
    full_rows: int,
) -> dict:
    """``metrics.json``'s ``cascade`` block: the cascade's accuracy, NLL and cost (the
    members' forward seconds, summed over members, per row scored) and the share of
    scored rows stopping at each stage, beside the full ensemble's (``None`` when the
    full ensemble was not run)."""

    def per_row(s: dict[str, float] | None, n: int) -> float | None:
        return None if s is None or n == 0 else float(sum(s.values()) / n)

    counts = np.bincount(np.asarray(stages, dtype=np.int64) - 1, minlength=num_stages)
    return {
        "accuracy": ours["accuracy"],
        "nll": ours["nll"],
        "member_s_per_row": per_row(seconds, rows),
        "stage_shares": (counts / max(len(stages), 1)).tolist(),
        "full": None
        if full is None
        else {
            "accuracy": full["accuracy"],
            "nll": full["nll"],
            "member_s_per_row": per_row(full_seconds, full_rows),
        },
    }


def render_cascade_metrics(cascade: dict) -> str:
    """The cascade beside the full ensemble (Markdown)."""

    def ms(value: float | None) -> str:
        return "-" if value is None else f"{1e3 * value:.3f}"

    full = cascade["full"]
    shares = ", ".join(f"{s:.3f}" for s in cascade["stage_shares"])
    full_row = (
        "| full ensemble | not run (`--no-compare-full`) | | |"
        if full is None
        else f"| full ensemble | {full['accuracy']:.4f} | {full['nll']:.4f} | "
        f"{ms(full['member_s_per_row'])} |"
    )
    return "\n".join(
        [
            "## Cascade against the full ensemble",
            "",
            "| run | accuracy | NLL | member forward ms/row |",
            "|---|---|---|---|",
            f"| cascade | {cascade['accuracy']:.4f} | {cascade['nll']:.4f} | "
            f"{ms(cascade['member_s_per_row'])} |",
            full_row,
            "",
            f"Share of scored rows stopping at each stage: {shares}.",
        ]
    )


def _cost_accuracy(
    report: Location,
    plan: EnsemblePlan,
    member_probs: dict[str, np.ndarray],
    y: np.ndarray,
    seconds: dict[str, float] | None,
    rows: int,
    cascade: dict,
) -> str:
    """``cost_accuracy.png``: the cascade cut after 1, 2, ... stages (rows still open
    after the last kept stage stop there), from the full run's member outputs and each
    member's measured seconds per row, and the full ensemble."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipelines.cascade_fitting import evaluate_cascade, stage_prefixes

    cfg = plan.config
    names = [m.name for m in cfg.members]
    probs = np.stack([member_probs[n] for n in names])
    weights = np.array([m.weight for m in cfg.members], dtype=np.float64)
    stages = [[names.index(m) for m in stage] for stage in cfg.cascade.stages]
    cost = np.array([(seconds or {}).get(n, np.nan) / max(rows, 1) for n in names])
    stacking = plan.stacking.by_members(names) if plan.stacking is not None else None
    prefix = stage_prefixes(probs, weights, cfg.reducer.combine, stages, stacking)
    stage_cost = np.array([cost[s].sum() for s in stages])
    points = []
    for k in range(1, len(stages) + 1):
        accuracy, _, spent, _ = evaluate_cascade(
            prefix[:k], cfg.cascade.exit_at[: k - 1], stage_cost[:k], y
        )
        points.append((spent, accuracy))
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(
        [1e3 * c for c, _ in points],
        [a for _, a in points],
        marker="o",
        label="cascade, by stages kept",
    )
    for k, (c, a) in enumerate(points, start=1):
        ax.annotate(f"{k}", (1e3 * c, a), textcoords="offset points", xytext=(4, 4))
    full = cascade["full"]
    if full["member_s_per_row"] is not None:
        ax.scatter(
            [1e3 * full["member_s_per_row"]],
            [full["accuracy"]],
            marker="s",
            color="black",
            label="full ensemble",
            zorder=3,
        )
    ax.set_xlabel("member forward ms per row")
    ax.set_ylabel("accuracy")
    ax.set_title("Cost and accuracy")
    ax.legend(loc="lower right")
    fig.tight_layout()
    _save(fig, report.join("cost_accuracy.png"))
    plt.close(fig)
    return "cost_accuracy.png"


def _without_full(
    plan: EnsemblePlan,
    table: pa.Table,
    probs: dict[str, np.ndarray],
    y: np.ndarray,
    summary: ScoreSummary,
) -> tuple[dict, dict, dict]:
    """A cascade evaluated from its own run alone: the ``cascade`` block (``full`` null),
    each member's metrics on the rows it ran and each pair's agreement on the rows both
    ran (null where there were none)."""
    cfg, task = plan.config, plan.task
    names = [m.name for m in cfg.members]
    scored = np.array([e is None for e in table.column("error").to_pylist()])
    stages = [int(s) for s in np.array(table.column("cascade_stage").to_pylist())[scored]]
    cascade = cascade_metrics(
        task.metrics(probs["ensemble"], y),
        None,
        stages,
        len(cfg.cascade.stages),
        summary.member_seconds,
        summary.scored,
        None,
        0,
    )
    ran = {n: ~np.isnan(probs[n]).any(axis=1) for n in names}
    nothing = dict.fromkeys(task.metrics(probs["ensemble"][:1], y[:1]))
    members = {
        n: task.metrics(probs[n][ran[n]], y[ran[n]]) if ran[n].any() else nothing for n in names
    }
    agreement = {}
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            both = ran[a] & ran[b]
            agreement[f"{a}|{b}"] = (
                float(np.mean(probs[a][both].argmax(1) == probs[b][both].argmax(1)))
                if both.any()
                else None
            )
    return cascade, members, agreement


def evaluate(
    plan: EnsemblePlan,
    input_path: str | Path,
    label_column: str,
    report_dir: str | Path,
    *,
    cpu_fallback: bool = True,
    compare_full: bool = True,
) -> dict:
    """Score ``input_path`` into ``report_dir/scored`` and write metrics.json, metrics.csv,
    report.md and the plots there. Ray must be running. Returns the metrics.

    ``compare_full``: with a cascade, also score the set with every member into
    ``report_dir/scored-full`` (see :func:`_without_full` for what is left out without).

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
    task = plan.task
    table, y, ok = _scored(plan, report.join(SCORED_DIR), label_column)
    probs = {n: _matrix(table, _member_probs(plan, n), ok) for n in names}
    probs["ensemble"] = _matrix(table, _ensemble_probs(plan), ok)
    cascade = None
    cascade_plot = None
    gain = None
    if cfg.cascade is not None and not compare_full:
        cascade, member_metrics, agreement = _without_full(plan, table, probs, y, summary)
    elif cfg.cascade is not None:
        # The same set again with every member on every row: the members' own metrics
        # (a cascade leaves them null on the rows that stopped before them), and the
        # full ensemble to set the cascade against.
        full_plan, full_summary = score_for_report(
            without_cascade(plan),
            input_path,
            label_column,
            report.join(FULL_DIR),
            truth_column=TRUTH_COLUMN,
            cpu_fallback=cpu_fallback,
        )
        full_table, full_y, full_ok = _scored(full_plan, report.join(FULL_DIR), label_column)
        id_column = cfg.input.id_column
        if full_table.column(id_column).to_pylist() != table.column(id_column).to_pylist():
            raise RuntimeError("the cascade and the full run wrote their rows in other orders")
        full = {n: _matrix(full_table, _member_probs(plan, n), full_ok) for n in names}
        full_ensemble = _matrix(full_table, _ensemble_probs(plan), full_ok)
        scored = np.array([e is None for e in table.column("error").to_pylist()])
        all_stages = np.array(table.column("cascade_stage").to_pylist(), dtype=object)[scored]
        cascade = cascade_metrics(
            task.metrics(probs["ensemble"], y),
            task.metrics(full_ensemble, full_y),
            [int(s) for s in all_stages],
            len(cfg.cascade.stages),
            summary.member_seconds,
            summary.scored,
            full_summary.member_seconds,
            full_summary.scored,
        )
        cascade_plot = _cost_accuracy(
            report, plan, full, full_y, full_summary.member_seconds, full_summary.scored, cascade
        )
        probs = {**full, "ensemble": probs["ensemble"]}
        if len(full_y) != len(y) or not np.array_equal(full_y, y):
            raise RuntimeError("the cascade and the full run scored different rows")
    if cascade is None or compare_full:
        tops = {n: np.nan_to_num(probs[n], nan=0.0).argmax(axis=1) for n in names}
        member_metrics = {n: task.metrics(probs[n], y) for n in names}
        agreement = {
            f"{a}|{b}": float(np.mean(tops[a] == tops[b]))
            for i, a in enumerate(names)
            for b in names[i + 1 :]
        }
        gain = gain_over_best_member(probs, y, names)
    metrics = {
        "members": member_metrics,
        "ensemble": task.metrics(probs["ensemble"], y),
        "agreement": agreement,
        **({"gain": gain} if gain is not None else {}),
        "rows": int(len(y)),
        "skipped": int(summary.rows - len(y)),
        "combine": cfg.reducer.combine,
        "labels": list(cfg.labels),
    }
    if cascade is not None:
        metrics["cascade"] = cascade
    report.join("metrics.json").write_bytes((json.dumps(metrics, indent=2) + "\n").encode())
    report.join("metrics.csv").write_bytes(metrics_table(metrics).to_csv().encode())
    # Without the full run, members have no distribution on the rows that stopped
    # before them: only the ensemble's reliability is plotted.
    shown = probs if gain is not None else {"ensemble": probs["ensemble"]}
    images = _plots(report, list(cfg.labels), shown, y)
    if cascade_plot is not None:
        images.append(cascade_plot)
    pairs = "\n".join(
        f"| {k.replace('|', ' / ')} | {'-' if v is None else f'{v:.4f}'} |"
        for k, v in metrics["agreement"].items()
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
        *([render_cascade_metrics(cascade), ""] if cascade is not None else []),
        *(
            [
                "Scored without the full run (`--no-compare-full`): each member's metrics "
                "and agreements are on the rows it ran, the harder ones after a cascade; "
                "no gain over the best member and no cost/accuracy curve.",
                "",
            ]
            if gain is None
            else []
        ),
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
