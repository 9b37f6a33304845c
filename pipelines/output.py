"""The output folder: a commit protocol that holds on local disks and object stores.

Local disks rename atomically; object stores (S3, GCS, Azure) do not, but a PUT is
atomic there: readers see a whole object or none. The protocol rests on that alone:

- a job has a run id. Each write task writes one Parquet part once, under its final
  name ``part-<run>-<file>-<row>.parquet`` (the first input row it holds), so a retried
  task rewrites the same name instead of adding a copy. The part's footer lists the
  input rows it holds (per input file, as row ranges): the manifest travels with the
  data, in the same PUT. On a local disk parts are written to ``OUT/_staging/``
  (temporary name, fsync, rename, fsync of the folder) and renamed into ``OUT`` at
  publish; on an object store they are written straight into ``OUT``;
- each read task records how many rows its input file has (``_staging/_read/``);
- at the end, rows written are compared with rows read, per input file; a gap fails
  the job (exit 1), naming the file and both counts. A part that repeats rows another
  part holds (a stray writer) is removed, and its other rows are scored again;
- publishing writes ``_SUCCESS`` last: JSON naming the run and every part of the output,
  with rows read, written and with an error per input file. Only then are parts of ours
  that it does not name deleted (an old output, under ``--overwrite``), and the staging
  folder. Until then an old output's ``_SUCCESS`` still names its own parts, which are
  all still there;
- ``--resume`` reads the manifests of the run's parts that exist and scores only the
  rows they lack. A publish cut short at any step is finished by ``--resume``.

A reader takes the parts ``_SUCCESS`` names (:func:`read_output`); a folder without
``_SUCCESS`` is not an output. Once a job has ended, the folder holds exactly those parts,
so ``pyarrow.parquet.read_table(OUT)`` and Spark read it whole. Part names sort in input
order, so reading them in name order gives the rows in input order.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import logging
import os
import signal
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.datasource import Datasink

from pipelines.config import EnsembleConfig
from pipelines.io import (
    FILE_COLUMN,
    HELPER_COLUMNS,
    ROW_COLUMN,
    InputError,
    InputFiles,
    read_counts,
    write_json,
)
from pipelines.storage import Location, StorageError, fsync_dir

__all__ = [
    "SUCCESS",
    "CommitError",
    "Committed",
    "OutputJob",
    "StagedParquetSink",
    "check_replaceable",
    "prepare_output",
    "publish",
    "read_committed",
    "read_output",
    "interrupted_record",
    "verify",
]

logger = logging.getLogger(__name__)

STAGING = "_staging"
SUCCESS = "_SUCCESS"
JOB_FILE = "_job.json"
COUNTS_DIR = "_read"
PUBLISH_FILE = "_publish.json"
MANIFEST_KEY = b"ray_ensemble.rows"
PART_GLOB = "part-*.parquet"
# Tests stop the driver at a named step of publishing, to show that --resume finishes it.
STOP_AT_ENV = "RAY_ENSEMBLE_TEST_STOP_AT"


def _step(name: str) -> None:
    if os.environ.get(STOP_AT_ENV) == name:
        logger.warning("stopping at %s (%s is set)", name, STOP_AT_ENV)
        os.kill(os.getpid(), signal.SIGKILL)


class CommitError(RuntimeError):
    """Rows written do not match rows read: the output is not published (exit 1)."""


def fingerprint(cfg: EnsembleConfig, inputs: InputFiles) -> dict[str, Any]:
    """What makes two runs the same job: the config (less its serving limits) and the
    input files as they were listed (size, modification time)."""
    config = cfg.model_dump(mode="json", exclude={"serve"})
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    files = [
        {"file": name, "bytes": size, "mtime_ns": mtime}
        for name, size, mtime in zip(inputs.names, inputs.sizes, inputs.mtimes, strict=True)
    ]
    return {"config": digest, "input_root": inputs.root.uri, "files": files}


def _differences(old: dict, new: dict) -> str:
    if old.get("config") != new.get("config"):
        return "the config differs from the interrupted job's"
    if old.get("input_root") != new.get("input_root"):
        return f"--input differs (was {old.get('input_root')})"
    before = {f["file"]: f for f in old.get("files", [])}
    after = {f["file"]: f for f in new.get("files", [])}
    added, gone = sorted(set(after) - set(before)), sorted(set(before) - set(after))
    changed = sorted(n for n in set(before) & set(after) if before[n] != after[n])
    parts = []
    if added:
        parts.append(f"new input files {added[:3]}")
    if gone:
        parts.append(f"input files gone {gone[:3]}")
    if changed:
        parts.append(f"input files changed since {changed[:3]}")
    return "; ".join(parts) or "the job differs"


@dataclass(frozen=True)
class OutputJob:
    """Where a job writes, its run id, and whether it continues an interrupted one."""

    out: Location
    job: dict[str, Any]
    run: str
    resume: bool
    done: bool = False  # --resume of a job whose output is already published
    record: dict[str, Any] | None = None  # _job.json: what the run recorded at its start

    @property
    def staging(self) -> Location:
        return self.out.join(STAGING)

    @property
    def parts_dir(self) -> Location:
        """Where parts are written: staged (and renamed at publish) where rename is
        atomic, in place on object stores."""
        return self.staging if self.out.local else self.out

    @property
    def counts_dir(self) -> Location:
        return self.staging.join(COUNTS_DIR)

    def part_glob(self) -> str:
        return f"part-{self.run}-*.parquet"


def _check_not_input(out: Location, input_path: str | Path | Location) -> None:
    inp = Location.of(input_path)
    if type(inp.fs) is not type(out.fs):
        return
    folder = inp.parent.path if inp.is_file() else inp.path
    o, f = out.path.rstrip("/") + "/", folder.rstrip("/") + "/"
    if f.startswith(o) or (not inp.is_file() and o.startswith(f)):
        raise InputError(
            f"--output: {out} holds the input ({input_path}) or lies inside it; write the "
            "output to a folder of its own"
        )


def _read_json(path: Location) -> dict | None:
    try:
        doc = json.loads(path.read_bytes())
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None


def _new_run() -> str:
    return uuid.uuid4().hex[:8]


def prepare_output(
    output_dir: str | Path | Location,
    input_path: str | Path | Location,
    cfg: EnsembleConfig,
    inputs: InputFiles,
    *,
    overwrite: bool = False,
    resume: bool = False,
    record: dict[str, Any] | None = None,
) -> OutputJob:
    """Check the output folder against the flags (InputError: a usage error) and set up
    its staging folder. Nothing of an old output is removed here.

    ``record``: more to keep in ``_job.json`` for a resumed run (e.g. the model revisions
    this run resolved); a resumed job gets the first run's back in ``OutputJob.record``."""
    if overwrite and resume:
        raise InputError("--overwrite and --resume exclude each other; pick one")
    try:
        out = Location.of(output_dir)
    except StorageError as exc:
        raise InputError(f"--output: {exc}") from exc
    if out.is_file():
        raise InputError(f"--output: {out} is a file; give a directory")
    _check_not_input(out, input_path)
    staging = out.join(STAGING)
    job = fingerprint(cfg, inputs)
    entries = out.list()
    names = {PurePath(e.path).name for e in entries}
    others = sorted(names - {STAGING})
    has_staging = STAGING in names
    if resume:
        success = _read_json(out.join(SUCCESS)) if SUCCESS in names else None
        old = _read_json(staging.join(JOB_FILE)) if has_staging else None
        if (
            success is not None
            and success.get("job") == job
            and (old is None or old.get("run") == success.get("run"))
        ):
            # Published already (perhaps cut short while removing its staging folder).
            return OutputJob(out, job, success.get("run", ""), resume=True, done=True, record=old)
        if has_staging and old is None:
            if any(e.type == pafs.FileType.File for e in staging.list(recursive=True)):
                raise InputError(
                    f"--resume: {staging} holds files but no readable {JOB_FILE}, so it is "
                    "not known which job they belong to; start over with --overwrite"
                )
        elif has_staging:
            if old.get("job") != job:
                raise InputError(
                    f"--resume: {_differences(old.get('job', {}), job)}, so it cannot "
                    f"continue the job in {out}; run the same config on the same input, or "
                    "start over with --overwrite"
                )
            if out.local:
                for entry in staging.list():  # writes the interrupted run never committed
                    if PurePath(entry.path).name.startswith(".tmp-"):
                        out.at(entry.path).delete()
            return OutputJob(out, job, old["run"], resume=True, record=old)
        if success is not None:
            raise InputError(
                f"--resume: {out} holds the complete output of another job; choose a new "
                "folder, or replace it with --overwrite"
            )
        if others:
            raise InputError(
                f"--resume: {out} holds no interrupted job (no {STAGING}/) but is not empty; "
                "choose a new folder, or replace it with --overwrite"
            )
    elif has_staging and not overwrite:
        raise InputError(
            f"--output: {out} holds an interrupted job ({STAGING}/); continue it with --resume, "
            "or start over with --overwrite"
        )
    elif others and not overwrite:
        raise InputError(
            f"--output: {out} is not empty; choose a new folder, or pass --overwrite to replace "
            "it once the new output is complete"
        )
    elif overwrite:
        check_replaceable(out)
    if has_staging:
        _drop_staging(out, keep=_published_parts(out))  # our own unfinished work
    run = _new_run()
    staging.mkdir()
    doc = {"job": job, "run": run, "started": _now(), **(record or {})}
    write_json(staging.join(JOB_FILE), doc)
    return OutputJob(out, job, run, resume=False, record=doc)


