"""Token classification: members with different tokenizers (WordPiece and byte-level BPE)
combined per word, against a reference written here from plain transformers, character
offsets, the first sub-token of each word, and numpy."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from actors.tasks.token_classification import decode_entities, split_words, word_tokens
from pipelines.config import ConfigError, config_from_dict

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
# The BPE member knows no locations: it gets no vote on them.
BPE_TAGS = ["O", "B-PER", "I-PER"]
TEXTS = [
    "the film, was great!",
    "a",
    "i liked the music of this movie; the ending was never boring.",
    "we   watched   it again",
]
LONG = " ".join(["the actors and the music of this film were good, but the plot was dull"] * 5)


@pytest.fixture(scope="module")
def taggers(tmp_path_factory) -> dict[str, Path]:
    from jobs.example import build_tagger

    root = tmp_path_factory.mktemp("taggers")
    return {
        "wp": build_tagger(root / "wp", tags=TAGS, seed=11),
        "bpe": build_tagger(root / "bpe", tags=BPE_TAGS, tokenizer="bpe", seed=12),
    }


def _config(taggers, *, combine="weighted_mean", words_column=None, **member_keys):
    data = {
        "name": "ner",
        "task": "token_classification",
        "labels": TAGS,
        "input": {"words_column": words_column} if words_column else {},
        "members": [
            {"name": "wp", "model": str(taggers["wp"]), "weight": 2.0, "temperature": 1.5},
            {"name": "bpe", "model": str(taggers["bpe"]), "weight": 1.0, **member_keys},
        ],
        "reducer": {"combine": combine},
    }
    return config_from_dict(data, base_dir=Path("."))


def _run_host(cfg, table: pa.Table) -> list[dict]:
    from actors.host import EnsembleHost
    from pipelines.io import validate_rows
    from pipelines.plan import plan_ensemble

    host = EnsembleHost(plan=plan_ensemble(cfg))
    table = validate_rows(
        table,
        text_column="text",
        text_pair_column=None,
        words_column=cfg.input.words_column,
    )
    return host(table).to_pylist()


# --- the reference: plain transformers, offsets, first sub-token, numpy -------------------


def _model(path: Path):
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForTokenClassification.from_pretrained(str(path)).eval()
    return tok, model


def _logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0].numpy().astype(np.float64)


def _reference_member_logits(path: Path, text=None, words=None) -> np.ndarray:
    """(W, own tags) logits of each word's first sub-token, one window."""
    tok, model = _model(path)
    if words is not None:
        enc = tok(words, is_split_into_words=True)
        logits = _logits(model, enc["input_ids"])
        ids = enc.word_ids()
        first = [ids.index(w) for w in range(len(words))]
        return logits[first]
    enc = tok(text, return_offsets_mapping=True)
    logits = _logits(model, enc["input_ids"])
    seq = enc.sequence_ids()
    spans = [
        (s, e) if seq[i] is not None and e > s else None
        for i, (s, e) in enumerate(enc["offset_mapping"])
    ]
    rows = []
    for m in __import__("re").finditer(r"\w+|[^\w\s]", text):
        ws, we = m.span()
        first = next(i for i, sp in enumerate(spans) if sp and sp[0] < we and sp[1] > ws)
        rows.append(logits[first])
    return np.array(rows)


def _aligned_probs(logits: np.ndarray, own: list[str], temperature: float) -> np.ndarray:
    z = logits / temperature
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    out = np.full((len(p), len(TAGS)), np.nan)
    for j, tag in enumerate(own):
        out[:, TAGS.index(tag)] = p[:, j]
    return out


