"""Cascade designs for the demo's members: fit rules and the cost floor, from member outputs.

    ray-ensemble demo --workdir W        # members, cascade.yaml, report/cascade-*/scored-full
    python bench/cascade_designs.py W/cascade.yaml --validation W/data/validation.jsonl \\
        --judge test=W/report/cascade-test/scored-full \\
        --judge off-domain=W/report/cascade-off-domain/scored-full

Pure numpy once the members' calibrated distributions are in hand: on the validation
split they are collected as ``fit`` collects them (Ray is started for that, once; pass
``--cache FILE.npz`` to keep them); on the judged sets they are read from an
``evaluate`` run's ``scored-full`` output, where every member scored every row.

1. **Fit rules**: :func:`pipelines.cascade_fitting.fit_cascade` on the validation rows
   only, with each ``--max-loss`` and accuracy margin (``CONFIDENCE_Z``: 1.645 is the
   one-sided 95% margin ``fit --cascade`` uses; 0 takes the point estimate), then the
   chosen cascade's expected cost ratio and accuracy loss on each judged set.
2. **The floor**: on each set, the cheapest cascade (every ordered split into stages,
   a fine threshold grid) within ``--target`` of the full ensemble's accuracy on that
   same set, so fitted on the rows it is judged on: no fit on other rows does better
   in expectation.

Costs are the members' forward ms/row, as ``fit --cascade`` measured them (``--costs``).
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

import pipelines.cascade_fitting as cf  # noqa: E402
from actors.reducer import combine, stack  # noqa: E402

RULES = ((0.002, 1.645), (0.003, 1.645), (0.002, 0.0), (0.003, 0.0))
GRID = np.round(np.concatenate([np.arange(0.5, 0.9, 0.02), np.arange(0.9, 1.0, 0.005), [1.0]]), 4)


def validation_outputs(config: Path, validation: Path, cache: Path | None) -> tuple:
    if cache is not None and cache.is_file():
        z = np.load(cache)
        return z["P"], z["y"]
    import ray

    from jobs.cli import IDLE_WORKER_KEEP_MS
    from pipelines.config import load_config
    from pipelines.fitting import calibrated, collect_member_outputs
    from pipelines.plan import plan_ensemble

    plan = plan_ensemble(load_config(config))
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
    )
    out = collect_member_outputs(plan, validation, "label")
    ray.shutdown()
    probs = calibrated(out.logits, [m.temperature for m in plan.config.members])
    if cache is not None:
        np.savez(cache, P=probs, y=out.y)
    return probs, out.y


def judged_outputs(path: Path, names: list[str], labels: list[str]) -> tuple:
    from pipelines.output import read_output

    t = read_output(path)
    ok = np.array([e is None for e in t.column("error").to_pylist()])
    y = np.array([labels.index(v) for v in t.column("true_label").to_pylist()])[ok]
    probs = np.stack([np.array(t.column(f"probs__{n}").to_pylist())[ok] for n in names])
    return probs, y


def distributions(sets: dict, w: np.ndarray, method: str, labels: list[str]) -> dict:
    """Per set, a function from member indices to the ensemble so far ``(n, L)`` over
    them, cached. With stacking, each member subset's meta-model is fitted on the
    validation rows (on validation itself, each row's from the other CV folds)."""
    from pipelines.fitting import fit_stacking

    pv, yv = sets["validation"]
    metas: dict = {}
    out = {}
    for s, (p, y) in sets.items():
        if method == "stacking" and s == "validation":
            out[s] = cf.held_out_stacking(p, y, labels)
            continue
        cache: dict = {}

        def dist(idx, p=p, cache=cache):
            key = tuple(sorted(idx))
            if key not in cache:
                if method == "stacking":
                    if key not in metas:
                        metas[key] = fit_stacking(pv[list(key)], yv, labels, [str(k) for k in key])
                    cache[key] = stack(p[list(key)], metas[key].coef, metas[key].intercept)
                else:
                    cache[key] = combine(p[list(key)], w[list(key)], method, multi_label=False)
            return cache[key]

        out[s] = dist
    return out


def run(dist, y, order, exit_at, index, cost) -> tuple[float, float, np.ndarray]:
    """Accuracy, cost per row and stage shares of one cascade."""
    stages = [[index[n] for n in s] for s in order]
    prefix = [dist([m for st in stages[: k + 1] for m in st]) for k in range(len(stages))]
    stage_cost = np.array([cost[s].sum() for s in stages])
    acc, _, c, shares = cf.evaluate_cascade(prefix, exit_at, stage_cost, y)
    return acc, c, shares


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="the demo's cascade.yaml")
    parser.add_argument("--validation", type=Path, required=True)
    parser.add_argument("--judge", nargs="+", default=[], help="NAME=scored-full folder")
    parser.add_argument("--costs", default="pieces=0.025,minilm_l6=2.832,mpnet=13.126")
    parser.add_argument("--target", type=float, default=0.003, help="floor: loss bound")
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument(
        "--combine",
        default=None,
        help="instead of the config's combination (stacking: a meta-model per stage prefix)",
    )
    args = parser.parse_args()

    from pipelines.config import load_config

    cfg = load_config(args.config)
    names = [m.name for m in cfg.members]
    index = {n: i for i, n in enumerate(names)}
    w = np.array([m.weight for m in cfg.members], dtype=np.float64)
    method = args.combine or cfg.reducer.combine
    labels = list(cfg.labels)
    given = dict(kv.split("=") for kv in args.costs.split(","))
    cost = np.array([float(given[n]) for n in names])
    sets = {"validation": validation_outputs(args.config, args.validation, args.cache)}
    for spec in args.judge:
        name, path = spec.split("=", 1)
        sets[name] = judged_outputs(Path(path), names, list(cfg.labels))
    dists = distributions(sets, w, method, labels)
    every = list(range(len(names)))
    full = {s: float(np.mean(dists[s](every).argmax(-1) == y)) for s, (_, y) in sets.items()}
    print("full ensemble accuracy: " + ", ".join(f"{s} {100 * a:.2f}%" for s, a in full.items()))

    print("fit rules (fitted on validation only): cost ratio / accuracy loss in points")
    print(f"| max_loss | margin z | stages | exit_at | held-out folds | {' | '.join(sets)} |")
    print("|---|---|---|---|---|" + "---|" * len(sets))
    for max_loss, z in RULES:
        cf.CONFIDENCE_Z = z
        probs, y = sets["validation"]
        fit = cf.fit_cascade(
            probs, y, w, method, cost / 1e3, names, max_loss=max_loss, labels=labels
        )
        c = fit.chosen
        if c is None:
            print(f"| {max_loss} | {z} | none | | | |")
            continue
        cells = []
        for s, (_p, yy) in sets.items():
            acc, cst, _ = run(dists[s], yy, c.stages, c.exit_at, index, cost)
            cells.append(f"{cst / cost.sum():.3f} / {100 * (full[s] - acc):+.2f}")
        held = " ".join(f"{100 * loss:+.2f}" for loss, _, _ in fit.held_out)
        stages = " > ".join("+".join(s) for s in c.stages)
        exit_at = ", ".join(f"{t:g}" for t in c.exit_at)
        print(f"| {max_loss} | {z} | {stages} | {exit_at} | {held} | {' | '.join(cells)} |")

    print(f"\nfloor: cheapest cascade within {100 * args.target:.1f} points on the set itself")
    for s, (_p, y) in sets.items():
        best = (np.inf, None, None)
        for order in cf.ordered_splits(names):
            for exit_at in itertools.product(GRID, repeat=len(order) - 1):
                acc, cst, _ = run(dists[s], y, order, exit_at, index, cost)
                if full[s] - acc <= args.target + 1e-12 and cst < best[0]:
                    best = (cst, order, exit_at)
        stages = " > ".join("+".join(x) for x in best[1])
        exit_at = json.dumps([float(t) for t in best[2]])
        print(f"- {s}: {best[0] / cost.sum():.3f} ({stages}, exit_at {exit_at})")


if __name__ == "__main__":
    main()