def interrupted_record(output_dir: str | Path | Location) -> dict[str, Any] | None:
    """What the interrupted job in ``output_dir`` recorded at its start (``_job.json``),
    or None."""
    try:
        return _read_json(Location.of(output_dir).join(STAGING, JOB_FILE))
    except StorageError:
        return None


def _published_parts(out: Location) -> set[str]:
    success = _read_json(out.join(SUCCESS))
    return set(success.get("parts", [])) if success else set()


def _drop_staging(out: Location, keep: set[str]) -> None:
    """Remove an unfinished run: its staging folder, and on object stores its parts
    (any part of ours that the published ``_SUCCESS`` does not name)."""
    if not out.local:
        for entry in out.list():
            name = PurePath(entry.path).name
            if _our_part(entry) and name not in keep:
                out.at(entry.path).delete()
    out.join(STAGING).delete_tree()


def check_replaceable(out: str | Path | Location, flag: str = "--overwrite") -> None:
    """InputError unless ``out`` is missing, empty or an output of ours: what
    ``--overwrite`` may replace. Nothing else is ever deleted."""
    out = Location.of(out)
    foreign = sorted(PurePath(e.path).name for e in out.list() if not _ours(e, out.local))
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise InputError(
            f"{flag}: {out} holds what ray-ensemble did not write ({', '.join(foreign[:5])}"
            f"{more}); only an output of ours ({SUCCESS}, {PART_GLOB}, {STAGING}/) is "
            "replaced and nothing else is deleted: choose an empty or new folder"
        )


