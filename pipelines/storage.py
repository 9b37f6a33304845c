"""Where a job's files live: local paths and URIs, through ``pyarrow.fs``.

``--input``, ``--output``, ``evaluate --report`` and member ``model:`` / ``tokenizer:``
take a local path or a URI: ``s3://``, ``gs://``, ``abfs://``, ``hdfs://`` (pyarrow's own
clients), ``file://``, or any other scheme fsspec knows when it is installed.
Credentials come from where each client reads them (``AWS_*`` variables, ``~/.aws``,
instance roles, ``GOOGLE_APPLICATION_CREDENTIALS``, ...). pyarrow does not read
``AWS_ENDPOINT_URL`` (nor ``AWS_ENDPOINT_URL_S3``), which S3-compatible stores such as
MinIO need, so they are read here and passed on.

A :class:`Location` is a filesystem and a path in it. It pickles, so read and write
tasks on other nodes reach the same store. Object stores have no rename: a write is one
PUT (or a multipart upload that completes at close), which other readers see whole or
not at all. Local writes go to a temporary name, are fsynced and renamed into place, and
the folder is fsynced, so a power loss never leaves a named file half written.

Example::

    out = Location.of("s3://bucket/scored")
    out.join("_SUCCESS").write_bytes(b"{}")
    assert out.join("_SUCCESS").is_file()
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse

import pyarrow as pa
import pyarrow.fs as pafs

from pipelines.config import is_uri

__all__ = ["Location", "StorageError", "is_uri", "local_member", "model_cache_dir", "s3_filesystem"]


logger = logging.getLogger(__name__)

MODEL_CACHE_ENV = "RAY_ENSEMBLE_MODEL_CACHE"


class StorageError(ValueError):
    """A path or URI that cannot be used as given: a usage error."""


def s3_filesystem() -> pafs.S3FileSystem:
    """pyarrow's S3 client, with the endpoint from ``AWS_ENDPOINT_URL_S3`` or
    ``AWS_ENDPOINT_URL`` when one is set (MinIO, moto, other S3-compatible stores)."""
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    kwargs: dict = {}
    if endpoint:
        kwargs["endpoint_override"] = endpoint
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def _filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    scheme = urlparse(uri).scheme.lower()
    if scheme in ("s3", "s3a"):
        rest = uri.split("://", 1)[1]
        return s3_filesystem(), rest.rstrip("/")
    try:
        return pafs.FileSystem.from_uri(uri)
    except (ValueError, pa.ArrowException) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        try:
            import fsspec
        except ImportError:
            raise StorageError(
                f"{uri}: pyarrow cannot open '{scheme}://' ({first}); install fsspec and the "
                f"package for '{scheme}' (e.g. gcsfs, adlfs), or use a local path"
            ) from exc
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as exc2:
            raise StorageError(f"{uri}: cannot open '{scheme}://': {exc2}") from exc2
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path.rstrip("/")


@dataclass(frozen=True, eq=False)
class Location:
    """A filesystem and a path in it (``/abs/path`` locally, ``bucket/key`` on S3)."""

    fs: pafs.FileSystem
    path: str
    uri: str

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, Location)
            and self.fs.type_name == other.fs.type_name
            and self.path == other.path
        )

    def __hash__(self) -> int:
        return hash((self.fs.type_name, self.path))

    @classmethod
    def of(cls, where: str | os.PathLike[str] | Location, base: Path | None = None) -> Location:
        """A local path (relative to ``base`` or the working folder) or a URI."""
        if isinstance(where, Location):
            return where
        text = str(where)
        if is_uri(text):
            if text.lower().startswith("file://"):
                local = Path(urlparse(text).path)
                return cls(pafs.LocalFileSystem(), str(local), str(local))
            fs, path = _filesystem(text)
            return cls(fs, path, text.rstrip("/"))
        local = Path(text).expanduser()
        if base is not None and not local.is_absolute():
            local = base / local
        local = Path(os.path.abspath(local))
        return cls(pafs.LocalFileSystem(), str(local), str(local))

    # --- naming ----------------------------------------------------------------------

    @property
    def local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    @property
    def name(self) -> str:
        return PurePosixPath(self.path).name

    def join(self, *names: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *names])
        uri = "/".join([self.uri.rstrip("/"), *names])
        return Location(self.fs, path, uri)

    @property
    def parent(self) -> Location:
        path = str(PurePosixPath(self.path).parent)
        uri = self.uri.rsplit("/", 1)[0] if "/" in self.uri else self.uri
        return Location(self.fs, path, uri)

    def relative(self, inner: str) -> str:
        """``inner`` (a path on this filesystem under this location) relative to it."""
        return PurePosixPath(inner).relative_to(PurePosixPath(self.path)).as_posix()

    def at(self, path: str) -> Location:
        """The location of ``path``, another path on the same filesystem."""
        return self.join(self.relative(path)) if path != self.path else self

    def __str__(self) -> str:
        return self.uri

    @property
    def local_path(self) -> Path:
        if not self.local:
            raise StorageError(f"{self.uri} is not a local path")
        return Path(self.path)

    # --- reading ---------------------------------------------------------------------

    def info(self) -> pafs.FileInfo:
        return self.fs.get_file_info(self.path)

    def exists(self) -> bool:
        return self.info().type != pafs.FileType.NotFound

    def is_dir(self) -> bool:
        return self.info().type == pafs.FileType.Directory

    def is_file(self) -> bool:
        return self.info().type == pafs.FileType.File

    def list(self, *, recursive: bool = False) -> list[pafs.FileInfo]:
        """The entries under this folder (none when it does not exist)."""
        selector = pafs.FileSelector(self.path, allow_not_found=True, recursive=recursive)
        return self.fs.get_file_info(selector)

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.read()

    def read_text(self) -> str:
        return self.read_bytes().decode("utf-8")

    def open_input(self, *, compression: str | None = "detect"):
        """A streaming reader; ``detect`` decompresses ``.gz``, ``.bz2``, ``.zst``, ...
        by suffix, as it streams."""
        return self.fs.open_input_stream(self.path, compression=compression)

    def open_file(self):
        """A random-access reader (Parquet footers)."""
        return self.fs.open_input_file(self.path)

    # --- writing ---------------------------------------------------------------------

    def mkdir(self) -> None:
        if self.local:
            Path(self.path).mkdir(parents=True, exist_ok=True)
        # Object stores have no folders: a key's prefix is its folder.

    @contextlib.contextmanager
    def writer(self) -> Iterator:
        """A file object whose bytes appear under this name only when it closes without
        an error: whole, durable (fsynced, locally), never half written."""
        if self.local:
            final = Path(self.path)
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = final.with_name(f".tmp-{uuid.uuid4().hex}-{final.name}")
            try:
                with open(tmp, "wb") as f:
                    yield f
                    f.flush()
                    os.fsync(f.fileno())
                os.replace(tmp, final)
            except BaseException:
                tmp.unlink(missing_ok=True)
                raise
            fsync_dir(final.parent)
            return
        # Object stores: the bytes are gathered first and sent at once. pyarrow's output
        # stream has no abort, and dropping one mid-write completes the upload with what
        # it holds; a process killed mid-upload leaves no object, as wanted.
        buffer = io.BytesIO()
        yield buffer
        with self.fs.open_output_stream(self.path) as stream:
            stream.write(buffer.getbuffer())

    def write_bytes(self, data: bytes) -> None:
        with self.writer() as f:
            f.write(data)

    def delete(self) -> None:
        """Delete this file; a missing one is fine (a retried step)."""
        try:
            self.fs.delete_file(self.path)
        except FileNotFoundError:
            pass

    def delete_tree(self) -> None:
        """Delete this folder and what it holds; a missing one is fine."""
        if self.info().type == pafs.FileType.NotFound:
            return
        self.fs.delete_dir(self.path)
        if self.local:
            fsync_dir(Path(self.path).parent)


def fsync_dir(folder: Path) -> None:
    """Make a rename or unlink in ``folder`` durable (POSIX: fsync the folder itself)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the data itself is synced
    finally:
        os.close(fd)


