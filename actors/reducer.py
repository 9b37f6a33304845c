"""The ensemble math: label alignment, normalisation, combination, uncertainty.

Pure functions over numpy arrays (no Ray, no torch), shared by the offline Ray Data
stage and the online Serve ingress so both give the same answer.

Conventions: a member's *aligned* logits are an ``(n, L)`` array in the canonical label
order, with NaN where the member has no such label; a row of NaN is a row the member
did not score. Probabilities keep the same NaN convention.

Example::

    >>> import numpy as np
    >>> from actors.reducer import normalise, combine
    >>> p1 = normalise(np.array([[0.0, 1.0]]), temperature=1.0, multi_label=False)
    >>> p2 = normalise(np.array([[1.0, 0.0]]), temperature=1.0, multi_label=False)
    >>> out = combine(np.stack([p1, p2]), np.array([1.0, 1.0]), "mean", multi_label=False)
    >>> np.allclose(out, [[0.5, 0.5]])
    True
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

__all__ = [
    "CLASSIFICATION_COMBINE",
    "COMBINERS",
    "EMBEDDING_COMBINE",
    "FITTED_COMBINE",
    "AlignmentError",
    "Reduced",
    "agreement",
    "align_logits",
    "build_label_index",
    "cascade_exits",
    "cascade_stages",
    "combine",
    "combine_embeddings",
    "ensemble_distribution",
    "entropy",
    "l2_normalise",
    "member_top",
    "normalise",
    "only",
    "prefix_top",
    "reduce_classification",
    "stack_present",
]

_TINY = np.finfo(np.float64).tiny


class AlignmentError(ValueError):
    """A member's labels cannot be mapped onto the ensemble's labels."""


def build_label_index(
    member_labels: Sequence[str],
    canonical: Sequence[str],
    label_map: Mapping[str, str] | None = None,
) -> tuple[int, ...]:
    """For each member output (in member order), the index of its canonical label.

    ``label_map`` (member label -> canonical label) wins; other labels match by name,
    case-insensitively. Raises AlignmentError naming the label and the fix.
    """
    lookup = {label.lower(): i for i, label in enumerate(canonical)}
    label_map = dict(label_map or {})
    unknown_keys = sorted(set(label_map) - set(member_labels))
    if unknown_keys:
        raise AlignmentError(
            f"label_map key(s) {unknown_keys} are not labels of this model; its labels are "
            f"{list(member_labels)}"
        )
    index: list[int] = []
    for label in member_labels:
        target = label_map.get(label, label)
        pos = lookup.get(str(target).lower())
        if pos is None:
            if label in label_map:
                raise AlignmentError(
                    f"label_map maps '{label}' to '{target}', which is not one of the ensemble "
                    f"labels {list(canonical)}"
                )
            example = ", ".join(f"{m}: {c}" for m, c in zip(member_labels, canonical, strict=False))
            raise AlignmentError(
                f"model label '{label}' matches none of the ensemble labels {list(canonical)}; "
                f"add a label_map to the member, e.g. label_map: {{{example}}}"
            )
        if pos in index:
            raise AlignmentError(
                f"two model labels map to the ensemble label '{canonical[pos]}'; fix label_map"
            )
        index.append(pos)
    return tuple(index)


def align_logits(
    raw: np.ndarray, index: Sequence[int], num_labels: int, *, single_logit: bool = False
) -> np.ndarray:
    """Scatter a member's raw logits ``(n, k)`` into canonical order ``(n, num_labels)``.

    A single-logit (binary) head becomes the pair ``(0, z)`` with z at its positive
    label, so that softmax gives ``sigmoid(z)`` there and ``1 - sigmoid(z)`` at the other.
    """
    raw = np.asarray(raw, dtype=np.float64)
    out = np.full((raw.shape[0], num_labels), np.nan)
    if single_logit:
        if num_labels != 2:
            raise AlignmentError(
                "a single-logit head is binary: the ensemble needs exactly 2 labels"
            )
        out[:, :] = 0.0
        out[:, index[0]] = raw[:, 0]
    else:
        out[:, list(index)] = raw
    return out


def normalise(aligned: np.ndarray, *, temperature: float, multi_label: bool) -> np.ndarray:
    """Aligned logits to probabilities: ``logits / temperature``, then softmax or sigmoid.

    Softmax runs over the labels the member has (non-NaN); missing labels stay NaN.
    """
    z = np.asarray(aligned, dtype=np.float64) / float(temperature)
    if multi_label:
        with np.errstate(over="ignore"):
            return 1.0 / (1.0 + np.exp(-z))
    has = ~np.isnan(z)
    shifted = np.where(has, z, -np.inf)
    row_max = np.max(shifted, axis=-1, keepdims=True)
    row_max = np.where(np.isfinite(row_max), row_max, 0.0)
    e = np.where(has, np.exp(shifted - row_max), 0.0)
    total = e.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(has, e / total, np.nan)


def member_top(probs: np.ndarray) -> np.ndarray:
    """Each member's top label per row, ``(M, n)``; -1 where the member has no score."""
    filled = np.where(np.isnan(probs), -np.inf, probs)
    top = np.argmax(filled, axis=-1)
    return np.where(np.all(np.isnan(probs), axis=-1), -1, top)