def _our_part(entry: pafs.FileInfo) -> bool:
    return entry.type == pafs.FileType.File and fnmatch.fnmatch(
        PurePath(entry.path).name, PART_GLOB
    )


def _ours(entry: pafs.FileInfo, local: bool) -> bool:
    """An entry an output of ours holds: the marker, a part file or the staging folder
    (locally, never a link to a folder elsewhere)."""
    name = PurePath(entry.path).name
    if name == STAGING:
        return entry.type == pafs.FileType.Directory and not (local and os.path.islink(entry.path))
    return entry.type == pafs.FileType.File and (name == SUCCESS or _our_part(entry))


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _ranges(rows: np.ndarray) -> list[list[int]]:
    """Sorted row numbers as ``[start, end)`` runs."""
    rows = np.sort(rows)
    if len(rows) == 0:
        return []
    breaks = np.flatnonzero(np.diff(rows) != 1) + 1
    starts = np.concatenate([[0], breaks])
    ends = np.concatenate([breaks, [len(rows)]])
    return [[int(rows[s]), int(rows[e - 1]) + 1] for s, e in zip(starts, ends, strict=True)]


def part_name(run: str, file: int, row: int, files: int) -> str:
    """Names sort in input order for any number of input files: every part of a run
    pads the file index to the same width."""
    width = max(5, len(str(max(files - 1, 0))))
    return f"part-{run}-{file:0{width}d}-{row:012d}.parquet"


