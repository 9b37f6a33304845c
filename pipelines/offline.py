"""Offline scoring on Ray Data: read -> validate rows -> one stage per member -> reduce -> Parquet.

Example::

    from pipelines.config import load_config
    from pipelines.offline import plan_ensemble, score

    plan = plan_ensemble(load_config("configs/example.yaml"))
    summary = score(plan, "reviews.jsonl", "out/")     # needs ray.init() first
    assert summary.rows == summary.scored + summary.errors
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from actors.loading import MemberLoadError, MemberSpec, describe_member
from actors.member import MemberHost, member_output_column
from actors.reducer import combine_embeddings, l2_normalise, reduce_classification
from pipelines.config import MEMBER_OUTPUT_PREFIXES, OUTPUT_COLUMNS, ConfigError, EnsembleConfig
from pipelines.io import (
    BLOCK_COLUMN,
    BLOCK_ROWS_COLUMN,
    POSITION_COLUMN,
    READ_ERROR_COLUMN,
    InputDatasource,
    InputError,
    list_input_files,
    peek_columns,
    require_column,
)
from pipelines.stacking import StackingModel

__all__ = [
    "EnsemblePlan",
    "ScoreSummary",
    "build_dataset",
    "plan_ensemble",
    "reduce_batch",
    "score",
    "validate_rows",
]

LABELS_METADATA_KEY = b"ray_ensemble.labels"
# Rows are sorted by text length inside each read block (this many rows), then cut into
# windows for the members. Long blocks make the sort effective (little padding); short
# windows keep every member busy at once (a window moves on to the next member while the
# next window arrives) instead of waiting for the pipeline to fill and drain.
BLOCK_ROWS = 4096
MIN_WINDOW_BYTES = 64 * 1024
WINDOW_BYTES_PER_BATCH_ROW = 1024
# Read, window, reduce and write stages are light; small CPU shares keep them from
# starving (or deadlocking against) the member actors on small machines.
LIGHT_TASK_CPUS = 0.1
LIGHT_RESERVE_CPUS = 0.5


@dataclass(frozen=True)
class EnsemblePlan:
    """A validated config plus what was read from each member's model config."""

    config: EnsembleConfig
    specs: tuple[MemberSpec, ...]
    multi_label: bool
    stacking: StackingModel | None = None


def plan_ensemble(cfg: EnsembleConfig) -> EnsemblePlan:
    """Read every member's model config and align its labels; raises ConfigError."""
    specs = []
    for i, member in enumerate(cfg.members):
        try:
            specs.append(describe_member(member, cfg))
        except MemberLoadError as exc:
            raise ConfigError(f"members[{i}] ({member.name}): {exc}") from None
    multi = {s.name: s.multi_label for s in specs}
    if cfg.task == "classification" and len(set(multi.values())) > 1:
        raise ConfigError(
            "members mix single-label (softmax) and multi-label (sigmoid) heads "
            f"{multi}; an ensemble needs one kind: set problem_type in the models' config.json"
        )
    if cfg.task == "embedding" and cfg.reducer.combine == "mean":
        # A torch member's size is known only once it runs; the reducer checks it then.
        dims = {s.name: s.hidden_size for s in specs if s.hidden_size is not None}
        if len(set(dims.values())) > 1:
            raise ConfigError(
                f"reducer.combine: mean needs members of one embedding size, got {dims}; "
                "use combine: concat"
            )
    multi_label = any(multi.values())
    stacking = None
    if cfg.reducer.combine == "stacking":
        if multi_label:
            raise ConfigError(
                "reducer.combine: stacking is for single-label ensembles; these members are "
                "multi-label: use weighted_mean or geometric_mean"
            )
        stacking = StackingModel.load(cfg.reducer.stacking, cfg)
    return EnsemblePlan(cfg, tuple(specs), multi_label, stacking)


