"""The standard protocols with their real clients against the served app: tritonclient
(Open Inference Protocol, binary and JSON) and the openai client (embeddings) get the
answers ``/v1/predict`` gives, to 1e-6."""

from __future__ import annotations

import json

import numpy as np
import pytest
import requests

from jobs.example import make_texts
from pipelines.config import config_from_dict
from pipelines.plan import plan_ensemble
from tests.test_online import LABELS, free_port, members_for

httpclient = pytest.importorskip("tritonclient.http")
openai = pytest.importorskip("openai")
from tritonclient.utils import InferenceServerException  # noqa: E402

TEXTS = make_texts(6, seed=31, max_words=30)
PAIRS = make_texts(6, seed=32, max_words=10)


@pytest.fixture(scope="module")
def served(ray_cluster, models, tmp_path_factory):
    """A classification ensemble at / and an embedding ensemble at /e, side by side on
    2 CPUs (small CPU shares), with the default limits (a 1 MB body)."""
    from ray import serve

    from pipelines.online import build_app

    tmp = tmp_path_factory.mktemp("protocols")
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    members = [{**m, "num_cpus": 0.3} for m in members_for(models)]
    cls = config_from_dict({"name": "cls", "labels": LABELS, "members": members}, base_dir=tmp)
    emb = config_from_dict(
        {
            "name": "emb",
            "task": "embedding",
            "members": [
                {"name": "enc", "model": str(models["encoder"]), "num_cpus": 0.3},
                {"name": "alpha", "model": str(models["alpha"]), "num_cpus": 0.3},
            ],
            "reducer": {"combine": "concat"},
        },
        base_dir=tmp,
    )
    serve.run(build_app(plan_ensemble(cls)), name="cls", route_prefix="/")
    serve.run(build_app(plan_ensemble(emb)), name="emb", route_prefix="/e")
    url = f"127.0.0.1:{port}"
    yield {"cls": url, "emb": url + "/e"}
    serve.delete("emb")
    serve.delete("cls")
    serve.shutdown()


def predict(base, inputs):
    r = requests.post(f"http://{base}/v1/predict", json={"inputs": inputs}, timeout=60)
    assert r.status_code == 200, r.text
    return r.json()["predictions"]


def text_input(name, values, binary, shape=None):
    arr = np.array(values, dtype=object)
    if shape is not None:
        arr = arr.reshape(shape)
    tensor = httpclient.InferInput(name, list(arr.shape), "BYTES")
    tensor.set_data_from_numpy(arr, binary_data=binary)
    return tensor


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("pairs", [False, True], ids=["texts", "pairs"])
def test_tritonclient_classification_equals_predict(served, binary, pairs):
    ours = predict(
        served["cls"],
        [{"text": t, "text_pair": p} for t, p in zip(TEXTS, PAIRS, strict=True)]
        if pairs
        else TEXTS,
    )
    client = httpclient.InferenceServerClient(served["cls"])
    shape = (len(TEXTS), 1) if binary else None  # [n, 1] one way, [n] the other
    inputs = [text_input("text", TEXTS, binary, shape)]
    if pairs:
        inputs.append(text_input("text_pair", PAIRS, binary, shape))
    result = client.infer("cls", inputs)  # no outputs named: all of them, in binary
    labels = [v.decode() for v in result.as_numpy("label")]
    assert labels == [p["label"] for p in ours]
    probs = result.as_numpy("probs")
    assert probs.shape == (len(TEXTS), len(LABELS)) and probs.dtype == np.float32
    np.testing.assert_allclose(
        probs, [[p["probs"][lab] for lab in LABELS] for p in ours], atol=1e-6
    )
    np.testing.assert_allclose(result.as_numpy("score"), [p["score"] for p in ours], atol=1e-6)
    np.testing.assert_allclose(
        result.as_numpy("agreement"), [p["agreement"] for p in ours], atol=1e-6
    )


def test_tritonclient_requested_outputs_filter_the_answer(served):
    client = httpclient.InferenceServerClient(served["cls"])
    result = client.infer(
        "cls",
        [text_input("text", TEXTS[:2], binary=True)],
        outputs=[
            httpclient.InferRequestedOutput("probs", binary_data=False),
            httpclient.InferRequestedOutput("label", binary_data=True),
        ],
        request_id="req-7",
    )
    response = result.get_response()
    assert [o["name"] for o in response["outputs"]] == ["probs", "label"]
    assert response["id"] == "req-7"
    assert "data" in response["outputs"][0] and "data" not in response["outputs"][1]
    ours = predict(served["cls"], TEXTS[:2])
    assert [v.decode() for v in result.as_numpy("label")] == [p["label"] for p in ours]
    assert result.as_numpy("score") is None


