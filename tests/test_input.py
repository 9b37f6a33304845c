"""Records that are rows but not text become error rows; files that cannot be read at all
are found before any scoring; the output folder is checked against the flags."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipelines.config import config_from_dict
from pipelines.io import (
    FILE_COLUMN,
    ROW_COLUMN,
    InputDatasource,
    InputError,
    check_input,
    read_counts,
)
from pipelines.output import (
    SUCCESS,
    CommitError,
    StagedParquetSink,
    prepare_output,
    publish,
    read_committed,
    verify,
)
from pipelines.storage import Location

DEEP = "[" * 100_000 + "]" * 100_000


def cfg(tmp_path, models=None, **top):
    model = str(models["alpha"]) if models else "org/alpha"
    data = {
        "name": "t",
        "labels": ["negative", "positive"],
        "members": [{"name": "a", "model": model}],
    }
    return config_from_dict({**data, **top}, base_dir=tmp_path)


def read_all(path: Path, config, **kw) -> pa.Table:
    inputs = check_input(config, path)
    source = InputDatasource(
        inputs,
        id_column=config.input.id_column,
        text_column=config.input.text_column,
        text_pair_column=config.input.text_pair_column,
        block_rows=3,
        **kw,
    )
    blocks = [b for i in range(len(inputs.files)) for b in source._read_file(i)]
    return pa.concat_tables(blocks, promote_options="permissive")


def test_jsonl_records_that_are_not_text_become_error_rows(tmp_path):
    lines = [
        b'{"id": "ok", "text": "a fine film"}',
        b'{"id": "surrogate", "text": "bad \\ud800 text"}',
        b'{"id": "key", "text": "fine", "\\udcff": 1}',
        ('{"id": "deep", "text": "x", "n": ' + DEEP + "}").encode(),
        DEEP.encode(),
        b'{"id": "bytes", "text": "caf\xe9 au lait"}',
        b'{"id": "deep_ok", "text": "fine", "n": ' + b"[" * 50 + b"1" + b"]" * 50 + b"}",
        b'{"id": "last", "text": "the end"}',
    ]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n")
    table = read_all(path, cfg(tmp_path))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert table.num_rows == len(lines) and len(rows) == len(lines)
    assert rows["ok"]["error"] is None and rows["last"]["error"] is None
    assert rows["surrogate"]["error"].startswith("'text' holds a lone surrogate (\\ud800")
    assert rows["surrogate"]["text"] == "bad \ufffd text"  # kept, made storable
    assert rows["key"]["error"] is None  # a bad key name is cleaned; the text is fine
    # Lines that cannot be parsed keep their place and get the id of their position.
    assert rows["in.jsonl:3"]["error"] == "line is nested too deeply to read as JSON"
    assert rows["in.jsonl:4"]["error"] == "line is nested too deeply to read as JSON"
    at = lines[5].index(b"\xe9")
    assert rows["in.jsonl:5"]["error"] == f"line is not valid UTF-8 (byte 0xe9 at byte {at})"
    assert rows["deep_ok"]["error"] is None
    assert table.column(ROW_COLUMN).to_pylist() == list(range(len(lines)))


def test_csv_ragged_rows_and_bad_bytes_become_error_rows(tmp_path):
    path = tmp_path / "in.csv"
    path.write_bytes(
        b"id,text,note\n"
        b"007,a fine film,x\n"
        b"short,only two\n"
        b"long,a,b,c\n"
        b"bytes,caf\xe9,y\n"
        b'quoted,"a long\nline, with a comma",z\n'
        b"note_bytes,fine,\xff\n"
    )
    table = read_all(path, cfg(tmp_path))
    rows = {r["id"]: r for r in table.to_pylist()}
    assert list(rows) == ["007", "short", "long", "bytes", "quoted", "note_bytes"]
    assert rows["007"]["error"] is None and rows["007"]["note"] == "x"
    assert rows["short"]["error"] == "row has 2 fields, the header has 3"
    assert rows["short"]["note"] is None
    assert rows["long"]["error"] == "row has 4 fields, the header has 3"
    assert rows["bytes"]["error"] == "'text' is not valid UTF-8 (byte 0xe9 at character 3)"
    assert (
        rows["quoted"]["text"] == "a long\nline, with a comma" and rows["quoted"]["error"] is None
    )
    # Bad bytes outside the text keep the row, shown as U+FFFD.
    assert rows["note_bytes"]["error"] is None and rows["note_bytes"]["note"] == "\ufffd"


@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_a_utf8_byte_order_mark_is_not_part_of_the_first_row(tmp_path, fmt):
    """Excel and other Windows tools start a file with a BOM: the first JSONL row stays a
    row, and the first CSV header stays the id column."""
    path = tmp_path / f"in.{fmt}"
    if fmt == "jsonl":
        body = "".join(json.dumps({"id": f"r{i}", "text": f"t{i}"}) + "\n" for i in range(3))
    else:
        body = "id,text\n" + "".join(f"r{i},t{i}\n" for i in range(3))
    path.write_bytes(b"\xef\xbb\xbf" + body.encode())
    table = read_all(path, cfg(tmp_path))
    assert [c for c in table.column_names if "id" in c] == ["id"]
    assert table.column("id").to_pylist() == ["r0", "r1", "r2"]
    assert table.column("error").to_pylist() == [None] * 3
    assert table.column("text").to_pylist() == ["t0", "t1", "t2"]


def test_committed_rows_are_skipped_and_counted(tmp_path):
    path = tmp_path / "in.jsonl"
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(10)))
    counts = tmp_path / "counts"
    counts.mkdir()
    skip = {"in.jsonl": np.array([[0, 4], [6, 7]])}
    table = read_all(path, cfg(tmp_path), skip=skip, counts_dir=Location.of(counts))
    assert table.column(ROW_COLUMN).to_pylist() == [4, 5, 7, 8, 9]
    assert table.column("id").to_pylist() == [f"in.jsonl:{i}" for i in (4, 5, 7, 8, 9)]
    assert read_counts(Location.of(counts)) == {0: 10}  # one record per read task


def test_files_that_cannot_be_read_are_all_named_before_scoring(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(pa.table({"text": ["a", "b"]}), src / "good.parquet")
    (src / "torn.parquet").write_bytes(b"PAR1 not really parquet")
    good = pq.read_table(src / "good.parquet")
    pq.write_table(good, src / "z_cut.parquet")
    data = (src / "z_cut.parquet").read_bytes()
    (src / "z_cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError) as err:
        check_input(cfg(tmp_path), src)
    msg = str(err.value)
    assert "2 file(s) cannot be read" in msg and "torn.parquet" in msg and "z_cut.parquet" in msg
    assert "good.parquet" not in msg.split("read:")[1]
    # A later file without the text column is found too, not only the first file's.
    (src / "torn.parquet").unlink()
    (src / "z_cut.parquet").unlink()
    pq.write_table(pa.table({"body": ["c"]}), src / "other.parquet")
    with pytest.raises(InputError, match="other.parquet has no column 'text'"):
        check_input(cfg(tmp_path), src)


def test_a_canonical_label_nobody_votes_for_is_refused_at_plan_time(tmp_path, models):
    from pipelines.config import ConfigError
    from pipelines.plan import plan_ensemble

    three = cfg(tmp_path, models, labels=["negative", "neutral", "positive"])
    with pytest.raises(ConfigError, match=r"vote for \['neutral'\]"):
        plan_ensemble(three)


# --- the output folder ----------------------------------------------------------------------


@pytest.fixture
def job(tmp_path):
    path = tmp_path / "in" / "in.jsonl"
    path.parent.mkdir()
    path.write_text("".join(json.dumps({"text": f"t{i}"}) + "\n" for i in range(6)))
    config = cfg(tmp_path)
    return path, config, check_input(config, path)


def test_an_output_folder_that_holds_the_input_is_refused(job, tmp_path):
    path, config, inputs = job
    for out in (path.parent, tmp_path):  # the input's folder, a parent of it
        for flags in ({}, {"overwrite": True}, {"resume": True}):
            with pytest.raises(InputError, match="holds the input"):
                prepare_output(out, path, config, inputs, **flags)
    # Inside an input folder: the next run would read the output as input.
    with pytest.raises(InputError, match="holds the input"):
        prepare_output(path.parent / "out", path.parent, config, inputs)


def write_parts(job_out, inputs, rows):
    sink = StagedParquetSink(job_out, inputs.names, 100)
    table = pa.table(
        {
            "id": [f"x{r}" for r in rows],
            "error": pa.nulls(len(rows), pa.string()),
            FILE_COLUMN: pa.array(np.zeros(len(rows), np.int32)),
            ROW_COLUMN: pa.array(np.array(rows, np.int64)),
        }
    )
    return sink.write([table], None)


def test_commit_verify_publish_and_the_flags(job, tmp_path):
    path, config, inputs = job
    out = tmp_path / "out"
    first = prepare_output(out, path, config, inputs)
    assert first.staging.local_path == out.resolve() / "_staging"
    counts = first.counts_dir.local_path
    counts.mkdir()
    (counts / "0.json").write_text(json.dumps({"file": "in.jsonl", "rows": 6}))
    part0 = f"part-{first.run}-00000-000000000000.parquet"
    assert write_parts(first, inputs, [0, 1, 2])["part"] == part0
    write_parts(first, inputs, [0, 1, 2])  # a retried task rewrites the same part
    assert read_committed(first).written == {"in.jsonl": 3}
    with pytest.raises(CommitError, match=r"in.jsonl: read 6 rows, wrote 3"):
        verify(first, inputs)
    # Interrupted: no flag is refused, --resume continues with what is committed.
    with pytest.raises(InputError, match="--resume"):
        prepare_output(out, path, config, inputs)
    resumed = prepare_output(out, path, config, inputs, resume=True)
    assert resumed.run == first.run
    assert read_committed(resumed).ranges["in.jsonl"].tolist() == [[0, 3]]
    other = config.model_copy(update={"name": "other"})
    with pytest.raises(InputError, match="config differs"):
        prepare_output(out, path, other, inputs, resume=True)
    # A stray writer repeats row 2: its part goes (one copy of each row is kept), and
    # rows only it held are missing until scored again, not counted twice.
    write_parts(resumed, inputs, [2, 3, 4, 5])
    with pytest.raises(CommitError, match=r"read 6 rows, wrote 3"):
        verify(resumed, inputs)
    assert sorted(p.name for p in resumed.staging.local_path.glob("part-*")) == [part0]
    write_parts(resumed, inputs, [3, 4, 5])
    success = verify(resumed, inputs)
    assert success["files"] == {"in.jsonl": {"read": 6, "written": 6, "errors": 0}}
    publish(resumed, success)
    assert sorted(p.name for p in out.iterdir()) == [
        SUCCESS,
        part0,
        f"part-{first.run}-00000-000000000003.parquet",
    ]
    ids = pq.read_table(out).column("id").to_pylist()
    assert ids == [f"x{i}" for i in range(6)]
    # A complete output: refused without a flag; --resume of the same job is a no-op.
    with pytest.raises(InputError, match="not empty"):
        prepare_output(out, path, config, inputs)
    assert prepare_output(out, path, config, inputs, resume=True).done
    # --overwrite stages beside the old output and removes nothing yet.
    again = prepare_output(out, path, config, inputs, overwrite=True)
    assert (out / SUCCESS).is_file() and len(list(out.glob("*.parquet"))) == 2
    assert again.run != first.run
    shutil.rmtree(again.staging.local_path)


@pytest.mark.parametrize(
    "foreign", ["notes.txt", "data/", "old.parquet", "_SUCCESS/", "part-1.parquet/"]
)
def test_overwrite_never_deletes_what_it_did_not_write(job, tmp_path, foreign):
    """A folder holding anything but an output of ours (_SUCCESS, part files, _staging) is
    refused, before anything is staged, and keeps every byte."""
    path, config, inputs = job
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00000-000000000000.parquet").write_bytes(b"ours")
    if foreign != f"{SUCCESS}/":
        (out / SUCCESS).write_text("{}")
    entry = out / foreign.rstrip("/")
    if foreign.endswith("/"):
        entry.mkdir()
        (entry / "keep.txt").write_text("precious")
    else:
        entry.write_text("precious")
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    with pytest.raises(InputError) as err:
        prepare_output(out, path, config, inputs, overwrite=True)
    assert "did not write" in str(err.value) and foreign.rstrip("/") in str(err.value)
    assert "choose an empty or new folder" in str(err.value)
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before


def test_a_publish_cut_short_is_finished_by_resume(job, tmp_path):
    from actors.tasks import MemberSpec
    from pipelines.offline import ScoreJob, run_job
    from pipelines.output import PUBLISH_FILE
    from pipelines.plan import EnsemblePlan

    path, config, inputs = job
    out = tmp_path / "out"
    out.mkdir()
    (out / "part-00007-000000000000.parquet").write_bytes(b"a part of an old output")
    first = prepare_output(out, path, config, inputs, overwrite=True)
    counts = first.counts_dir.local_path
    counts.mkdir()
    (counts / "0.json").write_text(json.dumps({"file": "in.jsonl", "rows": 6}))
    write_parts(first, inputs, [0, 1, 2])
    write_parts(first, inputs, [3, 4, 5])
    success = verify(first, inputs)
    # The driver dies after recording the publish and moving one part, before _SUCCESS.
    staging = first.staging.local_path
    (staging / PUBLISH_FILE).write_text(json.dumps(success))
    moved = success["parts"][0]
    (staging / moved).rename(out / moved)
    assert not (out / SUCCESS).exists()

    resumed = prepare_output(out, path, config, inputs, resume=True)
    spec = MemberSpec("a", (0, 1), model_labels=("negative", "positive"))
    summary = run_job(ScoreJob(EnsemblePlan(config, (spec,)), inputs, resumed))
    assert (summary.rows, summary.errors, summary.files) == (6, 0, 2)
    assert sorted(p.name for p in out.iterdir()) == sorted([SUCCESS, *success["parts"]])
    assert pq.read_table(out).column("id").to_pylist() == [f"x{i}" for i in range(6)]