# --- models on object storage ------------------------------------------------------------


def model_cache_dir() -> Path:
    """Where a node keeps its copies of models from object storage."""
    configured = os.environ.get(MODEL_CACHE_ENV)
    return Path(configured) if configured else Path.home() / ".cache" / "ray-ensemble" / "models"


def _object_tag(where: Location, info: pafs.FileInfo) -> str:
    """What changes when the object does: its ETag where the store gives one (S3 does,
    on a HEAD), else its modification time."""
    try:
        with where.fs.open_input_file(info.path) as f:
            meta = f.metadata() or {}
    except (OSError, pa.ArrowException):
        meta = {}
    etag = meta.get(b"ETag") or meta.get("ETag") or meta.get(b"etag") or meta.get("etag")
    if etag:
        return etag.decode() if isinstance(etag, bytes) else str(etag)
    return str(info.mtime_ns)


def local_copy(uri: str, cache: Path | None = None) -> Path:
    """A local folder holding the model folder (or file) at ``uri``, copied once per node.

    The copy is keyed by the path, size and ETag of every object, so a changed model is
    copied again. It is made in a temporary folder and renamed into place when complete:
    a copy cut short is never used, and two processes copying at once both end with a
    whole one."""
    where = Location.of(uri)
    info = where.info()
    if info.type == pafs.FileType.NotFound:
        raise StorageError(f"{uri} does not exist (or the credentials cannot see it)")
    entries = (
        [info]
        if info.type == pafs.FileType.File
        else [e for e in where.list(recursive=True) if e.type == pafs.FileType.File]
    )
    if not entries:
        raise StorageError(f"{uri} is an empty folder")
    base = where.parent if info.type == pafs.FileType.File else where
    listing = sorted(
        (base.relative(e.path), int(e.size or 0), _object_tag(where, e)) for e in entries
    )
    key = hashlib.sha256(json.dumps([where.uri, listing]).encode()).hexdigest()[:24]
    root = cache or model_cache_dir()
    target = root / f"{where.name or 'model'}-{key}"
    if target.is_dir():
        return target / where.name if info.type == pafs.FileType.File else target
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{uuid.uuid4().hex}"
    logger.info("copying %s (%d files) to the node's model cache %s", uri, len(entries), target)
    try:
        for rel, _, _ in listing:
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            with where.fs.open_input_stream(base.join(rel).path) as src, open(dest, "wb") as out:
                shutil.copyfileobj(src, out, 1 << 20)
                out.flush()
                os.fsync(out.fileno())
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.is_dir():  # not a copy that won the race: a real failure
                raise
        fsync_dir(root)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target / where.name if info.type == pafs.FileType.File else target


def local_member(member):
    """``member`` with its ``model`` / ``tokenizer`` URIs replaced by local copies on
    this node (the same member when both are local already)."""
    update = {}
    for key in ("model", "tokenizer"):
        value = getattr(member, key, None)
        if value and is_uri(value):
            update[key] = str(local_copy(value))
    return member.model_copy(update=update) if update else member