class StagedParquetSink(Datasink):
    """Writes each bundle of about ``rows_per_file`` rows as one committed part file."""

    def __init__(self, job: OutputJob, names: tuple[str, ...], rows_per_file: int) -> None:
        self.parts_dir = job.parts_dir
        self.run = job.run
        self.names = names
        self.rows_per_file = rows_per_file

    @property
    def min_rows_per_write(self) -> int:
        return self.rows_per_file

    def get_name(self) -> str:
        return "WriteParquet"

    def write(self, blocks: Iterable[pa.Table], ctx: Any) -> dict[str, Any] | None:
        tables = [b for b in blocks if b.num_rows]
        if not tables:
            return None
        table = pa.concat_tables(tables, promote_options="permissive")
        files = table.column(FILE_COLUMN).to_numpy()
        rows = table.column(ROW_COLUMN).to_numpy()
        failed = table.column("error").is_valid().to_numpy(zero_copy_only=False)
        manifest: dict[str, Any] = {"rows": {}, "errors": {}}
        for f in np.unique(files):
            mine = files == f
            manifest["rows"][self.names[f]] = _ranges(rows[mine])
            manifest["errors"][self.names[f]] = int(failed[mine].sum())
        name = part_name(self.run, int(files[0]), int(rows[0]), len(self.names))
        table = table.drop_columns(list(HELPER_COLUMNS))
        meta = {**(table.schema.metadata or {}), MANIFEST_KEY: json.dumps(manifest).encode()}
        # The commit: the part and its manifest appear at once (a rename, or one PUT).
        with self.parts_dir.join(name).writer() as f:
            pq.write_table(table.replace_schema_metadata(meta), f)
        return {"part": name, "rows": table.num_rows}


@dataclass(frozen=True)
class Committed:
    """What the committed parts hold, per input file."""

    ranges: dict[str, np.ndarray]  # sorted [start, end) runs, (k, 2)
    written: dict[str, int]
    errors: dict[str, int]
    parts: list[str]
    schemas: dict[str, pa.Schema]
    files_of: dict[str, list[str]]  # part -> the input files it holds rows of

    @property
    def rows(self) -> int:
        return sum(self.written.values())


def _merge(runs: list[list[int]]) -> np.ndarray:
    merged: list[list[int]] = []
    for start, end in sorted(runs):
        if merged and start <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([start, end])
    return np.array(merged, dtype=np.int64).reshape(-1, 2)


def _overlaps(mine: dict[str, list[list[int]]], taken: dict[str, list[list[int]]]) -> bool:
    for file, runs in mine.items():
        have = _merge(taken.get(file, []))
        for start, end in runs:
            if len(have) and bool(((have[:, 0] < end) & (have[:, 1] > start)).any()):
                return True
    return False


