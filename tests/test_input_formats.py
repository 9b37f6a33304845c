"""Inputs as other tools write them (compressed, JSON arrays, binary Parquet text, types
that differ between files, odd column names, skipped entries, huge rows), and many files.

Each failure that was end to end (a job that exited 1, or rows that vanished) is tested
through ``score``; the reader's own contracts are tested on its read tasks."""

from __future__ import annotations

import bz2
import gzip
import json
import logging
import os
import pickle
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import pipelines.io as pio
from jobs.example import make_texts
from pipelines.config import config_from_dict
from pipelines.io import (
    FILE_COLUMN,
    ROW_COLUMN,
    InputDatasource,
    InputError,
    InputReadError,
    check_input,
    read_counts,
    write_json,
)
from pipelines.offline import score
from pipelines.plan import plan_ensemble
from pipelines.storage import Location
from tests.oracle import canonical_probs

LABELS = ["negative", "positive"]


def config(tmp_path, models=None, **top):
    model = str(models["alpha"]) if models else "org/alpha"
    data = {"name": "t", "labels": LABELS, "members": [{"name": "alpha", "model": model}]}
    return config_from_dict({**data, **top}, base_dir=tmp_path)


def read_blocks(inputs, cfg, **kw) -> list[pa.Table]:
    """Every block the job's read tasks yield, in order."""
    source = InputDatasource(
        inputs,
        id_column=cfg.input.id_column,
        text_column=cfg.input.text_column,
        text_pair_column=cfg.input.text_pair_column,
        **kw,
    )
    return [block for task in source.get_read_tasks(1) for block in task()]


def jsonl(rows) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode()


def write_compressed(path: Path, data: bytes, codec: str) -> None:
    with pa.CompressedOutputStream(str(path), codec) as f:
        f.write(data)


