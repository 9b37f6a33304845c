"""The demo's members that are not fine-tuned transformers, and how their heads are fitted.

- :class:`BagOfPieces` is a linear model over the set of word pieces in a text: another
  model family than the encoders, with other mistakes. It is also the worked example of
  a custom member (``backend: torch``): a plain ``nn.Module`` whose ``forward`` takes the
  tokenizer's ``input_ids`` / ``attention_mask`` and returns logits, saved as
  ``model.safetensors`` beside a ``config.json`` of its keyword arguments::

      - name: pieces
        backend: torch
        module: jobs.demo_members:BagOfPieces
        model: models/pieces            # model.safetensors + config.json
        tokenizer: <a BERT tokenizer directory>

- :class:`MeanPooledHead` is a frozen sentence encoder (the demo's all-mpnet-base-v2),
  mean-pooled over the attention mask, with a linear head: a strong member that costs no
  fine-tuning, only one pass over the training rows to fit its head.
- :func:`bert_from_onnx` turns a BERT sentence encoder shipped only as an ONNX graph
  back into a transformers checkpoint, so Ray Train can fine-tune it like any member.

Both heads are scikit-learn logistic regressions whose regularisation is chosen by
cross-validated log-loss on the training rows alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

logger = logging.getLogger(__name__)

__all__ = [
    "BagOfPieces",
    "MeanPooledHead",
    "bert_from_onnx",
    "fit_linear_head",
    "member_outputs",
    "piece_presence",
    "train_bag_of_pieces",
    "train_pooled_head",
]

# The regularisation grid the heads' cross-validation chooses from (sklearn's C).
HEAD_C = (0.03, 0.1, 0.3, 1.0, 3.0)
HEAD_FOLDS = 5


class BagOfPieces(nn.Module):
    """Logits = W · presence + b, where ``presence`` marks each word piece a text holds
    (once, however often it occurs) except the tokenizer's special tokens."""

    def __init__(self, vocab_size: int, num_labels: int, ignore_ids: Sequence[int] = ()) -> None:
        super().__init__()
        self.linear = nn.Linear(vocab_size, num_labels)
        ignore = torch.tensor(sorted(set(ignore_ids)), dtype=torch.long)
        self.register_buffer("ignore", ignore, persistent=False)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        # In the weights' dtype: `dtype: auto` is bfloat16 on CPUs that multiply it natively.
        present = torch.zeros(
            input_ids.shape[0],
            self.linear.in_features,
            device=input_ids.device,
            dtype=self.linear.weight.dtype,
        )
        present.scatter_reduce_(1, input_ids, attention_mask.to(present.dtype), reduce="amax")
        present[:, self.ignore] = 0
        return self.linear(present)