def validate_rows(batch: pa.Table, *, text_column: str, text_pair_column: str | None) -> pa.Table:
    """Add the ``error`` column: why a row cannot be scored, or null. No row is dropped."""
    n = batch.num_rows
    errors: list[str | None] = (
        batch.column(READ_ERROR_COLUMN).to_pylist()
        if READ_ERROR_COLUMN in batch.column_names
        else [None] * n
    )
    for col in filter(None, (text_column, text_pair_column)):
        if col not in batch.column_names:
            values: list = [None] * n
            kind = None
        else:
            column = batch.column(col)
            kind = column.type
            if pa.types.is_large_string(kind) or pa.types.is_string_view(kind):
                column, kind = column.cast(pa.string()), pa.string()
            values = column.to_pylist()
        for i, value in enumerate(values):
            if errors[i] is not None:
                continue
            if value is None:
                errors[i] = (
                    f"'{col}' is missing" if col not in batch.column_names else f"'{col}' is null"
                )
            elif not isinstance(value, str):
                errors[i] = f"'{col}' is {kind}, expected a string"
            elif not value.strip():
                errors[i] = f"'{col}' is empty"
    if READ_ERROR_COLUMN in batch.column_names:
        batch = batch.drop_columns([READ_ERROR_COLUMN])
    return batch.append_column("error", pa.array(errors, type=pa.string()))


def window_bytes(cfg: EnsembleConfig) -> int:
    """Bytes per window (a member call). Windows cut by size hold many short texts or a
    few long ones: about the same compute each, so no member waits long for the next."""
    return max(
        MIN_WINDOW_BYTES, WINDOW_BYTES_PER_BATCH_ROW * max(m.batch_size for m in cfg.members)
    )


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


def reduce_batch(batch: pa.Table, *, plan: EnsemblePlan) -> pa.Table:
    """The last stage: members' outputs in, the output contract's columns out."""
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
        red = reduce_classification(
            outputs,
            member_names=names,
            temperatures=[m.temperature for m in cfg.members],
            weights=weights,
            method=cfg.reducer.combine,
            multi_label=plan.multi_label,
            valid=valid,
            stacking=(plan.stacking.coef, plan.stacking.intercept) if plan.stacking else None,
        )
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


class OrderedReducer:
    """The reduce stage: combines each window, then holds it until its read block is
    complete and writes the block out in input order.

    Runs as a single actor, so every window of a block meets in one place; windows
    arrive in order, so at most a block or two wait here at any time.
    """

    HELPERS = (BLOCK_COLUMN, POSITION_COLUMN, BLOCK_ROWS_COLUMN)

    def __init__(self, plan: EnsemblePlan) -> None:
        self.plan = plan
        self.pending: dict[int, list[pa.Table]] = {}

    def __call__(self, batch: pa.Table) -> pa.Table:
        reduced = reduce_batch(batch, plan=self.plan)
        blocks = reduced.column(BLOCK_COLUMN).to_numpy(zero_copy_only=False)
        sizes = reduced.column(BLOCK_ROWS_COLUMN).to_numpy(zero_copy_only=False)
        done = []
        for block in dict.fromkeys(blocks.tolist()):
            rows = np.flatnonzero(blocks == block)
            parts = self.pending.setdefault(block, [])
            parts.append(reduced.take(pa.array(rows)))
            if sum(p.num_rows for p in parts) == int(sizes[rows[0]]):
                whole = pa.concat_tables(self.pending.pop(block))
                order = pc.sort_indices(whole.column(POSITION_COLUMN))
                done.append(whole.take(order))
        if not done:
            return reduced.slice(0, 0).drop_columns(list(self.HELPERS))
        return pa.concat_tables(done).drop_columns(list(self.HELPERS))


@dataclass(frozen=True)
class MemberResources:
    num_cpus: float
    num_gpus: float
    threads: int
    min_replicas: int
    max_replicas: int


