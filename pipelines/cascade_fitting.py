"""Fit a cascade: the stage order and thresholds of `ray-ensemble fit --cascade`.

Pure numpy on the calibrated member distributions of the labelled set, plus each
member's cost (forward seconds per row, measured in a host on this hardware):

- every ordered split of the members into 2 or more stages is a candidate order, and
  every combination of thresholds from :data:`THRESHOLDS` a candidate exit rule;
- a candidate is admissible when its accuracy loss against the full ensemble, row by
  row, is within ``max_loss`` with a one-sided 95% margin, and its NLL is no worse than
  the best single member's; the cheapest admissible candidate (expected member seconds
  per row) wins. The margin keeps the choice from leaning on rows it happens to suit;
- the choice is checked on held-out rows: for each fold, the candidate chosen on the
  other folds is scored on that fold (:attr:`CascadeFit.held_out`).

With no admissible candidate, the full ensemble stays: no cascade is written.

Example::

    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> y = rng.integers(0, 2, 600)
    >>> sure = np.where(np.eye(2)[y] > 0, 0.97, 0.03)
    >>> probs = np.stack([sure, sure, sure])  # three members that always agree
    >>> fit = fit_cascade(probs, y, np.ones(3), "weighted_mean", [0.1, 0.2, 1.0], ["a", "b", "c"])
    >>> fit.chosen.stages, fit.chosen.exit_at
    ((('a',), ('b', 'c')), (0.97,))
"""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from actors.reducer import MetaModels, combine, ensemble_distribution, only, stack
from actors.tasks.classification import nll

__all__ = [
    "THRESHOLDS",
    "CascadeCandidate",
    "CascadeFit",
    "evaluate_cascade",
    "fit_cascade",
    "fit_cascade_block",
    "measure_member_costs",
    "held_out_stacking",
    "ordered_splits",
    "render_cascade",
    "stage_prefixes",
]

# The thresholds tried after each stage. 1.0 lets no row stop there (the next stage
# then acts as part of this one).
THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.93, 0.95, 0.97, 0.98, 0.99, 0.995, 0.999, 1.0)
# With more stages, fewer thresholds each: the grid grows as its power.
COARSE_THRESHOLDS = (0.6, 0.8, 0.9, 0.95, 0.98, 0.99, 0.999, 1.0)
FOLDS = 5
# The one-sided 95% normal quantile: the margin on the accuracy loss.
CONFIDENCE_Z = 1.645
MAX_MEMBERS = 5


@dataclass(frozen=True)
class CascadeCandidate:
    """A stage order and its thresholds, with its figures on the whole set."""

    stages: tuple[tuple[str, ...], ...]
    exit_at: tuple[float, ...]
    cost: float  # expected member forward seconds per row
    accuracy: float
    nll: float
    shares: tuple[float, ...]  # share of rows stopping at each stage
    admissible: bool = False


@dataclass(frozen=True)
class CascadeFit:
    chosen: CascadeCandidate | None  # None: no cascade keeps the accuracy and the NLL
    full: CascadeCandidate  # the full ensemble, every member on every row
    best_member: tuple[str, float]  # its name and NLL
    table: tuple[CascadeCandidate, ...]  # the cheapest admissible of each stage order
    held_out: tuple[tuple[float, float, float], ...]  # per fold: accuracy loss, NLL, cost
    max_loss: float


def ordered_splits(names: Sequence[str]) -> list[tuple[tuple[str, ...], ...]]:
    """Every ordered split of ``names`` into 2 or more non-empty stages (members in a
    stage keep their order)."""
    names = list(names)
    out = []
    for labels in itertools.product(range(len(names)), repeat=len(names)):
        used = sorted(set(labels))
        if len(used) < 2 or used != list(range(len(used))):
            continue
        out.append(
            tuple(tuple(n for n, s in zip(names, labels, strict=True) if s == k) for k in used)
        )
    return out


def stage_prefixes(
    probs: np.ndarray,
    weights: np.ndarray,
    method: str,
    stages: Sequence[Sequence[int]],
    stacking: MetaModels | None = None,
) -> list[np.ndarray]:
    """The ensemble so far after each stage, ``(n, L)`` each; with ``stacking``, each
    prefix's own meta-model."""
    out = []
    for i in range(len(stages)):
        idx = [m for stage in stages[: i + 1] for m in stage]
        out.append(
            ensemble_distribution(
                only(probs, idx), weights, method, multi_label=False, stacking=stacking
            )
        )
    return out


