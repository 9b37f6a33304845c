"""The wire codecs without Serve: requests made by the real clients' own encoders
(tritonclient's, for the Open Inference Protocol's JSON and binary forms), answers read
back by tritonclient's own decoder, and the size limits checked before items are read."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest

from pipelines.online.http import parse_predict
from pipelines.online.protocols import (
    HEADER_LENGTH,
    ApiError,
    decode_bytes_tensor,
    embeddings_response,
    encode_bytes_tensor,
    encode_v2_response,
    items_over,
    parse_embeddings,
    parse_v2_infer,
    v2_model_metadata,
    v2_rows_over,
    v2_tensors,
)

httpclient = pytest.importorskip("tritonclient.http")

OUTPUTS = ("label", "score", "probs", "agreement")
LIMITS = {"max_inputs": 8, "max_text_chars": 50}
TEXTS = ["a fine film", "ünïcödé — ok 😀", "a dull plot"]


@dataclass(frozen=True)
class Field:
    """Stands in for actors.tasks.base.OutputField: what the codecs read of it."""

    name: str
    v2_datatype: str | None
    member: bool = False


FIELDS = (
    Field("label", "BYTES"),
    Field("score", "FP32"),
    Field("probs", "FP32"),
    Field("agreement", "FP32"),
    Field("entropy", None),
    Field("probs", "FP32", member=True),
)


def text_input(name, values, *, binary, shape=None):
    arr = np.array(values, dtype=object)
    if shape is not None:
        arr = arr.reshape(shape)
    tensor = httpclient.InferInput(name, list(arr.shape), "BYTES")
    tensor.set_data_from_numpy(arr, binary_data=binary)
    return tensor


def request(inputs, outputs=None, **kw):
    body, header = httpclient.InferenceServerClient.generate_request_body(
        inputs, outputs=outputs, **kw
    )
    return body, None if header is None else str(header)


def parse(body, header, **limits):
    return parse_v2_infer(body, header, outputs=OUTPUTS, **{**LIMITS, **limits})


def refused(call, *args, **kw) -> ApiError:
    with pytest.raises(ApiError) as info:
        call(*args, **kw)
    return info.value


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
@pytest.mark.parametrize("shape", [None, (3, 1)], ids=["[n]", "[n,1]"])
def test_tritonclient_requests_decode_to_the_texts(binary, shape):
    pairs = ["p1", "p2 ü", "p3"]
    body, header = request(
        [
            text_input("text", TEXTS, binary=binary, shape=shape),
            text_input("text_pair", pairs, binary=binary, shape=shape),
        ],
        request_id="r-1",
    )
    assert (header is not None) == binary
    req = parse(body, header)
    assert req.texts == TEXTS and req.pairs == pairs and req.id == "r-1"
    # No outputs named: tritonclient asks for every output in binary.
    assert req.outputs is None and req.binary == frozenset(OUTPUTS)


def test_requested_outputs_and_their_binary_flags():
    body, header = request(
        [text_input("text", TEXTS[:1], binary=True)],
        outputs=[
            httpclient.InferRequestedOutput("probs", binary_data=True),
            httpclient.InferRequestedOutput("label", binary_data=False),
        ],
    )
    req = parse(body, header)
    assert req.pairs is None
    assert req.outputs == ("probs", "label") and req.binary == frozenset({"probs"})


def scored_columns(n=3):
    probs = np.array([[0.2, 0.8], [0.6, 0.4], [0.5, 0.5]][:n])
    return {
        "label": np.array(["positive", "negative", "négatif"][:n], dtype=object),
        "score": probs.max(axis=1),
        "probs": probs,
        "agreement": np.array([1.0, 0.5, 2 / 3][:n]),
        "entropy": np.zeros(n),
    }


@pytest.mark.parametrize("binary", [frozenset(OUTPUTS), frozenset(), frozenset({"probs"})])
def test_responses_read_back_with_tritonclient(binary):
    columns = scored_columns()
    tensors = v2_tensors(columns, FIELDS)
    assert [t.name for t in tensors] == list(OUTPUTS)  # no entropy, no member field
    body, header = encode_v2_response(
        model_name="t", tensors=tensors, binary=binary, request_id="r-1"
    )
    assert (header is None) == (not binary)
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=header)
    assert result.get_response()["id"] == "r-1"
    assert result.get_response()["model_name"] == "t"
    labels = [v.decode() if isinstance(v, bytes) else v for v in result.as_numpy("label")]
    assert labels == list(columns["label"])
    probs = result.as_numpy("probs")
    assert probs.shape == (3, 2) and probs.dtype == np.float32
    np.testing.assert_allclose(probs, columns["probs"], atol=1e-7)
    np.testing.assert_allclose(result.as_numpy("agreement"), columns["agreement"], atol=1e-7)
    np.testing.assert_allclose(result.as_numpy("score"), columns["score"], atol=1e-7)


def test_requested_outputs_filter_the_answer():
    tensors = v2_tensors(scored_columns(), FIELDS, ("probs",))
    body, header = encode_v2_response(model_name="t", tensors=tensors)
    doc = json.loads(body)
    assert header is None and [o["name"] for o in doc["outputs"]] == ["probs"]
    assert doc["outputs"][0] == {
        "name": "probs",
        "datatype": "FP32",
        "shape": [3, 2],
        "data": np.float32([0.2, 0.8, 0.6, 0.4, 0.5, 0.5]).tolist(),
    }


def test_bytes_tensor_codec_matches_tritonclient():
    from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

    ours = encode_bytes_tensor(TEXTS)
    theirs = serialize_byte_tensor(np.array(TEXTS, dtype=object)).item()
    assert ours == theirs
    assert [v.decode() for v in deserialize_bytes_tensor(ours)] == TEXTS
    assert decode_bytes_tensor(ours, 3, "text") == TEXTS


@pytest.mark.parametrize(
    ("raw", "n", "needle"),
    [
        (encode_bytes_tensor(["ab"]), 2, "holds 1 elements, the shape says 2"),
        (encode_bytes_tensor(["ab", "c"]), 1, "bytes past its 1 elements"),
        (encode_bytes_tensor(["abc"])[:-1], 1, "runs past the binary data"),
        (b"\x02\x00\x00\x00\xff\xfe", 1, "text[0] is not valid UTF-8"),
    ],
)
def test_broken_binary_tensors_are_422(raw, n, needle):
    err = refused(decode_bytes_tensor, raw, n, "text")
    assert err.status == 422 and needle in err.message


@pytest.mark.parametrize(
    ("tensor", "what"),
    [
        ({"name": "text", "shape": [500_000], "datatype": "BYTES", "data": [0] * 10}, "text"),
        ({"name": "text", "shape": [1], "datatype": "BYTES", "data": [0] * 500_000}, "text"),
        # The name is not read yet when the data is.
        ({"data": [0] * 500_000, "datatype": "BYTES", "shape": [1], "name": "text"}, "inputs"),
    ],
    ids=["shape", "data", "data-first"],
)
def test_v2_rows_are_counted_before_the_data_is_read(tensor, what):
    """500,000 rows declared or sent: refused after reading at most 9 of them."""
    err = refused(parse, json.dumps({"inputs": [tensor]}).encode(), None)
    assert (err.status, err.kind) == (413, "too_many_inputs")
    assert f"{what}: more than 8 inputs, the limit is 8" in err.message


@pytest.mark.parametrize(
    ("header", "over"),
    [
        (b'{"inputs": [{"name": "text", "shape": [3], "data": ["a", "b", "c"]}]}', None),
        (b'{"inputs": [{"name": "text", "shape": [4]}]}', "text"),
        (b'{"id": "x", "inputs": [{"name": "t", "shape": [4]}, {"name": "p"}]}', "t"),
        (b'{"inputs": [{"name": "a"}, {"name": "text_pair", "data": [1, 2, 3, 4]}]}', "text_pair"),
        (b'{"inputs": [{"name": "text", "data": [[1], [2], [3], [4]]}]}', "text"),
        (b'{"inputs": [{"name": "text", "data": [1, 2, 3, ', None),  # broken: the parse says
        (b'{"inputs": {"name": "text", "shape": [4]}}', None),
        (b'["inputs"]', None),
    ],
)
def test_v2_rows_over(header, over):
    assert v2_rows_over(header, 3) == over


def v2_body(*inputs, outputs=None, params=None):
    doc = {"inputs": list(inputs)}
    if outputs is not None:
        doc["outputs"] = outputs
    if params is not None:
        doc["parameters"] = params
    return json.dumps(doc).encode()


def text_tensor(data, name="text", shape=None, datatype="BYTES"):
    return {"name": name, "shape": shape or [len(data)], "datatype": datatype, "data": data}


@pytest.mark.parametrize(
    ("body", "header", "status", "needle"),
    [
        (b"{", None, 422, "not valid JSON"),
        (b"[]", None, 422, '{"inputs": [...]}'),
        (v2_body(text_tensor(["a"], name="txt")), None, 422, "input 'txt' is unknown"),
        (v2_body(text_tensor(["a"], name="text_pair")), None, 422, "give the BYTES input 'text'"),
        (v2_body(text_tensor(["a"]), text_tensor(["a"])), None, 422, "given twice"),
        (v2_body(text_tensor(["a"], datatype="FP32")), None, 422, "expected 'BYTES'"),
        (v2_body(text_tensor(["a"], shape=[1, 2])), None, 422, "expected [n] or [n, 1]"),
        (v2_body(text_tensor([], shape=[0])), None, 422, "at least one text"),
        (v2_body(text_tensor(["a"], shape=[2])), None, 422, "1 elements, the shape says 2"),
        (v2_body(text_tensor([3])), None, 422, "text[0]: expected a string"),
        (v2_body(text_tensor([" "])), None, 422, "text[0] is empty"),
        (v2_body(text_tensor(["a" * 51])), None, 413, "text[0] has 51 characters"),
        (v2_body(text_tensor(["a\ud800"])), None, 422, "text[0] holds a lone surrogate (U+D800)"),
        (
            v2_body(text_tensor(["a"]), text_tensor(["a", "b"], name="text_pair")),
            None,
            422,
            "text_pair: 2 rows, 'text' has 1",
        ),
        (v2_body(text_tensor(["a"]), outputs=[{"name": "logits"}]), None, 422, "'logits'"),
        (
            v2_body(
                text_tensor(["a"]), outputs=[{"name": "probs", "parameters": {"classification": 2}}]
            ),
            None,
            422,
            "classification extension",
        ),
        (v2_body(text_tensor(["a"])), "999999", 422, HEADER_LENGTH),
        (v2_body(text_tensor(["a"])), "x", 422, HEADER_LENGTH),
        (
            v2_body({"name": "text", "shape": [1], "datatype": "BYTES"}),
            None,
            422,
            "give 'data' or parameters.binary_data_size",
        ),
        (
            v2_body(
                {
                    "name": "text",
                    "shape": [1],
                    "datatype": "BYTES",
                    "parameters": {"binary_data_size": 9},
                }
            ),
            None,
            422,
            "runs past the 0 bytes",
        ),
    ],
)
def test_v2_request_errors(body, header, status, needle):
    err = refused(parse, body, header)
    assert err.status == status and needle in err.message, err.message


def test_v2_json_data_nested_by_rows_and_binary_output_default():
    body = v2_body(text_tensor([["a"], ["b"]], shape=[2, 1]), params={"binary_data_output": True})
    req = parse(body, None)
    assert req.texts == ["a", "b"] and req.outputs is None and req.binary == frozenset(OUTPUTS)
    body = v2_body(
        text_tensor(["a"]),
        outputs=[{"name": "label"}, {"name": "score", "parameters": {"binary_data": False}}],
        params={"binary_data_output": True},
    )
    assert parse(body, None).binary == frozenset({"label"})


def test_v2_metadata_lists_inputs_outputs_and_labels():
    meta = v2_model_metadata("t", FIELDS, {"probs": (2,), "label": ()}, {"labels": ["n", "p"]})
    assert meta["name"] == "t" and meta["parameters"]["labels"] == ["n", "p"]
    assert [i["name"] for i in meta["inputs"]] == ["text", "text_pair"]
    assert {o["name"]: (o["datatype"], o["shape"]) for o in meta["outputs"]} == {
        "label": ("BYTES", [-1]),
        "score": ("FP32", [-1, -1]),  # not in widths: unknown until seen
        "probs": ("FP32", [-1, 2]),
        "agreement": ("FP32", [-1, -1]),
    }


def test_embedding_outputs():
    fields = (Field("embedding", "FP32"), Field("embedding", "FP32", member=True))
    vectors = np.random.default_rng(0).normal(size=(2, 5))
    (tensor,) = v2_tensors({"embedding": vectors}, fields)
    assert tensor.shape == [2, 5] and tensor.datatype == "FP32"
    body, header = encode_v2_response(model_name="e", tensors=[tensor], binary={"embedding"})
    result = httpclient.InferenceServerClient.parse_response_body(body, header_length=header)
    np.testing.assert_allclose(result.as_numpy("embedding"), vectors, rtol=1e-6)


# --- OpenAI embeddings --------------------------------------------------------------------


def test_openai_requests():
    req = parse_embeddings(json.dumps({"model": "e", "input": "one"}).encode(), **LIMITS)
    assert req.texts == ["one"] and req.encoding_format == "float" and req.dimensions is None
    body = {"model": "e", "input": ["a", "b"], "encoding_format": "base64", "user": "u"}
    req = parse_embeddings(json.dumps(body).encode(), **LIMITS)
    assert req.texts == ["a", "b"] and req.encoding_format == "base64"


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"model": "e", "input": ["a"] * 9}, 413, "input: more than 8 inputs, the limit is 8"),
        ({"model": "e", "input": [[1, 2, 3]]}, 422, "token ids are not taken"),
        ({"model": "e", "input": []}, 422, "at least one"),
        ({"model": "e", "input": [""]}, 422, "input[0] is empty"),
        ({"model": "e", "input": 5}, 422, "a string or an array"),
        ({"input": "a"}, 422, "model"),
        ({"model": "e", "input": "a", "encoding_format": "int8"}, 422, "encoding_format"),
        ({"model": "e", "input": "a", "dimensions": 0}, 422, "dimensions"),
        ({"model": "e", "input": "a", "temperature": 1}, 422, "temperature"),
    ],
)
def test_openai_request_errors(body, status, needle):
    err = refused(parse_embeddings, json.dumps(body).encode(), **LIMITS)
    assert err.status == status and needle in err.message, err.message


@pytest.mark.parametrize("fmt", ["float", "base64"])
def test_openai_response_decodes_as_the_client_does(fmt):
    vectors = np.random.default_rng(1).normal(size=(2, 4))
    doc = embeddings_response("e", vectors, encoding_format=fmt, tokens=7)
    assert doc["object"] == "list" and doc["model"] == "e"
    assert doc["usage"] == {"prompt_tokens": 7, "total_tokens": 7}
    for i, item in enumerate(doc["data"]):
        assert item["object"] == "embedding" and item["index"] == i
        got = item["embedding"]
        if fmt == "base64":  # what openai-python does with a base64 answer
            got = np.frombuffer(base64.b64decode(got), dtype="float32")
        np.testing.assert_allclose(got, vectors[i], rtol=1e-6)


# --- /v1/predict: size before items -------------------------------------------------------


def test_predict_body_of_500000_items_is_refused_on_its_length():
    body = b'{"inputs": [' + b",".join([b"0"] * 500_000) + b"]}"
    limits = SimpleNamespace(max_inputs=64, max_text_chars=100)
    err = refused(parse_predict, body, limits)
    assert (err.status, err.kind) == (413, "too_many_inputs")
    assert "more than 64 inputs, the limit is 64" in err.message


@pytest.mark.parametrize(
    ("body", "over"),
    [
        (b'{"inputs": [1, 2, 3]}', False),
        (b'{"inputs": [1, 2, 3, 4]}', True),
        (b' { "x" : {"a": [1]} , "inputs" : [ "a" , {"t": 1}, [1, 2], null ] } ', True),
        (b'{"inputs": [1, 2, 3', False),  # broken within the limit: the full parse says so
        (b'{"inputs": [1, 2, 3,', False),
        (b'{"inputs": [1, 2, 3, 4', True),  # item 4 read: too many, whatever follows
        (b"[1, 2, 3, 4, 5]", False),
        (b'{"inputs": "aaaa"}', False),
        (b"\xff", False),
        (b'{"inputs": []}', False),
        (b'{"x": [' + b"[" * 5000 + b"]" * 5000 + b'], "inputs": [1, 2, 3, 4]}', False),
    ],
)
def test_items_over_reads_at_most_limit_plus_one_items(body, over):
    assert items_over(body, "inputs", 3) is over
