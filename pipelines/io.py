"""Reading Parquet / CSV / JSONL inputs as a Ray Data stream of Arrow blocks.

A Ray Data datasource of our own, rather than ``read_parquet`` / ``read_json``, because:
- each row needs a stable id (``<file>:<row>``) when the input has none, and only the
  reader knows a row's position in its file;
- a JSONL row whose text is a number or an object must not fail the read (Arrow's
  JSON reader rejects a column that changes type), it becomes a row with an error;
- CSV values are read as text, so ids such as ``007`` keep their zeros.

Each file is one read task that yields blocks of ``block_rows`` rows, so memory stays
flat however large the files are. Each block is sorted by text length before it leaves
the reader (``__pos`` records the input order); Ray Data then cuts it into small blocks
("windows"), so each window holds texts of a like length.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

__all__ = [
    "BLOCK_COLUMN",
    "BLOCK_ROWS_COLUMN",
    "FORMATS",
    "POSITION_COLUMN",
    "READ_ERROR_COLUMN",
    "InputDatasource",
    "list_input_files",
    "peek_columns",
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
# Where each row was read: its block (unique across files), its place in the block, and
# the block's size. Later stages reorder rows inside a block; the reducer puts them back.
BLOCK_COLUMN = "__block"
POSITION_COLUMN = "__pos"
BLOCK_ROWS_COLUMN = "__block_rows"


class InputError(ValueError):
    """The input path cannot be read as asked: a usage error."""


def list_input_files(path: str | os.PathLike[str]) -> tuple[list[Path], str, Path]:
    """The files to read, their format and the root their ids are relative to."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"--input: {path} does not exist")
    if path.is_file():
        fmt = FORMATS.get(path.suffix.lower())
        if fmt is None:
            raise InputError(
                f"--input: cannot tell the format of {path.name}; use a .parquet, .csv or .jsonl file"
            )
        return [path], fmt, path.parent
    files = sorted(
        p
        for p in path.rglob("*")
        if p.is_file()
        and p.suffix.lower() in FORMATS
        and not any(part.startswith((".", "_")) for part in p.relative_to(path).parts)
    )
    if not files:
        raise InputError(f"--input: {path} holds no .parquet, .csv or .jsonl files")
    formats = {FORMATS[p.suffix.lower()] for p in files}
    if len(formats) > 1:
        raise InputError(
            f"--input: {path} mixes formats {sorted(formats)}; point --input at one format at a time"
        )
    return files, formats.pop(), path


def require_column(
    path: Path, fmt: str, columns: list[str], column: str, flag: str, fix: str = ""
) -> None:
    """InputError when ``path`` (with ``columns``, from :func:`peek_columns`) lacks ``column``.

    A JSONL file whose first line is unreadable says nothing about its columns, so it
    passes: its rows get an error each instead.
    """
    if (fmt != "jsonl" or columns) and column not in columns:
        raise InputError(
            f"{flag}: {path.name} has no column '{column}' (its columns: {columns}){fix}"
        )


def peek_columns(path: Path, fmt: str) -> list[str]:
    """Column names from the start of a file, for checks before any Ray work."""
    if fmt == "parquet":
        return list(pq.read_schema(path).names)
    if fmt == "csv":
        with open(path, newline="", encoding="utf-8", errors="replace") as f:
            return next(csv.reader(f), [])
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if line.strip():
                try:
                    row = json.loads(line)
                except ValueError:
                    return []
                return list(row) if isinstance(row, dict) else []
    return []


def _column(values: list) -> pa.Array:
    try:
        return pa.array(values)
    except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError):
        # Mixed types in one column: keep every value, as its JSON text.
        return pa.array([None if v is None else json.dumps(v) for v in values], type=pa.string())


def _describe(value: object) -> str:
    kind = {
        bool: "a boolean",
        int: "a number",
        float: "a number",
        list: "a list",
        dict: "an object",
    }
    return kind.get(type(value), type(value).__name__)