def held_out_stacking(
    probs: np.ndarray, y: np.ndarray, labels: Sequence[str], seed: int = 0
) -> Callable[[Sequence[int]], np.ndarray]:
    """For stacking: the distribution ``(n, L)`` of a meta-model over some of the members
    (indices), each row's from the meta-model fitted on the other CV folds, so the
    thresholds are not chosen on rows the meta-models were fitted on. Cached per set."""
    from pipelines.fitting import cv_folds, fit_stacking

    folds = cv_folds(y, seed)
    cache: dict[tuple[int, ...], np.ndarray] = {}

    def dist(members: Sequence[int]) -> np.ndarray:
        key = tuple(sorted(members))
        if key not in cache:
            sub = probs[list(key)]
            out = np.empty(sub.shape[1:])
            names = [str(i) for i in key]
            for tr, te in folds:
                meta = fit_stacking(sub[:, tr], y[tr], list(labels), names)
                out[te] = stack(sub[:, te], meta.coef, meta.intercept)
            cache[key] = out
        return cache[key]

    return dist


def _stop_stage(prefix: list[np.ndarray], exit_at: Sequence[float]) -> np.ndarray:
    """The 0-based stage each row stops at (the exit rule of actors.reducer)."""
    n = prefix[0].shape[0]
    stop = np.full(n, len(prefix) - 1)
    open_ = np.ones(n, dtype=bool)
    for i, threshold in enumerate(exit_at):
        out = open_ & (np.nan_to_num(prefix[i].max(-1), nan=-1.0) >= threshold)
        stop[out] = i
        open_ &= ~out
    return stop


def evaluate_cascade(
    prefix: list[np.ndarray],
    exit_at: Sequence[float],
    stage_cost: np.ndarray,
    y: np.ndarray,
    rows: np.ndarray | None = None,
) -> tuple[float, float, float, np.ndarray]:
    """Accuracy, NLL, expected cost per row and stage shares of a cascade on ``rows``."""
    if rows is not None:
        prefix = [p[rows] for p in prefix]
        y = y[rows]
    stop = _stop_stage(prefix, exit_at)
    p = np.stack(prefix)[stop, np.arange(len(y))]
    shares = np.bincount(stop, minlength=len(prefix)) / len(y)
    cost = float(np.sum(shares * np.cumsum(stage_cost)))
    return float(np.mean(p.argmax(-1) == y)), nll(p, y), cost, shares


def _grids(stages: int) -> list[tuple[float, ...]]:
    """Threshold tuples, highest first: of equally cheap cascades, the surest wins."""
    values = sorted(THRESHOLDS if stages <= 3 else COARSE_THRESHOLDS, reverse=True)
    return list(itertools.product(values, repeat=stages - 1))


def _within(
    prefix: list[np.ndarray],
    exit_at: Sequence[float],
    y: np.ndarray,
    rows: np.ndarray,
    full_correct: np.ndarray,
    max_loss: float,
    nll_bound: float,
) -> bool:
    """Whether the cascade keeps both bounds on ``rows``: its accuracy loss against the
    full ensemble, row by row, with a one-sided 95% margin (so that a loss that only
    happens not to show on these rows does not pass), and its NLL."""
    sub = [p[rows] for p in prefix]
    stop = _stop_stage(sub, exit_at)
    p = np.stack(sub)[stop, np.arange(len(rows))]
    diff = full_correct[rows].astype(np.float64) - (p.argmax(-1) == y[rows])
    margin = CONFIDENCE_Z * diff.std() / np.sqrt(len(rows))
    return diff.mean() + margin <= max_loss + 1e-12 and nll(p, y[rows]) <= nll_bound + 1e-12


def _select(
    table: list[tuple[tuple, tuple, list[np.ndarray], np.ndarray]],
    y: np.ndarray,
    rows: np.ndarray,
    full_prefix: np.ndarray,
    members: np.ndarray,
    max_loss: float,
) -> tuple[tuple, tuple] | None:
    """The cheapest (order, thresholds) within the bounds on ``rows``."""
    full_correct = full_prefix.argmax(-1) == y
    nll_bound = min(nll(members[m][rows], y[rows]) for m in range(members.shape[0]))
    best_choice, best_cost = None, np.inf
    for order, exit_at, prefix, stage_cost in table:
        cost = evaluate_cascade(prefix, exit_at, stage_cost, y, rows)[2]
        if cost >= best_cost:
            continue
        if _within(prefix, exit_at, y, rows, full_correct, max_loss, nll_bound):
            best_choice, best_cost = (order, exit_at), cost
    return best_choice


