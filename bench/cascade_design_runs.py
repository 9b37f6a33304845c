"""Real scoring runs of cascade designs against their full ensemble, in one local Ray.

    python bench/cascade_design_runs.py W/cascade.yaml --input W/data/test.jsonl \\
        --design D2='[["pieces"], ["minilm_l6"], ["mpnet"]]:[0.95, 0.85]'

The config's own ``cascade`` block is dropped: the full ensemble (same members, weights
and combination) runs first, then each design's ``stages:exit_at``, one after the other
with ``pipelines.offline.score``, as ``evaluate`` scores. Per run: accuracy of the
written labels against ``--label-column``, member-forward ms per row (summed member
seconds timed inside the hosts over the rows scored, as ``evaluate``'s
``member_s_per_row``), each member's share of it, and the stage shares; each design's
cost ratio and accuracy loss (points) against the full run of the same invocation.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import yaml  # noqa: E402

from jobs.cli import IDLE_WORKER_KEEP_MS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path)
    parser.add_argument("--input", type=Path, required=True, help="labelled JSONL")
    parser.add_argument("--label-column", default="label")
    parser.add_argument("--design", nargs="+", default=[], help="NAME=STAGES_JSON:EXIT_AT_JSON")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/ray-ensemble-cascade-runs"))
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import ray

    from pipelines.config import config_from_dict
    from pipelines.offline import score
    from pipelines.output import read_output
    from pipelines.plan import plan_ensemble

    base = yaml.safe_load(args.config.read_text())
    base.pop("cascade", None)
    designs = {"full": None}
    for spec in args.design:
        name, rest = spec.split("=", 1)
        stages, exit_at = rest.rsplit(":", 1)
        designs[name] = {"stages": json.loads(stages), "exit_at": json.loads(exit_at)}
    with open(args.input) as f:
        labels = [json.loads(line)[args.label_column] for line in f if line.strip()]
    ray.init(
        include_dashboard=False,
        log_to_driver=False,
        _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    results: dict = {}
    for name, cascade in designs.items():
        cfg = dict(base, **({"cascade": cascade} if cascade else {}))
        plan = plan_ensemble(config_from_dict(cfg, base_dir=args.config.parent))
        out = args.workdir / name
        start = time.perf_counter()
        s = score(plan, args.input, out, overwrite=True, rename={args.label_column: "true_label"})
        took = time.perf_counter() - start
        table = read_output(out)
        pred = table.column("label").to_pylist()
        r = {
            "rows": s.scored,
            "accuracy": float(np.mean([p == y for p, y in zip(pred, labels, strict=True)])),
            "member_ms_per_row": 1e3 * sum(s.member_seconds.values()) / s.scored,
            "members_ms": {m: 1e3 * v / s.scored for m, v in s.member_seconds.items()},
            "wall_s": took,
        }
        if cascade:
            stage = np.array(table.column("cascade_stage").to_pylist())
            counts = np.bincount(stage - 1, minlength=len(cascade["stages"]))
            r["shares"] = (counts / len(stage)).tolist()
            r["cost_ratio"] = r["member_ms_per_row"] / results["full"]["member_ms_per_row"]
            r["loss_points"] = 100 * (results["full"]["accuracy"] - r["accuracy"])
        results[name] = r
        print(name, json.dumps(r), flush=True)
    ray.shutdown()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