def _reference_combine(probs: list[np.ndarray], weights: list[float], how: str) -> np.ndarray:
    """(W, L) by the issue's definitions, per word and per tag."""
    n = probs[0].shape[0]
    out = np.zeros((n, len(TAGS)))
    if how == "max":
        for r in range(n):
            best = max(range(len(probs)), key=lambda i: np.nanmax(probs[i][r]))
            out[r] = np.nan_to_num(probs[best][r])
        return out
    w = [1.0] * len(probs) if how == "mean" else weights
    for r in range(n):
        for k in range(len(TAGS)):
            have = [(wi, p[r, k]) for wi, p in zip(w, probs, strict=True) if not np.isnan(p[r, k])]
            total = sum(wi for wi, _ in have)
            if how == "geometric_mean":
                out[r, k] = np.exp(sum(wi * np.log(pk) for wi, pk in have) / total)
            else:
                out[r, k] = sum(wi * pk for wi, pk in have) / total
        out[r] /= out[r].sum()
    return out


def _reference(taggers, *, how="weighted_mean", text=None, words=None):
    members = [("wp", TAGS, 2.0, 1.5), ("bpe", BPE_TAGS, 1.0, 1.0)]
    probs = [
        _aligned_probs(_reference_member_logits(taggers[name], text, words), own, t)
        for name, own, _, t in members
    ]
    weights = [w for *_, w, _ in members]
    p = _reference_combine(probs, weights, how)
    tags = [TAGS[k] for k in p.argmax(axis=1)]
    if how == "majority_vote":
        votes = np.zeros_like(p)
        for pi, wi in zip(probs, weights, strict=True):
            votes[np.arange(len(p)), np.nanargmax(pi, axis=1)] += wi
        tags = [
            TAGS[max(np.flatnonzero(v == v.max()), key=lambda k, r=r: p[r, k])]
            for r, v in enumerate(votes)
        ]
    return p, tags, probs


# --- pure functions ----------------------------------------------------------------------


def test_split_words_rule():
    words, offsets = split_words("Dr. Smith's café—2 x")
    assert words == ["Dr", ".", "Smith", "'", "s", "café", "—", "2", "x"]
    assert all("Dr. Smith's café—2 x"[s:e] == w for w, (s, e) in zip(words, offsets, strict=True))


def test_word_tokens_first_overlap_and_covering():
    # Token 1 covers words 0 and 1 (which no token starts in); token 2 starts in word 2.
    spans = [None, (0, 4), (5, 7), (7, 7), None]
    assert word_tokens(spans, [(0, 2), (2, 4), (5, 7)]) == [[1], [1], [2]]


def test_decode_entities_bio():
    tags = ["I-PER", "I-PER", "B-PER", "I-LOC", "O", "B-LOC", "I-LOC", "I-PER"]
    scores = [0.5, 0.7, 0.9, 0.6, 0.99, 0.8, 0.4, 0.3]
    got = decode_entities(tags, scores)
    assert [(k, s, e) for k, s, e, _ in got] == [
        ("PER", 0, 2),
        ("PER", 2, 3),
        ("LOC", 3, 4),
        ("LOC", 5, 7),
        ("PER", 7, 8),
    ]
    assert got[0][3] == pytest.approx(0.6) and got[3][3] == pytest.approx(0.6)


def test_config_rules(taggers, tmp_path):
    with pytest.raises(ConfigError, match="not BIO tags"):
        config_from_dict(
            {
                "name": "x",
                "task": "token_classification",
                "labels": ["O", "PER"],
                "members": [{"name": "a", "model": str(taggers["wp"])}],
            },
            base_dir=tmp_path,
        )
    with pytest.raises(ConfigError, match="only for token_classification"):
        config_from_dict(
            {
                "name": "x",
                "labels": ["a", "b"],
                "members": [{"name": "a", "model": str(taggers["wp"]), "aggregation": "max"}],
            },
            base_dir=tmp_path,
        )
    with pytest.raises(ConfigError, match="words_column"):
        config_from_dict(
            {
                "name": "x",
                "labels": ["a", "b"],
                "input": {"words_column": "words"},
                "members": [{"name": "a", "model": str(taggers["wp"])}],
            },
            base_dir=tmp_path,
        )
    with pytest.raises(ConfigError, match="stride"):
        _config(taggers, stride=30, max_length=16)


