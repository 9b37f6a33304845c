"""Reading Parquet / CSV / JSON inputs as a Ray Data stream of Arrow blocks.

A Ray Data datasource of our own, rather than ``read_parquet`` / ``read_json``, because:
- each row needs a stable id (``<file>:<row>``) when the input has none, and only the
  reader knows a row's position in its file;
- a record that can be read as a row but not as text (a number where text belongs, a
  lone surrogate, bytes that are not UTF-8, a line nested too deeply, a ragged CSV row)
  must become a row with an ``error``, never fail the read or vanish;
- CSV values are read as text, so ids such as ``007`` keep their zeros;
- a resumed job skips the rows an earlier run already committed;
- a column whose type differs between files or blocks must not fail the job. Ray Data
  concatenates blocks of different files into one batch and fails on int64 against
  string, so every block leaves the reader in the one schema :func:`check_input` settles.

Formats go by suffix, under an optional compression suffix (``.gz``, ``.bz2``, ``.zst``,
``.lz4``), decompressed as the file streams. A ``.json`` file is JSON lines, or one JSON
array of objects, read element by element.

The input's one schema, settled before any Ray work:
- Parquet: from every file's footer. Types are promoted where Arrow can (int32 and int64
  to int64, int64 and double to double); a column Arrow cannot promote is read as text.
- CSV: every value is text; the columns are those of every file's header.
- JSON: types are known only once read, so :func:`check_input` reads every record once
  (as Spark infers a JSON schema, with its default sampling ratio of 1.0). A column is
  typed by the kinds of value it holds anywhere in the input: whole numbers int64, whole
  and decimal numbers double, lists and objects one nested type where Arrow can make one,
  and any other mix text (other values as their JSON text). No rule that looks at one
  block alone can keep an int64 column int64 and still agree with a later block of text.
- The id column is always text; text columns are always text (``binary`` decoded as
  UTF-8, as Hive, parquet-mr and older Spark store strings: bytes that are not UTF-8 make
  that row an error row).
A column read as text logs one warning naming it and the files.

Read tasks carry only their own files: consecutive files are grouped up to
``TASK_BYTES`` and ``TASK_FILES`` (one task for a big file, many small files per task, in
input order), so what Ray keeps per task does not grow with the file count. A task joins
the rows of its small files into shared blocks, cut at ``block_rows`` rows or
``block_bytes`` bytes, whichever comes first, so memory stays flat however many or large
the files and rows are. Every block carries the file each row came from (its index) and
the row's number in it: the commit step records them per output file, which is how rows
are counted and a job resumed. The helper columns' names hold a NUL character, which no
input column may hold, so an input column named ``__file`` or ``__row`` is only data.

Bytes that are not UTF-8 are an error for the row they are in (a text column) and are
shown as U+FFFD in any other column, which keeps the row.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import logging
import os
import re
import sys
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq
from ray.data.block import BlockMetadata
from ray.data.datasource import Datasource, ReadTask

from pipelines.config import MEMBER_OUTPUT_PREFIXES, EnsembleConfig
from pipelines.storage import Location, StorageError

__all__ = [
    "BLOCK_BYTES",
    "COMPRESSIONS",
    "FILE_COLUMN",
    "FORMATS",
    "ROW_COLUMN",
    "InputDatasource",
    "InputError",
    "InputFiles",
    "InputReadError",
    "check_input",
    "iter_blocks",
    "list_input_files",
    "peek_columns",
    "read_column",
    "read_counts",
    "read_groups",
    "require_column",
    "validate_rows",
    "write_json",
]

logger = logging.getLogger(__name__)

FORMATS = {
    ".parquet": "parquet",
    ".pq": "parquet",
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
}
# Decompressed as they stream (pyarrow's codecs). Parquet is not among the formats that
# may be compressed whole: it compresses its own pages and is read by random access.
COMPRESSIONS = {
    ".gz": "gzip",
    ".gzip": "gzip",
    ".bz2": "bz2",
    ".zst": "zstd",
    ".zstd": "zstd",
    ".lz4": "lz4",
}
# Helper columns: their names hold a NUL, which check_input refuses in input column
# names, so no input column can collide with them. The commit step reads and drops
# __file / __row: where each row was read (its file's index in InputFiles.files, and the
# row's number in that file).
INTERNAL_MARK = "\x00"
READ_ERROR_COLUMN = "\x00read_error"
FILE_COLUMN = "\x00file"
ROW_COLUMN = "\x00row"
HELPER_COLUMNS = (FILE_COLUMN, ROW_COLUMN)
BLOCK_ROWS = 4096
# A block's budget in bytes (of its source text, or Parquet's uncompressed size): rows of
# a megabyte each make blocks of a few rows, not of gigabytes.
BLOCK_BYTES = 8 << 20
# A read task's files: up to this many bytes (as listed) and this many files. A task's
# closure holds its files' names, so a few hundred stay far below a megabyte.
TASK_BYTES = 64 << 20
TASK_FILES = 500
# One element of a JSON array is held whole while it is parsed.
MAX_JSON_ELEMENT_CHARS = 256 << 20

_SURROGATE = re.compile("[\ud800-\udfff]")
_WHITESPACE = re.compile(r"[ \t\r\n]*")
_DECODER = json.JSONDecoder()
# A text field may be as long as a row can be; `input.max_chars` cuts it later.
csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


class InputError(ValueError):
    """The input path cannot be read as asked: a usage error."""


class InputReadError(RuntimeError):
    """A file that passed :func:`check_input` failed while a read task read it (changed
    or truncated since, or broken past the part that was checked)."""


class _NotReadable(ValueError):
    """A file that cannot be read as its suffix says: named at check_input."""


@dataclass(frozen=True)
class InputFiles:
    """The files of one ``--input`` (on any filesystem), their format and the folder
    their ids are relative to. ``sizes`` and ``mtimes`` are as listed, for the job's
    fingerprint. ``schema``: the input columns' types, one for every file (None: each
    block keeps the types it was read with). ``rows``: rows per file where known before
    reading (Parquet footers, JSON read at check_input; None for CSV)."""

    files: tuple[Location, ...]
    fmt: str
    root: Location
    sizes: tuple[int, ...] = ()
    mtimes: tuple[int | None, ...] = ()
    schema: pa.Schema | None = None
    rows: tuple[int | None, ...] = ()
    names: tuple[str, ...] = field(init=False)

    def __post_init__(self) -> None:
        names = tuple(self.root.relative(p.path) for p in self.files)
        object.__setattr__(self, "names", names)


# --- names and listing -------------------------------------------------------------------


def _classify(name: str) -> tuple[str | None, str | None, str | None]:
    """``(format, compression, why not)`` for a file name: the format of the suffix under
    a compression suffix, or why the file is not an input."""
    path = PurePosixPath(name.lower())
    suffix = path.suffix
    compression = COMPRESSIONS.get(suffix)
    inner = PurePosixPath(path.stem).suffix if compression else suffix
    fmt = FORMATS.get(inner)
    if fmt is None:
        return None, None, _UNKNOWN
    if compression and fmt == "parquet":
        return None, None, _COMPRESSED_PARQUET
    return fmt, compression, None


_READ = ", ".join(FORMATS) + " (optionally compressed " + ", ".join(COMPRESSIONS) + ")"
_UNKNOWN = f"file(s) with a suffix that is not an input format (read: {_READ})"
_COMPRESSED_PARQUET = (
    "compressed Parquet file(s) (Parquet compresses its own pages and is read by random "
    "access: decompress them to .parquet)"
)
_HIDDEN = (
    "file(s) or folder(s) whose names start with '.' or '_' (markers and temporary files, "
    "as Spark and Hadoop write them)"
)
_LOOP = "linked folder(s) already read through another path (following them would read rows twice, or loop)"
_SPECIAL = "entries that are not regular files (broken links, sockets, pipes)"
_UNLISTABLE = "folder(s) that cannot be listed"
_QUIET = (_HIDDEN,)  # expected next to data: logged at INFO, the others warn


def _preview(names: Sequence[str], k: int = 3) -> str:
    shown = ", ".join(names[:k])
    return shown + (f" and {len(names) - k} more" if len(names) > k else "")


def _mtime(info: pafs.FileInfo) -> int | None:
    return info.mtime_ns if info.mtime is not None else None


def _input_location(path: str | os.PathLike[str] | Location) -> Location:
    try:
        return Location.of(path)
    except StorageError as exc:
        raise InputError(f"--input: {exc}") from exc


@dataclass(frozen=True)
class _Listed:
    path: str
    size: int
    mtime_ns: int | None


def list_input_files(
    path: str | os.PathLike[str] | Location,
) -> tuple[list[Location], str, Location]:
    """The files to read, their format and the root their ids are relative to. Skipped
    entries are logged with the reason."""
    files, fmt, root, _ = _list_inputs(path)
    return files, fmt, root


def _list_inputs(
    path: str | os.PathLike[str] | Location,
) -> tuple[list[Location], str, Location, list[_Listed]]:
    """:func:`list_input_files`, and the listing (sizes, times)."""
    where = _input_location(path)
    info = where.info()
    if info.type == pafs.FileType.NotFound:
        raise InputError(f"--input: {where} does not exist")
    if info.type == pafs.FileType.File:
        fmt, _, why = _classify(where.name)
        if fmt is None:
            what = "a compressed Parquet file" if why == _COMPRESSED_PARQUET else "its suffix"
            raise InputError(
                f"--input: cannot read {where.name} ({what}); give a file or folder of {_READ}"
                + ("; decompress it to .parquet" if why == _COMPRESSED_PARQUET else "")
            )
        return [where], fmt, where.parent, [_Listed(where.path, int(info.size or 0), _mtime(info))]
    if where.local:
        listed, skipped, followed = _walk_local(where)
    else:
        listed, skipped, followed = _walk_store(where)
    for link in followed:
        logger.info("--input: following the linked folder %s", link)
    for reason, names in skipped.items():
        logger.log(
            logging.INFO if reason in _QUIET else logging.WARNING,
            "--input: skipped %d %s: %s",
            len(names),
            reason,
            _preview(names),
        )
    listed.sort(key=lambda e: e.path)
    if not listed:
        why = "; ".join(f"skipped {len(v)} {k}" for k, v in skipped.items())
        raise InputError(
            f"--input: {where} holds no input files ({_READ})" + (f"; {why}" if why else "")
        )
    formats: dict[str, list[str]] = {}
    for e in listed:
        formats.setdefault(_classify(PurePosixPath(e.path).name)[0], []).append(
            where.relative(e.path)
        )
    if len(formats) > 1:
        kinds = "; ".join(f"{k}: {_preview(v, 2)}" for k, v in sorted(formats.items()))
        raise InputError(
            f"--input: {where} mixes formats ({kinds}); point --input at one format at a time"
        )
    return [where.at(e.path) for e in listed], next(iter(formats)), where, listed


def _walk_local(
    root: Location,
) -> tuple[list[_Listed], dict[str, list[str]], list[str]]:
    """Files under a local folder. pyarrow's recursive listing follows linked folders
    without end (a link to a parent repeats the tree until the path is too long), so the
    walk is ours: a linked folder is followed once per real folder, and logged."""
    files: list[_Listed] = []
    skipped: dict[str, list[str]] = {}
    followed: list[str] = []
    seen = {os.path.realpath(root.path)}
    stack = [root.path]
    while stack:
        folder = stack.pop()
        try:
            with os.scandir(folder) as it:
                entries = sorted(it, key=lambda e: e.name)
        except OSError as exc:
            skipped.setdefault(_UNLISTABLE, []).append(
                f"{root.relative(folder)}/ ({exc.strerror or exc})"
            )
            continue
        for entry in entries:
            rel = root.relative(entry.path)
            if entry.name.startswith((".", "_")):
                skipped.setdefault(_HIDDEN, []).append(rel + ("/" if entry.is_dir() else ""))
                continue
            try:
                is_dir, is_file = entry.is_dir(), entry.is_file()
            except OSError:
                is_dir = is_file = False
            if is_dir:
                real = os.path.realpath(entry.path)
                if real in seen:
                    skipped.setdefault(_LOOP, []).append(f"{rel}/ -> {real}")
                    continue
                seen.add(real)
                if entry.is_symlink():
                    followed.append(f"{rel}/ -> {real}")
                stack.append(entry.path)
            elif is_file:
                fmt, _, why = _classify(entry.name)
                if fmt is None:
                    skipped.setdefault(why, []).append(rel)
                    continue
                st = entry.stat()
                files.append(_Listed(entry.path, st.st_size, st.st_mtime_ns))
            else:
                skipped.setdefault(_SPECIAL, []).append(rel)
    return files, skipped, followed


def _walk_store(root: Location) -> tuple[list[_Listed], dict[str, list[str]], list[str]]:
    """Files under a folder of an object store (no links there)."""
    files: list[_Listed] = []
    skipped: dict[str, list[str]] = {}
    hidden: dict[str, None] = {}
    for entry in root.list(recursive=True):
        if entry.type != pafs.FileType.File:
            continue
        parts = PurePosixPath(root.relative(entry.path)).parts
        dot = next((i for i, p in enumerate(parts) if p.startswith((".", "_"))), None)
        if dot is not None:
            hidden["/".join(parts[: dot + 1]) + ("/" if dot < len(parts) - 1 else "")] = None
            continue
        fmt, _, why = _classify(parts[-1])
        if fmt is None:
            skipped.setdefault(why, []).append("/".join(parts))
            continue
        files.append(_Listed(entry.path, int(entry.size or 0), _mtime(entry)))
    if hidden:
        skipped[_HIDDEN] = list(hidden)
    return files, skipped, []


# --- opening -------------------------------------------------------------------------------


def _open_stream(path: Location):
    """The file's bytes, decompressed by suffix as they stream."""
    return path.open_input(compression=_classify(path.name)[1])


