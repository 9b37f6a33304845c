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
import logging
import math
import sys
import time
from collections.abc import Callable, Collection, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from actors.backends.base import MemberBackend, import_member_modules, pick_device
from actors.tasks import MemberSpec, Task
from actors.tasks.base import EnsemblePlan
from pipelines.storage import local_member

__all__ = [
    "CASCADE_STATE",
    "CPU_BATCH_TOKENS",
    "GPU_BATCH_TOKENS",
    "LABELS_METADATA_KEY",
    "EnsembleHost",
    "MemberHost",
    "UnscorableText",
    "make_backend",
    "member_output_column",
    "member_outputs",
    "micro_batches",
    "reduce_batch",
]

logger = logging.getLogger(__name__)

LABELS_METADATA_KEY = b"ray_ensemble.labels"

# On CPU, a forward pass costs about rows x longest row, and big passes fall out of cache:
# one MiniLM ran 107-123 rows/s with passes of at most 1,024-2,048 padded tokens against
# 93-97 with 64-row passes (bench/microbatch_probe.py). GPUs want big batches.
CPU_BATCH_TOKENS = 2048
# On a GPU, big passes keep it busy; a cap still bounds activation memory when a user
# raises batch_size (BERT-base at 32k padded tokens needs well under 2 GiB). A pass that
# runs out of memory anyway is halved and retried (MemberHost.run_encoded).
GPU_BATCH_TOKENS = 32768
# Python hands the GIL over every 5 ms by default. A thread that returns from a forward
# pass (the device idle meanwhile) waited up to that long while another thread tokenised
# the next window: at 50 us of device time per row, 0.5 ms doubled the rows/s of the
# stand-in device (docs/benchmarks.md, issue 22).
SWITCH_INTERVAL_S = 0.0005


def make_backend(member: Any, task: Task, device: str, threads: int | None = None) -> MemberBackend:
    """The member's model, loaded on ``device``, behind the one backend interface."""
    import_member_modules(member)
    # A model on object storage is loaded from this node's copy (made once per node).
    return member.backend_module.load(local_member(member), task, device, threads)


def _out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.cuda.OutOfMemoryError)


