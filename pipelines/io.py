"""Reading Parquet / CSV / JSONL inputs as a Ray Data stream of Arrow blocks.

A Ray Data datasource of our own, rather than ``read_parquet`` / ``read_json``, because:
- each row needs a stable id (``<file>:<row>``) when the input has none, and only the
  reader knows a row's position in its file;
- a record that can be read as a row but not as text (a number where text belongs, a
  lone surrogate, bytes that are not UTF-8, a line nested too deeply, a ragged CSV row)
  must become a row with an ``error``, never fail the read or vanish;
- CSV values are read as text, so ids such as ``007`` keep their zeros;
- a resumed job skips the rows an earlier run already committed.

Each file is one read task that yields blocks of ``block_rows`` rows in input order, so
memory stays flat however large the files are. Every block carries two helper columns,
the file it came from and each row's number in it (``__file``, ``__row``): the commit
step records them per output file, which is how rows are counted and a job resumed.

Bytes that are not UTF-8 are an error for the row they are in (a text column) and are
shown as U+FFFD in any other column, which keeps the row.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipelines.config import MEMBER_OUTPUT_PREFIXES, OUTPUT_COLUMNS, EnsembleConfig
from pipelines.storage import Location, StorageError

__all__ = [
    "FILE_COLUMN",
    "FORMATS",
    "ROW_COLUMN",
    "InputDatasource",
    "InputError",
    "InputFiles",
    "check_input",
    "iter_blocks",
    "list_input_files",
    "peek_columns",
    "read_column",
    "read_counts",
    "require_column",
    "validate_rows",
    "write_json",
]

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}
READ_ERROR_COLUMN = "__read_error"
# Where each row was read: the input file (its index in InputFiles.files) and the row's
# number in that file. The commit step records them and drops them.
FILE_COLUMN = "__file"
ROW_COLUMN = "__row"
HELPER_COLUMNS = (FILE_COLUMN, ROW_COLUMN)
BLOCK_ROWS = 4096

_SURROGATE = re.compile("[\ud800-\udfff]")
# A text field may be as long as a row can be; `input.max_chars` cuts it later.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class InputError(ValueError):
    """The input path cannot be read as asked: a usage error."""


@dataclass(frozen=True)
class InputFiles:
    """The files of one ``--input`` (on any filesystem), their format and the folder
    their ids are relative to. ``sizes`` and ``mtimes`` are as listed, for the job's
    fingerprint."""

    files: tuple[Location, ...]
    fmt: str
    root: Location
    sizes: tuple[int, ...] = ()
    mtimes: tuple[int | None, ...] = ()
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(self.root.relative(p.path) for p in self.files)
        object.__setattr__(self, "names", names)


def _suffix(path: str) -> str:
    return PurePosixPath(path).suffix.lower()


def _mtime(info: pafs.FileInfo) -> int | None:
    return info.mtime_ns if info.mtime is not None else None


def _input_location(path: str | os.PathLike[str] | Location) -> Location:
    try:
        return Location.of(path)
    except StorageError as exc:
        raise InputError(f"--input: {exc}") from exc


def list_input_files(
    path: str | os.PathLike[str] | Location,
) -> tuple[list[Location], str, Location]:
    """The files to read, their format and the root their ids are relative to."""
    files, fmt, root, _ = _list_inputs(path)
    return files, fmt, root


def _list_inputs(
    path: str | os.PathLike[str] | Location,
) -> tuple[list[Location], str, Location, list[pafs.FileInfo]]:
    """:func:`list_input_files`, and the listing (sizes, times)."""
    where = _input_location(path)
    info = where.info()
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"--input: {where} does not exist")
    if info.type == pafs.FileType.File:
        fmt = FORMATS.get(_suffix(where.path))
        if fmt is None:
            raise InputError(
                f"--input: cannot tell the format of {where.name}; use a .parquet, .csv or .jsonl file"
            )
        return [where], fmt, where.parent, [info]
    listed = sorted(
        (
            entry
            for entry in where.list(recursive=True)
            if entry.type == pafs.FileType.File
            and _suffix(entry.path) in FORMATS
            and not any(
                part.startswith((".", "_"))
                for part in PurePosixPath(where.relative(entry.path)).parts
            )
        ),
        key=lambda entry: entry.path,
    )
    if not listed:
        raise InputError(f"--input: {where} holds no .parquet, .csv or .jsonl files")
    formats = {FORMATS[_suffix(e.path)] for e in listed}
    if len(formats) > 1:
        raise InputError(
            f"--input: {where} mixes formats {sorted(formats)}; point --input at one format at a time"
        )
    return [where.at(e.path) for e in listed], formats.pop(), where, listed


def require_column(
    path: Location, fmt: str, columns: list[str], column: str, flag: str, fix: str = ""
) -> None:
    """InputError when ``path`` (with ``columns``, from :func:`peek_columns`) lacks ``column``.

    A JSONL file whose first line is unreadable says nothing about its columns, so it
    passes: its rows get an error each instead.
    """
    if (fmt != "jsonl" or columns) and column not in columns:
        raise InputError(
            f"{flag}: {path.name} has no column '{column}' (its columns: {columns}){fix}"
        )


def _lines(path: Location) -> io.BufferedReader:
    """The file's bytes as a line iterator, decompressed by suffix as it streams."""
    return io.BufferedReader(path.open_input(), 1 << 16)


