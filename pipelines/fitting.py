"""Calibrate and combine on a labelled set: the math of `ray-ensemble fit`.

Member outputs come from the offline pipeline (the same read, tokenise and forward as
`score`); everything after that is numpy and scipy, on the driver:

- one temperature per member, minimising its NLL;
- combination weights, all >= 0, minimising the ensemble's NLL through the very
  ``combine`` function the reducer runs;
- or a stacking meta-model: a multinomial logistic regression (scikit-learn) on the
  members' log-probabilities, stored as JSON beside the fitted config.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from scipy.optimize import minimize, minimize_scalar

from actors.host import member_output_column, member_outputs
from actors.reducer import (
    FIT_CANDIDATES,
    FITTED_COMBINE,
    combine,
    ensemble_distribution,
    normalise,
    stacking_features,
)
from actors.tasks.classification import nll
from pipelines.config import ConfigError, EnsembleConfig, load_config
from pipelines.io import (
    InputError,
    InputFiles,
    check_input,
    list_input_files,
    peek_columns,
    read_column,
    require_column,
)
from pipelines.plan import EnsemblePlan, without_cascade
from pipelines.stacking import StackingModel, prefix_members

__all__ = [
    "FITTED_COMBINE",
    "FitResult",
    "LabelledOutputs",
    "calibrated",
    "check_labelled_input",
    "choose_combination",
    "collect_member_outputs",
    "cv_folds",
    "fit_ensemble",
    "fit_temperature",
    "fit_weights",
    "nll",
    "render_fit",
    "with_prefix_models",
    "write_fitted_config",
]


def check_single_label(plan: EnsemblePlan, command: str) -> None:
    cfg = plan.config
    if not plan.task.fittable or plan.multi_label:
        raise ConfigError(
            f"`ray-ensemble {command}` works on single-label classification ensembles; this one "
            f"is {'multi-label' if plan.multi_label else cfg.task}"
        )


def label_indices(values: list, labels: list[str], label_column: str) -> np.ndarray:
    """Label values to indices into ``labels`` (case-insensitive); -1 where missing.

    An unknown label is a usage error: it names a few and the labels the config has.
    """
    lookup = {label.lower(): i for i, label in enumerate(labels)}
    out = np.full(len(values), -1, dtype=np.int64)
    unknown: dict[str, None] = {}
    for i, value in enumerate(values):
        if value is None or (isinstance(value, str) and not value.strip()):
            continue
        key = str(value).strip().lower()
        if key in lookup:
            out[i] = lookup[key]
        else:
            unknown[str(value)] = None
    if unknown:
        shown = list(unknown)[:5]
        raise InputError(
            f"--label-column {label_column}: values {shown}{' ...' if len(unknown) > 5 else ''} "
            f"are not labels of this ensemble {labels}; fix the data or the config's labels"
        )
    return out


def check_labelled_input(
    plan: EnsemblePlan, input_path: str | Path, label_column: str, command: str
) -> InputFiles:
    """Check the ensemble, the input and its labels before Ray starts; the checked files.

    A token_classification ensemble's label column holds each row's list of tags."""
    check_single_label(plan, command)
    if plan.task.takes_words:
        from pipelines.tagging_evaluation import check_tagged_input

        return check_tagged_input(plan, input_path, label_column)
    files, fmt, _ = list_input_files(input_path)
    columns = peek_columns(files[0], fmt)
    require_column(files[0], fmt, columns, label_column, "--label-column")
    inputs = check_input(plan.config, input_path, allow=(label_column,))
    y = label_indices(read_column(files, fmt, label_column), plan.config.labels, label_column)
    if not (y >= 0).any():
        raise InputError(f"--label-column {label_column}: no row has a label")
    return inputs


@dataclass(frozen=True)
class LabelledOutputs:
    """Aligned member logits ``(n, L)`` and label indices of the usable rows."""

    names: list[str]
    logits: list[np.ndarray]
    y: np.ndarray
    skipped: int  # rows without a label or with a text that cannot be scored
    # Per row, the sentence it is a word of (token tasks): CV keeps a sentence's words in
    # one fold, since words of one sentence are not independent. None: rows are texts.
    groups: np.ndarray | None = None


def collect_member_outputs(
    plan: EnsemblePlan,
    inputs: InputFiles | str | Path,
    label_column: str,
    *,
    cpu_fallback: bool = True,
) -> LabelledOutputs:
    """Run the members over a labelled set (Ray must be running) and gather their logits.

    ``inputs``: the files :func:`check_labelled_input` checked, or a path to check."""
    from pipelines.offline import build_dataset, job_data_context
    from pipelines.plan import hosts_on_cluster

    check_single_label(plan, "fit")
    if plan.config.cascade is not None:
        # Fitting reads every member on every row.
        plan = without_cascade(plan)
    cfg = plan.config
    names = [m.name for m in cfg.members]
    if not isinstance(inputs, InputFiles):
        inputs = check_input(cfg, inputs, allow=(label_column,))
    hosts = hosts_on_cluster(cfg, cpu_fallback=cpu_fallback)
    keep = [label_column, "error", *(member_output_column(n) for n in names)]
    ys: list = []
    outs: list[list[np.ndarray]] = [[] for _ in names]
    errors: list = []
    sentences: list[int] = []
    tagged = plan.task.takes_words
    skipped = 0
    with job_data_context():
        ds = build_dataset(plan, inputs, hosts=hosts, reduce=False).select_columns(keep)
        for batch in ds.iter_batches(batch_format="pyarrow", batch_size=None):
            if tagged:
                skipped += _words_as_rows(
                    batch, label_column, names, plan, ys, errors, outs, sentences
                )
                continue
            ys.extend(batch.column(label_column).to_pylist())
            errors.extend(batch.column("error").to_pylist())
            for i, out in enumerate(member_outputs(batch, names)):
                outs[i].append(out)
    y = label_indices(ys, cfg.labels, label_column)
    ok = (y >= 0) & np.array([e is None for e in errors], dtype=bool)
    width = len(cfg.labels)
    logits = [
        (np.concatenate(o) if o else np.empty((0, width)))[ok].astype(np.float64) for o in outs
    ]
    groups = np.asarray(sentences, dtype=np.int64)[ok] if tagged else None
    return LabelledOutputs(names, logits, y[ok], int((~ok).sum()) + skipped, groups)


def _words_as_rows(
    batch: Any,
    label_column: str,
    names: list[str],
    plan: EnsemblePlan,
    ys: list,
    errors: list,
    outs: list[list[np.ndarray]],
    sentences: list[int],
) -> int:
    """A tagged window's words as rows of the fit (word-level NLL): each word's tag, each
    member's aligned logits for it and, in ``sentences``, a number for its sentence.
    Returns the sentences skipped (no tags, not scored, or tags not as many as words)."""
    tags = batch.column(label_column).to_pylist()
    row_errors = batch.column("error").to_pylist()
    members = member_outputs(batch, names, plan.task)
    skipped = 0
    for r, (truth, err) in enumerate(zip(tags, row_errors, strict=True)):
        per_member = [m[r] for m in members]
        if (
            truth is None
            or err is not None
            or any(p is None for p in per_member)
            or len(truth) != len(per_member[0])
        ):
            skipped += 1
            continue
        ys.extend(truth)
        errors.extend([None] * len(truth))
        sentences.extend([sentences[-1] + 1 if sentences else 0] * len(truth))
        for i, p in enumerate(per_member):
            outs[i].append(np.asarray(p, dtype=np.float64))
    return skipped


def fit_temperature(logits: np.ndarray, y: np.ndarray) -> float:
    """The temperature T in [0.02, 50] that minimises NLL of softmax(logits / T)."""

    def loss(log_t: float) -> float:
        return nll(normalise(logits, temperature=float(np.exp(log_t)), multi_label=False), y)

    best = minimize_scalar(loss, bounds=(np.log(0.02), np.log(50.0)), method="bounded")
    t = float(np.exp(best.x))
    return t if loss(best.x) <= loss(0.0) else 1.0


def fit_weights(member_probs: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    """Weights >= 0 summing to 1 that minimise the NLL of ``combine(..., method)``."""
    m = member_probs.shape[0]

    def loss(w: np.ndarray) -> float:
        if w.sum() <= 1e-9:
            return 1e6
        return nll(combine(member_probs, w, method, multi_label=False), y)

    start = np.full(m, 1.0 / m)
    best = minimize(loss, start, method="L-BFGS-B", bounds=[(0.0, 1.0)] * m)
    w = best.x if loss(best.x) <= loss(start) else start
    return w / w.sum()


def fit_stacking(
    member_probs: np.ndarray, y: np.ndarray, labels: list[str], members: list[str]
) -> StackingModel:
    """A multinomial logistic regression on the members' log-probabilities."""
    from sklearn.linear_model import LogisticRegression

    present = sorted(set(y.tolist()))
    if len(present) < len(labels):
        missing = [labels[i] for i in range(len(labels)) if i not in present]
        raise InputError(f"stacking needs examples of every label; the set has none of {missing}")
    model = LogisticRegression(C=1.0, max_iter=5000)
    model.fit(stacking_features(member_probs), y)
    coef, intercept = model.coef_, model.intercept_
    if coef.shape[0] == 1:  # binary: sklearn keeps one row; softmax([-z/2, z/2]) = sigmoid
        coef = np.vstack([-coef[0] / 2, coef[0] / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    return StackingModel(tuple(labels), tuple(members), coef, intercept)


def with_prefix_models(
    model: StackingModel,
    stages: Sequence[Sequence[str]],
    probs: np.ndarray,
    y: np.ndarray,
    names: Sequence[str],
) -> StackingModel:
    """``model`` with a meta-model for each of a cascade's stage prefixes but the last
    (that one is ``model`` itself), each fitted on every row of ``probs`` (calibrated,
    ``(M, n, L)``, members as ``names``)."""
    prefixes = tuple(
        fit_stacking(probs[list(idx)], y, list(model.labels), [names[j] for j in idx])
        for idx in prefix_members(stages, names)
    )
    return dataclasses.replace(model, prefixes=prefixes)


CV_FOLDS = 5
# Fitted weights are pulled toward equal weights by the share CV picks from these:
# equal weights are hard to beat off the fitting set's own domain.
SHRINKAGE = (0.0, 0.25, 0.5, 0.75, 1.0)
AUTO = "auto"


@dataclass(frozen=True)
class Candidate:
    """A combination scored by cross-validation on the fitting set."""

    combine: str
    cv_nll: float
    shrinkage: float | None = None  # toward equal weights; None when nothing is fitted


def shrink(weights: np.ndarray, share: float) -> np.ndarray:
    """Weights moved ``share`` of the way toward equal weights."""
    return (1 - share) * np.asarray(weights) + share / len(weights)


def cv_folds(
    y: np.ndarray, seed: int, groups: np.ndarray | None = None
) -> list[tuple[np.ndarray, np.ndarray]]:
    """The (train, test) row indices of the CV folds: stratified by label when every label
    has a row per fold; with ``groups``, each group's rows in one test fold."""
    from sklearn.model_selection import GroupKFold, KFold, StratifiedKFold

    if groups is not None:
        k = min(CV_FOLDS, len(np.unique(groups)))
        if k >= 2:
            return list(GroupKFold(k, shuffle=True, random_state=seed).split(y, y, groups))
    counts = np.bincount(y)
    k = min(CV_FOLDS, len(y))
    if counts[counts > 0].min() >= k:
        return list(StratifiedKFold(k, shuffle=True, random_state=seed).split(y, y))
    return list(KFold(k, shuffle=True, random_state=seed).split(y))


def compare_combinations(
    member_probs: np.ndarray,
    y: np.ndarray,
    labels: list[str],
    members: list[str],
    methods: tuple[str, ...] = FIT_CANDIDATES,
    seed: int = 0,
    groups: np.ndarray | None = None,
) -> list[Candidate]:
    """Each combination's NLL on held-out folds (weights, shrinkage and stacking fitted
    on the other folds); weighted combinations get the shrinkage with the best CV NLL.
    ``groups``: rows of one group (a sentence's words) stay in one fold."""
    folds = cv_folds(y, seed, groups)
    m = member_probs.shape[0]
    equal = np.full(m, 1.0 / m)

    def held_out(dist: Any) -> float:
        return float(sum(nll(dist(tr, te), y[te]) * len(te) for tr, te in folds) / len(y))

    out = []
    for method in methods:
        if method == "mean":
            out.append(
                Candidate(
                    "mean",
                    held_out(
                        lambda tr, te: combine(
                            member_probs[:, te], equal, "mean", multi_label=False
                        )
                    ),
                )
            )
        elif method == "stacking":
            if any(len(set(y[tr].tolist())) < len(labels) for tr, _ in folds):
                continue  # a fold without some label: stacking cannot be fitted there

            def stacked(tr: np.ndarray, te: np.ndarray) -> np.ndarray:
                meta = fit_stacking(member_probs[:, tr], y[tr], labels, members)
                return ensemble_distribution(
                    member_probs[:, te],
                    equal,
                    "stacking",
                    multi_label=False,
                    stacking=(meta.coef, meta.intercept),
                )

            out.append(Candidate("stacking", held_out(stacked)))
        else:
            fitted = [fit_weights(member_probs[:, tr], y[tr], method) for tr, _ in folds]
            scores = []
            for lam in SHRINKAGE:
                total = 0.0
                for (_, te), w in zip(folds, fitted, strict=True):
                    p = combine(member_probs[:, te], shrink(w, lam), method, multi_label=False)
                    total += nll(p, y[te]) * len(te)
                scores.append((total / len(y), lam))
            best, lam = min(scores)
            out.append(Candidate(method, best, lam))
    return out


@dataclass(frozen=True)
class FitResult:
    combine: str
    temperatures: list[float]
    weights: list[float]
    stacking: StackingModel | None
    rows: int
    member_nll: dict[str, tuple[float, float]]  # before, after
    ensemble_nll: tuple[float, float]
    candidates: tuple[Candidate, ...] = ()

    def best_member(self) -> tuple[str, float]:
        """The member with the lowest NLL after calibration, and that NLL."""
        name, (_, value) = min(self.member_nll.items(), key=lambda kv: kv[1][1])
        return name, value

    def no_gain_warning(self) -> str | None:
        """A warning when the chosen combination does not beat the best calibrated
        member: by cross-validated NLL when candidates were compared, else on the fitting
        set itself, where the ensemble has every advantage. None when it does."""
        best, best_nll = self.best_member()
        chosen = next((c for c in self.candidates if c.combine == self.combine), None)
        ours, where = (
            (chosen.cv_nll, "cross-validated on this set")
            if chosen is not None
            else (self.ensemble_nll[1], "even on the rows it was fitted on")
        )
        if ours < best_nll - 1e-9:
            return None
        return (
            f"no combination beats the best member: {self.combine} has NLL {ours:.4f} "
            f"({where}), {best} alone {best_nll:.4f} after calibration. An ensemble here "
            f"costs {len(self.member_nll)}x the compute for nothing. Score with {best} "
            "alone, or add members that err differently (another pretrained encoder, "
            "another model family)"
        )


def _ensemble_nll(
    member_probs: np.ndarray,
    weights: list[float],
    method: str,
    meta: StackingModel | None,
    y: np.ndarray,
) -> float:
    """NLL of the distribution the reducer would output."""
    stacking = (meta.coef, meta.intercept) if meta is not None else None
    p = ensemble_distribution(
        member_probs, np.asarray(weights), method, multi_label=False, stacking=stacking
    )
    return nll(p, y)


def calibrated(logits: list[np.ndarray], temperatures: list[float]) -> np.ndarray:
    """Members' aligned logits to their ``(M, n, L)`` distributions at these temperatures."""
    return np.stack(
        [
            normalise(z, temperature=t, multi_label=False)
            for z, t in zip(logits, temperatures, strict=True)
        ]
    )


def choose_combination(
    member_probs: np.ndarray,
    y: np.ndarray,
    labels: list[str],
    names: list[str],
    method: str,
    allowed: tuple[str, ...] | None = None,
    exclude: tuple[str, ...] = (),
    groups: np.ndarray | None = None,
) -> tuple[list[Candidate], str, list[float], StackingModel | None]:
    """The candidates' CV scores, and the winner fitted on every row: its name, its
    (shrunk) weights and, for stacking, its meta-model. ``member_probs``: calibrated.
    ``allowed``: the combinations the task offers; ``exclude``: ones ``auto`` leaves out."""
    methods = tuple(m for m in FIT_CANDIDATES if m not in exclude) if method == AUTO else (method,)
    if allowed is not None:
        methods = tuple(m for m in methods if m in allowed)
    candidates = compare_combinations(member_probs, y, labels, names, methods, groups=groups)
    if not candidates:
        raise InputError(
            "stacking needs examples of every label in every CV fold; "
            "label more rows or use --combine weighted_mean"
        )
    chosen = min(candidates, key=lambda c: c.cv_nll)
    m = len(names)
    weights, model = [1.0 / m] * m, None
    if chosen.combine == "stacking":
        model = fit_stacking(member_probs, y, labels, names)
    elif chosen.combine != "mean":
        fitted = fit_weights(member_probs, y, chosen.combine)
        weights = shrink(fitted, chosen.shrinkage or 0.0).tolist()
    return candidates, chosen.combine, weights, model


def fit_ensemble(plan: EnsemblePlan, data: LabelledOutputs, method: str = AUTO) -> FitResult:
    """Temperatures, then the combination: ``method``, or with ``auto`` the candidate
    (mean, weighted_mean, geometric_mean, stacking) with the best cross-validated NLL.
    Weights are shrunk toward equal weights by the share CV picks."""
    cfg = plan.config
    offered = tuple(c for c in FIT_CANDIDATES if c in plan.task.combine_methods)
    if method not in (AUTO, *offered):
        raise ConfigError(f"--combine: {method!r} is not one of {[AUTO, *offered]}")
    if len(data.y) < 2:
        raise InputError("fit needs at least 2 labelled rows that can be scored")
    y = data.y

    before_t = [m.temperature for m in cfg.members]
    before_w = [m.weight for m in cfg.members]
    before = calibrated(data.logits, before_t)
    temps = [fit_temperature(z, y) for z in data.logits]
    after = calibrated(data.logits, temps)
    candidates, chosen, weights, model = choose_combination(
        after,
        y,
        list(cfg.labels),
        data.names,
        method,
        offered,
        groups=data.groups,
    )
    if model is not None and cfg.cascade is not None:
        # The config's own cascade keeps working: a meta-model for each of its prefixes.
        model = with_prefix_models(model, cfg.cascade.stages, after, y, data.names)
    ensemble_before = _ensemble_nll(before, before_w, cfg.reducer.combine, plan.stacking, y)
    ensemble_after = _ensemble_nll(after, weights, chosen, model, y)
    return FitResult(
        combine=chosen,
        temperatures=temps,
        weights=weights,
        stacking=model,
        rows=len(y),
        member_nll={
            name: (nll(before[i], y), nll(after[i], y)) for i, name in enumerate(data.names)
        },
        ensemble_nll=(ensemble_before, ensemble_after),
        candidates=tuple(candidates),
    )


def _relocate(written: Any, resolved: str | None, out_dir: Path) -> Any:
    """A path the user wrote relative to their config, rewritten relative to ``out_dir``
    (the fitted config's folder), from which every relative path in it is read.

    ``resolved``: the same path as the loaded config holds it (absolute when it is a
    local path). Absolute paths (``/...``, ``~/...``) already work from anywhere and hub
    ids are not paths: both are kept as written."""
    if not isinstance(written, str) or not resolved or not os.path.isabs(resolved):
        return written
    if os.path.isabs(written) or written.startswith("~"):
        return written
    return Path(os.path.relpath(resolved, out_dir)).as_posix()


def write_fitted_config(
    config_path: str | Path,
    output: str | Path,
    cfg: EnsembleConfig,
    result: FitResult,
    *,
    revisions: Mapping[str, str] | None = None,
    cascade: Mapping[str, Any] | None = None,
) -> Path:
    """The user's config with fitted temperatures, weights or stacking model. Returns the
    path written; a stacking model goes beside it as ``<name>.stacking.json``.

    Every relative path (``model``, ``tokenizer``, ``train.base_model``, ``reducer.stacking``)
    is rewritten relative to the new file's folder, which is where a config's relative
    paths are read from: the fitted config loads from any working directory, and moves
    with the models it names like any other config. Absolute paths and hub ids stay as
    written.

    ``revisions``: member name -> hub commit (``EnsemblePlan.revisions`` of the plan that
    was fitted), written as those members' ``revision:`` so the fitted config loads the
    very weights its temperatures and weights were fitted on.

    ``cascade``: the ``cascade`` block `fit --cascade` chose; it replaces the config's
    own, and an empty one removes it (no cascade kept the bounds)."""
    output = Path(output)
    out_dir = output.resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    data: dict[str, Any] = yaml.safe_load(Path(config_path).read_text())
    for raw, member, t, w in zip(
        data["members"], cfg.members, result.temperatures, result.weights, strict=True
    ):
        raw["model"] = _relocate(raw.get("model"), member.model, out_dir)
        if raw.get("tokenizer"):
            raw["tokenizer"] = _relocate(raw["tokenizer"], member.tokenizer, out_dir)
        if member.train is not None and isinstance(raw.get("train"), dict):
            raw["train"]["base_model"] = _relocate(
                raw["train"].get("base_model"), member.train.base_model, out_dir
            )
        if revisions and member.name in revisions:
            raw["revision"] = revisions[member.name]
        raw["temperature"] = round(float(t), 6)
        raw["weight"] = round(float(w), 6)
    reducer = dict(data.get("reducer") or {})
    reducer["combine"] = result.combine
    reducer.pop("stacking", None)
    if result.stacking is not None:
        stacking_file = output.with_suffix(".stacking.json")
        result.stacking.save(stacking_file)
        reducer["stacking"] = stacking_file.name
    data["reducer"] = reducer
    if cascade is not None:
        data.pop("cascade", None)
        if cascade:
            data["cascade"] = dict(cascade)
    header = (
        f"# Fitted by `ray-ensemble fit` on {result.rows} labelled rows "
        f"(combine: {result.combine}).\n"
        f"# Ensemble NLL on that set: {result.ensemble_nll[0]:.4f} before, "
        f"{result.ensemble_nll[1]:.4f} after.\n"
    )
    output.write_text(header + yaml.safe_dump(data, sort_keys=False))
    load_config(output)  # what we wrote must load
    return output


def render_fit(result: FitResult, skipped: int, out: Path | str) -> str:
    """What `fit` did, as `ray-ensemble fit` and the demo print it: each member's NLL before
    and after, and every candidate combination against the best member."""
    lines = [f"fit: {result.rows} rows ({skipped} skipped); NLL before -> after:"]
    for i, (name, (a, b)) in enumerate(result.member_nll.items()):
        lines.append(
            f"  {name:<16} {a:.4f} -> {b:.4f}  (temperature {result.temperatures[i]:.3f}, "
            f"weight {result.weights[i]:.3f})"
        )
    a, b = result.ensemble_nll
    lines.append(f"  {'ensemble':<16} {a:.4f} -> {b:.4f}  ({result.combine})")
    if result.candidates:
        best, best_nll = result.best_member()
        lines.append(
            f"fit: combinations by {CV_FOLDS}-fold cross-validated NLL (best member: {best}):"
        )
        lines.append(f"  {'combine':<16} {'CV NLL':>8} {'vs ' + best:>14}  shrinkage to equal")
        for c in sorted(result.candidates, key=lambda c: c.cv_nll):
            mark = "  <- chosen" if c.combine == result.combine else ""
            shrink = "-" if c.shrinkage is None else f"{c.shrinkage:.2f}"
            lines.append(
                f"  {c.combine:<16} {c.cv_nll:8.4f} {c.cv_nll - best_nll:+14.4f}  {shrink}{mark}"
            )
    lines.append(f"fit: wrote {out}")
    return "\n".join(lines)