def _free_device_cache() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()


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
    forward, and the task's step from the model's outputs to the reducer's input.
    :class:`EnsembleHost` runs several over table windows.

    Example::

        host = MemberHost(member=cfg.members[0], spec=plan.specs[0], plan=plan)
        logits = host.infer(["a fine film", "a dull plot"])   # (2, num_labels), aligned
    """

    def __init__(
        self,
        *,
        member: Any,
        spec: MemberSpec,
        plan: EnsemblePlan,
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
        self.plan = plan
        self.task = plan.task
        device = pick_device(member.num_gpus)
        self.device = device
        self.backend = backend or make_backend(member, self.task, device, threads)
        self.max_batch_tokens = member.max_batch_tokens or (
            CPU_BATCH_TOKENS if device == "cpu" else GPU_BATCH_TOKENS
        )
        # Outputs stay on the device until the window's last pass: one copy back per
        # window, not a blocking one per micro-batch.
        self.on_device = device != "cpu" and hasattr(self.backend, "forward_on_device")
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
        """The member's outputs for a list of valid texts, in their order, float32.
        Raises :class:`UnscorableText` for a text too long for the device."""
        encoded = self.encode(texts, pairs) if texts else {"input_ids": []}
        failed: dict[int, str] = {}
        values = self.run_encoded(encoded, failed)
        if failed:
            row, reason = min(failed.items())
            raise UnscorableText(f"text {row}: {reason}")
        return values

    def run_encoded(
        self, encoded: dict[str, list[list[int]]], failed: dict[int, str] | None = None
    ) -> np.ndarray:
        """Sort by length, micro-batch, forward, and the task's step, on rows already tokenised.

        A pass that runs out of device memory is halved and retried, down to one row; a
        row that still does not fit gets NaN outputs and its reason in ``failed`` (row
        index -> message; without ``failed``, the error is raised)."""
        cfg = self.plan.config
        n = len(encoded["input_ids"])
        if n == 0:
            return np.zeros((0, self.task.output_width(self.spec, cfg)), dtype=np.float32)
        lengths = np.fromiter((len(x) for x in encoded["input_ids"]), dtype=np.int64, count=n)
        batches = micro_batches(lengths, self.member.batch_size, self.max_batch_tokens)
        self.real_tokens += int(lengths.sum())
        self.padded_tokens += sum(len(rows) * int(lengths[rows].max()) for rows in batches)
        pad_id = self.backend.pad_token_id

        if self.on_device:
            forward = self.backend.forward_on_device  # type: ignore[attr-defined]
        else:
            forward = self.backend.forward

        def run(rows: np.ndarray) -> list[tuple[np.ndarray, Any]]:
            return self._run_fitting(
                encoded, rows, lambda r: forward(pad_batch(encoded, r, pad_id)), failed, lengths
            )

        if self.pool is None or len(batches) == 1:
            pieces = [piece for rows in batches for piece in run(rows)]
        else:
            pieces = [piece for done in self.pool.map(run, batches) for piece in done]
        raw = None
        if pieces:
            order = np.concatenate([rows for rows, _ in pieces])
            if self.on_device:
                values = self.backend.to_host([out for _, out in pieces])  # type: ignore[attr-defined]
            else:
                values = _join([out for _, out in pieces])
            raw = np.full((n, *values.shape[1:]), np.nan, dtype=np.float32)
            raw[order] = values
        if raw is None:  # every row failed: the width comes from a pass over nothing
            raw = np.full((n, self.task.output_width(self.spec, cfg)), np.nan, dtype=np.float32)
            return raw
        return self.task.member_output(raw, self.spec, cfg)

    def _run_fitting(
        self,
        encoded: dict[str, list[list[int]]],
        rows: np.ndarray,
        forward: Callable[[np.ndarray], Any],
        failed: dict[int, str] | None,
        lengths: np.ndarray,
    ) -> list[tuple[np.ndarray, Any]]:
        """``forward(rows)``, halving the rows on a device out-of-memory error."""
        try:
            return [(rows, forward(rows))]
        except Exception as exc:
            if not _out_of_memory(exc):
                raise
        _free_device_cache()
        if len(rows) == 1:
            reason = f"too long for this GPU: {int(lengths[rows[0]])} tokens"
            if failed is None:
                raise UnscorableText(reason)
            failed[int(rows[0])] = reason
            return []
        tokens = len(rows) * int(lengths[rows].max())
        if tokens // 2 < self.max_batch_tokens:
            # Later windows start below the size that failed, instead of failing again.
            self.max_batch_tokens = max(1, tokens // 2)
            logger.warning(
                "member %s: a pass of %d rows (%d padded tokens) ran out of device memory; "
                "halving it, and capping passes at %d tokens from now on (set "
                "max_batch_tokens to choose the cap)",
                self.member.name,
                len(rows),
                tokens,
                self.max_batch_tokens,
            )
        half = len(rows) // 2
        return self._run_fitting(
            encoded, rows[:half], forward, failed, lengths
        ) + self._run_fitting(encoded, rows[half:], forward, failed, lengths)

    @property
    def padding_efficiency(self) -> float:
        return self.real_tokens / self.padded_tokens if self.padded_tokens else math.nan


def _join(outputs: Sequence[np.ndarray]) -> np.ndarray:
    """Passes' outputs as one array; per-token ``(b, t, k)`` outputs are padded with NaN to
    the longest pass."""
    if len(outputs) > 1 and outputs[0].ndim == 3:
        width = max(o.shape[1] for o in outputs)
        outputs = [
            np.pad(o, ((0, 0), (0, width - o.shape[1]), (0, 0)), constant_values=np.nan)
            for o in outputs
        ]
    return np.concatenate(outputs)


class UnscorableText(ValueError):
    """A member's tokenizer refused the texts (a lone surrogate, say): the caller's
    input is at fault, not the host, so online this is the request's 422."""


