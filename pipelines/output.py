"""The output folder: staged writes, a verified commit, resume.

A job writes into ``OUT/_staging/`` and publishes only a complete output:

- each write task commits one Parquet part file by renaming it into place, named by the
  first input row it holds (``part-<file>-<row>.parquet``), so a retried task rewrites
  the same file instead of adding a second copy. The part's footer records which input
  rows it holds (per input file, as row ranges): that footer is the manifest, committed
  in the same rename as the data;
- each read task records how many rows its input file has (``_staging/_read/``);
- at the end, rows written are compared with rows read, per input file; any gap or
  overlap fails the job (exit 1), naming the file and both counts;
- publishing moves the parts into ``OUT`` and writes ``_SUCCESS`` (JSON: rows read,
  written and with an error, per input file). An old output is removed only then, so
  ``--overwrite`` never loses it to a failed run;
- ``--resume`` reads the committed footers and scores only the rows they lack.

Part names sort in input order, so reading the folder in name order (as pyarrow and
Ray Data do) gives the rows in input order.
"""

from __future__ import annotations

import datetime as _dt
import fnmatch
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from ray.data.datasource import Datasink

from pipelines.config import EnsembleConfig
from pipelines.io import FILE_COLUMN, HELPER_COLUMNS, ROW_COLUMN, InputError, InputFiles, write_json

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
    "verify",
]

STAGING = "_staging"
SUCCESS = "_SUCCESS"
JOB_FILE = "_job.json"
COUNTS_DIR = "_read"
PUBLISH_FILE = "_publish.json"
MANIFEST_KEY = b"ray_ensemble.rows"
PART_GLOB = "part-*.parquet"


class CommitError(RuntimeError):
    """Rows written do not match rows read: the output is not published (exit 1)."""


