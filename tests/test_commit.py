"""The commit protocol under a driver killed at each step of publishing: `--resume`
finishes the publish (never starts the job over), the old output is replaced only by a
complete new one, and nothing but our own entries is ever deleted."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import config_from_dict
from pipelines.io import FILE_COLUMN, ROW_COLUMN, check_input
from pipelines.output import (
    STOP_AT_ENV,
    SUCCESS,
    StagedParquetSink,
    prepare_output,
    read_committed,
    read_output,
    verify,
)

ROOT = Path(__file__).resolve().parents[1]
ROWS = 9
CONFIG = {
    "name": "t",
    "labels": ["negative", "positive"],
    "members": [{"name": "a", "model": "org/a"}],
}

PUBLISH = """
import json, sys
from pathlib import Path
from pipelines.config import config_from_dict
from pipelines.io import check_input
from pipelines.output import prepare_output, publish, verify
cfg = config_from_dict(json.loads(sys.argv[1]), base_dir=Path(sys.argv[2]))
inputs = check_input(cfg, sys.argv[3])
job = prepare_output(sys.argv[4], sys.argv[3], cfg, inputs, resume=True)
publish(job, verify(job, inputs))
"""


def write_part(job, inputs, rows: list[int]) -> str:
    table = pa.table(
        {
            "id": [f"x{r}" for r in rows],
            "score": pa.array(np.array(rows, np.float64) / 10),
            "error": pa.nulls(len(rows), pa.string()),
            FILE_COLUMN: pa.array(np.zeros(len(rows), np.int32)),
            ROW_COLUMN: pa.array(np.array(rows, np.int64)),
        }
    )
    return StagedParquetSink(job, inputs.names, 100).write([table], None)["part"]


@pytest.fixture
def staged(tmp_path):
    """An old output of ours, and a new run of the same job with every row committed."""
    path = tmp_path / "in" / "in.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(ROWS)))
    cfg = config_from_dict(CONFIG, base_dir=tmp_path)
    inputs = check_input(cfg, path)
    out = tmp_path / "out"
    out.mkdir()
    old_part = "part-0ld0ld00-00000-000000000000.parquet"
    pq.write_table(pa.table({"id": ["old"]}), out / old_part)
    (out / SUCCESS).write_text(json.dumps({"parts": [old_part], "run": "0ld0ld00"}))
    job = prepare_output(out, path, cfg, inputs, overwrite=True)
    counts = job.counts_dir.local_path
    counts.mkdir()
    (counts / "0.json").write_text(json.dumps({"file": "in.jsonl", "rows": ROWS}))
    parts = [write_part(job, inputs, [0, 1, 2, 3]), write_part(job, inputs, [4, 5, 6, 7, 8])]
    return path, cfg, inputs, out, parts, tmp_path


@pytest.mark.parametrize(
    "step",
    [
        "publish-recorded",
        "publish-moving",
        "publish-marked",
        "publish-replaced",
        "publish-cleaning",
    ],
)
def test_a_driver_killed_at_each_step_of_publishing_is_finished_by_resume(staged, step):
    from pipelines.offline import ScoreJob, run_job

    path, cfg, inputs, out, parts, tmp_path = staged
    env = {**os.environ, "PYTHONPATH": str(ROOT), STOP_AT_ENV: step}
    killed = subprocess.run(
        [sys.executable, "-c", PUBLISH, json.dumps(CONFIG), str(tmp_path), str(path), str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]  # stopped at the step, by SIGKILL
    assert f"stopping at {step}" in killed.stderr

    resumed = prepare_output(out, path, cfg, inputs, resume=True)
    summary = run_job(ScoreJob(None, inputs, resumed))  # nothing to score: no Ray, no plan
    assert (summary.rows, summary.files) == (ROWS, 2)
    assert sorted(p.name for p in out.iterdir()) == sorted([SUCCESS, *parts])
    assert read_output(out).column("id").to_pylist() == [f"x{i}" for i in range(ROWS)]
    assert pq.read_table(out).column("id").to_pylist() == [f"x{i}" for i in range(ROWS)]
    # And again: a published output stays published, untouched.
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert prepare_output(out, path, cfg, inputs, resume=True).done
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before


def test_a_part_planted_beside_the_committed_ones_is_removed_at_resume(staged):
    """A stray writer's part repeats rows: resume keeps one copy of each row instead of
    failing every later run."""
    path, cfg, inputs, out, parts, _ = staged
    job = prepare_output(out, path, cfg, inputs, resume=True)
    planted = write_part(job, inputs, [3, 4, 5])
    committed = read_committed(job)
    assert planted not in committed.parts and committed.parts == parts
    assert not (job.parts_dir.local_path / planted).exists()
    assert committed.written == {"in.jsonl": ROWS}
    success = verify(job, inputs)
    assert success["rows_written"] == ROWS and success["parts"] == parts


def test_parts_get_one_schema_before_publishing(staged):
    """Parts whose columns differ in type (int in one input block, text in another) are
    rewritten to one schema, so the folder reads as one table."""
    path, cfg, inputs, out, _, _ = staged
    job = prepare_output(out, path, cfg, inputs, resume=True)
    for part in job.parts_dir.local_path.glob("part-*.parquet"):
        part.unlink()
    tables = [
        ([0, 1, 2], pa.array([1, 2, 3], pa.int64())),
        ([3, 4, 5], pa.array([1.5, None, 2.5], pa.float64())),
        ([6, 7, 8], pa.array(["a", "b", None], pa.string())),
    ]
    for rows, meta in tables:
        table = pa.table(
            {
                "id": [f"x{r}" for r in rows],
                "meta": meta,
                "error": pa.nulls(3, pa.string()),
                FILE_COLUMN: pa.array(np.zeros(3, np.int32)),
                ROW_COLUMN: pa.array(np.array(rows, np.int64)),
            }
        )
        StagedParquetSink(job, inputs.names, 100).write([table], None)
    success = verify(job, inputs)
    schemas = {
        str(pq.read_schema(job.parts_dir.local_path / p).remove_metadata())
        for p in success["parts"]
    }
    assert len(schemas) == 1 and "meta: string" in schemas.pop()
    values = pq.read_table(job.parts_dir.local_path).column("meta").to_pylist()
    assert values == ["1", "2", "3", "1.5", None, "2.5", "a", "b", None]


def test_part_names_keep_input_order_for_any_file_count():
    from pipelines.output import part_name

    for files in (1, 99_999, 100_001, 3_000_000):
        # (file, row) pairs in input order: names must sort the same way.
        order = [(0, 5), (9, 0), (10, 0), (files // 2, 7), (files - 1, 0), (files - 1, 12)]
        order = sorted(set(order))
        names = [part_name("abcd1234", f, r, files) for f, r in order]
        assert sorted(names) == names, files


def test_parts_and_markers_are_fsynced_before_they_are_named(staged, monkeypatch):
    """A power loss must never leave a committed part or _SUCCESS empty: each file is
    fsynced before its rename, and its folder after."""
    path, cfg, inputs, out, parts, _ = staged
    events: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    from pipelines.output import publish

    job = prepare_output(out, path, cfg, inputs, resume=True)
    publish(job, verify(job, inputs))
    marker = next(i for i, e in enumerate(events) if e == ("rename", str(out / SUCCESS)))
    assert events[marker - 1][0] == "fsync" and ".tmp-" in events[marker - 1][1]
    assert events[marker + 1] == ("fsync", str(out))  # the folder, so the rename lasts
    # The parts renamed into place are made durable before _SUCCESS names them.
    moved = [i for i, e in enumerate(events) if e[0] == "rename" and Path(e[1]).name in parts]
    synced_out = [i for i, e in enumerate(events) if e == ("fsync", str(out))]
    assert moved and any(max(moved) < i < marker for i in synced_out)