def test_v2_health_metadata_and_errors(served):
    client = httpclient.InferenceServerClient(served["cls"])
    assert client.is_server_live() and client.is_server_ready()
    assert client.is_model_ready("cls") and not client.is_model_ready("nope")
    assert "binary_tensor_data" in client.get_server_metadata()["extensions"]
    meta = client.get_model_metadata("cls")
    assert meta["parameters"]["labels"] == LABELS
    assert {o["name"]: o["shape"] for o in meta["outputs"]} == {
        "label": [-1],
        "score": [-1],
        "probs": [-1, len(LABELS)],
        "agreement": [-1],
    }
    assert client.get_model_metadata("cls", model_version="1") == meta
    assert client.is_model_ready("cls", model_version="1")
    assert not client.is_model_ready("cls", model_version="2")
    versioned = client.infer("cls", [text_input("text", ["a"], True)], model_version="1")
    assert versioned.as_numpy("label")[0].decode() in LABELS
    with pytest.raises(InferenceServerException) as info:
        client.infer("nope", [text_input("text", ["a"], binary=True)])
    assert info.value.status() == "404" and "'cls'" in info.value.message()
    with pytest.raises(InferenceServerException) as info:
        client.infer("cls", [text_input("text", ["  "], binary=True)])
    assert info.value.status() == "422" and "text[0] is empty" in info.value.message()
    r = requests.post(f"http://{served['cls']}/v1/embeddings", json={"model": "cls", "input": "a"})
    assert r.status_code == 400 and r.json()["type"] == "not_supported", r.text


def test_tritonclient_and_openai_embeddings_equal_predict(served):
    ours = np.array([p["embedding"] for p in predict(served["emb"], TEXTS)])
    assert ours.shape[0] == len(TEXTS)
    client = httpclient.InferenceServerClient(served["emb"])
    for binary in (True, False):
        result = client.infer(
            "emb",
            [text_input("text", TEXTS, binary)],
            outputs=[httpclient.InferRequestedOutput("embedding", binary_data=binary)],
        )
        np.testing.assert_allclose(result.as_numpy("embedding"), ours, atol=1e-6)
    meta = client.get_model_metadata("emb")
    assert meta["outputs"] == [
        {"name": "embedding", "datatype": "FP32", "shape": [-1, ours.shape[1]]}
    ]
    oa = openai.OpenAI(base_url=f"http://{served['emb']}/v1", api_key="x", max_retries=0)
    for fmt in ("base64", "float"):  # the client asks for base64 unless told
        kw = {} if fmt == "base64" else {"encoding_format": "float"}
        answer = oa.embeddings.create(model="emb", input=TEXTS, **kw)
        assert [d.index for d in answer.data] == list(range(len(TEXTS)))
        np.testing.assert_allclose([d.embedding for d in answer.data], ours, atol=1e-6)
        assert answer.model == "emb" and answer.usage.prompt_tokens > len(TEXTS)
    one = oa.embeddings.create(model="emb", input=TEXTS[0], encoding_format="float")
    np.testing.assert_allclose(one.data[0].embedding, ours[0], atol=1e-6)
    with pytest.raises(openai.NotFoundError):
        oa.embeddings.create(model="other", input="a")
    with pytest.raises(openai.UnprocessableEntityError):
        oa.embeddings.create(model="emb", input="a", dimensions=3)


@pytest.mark.parametrize("route", ["/v1/predict", "/v2/models/cls/infer", "/v1/embeddings"])
def test_a_body_of_500000_items_is_refused_as_too_many_inputs(served, route):
    """1 MB of JSON, 500,000 items: refused on the count (bench/body_limit.py times it)."""
    items = b",".join([b"0"] * 500_000)
    body = {
        "/v1/predict": b'{"inputs": [' + items + b"]}",
        "/v2/models/cls/infer": b'{"inputs": [{"name": "text", "shape": [500000], '
        b'"datatype": "BYTES", "data": [' + items + b"]}]}",
        "/v1/embeddings": b'{"model": "emb", "input": [' + items + b"]}",
    }[route]
    assert len(body) < 1_048_576
    base = served["emb"] if route == "/v1/embeddings" else served["cls"]
    r = requests.post(
        f"http://{base}{route}", data=body, headers={"content-type": "application/json"}, timeout=60
    )
    assert r.status_code == 413, r.text
    assert r.json()["type"] == "too_many_inputs"
    json.loads(r.text)  # a JSON body, not the proxy's plain text