def _lines(path: Location) -> io.BufferedReader:
    """The file's bytes as a line iterator, decompressed by suffix as it streams."""
    return io.BufferedReader(_open_stream(path), 1 << 16)


def _is_json_suffix(path: Location) -> bool:
    name = PurePosixPath(path.name.lower())
    if name.suffix in COMPRESSIONS:
        name = PurePosixPath(name.stem)
    return name.suffix == ".json"


BOM = b"\xef\xbb\xbf"


def _json_layout(path: Location) -> str:
    """``array`` for a ``.json`` file holding one JSON array, else ``lines``."""
    if not _is_json_suffix(path):
        return "lines"
    with _open_stream(path) as f:
        head = b""
        while True:
            chunk = f.read(1 << 16)
            head = (head + chunk).lstrip(b" \t\r\n")
            if head.startswith(BOM):
                head = head[len(BOM) :].lstrip(b" \t\r\n")
            if head or not chunk:
                break
    return "array" if head[:1] == b"[" else "lines"


def require_column(
    path: Location, fmt: str, columns: list[str], column: str, flag: str, fix: str = ""
) -> None:
    """InputError when ``path`` (with ``columns``, from :func:`peek_columns`) lacks ``column``.

    A JSON file whose records cannot be read says nothing about its columns, so it
    passes: its rows get an error each instead.
    """
    if (fmt != "jsonl" or columns) and column not in columns:
        raise InputError(
            f"{flag}: {path.name} has no column '{column}' (its columns: {columns}){fix}"
        )