class MeanPooledHead(nn.Module):
    """Logits = W · mean(encoder hidden states over the real tokens) + b.

    ``encoder`` is the encoder's transformers config as a dict (``config.to_dict()``), so
    the member directory holds everything: weights, this config and the tokenizer."""

    def __init__(self, encoder: dict[str, Any], num_labels: int) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        settings = dict(encoder)
        config = AutoConfig.for_model(settings.pop("model_type"), **settings)
        try:
            from transformers.initialization import no_init_weights
        except ImportError:  # another transformers: initialise, at a few seconds' cost
            no_init_weights = contextlib.nullcontext
        # Random initialisation is wasted: the member's weights are always loaded next.
        with no_init_weights():
            self.encoder = AutoModel.from_config(config, add_pooling_layer=False)
        self.head = nn.Linear(config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        # Pooled and projected in float32 whatever the encoder's dtype, as the head was fitted.
        hidden = hidden.last_hidden_state.float()
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
        return nn.functional.linear(pooled, self.head.weight.float(), self.head.bias.float())


def member_outputs(member: Any, task: str, texts: Sequence[str]) -> np.ndarray:
    """Logits (``classification``: two, in the model's own order) or mean-pooled vectors
    (``embedding``) of one member in this process, through the same code a scoring job
    runs (length-sorted micro-batches)."""
    from actors.host import MemberHost
    from actors.tasks import MemberSpec
    from pipelines.config import EnsembleConfig
    from pipelines.plan import EnsemblePlan

    # Unvalidated on purpose: a probe of one member, with its outputs taken as they come.
    cfg = EnsembleConfig.model_construct(name="probe", task=task, labels=["0", "1"])
    spec = MemberSpec(member.name, label_index=(0, 1))
    host = MemberHost(member=member, spec=spec, plan=EnsemblePlan(cfg, (spec,)))
    return host.infer(list(texts))


def train_pooled_head(
    texts: Sequence[str],
    y: np.ndarray,
    *,
    encoder_dir: str | Path,
    num_labels: int,
    out: str | Path,
    max_length: int,
    batch_size: int = 64,
    dtype: str = "auto",
) -> float:
    """Fit the head on the frozen encoder's pooled vectors of ``texts`` and save the
    encoder and the head as a ``backend: torch`` :class:`MeanPooledHead` member."""
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoTokenizer

    from pipelines.config import MemberConfig

    encoder = MemberConfig(
        name="encoder",
        model=str(encoder_dir),
        max_length=max_length,
        batch_size=batch_size,
        dtype=dtype,
    )
    vectors = member_outputs(encoder, "embedding", texts)
    weight, bias, c = fit_linear_head(vectors, y, num_labels)

    from transformers.utils import logging as hf_logging

    # Its load report lists the checkpoint's unused pooler, which the member never runs.
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        pretrained = AutoModel.from_pretrained(str(encoder_dir), add_pooling_layer=False)
    finally:
        hf_logging.set_verbosity(verbosity)
    model = MeanPooledHead(pretrained.config.to_dict(), num_labels)
    model.encoder.load_state_dict(pretrained.state_dict())
    model.head.weight.data = torch.from_numpy(weight)
    model.head.bias.data = torch.from_numpy(bias)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, out / "model.safetensors")
    (out / "config.json").write_text(
        json.dumps({"encoder": pretrained.config.to_dict(), "num_labels": num_labels})
    )
    AutoTokenizer.from_pretrained(str(encoder_dir)).save_pretrained(out)
    return c


def piece_presence(ids: Sequence[Sequence[int]], vocab_size: int, ignore_ids: Sequence[int]):
    """The sparse ``(n, vocab)`` 0/1 matrix :class:`BagOfPieces` builds, for scikit-learn."""
    from scipy.sparse import csr_matrix

    ignore = set(ignore_ids)
    indptr, indices = [0], []
    for row in ids:
        pieces = sorted(set(row) - ignore)
        indices.extend(pieces)
        indptr.append(len(indices))
    data = np.ones(len(indices), dtype=np.float32)
    return csr_matrix((data, indices, indptr), shape=(len(ids), vocab_size))


def fit_linear_head(x: Any, y: np.ndarray, num_labels: int, seed: int = 0):
    """A logistic regression with C chosen by cross-validated log-loss, as ``(W, b)`` with
    one row per label: the softmax of ``x @ W.T + b`` is its predicted distribution."""
    from sklearn.linear_model import LogisticRegressionCV

    with warnings.catch_warnings():
        # scikit-learn 1.9 announces new defaults (for 1.10) for l1_ratios and the fitted attributes;
        # an L2 penalty and C_ read the same under both.
        warnings.simplefilter("ignore", FutureWarning)
        model = LogisticRegressionCV(
            Cs=list(HEAD_C), cv=HEAD_FOLDS, scoring="neg_log_loss", max_iter=3000, random_state=seed
        ).fit(x, y)
    coef, intercept = model.coef_.astype(np.float32), model.intercept_.astype(np.float32)
    if num_labels == 2 and coef.shape[0] == 1:
        # Binary: sigmoid(z) is the softmax of (-z/2, z/2).
        coef = np.concatenate([-coef / 2, coef / 2])
        intercept = np.concatenate([-intercept / 2, intercept / 2])
    if list(model.classes_) != list(range(num_labels)):
        raise ValueError(
            f"the training labels cover {list(model.classes_)}, not all {num_labels} labels"
        )
    c = float(np.ravel(model.C_)[0])
    logger.info("head: C=%s by %d-fold CV log-loss", c, HEAD_FOLDS)
    return coef, intercept, c


