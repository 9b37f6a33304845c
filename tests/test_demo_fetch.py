"""The demo fetches its archives pinned by hash and never builds or runs them.

A package index on loopback (a real HTTP server speaking the simple API, in its JSON and
HTML forms) serves source distributions whose setup.py would leave a marker file if
anything ran it: pip would, to read an sdist's metadata, before any hash of ours.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
import threading
from functools import partial
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from jobs.demo import VADER_SDIST, VADER_SHA256, fetch_pinned, find_off_domain
from pipelines.config import ConfigError


def sdist(name: str, marker: Path) -> bytes:
    """A source distribution whose setup.py writes ``marker`` when run."""
    setup = (
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from setuptools import setup\nsetup(name='x', version='0')\n"
    ).encode()
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        info = tarfile.TarInfo(f"{name}/setup.py")
        info.size = len(setup)
        tar.addfile(info, io.BytesIO(setup))
    return buffer.getvalue()


class Index(BaseHTTPRequestHandler):
    """``/simple/<project>/`` lists ``files`` (name -> (bytes, the sha256 it lists));
    ``/files/<name>`` serves the bytes. Every path asked for is recorded."""

    def __init__(self, state: dict, *args, **kwargs) -> None:
        self.state = state
        super().__init__(*args, **kwargs)

    def do_GET(self) -> None:  # noqa: N802 (the stdlib's name)
        self.state["asked"].append(self.path)
        files = self.state["files"]
        if self.path.startswith("/files/") and self.path[7:] in files:
            self._send(200, "application/octet-stream", files[self.path[7:]][0])
        elif self.path == f"/simple/{self.state['project']}/":
            entries = [(n, f"../../files/{n}", digest) for n, (_, digest) in files.items()]
            if self.state["form"] == "json" and "json" in self.headers.get("Accept", ""):
                doc = {
                    "meta": {"api-version": "1.0"},
                    "name": self.state["project"],
                    "files": [
                        {"filename": n, "url": u, "hashes": {"sha256": d}} for n, u, d in entries
                    ],
                }
                self._send(200, "application/vnd.pypi.simple.v1+json", json.dumps(doc).encode())
            else:
                links = "".join(f'<a href="{u}#sha256={d}">{n}</a><br>' for n, u, d in entries)
                self._send(200, "text/html", f"<html><body>{links}</body></html>".encode())
        else:
            self._send(404, "text/plain", b"not found")

    def _send(self, status: int, kind: str, body: bytes) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


@pytest.fixture
def index(monkeypatch):
    state = {"asked": [], "files": {}, "project": "", "form": "json"}
    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Index, state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("PIP_INDEX_URL", f"http://127.0.0.1:{server.server_port}/simple")
    yield state
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("form", ["json", "html"])
def test_a_pinned_file_is_fetched_as_bytes_and_nothing_else(index, tmp_path, form):
    marker = tmp_path / "ran"
    data = sdist("demo_data-1.0", marker)
    pin = hashlib.sha256(data).hexdigest()
    index.update(project="demo-data", form=form, files={"demo_data-1.0.tar.gz": (data, pin)})
    into = tmp_path / "downloads"
    path = fetch_pinned("Demo_Data", "demo_data-1.0.tar.gz", pin, into)
    assert path == into / "demo_data-1.0.tar.gz" and path.read_bytes() == data
    assert sorted(p.name for p in into.iterdir()) == ["demo_data-1.0.tar.gz"]  # no temp left
    assert not marker.exists()
    assert index["asked"] == ["/simple/demo-data/", "/files/demo_data-1.0.tar.gz"]


def test_the_vader_sdist_is_refused_before_download_when_the_index_lists_another_hash(
    index, tmp_path
):
    marker = tmp_path / "ran"
    fake = sdist("vaderSentiment-3.3.2", marker)
    index.update(
        project="vadersentiment", files={VADER_SDIST: (fake, hashlib.sha256(fake).hexdigest())}
    )
    downloads = tmp_path / "downloads"
    with pytest.raises(ConfigError, match=f"not the pinned {VADER_SHA256}: not downloaded"):
        find_off_domain(downloads)
    assert index["asked"] == ["/simple/vadersentiment/"]  # the archive was never fetched
    assert not marker.exists()
    assert not downloads.exists() or not list(downloads.iterdir())


def test_the_vader_sdist_with_other_bytes_than_its_pin_is_not_kept_or_run(index, tmp_path):
    """An index that lists the pinned hash but serves other bytes: they are downloaded,
    found wrong by hash, and deleted; nothing unpacks or runs them."""
    marker = tmp_path / "ran"
    fake = sdist("vaderSentiment-3.3.2", marker)
    index.update(project="vadersentiment", files={VADER_SDIST: (fake, VADER_SHA256)})
    downloads = tmp_path / "downloads"
    with pytest.raises(ConfigError, match=f"not the pinned {VADER_SHA256}: not kept"):
        find_off_domain(downloads)
    assert f"/files/{VADER_SDIST}" in index["asked"]
    assert not marker.exists()
    assert list(downloads.iterdir()) == []  # neither the file nor a partial copy


def test_an_index_without_the_file_says_what_to_do(index, tmp_path):
    index.update(project="vadersentiment", files={})
    with pytest.raises(ConfigError, match=f"lists no {VADER_SDIST}; download .* yourself"):
        find_off_domain(tmp_path)