class EnsembleHost:
    """Runs windows of rows through ``members`` (default: all) and, when it holds them
    all, through the reducer. Rows whose ``error`` is set are passed through unscored.

    ``reduce``: default True when the host holds every member; a host that holds some
    adds their ``__member__<name>`` columns and a later stateless step reduces.
    ``progress``: a ``RowCounter`` (by name: see pipelines/progress.py) told of each window.
    ``backends``: ready member backends by name (tests run the host without weights).
    ``observe``: called with (member name, seconds) after each member's forward pass.
    ``timer``: a ``RowCounter`` whose ``add_seconds({member: seconds})`` is told of
    each call's member forward seconds (the cost `evaluate` reports).
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
        timer: Any = None,
    ) -> None:
        import torch

        # One log line per job, not a "Loading weights" bar per member and actor.
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        # Windows may run side by side (one tokenising, one on the device): see
        # SWITCH_INTERVAL_S. Never raised above what the process set already.
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL_S))
        if threads:
            torch.set_num_threads(threads)
        cfg = plan.config
        names = list(members) if members is not None else [m.name for m in cfg.members]
        unknown = sorted(set(names) - {m.name for m in cfg.members})
        if unknown:
            raise ValueError(f"members {unknown} are not in the ensemble")
        self.plan = plan
        self.task = plan.task
        self.reduce = len(names) == len(cfg.members) if reduce is None else reduce
        self.text_column = cfg.input.text_column
        self.pair_column = cfg.input.text_pair_column
        self.words_column = cfg.input.words_column
        self.max_chars = cfg.input.max_chars
        self.progress = progress
        self.observe = observe
        self.timer = timer
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
                plan=plan,
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
        # A GPU's work is queued and runs beside the host's: callers may overlap windows.
        self.on_accelerator = any(m.device != "cpu" for m in self.members)
        # Members that tokenise alike share one tokenizer call per window.
        self.groups: dict[object, list[int]] = {}
        for i, member in enumerate(self.members):
            key = (member.tokenizer_key, self.task.encode_key(member.member))
            self.groups.setdefault(key, []).append(i)

    def cut(self, texts: pa.Array) -> pa.Array:
        """Text cut to ``input.max_chars``: tokens past ``max_length`` are dropped anyway,
        and a giant row then cannot blow up a member's memory."""
        if pa.types.is_large_string(texts.type) or pa.types.is_string_view(texts.type):
            texts = texts.cast(pa.string())
        return pc.utf8_slice_codeunits(texts, 0, self.max_chars)

    def infer(
        self,
        texts: Sequence[str] | None,
        pairs: Sequence[str] | None = None,
        failed: dict[int, str] | None = None,
        words: Sequence[Sequence[str]] | None = None,
        only: Collection[str] | None = None,
    ) -> list[Any]:
        """Each member's outputs for valid, already cut texts (or pre-split ``words``), in
        member order.

        ``only``: run just these members (a cascade's stage); the others' outputs are
        NaN. A text too long for a member's device: with ``failed``, its index and reason
        go there (and its outputs are NaN); without, :class:`UnscorableText` is raised.
        Safe to call from several threads at once (one window tokenising while another
        is on the device)."""
        outputs: list[Any] = [np.empty(0)] * len(self.members)
        lost: dict[int, str] = {} if failed is None else failed
        rows = len(words) if words is not None else len(texts or ())
        cfg = self.plan.config
        timed: dict[str, float] = {}
        for indices in self.groups.values():
            run = [i for i in indices if only is None or self.members[i].member.name in only]
            for i in set(indices) - set(run):
                width = self.task.output_width(self.members[i].spec, cfg)
                outputs[i] = np.full((rows, width), np.nan, dtype=np.float32)
            if not run:
                continue
            lead = self.members[run[0]]
            try:
                if rows:
                    encoded, prepared = self.task.encode_rows(lead, texts, pairs, words)
                else:
                    encoded, prepared = {"input_ids": []}, None
            except Exception as exc:
                raise UnscorableText(f"{type(exc).__name__}: {exc}") from exc
            for i in run:
                started = time.perf_counter()
                window_failed: dict[int, str] = {}
                raw = self.members[i].run_encoded(encoded, window_failed)
                took = time.perf_counter() - started
                timed[self.members[i].member.name] = took
                outputs[i] = (
                    self.task.finish_rows(raw, prepared, self.members[i], window_failed, lost)
                    if rows
                    else raw
                )
                if self.observe is not None:
                    self.observe(self.members[i].member.name, took)
        if self.timer is not None and timed:
            self.timer.add_seconds(timed)
        if failed is None and lost:
            row, reason = min(lost.items())
            raise UnscorableText(f"text {row}: {reason}")
        return outputs

    def __call__(self, batch: pa.Table) -> pa.Table:
        if self.plan.config.cascade is not None:
            batch = self._cascade(batch)
        else:
            batch = self._all_rows(batch)
        if self.reduce:
            batch = reduce_batch(batch, plan=self.plan)
        if self.progress is not None:
            self.progress.add(batch.num_rows)
        return batch

    def _inputs(
        self, batch: pa.Table, rows: np.ndarray
    ) -> tuple[list[str] | None, list[str] | None, list[list[str]] | None]:
        """These rows' cut texts and pairs, or their pre-split words."""
        taken = pa.array(rows, pa.int64())
        if self.words_column:
            return None, None, batch.column(self.words_column).take(taken).to_pylist()
        texts = self.cut(batch.column(self.text_column).take(taken)).to_pylist()
        pairs = None
        if self.pair_column:
            pairs = self.cut(batch.column(self.pair_column).take(taken)).to_pylist()
        return texts, pairs, None

    def _cascade(self, batch: pa.Table) -> pa.Table:
        """This host's members, stage by stage, each on the rows still open; the stages
        a row ran travel in :data:`CASCADE_STATE` to later hosts and the reduce.

        Rows that stopped before a stage never reach its members; a stage's exit is
        decided as soon as every member of it and of the stages before has run, here or
        on an earlier host."""
        cfg = self.plan.config
        cascade = cfg.cascade
        n = batch.num_rows
        valid = batch.column("error").is_null().to_numpy(zero_copy_only=False).copy()
        errors = batch.column("error").to_pylist()
        if CASCADE_STATE in batch.column_names:
            state = batch.column(CASCADE_STATE).to_numpy(zero_copy_only=False).astype(np.int64)
            batch = batch.drop_columns([CASCADE_STATE])
        else:
            state = np.zeros(n, dtype=np.int64)
        known = [m.name for m in cfg.members if member_output_column(m.name) in batch.column_names]
        outputs = dict(zip(known, member_outputs(batch, known), strict=True))
        held = {m.member.name: m for m in self.members}
        for name, member in held.items():
            width = self.task.output_width(member.spec, cfg)
            outputs[name] = np.full((n, width), np.nan, dtype=np.float32)
        for s, stage in enumerate(cascade.stages):
            here = [m for m in stage if m in held]
            if here:
                before = [m for earlier in cascade.stages[:s] for m in earlier]
                if any(m not in outputs for m in before):
                    raise RuntimeError(
                        f"cascade stage {s + 1} runs before the members of an earlier stage "
                        f"({[m for m in before if m not in outputs]}); the hosts are out of order"
                    )
                rows = np.flatnonzero(valid & (state == 0))
                texts, pairs, _ = self._inputs(batch, rows)
                failed: dict[int, str] = {}
                values = self.infer(texts, pairs, failed, only=here)
                for i, member in enumerate(self.members):
                    if member.member.name in here:
                        outputs[member.member.name][rows] = values[i]
                for i, reason in failed.items():
                    # A row no device pass could hold is an error row, like bad input.
                    errors[int(rows[i])] = reason
                    valid[rows[i]] = False
            done = [m for earlier in cascade.stages[: s + 1] for m in earlier]
            if s < len(cascade.exit_at) and all(m in outputs for m in done):
                close_stage(self.plan, outputs, state, valid, s)
        for name in held:
            full = outputs[name]
            full[~valid] = np.nan
            column = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), full.shape[1])
            batch = batch.append_column(member_output_column(name), column)
        index = batch.schema.get_field_index("error")
        batch = batch.set_column(index, "error", pa.array(errors, batch.schema.field("error").type))
        return batch.append_column(CASCADE_STATE, pa.array(state, pa.int32()))

    def _all_rows(self, batch: pa.Table) -> pa.Table:
        n = batch.num_rows
        valid = batch.column("error").is_null().to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(valid)
        texts, pairs, words = self._inputs(batch, rows)
        failed: dict[int, str] = {}
        outputs = self.infer(texts, pairs, failed, words)
        if failed:
            # A row no device pass could hold is an error row, like bad input.
            errors = batch.column("error").to_pylist()
            for i, reason in failed.items():
                errors[int(rows[i])] = reason
            index = batch.schema.get_field_index("error")
            batch = batch.set_column(
                index, "error", pa.array(errors, batch.schema.field("error").type)
            )
            valid[rows[list(failed)]] = False
        width = len(self.plan.config.labels or ())
        for member, values in zip(self.members, outputs, strict=True):
            if isinstance(values, np.ndarray):
                width = values.shape[1]
            column = self.task.member_column(values, rows, valid, n, width)
            batch = batch.append_column(member_output_column(member.member.name), column)
        return batch