def _parquet(path: Location) -> pq.ParquetFile:
    return pq.ParquetFile(path.open_file())


def peek_columns(path: Location, fmt: str) -> list[str]:
    """Column names from the start of a file, for checks before any Ray work.

    Raises OSError or pyarrow's errors for a file that cannot be read at all.
    """
    if fmt == "parquet":
        return list(_parquet(path).schema_arrow.names)
    if fmt == "csv":
        with io.TextIOWrapper(
            _lines(path), newline="", encoding="utf-8-sig", errors="replace"
        ) as f:
            return next(csv.reader(f), [])
    with _lines(path) as f:
        for raw in _without_bom(f):
            if raw.strip():
                try:
                    row = json.loads(raw.decode("utf-8", errors="replace"))
                except (ValueError, RecursionError):
                    return []
                return list(row) if isinstance(row, dict) else []
    return []


def check_input(
    cfg: EnsembleConfig, input_path: str | Path, *, allow: tuple[str, ...] = ()
) -> InputFiles:
    """The input files, after checks that need no Ray: raises InputError (a usage error).

    Every file is opened, not only the first: one that cannot be read at all (a corrupt
    Parquet footer, no permission) fails here, before any scoring, with all such files
    named. ``allow``: columns that may share an output column's name (they are renamed
    or never reach the output).
    """
    files, fmt, root, listed = _list_inputs(input_path)
    unreadable: list[str] = []
    columns_of: dict[Location, list[str]] = {}
    for path in files:
        try:
            columns_of[path] = peek_columns(path, fmt)
        except Exception as exc:  # pyarrow and the OS raise many kinds for a broken file
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            unreadable.append(f"{root.relative(path.path)} ({detail})")
    if unreadable:
        raise InputError(
            f"--input: {len(unreadable)} file(s) cannot be read: {'; '.join(unreadable)}; "
            "fix or remove them (nothing was scored)"
        )
    text = cfg.input.text_column
    produced = set(cfg.output_columns())
    for path, columns in columns_of.items():
        require_column(path, fmt, columns, text, "--input", "; set input.text_column in the config")
        clash = [
            c
            for c in columns
            if c not in allow
            and (c in produced or c in OUTPUT_COLUMNS or c.startswith(MEMBER_OUTPUT_PREFIXES))
        ]
        if clash:
            raise InputError(
                f"--input: column(s) {clash} of {path.name} have the names of output columns; "
                "rename or drop them (scoring an already scored file?)"
            )
    return InputFiles(
        tuple(files),
        fmt,
        root,
        tuple(int(e.size or 0) for e in listed),
        tuple(_mtime(e) for e in listed),
    )


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


# --- records that are rows but not text ----------------------------------------------------


def _describe(value: object) -> str:
    kind = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        list: "a list",
        dict: "an object",
    }
    return kind.get(type(value), type(value).__name__)