def test_a_member_tag_that_maps_to_nothing_is_a_config_error(taggers, tmp_path):
    from jobs.example import build_tagger
    from pipelines.plan import plan_ensemble

    odd = build_tagger(tmp_path / "odd", tags=["O", "B-ORG", "I-ORG"], seed=3)
    cfg = config_from_dict(
        {
            "name": "x",
            "task": "token_classification",
            "labels": TAGS,
            "members": [{"name": "odd", "model": str(odd)}],
        },
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match="B-ORG"):
        plan_ensemble(cfg)


# --- the host against the reference ----------------------------------------------------------


@pytest.mark.parametrize("how", ["weighted_mean", "mean", "geometric_mean", "majority_vote", "max"])
def test_each_combiner_equals_the_reference(taggers, how):
    rows = _run_host(_config(taggers, combine=how), pa.table({"text": TEXTS}))
    for text, row in zip(TEXTS, rows, strict=True):
        assert row["error"] is None
        p, tags, members = _reference(taggers, how=how, text=text)
        words, offsets = split_words(text)
        assert row["words"] == words
        assert row["word_offsets"] == [list(o) for o in offsets]
        np.testing.assert_allclose(np.array(row["probs"]), p, atol=2e-5)
        assert row["tags"] == tags
        np.testing.assert_allclose(
            row["tag_scores"], p[np.arange(len(p)), [TAGS.index(t) for t in tags]], atol=2e-5
        )
        # The BPE member lacks the location tags: NaN there, never a silent zero.
        bpe = np.array(row["probs__bpe"], dtype=np.float64)
        assert np.isnan(bpe[:, 3:]).all() and np.isfinite(bpe[:, :3]).all()
        np.testing.assert_allclose(bpe, members[1], atol=2e-5, equal_nan=True)
        # Agreement: the weight share of members whose top tag is the ensemble's, per word.
        tops = [np.nanargmax(m, axis=1) for m in members]
        share = [
            (2.0 * (tops[0][r] == TAGS.index(t)) + 1.0 * (tops[1][r] == TAGS.index(t))) / 3.0
            for r, t in enumerate(tags)
        ]
        assert row["agreement"] == pytest.approx(float(np.mean(share)), abs=1e-9)
        expected = [
            {
                "type": k,
                "start": s,
                "end": e,
                "start_char": offsets[s][0],
                "end_char": offsets[e - 1][1],
                "text": text[offsets[s][0] : offsets[e - 1][1]],
            }
            for k, s, e, _ in decode_entities(tags, [float(x) for x in row["tag_scores"]])
        ]
        assert [
            {k: v for k, v in ent.items() if k != "score"} for ent in row["entities"]
        ] == expected


def test_words_given_are_tokenised_as_split(taggers):
    words = [["Ada", "went", "to", "the", "film", "."], ["fun", "!"]]
    cfg = _config(taggers, words_column="tokens")
    rows = _run_host(cfg, pa.table({"tokens": words}))
    for given, row in zip(words, rows, strict=True):
        p, tags, _ = _reference(taggers, words=given)
        assert row["words"] == given and row["word_offsets"] is None
        np.testing.assert_allclose(np.array(row["probs"]), p, atol=2e-5)
        assert row["tags"] == tags
        for ent in row["entities"]:
            assert ent["start_char"] is None
            assert ent["text"] == " ".join(given[ent["start"] : ent["end"]])


