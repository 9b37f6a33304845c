"""A cascade against its full ensemble: offline rows/s and online latency, side by side.

    ray-ensemble demo --workdir W                  # trains the members, writes W/cascade.yaml
    python bench/cascade_throughput.py W/cascade.yaml --input W/data/test.jsonl

One local Ray for the whole run, started as the other benches start it
(``bench/offline_throughput.py``); both configurations are measured in it, one after the
other, so that their ratio is taken on the same machine at the same time (the absolute
figures move with whatever else the machine runs; the ratios are the result):

- **cascade**: the config as given (its ``cascade`` block);
- **full**: the same config with the ``cascade`` block removed
  (:func:`pipelines.plan.without_cascade`): the same members, weights and combination,
  every member on every row.

Offline, with start-up excluded: every ``score`` call starts its own actor pool (workers,
model loading) and plans its Ray Data job, a fixed cost that does not depend on the row
count. Each configuration is therefore timed on the first ``--rows`` rows of the input
(``T_N``) and on its first 64 rows (``T_64``), after a warm-up run of 64 rows that pays
for the cold caches; ``rows/s = (N - 64) / (T_N - T_64)``, the rate of the rows beyond
the start-up. With ``--repeats`` above 1 the configurations alternate and the medians of
the times are used. The member-forward seconds per row of each large run
(``ScoreSummary.member_seconds``, timed inside the hosts) are reported beside it.

Online: each configuration in turn as the one-deployment (colocated) Serve app of
``ray-ensemble serve``, one text per request, the texts taken in turn from the input:
p50 at one client and requests/s at 16 clients (``bench/online_latency.py``'s load
generator, its warm-up included).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402

from jobs.cli import IDLE_WORKER_KEEP_MS  # noqa: E402

SMALL = 64
# As bench/online_latency.py: room for 16 clients without 503s.
SERVE_LIMITS = {"max_ongoing_requests": 64, "max_queued_requests": 256}

logger = logging.getLogger("bench.cascade_throughput")


def read_texts(path: Path, column: str) -> list[str]:
    """The texts of a JSONL or Parquet file, in order."""
    if path.suffix == ".parquet":
        return [t for t in pq.read_table(path, columns=[column]).column(column).to_pylist()]
    with open(path) as f:
        return [json.loads(line)[column] for line in f if line.strip()]


def plans(config: Path, serve_limits: bool = False) -> dict:
    """The cascade's plan and its full ensemble's."""
    from pipelines.config import load_config
    from pipelines.plan import plan_ensemble, without_cascade

    cfg = load_config(config)
    if cfg.cascade is None:
        sys.exit(f"{config} has no cascade block: fit one with `ray-ensemble fit --cascade`")
    if serve_limits:
        cfg = cfg.model_copy(update={"serve": cfg.serve.model_copy(update=SERVE_LIMITS)})
    plan = plan_ensemble(cfg)
    return {"cascade": plan, "full": without_cascade(plan)}


def timed_score(plan, data: Path, out: Path) -> tuple[float, dict[str, float] | None, int]:
    from pipelines.offline import score

    start = time.perf_counter()
    summary = score(plan, data, out, overwrite=True)
    took = time.perf_counter() - start
    assert summary.rows == summary.scored, summary
    return took, summary.member_seconds, summary.scored


def offline(plans_: dict, texts: list[str], work: Path, repeats: int) -> dict:
    n = len(texts)
    data, small = work / "rows.parquet", work / "small.parquet"
    ids = [str(i) for i in range(n)]
    pq.write_table(pa.table({"id": ids, "text": texts}), data)
    pq.write_table(pa.table({"id": ids[:SMALL], "text": texts[:SMALL]}), small)
    times: dict = {
        name: {"small": [], "large": [], "member_s_per_row": [], "members": []} for name in plans_
    }
    for name, plan in plans_.items():
        timed_score(plan, small, work / f"out-{name}")  # warm-up: cold caches
    for _ in range(repeats):
        for name, plan in plans_.items():
            t_small = timed_score(plan, small, work / f"out-{name}")[0]
            t_large, seconds, rows = timed_score(plan, data, work / f"out-{name}")
            times[name]["small"].append(t_small)
            times[name]["large"].append(t_large)
            if seconds:
                times[name]["member_s_per_row"].append(sum(seconds.values()) / rows)
                times[name]["members"].append({m: 1e3 * s / rows for m, s in seconds.items()})
            logger.info(
                "offline %s: %d rows %.2fs, %d rows %.2fs", name, SMALL, t_small, n, t_large
            )
    results = {}
    for name, t in times.items():
        t_small, t_large = statistics.median(t["small"]), statistics.median(t["large"])
        results[name] = {
            "small_s": t_small,
            "large_s": t_large,
            "rows_per_s": (n - SMALL) / (t_large - t_small),
            "end_to_end_rows_per_s": n / t_large,
            "members_ms_per_row": t["members"][-1] if t["members"] else None,
            "member_ms_per_row": 1e3 * statistics.median(t["member_s_per_row"])
            if t["member_s_per_row"]
            else None,
            "runs": t,
        }
    return results


def online(plans_: dict, texts: list[str], requests: int, per_client: int) -> dict:
    from online_latency import free_port, load
    from ray import serve

    from pipelines.online import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/predict"
    results = {}
    for name, plan in plans_.items():
        serve.run(build_app(plan, colocate=True), name="bench", route_prefix="/")
        load(url, texts, 4, 10)  # warm-up
        results[name] = {
            "c1": load(url, texts, 1, requests),
            "c16": load(url, texts, 16, per_client),
        }
        logger.info("online %s: %s", name, json.dumps(results[name]))
        serve.delete("bench")
    serve.shutdown()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("config", type=Path, help="a config with a cascade block")
    parser.add_argument("--input", type=Path, required=True, help="JSONL or Parquet texts")
    parser.add_argument("--text-column", default="text")
    parser.add_argument("--rows", type=int, default=2500, help="offline: rows of the large run")
    parser.add_argument("--repeats", type=int, default=1, help="offline: large/small pairs")
    parser.add_argument("--parts", nargs="+", default=["offline", "online"])
    parser.add_argument("--requests", type=int, default=200, help="online: at 1 client")
    parser.add_argument("--requests-per-client", type=int, default=25, help="at 16 clients")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-cascade-bench")
    )
    parser.add_argument("--json", default=None, help="also write the figures here")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    import ray

    texts = [t for t in read_texts(args.input, args.text_column) if isinstance(t, str) and t]
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"config": str(args.config), "input": str(args.input), "cpus": os.cpu_count()}
    start = time.perf_counter()
    ray.init(
        num_cpus=args.threads,
        include_dashboard=False,
        log_to_driver=False,
        # As `ray-ensemble score` starts a local Ray: idle workers kept, not restarted mid-job.
        _system_config={"idle_worker_killing_time_threshold_ms": IDLE_WORKER_KEEP_MS},
    )
    results["ray_start_s"] = time.perf_counter() - start
    ray.data.DataContext.get_current().enable_progress_bars = False
    if "offline" in args.parts:
        rows = texts[: args.rows]
        results["offline"] = offline(plans(args.config), rows, work, args.repeats)
        results["offline"]["rows"] = len(rows)
    if "online" in args.parts:
        results["online"] = online(
            plans(args.config, serve_limits=True), texts, args.requests, args.requests_per_client
        )
    ray.shutdown()

    if "offline" in results:
        off = results["offline"]
        c, f = off["cascade"], off["full"]
        print(f"\noffline, {off['rows']} rows (start-up excluded: T_N - T_{SMALL})\n")
        print(
            "| config | rows/s | end-to-end rows/s | member ms/row | per member ms/row "
            "(over all rows) | T_N s | T_64 s |"
        )
        print("|---|---|---|---|---|---|---|")
        for name, r in (("cascade", c), ("full", f)):
            ms = "-" if r["member_ms_per_row"] is None else f"{r['member_ms_per_row']:.3f}"
            each = ", ".join(f"{m} {v:.3f}" for m, v in (r["members_ms_per_row"] or {}).items())
            print(
                f"| {name} | {r['rows_per_s']:.1f} | {r['end_to_end_rows_per_s']:.1f} | {ms} | "
                f"{each or '-'} | {r['large_s']:.1f} | {r['small_s']:.1f} |"
            )
        off["rows_per_s_ratio"] = c["rows_per_s"] / f["rows_per_s"]
        print(f"\ncascade / full rows/s: **{off['rows_per_s_ratio']:.2f}x** (target >= 1.8x)")
        if c["member_ms_per_row"] and f["member_ms_per_row"]:
            off["member_cost_ratio"] = c["member_ms_per_row"] / f["member_ms_per_row"]
            print(f"cascade / full member ms/row: {off['member_cost_ratio']:.2f}x")
    if "online" in results:
        on = results["online"]
        print("\nonline, one text per request, colocated app\n")
        print(
            "| config | p50 ms (1 client) | p99 ms | req/s (16 clients) | statuses (16 clients) |"
        )
        print("|---|---|---|---|---|")
        for name, r in on.items():
            print(
                f"| {name} | {r['c1']['p50_ms']:.1f} | {r['c1']['p99_ms']:.1f} | "
                f"{r['c16']['rps']:.1f} | {r['c16']['statuses']} |"
            )
        on["p50_ratio"] = on["cascade"]["c1"]["p50_ms"] / on["full"]["c1"]["p50_ms"]
        on["rps_ratio"] = on["cascade"]["c16"]["rps"] / on["full"]["c16"]["rps"]
        print(
            f"\ncascade / full: p50 {on['p50_ratio']:.2f}x, req/s at 16 clients "
            f"{on['rps_ratio']:.2f}x"
        )
    print(f"ray start-up: {results['ray_start_s']:.1f}s (not in the figures)")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
