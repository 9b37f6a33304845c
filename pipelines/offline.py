"""Offline scoring on Ray Data: read -> ensemble host(s) -> [reduce] -> staged Parquet.

Every stage is stateless across calls. The reader validates rows and numbers them; each
host runs a window through its members (and the reducer, when it holds them all); with
several hosts a row-wise reduce step follows; the sink commits part files whose footers
say which input rows they hold. A retried task or a restarted actor recomputes its
window and rewrites the same part, so no row is lost or written twice, and the job
checks that before it publishes.

Example::

    from pipelines.config import load_config
    from pipelines.offline import score
    from pipelines.plan import plan_ensemble

    plan = plan_ensemble(load_config("configs/example.yaml"))
    summary = score(plan, "reviews.jsonl", "out/")     # needs ray.init() first
    assert summary.rows == summary.scored + summary.errors
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actors.host import EnsembleHost, reduce_batch
from pipelines.io import InputDatasource, InputFiles, check_input
from pipelines.output import (
    PUBLISH_FILE,
    SUCCESS,
    OutputJob,
    StagedParquetSink,
    finish_publish,
    interrupted_record,
    prepare_output,
    publish,
    read_committed,
    verify,
)
from pipelines.plan import LIGHT_TASK_CPUS, EnsemblePlan, HostResources, hosts_on_cluster
from pipelines.progress import progress_log
from pipelines.storage import Location

__all__ = [
    "ScoreSummary",
    "build_dataset",
    "job_data_context",
    "prepare_job",
    "run_job",
    "score",
    "score_for_report",
]

logger = logging.getLogger(__name__)

# Rows per host call: enough micro-batches that sorting them by length leaves little
# padding, few enough that every replica has work on a small job.
WINDOW_BATCHES = 32
# Windows a host runs at once, on threads of its actor: the next one is read, tokenised
# and padded while the current one is on the device, which then never waits for the
# host. With one at a time, a stand-in device of 50 us per row was busy 28% of the time;
# with two, 64-74% (docs/benchmarks.md, issue 22). The tokenizers, the members and the
# host are safe to call from two threads.
WINDOWS_IN_FLIGHT = 2
ROWS_PER_FILE = 20_000
PROGRESS_INTERVAL_S = 10.0


# Ray Data merges a task's outputs into blocks up to this size. Small blocks keep rows
# streaming from the reader through the hosts to the sink (its default, 128 MiB, would
# hold a whole file in one block until its last row is scored).
BLOCK_BYTES = 256 * 1024


def window_rows(plan: EnsemblePlan) -> int:
    return WINDOW_BATCHES * max(m.batch_size for m in plan.config.members)


@contextlib.contextmanager
def job_data_context() -> Iterator[None]:
    """Ray Data settings for one job; the caller's are restored afterwards.

    Windows stay in input order (so parts do too), blocks stay small so rows stream, and
    Ray Data's own progress dumps, start banner and memory warnings give way to our one
    line per interval."""
    import ray.data

    ctx = ray.data.DataContext.get_current()
    names = ("enable_progress_bars", "print_on_execution_start", "target_max_block_size")
    saved = {n: getattr(ctx, n) for n in names}
    saved_order = ctx.execution_options.preserve_order
    saved_detectors = list(ctx.issue_detectors_config.detectors)
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    ctx.target_max_block_size = BLOCK_BYTES
    ctx.execution_options.preserve_order = True
    ctx.issue_detectors_config.detectors = []
    try:
        yield
    finally:
        for n, v in saved.items():
            setattr(ctx, n, v)
        ctx.execution_options.preserve_order = saved_order
        ctx.issue_detectors_config.detectors = saved_detectors


HOST_OPERATOR = EnsembleHost.__name__  # in the operator's name, "MapBatches(EnsembleHost)"


def inline_host_arguments() -> None:
    """Hosts get their constructor arguments inline in the creation task, not as refs.

    Ray Data passes every pool actor its map transformer and data context as object-store
    refs (ray#53727), so a restarted host depends on objects that a lost node or the
    driver's exit can take with it, and Ray logs an error for each host it creates. Ours
    are small (the plan pickles to a few kB), so Ray keeps them in the actor's creation
    spec and a restart re-runs the constructor from there. Only our hosts' operators are
    changed; where this Ray lays its operators out otherwise, nothing is."""
    try:
        from ray.data._internal.execution.operators.actor_pool_map_operator import (
            ActorPoolMapOperator,
        )
    except ImportError:
        return
    start = getattr(ActorPoolMapOperator, "_start_actor", None)
    if start is None or getattr(start, "_inline_arguments", False):
        return

    def _start_actor(self, *args, **kwargs):
        if HOST_OPERATOR not in self.name or not hasattr(self, "_map_transformer"):
            return start(self, *args, **kwargs)
        # The refs are cached properties, so values in the instance's dict take their
        # place for this call only; data tasks keep using the refs.
        names = ("_data_context_ref", "_map_transformer_ref")
        cached = {n: self.__dict__[n] for n in names if n in self.__dict__}
        self.__dict__["_data_context_ref"] = self.data_context
        self.__dict__["_map_transformer_ref"] = self._map_transformer
        try:
            return start(self, *args, **kwargs)
        finally:
            for n in names:
                self.__dict__.pop(n, None)
            self.__dict__.update(cached)

    _start_actor._inline_arguments = True
    ActorPoolMapOperator._start_actor = _start_actor


def build_dataset(
    plan: EnsemblePlan,
    inputs: InputFiles,
    *,
    hosts: list[HostResources],
    reduce: bool = True,
    rename: Mapping[str, str] | None = None,
    skip: Mapping[str, np.ndarray] | None = None,
    counts_dir: Location | None = None,
    progress: Any = None,
):
    """The lazy Ray Data pipeline from the input to the output contract's columns (with
    ``reduce=False``: to each member's ``__member__<name>`` column)."""
    import ray.data
    from ray.data import ActorPoolStrategy

    inline_host_arguments()
    cfg = plan.config
    source = InputDatasource(
        inputs,
        id_column=cfg.input.id_column,
        text_column=cfg.input.text_column,
        text_pair_column=cfg.input.text_pair_column,
        words_column=cfg.input.words_column,
        rename=rename,
        skip=skip,
        counts_dir=counts_dir,
    )
    # One read task per group of files (InputDatasource.groups); asking for exactly that
    # many blocks keeps Ray from splitting every block to reach one block per file.
    ds = ray.data.read_datasource(
        source, num_cpus=LIGHT_TASK_CPUS, override_num_blocks=source.num_read_tasks
    )
    alone = len(hosts) == 1
    for i, host in enumerate(hosts):
        # Two windows per host at once: one tokenising while the other is on the device.
        side_by_side = {
            "max_concurrent_calls_per_actor": WINDOWS_IN_FLIGHT,
            "enable_true_multi_threading": WINDOWS_IN_FLIGHT > 1,
        }
        pool = (
            ActorPoolStrategy(size=host.min_replicas, **side_by_side)
            if host.min_replicas == host.max_replicas
            else ActorPoolStrategy(
                min_size=host.min_replicas, max_size=host.max_replicas, **side_by_side
            )
        )
        ds = ds.map_batches(
            EnsembleHost,
            fn_constructor_kwargs={
                "plan": plan,
                "members": host.members,
                "reduce": reduce and alone,
                "num_gpus": host.num_gpus,
                "threads": host.threads,
                "batch_threads": True,
                "progress": progress if i == len(hosts) - 1 else None,
                "timer": progress,
            },
            batch_format="pyarrow",
            batch_size=window_rows(plan),
            compute=pool,
            num_cpus=host.num_cpus,
            num_gpus=host.num_gpus or None,
        )
    if reduce and not alone:
        # Where the hosts' outputs meet: row-wise, so any task may recompute any window.
        ds = ds.map_batches(
            reduce_batch,
            fn_kwargs={"plan": plan},
            batch_format="pyarrow",
            batch_size=None,
            num_cpus=LIGHT_TASK_CPUS,
        )
    return ds


@dataclass(frozen=True)
class ScoreSummary:
    rows: int
    scored: int
    errors: int
    files: int
    output: str
    resumed: int = 0  # rows an earlier run had committed
    # Each member's forward seconds in this run, timed in the hosts (tokenising
    # excluded); None when the job scored nothing itself.
    member_seconds: dict[str, float] | None = None


@dataclass(frozen=True)
class ScoreJob:
    """A scoring job whose input and output have been checked (no Ray needed)."""

    plan: EnsemblePlan
    inputs: InputFiles
    output: OutputJob
    rename: Mapping[str, str] | None = None


def prepare_job(
    plan: EnsemblePlan,
    input_path: str | Path,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    rename: Mapping[str, str] | None = None,
) -> ScoreJob:
    """Every check of the input and the output folder, before Ray starts (InputError)."""
    rename = dict(rename or {})
    inputs = check_input(plan.config, input_path, allow=tuple(rename))
    if resume:
        # A resumed job loads the hub commits the first run resolved, even if a branch
        # moved since: its rows must come from the same models.
        pinned = (interrupted_record(output_dir) or {}).get("revisions")
        if pinned:
            plan = plan.with_revisions(pinned)
    output = prepare_output(
        output_dir,
        input_path,
        plan.config,
        inputs,
        overwrite=overwrite,
        resume=resume,
        record={"revisions": plan.revisions},
    )
    return ScoreJob(plan, inputs, output, rename)


def _total_rows(inputs: InputFiles) -> int | None:
    if inputs.fmt != "parquet":
        return None  # known only once read
    import pyarrow.parquet as pq

    total = 0
    for path in inputs.files:
        with path.open_file() as f:
            total += pq.ParquetFile(f).metadata.num_rows
    return total


def run_job(
    job: ScoreJob,
    *,
    cpu_fallback: bool = True,
    rows_per_file: int = ROWS_PER_FILE,
    progress_interval_s: float = PROGRESS_INTERVAL_S,
) -> ScoreSummary:
    """Score, verify and publish a prepared job. Ray must be initialised.

    ``cpu_fallback``: run GPU members on CPU when Ray has no GPU (a local Ray); on a
    joined cluster, leave it False so they wait for GPU nodes."""
    out = job.output
    if out.done or (out.resume and out.staging.join(PUBLISH_FILE).is_file()):
        success = finish_publish(out) if out.staging.exists() else _read_success(out)
        logger.info("score: %s is complete already", out.out)
        return _summary(success, out, resumed=success["rows_written"])
    committed = read_committed(out) if out.resume else None
    resumed = committed.rows if committed else 0
    if committed:
        logger.info(
            "score: resuming: %s rows in %d parts are committed already",
            f"{resumed:,}",
            len(committed.parts),
        )
    hosts = hosts_on_cluster(job.plan.config, cpu_fallback=cpu_fallback, pipeline=True)
    with (
        job_data_context(),
        progress_log(_total_rows(job.inputs), resumed, progress_interval_s) as progress,
    ):
        ds = build_dataset(
            job.plan,
            job.inputs,
            hosts=hosts,
            rename=job.rename,
            skip=committed.ranges if committed else None,
            counts_dir=out.counts_dir,
            progress=progress,
        )
        ds.write_datasink(
            StagedParquetSink(out, job.inputs.names, rows_per_file),
            ray_remote_args={"num_cpus": LIGHT_TASK_CPUS},
        )
        seconds = _member_seconds(progress)
    success = verify(out, job.inputs)
    publish(out, success)
    summary = _summary(success, out, resumed=resumed)
    return dataclasses.replace(summary, member_seconds=seconds)


def _member_seconds(progress: Any) -> dict[str, float] | None:
    import ray

    try:
        return ray.get(progress.handle.member_seconds.remote(), timeout=30)
    except Exception:  # the counter restarting: the cost is unknown, the rows are fine
        logger.warning("score: the members' forward seconds were lost with the row counter")
        return None


def _read_success(out: OutputJob) -> dict:
    return json.loads(out.out.join(SUCCESS).read_bytes())


def _summary(success: dict, out: OutputJob, *, resumed: int) -> ScoreSummary:
    rows = success["rows_written"]
    errors = success["rows_with_error"]
    return ScoreSummary(rows, rows - errors, errors, len(success["parts"]), str(out.out), resumed)


def score(
    plan: EnsemblePlan,
    input_path: str | Path,
    output_dir: str | Path,
    *,
    overwrite: bool = False,
    resume: bool = False,
    rows_per_file: int = ROWS_PER_FILE,
    rename: Mapping[str, str] | None = None,
    cpu_fallback: bool = True,
) -> ScoreSummary:
    """Score every input row into Parquet files under ``output_dir``. Ray must be initialised.

    ``rename`` renames input columns on the way (evaluate keeps the true label so)."""
    job = prepare_job(
        plan, input_path, output_dir, overwrite=overwrite, resume=resume, rename=rename
    )
    return run_job(job, cpu_fallback=cpu_fallback, rows_per_file=rows_per_file)


def score_for_report(
    plan: EnsemblePlan,
    input_path: str,
    label_column: str,
    out: Location,
    *,
    truth_column: str,
    cpu_fallback: bool = True,
) -> tuple[EnsemblePlan, ScoreSummary]:
    """Score a labelled set into ``out`` for a report: with every member's distribution
    (member metrics need them) and the labels renamed to ``truth_column``. Returns the
    plan that scored and its summary."""
    if not plan.config.reducer.output_members:
        reducer = plan.config.reducer.model_copy(update={"output_members": True})
        plan = dataclasses.replace(plan, config=plan.config.model_copy(update={"reducer": reducer}))
    summary = score(
        plan,
        input_path,
        out,
        overwrite=True,
        rename={label_column: truth_column},
        cpu_fallback=cpu_fallback,
    )
    return plan, summary
