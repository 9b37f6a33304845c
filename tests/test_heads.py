"""Heads that do not fit the task are refused at plan time; decoder-only classifiers get
a pad token they can use, and a batch of mixed lengths equals plain transformers one
row at a time."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from actors.host import MemberHost
from jobs.example import WORDS, build_tokenizer, make_texts
from pipelines.config import ConfigError, config_from_dict
from pipelines.plan import plan_ensemble

LABELS = ["negative", "positive"]
ID2LABEL = {0: "negative", 1: "positive"}


def decoder_tokenizer(path: Path, *, pad: bool, eos: bool):
    """A byte-pair-free word-level tokenizer with BOS (and EOS, and PAD when asked), as
    decoder-only models ship them: no pad token unless one is added."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    special = ["<unk>", "<s>", *(["</s>"] if eos else []), *(["<pad>"] if pad else [])]
    vocab = {tok: i for i, tok in enumerate(special + list(dict.fromkeys(WORDS)))}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A $B:1", special_tokens=[("<s>", vocab["<s>"])]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>" if eos else None,
        pad_token="<pad>" if pad else None,
    )
    fast.save_pretrained(str(path))
    return fast


def decoder_classifier(
    path: Path, arch: str, *, pad: bool, eos: bool, config_pad: int | None = None, seed=0
) -> Path:
    from transformers import (
        AutoModelForSequenceClassification,
        LlamaConfig,
        Qwen2Config,
    )

    tok = decoder_tokenizer(path, pad=pad, eos=eos)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config}[arch]
    config = cls(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        num_labels=2,
        id2label=ID2LABEL,
        label2id={v: k for k, v in ID2LABEL.items()},
        pad_token_id=config_pad,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        initializer_range=0.5,
    )
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_config(config).eval()
    model.save_pretrained(str(path))
    return path


def plain_one_at_a_time(model_dir: Path, texts: list[str]) -> np.ndarray:
    """transformers as saved, one row per forward: no padding, so no pad token needed."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSequenceClassification.from_pretrained(str(model_dir)).eval()
    rows = []
    with torch.no_grad():
        for text in texts:
            enc = tok(text, return_tensors="pt")
            rows.append(model(**enc).logits[0].double().numpy())
    return np.stack(rows)


def plan_of(tmp_path: Path, model: Path, **member):
    return plan_ensemble(
        config_from_dict(
            {
                "name": "t",
                "labels": LABELS,
                "members": [{"name": "m", "model": str(model), **member}],
            },
            base_dir=tmp_path,
        )
    )


@pytest.mark.parametrize(
    "arch, pad, eos, config_pad",
    [
        # No pad anywhere: the tokenizer's EOS pads, and is set on the config.
        ("llama", False, True, None),
        # The tokenizer has a pad token, the config does not.
        ("qwen2", True, True, None),
        # The config names a pad id the tokenizer does not declare: pad with the config's,
        # not with 0, or the classifier reads the logits at a pad position.
        ("llama", False, True, 2),
        ("qwen2", False, False, 1),
    ],
)
def test_decoder_only_batches_equal_plain_transformers_one_row_at_a_time(
    tmp_path, arch, pad, eos, config_pad
):
    model = decoder_classifier(tmp_path / arch, arch, pad=pad, eos=eos, config_pad=config_pad)
    texts = make_texts(12, seed=3, min_words=1, max_words=30)
    assert len({len(t.split()) for t in texts}) > 4  # rows of different lengths, padded together
    plan = plan_of(tmp_path, model, batch_size=16, max_batch_tokens=100_000)
    host = MemberHost(member=plan.config.members[0], spec=plan.specs[0], plan=plan, threads=1)
    batched = host.infer(texts)
    assert host.padded_tokens > host.real_tokens  # the batch really was padded
    np.testing.assert_allclose(batched, plain_one_at_a_time(model, texts), rtol=1e-4, atol=1e-5)


def test_decoder_only_without_pad_or_eos_is_refused(tmp_path):
    model = decoder_classifier(tmp_path / "bare", "llama", pad=False, eos=False)
    with pytest.raises(ConfigError) as err:
        plan_of(tmp_path, model)
    message = str(err.value)
    assert "members[0] (m)" in message
    assert "decoder-only" in message and "pad" in message


def token_classifier(path: Path) -> Path:
    from transformers import AutoModelForTokenClassification, BertConfig

    tok = build_tokenizer(path)
    config = BertConfig(
        vocab_size=len(tok),
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
        id2label={0: "O", 1: "B-PER", 2: "I-PER"},
    )
    AutoModelForTokenClassification.from_config(config).save_pretrained(str(path))
    return path


def regression_head(path: Path) -> Path:
    from jobs.example import build_classifier

    return build_classifier(path, id2label={0: "LABEL_0"}, problem_type="regression")


@pytest.mark.parametrize(
    "build, head, needle",
    [
        (token_classifier, "BertForTokenClassification", "token_classification"),
        (regression_head, "regression", "problem_type: regression"),
    ],
)
def test_a_head_that_does_not_fit_is_a_config_error(tmp_path, build, head, needle):
    model = build(tmp_path / "m")
    with pytest.raises(ConfigError) as err:
        plan_of(tmp_path, model)
    message = str(err.value)
    assert message.startswith("members[0] (m):")
    assert head in message and needle in message
    assert "classification ensemble needs" in message or "no task here" in message


def test_cli_refuses_a_token_classifier_with_exit_2(tmp_path):
    model = token_classifier(tmp_path / "tok")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"name: t\nlabels: [negative, positive]\nmembers:\n  - name: tok\n    model: {model}\n"
    )
    data = tmp_path / "in.jsonl"
    data.write_text('{"text": "a fine film"}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "score", str(config), "--input", str(data)]
        + ["--output", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert "members[0] (tok)" in proc.stderr and "BertForTokenClassification" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_pickled_weights_load_only_when_the_member_allows_them(tmp_path):
    from jobs.example import build_classifier
    from tests.oracle import plain_logits

    model = build_classifier(tmp_path / "m", id2label=ID2LABEL, seed=4)
    reference = plain_logits(model, ["a fine film", "a dull plot"])
    weights = model / "model.safetensors"
    from safetensors.torch import load_file

    torch.save(load_file(str(weights)), model / "pytorch_model.bin")
    weights.unlink()
    with pytest.raises(ConfigError) as err:
        plan_of(tmp_path, model)
    message = str(err.value)
    assert "members[0] (m)" in message and "pytorch_model.bin" in message
    assert "allow_pickle: true" in message
    plan = plan_of(tmp_path, model, allow_pickle=True)
    host = MemberHost(member=plan.config.members[0], spec=plan.specs[0], plan=plan, threads=1)
    np.testing.assert_allclose(host.infer(["a fine film", "a dull plot"]), reference, atol=1e-5)