def fit_cascade(
    member_probs: np.ndarray,
    y: np.ndarray,
    weights: Sequence[float],
    method: str,
    member_cost: Sequence[float],
    names: Sequence[str],
    *,
    max_loss: float = 0.002,
    seed: int = 0,
    labels: Sequence[str] | None = None,
) -> CascadeFit:
    """The cheapest cascade within ``max_loss`` accuracy of the full ensemble and no
    worse NLL than the best member, on every fold (see the module's docstring).

    ``member_probs``: calibrated ``(M, n, L)``; ``member_cost``: forward seconds per row.
    With ``method="stacking"`` (``labels`` given) every ensemble so far is a meta-model of
    its own, judged on the rows of CV folds it was not fitted on."""
    probs = np.asarray(member_probs, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    cost = np.asarray(member_cost, dtype=np.float64)
    names = list(names)
    if len(names) > MAX_MEMBERS:
        raise ValueError(
            f"fit --cascade searches every stage order of up to {MAX_MEMBERS} members; "
            f"this ensemble has {len(names)}: write the cascade block by hand"
        )
    index = {n: i for i, n in enumerate(names)}
    if method == "stacking":
        if labels is None:
            raise ValueError("fit_cascade: stacking needs the labels")
        ensemble = held_out_stacking(probs, y, labels, seed)
    else:

        def ensemble(members: Sequence[int]) -> np.ndarray:
            idx = list(members)
            return combine(probs[idx], w[idx], method, multi_label=False)

    full_prefix = ensemble(range(len(names)))
    table = []
    for order in ordered_splits(names):
        stages = [[index[n] for n in stage] for stage in order]
        prefix = [ensemble([m for st in stages[: i + 1] for m in st]) for i in range(len(stages))]
        stage_cost = np.array([cost[s].sum() for s in stages])
        for exit_at in _grids(len(stages)):
            table.append((order, exit_at, prefix, stage_cost))

    rng = np.random.default_rng(seed)
    folds = np.array_split(rng.permutation(len(y)), min(FOLDS, len(y)))
    every = np.arange(len(y))
    chosen = _select(table, y, every, full_prefix, probs, max_loss)
    held_out = []
    for k, rows in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != k])
        pick = _select(table, y, train, full_prefix, probs, max_loss)
        full_acc = float(np.mean(full_prefix[rows].argmax(-1) == y[rows]))
        if pick is None:
            held_out.append((0.0, nll(full_prefix[rows], y[rows]), float(cost.sum())))
            continue
        entry = next(t for t in table if (t[0], t[1]) == pick)
        acc, n_ll, c, _ = evaluate_cascade(entry[2], pick[1], entry[3], y, rows)
        held_out.append((full_acc - acc, n_ll, c))

    def candidate(order, exit_at, prefix, stage_cost, admissible=False) -> CascadeCandidate:
        acc, n_ll, c, shares = evaluate_cascade(prefix, exit_at, stage_cost, y)
        return CascadeCandidate(
            order, tuple(exit_at), c, acc, n_ll, tuple(float(s) for s in shares), admissible
        )

    # The table: per stage order, its cheapest admissible thresholds (on the whole set's
    # folds), else its most accurate ones.
    rows_table = []
    for order in ordered_splits(names):
        entries = [t for t in table if t[0] == order]
        picked = _select(entries, y, every, full_prefix, probs, max_loss)
        if picked is not None:
            entry = next(t for t in entries if t[1] == picked[1])
            rows_table.append(candidate(*entry, admissible=True))
        else:
            entry = max(
                entries, key=lambda t: (evaluate_cascade(t[2], t[1], t[3], y)[0], -len(t[1]))
            )
            rows_table.append(candidate(*entry))
    full = CascadeCandidate(
        (tuple(names),),
        (),
        float(cost.sum()),
        float(np.mean(full_prefix.argmax(-1) == y)),
        nll(full_prefix, y),
        (1.0,),
    )
    member_nll = [nll(probs[i], y) for i in range(len(names))]
    best = int(np.argmin(member_nll))
    chosen_candidate = None
    if chosen is not None:
        entry = next(t for t in table if (t[0], t[1]) == chosen)
        chosen_candidate = candidate(*entry, admissible=True)
    return CascadeFit(
        chosen=chosen_candidate,
        full=full,
        best_member=(names[best], member_nll[best]),
        table=tuple(sorted(rows_table, key=lambda c: c.cost)),
        held_out=tuple(held_out),
        max_loss=max_loss,
    )


# Rows timed per member, after a warm-up pass over the same rows.
COST_ROWS = 256


def _time_members(
    plan: Any, members: tuple[str, ...], num_gpus: float, threads: int, texts: list[str]
) -> dict[str, float]:
    """Forward seconds per row of each member of one host, timed inside the host around
    the member's passes (tokenising excluded), after a warm-up pass."""
    from actors.host import EnsembleHost

    seconds = dict.fromkeys(members, 0.0)

    def observe(name: str, s: float) -> None:
        seconds[name] += s

    host = EnsembleHost(
        plan=plan,
        members=members,
        reduce=False,
        num_gpus=num_gpus,
        threads=threads,
        observe=observe,
    )
    host.infer(texts)
    seconds.update(dict.fromkeys(members, 0.0))
    host.infer(texts)
    return {m: s / len(texts) for m, s in seconds.items()}