def peek_columns(path: Location, fmt: str) -> list[str]:
    """Column names from the start of a file, for checks before any Ray work.

    Raises OSError or pyarrow's errors for a file that cannot be read at all.
    """
    if fmt == "parquet":
        with path.open_file() as f:
            return list(pq.ParquetFile(f).schema_arrow.names)
    if fmt == "csv":
        with io.TextIOWrapper(
            _lines(path), newline="", encoding="utf-8-sig", errors="replace"
        ) as f:
            return next(csv.reader(f), [])
    for row, error, _ in _json_rows(path, []):
        return [] if error else list(row)
    return []


# --- JSON records ------------------------------------------------------------------------


def _json_rows(
    path: Location, text_columns: list[str], *, strict: bool = False
) -> Iterator[tuple[dict, str | None, int]]:
    """``(row, why it cannot be scored, size in bytes)`` per record of a JSON lines file or
    of a file holding one JSON array. ``strict``: a ``.json`` file that is neither raises
    _NotReadable (check_input names it)."""
    if _json_layout(path) == "array":
        with _open_stream(path) as stream:
            first = True
            for value, size, error in _JsonArray(stream):
                if error is not None:
                    yield {}, error, size
                elif not isinstance(value, dict):
                    if first and strict:
                        raise _NotReadable(
                            f"a JSON array whose first element is {_describe(value)}, not an "
                            "object: give one array of objects, or JSON lines"
                        )
                    yield {}, f"element is {_describe(value)}, expected a JSON object", size
                else:
                    yield value, _text_errors(value, text_columns), size
                first = False
        return
    json_suffix = strict and _is_json_suffix(path)
    with _lines(path) as f:
        for raw in _without_bom(f):
            if not raw.strip():
                continue
            row, error = _jsonl_row(raw, text_columns)
            if json_suffix:
                if error is not None and not row:
                    raise _NotReadable(
                        f"neither JSON lines nor one JSON array of objects (its first line: {error})"
                    )
                json_suffix = False
            yield row, error, len(raw)


class _JsonArray:
    """The elements of one top-level JSON array, parsed as the file streams: memory holds
    one element and a read-ahead chunk, however long the array. Structural problems (no
    array, bad JSON between elements, data after it) raise _NotReadable; an element
    nested too deeply to parse is an error for that element alone."""

    CHUNK = 1 << 20

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
        self.buf = ""
        self.pos = 0
        self.offset = 0  # characters dropped before buf
        self.eof = False

    def _more(self, at_least: int = 0) -> bool:
        """Read on; False at the end of the file."""
        if self.eof:
            return False
        if len(self.buf) - self.pos > MAX_JSON_ELEMENT_CHARS:
            raise _NotReadable(
                f"an element at character {self.offset + self.pos} is larger than "
                f"{MAX_JSON_ELEMENT_CHARS >> 20} MiB, or not valid JSON"
            )
        data = self.stream.read(max(self.CHUNK, at_least))
        self.offset += self.pos
        self.buf = self.buf[self.pos :]
        self.pos = 0
        if not data:
            self.eof = True
            self.buf += self.decoder.decode(b"", final=True)
            return False
        self.buf += self.decoder.decode(data)
        return True

    def _next_char(self) -> str:
        """The next character that is not white space ("" at the end)."""
        while True:
            self.pos = _WHITESPACE.match(self.buf, self.pos).end()
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self._more():
                return ""

    def __iter__(self) -> Iterator[tuple[object, int, str | None]]:
        c = self._next_char()
        if c == "\ufeff":
            self.pos += 1
            c = self._next_char()
        if c != "[":
            raise _NotReadable("neither JSON lines nor one JSON array of objects")
        self.pos += 1
        if self._next_char() == "]":
            self.pos += 1
        else:
            while True:
                yield self._element()
                c = self._next_char()
                if c == ",":
                    self.pos += 1
                    self._next_char()
                    continue
                if c == "]":
                    self.pos += 1
                    break
                where = self.offset + self.pos
                raise _NotReadable(
                    "the JSON array ends before its closing ']'"
                    if c == ""
                    else f"the JSON array is not valid at character {where} (expected ',' or ']')"
                )
        if self._next_char() != "":
            raise _NotReadable(
                f"data after the JSON array's closing ']' (character {self.offset + self.pos}): "
                "give one array of objects, or JSON lines"
            )

    def _element(self) -> tuple[object, int, str | None]:
        while True:
            start = self.pos
            if start >= len(self.buf):
                raise _NotReadable("the JSON array ends before its closing ']'")
            try:
                value, end = _DECODER.raw_decode(self.buf, start)
            except RecursionError:
                end = _skip_value(self.buf, start)
                if end is None:
                    if self._more(len(self.buf)):
                        continue
                    raise _NotReadable("the JSON array ends before its closing ']'") from None
                self.pos = end
                return None, end - start, "element is nested too deeply to read as JSON"
            except json.JSONDecodeError as exc:
                # At the end of what is read so far the element may only be cut short.
                cut = exc.pos >= len(self.buf) - 12 or exc.msg.startswith("Unterminated")
                if cut and self._more(len(self.buf) - self.pos):
                    continue
                if cut:
                    raise _NotReadable(
                        f"the JSON array ends before its closing ']', inside an element "
                        f"(character {self.offset + start}): cut short?"
                    ) from None
                raise _NotReadable(
                    f"not valid JSON at character {self.offset + exc.pos} ({exc.msg})"
                ) from None
            # A number or literal at the very end may go on in the next chunk.
            if end >= len(self.buf) and self._more():
                continue
            self.pos = end
            return value, end - start, None