def _jsonl_block(lines: list[str], text_columns: list[str]) -> pa.Table:
    rows: list[dict] = []
    errors: list[str | None] = []
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError as exc:
            rows.append({})
            errors.append(f"line is not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(row, dict):
            rows.append({})
            errors.append(f"line is {_describe(row)}, expected a JSON object")
            continue
        error = None
        for col in text_columns:
            value = row.get(col)
            if value is not None and not isinstance(value, str):
                # Keep the value visible, as JSON text, and say why the row is not scored.
                row[col] = json.dumps(value)
                error = error or f"'{col}' is {_describe(value)}, expected a string"
        rows.append(row)
        errors.append(error)
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


class InputDatasource(Datasource):
    """One read task per file, yielding blocks with an id column and a read-error column."""

    def __init__(
        self,
        files: list[Path],
        fmt: str,
        root: Path,
        *,
        id_column: str,
        text_columns: list[str],
        block_rows: int = 4096,
    ) -> None:
        super().__init__()
        self.files = [Path(f) for f in files]
        self.fmt = fmt
        self.root = Path(root)
        self.id_column = id_column
        self.text_columns = text_columns
        self.block_rows = block_rows

    def get_name(self) -> str:
        return self.fmt.upper()

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(f.stat().st_size for f in self.files)

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        tasks = []
        for file_index, path in enumerate(self.files):
            rows = pq.ParquetFile(path).metadata.num_rows if self.fmt == "parquet" else None
            meta = BlockMetadata(
                num_rows=rows,
                size_bytes=path.stat().st_size,
                exec_stats=None,
                input_files=(str(path),),
            )
            tasks.append(
                ReadTask(
                    lambda i=file_index, path=path: self._read_file(i, path),
                    meta,
                    per_task_row_limit=per_task_row_limit,
                )
            )
        return tasks

    def _blocks(self, path: Path) -> Iterator[pa.Table]:
        return iter_blocks(path, self.fmt, self.block_rows, self.text_columns)

    def _read_file(self, file_index: int, path: Path) -> Iterator[pa.Table]:
        name = path.relative_to(self.root).as_posix()
        start = 0
        for block_index, table in enumerate(self._blocks(path)):
            n = table.num_rows
            if READ_ERROR_COLUMN not in table.column_names:
                table = table.append_column(READ_ERROR_COLUMN, pa.nulls(n, pa.string()))

            if self.id_column not in table.column_names:
                table = table.append_column(self.id_column, _row_ids(name, start, n))
            else:
                ids = table.column(self.id_column)
                if ids.null_count and (pa.types.is_string(ids.type) or pa.types.is_null(ids.type)):
                    # A row with no id (an unreadable JSONL line, say) still needs one.
                    made = _row_ids(name, start, n)
                    filled = pc.if_else(pc.is_null(ids), made, ids.cast(pa.string()))
                    index = table.column_names.index(self.id_column)
                    table = table.set_column(index, self.id_column, filled)
            table = table.append_column(
                BLOCK_COLUMN, pa.array(np.full(n, (file_index << 32) | block_index, np.int64))
            )
            table = table.append_column(POSITION_COLUMN, pa.array(np.arange(n, dtype=np.int32)))
            table = table.append_column(BLOCK_ROWS_COLUMN, pa.array(np.full(n, n, np.int32)))
            start += n
            yield sort_by_text_length(table, self.text_columns)


def iter_blocks(
    path: Path, fmt: str, block_rows: int, text_columns: list[str]
) -> Iterator[pa.Table]:
    """The raw rows of one input file, ``block_rows`` at a time."""
    if fmt == "parquet":
        for batch in pq.ParquetFile(path).iter_batches(batch_size=block_rows):
            yield pa.Table.from_batches([batch])
    elif fmt == "csv":
        yield from _csv_blocks(path, block_rows)
    else:
        lines: list[str] = []
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.strip():
                    lines.append(line)
                if len(lines) >= block_rows:
                    yield _jsonl_block(lines, text_columns)
                    lines = []
        if lines:
            yield _jsonl_block(lines, text_columns)


def read_column(files: list[Path], fmt: str, column: str) -> list:
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


def sort_by_text_length(table: pa.Table, text_columns: list[str]) -> pa.Table:
    """Rows ordered by the length of their text, so that rows of a like length travel
    together and the members pad little; ``__pos`` keeps the way back."""
    length = np.zeros(table.num_rows, dtype=np.int64)
    for col in text_columns:
        if col in table.column_names:
            column = table.column(col)
            if pa.types.is_large_string(column.type):
                column = column.cast(pa.string())
            if pa.types.is_string(column.type):
                chars = pc.fill_null(pc.utf8_length(column), 0)
                length += chars.to_numpy(zero_copy_only=False).astype(np.int64)
    return table.take(pa.array(np.argsort(length, kind="stable")))


def _csv_blocks(path: Path, block_rows: int) -> Iterator[pa.Table]:
    import pyarrow.csv as pacsv

    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        header = next(csv.reader(f), None)
    if not header:
        return
    convert = pacsv.ConvertOptions(
        column_types={name: pa.string() for name in header}, strings_can_be_null=False
    )
    reader = pacsv.open_csv(
        path, convert_options=convert, read_options=pacsv.ReadOptions(block_size=1 << 20)
    )
    pending: list[pa.RecordBatch] = []
    count = 0
    for batch in reader:
        pending.append(batch)
        count += batch.num_rows
        if count >= block_rows:
            yield pa.Table.from_batches(pending)
            pending, count = [], 0
    if pending:
        yield pa.Table.from_batches(pending)
