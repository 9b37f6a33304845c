"""The ensemble host: the unit Ray schedules, offline and online.

One plain callable class that holds one or more members and runs a window of rows
through all of them in one call: cut each text to ``input.max_chars``, tokenise once per
distinct tokenizer, sort by length, micro-batch, forward each member, align. When it
holds every member it also reduces (normalise, combine, uncertainty), so a window
leaves it in the output contract's columns. Members in one process cost no RPC between
them (Triton's lesson); hosts keep nothing across calls, so a retried call or a
restarted actor simply recomputes its window.

Example::

    from pipelines.config import load_config
    from pipelines.plan import plan_ensemble

    plan = plan_ensemble(load_config("configs/example.yaml"))
    host = EnsembleHost(plan=plan)
    out = host(table)       # table: the input columns plus `error` (null = score this row)
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.member import MemberBackend, MemberHost, member_output_column
from actors.reducer import Reduced, combine_embeddings, l2_normalise, reduce_classification

if TYPE_CHECKING:
    from pipelines.plan import EnsemblePlan

__all__ = [
    "LABELS_METADATA_KEY",
    "EnsembleHost",
    "UnscorableText",
    "member_outputs",
    "reduce_batch",
    "reduce_members",
]

LABELS_METADATA_KEY = b"ray_ensemble.labels"


class UnscorableText(ValueError):
    """A member's tokenizer refused the texts (a lone surrogate, say): the caller's
    input is at fault, not the host, so online this is the request's 422."""


class EnsembleHost:
    """Runs windows of rows through ``members`` (default: all) and, when it holds them
    all, through the reducer. Rows whose ``error`` is set are passed through unscored.

    ``reduce``: default True when the host holds every member; a host that holds some
    adds their ``__member__<name>`` columns and a later stateless step reduces.
    ``progress``: an actor handle whose ``add.remote(rows)`` is told of each window.
    ``backends``: ready member backends by name (tests run the host without weights).
    ``observe``: called with (member name, seconds) after each member's forward pass.
    ``batch_threads``: on CPU with ``threads`` > 1, run micro-batches side by side on that
    many threads of one torch thread each instead of one at a time on ``threads`` torch
    threads: on this project's 2-core bench, K=3 ran 10% faster. For windows of many
    micro-batches (offline); a small online batch would run on one thread.
    """

    def __init__(
        self,
        *,
        plan: EnsemblePlan,
        members: Sequence[str] | None = None,
        reduce: bool | None = None,
        num_gpus: float = 0.0,
        threads: int | None = None,
        progress: Any = None,
        backends: dict[str, MemberBackend] | None = None,
        observe: Callable[[str, float], None] | None = None,
        batch_threads: bool = False,
    ) -> None:
        import torch

        # One log line per job, not a "Loading weights" bar per member and actor.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        if threads:
            torch.set_num_threads(threads)
        cfg = plan.config
        names = list(members) if members is not None else [m.name for m in cfg.members]
        unknown = sorted(set(names) - {m.name for m in cfg.members})
        if unknown:
            raise ValueError(f"members {unknown} are not in the ensemble")
        self.plan = plan
        self.reduce = len(names) == len(cfg.members) if reduce is None else reduce
        self.text_column = cfg.input.text_column
        self.pair_column = cfg.input.text_pair_column
        self.max_chars = cfg.input.max_chars
        self.progress = progress
        self.observe = observe
        specs = {s.name: s for s in plan.specs}
        by_name = {m.name: m for m in cfg.members}
        backends = backends or {}
        pool = None
        if batch_threads and threads and threads > 1 and not num_gpus:
            pool = ThreadPoolExecutor(threads, thread_name_prefix="micro-batch")
        self.members = [
            MemberHost(
                member=by_name[name].model_copy(update={"num_gpus": num_gpus}),
                spec=specs[name],
                task=cfg.task,
                num_labels=cfg.num_labels,
                text_column=self.text_column,
                text_pair_column=self.pair_column,
                threads=threads,
                backend=backends.get(name),
                pool=pool,
            )
            for name in names
        ]
        if any(m.pool is not None for m in self.members):
            # Each micro-batch on one core: set after the members, which set ``threads``.
            # A host whose members all run their own way keeps its torch threads.
            torch.set_num_threads(1)
        # Members that tokenise alike share one tokenizer call per window.
        self.groups: dict[object, list[int]] = {}
        for i, member in enumerate(self.members):
            self.groups.setdefault(member.tokenizer_key, []).append(i)

    def cut(self, texts: pa.Array) -> pa.Array:
        """Text cut to ``input.max_chars``: tokens past ``max_length`` are dropped anyway,
        and a giant row then cannot blow up a member's memory."""
        if pa.types.is_large_string(texts.type) or pa.types.is_string_view(texts.type):
            texts = texts.cast(pa.string())
        return pc.utf8_slice_codeunits(texts, 0, self.max_chars)

    def infer(self, texts: Sequence[str], pairs: Sequence[str] | None = None) -> list[np.ndarray]:
        """Each member's outputs for valid, already cut texts, in member order."""
        outputs: list[np.ndarray] = [np.empty(0)] * len(self.members)
        for indices in self.groups.values():
            try:
                encoded = (
                    self.members[indices[0]].encode(texts, pairs) if texts else {"input_ids": []}
                )
            except Exception as exc:
                raise UnscorableText(f"{type(exc).__name__}: {exc}") from exc
            for i in indices:
                started = time.perf_counter()
                outputs[i] = self.members[i].run_encoded(encoded)
                if self.observe is not None:
                    self.observe(self.members[i].member.name, time.perf_counter() - started)
        return outputs

    def __call__(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        valid = batch.column("error").is_null().to_numpy(zero_copy_only=False)
        rows = pa.array(np.flatnonzero(valid))
        texts = self.cut(batch.column(self.text_column).take(rows)).to_pylist()
        pairs = None
        if self.pair_column:
            pairs = self.cut(batch.column(self.pair_column).take(rows)).to_pylist()
        for member, values in zip(self.members, self.infer(texts, pairs), strict=True):
            width = values.shape[1]
            full = np.full((n, width), np.nan, dtype=np.float32)
            full[valid] = values
            column = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), width)
            batch = batch.append_column(member_output_column(member.member.name), column)
        if self.reduce:
            batch = reduce_batch(batch, plan=self.plan)
        if self.progress is not None:
            self.progress.add.remote(n)
        return batch


