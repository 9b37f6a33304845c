"""The whole offline pipeline on one local Ray cluster, against plain transformers."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.host import LABELS_METADATA_KEY
from jobs.example import make_texts
from pipelines.config import config_from_dict
from pipelines.offline import score
from pipelines.plan import plan_ensemble
from tests.oracle import canonical_probs, plain_embeddings

LABELS = ["negative", "positive"]


def plan_for(models, tmp_path, members, **top):
    cfg = {"name": "t", "labels": LABELS, "members": members, **top}
    return plan_ensemble(config_from_dict(cfg, base_dir=tmp_path))


def read_output(out: Path) -> pa.Table:
    files = sorted(out.glob("*.parquet"))
    assert files, "no output written"
    return pq.read_table(files if len(files) > 1 else files[0])


BAD_LINES = {
    "null": json.dumps({"id": "null", "text": None}),
    "empty": json.dumps({"id": "empty", "text": ""}),
    "blank": json.dumps({"id": "blank", "text": "   \n\t"}),
    "number": json.dumps({"id": "number", "text": 42}),
    "object": json.dumps({"id": "object", "text": {"a": 1}}),
    "missing": json.dumps({"id": "missing", "body": "x"}),
}


@pytest.fixture(scope="module")
def scored(ray_cluster, models, tmp_path_factory):
    """Three members with different label orders and names, good and bad JSONL rows."""
    tmp = tmp_path_factory.mktemp("jsonl")
    texts = make_texts(300, seed=11, max_words=80)
    lines = [json.dumps({"id": f"r{i}", "text": t, "extra": i}) for i, t in enumerate(texts)]
    for pos, key in zip((3, 50, 120, 121, 200, 299), BAD_LINES, strict=True):
        lines.insert(pos, BAD_LINES[key])
    lines.insert(10, "{not json")
    lines.insert(20, "[1, 2]")
    (tmp / "in.jsonl").write_text("\n".join(lines) + "\n")
    members = [
        {"name": "alpha", "model": str(models["alpha"]), "weight": 2.0, "batch_size": 16},
        {"name": "beta", "model": str(models["beta"]), "temperature": 1.7, "max_length": 24},
        {
            "name": "gamma",
            "model": str(models["gamma"]),
            "weight": 0.5,
            "label_map": {"LABEL_0": "negative", "LABEL_1": "positive"},
            "batch_size": 7,
        },
    ]
    plan = plan_for(models, tmp, members)
    summary = score(plan, tmp / "in.jsonl", tmp / "out")
    return {
        "summary": summary,
        "out": read_output(tmp / "out"),
        "texts": texts,
        "members": members,
        "lines": lines,
        "out_dir": tmp / "out",
    }


def test_every_row_exactly_once_in_order(scored):
    out = scored["out"]
    assert out.num_rows == len(scored["lines"]) == scored["summary"].rows
    ids = out.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    good = [i for i in ids if i.startswith("r")]
    assert good == [f"r{i}" for i in range(len(scored["texts"]))]  # input order kept


def test_bad_rows_carry_an_error_and_no_score(scored):
    rows = {r["id"]: r for r in scored["out"].to_pylist()}
    expected = {
        "null": "'text' is null",
        "empty": "'text' is empty",
        "blank": "'text' is empty",
        "number": "'text' is a number, expected a string",
        "object": "'text' is an object, expected a string",
        "missing": "'text' is null",
        "in.jsonl:10": "line is not valid JSON",
        "in.jsonl:20": "line is a list, expected a JSON object",
    }
    for key, message in expected.items():
        assert rows[key]["error"].startswith(message), (key, rows[key]["error"])
        assert rows[key]["label"] is None and rows[key]["probs"] is None
        assert rows[key]["probs__alpha"] is None
    assert rows["number"]["text"] == "42"  # kept, as its JSON text
    errors = [r for r in rows.values() if r["error"]]
    assert len(errors) == len(expected) == scored["summary"].errors


def test_values_equal_plain_transformers(scored, models):
    members = scored["members"]
    texts = scored["texts"]
    out = {r["id"]: r for r in scored["out"].to_pylist()}
    got = {
        m["name"]: np.array([out[f"r{i}"][f"probs__{m['name']}"] for i in range(len(texts))])
        for m in members
    }
    ref = {
        m["name"]: canonical_probs(
            models[m["name"]],
            texts,
            LABELS,
            label_map=m.get("label_map"),
            temperature=m.get("temperature", 1.0),
            max_length=m.get("max_length", 256),
        )
        for m in members
    }
    for name in ref:
        np.testing.assert_allclose(got[name], ref[name], atol=1e-5, err_msg=name)
    w = {m["name"]: m.get("weight", 1.0) for m in members}
    ens = sum(w[n] * ref[n] for n in ref) / sum(w.values())
    probs = np.array([out[f"r{i}"]["probs"] for i in range(len(texts))])
    np.testing.assert_allclose(probs, ens, atol=1e-5)
    labels = [out[f"r{i}"]["label"] for i in range(len(texts))]
    assert labels == [LABELS[k] for k in ens.argmax(1)]
    scores = np.array([out[f"r{i}"]["score"] for i in range(len(texts))])
    np.testing.assert_allclose(scores, ens.max(1), atol=1e-5)
    ent = -(ens * np.log(ens)).sum(1)
    np.testing.assert_allclose([out[f"r{i}"]["entropy"] for i in range(len(texts))], ent, atol=1e-5)
    agree = sum(w[n] * (ref[n].argmax(1) == ens.argmax(1)) for n in ref) / sum(w.values())
    np.testing.assert_allclose(
        [out[f"r{i}"]["agreement"] for i in range(len(texts))], agree, atol=1e-9
    )
    assert 0 < agree.mean() < 1  # the members really disagree somewhere


def test_output_schema_and_metadata(scored):
    out = scored["out"]
    assert out.column_names == [
        "id",
        "text",
        "extra",
        "body",
        "label",
        "score",
        "probs",
        "agreement",
        "entropy",
        "probs__alpha",
        "probs__beta",
        "probs__gamma",
        "error",
    ]
    assert out.schema.field("probs").type == pa.list_(pa.float32())
    assert out.schema.field("label").type == pa.string()
    assert out.column("extra").to_pylist()[:3] == [0, 1, 2]
    meta = pq.read_schema(next(scored["out_dir"].glob("*.parquet"))).metadata
    assert json.loads(meta[LABELS_METADATA_KEY]) == LABELS


def test_parquet_directory_gets_stable_unique_ids(ray_cluster, models, tmp_path):
    texts = make_texts(40, seed=5)
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"text": texts[:25]}), src / "a.parquet", row_group_size=7)
    (src / "sub").mkdir()
    pq.write_table(pa.table({"text": texts[25:]}), src / "sub" / "b.parquet")
    members = [{"name": "alpha", "model": str(models["alpha"])}]
    plan = plan_for(models, tmp_path, members, reducer={"combine": "geometric_mean"})
    first = read_output(Path(score(plan, src, tmp_path / "o1", rows_per_file=10).output))
    ids = first.column("id").to_pylist()
    assert ids == [f"a.parquet:{i}" for i in range(25)] + [f"sub/b.parquet:{i}" for i in range(15)]
    assert first.column("text").to_pylist() == texts
    ref = canonical_probs(models["alpha"], texts, LABELS)
    np.testing.assert_allclose(np.array(first.column("probs").to_pylist()), ref, atol=1e-5)


def test_csv_keeps_text_values_and_a_missing_label(ray_cluster, models, tmp_path):
    """Three canonical labels; alpha lacks 'neutral' and casts no vote on it."""
    texts = make_texts(20, seed=8)
    path = tmp_path / "in.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["id", "text"])
        w.writerows([[f"{i:03d}", t] for i, t in enumerate(texts)])
        w.writerow(["999", ""])
    labels3 = ["negative", "neutral", "positive"]
    members = [
        {"name": "alpha", "model": str(models["alpha"])},
        {"name": "tri", "model": str(models["tri"]), "weight": 3.0},
    ]
    cfg = config_from_dict({"name": "t", "labels": labels3, "members": members}, base_dir=tmp_path)
    out = read_output(Path(score(plan_ensemble(cfg), path, tmp_path / "o").output))
    assert out.column("id").to_pylist() == [f"{i:03d}" for i in range(20)] + ["999"]
    assert out.column("error").to_pylist()[-1] == "'text' is empty"
    a = canonical_probs(models["alpha"], texts, labels3)
    t = canonical_probs(models["tri"], texts, labels3)
    assert np.isnan(a[:, 1]).all()
    raw = np.stack([(a[:, 0] + 3 * t[:, 0]) / 4, t[:, 1], (a[:, 2] + 3 * t[:, 2]) / 4], axis=1)
    expected = raw / raw.sum(1, keepdims=True)
    got = np.array(out.column("probs").to_pylist()[:20])
    np.testing.assert_allclose(got, expected, atol=1e-5)
    alpha = np.array(out.column("probs__alpha").to_pylist()[:20], dtype=float)
    assert np.isnan(alpha[:, 1]).all()


def test_embedding_ensemble(ray_cluster, models, tmp_path):
    texts = make_texts(12, seed=4)
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts) + '{"text": null}\n')
    cfg = config_from_dict(
        {
            "name": "e",
            "task": "embedding",
            "members": [
                {"name": "enc", "model": str(models["encoder"])},
                {"name": "enc2", "model": str(models["encoder"]), "max_length": 4},
            ],
            "reducer": {"combine": "concat"},
        },
        base_dir=tmp_path,
    )
    out = read_output(Path(score(plan_ensemble(cfg), path, tmp_path / "o").output))
    assert out.num_rows == 13 and out.column("embedding").to_pylist()[-1] is None
    a = plain_embeddings(models["encoder"], texts)
    b = plain_embeddings(models["encoder"], texts, max_length=4)
    unit = lambda v: v / np.linalg.norm(v, axis=1, keepdims=True)  # noqa: E731
    expected = unit(np.concatenate([unit(a), unit(b)], axis=1))
    np.testing.assert_allclose(
        np.array(out.column("embedding").to_pylist()[:12]), expected, atol=1e-5
    )
    np.testing.assert_allclose(
        np.array(out.column("embedding__enc").to_pylist()[:12]), unit(a), atol=1e-5
    )
    assert math.isclose(np.linalg.norm(out.column("embedding").to_pylist()[0]), 1.0, rel_tol=1e-5)


def test_malformed_records_become_error_rows_and_long_text_is_cut(ray_cluster, models, tmp_path):
    texts = make_texts(20, seed=13, max_words=60)
    lines = [json.dumps({"id": f"r{i}", "text": t}).encode() for i, t in enumerate(texts)]
    bad = {
        "surrogate": b'{"id": "surrogate", "text": "x \\udc00 y"}',
        "deep": b"[" * 100_000 + b"]" * 100_000,
        "bytes": b'{"id": "bytes", "text": "caf\xe9"}',
    }
    for pos, line in zip((2, 9, 15), bad.values(), strict=True):
        lines.insert(pos, line)
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    members = [{"name": "alpha", "model": str(models["alpha"])}]
    plan = plan_for(models, tmp_path, members, input={"max_chars": 25})
    summary = score(plan, path, tmp_path / "o")
    out = read_output(tmp_path / "o")
    assert out.num_rows == len(lines) == summary.rows and summary.errors == 3
    rows = out.to_pylist()
    assert "lone surrogate" in rows[2]["error"]
    assert rows[9]["error"] == "line is nested too deeply to read as JSON"
    assert rows[15]["error"].startswith("line is not valid UTF-8")
    good = [r for r in rows if r["error"] is None]
    assert [r["id"] for r in good] == [f"r{i}" for i in range(20)]
    assert [r["text"] for r in good] == texts  # the output keeps the whole text
    ref = canonical_probs(models["alpha"], [t[:25] for t in texts], LABELS)
    np.testing.assert_allclose(np.array([r["probs"] for r in good]), ref, atol=1e-5)


def test_cli_scores_the_example(no_ray, tmp_path):
    """The README's main command, as a user runs it: its own local Ray instance, exit 0."""
    import shutil
    import subprocess
    import sys

    from jobs.example import write_example

    root = Path(__file__).resolve().parents[1]
    write_example(tmp_path / "examples")
    shutil.copytree(root / "configs", tmp_path / "configs")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "score",
            "configs/example.yaml",
            "--input",
            "examples/data/reviews.jsonl",
            "--output",
            "out",
            "--num-cpus",
            "2",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(root)},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = read_output(tmp_path / "out")
    lines = (tmp_path / "examples" / "data" / "reviews.jsonl").read_text().splitlines()
    assert out.num_rows == len(lines)
    assert sorted(out.column("id").to_pylist()) == sorted(json.loads(x)["id"] for x in lines)
    assert "scored 202 rows (200 ok, 2 with an error)" in proc.stderr