def _per_class_weights(probs: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weights broadcast to ``(M, n, L)``, zero where a member lacks the label, and their sums."""
    has = ~np.isnan(probs)
    w = np.where(has, weights[:, None, None], 0.0)
    return w, w.sum(axis=0)


def _renormalise(p: np.ndarray) -> np.ndarray:
    total = p.sum(axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return p / total


def _weighted_mean(probs: np.ndarray, weights: np.ndarray, multi_label: bool) -> np.ndarray:
    w, w_sum = _per_class_weights(probs, weights)
    with np.errstate(invalid="ignore", divide="ignore"):
        p = np.nansum(w * np.nan_to_num(probs), axis=0) / w_sum
    return p if multi_label else _renormalise(p)


def _mean(probs: np.ndarray, weights: np.ndarray, multi_label: bool) -> np.ndarray:
    return _weighted_mean(probs, np.ones_like(weights), multi_label)


def _geometric_mean(probs: np.ndarray, weights: np.ndarray, multi_label: bool) -> np.ndarray:
    w, w_sum = _per_class_weights(probs, weights)
    logp = np.log(np.clip(np.nan_to_num(probs), _TINY, 1.0))
    with np.errstate(invalid="ignore", divide="ignore"):
        a = (w * logp).sum(axis=0) / w_sum
        if multi_label:
            log1mp = np.log(np.clip(1.0 - np.nan_to_num(probs), _TINY, 1.0))
            b = (w * log1mp).sum(axis=0) / w_sum
            return 1.0 / (1.0 + np.exp(b - a))
        a = a - np.nanmax(np.where(np.isnan(a), -np.inf, a), axis=-1, keepdims=True)
        return _renormalise(np.where(np.isnan(a), 0.0, np.exp(a)))


def _most_confident(probs: np.ndarray, weights: np.ndarray, multi_label: bool) -> np.ndarray:
    if multi_label:
        conf = np.where(np.isnan(probs), -np.inf, np.abs(probs - 0.5))
        pick = np.argmax(conf, axis=0)  # (n, L)
        return np.take_along_axis(probs, pick[None], axis=0)[0]
    conf = np.where(np.isnan(probs), -np.inf, probs).max(axis=-1)  # (M, n)
    pick = np.argmax(conf, axis=0)  # (n,)
    chosen = probs[pick, np.arange(probs.shape[1])]
    # The chosen member spread all its mass over the labels it has.
    return np.nan_to_num(chosen, nan=0.0)


# The one place the combinations are named: a new one is a function and an entry here.
# ``stacking`` is a meta-model fitted by `ray-ensemble fit` (see ensemble_distribution).
COMBINERS = {
    "mean": _mean,
    "weighted_mean": _weighted_mean,
    "geometric_mean": _geometric_mean,
    # The vote picks the label (vote_labels); its distribution is the weighted mean.
    "majority_vote": _weighted_mean,
    "max": _most_confident,
}
CLASSIFICATION_COMBINE = (*COMBINERS, "stacking")
EMBEDDING_COMBINE = ("concat", "mean")
# What `ray-ensemble fit` can fit after the temperatures.
FITTED_COMBINE = ("weighted_mean", "geometric_mean", "stacking")
# What `fit --combine auto` compares by cross-validation.
FIT_CANDIDATES = ("mean", *FITTED_COMBINE)
# Combinations that ignore the members' weights.
UNWEIGHTED_COMBINE = ("mean", "max")


def combine(
    probs: np.ndarray, weights: np.ndarray, method: str, *, multi_label: bool
) -> np.ndarray:
    """Combine member distributions ``(M, n, L)`` into the ensemble's ``(n, L)``.

    A member that lacks a label casts no vote on it: weights are renormalised per
    class over the members that have it. For single-label tasks the result is then
    renormalised to sum to one.

    - ``mean`` / ``weighted_mean``: p = Σ wᵢ pᵢ / Σ wᵢ (``mean`` uses equal weights).
    - ``geometric_mean``: normalised weighted log-linear pooling, p ∝ Π pᵢ^(wᵢ/Σw);
      per class as Bernoulli pooling for multi-label.
    - ``majority_vote``: the weighted mean distribution (the vote picks the label,
      see :func:`vote_labels`).
    - ``max``: the distribution of the most confident member per row (per class,
      the member farthest from 0.5, for multi-label).
    """
    fn = COMBINERS.get(method)
    if fn is None:
        raise ValueError(f"unknown combine method '{method}'")
    return fn(
        np.asarray(probs, dtype=np.float64), np.asarray(weights, dtype=np.float64), multi_label
    )


# Stacking features floor: a probability of 0 (or a label the member lacks) reads as this.
STACKING_FLOOR = 1e-7


def stacking_features(member_probs: np.ndarray) -> np.ndarray:
    """``(M, n, L)`` member distributions to ``(n, M·L)`` log-probabilities, member-major.

    A label a member lacks reads as ``log(STACKING_FLOOR)``, like a confident "no".
    """
    probs = np.nan_to_num(np.asarray(member_probs, dtype=np.float64), nan=0.0)
    logp = np.log(np.clip(probs, STACKING_FLOOR, 1.0))
    m, n, num_labels = logp.shape
    return logp.transpose(1, 0, 2).reshape(n, m * num_labels)


def stack(member_probs: np.ndarray, coef: np.ndarray, intercept: np.ndarray) -> np.ndarray:
    """A multinomial logistic meta-model over :func:`stacking_features`: ``(n, L)``.

    ``coef`` is ``(L, M·L)`` and ``intercept`` ``(L,)``.
    """
    z = stacking_features(member_probs) @ np.asarray(coef, dtype=np.float64).T
    z = z + np.asarray(intercept, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


# Stacking meta-models keyed by the indices of the members each reads, in order:
# ``{(0, 1, 2): (coef, intercept), (0,): ...}``. A plain ``(coef, intercept)`` reads every
# member.
MetaModels = Mapping[tuple[int, ...], tuple[np.ndarray, np.ndarray]]


def stack_present(
    member_probs: np.ndarray, models: MetaModels | tuple[np.ndarray, np.ndarray]
) -> np.ndarray:
    """:func:`stack` per row with the meta-model of the members present for that row
    (a member that did not run reads all NaN): a cascade's rows that stopped early get
    their stage prefix's meta-model. ``(n, L)``; NaN for rows no member scored.

    >>> p = np.array([[[0.9, 0.1], [0.8, 0.2]], [[0.7, 0.3], [np.nan, np.nan]]])
    >>> both, first = (np.eye(2, 4), np.zeros(2)), (np.eye(2), np.zeros(2))
    >>> np.round(stack_present(p, {(0, 1): both, (0,): first}), 2).tolist()
    [[0.9, 0.1], [0.8, 0.2]]
    """
    probs = np.asarray(member_probs, dtype=np.float64)
    m, n, num_labels = probs.shape
    if isinstance(models, tuple):
        models = {tuple(range(m)): models}
    present = ~np.all(np.isnan(probs), axis=-1)  # (M, n)
    out = np.full((n, num_labels), np.nan)
    for pattern in np.unique(present.T, axis=0):
        key = tuple(int(i) for i in np.flatnonzero(pattern))
        if not key:
            continue
        if key not in models:
            raise ValueError(
                f"stacking: no meta-model for the members {list(key)} (by index); refit "
                "with `ray-ensemble fit --combine stacking`"
            )
        rows = np.all(present.T == pattern, axis=1)
        out[rows] = stack(probs[list(key)][:, rows], *models[key])
    return out


def ensemble_distribution(
    member_probs: np.ndarray,
    weights: np.ndarray,
    method: str,
    *,
    multi_label: bool,
    stacking: MetaModels | tuple[np.ndarray, np.ndarray] | None = None,
) -> np.ndarray:
    """The ensemble's ``(n, L)`` distribution: :func:`combine`, or for
    ``method="stacking"`` the meta-model of the members present (:func:`stack_present`)."""
    if method == "stacking":
        if stacking is None or multi_label:
            raise ValueError("stacking needs a fitted meta-model and a single-label task")
        return stack_present(member_probs, stacking)
    return combine(member_probs, weights, method, multi_label=multi_label)


def prefix_top(
    member_probs: np.ndarray,
    weights: np.ndarray,
    method: str,
    stacking: MetaModels | None = None,
) -> np.ndarray:
    """The top probability ``(n,)`` of the ensemble so far: ``method`` over the members
    given ``(k, n, L)`` (single-label), their weights renormalised over them, or with
    ``stacking`` the meta-model of the members present (those not run read NaN). NaN
    for a row none of them scored.

    >>> p = np.array([[[0.9, 0.1]], [[0.5, 0.5]]])
    >>> float(prefix_top(p[:1], np.array([2.0]), "weighted_mean")[0])
    0.9
    >>> round(float(prefix_top(p, np.array([3.0, 1.0]), "weighted_mean")[0]), 3)
    0.8
    """
    p = ensemble_distribution(member_probs, weights, method, multi_label=False, stacking=stacking)
    scored = ~np.all(np.isnan(p), axis=-1)
    top = np.full(p.shape[0], np.nan)
    top[scored] = np.nanmax(p[scored], axis=-1)
    return top


def only(member_probs: np.ndarray, members: Sequence[int]) -> np.ndarray:
    """``(M, n, L)`` with every member but ``members`` set to NaN (not run)."""
    out = np.full(np.shape(member_probs), np.nan)
    out[list(members)] = np.asarray(member_probs, dtype=np.float64)[list(members)]
    return out


def cascade_exits(
    member_probs: np.ndarray,
    weights: np.ndarray,
    method: str,
    threshold: float,
    stacking: MetaModels | None = None,
) -> np.ndarray:
    """The exit rule after a stage: rows ``(n,)`` whose ensemble so far (the members
    run so far; the others NaN, or left out) puts at least ``threshold`` on its top
    label."""
    top = prefix_top(member_probs, weights, method, stacking)
    return np.nan_to_num(top, nan=-1.0) >= threshold


def cascade_stages(
    member_probs: np.ndarray,
    weights: np.ndarray,
    method: str,
    stages: Sequence[Sequence[int]],
    exit_at: Sequence[float],
    stacking: MetaModels | None = None,
) -> np.ndarray:
    """How many stages each row runs ``(n,)``, from every member's distribution
    ``(M, n, L)``: the first stage ``i`` (1-based) after which :func:`cascade_exits`
    holds, else ``len(stages)``. ``stages`` are member indices.

    A row's exit depends only on the members of the stages it ran, so this equals a
    cascade that runs each stage on the rows still open (what the hosts do).
    """
    probs = np.asarray(member_probs, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    out = np.full(probs.shape[1], len(stages), dtype=np.int64)
    open_ = np.ones(probs.shape[1], dtype=bool)
    for i, threshold in enumerate(exit_at):
        idx = [m for stage in stages[: i + 1] for m in stage]
        stop = open_ & cascade_exits(only(probs, idx), w, method, threshold, stacking)
        out[stop] = i + 1
        open_ &= ~stop
    return out


def vote_labels(
    probs: np.ndarray, weights: np.ndarray, ensemble_probs: np.ndarray, *, multi_label: bool
) -> np.ndarray:
    """Weighted majority vote ``(n,)``; ties go to the label with the higher mean probability.

    Single-label: each member votes for its top label. Multi-label: the label with the
    largest weighted share of members putting it at or above 0.5.
    """
    weights = np.asarray(weights, dtype=np.float64)
    m, n, num_labels = probs.shape
    if multi_label:
        w, w_sum = _per_class_weights(probs, weights)
        with np.errstate(invalid="ignore", divide="ignore"):
            votes = (w * (np.nan_to_num(probs) >= 0.5)).sum(axis=0) / w_sum
        votes = np.nan_to_num(votes, nan=0.0)
    else:
        top = member_top(probs)
        votes = np.zeros((n, num_labels))
        for i in range(m):
            ok = top[i] >= 0
            votes[np.arange(n)[ok], top[i][ok]] += weights[i]
    best = votes.max(axis=-1, keepdims=True)
    tied = np.isclose(votes, best, rtol=0, atol=1e-12)
    tie_break = np.where(tied, np.nan_to_num(ensemble_probs, nan=-1.0), -np.inf)
    return np.argmax(tie_break, axis=-1)


def agreement(member_tops: np.ndarray, weights: np.ndarray, label: np.ndarray) -> np.ndarray:
    """Weight share of members whose top label equals the ensemble label ``(n,)``."""
    weights = np.asarray(weights, dtype=np.float64)
    scored = member_tops >= 0
    w = np.where(scored, weights[:, None], 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return (w * (member_tops == label[None])).sum(axis=0) / w.sum(axis=0)


def entropy(p: np.ndarray, *, multi_label: bool) -> np.ndarray:
    """Natural-log entropy of each row; the sum of per-label Bernoulli entropies for multi-label."""
    p = np.asarray(p, dtype=np.float64)

    def plogp(x: np.ndarray) -> np.ndarray:
        return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)

    if multi_label:
        return -(plogp(p) + plogp(1.0 - p)).sum(axis=-1)
    return -plogp(p).sum(axis=-1)


@dataclass(frozen=True)
class Reduced:
    """The ensemble's answer for a batch of rows; arrays are over rows ``n``."""

    probs: np.ndarray  # (n, L) ensemble distribution
    label: np.ndarray  # (n,) index into the canonical labels
    score: np.ndarray  # (n,) probs[label]
    agreement: np.ndarray  # (n,)
    entropy: np.ndarray  # (n,)
    member_probs: np.ndarray  # (M, n, L), NaN where a member lacks a label
    error: list[str | None]  # why a row was not scored, or None


def reduce_classification(
    aligned_logits: Sequence[np.ndarray],
    *,
    member_names: Sequence[str],
    temperatures: Sequence[float],
    weights: Sequence[float],
    method: str,
    multi_label: bool,
    valid: np.ndarray | None = None,
    stacking: tuple[np.ndarray, np.ndarray] | None = None,
    ran: np.ndarray | None = None,
) -> Reduced:
    """Everything after the members' forward passes: normalise, combine, label, uncertainty.

    ``method="stacking"`` needs ``stacking=(coef, intercept)`` of the meta-model.

    ``ran``: ``(M, n)``, False where a member did not run for a row (a cascade stopped
    before it, or its host was missing): its outputs there are left out of the
    combination and the agreement, the weights renormalised over the members that ran.

    ``valid`` marks rows that were scored; other rows get NaN results. A valid row that
    a member returned non-finite logits for gets an error naming the member.
    """
    member_probs = np.stack(
        [
            normalise(z, temperature=t, multi_label=multi_label)
            for z, t in zip(aligned_logits, temperatures, strict=True)
        ]
    )
    n = member_probs.shape[1]
    valid = np.ones(n, dtype=bool) if valid is None else np.asarray(valid, dtype=bool).copy()
    errors: list[str | None] = [None] * n
    for i, name in enumerate(member_names):
        # A member scores every label it has or none of them: all-NaN rows are unscored.
        z = np.asarray(aligned_logits[i], dtype=np.float64)
        scored_labels = ~np.all(np.isnan(z), axis=0)
        bad = valid & ~np.all(np.isfinite(z[:, scored_labels]), axis=-1)
        if ran is not None:
            bad &= ran[i]
            member_probs[i, ~ran[i]] = np.nan
        for row in np.flatnonzero(bad):
            errors[row] = f"member '{name}' returned non-finite logits"
        valid &= ~bad
    member_probs[:, ~valid] = np.nan
    w = np.asarray(weights, dtype=np.float64)
    p = ensemble_distribution(member_probs, w, method, multi_label=multi_label, stacking=stacking)
    if method == "majority_vote":
        label = vote_labels(member_probs, w, p, multi_label=multi_label)
    else:
        label = np.argmax(np.nan_to_num(p, nan=-1.0), axis=-1)
    tops = member_top(member_probs)
    if multi_label:
        # A multi-label member "agrees" when it also gives the ensemble label >= 0.5.
        picked = np.take_along_axis(member_probs, label[None, :, None], axis=-1)[..., 0]
        tops = np.where(np.isnan(picked), -1, np.where(picked >= 0.5, label[None], -2))
    agree = agreement(tops, w, label)
    score = np.take_along_axis(p, label[:, None], axis=-1)[:, 0]
    ent = entropy(p, multi_label=multi_label)
    p[~valid] = np.nan
    for arr in (score, agree, ent):
        arr[~valid] = np.nan
    return Reduced(
        probs=p,
        label=label,
        score=score,
        agreement=agree,
        entropy=ent,
        member_probs=member_probs,
        error=errors,
    )


def l2_normalise(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    norm = np.linalg.norm(x, axis=-1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        return x / np.where(norm > 0, norm, 1.0)


def combine_embeddings(
    vectors: Sequence[np.ndarray], weights: Sequence[float], method: str
) -> np.ndarray:
    """Each member's vectors ``(n, d_i)`` L2-normalised, then ``concat`` or weighted ``mean``,
    and the result L2-normalised."""
    normed = [l2_normalise(v) for v in vectors]
    if method == "concat":
        out = np.concatenate(normed, axis=-1)
    elif method == "mean":
        dims = {v.shape[-1] for v in normed}
        if len(dims) != 1:
            raise ValueError(f"combine: mean needs members of one dimension, got {sorted(dims)}")
        w = np.asarray(weights, dtype=np.float64)
        out = np.tensordot(w, np.stack(normed), axes=1) / w.sum()
    else:
        raise ValueError(f"unknown embedding combine method '{method}'")
    return l2_normalise(out)
