"""Quorum online: answers from the members that are up, when a member host fails or is slow.

Per-member layout (every member in a deployment of its own): alpha and beta are tiny
transformers classifiers, slow7 and slow9 plain torch modules that sleep on purpose when
a text holds the token "7" (or "9"). ``min_members: 3`` of the 4.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import requests
import torch
from safetensors.torch import save_file

from jobs.example import make_texts
from pipelines.config import ConfigError, config_from_dict
from pipelines.plan import plan_ensemble
from tests.custom_models import Sleeper
from tests.test_online import free_port, kill_replica_under_load, post

LABELS = ["negative", "positive"]
WEIGHTS = {"alpha": 2.0, "beta": 1.0, "slow7": 1.0, "slow9": 0.5}
TIMEOUT_S = 5.0
SLEEP_S = 12.0


def _sleeper(folder, tokenizer, trigger: str, seed: int):
    folder.mkdir()
    (slow_id,) = tokenizer.convert_tokens_to_ids([trigger])
    kwargs = {
        "vocab_size": len(tokenizer),
        "dim": 8,
        "num_labels": 2,
        "slow_id": slow_id,
        "sleep_s": SLEEP_S,
    }
    torch.manual_seed(seed)
    module = Sleeper(**kwargs)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 1.0)
    save_file(module.state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(kwargs))
    return folder


def quorum_members(models, root):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(models["alpha"])
    members = [
        {"name": "alpha", "model": str(models["alpha"])},
        {"name": "beta", "model": str(models["beta"])},
    ]
    for name, trigger, seed in (("slow7", "7", 11), ("slow9", "9", 12)):
        members.append(
            {
                "name": name,
                "backend": "torch",
                "module": "tests.custom_models:Sleeper",
                "model": str(_sleeper(root / name, tok, trigger, seed)),
                "tokenizer": str(models["alpha"]),
            }
        )
    return [{**m, "weight": WEIGHTS[m["name"]], "num_cpus": 0.1} for m in members]


@pytest.fixture(scope="module")
def quorum(ray_cluster, models, tmp_path_factory):
    from ray import serve

    from pipelines.online import build_app

    root = tmp_path_factory.mktemp("quorum")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = config_from_dict(
        {
            "name": "q",
            "labels": LABELS,
            "members": quorum_members(models, root),
            "serve": {
                "max_batch_size": 4,
                "max_ongoing_requests": 8,
                "max_queued_requests": 8,
                "member_timeout_s": TIMEOUT_S,
                "min_members": 3,
            },
        },
        base_dir=root,
    )
    serve.run(build_app(plan_ensemble(cfg), colocate=False), name="q", route_prefix="/q")
    yield f"http://127.0.0.1:{port}/q"
    serve.delete("q")
    serve.shutdown()


def check_partial(prediction: dict, missing: list[str]) -> None:
    """A partial answer names its missing members, leaves them out of ``members``, and
    is the weighted mean of the members that answered."""
    assert prediction.get("members_missing", []) == missing, prediction
    present = [m for m in WEIGHTS if m not in missing]
    assert sorted(prediction["members"]) == sorted(present)
    w = np.array([WEIGHTS[m] for m in present])
    p = np.array([[prediction["members"][m]["probs"][lab] for lab in LABELS] for m in present])
    expected = (w[:, None] * p).sum(0) / w.sum()
    np.testing.assert_allclose([prediction["probs"][lab] for lab in LABELS], expected, atol=1e-5)
    assert prediction["label"] == LABELS[int(np.argmax(expected))]


def test_member_host_killed_under_load_every_request_answers(quorum):
    """kill -9 beta's host replica while four clients send requests: every request gets a
    200; those answered while beta was gone say so, and are made from the others."""
    texts = make_texts(16, seed=9, max_words=30)
    answered, killed_at, replaced_at = kill_replica_under_load(quorum, "q", "host_beta", texts)
    calls = [(start, end, r.status_code, r.json()) for start, end, r in answered]
    assert replaced_at is not None, "Serve did not replace the killed replica"
    assert [c for c in calls if c[2] != 200] == []
    partial = 0
    for start, end, _, body in calls:
        for prediction in body["predictions"]:
            check_partial(prediction, prediction.get("members_missing", []))
            assert prediction.get("members_missing", ["beta"]) == ["beta"]
            partial += "members_missing" in prediction
        # No beta replica lived from the kill until its replacement started.
        if killed_at < start and end < replaced_at:
            assert all(p.get("members_missing") == ["beta"] for p in body["predictions"])
    assert partial, "no answer was made without beta"
    # Once the new replica is up, answers are whole again.
    deadline = time.time() + 120
    while time.time() < deadline:
        body = post(quorum, {"inputs": ["after the kill"]}).json()
        if "members_missing" not in body["predictions"][0]:
            break
        time.sleep(1)
    check_partial(body["predictions"][0], [])


def test_a_slow_member_gives_partial_answers_not_503(quorum):
    r = post(quorum, {"inputs": ["a fine film 7", "a dull plot"]})
    assert r.status_code == 200, r.text
    for prediction in r.json()["predictions"]:
        check_partial(prediction, ["slow7"])


def test_the_v2_route_names_the_missing_members_of_a_partial_answer(quorum):
    """The Open Inference Protocol answer of a quorum ensemble has a members_missing
    output (a JSON list per row), declared in the model's metadata, and the same
    probabilities as /v1/predict's partial answer. (Before the test below the quorum,
    whose request keeps slow9 asleep past the next requests' timeout.)"""
    import tritonclient.http as httpclient

    texts = ["a fine film 7", "a dull plot", "plain words"]
    base = quorum.removeprefix("http://")
    meta = requests.get(f"{quorum}/v2/models/q", timeout=30).json()
    assert {"name": "members_missing", "datatype": "BYTES", "shape": [-1]} in meta["outputs"]
    client = httpclient.InferenceServerClient(base)
    tensor = httpclient.InferInput("text", [len(texts)], "BYTES")
    tensor.set_data_from_numpy(np.array(texts, dtype=object), binary_data=False)
    result = client.infer("q", [tensor])
    missing = [json.loads(v) for v in result.as_numpy("members_missing")]
    assert missing == [["slow7"], ["slow7"], ["slow7"]]
    ours = post(quorum, {"inputs": texts}).json()["predictions"]
    for prediction in ours:
        check_partial(prediction, ["slow7"])
    np.testing.assert_allclose(
        result.as_numpy("probs"), [[p["probs"][lab] for lab in LABELS] for p in ours], atol=1e-6
    )


def test_below_the_quorum_the_answer_is_a_503(quorum):
    r = post(quorum, {"inputs": ["7 and 9"]})
    assert r.status_code == 503, r.text
    assert r.json()["type"] == "unavailable"
    assert "min_members" in r.json()["error"]


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"serve": {"min_members": 4}}, "use at most 3"),
        ({"serve": {"min_members": 2}, "task": "embedding", "labels": None}, "every member"),
        ({"serve": {"member_timeout_s": 0}}, "member_timeout_s"),
    ],
)
def test_quorum_keys_are_checked(tmp_path, change, needle):
    members = [{"name": n, "model": "org/" + n} for n in ("a", "b", "c")]
    data = {"name": "x", "labels": LABELS, "members": members, **change}
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(data, base_dir=tmp_path)