@pytest.fixture
def io_log():
    """The reader's log records (attached to its logger: the CLI's setup may stop it
    propagating to pytest's capture)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record):
            records.append(record)

    log = logging.getLogger("pipelines.io")
    handler, level = Keep(logging.INFO), log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    yield records
    log.removeHandler(handler)
    log.setLevel(level)


def messages(records, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in records if r.levelno == level]


def parts_schemas(out: Path) -> set[pa.Schema]:
    return {pq.read_schema(p).remove_metadata() for p in sorted(out.glob("part-*.parquet"))}


# --- compressed files ----------------------------------------------------------------------


def test_compressed_json_lines_are_read_and_scored(ray_cluster, models, tmp_path):
    """Before: `.jsonl.gz` and every other compressed file were skipped without a word."""
    texts = make_texts(30, seed=21)
    src = tmp_path / "in"
    src.mkdir()
    layout = [("a.jsonl.gz", "gzip"), ("b.jsonl.bz2", "bz2"), ("c.jsonl.zst", "zstd")]
    layout += [("d.ndjson.lz4", "lz4"), ("e.jsonl", None)]
    expected_ids = []
    for k, (name, codec) in enumerate(layout):
        chunk = texts[6 * k : 6 * k + 6]
        data = jsonl({"text": t} for t in chunk)
        if codec:
            write_compressed(src / name, data, codec)
        else:
            (src / name).write_bytes(data)
        expected_ids += [f"{name}:{i}" for i in range(len(chunk))]
    plan = plan_ensemble(config(tmp_path, models))
    summary = score(plan, src, tmp_path / "out", rows_per_file=7)
    out = pq.read_table(tmp_path / "out")
    assert (summary.rows, summary.errors) == (30, 0)
    assert out.column("id").to_pylist() == expected_ids
    assert out.column("text").to_pylist() == texts
    ref = canonical_probs(models["alpha"], texts, LABELS)
    np.testing.assert_allclose(np.array(out.column("probs").to_pylist()), ref, atol=1e-5)


def test_compressed_csv_is_read_as_text_with_ids_from_the_file_name(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.csv.gz").write_bytes(gzip.compress(b"text,code\nfirst,007\nsecond,010\n"))
    (src / "b.csv.bz2").write_bytes(bz2.compress(b"\xef\xbb\xbftext,code\nthird,0x1\n"))
    cfg = config(tmp_path)
    inputs = check_input(cfg, src)
    table = pa.concat_tables(read_blocks(inputs, cfg))
    assert table.column("id").to_pylist() == ["a.csv.gz:0", "a.csv.gz:1", "b.csv.bz2:0"]
    assert table.column("code").to_pylist() == ["007", "010", "0x1"]
    assert table.column("text").to_pylist() == ["first", "second", "third"]


def test_compressed_files_that_cannot_be_read_are_named_before_scoring(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    whole = gzip.compress(jsonl({"text": f"t{i}"} for i in range(5000)))
    (src / "good.jsonl.gz").write_bytes(whole)
    (src / "cut.jsonl.gz").write_bytes(whole[: len(whole) // 2])  # a download cut short
    (src / "not_gzip.jsonl.gz").write_bytes(b'{"text": "plain, not gzip"}\n')
    with pytest.raises(InputError) as err:
        check_input(config(tmp_path), src)
    msg = str(err.value)
    assert "2 file(s) cannot be read" in msg
    assert "cut.jsonl.gz" in msg and "not_gzip.jsonl.gz" in msg and "good.jsonl.gz" not in msg
    # CSV is checked to its end too, though only its header is needed to plan the job.
    csvs = tmp_path / "csv"
    csvs.mkdir()
    data = gzip.compress(b"text\n" + b"a row\n" * 20000)
    (csvs / "cut.csv.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"1 file\(s\) cannot be read: cut.csv.gz"):
        check_input(config(tmp_path), csvs)


def test_a_compressed_file_streams_and_a_later_break_names_the_file(tmp_path):
    """Blocks come out before the file's end is read; a file broken after the checks (cut
    while the job runs) fails the read task with the file's name and where."""
    path = tmp_path / "in.jsonl.gz"
    whole = gzip.compress(jsonl({"text": f"row {i}"} for i in range(20000)))
    path.write_bytes(whole)
    cfg = config(tmp_path)
    inputs = check_input(cfg, path)
    path.write_bytes(whole[: len(whole) // 2])
    source = InputDatasource(inputs, id_column="id", text_column="text", block_rows=1000)
    (task,) = source.get_read_tasks(1)
    blocks = iter(task())
    first = next(blocks)
    assert first.column("text").to_pylist()[:2] == ["row 0", "row 1"]
    with pytest.raises(InputReadError, match=r"in.jsonl.gz cannot be read past row \d+"):
        list(blocks)


# --- .json ------------------------------------------------------------------------------


def test_a_json_array_and_json_lines_in_json_files_are_scored(ray_cluster, models, tmp_path):
    """Before: a `.json` file holding a JSON array was read as JSON lines: error rows."""
    texts = make_texts(12, seed=5)
    src = tmp_path / "in"
    src.mkdir()
    elements = [{"id": f"a{i}", "text": t} for i, t in enumerate(texts[:8])]
    elements.insert(3, 42)
    deep = "[" * 100_000 + "]" * 100_000
    body = json.dumps(elements, indent=2)  # pretty printed, across many lines
    body = body[:-1].rstrip() + ",\n" + deep + "\n]"
    (src / "array.json").write_text(body)
    (src / "lines.json").write_bytes(
        jsonl({"id": f"l{i}", "text": t} for i, t in enumerate(texts[8:]))
    )
    summary = score(plan_ensemble(config(tmp_path, models)), src, tmp_path / "out")
    rows = pq.read_table(tmp_path / "out").to_pylist()
    assert summary.rows == len(rows) == 10 + 4
    assert [r["id"] for r in rows] == [
        *[f"a{i}" for i in range(3)],
        "array.json:3",
        *[f"a{i}" for i in range(3, 8)],
        "array.json:9",
        *[f"l{i}" for i in range(4)],
    ]
    errors = {r["id"]: r["error"] for r in rows if r["error"]}
    assert errors == {
        "array.json:3": "element is a number, expected a JSON object",
        "array.json:9": "element is nested too deeply to read as JSON",
    }
    good = [r for r in rows if not r["error"]]
    assert [r["text"] for r in good] == texts
    ref = canonical_probs(models["alpha"], texts, LABELS)
    np.testing.assert_allclose(np.array([r["probs"] for r in good]), ref, atol=1e-5)


def test_a_long_json_array_is_read_element_by_element_across_chunks(tmp_path):
    """Elements straddle the parser's 1 MiB read-ahead: numbers and strings cut at a
    chunk's end are read whole."""
    rng = np.random.default_rng(3)
    elements = [
        {"text": "x" * int(rng.integers(1, 3000)), "n": int(rng.integers(0, 10**12)), "f": 0.5 + i}
        for i in range(3000)
    ]
    path = tmp_path / "big.json"
    path.write_text(json.dumps(elements, separators=(",", ":")))
    assert path.stat().st_size > 3 * pio._JsonArray.CHUNK
    cfg = config(tmp_path)
    inputs = check_input(cfg, path)
    assert inputs.rows == (3000,)
    table = pa.concat_tables(read_blocks(inputs, cfg, block_rows=500))
    assert table.select(["text", "n", "f"]).to_pylist() == elements
    assert table.schema.field("n").type == pa.int64()


@pytest.mark.parametrize(
    ("name", "body", "why"),
    [
        ("object.json", '{\n  "text": "a pretty-printed object"\n}\n', "neither JSON lines"),
        ("numbers.json", "[1, 2, 3]", "first element is a number"),
        ("after.json", '[{"text": "a"}] {"text": "b"}', "data after the JSON array"),
        ("cut.json", '[{"text": "a"}, {"text": "b"', "ends before its closing"),
        ("scalar.json", '"just a string"', "neither JSON lines"),
    ],
)
def test_a_json_file_that_is_neither_lines_nor_an_array_of_objects_is_a_usage_error(
    tmp_path, name, body, why
):
    src = tmp_path / "in"
    src.mkdir()
    (src / "fine.json").write_text('[{"text": "ok"}]')
    (src / name).write_text(body)
    with pytest.raises(InputError) as err:
        check_input(config(tmp_path), src)
    msg = str(err.value)
    assert f"1 file(s) cannot be read: {name} (" in msg and why in msg, msg


# --- Parquet text stored as binary ----------------------------------------------------------


def test_binary_parquet_text_is_decoded_and_bad_bytes_make_an_error_row(
    ray_cluster, models, tmp_path
):
    """Before: 'UDF failed to process a data block', exit 1."""
    texts = make_texts(10, seed=9)
    src = tmp_path / "in"
    src.mkdir()
    first = [t.encode() for t in texts[:5]]
    first.insert(2, b"caf\xe9 au lait")
    pq.write_table(pa.table({"text": pa.array(first, pa.binary())}), src / "a.parquet")
    pq.write_table(
        pa.table({"text": pa.array([t.encode() for t in texts[5:]], pa.large_binary())}),
        src / "b.parquet",
    )
    summary = score(plan_ensemble(config(tmp_path, models)), src, tmp_path / "out")
    out = pq.read_table(tmp_path / "out")
    assert out.schema.field("text").type == pa.string()
    rows = out.to_pylist()
    assert summary.rows == 11 and summary.errors == 1
    assert rows[2]["error"] == "'text' is not valid UTF-8 (byte 0xe9 at byte 3)"
    assert rows[2]["text"] == "caf\ufffd au lait" and rows[2]["probs"] is None
    good = [r for r in rows if r["error"] is None]
    assert [r["text"] for r in good] == texts
    assert [r["id"] for r in good] == [f"a.parquet:{i}" for i in (0, 1, 3, 4, 5)] + [
        f"b.parquet:{i}" for i in range(5)
    ]
    ref = canonical_probs(models["alpha"], texts, LABELS)
    np.testing.assert_allclose(np.array([r["probs"] for r in good]), ref, atol=1e-5)


# --- types that differ between files and blocks ---------------------------------------------


def test_parquet_types_that_differ_between_files_never_fail_the_job(
    ray_cluster, models, tmp_path, io_log
):
    """Before: int64 ids in one file and string ids in another: ArrowTypeError, exit 1."""
    src = tmp_path / "in"
    src.mkdir()
    pq.write_table(
        pa.table(
            {
                "id": pa.array([1, 2, 3], pa.int64()),
                "text": ["a fine film", "a dull plot", "fun"],
                "meta": pa.array([10, 11, 12], pa.int64()),
                "n": pa.array([1, 2, 3], pa.int32()),
                "flag": [True, False, None],
                "cat": pa.array(["x", "y", "x"]).dictionary_encode(),
            }
        ),
        src / "a.parquet",
    )
    pq.write_table(
        pa.table(
            {
                "id": ["b0", "b1"],
                "text": ["sad", "happy"],
                "meta": ["ten", None],
                "n": pa.array([2**40, 5], pa.int64()),
                "flag": ["yes", "no"],
                "cat": ["z", "x"],
            }
        ),
        src / "b.parquet",
    )
    pq.write_table(pa.table({"id": [7.5], "text": ["the end"]}), src / "c.parquet")
    summary = score(plan_ensemble(config(tmp_path, models)), src, tmp_path / "out", rows_per_file=2)
    out = pq.read_table(tmp_path / "out")
    assert summary.rows == out.num_rows == 6 and summary.errors == 0
    assert len(parts_schemas(tmp_path / "out")) == 1  # one schema for every part
    assert out.column("id").to_pylist() == ["1", "2", "3", "b0", "b1", "7.5"]
    assert out.schema.field("id").type == pa.string()
    assert out.column("meta").to_pylist() == ["10", "11", "12", "ten", None, None]
    assert out.schema.field("n").type == pa.int64()  # promoted
    assert out.column("n").to_pylist() == [1, 2, 3, 2**40, 5, None]
    assert out.column("flag").to_pylist() == ["true", "false", None, "yes", "no", None]
    assert out.column("cat").to_pylist() == ["x", "y", "x", "z", "x", None]
    warned = messages(io_log)
    assert len(warned) == 2, warned  # one per column read as text: meta, flag
    meta = next(m for m in warned if "'meta'" in m)
    assert "int64 in a.parquet" in meta and "string in b.parquet" in meta and "read as text" in meta
    assert any("'flag'" in m and "bool in a.parquet" in m for m in warned)


def test_json_types_that_differ_between_blocks_and_files_never_fail_the_job(
    ray_cluster, models, tmp_path, io_log, monkeypatch
):
    """Three-row blocks: `meta` is a number in a.jsonl's first block and text in its
    second, and the other way round in b.jsonl. Ray Data's concatenation of blocks from
    different files fails on int64 against string, so every block must already agree."""
    monkeypatch.setattr(pio, "BLOCK_ROWS", 3)
    src = tmp_path / "in"
    src.mkdir()
    a = [
        {
            "text": f"a row {i}",
            "meta": i if i < 3 else f"s{i}",
            "n": i,
            "flag": i % 2 == 0,
            "tags": [i, i + 1],
            "obj": {"x": i},
        }
        for i in range(6)
    ]
    b = [
        {
            "text": f"b row {i}",
            "meta": f"t{i}" if i < 3 else i * 1.5,
            "n": i + 0.5,
            "flag": i,
            "tags": [f"v{i}"],
            "obj": {"y": f"w{i}"},
        }
        for i in range(6)
    ]
    (src / "a.jsonl").write_bytes(jsonl(a))
    (src / "b.jsonl").write_bytes(jsonl(b))
    summary = score(plan_ensemble(config(tmp_path, models)), src, tmp_path / "out", rows_per_file=4)
    out = pq.read_table(tmp_path / "out")  # the folder reads as one table
    assert summary.rows == out.num_rows == 12 and summary.errors == 0
    assert len(parts_schemas(tmp_path / "out")) == 1
    rows = a + b

    def as_text(v):
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)

    assert out.column("meta").to_pylist() == [as_text(r["meta"]) for r in rows]
    assert out.schema.field("n").type == pa.float64()
    assert out.column("n").to_pylist() == [float(r["n"]) for r in rows]
    assert out.column("flag").to_pylist() == [as_text(r["flag"]) for r in rows]
    assert out.column("tags").to_pylist() == [as_text(r["tags"]) for r in rows]
    assert out.schema.field("obj").type == pa.struct([("x", pa.int64()), ("y", pa.string())])
    assert out.column("obj").to_pylist() == [
        {"x": r["obj"].get("x"), "y": r["obj"].get("y")} for r in rows
    ]
    assert out.column("id").to_pylist() == [f"a.jsonl:{i}" for i in range(6)] + [
        f"b.jsonl:{i}" for i in range(6)
    ]
    warned = messages(io_log)
    assert sorted(m.split("'")[1] for m in warned) == ["flag", "meta", "tags"], warned
    meta = next(m for m in warned if "'meta'" in m)
    assert "a whole number in a.jsonl" in meta and "text in a.jsonl, b.jsonl" in meta


# --- column names --------------------------------------------------------------------------


def test_duplicate_csv_header_names_are_a_usage_error(tmp_path):
    src = tmp_path / "in"
    src.mkdir()
    (src / "a.csv").write_text("id,text,note,note,x,x\n1,hello,a,b,c,d\n")
    (src / "b.csv").write_text("id,text\n2,fine\n")
    with pytest.raises(InputError) as err:
        check_input(config(tmp_path), src)
    msg = str(err.value)
    assert "a.csv ('note', 'x')" in msg and "b.csv" not in msg and "own name" in msg


def test_input_columns_named_like_internal_ones_come_out_unchanged(ray_cluster, models, tmp_path):
    """Before: an input column `__file`, `__row` or `__read_error` collided with the
    reader's own: the commit step could not tell them apart, and the job failed."""
    texts = make_texts(5, seed=2)
    src = tmp_path / "in.parquet"
    mine = {
        "__file": [f"f{i}" for i in range(5)],
        "__row": [100 + i for i in range(5)],
        "__read_error": ["not ours"] * 5,
        "__index_level_0__": list(range(5)),
        "__member__other": [0.5] * 5,
    }
    pq.write_table(pa.table({"text": texts, **mine}), src)
    summary = score(plan_ensemble(config(tmp_path, models)), src, tmp_path / "out", rows_per_file=2)
    out = pq.read_table(tmp_path / "out")
    assert summary.rows == 5 and summary.errors == 0
    for name, values in mine.items():
        assert out.column(name).to_pylist() == values, name
    assert out.column("id").to_pylist() == [f"in.parquet:{i}" for i in range(5)]
    assert not [c for c in out.column_names if "\x00" in c]


def test_names_the_scorer_takes_while_running_are_refused(tmp_path):
    """A host adds `__member__<name>` to each window, and helper columns hold a NUL: an
    input column with either name would be dropped or confused, so it is refused."""
    cfg = config(tmp_path)
    for column in ("__member__alpha", "a\x00b"):
        path = tmp_path / "in.parquet"
        pq.write_table(pa.table({"text": ["x"], column: [1]}), path)
        with pytest.raises(InputError, match="names the scorer gives its own columns"):
            check_input(cfg, path)


# --- skipped entries -----------------------------------------------------------------------


def test_skipped_entries_are_logged_and_linked_folders_are_followed_once(tmp_path, io_log):
    """pyarrow's local recursive listing follows a link to a parent folder until the path
    is too long (ELOOP), listing the same files again and again: our walk follows each
    real folder once and logs every entry it leaves out, with the reason."""
    src = tmp_path / "in"
    (src / "_tmp").mkdir(parents=True)
    (src / "sub").mkdir()
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    row = b'{"text": "x"}\n'
    for name in ("a.jsonl", ".hidden.jsonl", "_tmp/b.jsonl", "sub/c.jsonl.gz"):
        (src / name).write_bytes(gzip.compress(row) if name.endswith(".gz") else row)
    (src / "_SUCCESS").write_text("")
    (src / "notes.txt").write_text("not data")
    (src / "frame.parquet.gz").write_bytes(gzip.compress(b"PAR1"))
    (outside / "d.jsonl").write_bytes(row)
    os.symlink(outside, src / "linked")
    os.symlink("..", src / "sub" / "loop")  # back to the input folder itself
    os.symlink(tmp_path / "missing", src / "broken.jsonl")
    inputs = check_input(config(tmp_path), src)
    assert inputs.names == ("a.jsonl", "linked/d.jsonl", "sub/c.jsonl.gz")
    logged = "\n".join(r.getMessage() for r in io_log)
    for line in (
        "skipped 3 file(s) or folder(s) whose names start with '.' or '_'",
        "skipped 1 file(s) with a suffix that is not an input format",
        "notes.txt",
        "skipped 1 compressed Parquet file(s)",
        "frame.parquet.gz",
        "skipped 1 linked folder(s) already read through another path",
        "sub/loop/",
        "skipped 1 entries that are not regular files",
        "broken.jsonl",
        "following the linked folder linked/",
    ):
        assert line in logged, (line, logged)


# --- memory bounded in bytes ---------------------------------------------------------------


@pytest.mark.parametrize("fmt", ["jsonl", "csv", "parquet"])
def test_blocks_are_cut_at_a_byte_budget_as_well_as_at_rows(tmp_path, fmt):
    """Rows of about 1 MB with block_rows far above the file's rows: blocks stay under
    the budget (a few rows each), and every row comes once, in order."""
    budget = 3 << 20
    rng = np.random.default_rng(0)
    sizes = [int(s) for s in rng.integers(900_000, 1_100_000, size=14)]
    texts = [chr(ord("a") + i) * s for i, s in enumerate(sizes)]
    path = tmp_path / f"in.{fmt}"
    if fmt == "jsonl":
        path.write_bytes(jsonl({"text": t} for t in texts))
    elif fmt == "csv":
        path.write_text("text\n" + "".join(t + "\n" for t in texts))
    else:
        pq.write_table(pa.table({"text": texts}), path, row_group_size=len(texts))
    cfg = config(tmp_path)
    blocks = read_blocks(check_input(cfg, path), cfg, block_rows=100_000, block_bytes=budget)
    got = [t for b in blocks for t in b.column("text").to_pylist()]
    assert got == texts
    assert len(blocks) >= 5
    for block in blocks:
        assert sum(map(len, block.column("text").to_pylist())) <= budget
        assert block.nbytes <= budget + 64 * block.num_rows  # ids, offsets: a few bytes a row


# --- many files ------------------------------------------------------------------------------


def test_read_tasks_carry_only_their_own_files(tmp_path):
    """Before: every read task held the whole list of files, so what Ray kept grew with
    the square of the file count. Now a task holds its group of files (and only their
    committed rows); small files share blocks; one count record per task."""
    cfg = config(tmp_path)
    sizes = {}
    for count in (120, 1200):
        src = tmp_path / f"in{count}"
        src.mkdir()
        for i in range(count):
            (src / f"f{i:05d}.jsonl").write_bytes(jsonl({"text": f"{i}-{r}"} for r in range(3)))
        inputs = check_input(cfg, src)
        counts = tmp_path / f"counts{count}"
        counts.mkdir()
        skip = {inputs.names[0]: np.array([[0, 3]]), inputs.names[-1]: np.array([[1, 2]])}
        source = InputDatasource(
            inputs,
            id_column="id",
            text_column="text",
            skip=skip,
            counts_dir=Location.of(counts),
            task_files=500,
        )
        tasks = source.get_read_tasks(count)
        assert len(tasks) == source.num_read_tasks == -(-count // 500)
        covered = []
        for task in tasks:
            group = task.read_fn
            mine = {name for _, _, name in group.files}
            covered += [i for i, _, _ in group.files]
            assert set(group.skip) <= mine  # only its own files' committed rows
        assert covered == list(range(count))  # each file in one task, in input order
        sizes[count] = [len(pickle.dumps(t)) for t in tasks]
        blocks = [b for t in tasks for b in t()]
        table = pa.concat_tables(blocks)
        committed = {(0, 0), (0, 1), (0, 2), (count - 1, 1)}
        expected = [(i, r) for i in range(count) for r in range(3) if (i, r) not in committed]
        files, rows = table.column(FILE_COLUMN), table.column(ROW_COLUMN)
        got = list(zip(files.to_pylist(), rows.to_pylist(), strict=True))
        assert got == expected
        assert table.column("id").to_pylist() == [f"f{i:05d}.jsonl:{r}" for i, r in expected]
        assert len(blocks) <= len(tasks)  # 3-row files joined into shared blocks
        assert len(list(counts.iterdir())) == len(tasks)
        assert read_counts(Location.of(counts)) == {i: 3 for i in range(count)}
    # Per task: bounded by the files it holds, not by the job's file count.
    assert max(sizes[1200]) < 200_000
    per_file = {n: sum(s) / n for n, s in sizes.items()}
    assert per_file[1200] < 1.5 * per_file[120], per_file


def test_read_counts_reads_task_records_and_per_file_records(tmp_path):
    """A job resumed across this change finds the per-file records of its first run."""
    counts = Location.of(tmp_path)
    write_json(counts.join("task-000000002.json"), {"first": 2, "rows": [5, 0, 7]})
    write_json(counts.join("0.json"), {"file": "a.jsonl", "rows": 4})
    (tmp_path / "task-000000009.json").write_text('{"first": 9, "rows": [1')  # cut short
    assert read_counts(counts) == {0: 4, 2: 5, 3: 0, 4: 7}
