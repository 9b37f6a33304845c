"""What every task kind declares: its output fields, what a member's model must be, and
the steps after the forward pass.

A task object is the one place a task kind is spelled out. The config asks it which
combinations are allowed, the plan asks it whether a member's head fits, the host asks
it how to turn a forward pass into member outputs, and the offline writer, the online
endpoint and ``evaluate`` ask it for the output fields and their renderings. No other
module tests a task's name.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

__all__ = [
    "EnsemblePlan",
    "HeadInfo",
    "HeadMismatch",
    "MemberSpec",
    "OutputField",
    "Scored",
    "Task",
    "check_label_set",
]


class EnsemblePlan(Protocol):
    """What tasks and hosts read of a plan (:class:`pipelines.plan.EnsemblePlan`, which
    sits above them and is not imported here)."""

    config: Any
    specs: tuple[MemberSpec, ...]
    multi_label: bool
    stacking: Any

    @property
    def task(self) -> Task: ...


class HeadMismatch(ValueError):
    """A member's model head does not fit the ensemble's task (a config error at plan time)."""


@dataclass(frozen=True)
class HeadInfo:
    """What a backend can tell about a member's model without loading its weights.

    ``None`` means "cannot tell" (a plain torch module declares no head)."""

    architectures: tuple[str, ...] = ()  # e.g. ("BertForSequenceClassification",)
    labels: tuple[str, ...] | None = None  # the head's outputs, in order
    problem_type: str | None = None  # single_label_ / multi_label_classification, regression
    hidden_size: int | None = None  # the encoder's width
    width: int | None = None  # values per row the model returns, when the graph fixes it


@dataclass(frozen=True)
class MemberSpec:
    """What the pipeline needs to know about a member, read at plan time."""

    name: str
    label_index: tuple[int, ...] = ()  # member output i -> canonical label index
    single_logit: bool = False  # a one-logit binary head
    multi_label: bool = False  # sigmoid per label instead of softmax
    model_labels: tuple[str, ...] = ()  # the model's own labels, in output order
    hidden_size: int | None = None  # embedding width (embedding task)


@dataclass(frozen=True)
class OutputField:
    """One output of the scorer: an ensemble column, or one column per member.

    ``name``: the column (a member field's column is ``<name>__<member>``);
    ``arrow_type``: its Parquet type; ``json``: how a valid row's value reads in the
    ``/v1/predict`` record (a member field's result is merged into ``members[<name>]``),
    ``None`` when it is not part of the record; ``v2_datatype``: its Open Inference
    Protocol datatype, ``None`` when it is not one of that protocol's outputs.
    """

    name: str
    arrow_type: pa.DataType
    json: Callable[[Any, Sequence[str]], Any] | None = None
    member: bool = False
    v2_datatype: str | None = None
    doc: str = ""

    def column(self, member: str | None = None) -> str:
        return f"{self.name}__{member}" if self.member else self.name


# Every task's rows end in this column: why a row was not scored, or null.
ERROR_FIELD = OutputField("error", pa.string(), doc="null when scored; else why not")
# With a cascade: the number of stages the row ran (null for an error row).
CASCADE_FIELD = OutputField(
    "cascade_stage",
    pa.int32(),
    lambda value, labels: value,
    doc="the number of cascade stages the row ran",
)

# With a quorum below the member count, on the Open Inference Protocol route: per row, the
# members its answer was made without (`/v1/predict` says so in `members_missing`).
MISSING_FIELD = OutputField(
    "members_missing",
    pa.list_(pa.string()),
    v2_datatype="BYTES",
    doc="the members a quorum answer was made without, as a JSON list ([] when none)",
)


@dataclass
class Scored:
    """The reducer's answer for ``n`` rows, keyed by output field name.

    ``columns``: the ensemble fields; ``members``: per member name, its member fields.
    Values are numpy arrays with a first axis of ``n``. Rows that are not ``valid``
    hold NaN or None, and ``error`` says why.

    ``absent``: per member name, ``(n,)`` True where the member did not run for the row
    (a cascade stopped before it, or its host was missing); its fields there are null.
    ``missing``: per member name, ``(n,)`` True where its host failed or timed out (a
    quorum answer online), a subset of ``absent``. Members not named ran on every row.
    """

    columns: dict[str, np.ndarray]
    members: dict[str, dict[str, np.ndarray]]
    valid: np.ndarray
    error: list[str | None]
    absent: dict[str, np.ndarray] = field(default_factory=dict)
    missing: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return len(self.error)

    def rows_between(self, start: int, end: int) -> Scored:
        """Rows ``start:end`` (one request's share of an online batch)."""
        return Scored(
            columns={k: v[start:end] for k, v in self.columns.items()},
            members={m: {k: v[start:end] for k, v in f.items()} for m, f in self.members.items()},
            valid=self.valid[start:end],
            error=self.error[start:end],
            absent={m: v[start:end] for m, v in self.absent.items()},
            missing={m: v[start:end] for m, v in self.missing.items()},
        )

    @staticmethod
    def concat(parts: Sequence[Scored]) -> Scored:
        """The rows of ``parts``, in order (a request whose rows went through several
        batches)."""
        first = parts[0]

        def masks(name: str) -> dict[str, np.ndarray]:
            keys = dict.fromkeys(m for p in parts for m in getattr(p, name))
            return {
                m: np.concatenate(
                    [getattr(p, name).get(m, np.zeros(p.rows, dtype=bool)) for p in parts]
                )
                for m in keys
            }

        return Scored(
            columns={k: np.concatenate([p.columns[k] for p in parts]) for k in first.columns},
            members={
                m: {k: np.concatenate([p.members[m][k] for p in parts]) for k in f}
                for m, f in first.members.items()
            },
            valid=np.concatenate([p.valid for p in parts]),
            error=[e for p in parts for e in p.error],
            absent=masks("absent"),
            missing=masks("missing"),
        )

    def members_missing(self, row: int) -> list[str]:
        """The members whose hosts were missing for ``row``, in config order."""
        return [m for m, rows in self.missing.items() if rows[row]]


def check_label_set(labels: Sequence[str], need: str) -> None:
    """Raise ValueError unless ``labels`` is a non-empty set, case-insensitively: members'
    labels are matched to it by name without case. ``need`` says what the task wants."""
    if not labels:
        raise ValueError(f"labels: {need}")
    lowered = [label.lower() for label in labels]
    if len(set(lowered)) != len(lowered):
        raise ValueError(f"labels: {list(labels)} has duplicates (case-insensitive)")


def _to_arrow(values: np.ndarray, kind: pa.DataType, valid: np.ndarray) -> pa.Array:
    mask = pa.array(~valid)
    if pa.types.is_list(kind):
        n = len(values)
        width = values.shape[1] if values.ndim == 2 else 0
        flat = pa.array(np.ascontiguousarray(values, dtype=np.float32).reshape(-1))
        fixed = pa.FixedSizeListArray.from_arrays(flat, width, mask=mask)
        assert len(fixed) == n
        return fixed.cast(kind)
    if pa.types.is_floating(kind):
        return pa.array(np.asarray(values, dtype=np.float64), mask=~valid, type=kind)
    return pa.array(list(values), type=kind, mask=~valid)


class Task:
    """The base every task kind fills in; see :mod:`actors.tasks` for the registry."""

    name: str = ""
    # Combinations the reducer offers this task (reducer.combine), the default first.
    combine_methods: tuple[str, ...] = ()
    # transformers' Auto class a Hugging Face member of this task loads.
    hf_model_class: str = ""
    # Whether `ray-ensemble train`, `fit` and `evaluate` apply to this task.
    trainable: bool = False
    fittable: bool = False
    # The output declaration: the ensemble's fields and each member's.
    fields: tuple[OutputField, ...] = ()
    # The ensemble field holding one vector per text, which OpenAI-style /v1/embeddings
    # serves; None for a task that gives no embeddings.
    vector_field: str | None = None
    # Whether the task tags words (input.words_column, the members' aggregation and stride).
    takes_words: bool = False

    @property
    def default_combine(self) -> str:
        return self.combine_methods[0]

    # --- config and plan ---------------------------------------------------------------

    def check_config(self, cfg: Any) -> None:
        """Raise ValueError for settings this task cannot use (called while validating)."""
        combine = cfg.reducer.combine
        if combine not in self.combine_methods:
            raise ValueError(
                f"reducer.combine: '{combine}' is not for {self.name} ensembles; use one of "
                f"{list(self.combine_methods)}"
            )

    def check_partial(self, cfg: Any, why: str, *, any_member: bool) -> None:
        """Raise ValueError unless this task can answer a row from some of its members
        (a quorum online, a cascade); ``why`` names the setting that asks for it.
        ``any_member``: any member may be missing (a quorum), not only the later stages'
        (a cascade)."""
        raise ValueError(
            f"{why}: {self.name} ensembles need every member for every row (the combined "
            "answer would change shape or meaning without one); remove the setting"
        )

    def member_spec(self, member: Any, head: HeadInfo, cfg: Any) -> MemberSpec:
        """What the pipeline needs of a member; HeadMismatch when its head does not fit."""
        raise NotImplementedError

    def check_plan(self, cfg: Any, specs: Sequence[MemberSpec]) -> dict[str, Any]:
        """Checks across members; returns the plan's task-specific settings."""
        return {}

    # --- output declaration --------------------------------------------------------------

    def output_fields(self, cfg: Any) -> list[tuple[OutputField, str | None]]:
        """(field, member) for every column the scorer writes, in order, ``error`` last."""
        out: list[tuple[OutputField, str | None]] = [(f, None) for f in self.fields if not f.member]
        if getattr(cfg, "cascade", None) is not None:
            out.append((CASCADE_FIELD, None))
        if cfg.reducer.output_members:
            out += [(f, m.name) for f in self.fields if f.member for m in cfg.members]
        return [*out, (ERROR_FIELD, None)]

    def output_columns(self, cfg: Any) -> list[str]:
        return [f.column(m) for f, m in self.output_fields(cfg)]

    def member_prefixes(self) -> tuple[str, ...]:
        return tuple(f"{f.name}__" for f in self.fields if f.member)

    # --- after the forward pass ----------------------------------------------------------

    def from_model_output(self, output: Any, attention_mask: Any) -> Any:
        """A transformers model's output to a ``(b, k)`` float32 tensor."""
        raise NotImplementedError

    def member_output(self, raw: np.ndarray, spec: MemberSpec, cfg: Any) -> np.ndarray:
        """A member's raw ``(n, k)`` outputs as the reducer takes them."""
        return raw

    def output_width(self, spec: MemberSpec, cfg: Any) -> int:
        """Values per row of :meth:`member_output` (for a window with no valid row)."""
        raise NotImplementedError

    # --- the host's steps around the forward pass (one row, one pass by default) -------------

    def encode_key(self, member: Any) -> object:
        """Beyond the tokenizer, what makes two members encode a row differently."""
        return None

    def encode_rows(
        self,
        host: Any,
        texts: Sequence[str] | None,
        pairs: Sequence[str] | None,
        words: Sequence[Sequence[str]] | None,
    ) -> tuple[dict[str, list[list[int]]], Any]:
        """The token ids the member's forward passes run on, and what :meth:`finish_rows`
        needs to turn their outputs back into rows."""
        return host.encode(texts, pairs), None

    def finish_rows(
        self,
        raw: Any,
        prepared: Any,
        host: Any,
        window_failed: dict[int, str],
        failed: dict[int, str],
    ) -> Any:
        """The member's outputs per row from those per encoded sequence; sequences that
        failed (``window_failed``) make their rows fail (``failed``)."""
        failed.update(window_failed)
        return raw

    def member_column(
        self, values: Any, rows: np.ndarray, valid: np.ndarray, n: int, width: int
    ) -> pa.Array:
        """The host's ``__member__<name>`` column: ``values`` for ``rows`` of ``n``."""
        full = np.full((n, width), np.nan, dtype=np.float32)
        full[rows] = values
        full[~valid] = np.nan
        return pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), width)

    def concat_outputs(self, parts: Sequence[Any]) -> Any:
        """A member's outputs for several groups of rows, as one (online batches)."""
        return np.concatenate(parts)

    def read_member_column(self, column: pa.Array | pa.ChunkedArray) -> Any:
        """The member's outputs back from :meth:`member_column`."""
        if isinstance(column, pa.ChunkedArray):
            column = column.combine_chunks()
        width = column.type.list_size
        return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)

    def reduce(
        self,
        outputs: Sequence[np.ndarray],
        *,
        plan: EnsemblePlan,
        valid: np.ndarray | None = None,
        errors: Sequence[str | None] | None = None,
        absent: Mapping[str, np.ndarray] | None = None,
        missing: Mapping[str, np.ndarray] | None = None,
        cascade_stage: np.ndarray | None = None,
        inputs: dict[str, list] | None = None,
    ) -> Scored:
        """The members' outputs (config order) to the ensemble's fields.

        ``errors``: why each row was not scored (None: score it); ``valid`` marks the rows
        to score when no reasons are given. Invalid rows hold NaN or None. ``absent``:
        per member, the rows it did not run for (its outputs there are NaN), which the
        combination leaves out; ``missing``: the rows its host was missing for (a quorum
        answer). ``cascade_stage``: with a cascade, the stages each row ran. ``inputs``:
        the rows' ``text`` and ``words`` (lists), for a task whose outputs quote its input.
        See :class:`Scored`."""
        errors = list(errors) if errors is not None else [None] * len(outputs[0])
        if valid is None:
            valid = np.array([e is None for e in errors], dtype=bool)
        gone = {m: np.asarray(v, dtype=bool) for m, v in (absent or {}).items()}
        scored = self._reduce(outputs, plan, np.array(valid, dtype=bool), errors, gone, inputs)
        scored.absent = gone
        scored.missing = {m: np.asarray(v, dtype=bool) for m, v in (missing or {}).items()}
        if cascade_stage is not None:
            scored.columns[CASCADE_FIELD.name] = np.asarray(cascade_stage, dtype=np.int64)
        return scored

    def exit_scores(
        self, outputs: Mapping[str, np.ndarray], plan: EnsemblePlan, members: Sequence[str]
    ) -> np.ndarray:
        """The top probability ``(n,)`` of the ensemble so far over ``members``, from their
        outputs by name: what a cascade compares with its ``exit_at``."""
        raise NotImplementedError(f"{self.name} ensembles cannot run a cascade")

    def _reduce(
        self,
        outputs: Sequence[np.ndarray],
        plan: EnsemblePlan,
        valid: np.ndarray,
        errors: list[str | None],
        absent: Mapping[str, np.ndarray],
        inputs: dict[str, list] | None = None,
    ) -> Scored:
        raise NotImplementedError

    # --- renderings ----------------------------------------------------------------------

    def to_arrow(self, scored: Scored, cfg: Any) -> dict[str, pa.Array]:
        """The output columns, from the declaration, in order."""
        out: dict[str, pa.Array] = {}
        for f, member in self.output_fields(cfg):
            if f is ERROR_FIELD:
                out[f.name] = pa.array(scored.error, type=pa.string())
                continue
            values = scored.members[member][f.name] if member else scored.columns[f.name]
            valid = scored.valid
            if member in scored.absent:
                valid = valid & ~scored.absent[member]
            out[f.column(member)] = _to_arrow(values, f.arrow_type, valid)
        return out

    def to_json(self, scored: Scored, cfg: Any) -> list[dict]:
        """The ``/v1/predict`` records, from the declaration's JSON renderings."""
        labels = list(cfg.labels or ())
        fields = [(f, m) for f, m in self.output_fields(cfg) if f.json is not None]
        # Whole columns to Python once (float32 first, as Parquet stores them).
        values = {
            (f.name, m): _py(scored.members[m][f.name] if m else scored.columns[f.name])
            for f, m in fields
        }
        records: list[dict] = []
        for i in range(scored.rows):
            if not scored.valid[i]:
                records.append(self.json_error(scored.error[i]))
                continue
            record: dict[str, Any] = {}
            members: dict[str, dict] = {}
            for f, m in fields:
                if m is not None and m in scored.absent and scored.absent[m][i]:
                    continue  # a member that did not run for this row is left out
                rendered = f.json(values[(f.name, m)][i], labels)  # type: ignore[misc]
                if m is None:
                    record[f.name] = rendered
                else:
                    members.setdefault(m, {}).update(rendered)
            if members:
                record["members"] = members
            missing = scored.members_missing(i)
            if missing:
                record["members_missing"] = missing
            records.append(record)
        return records

    def json_error(self, error: str | None) -> dict:
        """The record of a row that was not scored."""
        return {"error": error}

    # --- evaluation ----------------------------------------------------------------------

    def metrics(self, probs: np.ndarray, y: np.ndarray) -> dict[str, float]:
        raise NotImplementedError(f"`evaluate` has no metrics for {self.name} ensembles")


def _py(values: np.ndarray) -> list:
    if values.dtype.kind == "f":
        return np.asarray(values, dtype=np.float32).tolist()
    return values.tolist()
