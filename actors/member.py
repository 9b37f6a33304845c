"""The member host: one model, loaded once, called on batches of rows.

A plain callable class, so it runs (and is tested) without Ray as well as inside a
Ray Data actor pool. Everything model-specific sits behind :class:`MemberBackend`.

Example::

    host = MemberHost(member=cfg.members[0], spec=spec, task="classification",
                      num_labels=2, text_column="text")
    logits = host.infer(["a fine film", "a dull plot"])   # (2, num_labels), aligned
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from concurrent.futures import Executor
from typing import Any, Protocol

import numpy as np

from actors.backends import TOKEN_INPUTS, TokenizedBackend
from actors.loading import MemberSpec, load_hf_model, pick_device
from actors.reducer import align_logits

__all__ = [
    "BACKENDS",
    "HFBackend",
    "MemberBackend",
    "MemberHost",
    "make_backend",
    "member_output_column",
]


class MemberBackend(Protocol):
    """What a member's model must offer. Hugging Face, custom and ONNX models plug in here."""

    pad_token_id: int

    def encode(
        self, texts: Sequence[str], pairs: Sequence[str] | None
    ) -> dict[str, list[list[int]]]:
        """Token ids (and any other per-token inputs) per row, truncated, not padded."""
        ...

    def forward(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Padded ``(b, t)`` int arrays (with ``attention_mask``) in, ``(b, k)`` float32 out:
        logits for classification, a pooled vector for embeddings."""
        ...


class HFBackend(TokenizedBackend):
    """A transformers model: sequence classification logits, or mean-pooled embeddings."""

    forward_in_threads = True

    def __init__(self, member: Any, task: str, device: str) -> None:
        import inspect

        import torch

        self._torch = torch
        self.device = device
        self.task = task
        tokenizer, self.model = load_hf_model(member, task, device)
        # The model takes only the inputs its forward() names (e.g. no token_type_ids for RoBERTa).
        accepted = set(inspect.signature(self.model.forward).parameters)
        self._use_tokenizer(
            tokenizer,
            member.max_length,
            [k for k in TOKEN_INPUTS if k in accepted],
            member.model,
        )
        self._keys = self._encoder.keys

    def forward(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        tensors = {
            k: torch.from_numpy(v).to(self.device, non_blocking=True)
            for k, v in inputs.items()
            if k in self._keys
        }
        with torch.inference_mode():
            out = self.model(**tensors)
            if self.task == "embedding":
                # Summed in float32: a half-precision sum over many tokens loses digits.
                hidden = out.last_hidden_state.float()
                mask = tensors["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)
                return pooled.cpu().numpy()
            return out.logits.float().cpu().numpy()


def _hf(member: Any, task: str, device: str, threads: int | None) -> MemberBackend:
    return HFBackend(member, task, device)


def _torch(member: Any, task: str, device: str, threads: int | None) -> MemberBackend:
    from actors.backends import TorchModuleBackend

    return TorchModuleBackend(member, task, device)


def _onnx(member: Any, task: str, device: str, threads: int | None) -> MemberBackend:
    from actors.backends import OnnxBackend

    return OnnxBackend(member, task, device, threads)


# The one place the backends are named (the config key `backend` takes these): a new one
# is a MemberBackend class and an entry here.
BACKENDS = {"hf": _hf, "torch": _torch, "onnx": _onnx}


def make_backend(member: Any, task: str, device: str, threads: int | None = None) -> MemberBackend:
    """The member's model, loaded on ``device``, behind the one backend interface."""
    from actors.loading import import_member_modules

    import_member_modules(member)
    return BACKENDS[member.backend](member, task, device, threads)


def member_output_column(name: str) -> str:
    """The intermediate column a member writes; the reducer consumes and drops it."""
    return f"__member__{name}"


def pad_batch(
    encoded: dict[str, list[list[int]]], rows: Sequence[int], pad_token_id: int
) -> dict[str, np.ndarray]:
    """Right-pad the chosen rows to their longest length."""
    ids = encoded["input_ids"]
    width = max(len(ids[r]) for r in rows)
    out: dict[str, np.ndarray] = {}
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for key, seqs in encoded.items():
        arr = np.full((len(rows), width), pad_token_id if key == "input_ids" else 0, dtype=np.int64)
        for j, r in enumerate(rows):
            seq = seqs[r]
            arr[j, : len(seq)] = seq
            mask[j, : len(seq)] = 1
        out[key] = arr
    out["attention_mask"] = mask
    return out


# On CPU, a forward pass costs about rows x longest row, and big passes fall out of cache:
# one MiniLM ran 107-123 rows/s with passes of at most 1,024-2,048 padded tokens against
# 93-97 with 64-row passes (bench/microbatch_probe.py). GPUs want big batches.
CPU_BATCH_TOKENS = 2048


def micro_batches(lengths: np.ndarray, max_rows: int, max_tokens: int | None) -> list[np.ndarray]:
    """Row indices sorted by length, cut into micro-batches of at most ``max_rows`` rows and
    ``max_tokens`` padded tokens (rows x longest row). A row longer than ``max_tokens`` runs
    alone. Sorting keeps rows of one micro-batch alike, so padding stays small."""
    order = np.argsort(lengths, kind="stable")
    n = len(order)
    if max_tokens is None:
        return [order[i : i + max_rows] for i in range(0, n, max_rows)]
    batches = []
    start = 0
    while start < n:
        stop = start + 1
        # Ascending order: the row being added is the longest, so it sets the width.
        while (
            stop < n
            and stop - start < max_rows
            and (stop + 1 - start) * lengths[order[stop]] <= max_tokens
        ):
            stop += 1
        batches.append(order[start:stop])
        start = stop
    return batches


class MemberHost:
    """Runs one member over lists of texts: tokenise, sort by length, micro-batch,
    forward, align. :class:`actors.host.EnsembleHost` runs several over table windows."""

    def __init__(
        self,
        *,
        member: Any,
        spec: MemberSpec,
        task: str,
        num_labels: int,
        text_column: str,
        text_pair_column: str | None = None,
        threads: int | None = None,
        backend: MemberBackend | None = None,
        pool: Executor | None = None,
    ) -> None:
        """``pool``: threads to run micro-batches on side by side (CPU torch backends only)."""
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.member = member
        self.spec = spec
        self.task = task
        self.num_labels = num_labels
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.output_column = member_output_column(member.name)
        device = pick_device(member.num_gpus)
        self.backend = backend or make_backend(member, task, device, threads)
        self.max_batch_tokens = member.max_batch_tokens or (
            CPU_BATCH_TOKENS if device == "cpu" else None
        )
        parallel = device == "cpu" and getattr(self.backend, "forward_in_threads", False)
        self.pool = pool if parallel else None
        # Counters for padding efficiency: real tokens / padded tokens.
        self.real_tokens = 0
        self.padded_tokens = 0

    @property
    def tokenizer_key(self) -> object:
        """Members with equal keys tokenise a text the same way: a host tokenises once for them."""
        return getattr(self.backend, "tokenizer_key", None) or id(self.backend)

    def encode(
        self, texts: Sequence[str], pairs: Sequence[str] | None = None
    ) -> dict[str, list[list[int]]]:
        return self.backend.encode(texts, pairs)

    def infer(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> np.ndarray:
        """Outputs for a list of valid texts, in their order: aligned logits ``(n, L)`` or
        raw embeddings ``(n, d)``, float32."""
        if not texts:
            return self.run_encoded({"input_ids": []})
        return self.run_encoded(self.encode(texts, pairs))

    def run_encoded(self, encoded: dict[str, list[list[int]]]) -> np.ndarray:
        """Sort by length, micro-batch, forward and align rows already tokenised."""
        n = len(encoded["input_ids"])
        if n == 0:
            width = (
                self.num_labels if self.task == "classification" else (self.spec.hidden_size or 0)
            )
            return np.zeros((0, width), dtype=np.float32)
        lengths = np.fromiter((len(x) for x in encoded["input_ids"]), dtype=np.int64, count=n)
        batches = micro_batches(lengths, self.member.batch_size, self.max_batch_tokens)
        self.real_tokens += int(lengths.sum())
        self.padded_tokens += sum(len(rows) * int(lengths[rows].max()) for rows in batches)

        def forward(rows: np.ndarray) -> np.ndarray:
            return self.backend.forward(pad_batch(encoded, rows, self.backend.pad_token_id))

        if self.pool is None or len(batches) == 1:
            chunks = [forward(rows) for rows in batches]
        else:
            chunks = list(self.pool.map(forward, batches))
        raw = np.empty((n, chunks[0].shape[1]), dtype=np.float32)
        raw[np.concatenate(batches)] = np.concatenate(chunks)
        if self.task == "embedding":
            return raw
        return align_logits(
            raw, self.spec.label_index, self.num_labels, single_logit=self.spec.single_logit
        ).astype(np.float32)

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else math.nan