# Between hosts of a cascade: each row's stage count, 0 while it is still open.
CASCADE_STATE = "__cascade_stage__"


def close_stage(
    plan: EnsemblePlan,
    outputs: dict[str, np.ndarray],
    state: np.ndarray,
    valid: np.ndarray,
    stage: int,
) -> None:
    """After ``stage`` (0-based): rows still open whose ensemble so far puts at least
    ``exit_at[stage]`` on its top label stop there (``state`` becomes ``stage + 1``).

    Deciding again is harmless: a row that did not stop does not stop on the same
    outputs, so a later host may repeat an earlier host's decision."""
    cascade = plan.config.cascade
    members = [m for earlier in cascade.stages[: stage + 1] for m in earlier]
    rows = np.flatnonzero(valid & (state == 0))
    if rows.size == 0:
        return
    top = plan.task.exit_scores({m: outputs[m][rows] for m in members}, plan, members)
    stop = np.nan_to_num(top, nan=-1.0) >= cascade.exit_at[stage]
    state[rows[stop]] = stage + 1


def cascade_absent(plan: EnsemblePlan, stages_run: np.ndarray) -> dict[str, np.ndarray]:
    """Per member, the rows a cascade stopped before it reached the member's stage."""
    cascade = plan.config.cascade
    return {m.name: cascade.stage_of(m.name) >= stages_run for m in plan.config.members}