def member_resources(
    cfg: EnsembleConfig, cluster: dict, max_node_cpus: float, *, cpu_fallback: bool = True
) -> list[MemberResources]:
    """CPU and GPU requests per member replica.

    Members without a GPU share the CPUs evenly unless they set ``num_cpus``, leaving a
    little for the light stages so the pipeline cannot deadlock on a small machine.
    ``cpu_fallback``: with no GPU in the cluster, run GPU members on CPU (a local Ray);
    otherwise keep asking for GPUs, which an autoscaling cluster adds.
    """
    total_cpus = float(cluster.get("CPU", 0))
    has_gpu = float(cluster.get("GPU", 0)) > 0
    gpu_members = [m for m in cfg.members if m.num_gpus > 0]
    if gpu_members and not has_gpu:
        if cpu_fallback:
            warnings.warn(
                f"members {[m.name for m in gpu_members]} ask for GPUs but the cluster has "
                "none; running them on CPU",
                stacklevel=2,
            )
        else:
            print(
                f"members {[m.name for m in gpu_members]} ask for GPUs and the cluster has none "
                "yet: waiting for the autoscaler to add GPU nodes",
                file=sys.stderr,
                flush=True,
            )
            has_gpu = True
    cpu_members = [m for m in cfg.members if not (m.num_gpus > 0 and has_gpu)]
    auto = [m for m in cpu_members if m.num_cpus is None]
    fixed = sum(m.num_cpus * m.replica_range[1] for m in cpu_members if m.num_cpus is not None)
    replicas = sum(m.replica_range[1] for m in auto)
    spare = max(total_cpus - LIGHT_RESERVE_CPUS - fixed, LIGHT_TASK_CPUS)
    share = min(spare / replicas, max_node_cpus - LIGHT_RESERVE_CPUS) if replicas else 1.0
    share = max(round(share, 2), 0.1)
    out = []
    for m in cfg.members:
        gpus = m.num_gpus if has_gpu else 0.0
        cpus = m.num_cpus if m.num_cpus is not None else (1.0 if gpus > 0 else share)
        lo, hi = m.replica_range
        out.append(MemberResources(cpus, gpus, max(1, math.ceil(cpus - 1e-9)), lo, hi))
    return out


def plan_resources(cfg: EnsembleConfig) -> list[MemberResources]:
    """Resources per member on the running cluster, after checking that the GPU members
    fit in their share of GPU memory (ConfigError otherwise)."""
    import ray

    from pipelines.placement import check_gpu_fit, cluster_gpus

    cluster, node_cpus = cluster_shape()
    if float(cluster.get("GPU", 0)) > 0:
        check_gpu_fit(cfg, cluster_gpus())
    # A Ray this process started (ray.init without an address) never grows GPUs.
    node = getattr(ray._private.worker, "_global_node", None)
    local = bool(getattr(node, "ray_init_cluster", False))
    return member_resources(cfg, cluster, node_cpus, cpu_fallback=local)