def fingerprint(cfg: EnsembleConfig, inputs: InputFiles) -> dict[str, Any]:
    """What makes two runs the same job: the config (less its serving limits) and the
    input files as they are on disk."""
    config = cfg.model_dump(mode="json", exclude={"serve"})
    digest = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()
    files = []
    for path, name in zip(inputs.files, inputs.names, strict=True):
        stat = path.stat()
        files.append({"file": name, "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return {"config": digest, "input_root": str(inputs.root.resolve()), "files": files}


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
    """Where a job writes, and whether it continues an interrupted one."""

    out: Path
    staging: Path
    job: dict[str, Any]
    resume: bool
    done: bool = False  # --resume of a job whose output is already published

    @property
    def counts_dir(self) -> Path:
        return self.staging / COUNTS_DIR


def _check_not_input(out: Path, input_path: Path) -> None:
    inp = input_path.resolve()
    folder = inp.parent if inp.is_file() else inp
    if folder == out or folder.is_relative_to(out) or (inp.is_dir() and out.is_relative_to(inp)):
        raise InputError(
            f"--output: {out} holds the input ({input_path}) or lies inside it; write the "
            "output to a folder of its own"
        )


def prepare_output(
    output_dir: str | Path,
    input_path: str | Path,
    cfg: EnsembleConfig,
    inputs: InputFiles,
    *,
    overwrite: bool = False,
    resume: bool = False,
) -> OutputJob:
    """Check the output folder against the flags (InputError: a usage error) and set up
    its staging folder. Nothing of an old output is removed here."""
    if overwrite and resume:
        raise InputError("--overwrite and --resume exclude each other; pick one")
    out = Path(output_dir).resolve()
    if out.exists() and not out.is_dir():
        raise InputError(f"--output: {out} is a file; give a directory")
    _check_not_input(out, Path(input_path))
    staging = out / STAGING
    job = fingerprint(cfg, inputs)
    others = [p.name for p in out.iterdir() if p.name != STAGING] if out.is_dir() else []
    if resume:
        if staging.is_dir():
            try:
                old = json.loads((staging / JOB_FILE).read_text())
            except (OSError, ValueError):
                old = None
            if old is None and any(staging.glob(PART_GLOB)):
                raise InputError(
                    f"--resume: {staging} holds parts but no readable {JOB_FILE}, so it is not "
                    "known which job they belong to; start over with --overwrite"
                )
            if old is not None and old.get("job") != job:
                raise InputError(
                    f"--resume: {_differences(old.get('job', {}), job)}, so it cannot continue "
                    f"the job in {out}; run the same config on the same input, or start over "
                    "with --overwrite"
                )
            if old is not None:
                for tmp in staging.rglob(".tmp-*"):  # writes the interrupted run never committed
                    tmp.unlink()
                return OutputJob(out, staging, job, resume=True)
        elif (out / SUCCESS).is_file():
            try:
                done = json.loads((out / SUCCESS).read_text()).get("job")
            except (OSError, ValueError):
                done = None
            if done != job:
                raise InputError(
                    f"--resume: {out} holds the complete output of another job; choose a new "
                    "folder, or replace it with --overwrite"
                )
            return OutputJob(out, staging, job, resume=True, done=True)
        elif others:
            raise InputError(
                f"--resume: {out} holds no interrupted job (no {STAGING}/) but is not empty; "
                "choose a new folder, or replace it with --overwrite"
            )
    elif staging.is_dir() and not overwrite:
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
    if staging.exists():
        shutil.rmtree(staging)  # our own unfinished work, never a published output
    (staging / COUNTS_DIR).mkdir(parents=True)
    write_json(staging / JOB_FILE, {"job": job, "started": _now()})
    return OutputJob(out, staging, job, resume=False)


def check_replaceable(out: str | Path, flag: str = "--overwrite") -> None:
    """InputError unless ``out`` is missing, empty or an output of ours: what
    ``--overwrite`` may replace. Nothing else is ever deleted."""
    out = Path(out)
    foreign = sorted(p.name for p in out.iterdir() if not _ours(p)) if out.is_dir() else []
    if foreign:
        more = f" and {len(foreign) - 5} more" if len(foreign) > 5 else ""
        raise InputError(
            f"{flag}: {out} holds what ray-ensemble did not write ({', '.join(foreign[:5])}"
            f"{more}); only an output of ours ({SUCCESS}, {PART_GLOB}, {STAGING}/) is "
            "replaced and nothing else is deleted: choose an empty or new folder"
        )


def _ours(entry: Path) -> bool:
    """An entry an output of ours holds: the marker, a part file or the staging folder."""
    if entry.name == STAGING:
        return entry.is_dir() and not entry.is_symlink()
    return entry.is_file() and (entry.name == SUCCESS or fnmatch.fnmatch(entry.name, PART_GLOB))


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


class StagedParquetSink(Datasink):
    """Writes each bundle of about ``rows_per_file`` rows as one committed part file."""

    def __init__(self, staging: Path, names: tuple[str, ...], rows_per_file: int) -> None:
        self.staging = staging
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
        name = f"part-{int(files[0]):05d}-{int(rows[0]):012d}.parquet"
        table = table.drop_columns(list(HELPER_COLUMNS))
        meta = {**(table.schema.metadata or {}), MANIFEST_KEY: json.dumps(manifest).encode()}
        tmp = self.staging / f".tmp-{uuid.uuid4().hex}-{name}"
        pq.write_table(table.replace_schema_metadata(meta), tmp)
        os.replace(tmp, self.staging / name)  # the commit: the part and its manifest at once
        return {"part": name, "rows": table.num_rows}


@dataclass(frozen=True)
class Committed:
    """What the committed parts hold, per input file."""

    ranges: dict[str, np.ndarray]  # sorted [start, end) runs, (k, 2)
    written: dict[str, int]
    errors: dict[str, int]
    overlaps: dict[str, int]  # rows held by more than one part
    parts: list[str]

    @property
    def rows(self) -> int:
        return sum(self.written.values())


def read_committed(staging: Path) -> Committed:
    """The manifests of every committed part (their footers; the data is not read)."""
    runs: dict[str, list[list[int]]] = {}
    errors: dict[str, int] = {}
    parts = sorted(p.name for p in staging.glob(PART_GLOB))
    for name in parts:
        meta = pq.read_schema(staging / name).metadata or {}
        manifest = json.loads(meta[MANIFEST_KEY])
        for file, file_runs in manifest["rows"].items():
            runs.setdefault(file, []).extend(file_runs)
            errors[file] = errors.get(file, 0) + manifest["errors"].get(file, 0)
    ranges, written, overlaps = {}, {}, {}
    for file, file_runs in runs.items():
        arr = np.array(sorted(file_runs), dtype=np.int64).reshape(-1, 2)
        written[file] = int((arr[:, 1] - arr[:, 0]).sum())
        merged: list[list[int]] = []
        for start, end in arr.tolist():
            if merged and start <= merged[-1][1]:
                merged[-1][1] = max(merged[-1][1], end)
            else:
                merged.append([start, end])
        merged_arr = np.array(merged, dtype=np.int64).reshape(-1, 2)
        overlaps[file] = written[file] - int((merged_arr[:, 1] - merged_arr[:, 0]).sum())
        ranges[file] = merged_arr
    return Committed(ranges, written, errors, overlaps, parts)


def verify(job: OutputJob, inputs: InputFiles) -> dict[str, Any]:
    """Rows written against rows read, per input file; the ``_SUCCESS`` document.

    Raises CommitError naming every file whose counts differ."""
    committed = read_committed(job.staging)
    problems = []
    files: dict[str, dict[str, int]] = {}
    for index, name in enumerate(inputs.names):
        try:
            read = json.loads((job.counts_dir / f"{index}.json").read_text())["rows"]
        except (OSError, ValueError, KeyError):
            problems.append(f"{name}: was not read to its end")
            continue
        written = committed.written.get(name, 0)
        covered = committed.ranges.get(name, np.empty((0, 2), np.int64))
        whole = (
            len(covered) == 0
            and read == 0
            or (len(covered) == 1 and covered[0, 0] == 0 and covered[0, 1] == read)
        )
        if written != read or committed.overlaps.get(name) or not whole:
            problems.append(
                f"{name}: read {read} rows, wrote {written}"
                + (
                    f" ({committed.overlaps[name]} of them twice)"
                    if committed.overlaps.get(name)
                    else ""
                )
            )
        files[name] = {"read": read, "written": written, "errors": committed.errors.get(name, 0)}
    if problems:
        raise CommitError(
            "rows written do not match rows read, so the output was not published: "
            + "; ".join(problems)
            + f". The parts so far are in {job.staging}; run again with --resume"
        )
    return {
        "rows_read": sum(f["read"] for f in files.values()),
        "rows_written": sum(f["written"] for f in files.values()),
        "rows_with_error": sum(f["errors"] for f in files.values()),
        "files": files,
        "parts": committed.parts,
        "job": job.job,
        "finished": _now(),
    }


def publish(job: OutputJob, success: dict[str, Any]) -> None:
    """Move the verified parts into ``OUT`` and mark it complete.

    Recorded first in ``_publish.json``, so a publish cut short is finished by --resume:
    every step below can run again."""
    write_json(job.staging / PUBLISH_FILE, success)
    finish_publish(job)


def finish_publish(job: OutputJob) -> dict[str, Any]:
    success = json.loads((job.staging / PUBLISH_FILE).read_text())
    parts = set(success["parts"])
    (job.out / SUCCESS).unlink(missing_ok=True)
    for entry in job.out.iterdir():
        # The old output goes only now that the new one is complete; only ours goes.
        if entry.name != STAGING and entry.name not in parts and _ours(entry):
            entry.unlink()
    for name in success["parts"]:
        if (job.staging / name).exists():
            os.replace(job.staging / name, job.out / name)
    write_json(job.out / SUCCESS, success)
    shutil.rmtree(job.staging)
    return success
