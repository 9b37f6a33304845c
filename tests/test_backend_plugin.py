"""A backend defined here, in the test file, and registered with one line, runs through
`score` and `serve` like the built-in ones (README.md, "Where things live").

Its "model" is a word table: each known word adds its two logits, plus the member's own
config key ``bias``. Its module is this file: Ray's workers import it from the member's
options, so they need no registration of their own.
"""

from __future__ import annotations

import json
import re
import socket
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import requests
from pydantic import Field

from actors.backends import BACKENDS, register
from actors.backends.base import BackendError, BackendOptions
from actors.tasks import HeadInfo
from pipelines.config import ConfigError, config_from_dict
from pipelines.offline import score
from pipelines.plan import plan_ensemble

LABELS = ["negative", "positive"]
TABLE = {"good": [0.0, 1.5], "fine": [0.0, 0.5], "dull": [1.2, 0.0], "awful": [2.0, -0.5]}
TEXTS = ["a good film", "dull and awful", "fine", "nothing known here", "good good dull"]


# --- the backend: everything a backend module defines -----------------------------------


class Options(BackendOptions):
    bias: float = Field(0.0, description="Added to the positive logit.")


local_files = True
trainable = False


def _table(member: Any) -> dict[str, list[float]]:
    path = Path(member.model) / "table.json"
    if not path.is_file():
        raise BackendError(f"model: {path} is missing; a word-table member needs table.json")
    return json.loads(path.read_text())


def describe(member: Any, task: Any) -> HeadInfo:
    _table(member)
    return HeadInfo(labels=("negative", "positive"))


class WordTable:
    pad_token_id = 0

    def __init__(self, member: Any) -> None:
        self.words = ["<pad>", *_table(member)]
        self.logits = np.array([[0.0, 0.0], *_table(member).values()], dtype=np.float32)
        self.logits[1:, 1] += member.options.bias

    def encode(self, texts, pairs):
        index = {w: i for i, w in enumerate(self.words)}
        # Unknown words count as padding (id 0, zero logits); every row keeps one token.
        return {"input_ids": [[index.get(w, 0) for w in t.split()] or [0] for t in texts]}

    def forward(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        rows = self.logits[ids] * (mask[..., None] * (ids[..., None] > 0))
        return rows.sum(axis=1)


def load(member: Any, task: Any, device: str, threads: int | None = None) -> WordTable:
    return WordTable(member)


def weight_bytes(member: Any, on_gpu: bool = True) -> int | None:
    return None


# --- the tests ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plan(tmp_path_factory):
    register("wordtable", __name__)  # the one registration line
    root = tmp_path_factory.mktemp("plugin")
    (root / "table").mkdir()
    (root / "table" / "table.json").write_text(json.dumps(TABLE))
    cfg = config_from_dict(
        {
            "name": "plugin",
            "labels": LABELS,
            "members": [{"name": "words", "backend": "wordtable", "model": "table", "bias": 0.25}],
        },
        base_dir=root,
    )
    yield plan_ensemble(cfg), root
    BACKENDS.pop("wordtable")


def expected(texts: list[str], bias: float) -> np.ndarray:
    """Softmax of the summed table rows, written out independently of the backend."""
    out = []
    for text in texts:
        z = np.zeros(2)
        for w in text.split():
            if w in TABLE:
                z += np.array(TABLE[w]) + np.array([0.0, bias])
        e = np.exp(z - z.max())
        out.append(e / e.sum())
    return np.array(out)


def test_the_backend_keys_are_its_own(plan):
    _, root = plan
    with pytest.raises(ConfigError) as err:
        config_from_dict(
            {
                "name": "p",
                "labels": LABELS,
                "members": [{"name": "w", "backend": "wordtable", "model": "table", "bais": 1}],
            },
            base_dir=root,
        )
    assert "members[0] (w).bais: unknown key" in str(err.value)
    with pytest.raises(ConfigError, match=re.escape("members[0] (w).bias: only for backend")):
        config_from_dict(
            {"name": "p", "labels": LABELS, "members": [{"name": "w", "model": "x", "bias": 1}]},
            base_dir=root,
        )


def test_score_runs_the_plugin_backend(ray_cluster, plan):
    plan, root = plan
    src = root / "in.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS))
    )
    summary = score(plan, src, root / "out", overwrite=True)
    rows = pq.read_table(root / "out").to_pylist()
    assert summary.rows == len(rows) == len(TEXTS)
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(TEXTS))]
    want = expected(TEXTS, 0.25)
    np.testing.assert_allclose([r["probs__words"] for r in rows], want, atol=1e-6)
    np.testing.assert_allclose([r["probs"] for r in rows], want, atol=1e-6)
    assert [r["label"] for r in rows] == [LABELS[i] for i in want.argmax(axis=1)]


def test_serve_runs_the_plugin_backend(ray_cluster, plan):
    from ray import serve

    from pipelines.online import build_app

    plan, _ = plan
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    try:
        serve.run(build_app(plan), name="plugin", route_prefix="/")
        r = requests.post(f"http://127.0.0.1:{port}/v1/predict", json={"inputs": TEXTS}, timeout=60)
        assert r.status_code == 200, r.text
        got = [[p["probs"][lab] for lab in LABELS] for p in r.json()["predictions"]]
        np.testing.assert_allclose(got, expected(TEXTS, 0.25), atol=1e-6)
    finally:
        serve.delete("plugin")
        serve.shutdown()