def _float_lists(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    """``(n, k)`` floats as list<float32>, null where not valid."""
    n, k = values.shape
    flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
    fixed = pa.FixedSizeListArray.from_arrays(flat, k, mask=pa.array(~valid))
    return fixed.cast(pa.list_(pa.float32()))


def _floats(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    return pa.array(np.asarray(values, dtype=np.float64), mask=~valid)


def member_outputs(batch: pa.Table, names: list[str]) -> list[np.ndarray]:
    """Each member's ``__member__<name>`` column as an ``(n, width)`` array."""
    outs = []
    for name in names:
        column = batch.column(member_output_column(name)).combine_chunks()
        width = column.type.list_size
        outs.append(column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width))
    return outs


def reduce_members(
    outputs: list[np.ndarray], *, plan: EnsemblePlan, valid: np.ndarray | None = None
) -> Reduced:
    """The reducer on the members' aligned outputs, in config order, as the config says.

    :func:`reduce_batch` wraps it for Arrow tables; the online endpoint calls it on the
    arrays of a batch, so both paths run the same math with the same settings."""
    cfg = plan.config
    return reduce_classification(
        outputs,
        member_names=[m.name for m in cfg.members],
        temperatures=[m.temperature for m in cfg.members],
        weights=[m.weight for m in cfg.members],
        method=cfg.reducer.combine,
        multi_label=plan.multi_label,
        valid=valid,
        stacking=(plan.stacking.coef, plan.stacking.intercept) if plan.stacking else None,
    )


def reduce_batch(batch: pa.Table, *, plan: EnsemblePlan) -> pa.Table:
    """Members' outputs in, the output contract's columns out; other columns pass through.

    Row-wise and stateless: the host calls it in-process, and with several hosts it is
    the step where their outputs meet. Online and offline run this same code.
    """
    cfg = plan.config
    names = [m.name for m in cfg.members]
    outputs = member_outputs(batch, names)
    batch = batch.drop_columns([member_output_column(n) for n in names])
    errors = batch.column("error").to_pylist()
    batch = batch.drop_columns(["error"])
    valid = np.array([e is None for e in errors], dtype=bool)
    weights = [m.weight for m in cfg.members]
    columns: dict[str, pa.Array] = {}
    if cfg.task == "embedding":
        emb = combine_embeddings(outputs, weights, cfg.reducer.combine)
        columns["embedding"] = _float_lists(emb, valid)
        if cfg.reducer.output_members:
            for name, out in zip(names, outputs, strict=True):
                columns[f"embedding__{name}"] = _float_lists(l2_normalise(out), valid)
    else:
        red = reduce_members(outputs, plan=plan, valid=valid)
        for i, err in enumerate(red.error):
            if err is not None:
                errors[i], valid[i] = err, False
        labels = np.asarray(cfg.labels, dtype=object)
        columns["label"] = pa.array(labels[red.label], type=pa.string(), mask=~valid)
        columns["score"] = _floats(red.score, valid)
        columns["probs"] = _float_lists(red.probs, valid)
        columns["agreement"] = _floats(red.agreement, valid)
        columns["entropy"] = _floats(red.entropy, valid)
        if cfg.reducer.output_members:
            for name, probs in zip(names, red.member_probs, strict=True):
                columns[f"probs__{name}"] = _float_lists(probs, valid)
    columns["error"] = pa.array(errors, type=pa.string())
    for name, column in columns.items():
        batch = batch.append_column(name, column)
    # Labels travel in the file metadata, so a reader knows what `probs` index.
    meta = {LABELS_METADATA_KEY: json.dumps(cfg.labels or []).encode()}
    return batch.replace_schema_metadata(meta)