def _skip_value(text: str, i: int) -> int | None:
    """Where the JSON value at ``i`` ends (for one too deep to parse), or None when the
    text ends first."""
    depth = 0
    n = len(text)
    while i < n:
        c = text[i]
        if c == '"':
            i += 1
            while i < n and text[i] != '"':
                i += 2 if text[i] == "\\" else 1
            if i >= n:
                return None
        elif c in "[{":
            depth += 1
        elif c in "]}":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return None


# --- checks before any Ray work ------------------------------------------------------------


_KIND_WORDS = {
    "str": "text",
    "bool": "a boolean",
    "int": "a whole number",
    "bigint": "a whole number beyond int64",
    "float": "a decimal number",
    "nested": "a list or an object",
}


def _kind(value: object) -> str:
    t = type(value)
    if t is str:
        return "str"
    if value is None:
        return "null"
    if t is bool:
        return "bool"
    if t is int:
        return "int" if -(2**63) <= value < 2**63 else "bigint"  # type: ignore[operator]
    if t is float:
        return "float"
    return "nested"


def _unify(a: pa.DataType | None, b: pa.DataType) -> pa.DataType | None:
    """Arrow's permissive promotion of two types, or None where there is none."""
    if a is None:
        return b
    if a == b:
        return a
    try:
        return (
            pa.unify_schemas(
                [pa.schema([("v", a)]), pa.schema([("v", b)])], promote_options="permissive"
            )
            .field(0)
            .type
        )
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
        return None


@dataclass
class _Facts:
    """What check_input learns of one file."""

    columns: list[str]
    # parquet: column -> Arrow type; jsonl: column -> kinds of value; csv: empty
    types: dict[str, Any] = field(default_factory=dict)
    # jsonl: column -> one nested type for its lists / objects (False: none fits them all)
    nested: dict[str, Any] = field(default_factory=dict)
    rows: int | None = None
    duplicates: list[str] = field(default_factory=list)


def _plain(t: pa.DataType) -> pa.DataType:
    """A dictionary-encoded column as its values' type: the encoding is the writer's
    choice (pandas categories), and it would not promote against the plain type."""
    return t.value_type if pa.types.is_dictionary(t) else t


def _inspect(path: Location, fmt: str, text_columns: list[str]) -> _Facts:
    if fmt == "parquet":
        with path.open_file() as f:
            pf = pq.ParquetFile(f)
            schema = pf.schema_arrow
            names = list(schema.names)
            return _Facts(
                names,
                {fld.name: _plain(fld.type) for fld in schema},
                rows=pf.metadata.num_rows,
                duplicates=_duplicates(names),
            )
    if fmt == "csv":
        header = _csv_header(path)
        if _classify(path.name)[1]:
            # A compressed file cut short fails only at its end: read it through once here.
            with _open_stream(path) as f:
                while f.read(1 << 22):
                    pass
        return _Facts(header, duplicates=_duplicates(header))
    return _scan_json(path, text_columns)


def _duplicates(names: list[str]) -> list[str]:
    seen: set[str] = set()
    return list(dict.fromkeys(n for n in names if n in seen or seen.add(n)))


def _csv_header(path: Location) -> list[str]:
    # utf-8-sig: a byte order mark (Excel writes one) is not part of the first header.
    with io.TextIOWrapper(
        _lines(path), newline="", encoding="utf-8-sig", errors="surrogateescape"
    ) as f:
        try:
            header = next(csv.reader(f), None)
        except csv.Error as exc:
            raise _NotReadable(f"its header cannot be read as CSV ({exc})") from None
    return [_clean(h) for h in header or []]


def _scan_json(path: Location, text_columns: list[str]) -> _Facts:
    """Every record once: the kinds of value of each column, and the nested type of its
    lists and objects (bounded: nested values are typed a few at a time)."""
    kinds: dict[str, set[str]] = {}
    nested: dict[str, Any] = {}
    pending: dict[str, list] = {}
    pending_bytes = pending_values = 0
    rows = 0

    def flush() -> None:
        for key, values in pending.items():
            if nested.get(key) is False:
                continue
            try:
                t = pa.array(values).type
            except (pa.ArrowException, OverflowError, RecursionError, TypeError, ValueError):
                nested[key] = False
                continue
            merged = _unify(nested.get(key), t)
            nested[key] = False if merged is None else merged
        pending.clear()

    for row, _, size in _json_rows(path, text_columns, strict=True):
        rows += 1
        for key, value in row.items():
            k = _kind(value)
            s = kinds.get(key)
            if s is None:
                s = kinds[key] = set()
            s.add(k)
            if k == "nested":
                pending.setdefault(key, []).append(value)
                pending_bytes += size
                pending_values += 1
        if pending_bytes > BLOCK_BYTES or pending_values > 1024:
            flush()
            pending_bytes = pending_values = 0
    flush()
    return _Facts(list(kinds), kinds, nested, rows=rows)


def _inspect_all(
    files: list[Location], fmt: str, root: Location, text_columns: list[str]
) -> tuple[list[_Facts | None], list[str]]:
    def one(path: Location) -> tuple[_Facts | None, str | None]:
        try:
            return _inspect(path, fmt, text_columns), None
        except Exception as exc:  # pyarrow and the OS raise many kinds for a broken file
            detail = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            return None, f"{root.relative(path.path)} ({detail})"

    if root.local or len(files) < 2:
        results = [one(p) for p in files]
    else:
        # Object stores: a request per file, so many at once.
        with ThreadPoolExecutor(max_workers=min(16, len(files))) as pool:
            results = list(pool.map(one, files))
    return [r[0] for r in results], [r[1] for r in results if r[1] is not None]