def train_bag_of_pieces(
    texts: Sequence[str],
    y: np.ndarray,
    *,
    tokenizer_dir: str | Path,
    max_length: int,
    num_labels: int,
    out: str | Path,
) -> float:
    """Fit the model on ``texts`` and save it as a ``backend: torch`` member directory."""
    from safetensors.torch import save_file
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    ignore = sorted(set(tokenizer.all_special_ids))
    vocab = len(tokenizer)
    weight, bias, c = fit_linear_head(piece_presence(ids, vocab, ignore), y, num_labels)
    model = BagOfPieces(vocab, num_labels, ignore)
    model.linear.weight.data = torch.from_numpy(weight)
    model.linear.bias.data = torch.from_numpy(bias)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, out / "model.safetensors")
    (out / "config.json").write_text(
        json.dumps({"vocab_size": vocab, "num_labels": num_labels, "ignore_ids": ignore})
    )
    # The member folder carries its tokenizer: configs then name no path outside it.
    tokenizer.save_pretrained(str(out))
    return c


def bert_from_onnx(
    onnx_file: str | Path,
    tokenizer_dir: str | Path,
    out: str | Path,
    *,
    num_attention_heads: int,
    prefix: str = "model.0.auto_model.",
) -> Path:
    """Turn a sentence-transformers BERT encoder exported to ONNX back into a transformers
    checkpoint, so it can be fine-tuned like any other member.

    Named initializers keep their PyTorch names; a linear layer's weight is an anonymous
    MatMul initializer, named here after the bias its Add node takes. The result is
    checked against onnxruntime on one sentence before it is written."""
    import onnx
    import onnxruntime as ort
    from onnx import numpy_helper
    from transformers import AutoTokenizer, BertConfig, BertModel

    graph = onnx.load(str(onnx_file)).graph
    init = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    state = {k[len(prefix) :]: v for k, v in init.items() if k.startswith(prefix)}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else None
        if weight not in init or weight.startswith(prefix):
            continue
        bias = next(
            i
            for add in consumers[node.output[0]]
            if add.op_type == "Add"
            for i in add.input
            if i.startswith(prefix)
        )
        state[bias[len(prefix) : -len("bias")] + "weight"] = init[weight].T
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    config = BertConfig(
        vocab_size=state["embeddings.word_embeddings.weight"].shape[0],
        hidden_size=state["embeddings.word_embeddings.weight"].shape[1],
        num_hidden_layers=layers,
        num_attention_heads=num_attention_heads,
        intermediate_size=state["encoder.layer.0.intermediate.dense.bias"].shape[0],
        max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0],
    )
    model = BertModel(config, add_pooling_layer=False).eval()
    model.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in state.items()}, strict=True)

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    enc = tokenizer(["a quietly moving film, if a little too long"], return_tensors="np")
    session = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    feed = {i.name: enc[i.name].astype(np.int64) for i in session.get_inputs()}
    hidden = next(o for o in session.run(None, feed) if o.ndim == 3)
    with torch.inference_mode():
        ours = model(**{k: torch.from_numpy(v) for k, v in feed.items()}).last_hidden_state
    gap = float(np.abs(ours.numpy() - hidden).max())
    if gap > 1e-3:
        raise ValueError(f"the converted encoder differs from {onnx_file} by {gap:.2e}")
    out = Path(out)
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    logger.info("converted %s to %s (largest difference %.1e)", Path(onnx_file).name, out, gap)
    return out
