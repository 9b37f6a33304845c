"""How fast a 1 MB body of 500,000 items is refused, and whether a normal request sent
at the same time waits for it.

    python bench/body_limit.py                 # 20 runs against /v1/predict
    python bench/body_limit.py --route v2      # the same body shape on /v2/models/…/infer

Starts a local Ray and ``ray-ensemble``'s Serve app (tiny K=3 members, the default
``serve`` limits: a 1 MB body, 64 inputs), then, ``--runs`` times, posts
``{"inputs": [0, 0, …]}`` (500,000 items, just under 1 MB) and, at the same moment from
another thread, a normal one-text request. Prints the refusal's time (p50 / max, the
client's view: sending 1 MB over loopback included) with its status and error type, and
the normal request's latency beside it and alone.
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

ITEMS = 500_000


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bad_body(route: str) -> bytes:
    items = b",".join([b"0"] * ITEMS)
    if route == "v2":
        return (
            b'{"inputs": [{"name": "text", "shape": [%d], "datatype": "BYTES", "data": [%s]}]}'
            % (ITEMS, items)
        )
    return b'{"inputs": [' + items + b"]}"


def timed_post(session, url: str, body: bytes) -> tuple[float, int, str]:
    start = time.perf_counter()
    r = session.post(url, data=body, headers={"content-type": "application/json"}, timeout=60)
    took = (time.perf_counter() - start) * 1000
    try:
        kind = r.json().get("type", "") if r.status_code != 200 else ""
    except ValueError:
        kind = "(not JSON)"
    return took, r.status_code, kind


def summary(values: list[float]) -> str:
    return f"p50 {statistics.median(values):.1f} ms, max {max(values):.1f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--route", choices=("predict", "v2"), default="predict")
    parser.add_argument(
        "--workdir", default=os.path.join(tempfile.gettempdir(), "ray-ensemble-body-limit")
    )
    parser.add_argument("--json", default=None, help="write the figures here")
    args = parser.parse_args()

    import ray
    import requests
    from ray import serve

    from jobs.example import build_classifier
    from pipelines.config import config_from_dict
    from pipelines.online import build_app
    from pipelines.plan import plan_ensemble

    work = Path(args.workdir)
    members = []
    for i, labels in enumerate(
        [("negative", "positive"), ("POSITIVE", "NEGATIVE"), ("negative", "positive")]
    ):
        path = work / f"m{i}"
        if not (path / "config.json").exists():
            build_classifier(path, id2label=dict(enumerate(labels)), seed=10 + i)
        members.append({"name": f"m{i}", "model": str(path)})
    cfg = config_from_dict(
        {"name": "bench", "labels": ["negative", "positive"], "members": members},
        base_dir=ROOT,
    )
    body = bad_body(args.route)
    assert len(body) <= cfg.serve.max_body_bytes, len(body)

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(plan_ensemble(cfg)), name="bench", route_prefix="/")
    base = f"http://127.0.0.1:{port}"
    bad_url = base + ("/v2/models/bench/infer" if args.route == "v2" else "/v1/predict")
    good = json.dumps({"inputs": ["a fine film with a dull plot"]}).encode()
    good_url = base + "/v1/predict"

    bad_session, good_session = requests.Session(), requests.Session()
    for _ in range(5):  # warm-up: connections, the members' first passes
        timed_post(good_session, good_url, good)
        timed_post(bad_session, bad_url, body)
    alone = [timed_post(good_session, good_url, good)[0] for _ in range(args.runs)]

    refusals: list[float] = []
    beside: list[float] = []
    answers: set[tuple[int, str]] = set()
    for _ in range(args.runs):
        gate = threading.Barrier(2)
        out: dict[str, tuple[float, int, str]] = {}

        def bad(gate: threading.Barrier, out: dict) -> None:
            gate.wait()
            out["bad"] = timed_post(bad_session, bad_url, body)

        worker = threading.Thread(target=bad, args=(gate, out))
        worker.start()
        gate.wait()
        time.sleep(0.001)  # the big body is on its way first
        took, status, _ = timed_post(good_session, good_url, good)
        worker.join()
        assert status == 200, status
        beside.append(took)
        refusals.append(out["bad"][0])
        answers.add(out["bad"][1:])
    serve.delete("bench")
    serve.shutdown()
    ray.shutdown()

    print(f"\n{os.cpu_count()} CPUs; {len(body):,} bytes, {ITEMS:,} items, to {bad_url}")
    print(f"refused with {sorted(answers)}: {summary(refusals)} over {args.runs} runs")
    print(f"a normal request sent meanwhile: {summary(beside)}")
    print(f"a normal request alone:          {summary(alone)}")
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "cpus": os.cpu_count(),
                    "bytes": len(body),
                    "answers": sorted(answers),
                    "refusal_ms": refusals,
                    "beside_ms": beside,
                    "alone_ms": alone,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