def test_aggregation_average_and_max(taggers):
    text = TEXTS[2]
    tok, model = _model(taggers["bpe"])
    enc = tok(text, return_offsets_mapping=True)
    logits = _logits(model, enc["input_ids"])
    seq = enc.sequence_ids()
    spans = [sp if seq[i] is not None else None for i, sp in enumerate(enc["offset_mapping"])]
    _, offsets = split_words(text)
    groups = word_tokens(spans, offsets)
    assert any(len(g) > 1 for g in groups)  # some word has several sub-tokens
    for how, fn in (("average", np.mean), ("max", np.max)):
        rows = _run_host(_config(taggers, aggregation=how), pa.table({"text": [text]}))
        expected = np.stack([fn(logits[g], axis=0) for g in groups])
        p = np.exp(expected - expected.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        np.testing.assert_allclose(np.array(rows[0]["probs__bpe"])[:, :3], p, atol=2e-5)


def test_a_text_longer_than_max_length_gets_a_tag_for_every_word(taggers):
    words, _ = split_words(LONG)
    cfg = _config(taggers, max_length=16, stride=4)
    rows = _run_host(cfg, pa.table({"text": [LONG]}))
    row = rows[0]
    assert row["error"] is None and row["words"] == words
    assert len(row["tags"]) == len(words) and all(t in TAGS for t in row["tags"])
    # Reference for the windowed member: its own windows, each word read from the window
    # where its first sub-token is furthest from an edge.
    tok, model = _model(taggers["bpe"])
    enc = tok(
        LONG,
        truncation=True,
        max_length=16,
        stride=4,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
    )
    assert len(enc["input_ids"]) > 3
    _, offsets = split_words(LONG)
    best: dict[int, tuple[int, np.ndarray]] = {}
    for w in range(len(enc["input_ids"])):
        logits = _logits(model, enc["input_ids"][w])
        seq = enc.sequence_ids(w)
        content = [i for i, s in enumerate(seq) if s is not None]
        for k, (ws, we) in enumerate(offsets):
            first = next(
                (
                    i
                    for i in content
                    if enc["offset_mapping"][w][i][0] < we and enc["offset_mapping"][w][i][1] > ws
                ),
                None,
            )
            if first is None:
                continue
            gap = min(first - content[0], content[-1] - first)
            if k not in best or gap > best[k][0]:
                best[k] = (gap, logits[first])
    assert set(best) == set(range(len(words)))
    ref = np.stack([best[k][1] for k in range(len(words))])
    p = np.exp(ref - ref.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    np.testing.assert_allclose(np.array(row["probs__bpe"])[:, :3], p, atol=2e-5)


def test_error_rows_have_null_tags_entities_and_probs(taggers):
    # "\x07" is a word by the split rule, and a control character WordPiece drops.
    rows = _run_host(_config(taggers), pa.table({"text": ["fine film", None, "   ", "\x07"]}))
    assert rows[0]["error"] is None
    assert "no word of this text gave a token" in rows[3]["error"]
    for row in rows[1:]:
        assert row["error"]
        assert row["tags"] is None and row["entities"] is None and row["probs"] is None
        assert row["words"] is None and row["probs__wp"] is None
    rows = _run_host(
        _config(taggers, words_column="words"), pa.table({"words": [["ok"], [], None, ["a", ""]]})
    )
    assert rows[0]["error"] is None and rows[0]["words"] == ["ok"]
    assert [r["error"] is not None for r in rows] == [False, True, True, True]
    assert all(r["tags"] is None for r in rows[1:])


# --- end to end: `ray-ensemble score` ---------------------------------------------------------


def test_score_writes_the_token_columns(ray_address, taggers, tmp_path):
    """`ray-ensemble score` as a user runs it, joined to the session's Ray."""
    import subprocess
    import sys

    import yaml

    from pipelines.output import read_output

    config = {
        "name": "ner",
        "task": "token_classification",
        "labels": TAGS,
        "input": {"words_column": "words"},
        "members": [
            {"name": "wp", "model": str(taggers["wp"]), "weight": 2.0, "temperature": 1.5},
            {"name": "bpe", "model": str(taggers["bpe"]), "max_length": 16, "stride": 4},
        ],
    }
    (tmp_path / "ner.yaml").write_text(yaml.safe_dump(config))
    rows = [{"id": f"r{i}", "words": t.split()} for i, t in enumerate(TEXTS + [LONG])]
    rows.append({"id": "bad", "words": []})
    with open(tmp_path / "in.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "score",
            str(tmp_path / "ner.yaml"),
            "--input",
            str(tmp_path / "in.jsonl"),
            "--output",
            str(tmp_path / "out"),
            "--address",
            ray_address,
        ],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[1],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    table = read_output(tmp_path / "out")
    assert table.column_names[:2] == ["id", "words"]
    for name in ("word_offsets", "tags", "tag_scores", "probs", "entities", "agreement"):
        assert name in table.column_names
    assert table.schema.field("probs").type == pa.list_(pa.list_(pa.float32()))
    assert table.schema.field("entities").type.value_type.names == [
        "type",
        "start",
        "end",
        "start_char",
        "end_char",
        "text",
        "score",
    ]
    out = {r["id"]: r for r in table.to_pylist()}
    assert len(out) == len(rows)
    for row in rows[:-1]:
        got = out[row["id"]]
        assert got["error"] is None and got["words"] == row["words"]
        assert len(got["tags"]) == len(row["words"]) == len(got["probs__bpe"])
    assert out["bad"]["error"] and out["bad"]["tags"] is None
    # The same rows through the host in this process: the job's reducer is the same code.
    host_rows = _run_host(
        _config(taggers, words_column="words", max_length=16, stride=4),
        pa.table({"words": [r["words"] for r in rows[:-1]]}),
    )
    for row, ref in zip(rows[:-1], host_rows, strict=True):
        np.testing.assert_allclose(out[row["id"]]["probs"], ref["probs"], atol=1e-6)


# --- online: the same reducer behind /v1/predict and the Open Inference Protocol -------------


@pytest.fixture
def served_ner(ray_cluster, taggers, tmp_path_factory):
    import socket

    from ray import serve

    from pipelines.online import build_app
    from pipelines.plan import plan_ensemble

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    cfg = _config(taggers, max_length=16, stride=4)
    serve.run(build_app(plan_ensemble(cfg)), name="ner", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.delete("ner")
    serve.shutdown()


def test_online_equals_the_offline_window(served_ner, taggers):
    import requests

    words = [["Ada", "went", "to", "the", "film", "."], LONG.split()[:30]]
    inputs = [*TEXTS, *({"words": w} for w in words), LONG]
    r = requests.post(served_ner + "/v1/predict", json={"inputs": inputs}, timeout=120)
    assert r.status_code == 200, r.text
    online = r.json()["predictions"]
    texts = [*TEXTS, LONG]
    offline_text = _run_host(_config(taggers, max_length=16, stride=4), pa.table({"text": texts}))
    offline_words = _run_host(
        _config(taggers, max_length=16, stride=4, words_column="words"),
        pa.table({"words": words}),
    )
    expected = [*offline_text[:-1], *offline_words, offline_text[-1]]
    assert len(online) == len(expected)
    for on, off in zip(online, expected, strict=True):
        assert on["words"] == off["words"] and on["tags"] == off["tags"]
        np.testing.assert_allclose(on["tag_scores"], off["tag_scores"], atol=1e-6)
        assert on["agreement"] == pytest.approx(off["agreement"], abs=1e-6)
        assert [e["text"] for e in on["entities"]] == [e["text"] for e in off["entities"]]
        assert [(e["start"], e["end"], e["type"]) for e in on["entities"]] == [
            (e["start"], e["end"], e["type"]) for e in off["entities"]
        ]
        bpe = np.array(off["probs__bpe"], dtype=np.float64)
        assert on["members"]["bpe"]["tags"] == [TAGS[k] for k in np.nanargmax(bpe, axis=1)]

    # The Open Inference Protocol: the same fields, each row's list as a JSON string.
    body = {
        "inputs": [{"name": "text", "shape": [2], "datatype": "BYTES", "data": TEXTS[:2]}],
    }
    r = requests.post(served_ner + "/v2/models/ner/infer", json=body, timeout=60)
    assert r.status_code == 200, r.text
    outputs = {o["name"]: o for o in r.json()["outputs"]}
    assert set(outputs) == {"words", "tags", "tag_scores", "entities", "agreement"}
    assert outputs["tags"]["datatype"] == "BYTES" and outputs["tags"]["shape"] == [2]
    for i in range(2):
        assert json.loads(outputs["tags"]["data"][i]) == online[i]["tags"]
        # Other rows in the batch change the float32 passes in their last digits.
        got = json.loads(outputs["entities"]["data"][i])
        assert [{**e, "score": 0} for e in got] == [
            {**e, "score": 0} for e in online[i]["entities"]
        ]
        np.testing.assert_allclose(
            [e["score"] for e in got], [e["score"] for e in online[i]["entities"]], atol=1e-5
        )

    # Bad input is a 422 naming it.
    r = requests.post(served_ner + "/v1/predict", json={"inputs": [{"words": []}]}, timeout=30)
    assert r.status_code == 422 and "words" in r.json()["error"]


# --- evaluate: entity metrics (seqeval, strict IOB2), word accuracy, the F1 gain ------------


def _strict_entities(tags):
    """Strict IOB2 written out: B-X then I-X*; an I-X without its B-X is no entity."""
    out, i = set(), 0
    while i < len(tags):
        if tags[i].startswith("B-"):
            kind, j = tags[i][2:], i + 1
            while j < len(tags) and tags[j] == f"I-{kind}":
                j += 1
            out.add((kind, i, j))
            i = j
        else:
            i += 1
    return out


def _micro_f1(truth, pred):
    right = sum(
        len(_strict_entities(t) & _strict_entities(p)) for t, p in zip(truth, pred, strict=True)
    )
    total = sum(
        len(_strict_entities(t)) + len(_strict_entities(p))
        for t, p in zip(truth, pred, strict=True)
    )
    return 2 * right / total if total else 0.0


def test_tag_metrics_and_gain_against_hand_counts():
    from pipelines.tagging_evaluation import f1_gain, tag_metrics

    truth = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC", "I-LOC"], ["B-PER"]]
    good = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-LOC", "O"], ["B-PER"]]
    bad = [["B-PER", "O", "O", "I-LOC"], ["O", "B-LOC", "I-LOC"], ["O"]]
    m = tag_metrics(truth, good)
    assert m["f1"] == pytest.approx(_micro_f1(truth, good))
    assert m["word_accuracy"] == pytest.approx(7 / 8)
    assert m["per_type"]["PER"]["f1"] == pytest.approx(1.0)
    assert m["per_type"]["LOC"]["recall"] == pytest.approx(0.5)
    gain = f1_gain(truth, good, bad)
    assert gain["delta"] == pytest.approx(_micro_f1(truth, good) - _micro_f1(truth, bad))
    assert gain["low"] <= gain["delta"] <= gain["high"]


def _tagged_set(path: Path, n: int = 40) -> list[dict]:
    """Sentences with random (valid IOB2) tags, as JSON lines at ``path``."""
    import random

    rng = random.Random(3)
    rows = []
    for i in range(n):
        words = TEXTS[i % 3].split()
        tags, prev = [], "O"
        for _ in words:
            tag = rng.choice(TAGS if prev == "O" else [*TAGS, f"I-{prev[2:]}"])
            tag = tag if not tag.startswith("I-") or prev[2:] == tag[2:] else "O"
            tags.append(tag)
            prev = tag
        rows.append({"id": f"s{i}", "words": words, "tags": tags})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def test_evaluate_writes_entity_metrics_and_the_plot(ray_cluster, taggers, tmp_path):
    from pipelines.evaluation import evaluate
    from pipelines.output import read_output
    from pipelines.plan import plan_ensemble
    from pipelines.tagging_evaluation import check_tagged_input

    src = tmp_path / "tagged.jsonl"
    rows = _tagged_set(src)
    plan = plan_ensemble(_config(taggers, words_column="words"))
    check_tagged_input(plan, src, "tags")
    metrics = evaluate(plan, src, "tags", tmp_path / "report")
    assert metrics["sentences"] == 40 and metrics["skipped"] == 0
    scored = {r["id"]: r for r in read_output(tmp_path / "report" / "scored").to_pylist()}
    truth = [r["tags"] for r in rows]
    pred = [scored[r["id"]]["tags"] for r in rows]
    assert metrics["ensemble"]["f1"] == pytest.approx(_micro_f1(truth, pred))
    words = sum(len(t) for t in truth)
    right = sum(a == b for t, p in zip(truth, pred, strict=True) for a, b in zip(t, p, strict=True))
    assert metrics["ensemble"]["word_accuracy"] == pytest.approx(right / words)
    member = [
        [TAGS[k] for k in np.nanargmax(np.array(scored[r["id"]]["probs__bpe"], float), axis=1)]
        for r in rows
    ]
    assert metrics["members"]["bpe"]["f1"] == pytest.approx(_micro_f1(truth, member))
    assert metrics["gain"]["best_member"] in ("wp", "bpe")
    report = (tmp_path / "report" / "report.md").read_text()
    assert "per_type_f1.png" in report and "entity F1" in report
    assert (tmp_path / "report" / "per_type_f1.png").stat().st_size > 1000
    with pytest.raises(Exception, match="not in the ensemble's labels"):
        bad = tmp_path / "bad.jsonl"
        bad.write_text(json.dumps({"words": ["a"], "tags": ["B-ORG"]}) + "\n")
        check_tagged_input(plan, bad, "tags")


# --- fit: temperatures and the combination on word-level NLL ----------------------------------


def test_fit_on_word_level_nll(ray_cluster, taggers, tmp_path):
    from scipy.optimize import minimize_scalar

    from pipelines.fitting import check_labelled_input, collect_member_outputs, fit_ensemble
    from pipelines.plan import plan_ensemble

    src = tmp_path / "tagged.jsonl"
    rows = _tagged_set(src, n=12)
    plan = plan_ensemble(_config(taggers, words_column="words"))
    inputs = check_labelled_input(plan, src, "tags", "fit")
    data = collect_member_outputs(plan, inputs, "tags")
    y = np.array([TAGS.index(t) for r in rows for t in r["tags"]])
    np.testing.assert_array_equal(data.y, y)
    # CV folds keep a sentence's words together: each word knows its sentence.
    np.testing.assert_array_equal(
        data.groups, np.concatenate([[k] * len(r["tags"]) for k, r in enumerate(rows)])
    )
    for i, (name, own) in enumerate((("wp", TAGS), ("bpe", BPE_TAGS))):
        ref = np.concatenate(
            [_reference_member_logits(taggers[name], words=r["words"]) for r in rows]
        )
        aligned = np.full((len(ref), len(TAGS)), np.nan)
        aligned[:, [TAGS.index(t) for t in own]] = ref
        np.testing.assert_allclose(data.logits[i], aligned, atol=1e-4)

        def word_nll(log_t, z=ref, tags=own):
            # A word whose tag the member lacks scores the floor at every temperature.
            q = _aligned_probs(z, tags, float(np.exp(log_t)))
            picked = np.nan_to_num(q[np.arange(len(y)), y], nan=0.0)
            return -np.mean(np.log(np.clip(picked, 1e-12, 1.0)))

        best = float(
            np.exp(
                minimize_scalar(word_nll, bounds=(np.log(0.02), np.log(50.0)), method="bounded").x
            )
        )
        result = fit_ensemble(plan, data)
        assert result.temperatures[i] == pytest.approx(best, rel=2e-2)
    assert result.combine in ("mean", "weighted_mean", "geometric_mean")
    assert {c.combine for c in result.candidates} <= {"mean", "weighted_mean", "geometric_mean"}
    with pytest.raises(ConfigError, match="stacking"):
        fit_ensemble(plan, data, "stacking")


# --- train: labels on each word's first sub-token, -100 on the rest -------------------------


def test_training_labels_sit_on_first_sub_tokens(taggers):
    from transformers import AutoTokenizer

    from actors.tasks.token_classification import training_batch

    tok = AutoTokenizer.from_pretrained(str(taggers["bpe"]))
    text = TEXTS[2]
    words = split_words(text)[0]
    y = [k % len(TAGS) for k in range(len(words))]
    for given, rows in ((False, [text, "fun"]), (True, [words, ["fun"]])):
        inputs, labels = training_batch(tok, rows, [y, [1]], 64, given=given)
        assert len(labels[0]) == len(inputs["input_ids"][0]) == len(inputs["input_ids"][1])
        enc = tok(words, is_split_into_words=True) if given else None
        if given:
            ids = enc.word_ids()
            firsts = [ids.index(w) for w in range(len(words))]
        else:
            enc = tok(text, return_offsets_mapping=True)
            spans = enc["offset_mapping"]
            seq = enc.sequence_ids()
            firsts = [
                next(
                    i for i, (s, e) in enumerate(spans) if seq[i] is not None and s < we and e > ws
                )
                for ws, we in split_words(text)[1]
            ]
        expected = [-100] * len(labels[0])
        for w, pos in enumerate(firsts):
            expected[pos] = y[w]
        assert labels[0] == expected
        assert sorted(v for v in labels[1] if v != -100) == [1]


def test_train_fine_tunes_a_tagger_with_ray_train(ray_cluster, taggers, tmp_path):
    import yaml
    from transformers import AutoConfig

    from jobs.example import build_tagger
    from pipelines.config import load_config
    from pipelines.training import read_train_set, train_members

    base = build_tagger(tmp_path / "base", tags=["O", "X"], seed=5, initializer_range=0.02)
    # A rule a tagger can learn from 40 sentences: "the" starts a PER entity, the word
    # after it continues it, everything else is outside.
    rows = []
    for i in range(40):
        words = TEXTS[i % 3].split()
        tags = ["O"] * len(words)
        for k, w in enumerate(words):
            if w == "the":
                tags[k] = "B-PER"
                if k + 1 < len(words):
                    tags[k + 1] = "I-PER"
        rows.append({"words": words, "tags": tags})
    src = tmp_path / "train.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    config = {
        "name": "ner",
        "task": "token_classification",
        "labels": TAGS,
        "input": {"words_column": "words"},
        "members": [
            {
                "name": "tuned",
                "model": str(tmp_path / "tuned"),
                "train": {
                    "base_model": str(base),
                    "epochs": 8,
                    "batch_size": 8,
                    "learning_rate": 5e-3,
                    "cpus_per_worker": 1,
                },
            }
        ],
    }
    (tmp_path / "ner.yaml").write_text(yaml.safe_dump(config))
    cfg = load_config(tmp_path / "ner.yaml", for_training=True)
    data = read_train_set(cfg, src, "tags")
    assert data.rows == 40 and data.skipped == 0
    train_members(cfg, data, workdir=tmp_path / "work")
    trained = AutoConfig.from_pretrained(str(tmp_path / "tuned"))
    assert trained.architectures == ["BertForTokenClassification"]
    assert [trained.id2label[i] for i in range(len(TAGS))] == TAGS
    scored = _run_host(
        load_config(tmp_path / "ner.yaml"), pa.table({"words": [r["words"] for r in rows[:3]]})
    )
    right = sum(
        a == b
        for r, s in zip(rows[:3], scored, strict=True)
        for a, b in zip(r["tags"], s["tags"], strict=True)
    )
    words = sum(len(r["words"]) for r in rows[:3])
    assert right / words >= 0.9


def test_a_words_input_column_is_allowed_only_as_the_words_column(taggers, tmp_path):
    from pipelines.io import InputError, check_input

    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"text": "a film", "words": ["a", "film"]}) + "\n")
    check_input(_config(taggers, words_column="words"), src)
    with pytest.raises(InputError, match="words"):
        check_input(_config(taggers), src)
