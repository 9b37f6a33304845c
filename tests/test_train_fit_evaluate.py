"""train -> fit -> evaluate through the CLI on a small learnable task, checked against
plain transformers and scikit-learn."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from sklearn.metrics import accuracy_score
from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

from actors.reducer import normalise, stack
from jobs.cli import main
from pipelines.config import load_config
from pipelines.fitting import nll

POSITIVE = ["good", "great", "lovely", "fun", "enjoyed", "best"]
NEGATIVE = ["bad", "awful", "terrible", "boring", "dull", "worst"]
FILLER = ["the", "film", "movie", "story", "plot", "acting", "music", "scene", "was", "it"]
LABELS = ["negative", "positive"]


def write_set(path: Path, n: int, seed: int, extra: list[dict] = ()) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        label = rng.choice(LABELS)
        marks = POSITIVE if label == "positive" else NEGATIVE
        words = rng.sample(FILLER, rng.randint(3, 7)) + rng.sample(marks, rng.randint(1, 2))
        rng.shuffle(words)
        rows.append({"id": f"r{i}", "text": " ".join(words), "label": label})
    rows += list(extra)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return rows


def logits_of(model_dir: str, texts: list[str]) -> np.ndarray:
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        enc = tok(texts, padding=True, truncation=True, max_length=32, return_tensors="pt")
        return model(**enc).logits.double().numpy()


@pytest.fixture(scope="module")
def trained(ray_cluster, tmp_path_factory):
    from jobs.example import build_classifier

    root = tmp_path_factory.mktemp("tfe")
    # A trainable base: the shared test models are initialised wide on purpose.
    base = build_classifier(
        root / "base", id2label={}, seed=7, task="embedding", hidden=64, initializer_range=0.02
    )
    data = {
        "train": write_set(root / "train.jsonl", 240, 1),
        "val": write_set(root / "val.jsonl", 120, 2),
        "test": write_set(
            root / "test.jsonl",
            120,
            3,
            extra=[
                {"id": "empty", "text": "", "label": "positive"},
                {"id": "unlabelled", "text": "a good film", "label": None},
            ],
        ),
    }
    common = {"base_model": str(base), "batch_size": 16, "cpus_per_worker": 0.5}
    cfg = {
        "name": "tfe",
        "labels": LABELS,
        "members": [
            {
                "name": "full",
                "model": "models/full",
                "max_length": 32,
                # bfloat16 autocast: it must still learn, and keep float32 weights.
                "train": {
                    **common,
                    "seed": 1,
                    "epochs": 6,
                    "learning_rate": 1e-3,
                    "mixed_precision": "bf16",
                },
            },
            {
                "name": "frozen",
                "model": "models/frozen",
                "max_length": 32,
                "train": {
                    **common,
                    "seed": 2,
                    "epochs": 6,
                    "learning_rate": 1e-2,
                    "freeze_encoder": True,
                },
            },
        ],
    }
    path = root / "ensemble.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code = main(
        [
            "train",
            str(path),
            "--input",
            str(root / "train.jsonl"),
            "--label-column",
            "label",
            "--workdir",
            str(root / "checkpoints"),
        ]
    )
    assert code == 0
    return root, path, data


def test_train_writes_members_with_the_ensemble_labels(trained):
    root, _, data = trained
    assert list((root / "checkpoints").iterdir()), "Ray Train kept no checkpoint"
    base = AutoModel.from_pretrained(root / "base").state_dict()
    texts = [r["text"] for r in data["test"][:120]]
    y = np.array([LABELS.index(r["label"]) for r in data["test"][:120]])
    for name, frozen in (("full", False), ("frozen", True)):
        member = root / "models" / name
        config = json.loads((member / "config.json").read_text())
        assert config["id2label"] == {"0": "negative", "1": "positive"}
        model = AutoModelForSequenceClassification.from_pretrained(member)
        encoder = model.base_model.state_dict()
        assert {v.dtype for v in model.state_dict().values() if v.is_floating_point()} == {
            torch.float32
        }
        changed = {k for k in base if not torch.equal(encoder[k], base[k])}
        if frozen:  # only the pooler learns
            assert changed == {"pooler.dense.weight", "pooler.dense.bias"}, changed
        else:
            assert "encoder.layer.0.attention.self.query.weight" in changed
            # learned the task: plain transformers, not our pipeline
            accuracy = (logits_of(str(member), texts).argmax(1) == y).mean()
            assert accuracy > 0.85, f"{name}: test accuracy {accuracy:.2f}"


def test_fit_lowers_nll_and_writes_a_loadable_config(trained):
    root, path, data = trained
    fitted = root / "fitted" / "ensemble.fitted.yaml"
    code = main(
        [
            "fit",
            str(path),
            "--input",
            str(root / "val.jsonl"),
            "--label-column",
            "label",
            "--output",
            str(fitted),
            "--combine",
            "weighted_mean",
        ]
    )
    assert code == 0
    cfg = load_config(fitted)  # model paths rewritten relative to the new folder
    assert cfg.reducer.combine == "weighted_mean"
    assert sum(m.weight for m in cfg.members) == pytest.approx(1.0, abs=1e-5)
    texts = [r["text"] for r in data["val"]]
    y = np.array([LABELS.index(r["label"]) for r in data["val"]])
    member_probs_before, member_probs_after = [], []
    for m in cfg.members:
        z = logits_of(m.model, texts)
        before = normalise(z, temperature=1.0, multi_label=False)
        after = normalise(z, temperature=m.temperature, multi_label=False)
        assert nll(after, y) <= nll(before, y) + 1e-9, m.name
        member_probs_before.append(before)
        member_probs_after.append(after)
    w = np.array([m.weight for m in cfg.members])
    ens_before = np.mean(member_probs_before, axis=0)
    ens_after = np.tensordot(w, np.stack(member_probs_after), axes=1) / w.sum()
    assert nll(ens_after, y) <= nll(ens_before, y) + 1e-9


def test_stacking_is_fitted_stored_as_json_and_used_by_score(trained):
    root, path, _ = trained
    stacked = root / "stacked.yaml"
    args = ["--input", str(root / "val.jsonl"), "--label-column", "label"]
    assert main(["fit", str(path), *args, "--combine", "stacking", "--output", str(stacked)]) == 0
    meta = json.loads((root / "stacked.stacking.json").read_text())
    assert meta["members"] == ["full", "frozen"] and meta["labels"] == LABELS
    out = root / "stacked-scored"
    # `label` is an output column: score a copy of the test set without it.
    unlabelled = root / "test-unlabelled.jsonl"
    rows = [json.loads(line) for line in open(root / "test.jsonl")]
    unlabelled.write_text(
        "".join(json.dumps({k: r[k] for k in ("id", "text")}) + "\n" for r in rows)
    )
    assert main(["score", str(stacked), "--input", str(unlabelled), "--output", str(out)]) == 0
    table = pq.read_table(out).to_pylist()
    assert len(table) == 122
    ok = [r for r in table if r["error"] is None]
    member_probs = np.stack(
        [np.array([r[f"probs__{m}"] for r in ok], dtype=np.float64) for m in ("full", "frozen")]
    )
    expected = stack(member_probs, np.array(meta["coef"]), np.array(meta["intercept"]))
    np.testing.assert_allclose(np.array([r["probs"] for r in ok]), expected, atol=2e-5)


def test_evaluate_never_deletes_what_it_did_not_write(trained, capsys):
    root, path, _ = trained
    report = root / "report-of-someone-else"
    (report / "scored").mkdir(parents=True)
    (report / "scored" / "mine.csv").write_text("precious")
    args = ["--input", str(root / "test.jsonl"), "--label-column", "label"]
    assert main(["evaluate", str(path), *args, "--report", str(report)]) == 2
    err = capsys.readouterr().err
    assert "--report" in err and "mine.csv" in err and "choose an empty or new folder" in err
    assert (report / "scored" / "mine.csv").read_text() == "precious"
    assert sorted(p.name for p in (report / "scored").iterdir()) == ["mine.csv"]


def test_evaluate_writes_metrics_report_and_plots(trained):
    root, path, _ = trained
    report = root / "report"
    args = ["--input", str(root / "test.jsonl"), "--label-column", "label"]
    assert main(["evaluate", str(path), *args, "--report", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    assert metrics["rows"] == 120 and metrics["skipped"] == 2
    assert set(metrics["members"]) == {"full", "frozen"}
    for m in [*metrics["members"].values(), metrics["ensemble"]]:
        assert set(m) == {"accuracy", "macro_f1", "nll", "brier", "ece"}
    # The same figures as a table, one row per model.
    table = pd.read_csv(report / "metrics.csv", index_col="model")
    assert list(table.index) == [*metrics["members"], "ensemble"]
    for name in table.index:
        want = metrics["ensemble"] if name == "ensemble" else metrics["members"][name]
        assert table.loc[name].to_dict() == pytest.approx(want)
    rows = pq.read_table(report / "scored").to_pylist()
    assert len(rows) == 122  # every input row, the true label kept as true_label
    truth = {r["id"]: r["label"] for r in map(json.loads, open(root / "test.jsonl"))}
    assert all(r["true_label"] == truth[r["id"]] for r in rows)
    scored = [r for r in rows if r["error"] is None and r["true_label"] is not None]
    assert len(scored) == 120
    y = [LABELS.index(r["true_label"]) for r in scored]
    pred = [int(np.argmax(r["probs"])) for r in scored]
    assert metrics["ensemble"]["accuracy"] == pytest.approx(accuracy_score(y, pred))
    gain = metrics["gain"]
    best = gain["best_member"]
    assert metrics["members"][best]["accuracy"] == max(
        m["accuracy"] for m in metrics["members"].values()
    )
    for what in ("accuracy", "nll"):
        g = gain[what]
        assert g["delta"] == pytest.approx(
            metrics["ensemble"][what] - metrics["members"][best][what], abs=1e-9
        )
        assert g["low"] <= g["delta"] <= g["high"]
    for png in ("reliability.png", "confusion.png"):
        blob = (report / png).read_bytes()
        assert blob[:8] == b"\x89PNG\r\n\x1a\n" and len(blob) > 5000
    assert "| **ensemble** |" in (report / "report.md").read_text()
    assert f"Ensemble vs its best member here, `{best}`" in (report / "report.md").read_text()


def test_usage_errors_exit_2(trained, tmp_path, capsys):
    root, path, _ = trained
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "a film", "label": "neutral"}) + "\n")
    args = ["--label-column", "label", "--output", str(tmp_path / "f.yaml")]
    assert main(["fit", str(path), "--input", str(bad), *args]) == 2
    assert "not labels of this ensemble" in capsys.readouterr().err
    assert (
        main(
            [
                "fit",
                str(path),
                "--input",
                str(root / "val.jsonl"),
                "--label-column",
                "nope",
                "--output",
                str(tmp_path / "g.yaml"),
            ]
        )
        == 2
    )
    assert "no column 'nope'" in capsys.readouterr().err
    plain = tmp_path / "plain.yaml"
    plain.write_text(
        yaml.safe_dump(
            {
                "name": "p",
                "labels": LABELS,
                "members": [{"name": "a", "model": str(root / "models" / "full")}],
            }
        )
    )
    assert (
        main(["train", str(plain), "--input", str(root / "train.jsonl"), "--label-column", "label"])
        == 2
    )
    assert "no member has a train: block" in capsys.readouterr().err
