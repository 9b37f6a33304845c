"""Online latency and throughput of `ray-ensemble serve`, side by side in one run.

    python bench/online_latency.py

A K=3 ensemble of small BERTs (2 layers, width 128, built locally) behind the real Serve
app on 127.0.0.1. Clients are threads of this process sending one text per request:

- latency p50/p99 and requests/s at 1 and at 16 concurrent clients;
- overhead: p50 through HTTP at 1 client minus p50 of a direct in-process call of the
  same three members (tokenise, forward, reduce; one thread each, as in Serve);
- dynamic batching: requests/s at 16 clients with the configured `max_batch_size`
  against the same app redeployed with `max_batch_size: 1`.
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


def direct_p50(plan, texts: list[str], calls: int) -> float:
    """p50 of tokenise + forward for each member in turn, then the same reduce, in-process."""
    import pyarrow as pa

    from actors.member import MemberHost, member_output_column
    from pipelines.offline import reduce_batch

    hosts = [
        MemberHost(
            member=m, spec=s, task="classification", num_labels=2, text_column="text", threads=1
        )
        for m, s in zip(plan.config.members, plan.specs, strict=True)
    ]
    times = []
    for i in range(calls):
        text = [texts[i % len(texts)]]
        start = time.perf_counter()
        cols = {"error": pa.nulls(1, pa.string())}
        for h in hosts:
            out = h.infer(text)
            cols[member_output_column(h.member.name)] = pa.FixedSizeListArray.from_arrays(
                pa.array(out.reshape(-1)), out.shape[1]
            )
        reduce_batch(pa.table(cols), plan=plan).to_pylist()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=300, help="requests at 1 client")
    parser.add_argument("--requests-per-client", type=int, default=60, help="at 16 clients")
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-online")
    )
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import ray
    from ray import serve

    from jobs.example import build_classifier, make_texts
    from pipelines.config import config_from_dict
    from pipelines.offline import plan_ensemble
    from pipelines.online import build_app

    work = Path(args.workdir)
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
    texts = make_texts(500, seed=3, max_words=30)

    def plan_with(max_batch_size: int):
        cfg = config_from_dict(
            {
                "name": "bench",
                "labels": ["negative", "positive"],
                "members": members,
                "serve": {
                    "max_batch_size": max_batch_size,
                    "max_ongoing_requests": 64,
                    "max_queued_requests": 256,
                },
            },
            base_dir=ROOT,
        )
        return plan_ensemble(cfg)

    results: dict = {"cpus": os.cpu_count()}
    import torch

    torch.set_num_threads(1)
    plan = plan_with(32)
    results["direct_p50_ms"] = direct_p50(plan, texts, args.requests)
    print(f"direct in-process p50: {results['direct_p50_ms']:.2f} ms", flush=True)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/predict"
    for label, size in (("batched", 32), ("unbatched", 1)):
        serve.run(build_app(plan_with(size)), name="bench", route_prefix="/")
        load(url, texts, 4, 10)  # warm-up
        runs = {}
        if label == "batched":
            runs["c1"] = load(url, texts, 1, args.requests)
        runs["c16"] = load(url, texts, 16, args.requests_per_client)
        results[label] = runs
        print(label, json.dumps(runs), flush=True)
        serve.delete("bench")
    serve.shutdown()
    ray.shutdown()

    b, u = results["batched"], results["unbatched"]
    results["overhead_p50_ms"] = b["c1"]["p50_ms"] - results["direct_p50_ms"]
    results["batching_gain_c16"] = b["c16"]["rps"] / u["c16"]["rps"]
    print("\n| setting | clients | p50 ms | p99 ms | requests/s |\n|---|---|---|---|---|")
    for label, runs in (("max_batch_size 32", b), ("max_batch_size 1", u)):
        for r in runs.values():
            print(
                f"| {label} | {r['clients']} | {r['p50_ms']:.1f} | {r['p99_ms']:.1f} | {r['rps']:.1f} |"
            )
    print(
        f"\ndirect in-process p50: {results['direct_p50_ms']:.2f} ms; HTTP overhead at 1 client: "
        f"{results['overhead_p50_ms']:.2f} ms p50; dynamic batching gain at 16 clients: "
        f"{results['batching_gain_c16']:.2f}x"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