def check_input(
    cfg: EnsembleConfig, input_path: str | Path | Location, *, allow: tuple[str, ...] = ()
) -> InputFiles:
    """The input files and their one schema, after checks that need no Ray: raises
    InputError (a usage error).

    Every file is opened, not only the first: one that cannot be read at all (a corrupt
    Parquet footer, a compressed file cut short, a ``.json`` file that is neither JSON
    lines nor an array of objects, no permission) fails here, before any scoring, with
    all such files named. JSON files are read through (their types are known only so),
    Parquet files to their footers, compressed CSV files through (a cut gzip fails only
    at its end). ``allow``: columns that may share an output column's name (they are
    renamed or never reach the output).
    """
    files, fmt, root, listed = _list_inputs(input_path)
    text_columns = cfg.input.text_columns
    facts, unreadable = _inspect_all(files, fmt, root, text_columns)
    if unreadable:
        raise InputError(
            f"--input: {len(unreadable)} file(s) cannot be read: {'; '.join(unreadable)}; "
            "fix or remove them (nothing was scored)"
        )
    known = [f for f in facts if f is not None]
    duplicated = [
        f"{name} ({', '.join(repr(d) for d in f.duplicates)})"
        for name, f in zip((root.relative(p.path) for p in files), known, strict=True)
        if f.duplicates
    ]
    if duplicated:
        raise InputError(
            f"--input: {len(duplicated)} file(s) repeat column names: {_preview(duplicated, 5)}; "
            "give each column its own name (a repeated name would hide one of the columns)"
        )
    text, fix = cfg.input.text_column, "; set input.text_column in the config"
    if cfg.input.words_column:
        text, fix = cfg.input.words_column, "; set input.words_column in the config"
        # The words given are the output's `words`: the same lists under the same name.
        allow = (*allow, text)
    produced = set(cfg.output_columns())
    internal = _internal_names(cfg)
    for path, f in zip(files, known, strict=True):
        require_column(path, fmt, f.columns, text, "--input", fix)
        clash = [
            c
            for c in f.columns
            if c not in allow
            # This task's columns only: a classification input may well hold `tags`.
            and (c in produced or c.startswith(MEMBER_OUTPUT_PREFIXES))
        ]
        if clash:
            raise InputError(
                f"--input: column(s) {clash} of {path.name} have the names of output columns; "
                "rename or drop them (scoring an already scored file?)"
            )
        taken = [c for c in f.columns if INTERNAL_MARK in c or c in internal]
        if taken:
            raise InputError(
                f"--input: column(s) {taken} of {path.name} have names the scorer gives its "
                "own columns while it runs (names holding a NUL character, and "
                "'__member__<member name>'); rename them"
            )
    schema = _input_schema(
        [root.relative(p.path) for p in files], known, fmt, cfg.input.id_column, text_columns
    )
    return InputFiles(
        tuple(files),
        fmt,
        root,
        tuple(e.size for e in listed),
        tuple(e.mtime_ns for e in listed),
        schema,
        tuple(f.rows for f in known),
    )


def _internal_names(cfg: EnsembleConfig) -> set[str]:
    """Columns a host adds to a window while it runs, that an input column must not share."""
    from actors.host import member_output_column

    return {
        name
        for name in (member_output_column(m.name) for m in cfg.members)
        if INTERNAL_MARK not in name
    }


class _Seen:
    """Which files hold a column with each type (or kind), for one warning."""

    def __init__(self) -> None:
        self.files: dict[str, list[str]] = {}
        self.counts: dict[str, int] = {}

    def add(self, what: str, name: str) -> None:
        self.counts[what] = self.counts.get(what, 0) + 1
        names = self.files.setdefault(what, [])
        if len(names) < 3:
            names.append(name)

    def describe(self, words: Mapping[str, str] | None = None) -> str:
        parts = []
        for what, names in self.files.items():
            more = self.counts[what] - len(names)
            shown = ", ".join(names) + (f" and {more} more" if more > 0 else "")
            parts.append(f"{(words or {}).get(what, what)} in {shown}")
        return "; ".join(parts)


def _input_schema(
    names: list[str], facts: list[_Facts], fmt: str, id_column: str, text_columns: list[str]
) -> pa.Schema:
    """One schema for every file: see the module's docstring."""
    order: dict[str, None] = {}
    for f in facts:
        order.update(dict.fromkeys(f.columns))
    for col in text_columns:
        order.setdefault(col, None)
    forced = set(text_columns) | {id_column}
    fields = []
    for col in order:
        if col in forced or fmt == "csv":
            fields.append(pa.field(col, pa.string()))
        elif fmt == "parquet":
            fields.append(pa.field(col, _parquet_type(col, names, facts)))
        else:
            fields.append(pa.field(col, _json_type(col, names, facts)))
    if fmt != "csv":
        seen = _Seen()
        for name, f in zip(names, facts, strict=True):
            t = f.types.get(id_column)
            if t is None:
                continue
            if fmt == "parquet":
                if not pa.types.is_string(t):
                    seen.add(str(t), name)
            else:
                for k in sorted(t - {"str", "null"}):
                    seen.add(k, name)
        if seen.files:
            logger.info(
                "--input: the id column '%s' holds %s; ids are always written as text",
                id_column,
                seen.describe(_KIND_WORDS),
            )
    return pa.schema(fields)


def _parquet_type(col: str, names: list[str], facts: list[_Facts]) -> pa.DataType:
    seen = _Seen()
    target: pa.DataType | None = None
    text = False
    for name, f in zip(names, facts, strict=True):
        t = f.types.get(col)
        if t is None:
            continue
        seen.add(str(t), name)
        if text or pa.types.is_null(t):
            continue
        if target is None or pa.types.is_null(target):
            target = t
        elif (_stringish(target) and _binaryish(t)) or (_binaryish(target) and _stringish(t)):
            # Arrow would promote text to binary; bytes next to text are text written by
            # a tool that stores strings as binary (Hive, parquet-mr, older Spark).
            target = pa.string()
        else:
            merged = _unify(target, t)
            if merged is None:
                text, target = True, pa.string()
            else:
                target = merged
    if text:
        logger.warning(
            "--input: column '%s' is %s, which Arrow cannot promote to one type; it is read "
            "as text in every file",
            col,
            seen.describe(),
        )
    elif len(seen.files) > 1:
        logger.info("--input: column '%s' is %s: read as %s", col, seen.describe(), target)
    return target or pa.null()


