"""Small Hugging Face models built from a config, with fixed seeds, for the example and tests.

The hub is not reachable everywhere we run, so tiny models are made locally and saved
with ``save_pretrained``: the real loading code then runs on them. Their weights are
random, so their scores mean nothing; they exercise the machinery.

    python -m jobs.example --workdir examples   # models + data for configs/example.yaml
"""

from __future__ import annotations

import argparse
import json
import random
from collections.abc import Mapping, Sequence
from pathlib import Path

__all__ = [
    "build_bpe_tokenizer",
    "build_classifier",
    "build_tagger",
    "build_tokenizer",
    "make_texts",
    "write_example",
]

WORDS = (
    "the a an and or but not no very really quite so too this that it is was be been are "
    "good great fine bad awful terrible lovely boring dull fun funny sad happy film movie "
    "story plot actor actors acting scene scenes music score ending start end time love hate "
    "liked disliked enjoyed best worst ever never always again watch watched see seen "
    "i you he she we they me my our their of in on at to for with from by about as"
).split()


def build_tokenizer(path: str | Path, *, words: Sequence[str] = WORDS, lowercase: bool = True):
    """A WordPiece tokenizer over a small vocabulary, saved as a transformers fast tokenizer."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    chars = list("abcdefghijklmnopqrstuvwxyz0123456789.,!?'-")
    if not lowercase:
        chars += list("ABCDEFGHIJKLMNOPQRSTUVWXYZ")
    tokens = special + list(dict.fromkeys([*words, *chars, *("##" + c for c in chars)]))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
    tok.normalizer = normalizers.BertNormalizer(lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=512,
    )
    fast.save_pretrained(str(path))
    return fast


def build_classifier(
    path: str | Path,
    *,
    id2label: Mapping[int, str],
    arch: str = "bert",
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    problem_type: str | None = None,
    words: Sequence[str] = WORDS,
    lowercase: bool = True,
    task: str = "classification",
    initializer_range: float = 0.5,
) -> Path:
    """Save a randomly initialised sequence classifier (or encoder) and its tokenizer.

    The default wide ``initializer_range`` makes members disagree visibly; a base model to
    fine-tune wants the usual 0.02.
    """
    import torch
    from transformers import BertConfig, DistilBertConfig

    path = Path(path)
    tokenizer = build_tokenizer(path, words=words, lowercase=lowercase)
    labels = {int(k): v for k, v in id2label.items()}
    common = {
        "vocab_size": len(tokenizer),
        "num_labels": max(len(labels), 1),
        "id2label": labels or None,
        "label2id": {v: k for k, v in labels.items()} or None,
        "pad_token_id": tokenizer.pad_token_id,
        "max_position_embeddings": 512,
        "initializer_range": initializer_range,
    }
    if problem_type:
        common["problem_type"] = problem_type
    if arch == "bert":
        config = BertConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=hidden * 2,
            **common,
        )
    elif arch == "distilbert":
        config = DistilBertConfig(
            dim=hidden, n_layers=layers, n_heads=2, hidden_dim=hidden * 2, **common
        )
    else:
        raise ValueError(f"unknown arch {arch!r}: bert | distilbert")
    torch.manual_seed(seed)
    import transformers

    from actors.tasks import get_task

    cls = getattr(transformers, get_task(task).hf_model_class)
    model = cls.from_config(config)
    model.eval()
    model.save_pretrained(str(path))
    return path


def build_bpe_tokenizer(path: str | Path, *, words: Sequence[str] = WORDS, vocab_size: int = 400):
    """A byte-level BPE tokenizer (RoBERTa's kind) trained on sentences of ``words``: it
    splits words differently from :func:`build_tokenizer` and keeps spaces in its tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    rng = random.Random(0)
    corpus = [" ".join(rng.choice(words) for _ in range(12)) for _ in range(200)]
    tok.train_from_iterator(corpus, trainer)
    tok.post_processor = processors.RobertaProcessing(
        ("</s>", tok.token_to_id("</s>")), ("<s>", tok.token_to_id("<s>")), trim_offsets=True
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        cls_token="<s>",
        sep_token="</s>",
        mask_token="<mask>",
        model_max_length=512,
    )
    fast.save_pretrained(str(path))
    return fast


def build_tagger(
    path: str | Path,
    *,
    tags: Sequence[str],
    tokenizer: str = "wordpiece",
    seed: int = 0,
    hidden: int = 32,
    layers: int = 2,
    initializer_range: float = 0.5,
) -> Path:
    """Save a randomly initialised ``BertForTokenClassification`` with ``tags`` as its
    labels, and its tokenizer: ``wordpiece`` (:func:`build_tokenizer`) or ``bpe``
    (:func:`build_bpe_tokenizer`)."""
    import torch
    from transformers import BertConfig, BertForTokenClassification

    path = Path(path)
    if tokenizer == "wordpiece":
        tok = build_tokenizer(path)
    elif tokenizer == "bpe":
        tok = build_bpe_tokenizer(path)
    else:
        raise ValueError(f"unknown tokenizer {tokenizer!r}: wordpiece | bpe")
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=2,
        intermediate_size=hidden * 2,
        num_labels=len(tags),
        id2label=dict(enumerate(tags)),
        label2id={t: i for i, t in enumerate(tags)},
        pad_token_id=tok.pad_token_id,
        max_position_embeddings=512,
        initializer_range=initializer_range,
    )
    torch.manual_seed(seed)
    model = BertForTokenClassification(config)
    model.eval()
    model.save_pretrained(str(path))
    return path


def make_texts(n: int, *, seed: int = 0, min_words: int = 1, max_words: int = 60) -> list[str]:
    """Sentences of mixed lengths from the toy vocabulary."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        # Mostly short, some long: like real reviews, where padding matters.
        length = min(max_words, max(min_words, int(rng.expovariate(1 / 14)) + min_words))
        out.append(" ".join(rng.choice(WORDS) for _ in range(length)))
    return out


def write_example(workdir: str | Path) -> Path:
    """Three tiny members with different architectures and label names, and a dataset."""
    workdir = Path(workdir)
    models = workdir / "models"
    build_classifier(models / "alpha", id2label={0: "negative", 1: "positive"}, seed=1)
    build_classifier(
        models / "beta", id2label={0: "POSITIVE", 1: "NEGATIVE"}, arch="distilbert", seed=2
    )
    build_classifier(models / "gamma", id2label={0: "LABEL_0", 1: "LABEL_1"}, seed=3, layers=1)
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"r{i:03d}", "text": t} for i, t in enumerate(make_texts(200, seed=7))]
    rows += [{"id": "bad-null", "text": None}, {"id": "bad-number", "text": 42}]
    with open(data / "reviews.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    return workdir


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", default="examples", help="where to write models/ and data/")
    args = parser.parse_args(argv)
    out = write_example(args.workdir)
    print(f"wrote {out}/models/{{alpha,beta,gamma}} and {out}/data/reviews.jsonl")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
