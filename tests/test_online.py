"""The Serve endpoint over HTTP on loopback: parity with offline, errors, health, load."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests

from jobs.example import make_texts
from pipelines.config import config_from_dict
from pipelines.offline import score
from pipelines.plan import plan_ensemble
from tests.oracle import plain_logits

LABELS = ["negative", "positive"]
LIMITS = {
    "max_inputs": 8,
    "max_body_bytes": 4096,
    "max_text_chars": 500,
    "max_ongoing_requests": 2,
    "max_queued_requests": 2,
    "max_batch_size": 4,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def members_for(models):
    return [
        {"name": "alpha", "model": str(models["alpha"]), "weight": 2.0},
        {"name": "beta", "model": str(models["beta"]), "temperature": 1.5},
        {
            "name": "gamma",
            "model": str(models["gamma"]),
            "label_map": {"LABEL_0": "negative", "LABEL_1": "positive"},
        },
    ]


@pytest.fixture(scope="module")
def served(ray_cluster, models, tmp_path_factory):
    from ray import serve

    from pipelines.online import build_app

    tmp = tmp_path_factory.mktemp("online")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = config_from_dict(
        {"name": "t", "labels": LABELS, "members": members_for(models), "serve": LIMITS},
        base_dir=tmp,
    )
    plan = plan_ensemble(cfg)
    # The offline side of the parity check runs first: on 2 CPUs the served members
    # would leave no room for the pipeline's actors.
    texts = make_texts(20, seed=21, max_words=40)
    src = tmp / "parity.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    score(plan, src, tmp / "parity-out")
    offline = pq.read_table(sorted((tmp / "parity-out").glob("*.parquet"))).to_pylist()
    serve.run(build_app(plan), name="t", route_prefix="/")
    yield {
        "url": f"http://127.0.0.1:{port}",
        "plan": plan,
        "tmp": tmp,
        "texts": texts,
        "offline": offline,
    }
    serve.delete("t")
    serve.shutdown()


def post(url, body, **kw):
    data = body if isinstance(body, (bytes, str)) else json.dumps(body)
    return requests.post(
        url + "/v1/predict",
        data=data,
        headers={"content-type": "application/json"},
        timeout=60,
        **kw,
    )


def test_online_equals_offline(served):
    texts, offline = served["texts"], served["offline"]
    online = []
    for i in range(0, len(texts), 8):
        r = post(served["url"], {"inputs": texts[i : i + 8]})
        assert r.status_code == 200, r.text
        online += r.json()["predictions"]
    assert len(online) == len(offline) == len(texts)
    for on, off in zip(online, offline, strict=True):
        assert on["label"] == off["label"]
        np.testing.assert_allclose([on["probs"][lab] for lab in LABELS], off["probs"], atol=1e-5)
        assert on["agreement"] == pytest.approx(off["agreement"], abs=1e-6)
        assert on["entropy"] == pytest.approx(off["entropy"], abs=1e-5)
        for name in ("alpha", "beta", "gamma"):
            np.testing.assert_allclose(
                [on["members"][name]["probs"][lab] for lab in LABELS],
                off[f"probs__{name}"],
                atol=1e-5,
            )


def test_text_pairs_match_plain_transformers(served, models):
    r = post(
        served["url"], {"inputs": [{"text": "a good film", "text_pair": "the plot"}, "a good film"]}
    )
    assert r.status_code == 200, r.text
    alpha = r.json()["predictions"]
    z = plain_logits(models["alpha"], ["a good film"], pairs=["the plot"])[0]
    p = np.exp(z) / np.exp(z).sum()
    np.testing.assert_allclose(
        [alpha[0]["members"]["alpha"]["probs"][lab] for lab in LABELS], p, atol=1e-5
    )
    assert alpha[0]["members"]["alpha"]["probs"] != alpha[1]["members"]["alpha"]["probs"]


@pytest.mark.parametrize(
    ("body", "status", "kind", "needle"),
    [
        (b"{not json", 422, "invalid_json", "not valid JSON"),
        ({"inputs": "a text"}, 422, "invalid_input", "inputs"),
        ({"inputs": []}, 422, "invalid_input", "at least one"),
        ({"inputs": ["ok", 5]}, 422, "invalid_input", "inputs[1]"),
        ({"inputs": ["ok", "  "]}, 422, "invalid_input", "inputs[1]: text is empty"),
        ({"inputs": [{"text": "a", "extra": 1}]}, 422, "invalid_input", "extra"),
        ({"inputs": [{"text_pair": "a"}]}, 422, "invalid_input", "text"),
        ({"texts": ["a"]}, 422, "invalid_input", "inputs"),
        ({"inputs": ["a"] * 9}, 413, "too_many_inputs", "limit is 8"),
        ({"inputs": ["a " * 300]}, 413, "text_too_long", "inputs[0]: text has 600 characters"),
        ({"inputs": ["a"] * 3, "pad": "x" * 5000}, 413, "body_too_large", "limit is 4096"),
        # Python's json.loads reads "\ud800" as a lone surrogate; no tokenizer takes it.
        (rb'{"inputs": ["fine", "bad \ud800 text"]}', 422, "invalid_input", "inputs[1]: text"),
        (rb'{"inputs": [{"text": "a", "x\ud800": 1}]}', 422, "invalid_input", "lone surrogate"),
        # Deeper than json.loads recurses, within the 4 KiB body limit (the serve command
        # test sends 200,000 levels under the default limit).
        (b"[" * 2_000 + b"]" * 2_000, 422, "invalid_json", "nested too deeply"),
    ],
    ids=lambda v: v if isinstance(v, (int, str)) and len(str(v)) < 40 else None,
)
def test_errors_are_json_with_the_right_status(served, body, status, kind, needle):
    r = post(served["url"], body)
    assert r.status_code == status, r.text
    payload = r.json()
    assert payload["type"] == kind and needle in payload["error"], payload


def test_a_text_no_tokenizer_takes_fails_only_its_own_request(served):
    """Requests sent together share batches; the one with a lone surrogate gets its 422,
    the others their normal answers."""
    texts = make_texts(12, seed=8, max_words=20)
    bodies = [json.dumps({"inputs": [t]}).encode() for t in texts]
    bodies[5] = b'{"inputs": ["a lone \\udc80 surrogate"]}'
    # Four at a time: the endpoint's limits admit two in work and two waiting.
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda b: post(served["url"], b), bodies))
    for i, r in enumerate(answers):
        if i == 5:
            assert r.status_code == 422, r.text
            assert r.json()["type"] == "invalid_input"
            assert "U+DC80" in r.json()["error"] and "inputs[0]" in r.json()["error"]
        else:
            assert r.status_code == 200, r.text
    solo = post(served["url"], {"inputs": [texts[0]]}).json()["predictions"][0]
    assert answers[0].json()["predictions"][0]["probs"] == pytest.approx(solo["probs"], abs=1e-5)


def test_ensemble_description_and_docs(served):
    answer = requests.get(served["url"] + "/v1/ensemble", timeout=30)
    info = answer.json()
    assert info["labels"] == LABELS and info["combine"] == "weighted_mean"
    assert [m["name"] for m in info["members"]] == ["alpha", "beta", "gamma"]
    assert info["members"][1]["temperature"] == 1.5
    # Models by name: the local folders' own names, and no path on the server.
    members = served["plan"].config.members
    assert [m["model"] for m in info["members"]] == [Path(m.model).name for m in members]
    assert [m["revision"] for m in info["members"]] == [None, None, None]  # not hub ids
    for m in members:
        assert Path(m.model).is_absolute()
        assert str(Path(m.model).parent) not in answer.text
    assert not any(m["model"].startswith("/") for m in info["members"])
    assert requests.get(served["url"] + "/docs", timeout=30).status_code == 200
    spec = requests.get(served["url"] + "/openapi.json", timeout=30).json()
    assert "/v1/predict" in spec["paths"] and "/healthz" in spec["paths"]
    assert requests.get(served["url"] + "/healthz", timeout=30).status_code == 200


def test_32_concurrent_clients_get_200_or_503(served):
    texts = make_texts(32, seed=5, max_words=60)

    def call(i):
        r = post(served["url"], {"inputs": [texts[i], texts[(i + 1) % 32]]})
        if r.status_code == 503:
            assert r.headers.get("content-type") == "application/json", r.text
            assert r.json()["type"] in ("overloaded", "timeout")
        return r.status_code

    with ThreadPoolExecutor(32) as pool:
        statuses = list(pool.map(call, range(32)))
    assert set(statuses) <= {200, 503}, statuses
    assert 200 in statuses
    # The endpoint recovers once the burst is over.
    assert post(served["url"], {"inputs": ["after the burst"]}).status_code == 200


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    out, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in out:
                out.add(child)
                todo.append(child)
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def test_serve_command_answers_and_stops_cleanly_on_sigterm(tmp_path):
    """`ray-ensemble serve` as a user runs it: its own Ray, 127.0.0.1, SIGTERM ends it all."""
    import os
    import signal
    import subprocess
    import sys

    from jobs.example import write_example

    root = Path(__file__).resolve().parents[1]
    write_example(tmp_path / "examples")
    import shutil

    shutil.copytree(root / "configs", tmp_path / "configs")
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "serve",
            "configs/example.yaml",
            "--port",
            str(port),
            "--num-cpus",
            "2",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONPATH": str(root)},
    )
    try:
        deadline = time.time() + 180
        healthy = False
        early = []  # answers before the members were ready
        while time.time() < deadline and proc.poll() is None:
            try:
                r = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=30)
                healthy = r.status_code == 200
                if not healthy:
                    early.append(r)
            except (requests.ConnectionError, requests.Timeout):
                pass
            if healthy:
                break
            time.sleep(1)
        assert healthy, proc.stderr.read() if proc.poll() is not None else "never healthy"
        for r in early:  # before ready: a 503 (ours, JSON) or the proxy's 404/503 before routes
            assert r.status_code in (404, 503), r.text
            if r.headers.get("content-type") == "application/json":
                assert r.json()["type"] == "not_ready"
        r = requests.post(
            f"http://127.0.0.1:{port}/v1/predict", json={"inputs": ["a fine film"]}, timeout=30
        )
        assert r.status_code == 200 and r.json()["predictions"][0]["label"] in LABELS
        deep = requests.post(
            f"http://127.0.0.1:{port}/v1/predict",
            data=b'{"inputs": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
            headers={"content-type": "application/json"},
            timeout=30,
        )
        assert deep.status_code == 422 and deep.json()["type"] == "invalid_json", deep.text
        started = _descendants(proc.pid)
        assert started, "the serve command started no Ray processes?"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()[-3000:]
        deadline = time.time() + 30
        while time.time() < deadline and any(_alive(p) for p in started):
            time.sleep(0.5)
        assert not [p for p in started if _alive(p)], "Ray processes left behind"
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def per_member(served, models):
    """The same ensemble with every member in a deployment of its own, beside the
    colocated app (small CPU shares, so both fit on 2 CPUs)."""
    from ray import serve

    from pipelines.online import build_app

    members = [{**m, "num_cpus": 0.1} for m in members_for(models)]
    limits = {**LIMITS, "max_ongoing_requests": 8, "max_queued_requests": 8}
    cfg = config_from_dict(
        {"name": "pm", "labels": LABELS, "members": members, "serve": limits},
        base_dir=served["tmp"],
    )
    serve.run(build_app(plan_ensemble(cfg), colocate=False), name="pm", route_prefix="/pm")
    yield served["url"] + "/pm"
    serve.delete("pm")


def test_per_member_layout_equals_offline(served, per_member):
    texts, offline = served["texts"], served["offline"]
    online = []
    for i in range(0, len(texts), 8):
        r = post(per_member, {"inputs": texts[i : i + 8]})
        assert r.status_code == 200, r.text
        online += r.json()["predictions"]
    assert len(online) == len(texts)
    for on, off in zip(online, offline, strict=True):
        assert on["label"] == off["label"]
        np.testing.assert_allclose([on["probs"][lab] for lab in LABELS], off["probs"], atol=1e-5)
        for name in ("alpha", "beta", "gamma"):
            np.testing.assert_allclose(
                [on["members"][name]["probs"][lab] for lab in LABELS],
                off[f"probs__{name}"],
                atol=1e-5,
            )


def replica_pids(app: str, deployment: str) -> list[int]:
    import psutil

    return [
        p.pid
        for p in psutil.process_iter(["cmdline"])
        if (p.info["cmdline"] or [""])[0].startswith(f"ray::ServeReplica:{app}:{deployment}")
    ]


def kill_replica_under_load(
    url: str, app: str, deployment: str, texts: list[str]
) -> tuple[list[tuple[float, float, requests.Response]], float, float | None]:
    """kill -9 the one replica of ``app``'s ``deployment`` while four clients post pairs
    of ``texts`` in a loop, until Serve has started its replacement. Returns every call
    (start, end, response), when the kill was, and when a new replica's process was
    first seen (None: not within two minutes)."""
    import os
    import signal
    import threading

    calls: list[tuple[float, float, requests.Response]] = []
    stop = threading.Event()

    def client(k: int) -> None:
        while not stop.is_set():
            start = time.monotonic()
            r = post(url, {"inputs": [texts[k % len(texts)], texts[(k + 3) % len(texts)]]})
            calls.append((start, time.monotonic(), r))

    (victim,) = replica_pids(app, deployment)
    clients = [threading.Thread(target=client, args=(k,)) for k in range(4)]
    for t in clients:
        t.start()
    deadline = time.time() + 60
    while len(calls) < 8 and time.time() < deadline:
        time.sleep(0.05)
    killed_at = time.monotonic()
    os.kill(victim, signal.SIGKILL)
    replaced_at = None
    deadline = time.time() + 120
    while time.time() < deadline and replaced_at is None:
        time.sleep(0.1)
        if [p for p in replica_pids(app, deployment) if p != victim]:
            replaced_at = time.monotonic()
    stop.set()
    for t in clients:
        t.join(timeout=120)
    return calls, killed_at, replaced_at


def test_member_replica_killed_under_load_loses_no_request(per_member):
    """kill -9 a member's replica while requests are in flight: every request gets a 200
    (Serve retries a call whose replica died on another one) or a JSON 503, never a
    500, and the endpoint answers by itself once Serve has replaced the replica."""
    texts = make_texts(16, seed=9, max_words=60)
    calls, killed_at, replaced_at = kill_replica_under_load(per_member, "pm", "host_beta", texts)
    assert replaced_at is not None, "Serve did not replace the killed replica"
    statuses = [r.status_code for *_, r in calls]
    assert set(statuses) <= {200, 503}, statuses
    assert all(r.headers["content-type"] == "application/json" for *_, r in calls)
    refused = [r.json()["type"] for *_, r in calls if r.status_code != 200]
    assert set(refused) <= {"unavailable", "overloaded", "timeout"}, refused
    spanning = [r for start, end, r in calls if start < killed_at < end]
    assert spanning, "no request was in flight when the replica was killed"
    after = post(per_member, {"inputs": ["after the kill"]})
    assert after.status_code == 200, after.text


def test_serve_replicas_scale_the_whole_ensemble_replica(ray_cluster, models, tmp_path):
    """`serve.replicas: {min, max}` is the autoscaling range of the one deployment that
    holds the members; a member with `own_host` gets a deployment (and range) of its own."""
    from pipelines.online import build_app

    members = members_for(models)
    members[2] = {**members[2], "own_host": True, "replicas": {"min": 1, "max": 2}}
    cfg = config_from_dict(
        {
            "name": "r",
            "labels": LABELS,
            "members": members,
            "serve": {"replicas": {"min": 1, "max": 3}},
        },
        base_dir=tmp_path,
    )
    app = build_app(plan_ensemble(cfg))
    ingress = app._bound_deployment
    auto = ingress._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas) == (1, 3)
    assert ingress.init_kwargs["local"] == ("alpha", "beta")
    ((names, handle),) = ingress.init_kwargs["remote"]
    assert names == ("gamma",)
    own = handle._bound_deployment._deployment_config.autoscaling_config
    assert (own.min_replicas, own.max_replicas) == (1, 2)


def test_serve_config_app_builder_plans_the_serve_command_layout(ray_cluster, models, tmp_path):
    """`serve deploy` imports app_builder with the config path: it must plan the same
    deployments, members and replica ranges as `ray-ensemble serve`."""
    import yaml

    from pipelines.config import load_config
    from pipelines.online import app_builder, build_app

    members = members_for(models)
    members[1] = {**members[1], "own_host": True}
    path = tmp_path / "ens.yaml"
    doc = {"name": "s", "labels": LABELS, "members": members, "serve": {"replicas": 2}}
    path.write_text(yaml.safe_dump(doc))

    def layout(app):
        top = app._bound_deployment
        kw = top.init_kwargs
        return (
            top.name,
            top._deployment_config.num_replicas,
            kw["local"],
            [
                (
                    names,
                    h._bound_deployment.name,
                    h._bound_deployment._deployment_config.num_replicas,
                )
                for names, h in kw["remote"]
            ],
        )

    ours = layout(build_app(plan_ensemble(load_config(path))))
    assert layout(app_builder({"config": str(path)})) == ours
    assert ours == ("ensemble", 2, ("alpha", "gamma"), [(("beta",), "host_beta", 1)])


def test_chunks_slices_and_concatenation_keep_rows_in_order():
    """A request's rows are cut into chunks (at most max_batch_size, pairs apart), scored
    in shared batches, sliced out and put back together in their order."""
    from actors.tasks.base import Scored
    from pipelines.online.deployments import chunked

    texts = [f"t{i}" for i in range(7)]
    pairs = [None, None, "p2", "p3", "p4", None, "p6"]
    chunks = chunked(texts, pairs, 2)
    assert chunks == [
        (["t0", "t1"], None),
        (["t2", "t3"], ["p2", "p3"]),
        (["t4"], ["p4"]),
        (["t5"], None),
        (["t6"], ["p6"]),
    ]
    assert chunked(texts, None, 3) == [(texts[:3], None), (texts[3:6], None), (texts[6:], None)]
    n = 7
    scored = Scored(
        columns={"score": np.arange(n, dtype=float), "probs": np.arange(2 * n).reshape(n, 2)},
        members={"a": {"probs": -np.arange(2 * n).reshape(n, 2)}},
        valid=np.arange(n) != 3,
        error=[None, None, None, "bad", None, None, None],
    )
    parts = [scored.rows_between(a, b) for a, b in ((0, 2), (2, 5), (5, 7))]
    assert [p.rows for p in parts] == [2, 3, 2] and parts[1].error == [None, "bad", None]
    whole = Scored.concat(parts)
    assert whole.error == scored.error and whole.valid.tolist() == scored.valid.tolist()
    np.testing.assert_array_equal(whole.columns["probs"], scored.columns["probs"])
    np.testing.assert_array_equal(whole.members["a"]["probs"], scored.members["a"]["probs"])