def _bad_unicode(value: str) -> str | None:
    """Why ``value`` is not valid Unicode text, or None.

    Lone surrogates come from a JSON escape such as ``"\\ud800"`` or, through the
    ``surrogateescape`` decoding the readers use, from bytes that are not UTF-8.
    """
    match = _SURROGATE.search(value)
    if match is None:
        return None
    code = ord(match.group())
    if 0xDC80 <= code <= 0xDCFF:
        return f"is not valid UTF-8 (byte 0x{code - 0xDC00:02x} at character {match.start()})"
    return f"holds a lone surrogate (\\u{code:04x} at character {match.start()}), which is not valid Unicode"


def _clean(value: str) -> str:
    return _SURROGATE.sub("\ufffd", value)


def _cell(value: object) -> object:
    """A value Arrow can hold: strings with surrogates replaced, deep values as JSON text."""
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, (list, dict)):
        try:
            # ensure_ascii escapes surrogates, so the text is valid UTF-8.
            return json.loads(_clean(json.dumps(value)))
        except (RecursionError, ValueError):
            return "<value nested too deeply to keep>"
    return value


def _column(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (
        pa.ArrowInvalid,
        pa.ArrowTypeError,
        pa.ArrowNotImplementedError,
        OverflowError,
        RecursionError,
        UnicodeError,
    ):
        # Mixed types in one column, or values Arrow cannot nest: keep each as JSON text.
        out: list[str | None] = []
        for v in values:
            try:
                out.append(None if v is None else v if isinstance(v, str) else json.dumps(v))
            except (RecursionError, ValueError, TypeError):
                out.append("<value nested too deeply to keep>")
        return pa.array(out, type=pa.string())


def _text_errors(row: dict, text_columns: list[str]) -> str | None:
    """Check and clean a parsed row in place; the first reason its text cannot be scored."""
    error = None
    for key in list(row):
        if isinstance(key, str) and _SURROGATE.search(key):
            row[_clean(key)] = row.pop(key)
    for col in text_columns:
        value = row.get(col)
        if value is None:
            continue
        if not isinstance(value, str):
            # Keep the value visible, as JSON text, and say why the row is not scored.
            kept = _cell(value)
            row[col] = kept if isinstance(kept, str) else json.dumps(kept)
            error = error or f"'{col}' is {_describe(value)}, expected a string"
            continue
        bad = _bad_unicode(value)
        if bad:
            error = error or f"'{col}' {bad}"
    for key, value in row.items():
        row[key] = _cell(value)
    return error


BOM = b"\xef\xbb\xbf"


def _without_bom(lines: Iterator[bytes]) -> Iterator[bytes]:
    """The file's lines, less a UTF-8 byte order mark at its very start (Windows tools
    write one; it is not part of the first row)."""
    first = True
    for raw in lines:
        if first and raw.startswith(BOM):
            raw = raw[len(BOM) :]
        first = False
        yield raw


def _jsonl_row(raw: bytes, text_columns: list[str]) -> tuple[dict, str | None]:
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        bad = raw[exc.start]
        return {}, f"line is not valid UTF-8 (byte 0x{bad:02x} at byte {exc.start})"
    try:
        row = json.loads(line)
    except RecursionError:
        return {}, "line is nested too deeply to read as JSON"
    except ValueError as exc:
        msg = getattr(exc, "msg", str(exc))
        col = getattr(exc, "colno", None)
        return {}, f"line is not valid JSON ({msg}{f' at column {col}' if col else ''})"
    if not isinstance(row, dict):
        return {}, f"line is {_describe(row)}, expected a JSON object"
    return row, _text_errors(row, text_columns)


def _table(rows: list[dict], errors: list[str | None], text_columns: list[str]) -> pa.Table:
    names: dict[str, None] = {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {name: _column([row.get(name) for row in rows]) for name in names}
    for col in text_columns:
        # Text columns are always strings, even in a block where every value is null.
        columns[col] = (
            columns[col].cast(pa.string()) if col in columns else pa.nulls(len(rows), pa.string())
        )
    columns[READ_ERROR_COLUMN] = pa.array(errors, type=pa.string())
    return pa.table(columns)


def _jsonl_blocks(path: Location, block_rows: int, text_columns: list[str]) -> Iterator[pa.Table]:
    rows: list[dict] = []
    errors: list[str | None] = []
    with _lines(path) as f:
        for raw in _without_bom(f):
            if not raw.strip():
                continue
            row, error = _jsonl_row(raw, text_columns)
            rows.append(row)
            errors.append(error)
            if len(rows) >= block_rows:
                yield _table(rows, errors, text_columns)
                rows, errors = [], []
    if rows:
        yield _table(rows, errors, text_columns)


def _csv_blocks(path: Location, block_rows: int, text_columns: list[str]) -> Iterator[pa.Table]:
    """CSV values as text; a ragged row or bad bytes make an error row, not a failed read."""
    # utf-8-sig: a byte order mark (Excel writes one) is not part of the first header.
    with io.TextIOWrapper(
        _lines(path), newline="", encoding="utf-8-sig", errors="surrogateescape"
    ) as f:
        reader = csv.reader(f)
        try:
            header = next(reader, None)
        except csv.Error:
            header = None
        if not header:
            return
        header = [_clean(h) for h in header]
        width = len(header)
        rows: list[dict] = []
        errors: list[str | None] = []
        while True:
            try:
                record = next(reader)
            except StopIteration:
                break
            except csv.Error as exc:
                record, error = [], f"row cannot be read as CSV ({exc})"
            else:
                error = None
                if len(record) != width:
                    error = f"row has {len(record)} fields, the header has {width}"
            row = dict(zip(header, record, strict=False))
            error = error or _text_errors(row, text_columns)
            rows.append(row)
            errors.append(error)
            if len(rows) >= block_rows:
                yield _csv_table(rows, errors, header, text_columns)
                rows, errors = [], []
        if rows:
            yield _csv_table(rows, errors, header, text_columns)


def _csv_table(
    rows: list[dict], errors: list[str | None], header: list[str], text_columns: list[str]
) -> pa.Table:
    columns = {name: pa.array([row.get(name) for row in rows], type=pa.string()) for name in header}
    for col in text_columns:
        if col not in columns:
            columns[col] = pa.nulls(len(rows), pa.string())
    columns[READ_ERROR_COLUMN] = pa.array(errors, type=pa.string())
    return pa.table(columns)


def iter_blocks(
    path: Location, fmt: str, block_rows: int, text_columns: list[str]
) -> Iterator[pa.Table]:
    """The rows of one input file, ``block_rows`` at a time, in order. A record that is
    a row but not text has its reason in ``__read_error``."""
    if fmt == "parquet":
        for batch in _parquet(path).iter_batches(batch_size=block_rows):
            yield pa.Table.from_batches([batch])
    elif fmt == "csv":
        yield from _csv_blocks(path, block_rows, text_columns)
    else:
        yield from _jsonl_blocks(path, block_rows, text_columns)


def read_column(files: list[Location], fmt: str, column: str) -> list:
    """One column of every input row, in input order (None where a row lacks it)."""
    values: list = []
    for path in files:
        for table in iter_blocks(path, fmt, 65536, [column]):
            if column in table.column_names:
                values.extend(table.column(column).to_pylist())
            else:
                values.extend([None] * table.num_rows)
    return values


def _row_ids(name: str, start: int, n: int) -> pa.Array:
    """Stable ids ``<file>:<row>``, built only for blocks that need them."""
    return pa.array([f"{name}:{i}" for i in range(start, start + n)], pa.string())


def committed_mask(rows: np.ndarray, ranges: np.ndarray | None) -> np.ndarray:
    """Which of ``rows`` fall in the sorted, disjoint ``[start, end)`` ``ranges`` ``(k, 2)``."""
    if ranges is None or len(ranges) == 0:
        return np.zeros(len(rows), dtype=bool)
    at = np.searchsorted(ranges[:, 0], rows, side="right") - 1
    return (at >= 0) & (rows < ranges[np.maximum(at, 0), 1])


class InputDatasource(Datasource):
    """One read task per file, yielding validated blocks with ids, an ``error`` column
    and the helper columns ``__file`` / ``__row``.

    ``skip``: per file name, the ``[start, end)`` row ranges an earlier run committed;
    those rows are read (to keep the numbering) but not passed on. ``counts_dir``: each
    read task writes ``<file index>.json`` there with the rows it read, once it is done.
    """

    def __init__(
        self,
        inputs: InputFiles,
        *,
        id_column: str,
        text_column: str,
        text_pair_column: str | None = None,
        rename: Mapping[str, str] | None = None,
        skip: Mapping[str, np.ndarray] | None = None,
        counts_dir: Location | None = None,
        block_rows: int = BLOCK_ROWS,
    ) -> None:
        super().__init__()
        self.inputs = inputs
        self.id_column = id_column
        self.text_column = text_column
        self.text_pair_column = text_pair_column
        self.rename = dict(rename or {})
        self.skip = dict(skip or {})
        self.counts_dir = counts_dir
        self.block_rows = block_rows

    def get_name(self) -> str:
        return self.inputs.fmt.upper()

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(self.inputs.sizes) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        tasks = []
        for index, path in enumerate(self.inputs.files):
            meta = BlockMetadata(
                num_rows=None,
                size_bytes=self.inputs.sizes[index] if self.inputs.sizes else None,
                exec_stats=None,
                input_files=(path.uri,),
            )
            tasks.append(
                ReadTask(
                    lambda i=index: self._read_file(i),
                    meta,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks

    def _read_file(self, index: int) -> Iterator[pa.Table]:
        path, name = self.inputs.files[index], self.inputs.names[index]
        text_columns = [self.rename.get(c, c) for c in (self.text_column, self.text_pair_column)]
        text_columns = [c for c in text_columns if c]
        skip = self.skip.get(name)
        start = 0
        for table in iter_blocks(path, self.inputs.fmt, self.block_rows, text_columns):
            n = table.num_rows
            rows = np.arange(start, start + n, dtype=np.int64)
            start += n
            keep = ~committed_mask(rows, skip)
            if not keep.any():
                continue
            if self.rename:
                table = table.rename_columns([self.rename.get(c, c) for c in table.column_names])
            table = self._with_ids(table, name, int(rows[0]))
            table = validate_rows(
                table, text_column=self.text_column, text_pair_column=self.text_pair_column
            )
            table = table.append_column(FILE_COLUMN, pa.array(np.full(n, index, np.int32)))
            table = table.append_column(ROW_COLUMN, pa.array(rows))
            yield table if keep.all() else table.filter(pa.array(keep))
        if self.counts_dir is not None:
            write_json(self.counts_dir.join(f"{index}.json"), {"file": name, "rows": start})

    def _with_ids(self, table: pa.Table, name: str, start: int) -> pa.Table:
        n = table.num_rows
        if self.id_column not in table.column_names:
            return table.append_column(self.id_column, _row_ids(name, start, n))
        ids = table.column(self.id_column)
        if ids.null_count and (pa.types.is_string(ids.type) or pa.types.is_null(ids.type)):
            # A row with no id (an unreadable JSONL line, say) still needs one.
            made = _row_ids(name, start, n)
            filled = pc.if_else(pc.is_null(ids), made, ids.cast(pa.string()))
            index = table.column_names.index(self.id_column)
            table = table.set_column(index, self.id_column, filled)
        return table


def read_counts(counts_dir: Location) -> dict[int, int]:
    """Rows read per input file (its index), as the read tasks that finished recorded."""
    counts: dict[int, int] = {}
    for entry in counts_dir.list():
        name = PurePosixPath(entry.path).name
        if not name.endswith(".json") or name.startswith(".tmp-"):
            continue
        try:
            doc = json.loads(counts_dir.at(entry.path).read_bytes())
            counts[int(name[: -len(".json")])] = int(doc["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record cut short is no record: that file counts as not read
    return counts


def write_json(path: Location, doc: dict) -> None:
    """Write ``doc`` so that a reader sees the whole file or none of it, durably."""
    path.write_bytes(json.dumps(doc).encode())