def read_committed(job: OutputJob, *, repair: bool = True) -> Committed:
    """The manifests of the run's committed parts (their footers; the data is not read).

    A part whose rows overlap a part before it in name order repeats rows (a stray
    writer, a retried task that bundled rows differently): it is removed (``repair``;
    left alone and not counted otherwise), keeping one copy of every row; rows only it
    held count as not committed and are scored again."""
    runs: dict[str, list[list[int]]] = {}
    errors: dict[str, int] = {}
    schemas: dict[str, pa.Schema] = {}
    files_of: dict[str, list[str]] = {}
    parts = sorted(
        PurePath(e.path).name
        for e in job.parts_dir.list()
        if e.type == pafs.FileType.File and fnmatch.fnmatch(PurePath(e.path).name, job.part_glob())
    )
    kept = []
    for name in parts:
        where = job.parts_dir.join(name)
        with where.open_file() as f:
            schema = pq.read_schema(f)
        manifest = json.loads((schema.metadata or {})[MANIFEST_KEY])
        if _overlaps(manifest["rows"], runs):
            if repair:
                logger.warning(
                    "%s repeats rows another part holds (a stray writer?): removed, and any "
                    "row only it held is scored again",
                    where,
                )
            if repair:
                where.delete()
            continue
        kept.append(name)
        schemas[name] = schema.remove_metadata()
        files_of[name] = list(manifest["rows"])
        for file, file_runs in manifest["rows"].items():
            runs.setdefault(file, []).extend(file_runs)
            errors[file] = errors.get(file, 0) + manifest["errors"].get(file, 0)
    ranges, written = {}, {}
    for file, file_runs in runs.items():
        ranges[file] = _merge(file_runs)
        written[file] = int((ranges[file][:, 1] - ranges[file][:, 0]).sum())
    return Committed(ranges, written, errors, kept, schemas, files_of)


def _one_schema(job: OutputJob, committed: Committed) -> None:
    """Give every part the same schema, so the folder reads as one table (pyarrow, Spark).

    Parts differ where an input column's type differs between files or blocks. Types are
    promoted where Arrow can (int64 and double to double, null to anything); a column
    Arrow cannot promote becomes text. Each part that differs is rewritten once, under
    its own name."""
    schemas = committed.schemas
    if len({s for s in schemas.values()}) <= 1:
        return
    fields: dict[str, pa.Field] = {}
    as_text: dict[str, set[str]] = {}
    for part, schema in schemas.items():
        for field in schema:
            have = fields.get(field.name)
            if have is None or have.type == field.type or pa.types.is_null(field.type):
                fields.setdefault(field.name, field)
                continue
            if pa.types.is_null(have.type):
                fields[field.name] = field
                continue
            try:
                fields[field.name] = pa.unify_schemas(
                    [pa.schema([have]), pa.schema([field])], promote_options="permissive"
                ).field(0)
            except (pa.ArrowInvalid, pa.ArrowTypeError):
                fields[field.name] = pa.field(field.name, pa.string())
                as_text.setdefault(field.name, set())
        for name in as_text:
            as_text[name].update(committed.files_of.get(part, []))
    for name, files in as_text.items():
        logger.warning(
            "column '%s' has types that cannot be promoted to one across the input files (%s); "
            "it is written as text in every part",
            name,
            ", ".join(sorted(files)[:5])
            + (f" and {len(files) - 5} more" if len(files) > 5 else ""),
        )
    target = pa.schema(list(fields.values()))
    for part, schema in schemas.items():
        if schema == target:
            continue
        where = job.parts_dir.join(part)
        with where.open_file() as f:
            table = pq.read_table(f)
        meta = table.schema.metadata
        columns = []
        for field in target:
            if field.name not in table.column_names:
                columns.append(pa.nulls(table.num_rows, field.type))
                continue
            col = table.column(field.name)
            columns.append(col if col.type == field.type else _cast(col, field.type))
        fixed = pa.Table.from_arrays(columns, schema=target).replace_schema_metadata(meta)
        with where.writer() as f:
            pq.write_table(fixed, f)


def _cast(column: pa.ChunkedArray, to: pa.DataType) -> pa.ChunkedArray:
    try:
        return column.cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        # Nested values have no cast to text in Arrow: JSON text keeps them readable.
        values = [None if v is None else json.dumps(v, default=str) for v in column.to_pylist()]
        return pa.chunked_array([pa.array(values, type=to)])