def measure_member_costs(
    plan: Any, texts: Sequence[str], *, cpu_fallback: bool = True
) -> dict[str, float]:
    """Each member's forward seconds per row on this cluster, in its own host's place
    (the resources `score` gives it), on up to :data:`COST_ROWS` of ``texts``. Ray must
    be running."""
    import ray

    from pipelines.plan import hosts_on_cluster, without_cascade

    plan = without_cascade(plan)
    sample = [t for t in texts if isinstance(t, str) and t.strip()][:COST_ROWS]
    if not sample:
        raise ValueError("fit --cascade: no text to time the members on")
    sample = [t[: plan.config.input.max_chars] for t in sample]
    timed = ray.remote(_time_members)
    calls = []
    for host in hosts_on_cluster(plan.config, cpu_fallback=cpu_fallback):
        # One host at a time: timed side by side, members would share the CPUs.
        options = {"num_cpus": host.num_cpus, "num_gpus": host.num_gpus}
        calls.append(
            ray.get(
                timed.options(**options).remote(
                    plan, host.members, host.num_gpus, host.threads, sample
                )
            )
        )
    costs = {k: v for c in calls for k, v in c.items()}
    return {m.name: costs[m.name] for m in plan.config.members}


def fit_cascade_block(
    plan: Any,
    texts: Sequence[str],
    data: Any,
    result: Any,
    *,
    max_loss: float,
    cpu_fallback: bool = True,
) -> tuple[dict, str, Any]:
    """`fit --cascade` after `fit`: the members timed on ``texts``, then the cascade
    fitted on ``data`` (:class:`pipelines.fitting.LabelledOutputs`) with ``result``'s
    temperatures, weights and combination. Returns the config's ``cascade`` block (empty
    when no candidate keeps the bounds), the candidates table, and ``result`` with, for
    stacking, a meta-model per stage prefix. Ray must be running."""
    from pipelines.fitting import calibrated, with_prefix_models

    costs = measure_member_costs(plan, texts, cpu_fallback=cpu_fallback)
    probs = calibrated(data.logits, result.temperatures)
    labels = list(plan.config.labels)
    fit = fit_cascade(
        probs,
        data.y,
        result.weights,
        result.combine,
        [costs[n] for n in data.names],
        data.names,
        max_loss=max_loss,
        labels=labels,
    )
    block: dict = {}
    if fit.chosen is not None:
        block = {
            "stages": [list(stage) for stage in fit.chosen.stages],
            "exit_at": [float(t) for t in fit.chosen.exit_at],
        }
        if result.stacking is not None:
            stacking = with_prefix_models(
                result.stacking, fit.chosen.stages, probs, data.y, data.names
            )
            result = dataclasses.replace(result, stacking=stacking)
    return block, render_cascade(fit, costs), result


def render_cascade(fit: CascadeFit, member_cost: dict[str, float]) -> str:
    """The candidates table `fit --cascade` prints."""
    costs = ", ".join(f"{n} {1e3 * s:.3f}" for n, s in member_cost.items())
    lines = [
        f"fit --cascade: member forward ms/row: {costs}",
        f"fit --cascade: within {100 * fit.max_loss:.2f} points of the full ensemble's "
        f"accuracy (with a 95% margin) and NLL <= {fit.best_member[1]:.4f} "
        f"({fit.best_member[0]}); per stage order, its cheapest such thresholds:",
        f"  {'stages':<34} {'exit_at':<18} {'ms/row':>8} {'accuracy':>9} {'NLL':>7}  "
        "stop at each stage",
    ]

    def row(c: CascadeCandidate, mark: str) -> str:
        stages = " > ".join("+".join(s) for s in c.stages)
        exit_at = ",".join(f"{t:g}" for t in c.exit_at) or "-"
        shares = " ".join(f"{s:.2f}" for s in c.shares)
        ok = "" if c.admissible or not c.exit_at else "  (out of bounds)"
        return (
            f"  {stages:<34} {exit_at:<18} {1e3 * c.cost:8.3f} {c.accuracy:9.4f} "
            f"{c.nll:7.4f}  {shares}{ok}{mark}"
        )

    lines.append(row(fit.full, "  (full ensemble)"))
    for c in fit.table:
        chosen = fit.chosen is not None and (c.stages, c.exit_at) == (
            fit.chosen.stages,
            fit.chosen.exit_at,
        )
        lines.append(row(c, "  <- chosen" if chosen else ""))
    losses = " ".join(f"{100 * loss:+.2f}" for loss, _, _ in fit.held_out)
    lines.append(
        f"fit --cascade: held out (chosen on the other folds), accuracy loss in points: {losses}"
    )
    if fit.chosen is None:
        lines.append("fit --cascade: no cascade stays within the bounds; none written")
    return "\n".join(lines)