def final_stages(plan: EnsemblePlan, state: np.ndarray) -> np.ndarray:
    """The stages each row ran, once every host has: a row still open ran them all."""
    return np.where(state == 0, len(plan.config.cascade.stages), state)


def member_outputs(batch: pa.Table, names: list[str], task: Task | None = None) -> list[Any]:
    """Each member's ``__member__<name>`` column as the reducer takes it (an ``(n, width)``
    array for one output per row)."""
    from actors.tasks import TASKS

    task = task or TASKS["classification"]
    return [task.read_member_column(batch.column(member_output_column(n))) for n in names]


def reduce_batch(batch: pa.Table, *, plan: EnsemblePlan) -> pa.Table:
    """Members' outputs in, the output contract's columns out; other columns pass through.

    Row-wise and stateless: the host calls it in-process, and with several hosts it is
    the step where their outputs meet. The online endpoint runs the same ``task.reduce``
    on its arrays and renders the same fields as JSON.
    """
    cfg = plan.config
    names = [m.name for m in cfg.members]
    outputs = member_outputs(batch, names, plan.task)
    errors = batch.column("error").to_pylist()
    inputs = None
    if plan.task.takes_words:
        words_column = cfg.input.words_column
        inputs = (
            {"words": batch.column(words_column).to_pylist()}
            if words_column
            else {"text": batch.column(cfg.input.text_column).to_pylist()}
        )
    batch = batch.drop_columns([member_output_column(n) for n in names] + ["error"])
    extra: dict[str, Any] = {}
    if cfg.cascade is not None:
        state = batch.column(CASCADE_STATE).to_numpy(zero_copy_only=False).astype(np.int64)
        batch = batch.drop_columns([CASCADE_STATE])
        stages = final_stages(plan, state)
        extra = {"absent": cascade_absent(plan, stages), "cascade_stage": stages}
    scored = plan.task.reduce(outputs, plan=plan, errors=errors, inputs=inputs, **extra)
    for name, column in plan.task.to_arrow(scored, cfg).items():
        if name in batch.column_names:
            # The words column given as `words` is the output's `words`, the same lists.
            batch = batch.set_column(batch.schema.get_field_index(name), name, column)
        else:
            batch = batch.append_column(name, column)
    # Labels travel in the file metadata, so a reader knows what `probs` index.
    meta = {LABELS_METADATA_KEY: json.dumps(cfg.labels or []).encode()}
    return batch.replace_schema_metadata(meta)