def verify(job: OutputJob, inputs: InputFiles) -> dict[str, Any]:
    """Rows written against rows read, per input file; the ``_SUCCESS`` document.

    Raises CommitError naming every file whose counts differ."""
    committed = read_committed(job)
    problems = []
    files: dict[str, dict[str, int]] = {}
    counts = read_counts(job.counts_dir)
    for index, name in enumerate(inputs.names):
        if index not in counts:
            problems.append(f"{name}: was not read to its end")
            continue
        read = counts[index]
        written = committed.written.get(name, 0)
        covered = committed.ranges.get(name, np.empty((0, 2), np.int64))
        whole = (
            len(covered) == 0
            and read == 0
            or (len(covered) == 1 and covered[0, 0] == 0 and covered[0, 1] == read)
        )
        if written != read or not whole:
            problems.append(f"{name}: read {read} rows, wrote {written}")
        files[name] = {"read": read, "written": written, "errors": committed.errors.get(name, 0)}
    if problems:
        raise CommitError(
            "rows written do not match rows read, so the output was not published: "
            + "; ".join(problems)
            + f". The parts so far are in {job.parts_dir}; run again with --resume"
        )
    _one_schema(job, committed)
    return {
        "rows_read": sum(f["read"] for f in files.values()),
        "rows_written": sum(f["written"] for f in files.values()),
        "rows_with_error": sum(f["errors"] for f in files.values()),
        "files": files,
        "run": job.run,
        "parts": committed.parts,
        "job": job.job,
        "finished": _now(),
    }


def committed_rows(out: str | Path | Location) -> int:
    """Rows the running or interrupted job in ``out`` has committed so far (0 when none),
    for progress and benchmarks; changes nothing."""
    out = Location.of(out)
    record = _read_json(out.join(STAGING, JOB_FILE))
    if record is None or "run" not in record:
        return 0
    try:
        job = OutputJob(out, record.get("job", {}), record["run"], resume=True)
        return read_committed(job, repair=False).rows
    except (OSError, ValueError, KeyError):
        return 0  # a part replaced while its footer was read: ask again


def publish(job: OutputJob, success: dict[str, Any]) -> None:
    """Publish the verified parts: ``_SUCCESS`` last, then remove what it replaces.

    Recorded first in ``_publish.json``, so a publish cut short is finished by --resume:
    every step below can run again."""
    write_json(job.staging.join(PUBLISH_FILE), success)
    _step("publish-recorded")
    finish_publish(job)


def finish_publish(job: OutputJob) -> dict[str, Any]:
    success = _read_json(job.staging.join(PUBLISH_FILE))
    if success is None:  # cut short after _SUCCESS, while the staging folder went
        success = _read_json(job.out.join(SUCCESS))
        assert success is not None
    parts = list(success["parts"])
    if job.out.local:
        out = job.out.local_path
        for i, name in enumerate(parts):
            staged = job.staging.local_path / name
            if staged.exists():
                os.replace(staged, out / name)
            if i == 0:
                _step("publish-moving")
        fsync_dir(out)
    write_json(job.out.join(SUCCESS), success)
    _step("publish-marked")
    keep = set(parts)
    for entry in job.out.list():
        # The old output goes only now that the new one is complete; only ours goes.
        if _our_part(entry) and PurePath(entry.path).name not in keep:
            job.out.at(entry.path).delete()
    _step("publish-replaced")
    # The job record goes last: a staging folder cut short reads as "published" at
    # --resume only through _SUCCESS, which is already in place.
    job.counts_dir.delete_tree()
    job.staging.join(PUBLISH_FILE).delete()
    _step("publish-cleaning")
    job.staging.delete_tree()
    return success


def read_output(out: str | Path | Location) -> pa.Table:
    """The rows of a published output: the parts its ``_SUCCESS`` names, in order.

    Raises FileNotFoundError when there is no ``_SUCCESS`` (no complete output)."""
    out = Location.of(out)
    success = _read_json(out.join(SUCCESS))
    if success is None:
        raise FileNotFoundError(f"{out} holds no complete output ({SUCCESS} is missing)")
    tables = []
    for name in success["parts"]:
        with out.join(name).open_file() as f:
            tables.append(pq.read_table(f))
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables).replace_schema_metadata(None)