def cluster_shape() -> tuple[dict, float]:
    """The cluster's resources, and the most CPUs on one live node."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    node_cpus = max((n["Resources"].get("CPU", 0.0) for n in nodes), default=0.0)
    return ray.cluster_resources(), node_cpus


def check_input(
    plan: EnsemblePlan, input_path: str | Path, *, allow: tuple[str, ...] = ()
) -> tuple[list[Path], str, Path]:
    """The input files, after checks that need no Ray: raises InputError (a usage error).

    ``allow``: columns that may share an output column's name (they are renamed or never
    reach the output).
    """
    files, fmt, root = list_input_files(input_path)
    cfg = plan.config
    columns = peek_columns(files[0], fmt)
    text = cfg.input.text_column
    require_column(files[0], fmt, columns, text, "--input", "; set input.text_column in the config")
    produced = set(cfg.output_columns())
    clash = [
        c
        for c in columns
        if c not in allow
        and (c in produced or c in OUTPUT_COLUMNS or c.startswith(MEMBER_OUTPUT_PREFIXES))
    ]
    if clash:
        raise InputError(
            f"--input: column(s) {clash} of {files[0].name} have the names of output columns; "
            "rename or drop them (scoring an already scored file?)"
        )
    return files, fmt, root


def read_windows(
    plan: EnsemblePlan,
    input_path: str | Path,
    *,
    block_rows: int = BLOCK_ROWS,
    rename: dict[str, str] | None = None,
    allow: tuple[str, ...] = (),
):
    """The first stages: read, sort blocks by text length, validate. Each output block is
    one window for the members. ``rename`` renames input columns as they are read."""
    import ray.data

    cfg = plan.config
    rename = rename or {}
    files, fmt, root = check_input(plan, input_path, allow=(*allow, *rename))
    text_columns = [c for c in (cfg.input.text_column, cfg.input.text_pair_column) if c]
    ctx = ray.data.DataContext.get_current()
    source = InputDatasource(
        files,
        fmt,
        root,
        id_column=cfg.input.id_column,
        text_columns=text_columns,
        block_rows=block_rows,
    )
    # The dataset keeps the settings it was built with; the caller's context is restored.
    saved = ctx.target_max_block_size, ctx.execution_options.preserve_order
    # Ray Data cuts blocks to this size: the windows each member call gets.
    ctx.target_max_block_size = window_bytes(cfg)
    ctx.execution_options.preserve_order = True  # the reducer expects windows in order
    try:
        # One read task per file: the sort spans whole read blocks.
        ds = ray.data.read_datasource(
            source, num_cpus=LIGHT_TASK_CPUS, override_num_blocks=len(files)
        )
    finally:
        ctx.target_max_block_size, ctx.execution_options.preserve_order = saved
    if rename:
        ds = ds.map_batches(
            _rename,
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=LIGHT_TASK_CPUS,
            fn_kwargs={"names": rename},
        )
    ds = ds.map_batches(
        validate_rows,
        batch_format="pyarrow",
        batch_size=None,
        num_cpus=LIGHT_TASK_CPUS,
        fn_kwargs={
            "text_column": cfg.input.text_column,
            "text_pair_column": cfg.input.text_pair_column,
        },
    )
    return ds


def member_stages(plan: EnsemblePlan, ds):
    """One actor-pool stage per member: each adds its ``__member__<name>`` column."""
    from ray.data import ActorPoolStrategy

    cfg = plan.config
    resources = plan_resources(cfg)
    for member, spec, res in zip(cfg.members, plan.specs, resources, strict=True):
        pool = (
            ActorPoolStrategy(size=res.min_replicas)
            if res.min_replicas == res.max_replicas
            else ActorPoolStrategy(min_size=res.min_replicas, max_size=res.max_replicas)
        )
        ds = ds.map_batches(
            MemberHost,
            fn_constructor_kwargs={
                "member": member.model_copy(update={"num_gpus": res.num_gpus}),
                "spec": spec,
                "task": cfg.task,
                "num_labels": cfg.num_labels,
                "text_column": cfg.input.text_column,
                "text_pair_column": cfg.input.text_pair_column,
                "threads": res.threads,
            },
            batch_format="pyarrow",
            batch_size=None,  # one window per call
            compute=pool,
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus or None,
        )
    return ds


def _rename(batch: pa.Table, *, names: dict[str, str]) -> pa.Table:
    return batch.rename_columns([names.get(c, c) for c in batch.column_names])


def build_dataset(
    plan: EnsemblePlan,
    input_path: str | Path,
    *,
    block_rows: int = BLOCK_ROWS,
    rename: dict[str, str] | None = None,
):
    """The lazy Ray Data pipeline from the input to the output contract's columns."""
    from ray.data import ActorPoolStrategy

    ds = member_stages(plan, read_windows(plan, input_path, block_rows=block_rows, rename=rename))
    return ds.map_batches(
        OrderedReducer,
        fn_constructor_kwargs={"plan": plan},
        batch_format="pyarrow",
        batch_size=None,
        compute=ActorPoolStrategy(size=1),
        num_cpus=LIGHT_TASK_CPUS,
    )


@dataclass(frozen=True)
class ScoreSummary:
    rows: int
    scored: int
    errors: int
    files: int
    output: str


def prepare_output(output_dir: str | Path, *, overwrite: bool) -> Path:
    out = Path(output_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"--output: {out} is a file; give a directory")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise InputError(
                f"--output: {out} is not empty; choose a new directory or pass --overwrite"
            )
        shutil.rmtree(out)
    return out


def summarise(output_dir: Path) -> ScoreSummary:
    files = sorted(output_dir.glob("*.parquet"))
    rows = errors = 0
    for f in files:
        col = pq.read_table(f, columns=["error"]).column("error")
        rows += len(col)
        errors += len(col) - pc.sum(pc.is_null(col)).as_py() if len(col) else 0
    return ScoreSummary(rows, rows - errors, errors, len(files), str(output_dir))


def score(
    plan: EnsemblePlan,
    input_path: str | Path,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    min_rows_per_file: int = 100_000,
    rename: dict[str, str] | None = None,
) -> ScoreSummary:
    """Score every input row into Parquet files under ``output_dir``. Ray must be initialised.

    ``rename`` renames input columns on the way (evaluate keeps the true label so)."""
    out = prepare_output(output_dir, overwrite=overwrite)
    ds = build_dataset(plan, input_path, rename=rename)
    ds.write_parquet(
        str(out), min_rows_per_file=min_rows_per_file, ray_remote_args={"num_cpus": LIGHT_TASK_CPUS}
    )
    return summarise(out)