def _stringish(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _binaryish(t: pa.DataType) -> bool:
    return (
        pa.types.is_binary(t)
        or pa.types.is_large_binary(t)
        or pa.types.is_binary_view(t)
        or pa.types.is_fixed_size_binary(t)
    )


def _json_type(col: str, names: list[str], facts: list[_Facts]) -> pa.DataType:
    seen = _Seen()
    kinds: set[str] = set()
    nested: Any = None
    for name, f in zip(names, facts, strict=True):
        ks = f.types.get(col)
        if not ks:
            continue
        kinds |= ks
        for k in sorted(ks - {"null"}):
            seen.add(k, name)
        n = f.nested.get(col)
        if n is False or nested is False:
            nested = False
        elif n is not None:
            merged = _unify(nested, n)
            nested = False if merged is None else merged
    kinds.discard("null")
    if not kinds:
        return pa.null()
    single = {
        frozenset({"str"}): pa.string(),
        frozenset({"bool"}): pa.bool_(),
        frozenset({"int"}): pa.int64(),
        frozenset({"float"}): pa.float64(),
        frozenset({"int", "float"}): pa.float64(),
    }.get(frozenset(kinds))
    if single is not None:
        return single
    if kinds == {"nested"} and nested not in (None, False):
        return nested
    logger.warning(
        "--input: column '%s' holds %s; it is read as text in every file (other values as "
        "their JSON text)",
        col,
        seen.describe(_KIND_WORDS),
    )
    return pa.string()


# --- rows ----------------------------------------------------------------------------------


def validate_rows(
    batch: pa.Table,
    *,
    text_column: str,
    text_pair_column: str | None,
    words_column: str | None = None,
) -> pa.Table:
    """Add the ``error`` column: why a row cannot be scored, or null. No row is dropped.

    With ``words_column``, that column's lists of words are checked instead of the text."""
    n = batch.num_rows
    errors: list[str | None] = (
        batch.column(READ_ERROR_COLUMN).to_pylist()
        if READ_ERROR_COLUMN in batch.column_names
        else [None] * n
    )
    if words_column:
        _check_words(batch, words_column, errors)
        text_column, text_pair_column = "", None
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


def word_list_error(value: object, col: str) -> str | None:
    """Why ``value`` is not a list of words, or None."""
    if value is None:
        return f"'{col}' is null"
    if not isinstance(value, (list, tuple)):
        return f"'{col}' is {_describe(value)}, expected a list of words (strings)"
    if not value:
        return f"'{col}' is empty"
    for i, word in enumerate(value):
        if not isinstance(word, str) or not word.strip():
            what = "empty" if isinstance(word, str) else _describe(word)
            return f"'{col}'[{i}] is {what}, expected a word (a non-blank string)"
    return None


def _check_words(batch: pa.Table, col: str, errors: list[str | None]) -> None:
    if col not in batch.column_names:
        for i, e in enumerate(errors):
            errors[i] = e or f"'{col}' is missing"
        return
    for i, value in enumerate(batch.column(col).to_pylist()):
        if errors[i] is None:
            errors[i] = word_list_error(value, col)


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


_TOO_DEEP = "<value nested too deeply to keep>"


def _cell(value: object) -> object:
    """A value Arrow can hold: strings with surrogates replaced, deep values as JSON text."""
    if isinstance(value, str):
        return _clean(value)
    if isinstance(value, (list, dict)):
        try:
            # ensure_ascii escapes surrogates, so the text is valid UTF-8.
            return json.loads(_clean(json.dumps(value)))
        except (RecursionError, ValueError):
            return _TOO_DEEP
    return value


def _json_text(value: object) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (RecursionError, ValueError, TypeError):
        return _TOO_DEEP


def _column(values: list) -> pa.Array:
    """Values of unknown type (no schema): inferred, or each as JSON text when mixed."""
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
        return _text_column(values)


def _text_column(values: list) -> pa.Array:
    return pa.array(
        [v if v is None or isinstance(v, str) else _json_text(v) for v in values], pa.string()
    )


def _typed_column(values: list, to: pa.DataType) -> pa.Array:
    """Values as the input schema says (their kinds were all seen at check_input)."""
    if pa.types.is_string(to):
        return _text_column(values)
    try:
        return pa.array(values, type=to)
    except (pa.ArrowException, OverflowError, RecursionError, TypeError, ValueError) as exc:
        raise InputReadError(
            f"a value does not fit the type {to} that check_input found for its column "
            f"({type(exc).__name__}: {exc}); was the file changed while the job ran?"
        ) from None


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


def _json_table(
    rows: list[dict], errors: list[str | None], text_columns: list[str], schema: pa.Schema | None
) -> pa.Table:
    names: dict[str, None] = dict.fromkeys(schema.names) if schema is not None else {}
    for row in rows:
        names.update(dict.fromkeys(row))
    columns = {}
    for name in names:
        values = [row.get(name) for row in rows]
        if schema is not None and name in schema.names:
            columns[name] = _typed_column(values, schema.field(name).type)
        else:
            columns[name] = _column(values)
    for col in text_columns:
        # Text columns are always strings, even in a block where every value is null.
        columns[col] = (
            columns[col].cast(pa.string()) if col in columns else pa.nulls(len(rows), pa.string())
        )
    columns[READ_ERROR_COLUMN] = pa.array(errors, type=pa.string())
    return pa.table(columns)


def _json_blocks(
    path: Location,
    block_rows: int,
    block_bytes: int,
    text_columns: list[str],
    schema: pa.Schema | None,
) -> Iterator[pa.Table]:
    rows: list[dict] = []
    errors: list[str | None] = []
    size = 0
    for row, error, n in _json_rows(path, text_columns):
        if rows and (len(rows) >= block_rows or size + n > block_bytes):
            yield _json_table(rows, errors, text_columns, schema)
            rows, errors, size = [], [], 0
        rows.append(row)
        errors.append(error)
        size += n
    if rows:
        yield _json_table(rows, errors, text_columns, schema)


def _csv_blocks(
    path: Location, block_rows: int, block_bytes: int, text_columns: list[str]
) -> Iterator[pa.Table]:
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
        size = 0
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
            n = sum(map(len, record)) + len(record)
            if rows and (len(rows) >= block_rows or size + n > block_bytes):
                yield _csv_table(rows, errors, header, text_columns)
                rows, errors, size = [], [], 0
            row = dict(zip(header, record, strict=False))
            error = error or _text_errors(row, text_columns)
            rows.append(row)
            errors.append(error)
            size += n
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


def _parquet_blocks(path: Location, block_rows: int, block_bytes: int) -> Iterator[pa.Table]:
    with path.open_file() as f:
        pf = pq.ParquetFile(f)
        meta = pf.metadata
        size = sum(meta.row_group(i).total_byte_size for i in range(meta.num_row_groups))
        per_row = size / max(meta.num_rows, 1)
        # Rows per batch from the row groups' uncompressed size: big rows, few per block.
        batch = max(1, min(block_rows, int(block_bytes // max(per_row, 1.0))))
        for b in pf.iter_batches(batch_size=batch):
            yield from _within(pa.Table.from_batches([b]), block_bytes)


def _within(table: pa.Table, block_bytes: int) -> Iterator[pa.Table]:
    """``table`` in slices of at most ``block_bytes`` (a single row may be more): rows
    are seldom as alike as the average the batch size came from."""
    if table.num_rows <= 1 or table.nbytes <= block_bytes:
        yield table
        return
    half = table.num_rows // 2
    yield from _within(table.slice(0, half), block_bytes)
    yield from _within(table.slice(half), block_bytes)


# --- one schema ----------------------------------------------------------------------------


def _utf8(values: Iterable[bytes | None], errors: str) -> list[str | None]:
    return [None if v is None else v.decode("utf-8", errors) for v in values]


def _as_text(column: pa.ChunkedArray, name: str) -> tuple[pa.ChunkedArray, list | None]:
    """A text column as strings, and per row why it is not text (None: every row is)."""
    t = column.type
    if pa.types.is_string(t):
        return column, None
    if (
        _stringish(t)
        or pa.types.is_null(t)
        or (pa.types.is_dictionary(t) and _stringish(t.value_type))
    ):
        return column.cast(pa.string()), None
    if _binaryish(t):
        try:
            return column.cast(pa.string()), None  # valid UTF-8 throughout
        except pa.ArrowInvalid:
            pass
        values, errors = [], []
        for raw in column.to_pylist():
            try:
                values.append(None if raw is None else raw.decode("utf-8"))
                errors.append(None)
            except UnicodeDecodeError as exc:
                values.append(raw.decode("utf-8", "replace"))
                errors.append(
                    f"'{name}' is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at byte {exc.start})"
                )
        return pa.chunked_array([pa.array(values, pa.string())]), errors
    errors = [
        None if v is None else f"'{name}' is {t}, expected a string" for v in column.to_pylist()
    ]
    return _as_string(column), errors


def _as_string(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Any column as text: Arrow's cast where there is one, bytes decoded (U+FFFD for
    what is not UTF-8), nested values as JSON text."""
    t = column.type
    if _binaryish(t):
        try:
            return column.cast(pa.string())
        except pa.ArrowInvalid:
            return pa.chunked_array([pa.array(_utf8(column.to_pylist(), "replace"), pa.string())])
    try:
        return column.cast(pa.string())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError):
        return pa.chunked_array([_text_column(column.to_pylist())])


def _id_text(column: pa.ChunkedArray) -> pa.ChunkedArray:
    """Ids as text; bytes that are not UTF-8 as ``\\xNN`` escapes, which keep ids apart."""
    if _binaryish(column.type):
        try:
            return column.cast(pa.string())
        except pa.ArrowInvalid:
            values = _utf8(column.to_pylist(), "backslashreplace")
            return pa.chunked_array([pa.array(values, pa.string())])
    return column if pa.types.is_string(column.type) else _as_string(column)


def _conform(
    table: pa.Table,
    schema: pa.Schema | None,
    text_columns: list[str],
    id_column: str | None,
) -> pa.Table:
    """A block in the input's one schema (its columns, in its order, of its types), text
    and id columns as strings, and ``__read_error`` last."""
    n = table.num_rows
    errors: list | None = (
        table.column(READ_ERROR_COLUMN).to_pylist()
        if READ_ERROR_COLUMN in table.column_names
        else None
    )
    names = list(schema.names) if schema is not None else []
    names += [c for c in table.column_names if c not in names and c != READ_ERROR_COLUMN]
    arrays, fields = [], []
    for name in names:
        to = schema.field(name).type if schema is not None and name in schema.names else None
        if name not in table.column_names:
            col = pa.chunked_array([pa.nulls(n, to)])
        else:
            col = table.column(name)
            if name in text_columns:
                col, errs = _as_text(col, name)
                if errs is not None:
                    errors = [a or b for a, b in zip(errors or [None] * n, errs, strict=True)]
            elif name == id_column:
                col = _id_text(col)
            elif to is not None and col.type != to:
                col = _to_type(col, to, name)
        arrays.append(col)
        fields.append(pa.field(name, col.type))
    arrays.append(pa.chunked_array([pa.array(errors or [None] * n, pa.string())]))
    fields.append(pa.field(READ_ERROR_COLUMN, pa.string()))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def _to_type(column: pa.ChunkedArray, to: pa.DataType, name: str) -> pa.ChunkedArray:
    if pa.types.is_string(to):
        return _as_string(column)
    try:
        return column.cast(to)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as exc:
        raise InputReadError(
            f"column '{name}' holds {column.type} values that do not fit {to}, the type "
            f"check_input settled from every file's footer ({exc})"
        ) from None


def iter_blocks(
    path: Location,
    fmt: str,
    block_rows: int,
    text_columns: list[str],
    *,
    block_bytes: int = BLOCK_BYTES,
    schema: pa.Schema | None = None,
    id_column: str | None = None,
) -> Iterator[pa.Table]:
    """The rows of one input file, at most ``block_rows`` rows (and ``block_bytes``
    bytes, unless one row is bigger) at a time, in order. Text columns are strings; a
    record that is a row but not text has its reason in ``__read_error``. With
    ``schema`` (:attr:`InputFiles.schema`), every block has its columns and types."""
    if fmt == "parquet":
        raw: Iterator[pa.Table] = _parquet_blocks(path, block_rows, block_bytes)
    elif fmt == "csv":
        raw = _csv_blocks(path, block_rows, block_bytes, text_columns)
    else:
        raw = _json_blocks(path, block_rows, block_bytes, text_columns, schema)
    for table in raw:
        yield _conform(table, schema, text_columns, id_column)


def read_column(files: list[Location], fmt: str, column: str, *, as_text: bool = True) -> list:
    """One column of every input row, in input order (None where a row lacks it).

    ``as_text=False``: JSON values keep their types (a list of tags stays a list)."""
    values: list = []
    # Parquet keeps its types (labels may be numbers); its bytes are decoded, as text.
    text = [] if fmt == "parquet" or not as_text else [column]
    for path in files:
        for table in iter_blocks(path, fmt, 65536, text):
            if column in table.column_names:
                col = table.column(column)
                values.extend((_as_string(col) if _binaryish(col.type) else col).to_pylist())
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


# --- read tasks ----------------------------------------------------------------------------


def read_groups(
    sizes: Sequence[int], *, task_bytes: int = TASK_BYTES, task_files: int = TASK_FILES
) -> list[tuple[int, int]]:
    """Consecutive files as read tasks, ``[start, stop)`` indices: up to ``task_bytes``
    and ``task_files`` each, a file bigger than ``task_bytes`` alone.

    >>> read_groups([10, 10, 100, 10], task_bytes=50, task_files=2)
    [(0, 2), (2, 3), (3, 4)]
    """
    groups = []
    start, total = 0, 0
    for i, size in enumerate(sizes):
        if i > start and (total + size > task_bytes or i - start >= task_files):
            groups.append((start, i))
            start, total = i, 0
        total += size
    if len(sizes) > start:
        groups.append((start, len(sizes)))
    return groups


@dataclass(frozen=True)
class _Reader:
    """How every file of a job is read: what a read task needs besides its files."""

    fmt: str
    schema: pa.Schema | None
    id_column: str
    text_column: str
    text_pair_column: str | None
    rename: Mapping[str, str]
    block_rows: int
    block_bytes: int
    words_column: str | None = None

    def tables(
        self, index: int, path: Location, name: str, skip: np.ndarray | None, count: list[int]
    ) -> Iterator[pa.Table]:
        """One file's validated blocks with ids and helper columns; rows it read in ``count``."""
        text_columns = [c for c in (self.text_column, self.text_pair_column) if c]
        if self.words_column:
            text_columns = []
        start = 0
        blocks = iter_blocks(
            path,
            self.fmt,
            self.block_rows,
            text_columns,
            block_bytes=self.block_bytes,
            schema=self.schema,
            id_column=self.id_column,
        )
        while True:
            try:
                table = next(blocks, None)
            except InputReadError as exc:
                raise InputReadError(f"--input: {name}, after row {start}: {exc}") from exc
            except Exception as exc:  # the OS, pyarrow's codecs, ...: name the file
                raise InputReadError(
                    f"--input: {name} cannot be read past row {start}: {type(exc).__name__}: "
                    f"{exc}; it was readable when the job started (changed since?)"
                ) from exc
            if table is None:
                break
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
                table,
                text_column=self.text_column,
                text_pair_column=self.text_pair_column,
                words_column=self.words_column,
            )
            table = table.append_column(FILE_COLUMN, pa.array(np.full(n, index, np.int32)))
            table = table.append_column(ROW_COLUMN, pa.array(rows))
            yield table if keep.all() else table.filter(pa.array(keep))
        count[0] = start

    def _with_ids(self, table: pa.Table, name: str, start: int) -> pa.Table:
        n = table.num_rows
        if self.id_column not in table.column_names:
            return table.append_column(self.id_column, _row_ids(name, start, n))
        ids = table.column(self.id_column)
        if not pa.types.is_string(ids.type):
            ids = _id_text(ids)  # renamed onto the id column: still text
        if ids.null_count:
            # A row with no id (an unreadable JSON line, say) still needs one.
            ids = pc.if_else(pc.is_null(ids), _row_ids(name, start, n), ids)
        index = table.column_names.index(self.id_column)
        return table.set_column(index, self.id_column, ids)


class _ReadGroup:
    """One read task: its own files only (and their committed rows), so Ray keeps a few
    hundred names per task, not every file of the job in every task."""

    __name__ = "read_input_files"  # Ray names read functions in its warnings

    def __init__(
        self,
        reader: _Reader,
        files: tuple[tuple[int, Location, str], ...],
        skip: dict[str, np.ndarray],
        counts: Location | None,
    ) -> None:
        self.reader = reader
        self.files = files
        self.skip = skip
        self.counts = counts

    def __call__(self) -> Iterator[pa.Table]:
        """Blocks of up to ``block_rows`` rows / ``block_bytes`` bytes, joining the rows of
        small files; then one record of the rows read per file."""
        limit_rows, limit_bytes = self.reader.block_rows, self.reader.block_bytes
        pending: list[pa.Table] = []
        rows = nbytes = 0
        read: list[int] = []
        for index, path, name in self.files:
            count = [0]
            for table in self.reader.tables(index, path, name, self.skip.get(name), count):
                if pending and (
                    rows + table.num_rows > limit_rows or nbytes + table.nbytes > limit_bytes
                ):
                    yield _joined(pending)
                    pending, rows, nbytes = [], 0, 0
                pending.append(table)
                rows += table.num_rows
                nbytes += table.nbytes
            read.append(count[0])
        if pending:
            yield _joined(pending)
        if self.counts is not None and self.files:
            first = self.files[0][0]
            write_json(self.counts.join(f"task-{first:09d}.json"), {"first": first, "rows": read})


def _joined(tables: list[pa.Table]) -> pa.Table:
    if len(tables) == 1:
        return tables[0]
    return pa.concat_tables(tables, promote_options="default").combine_chunks()


class InputDatasource(Datasource):
    """Read tasks over groups of files (:func:`read_groups`), yielding validated blocks
    with ids, an ``error`` column and the helper columns ``__file`` / ``__row``.

    ``skip``: per file name, the ``[start, end)`` row ranges an earlier run committed;
    those rows are read (to keep the numbering) but not passed on. ``counts_dir``: each
    read task writes ``task-<first file index>.json`` there once it is done: the rows it
    read per file (:func:`read_counts`).

    The grouping is the datasource's own and ignores Ray's ``parallelism``: ask
    ``read_datasource`` for ``num_read_tasks`` blocks, or Ray splits each block into
    ``parallelism / num_read_tasks`` pieces.
    """

    def __init__(
        self,
        inputs: InputFiles,
        *,
        id_column: str,
        text_column: str,
        text_pair_column: str | None = None,
        words_column: str | None = None,
        rename: Mapping[str, str] | None = None,
        skip: Mapping[str, np.ndarray] | None = None,
        counts_dir: Location | None = None,
        block_rows: int | None = None,
        block_bytes: int | None = None,
        task_bytes: int | None = None,
        task_files: int | None = None,
    ) -> None:
        """Sizes left None are this module's ``BLOCK_ROWS``, ``BLOCK_BYTES``,
        ``TASK_BYTES`` and ``TASK_FILES`` as they are when the job is built."""
        super().__init__()
        self.inputs = inputs
        self.reader = _Reader(
            inputs.fmt,
            inputs.schema,
            id_column,
            text_column,
            text_pair_column,
            dict(rename or {}),
            block_rows or BLOCK_ROWS,
            block_bytes or BLOCK_BYTES,
            words_column,
        )
        self.skip = dict(skip or {})
        self.counts_dir = counts_dir
        sizes = inputs.sizes or (0,) * len(inputs.files)
        self.groups = read_groups(
            sizes, task_bytes=task_bytes or TASK_BYTES, task_files=task_files or TASK_FILES
        )

    @property
    def num_read_tasks(self) -> int:
        return len(self.groups)

    def get_name(self) -> str:
        return self.inputs.fmt.upper()

    def estimate_inmemory_data_size(self) -> int | None:
        return sum(self.inputs.sizes) or None

    def get_read_tasks(self, parallelism: int, per_task_row_limit=None, data_context=None):
        tasks = []
        for start, stop in self.groups:
            group = self._group(start, stop)
            meta = BlockMetadata(
                num_rows=None,
                size_bytes=sum(self.inputs.sizes[start:stop]) if self.inputs.sizes else None,
                exec_stats=None,
                input_files=tuple(p.uri for p in self.inputs.files[start:stop]),
            )
            tasks.append(ReadTask(group, meta, per_task_row_limit=per_task_row_limit))
        return tasks

    def _group(self, start: int, stop: int) -> _ReadGroup:
        files = tuple((i, self.inputs.files[i], self.inputs.names[i]) for i in range(start, stop))
        skip = {name: self.skip[name] for _, _, name in files if name in self.skip}
        return _ReadGroup(self.reader, files, skip, self.counts_dir)

    def _read_file(self, index: int) -> Iterator[pa.Table]:
        """One file read as a task of its own (tests read files one at a time)."""
        return self._group(index, index + 1)()


def read_counts(counts_dir: Location) -> dict[int, int]:
    """Rows read per input file (its index), as the read tasks that finished recorded."""
    counts: dict[int, int] = {}
    for entry in counts_dir.list():
        name = PurePosixPath(entry.path).name
        if not name.endswith(".json") or name.startswith(".tmp-"):
            continue
        try:
            doc = json.loads(counts_dir.at(entry.path).read_bytes())
            if "first" in doc:  # one record per read task
                first = int(doc["first"])
                counts.update({first + i: int(n) for i, n in enumerate(doc["rows"])})
            else:  # one per file, as jobs before read tasks were grouped recorded them
                counts[int(name[: -len(".json")])] = int(doc["rows"])
        except (OSError, ValueError, KeyError, TypeError):
            continue  # a record cut short is no record: those files count as not read
    return counts


def write_json(path: Location, doc: dict) -> None:
    """Write ``doc`` so that a reader sees the whole file or none of it, durably."""
    path.write_bytes(json.dumps(doc).encode())
