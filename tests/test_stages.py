"""The light pipeline stages on their own: windows and the order-restoring reducer."""

from __future__ import annotations

import random

import numpy as np
import pyarrow as pa

from actors.loading import MemberSpec
from actors.member import member_output_column
from pipelines.config import EnsembleConfig
from pipelines.io import (
    BLOCK_COLUMN,
    BLOCK_ROWS_COLUMN,
    POSITION_COLUMN,
    READ_ERROR_COLUMN,
    sort_by_text_length,
)
from pipelines.offline import EnsemblePlan, OrderedReducer, validate_rows


def block(texts, block_id):
    n = len(texts)
    return pa.table(
        {
            "text": pa.array(texts, pa.string()),
            READ_ERROR_COLUMN: pa.nulls(n, pa.string()),
            BLOCK_COLUMN: pa.array(np.full(n, block_id, np.int64)),
            POSITION_COLUMN: pa.array(np.arange(n, dtype=np.int32)),
            BLOCK_ROWS_COLUMN: pa.array(np.full(n, n, np.int32)),
        }
    )


def test_blocks_leave_the_reader_sorted_by_length_and_rows_are_validated():
    rng = random.Random(0)
    texts = ["x" * rng.randint(1, 300) for _ in range(1000)] + [None, ""]
    ordered = sort_by_text_length(block(texts, 7), ["text"])
    joined = validate_rows(ordered, text_column="text", text_pair_column=None)
    assert sorted(joined.column(POSITION_COLUMN).to_pylist()) == list(range(1002))
    lengths = [len(t or "") for t in joined.column("text").to_pylist()]
    assert lengths == sorted(lengths)
    back = joined.take(pa.array(np.argsort(joined.column(POSITION_COLUMN).to_numpy())))
    assert back.column("text").to_pylist() == texts
    errors = joined.column("error").to_pylist()
    assert errors.count("'text' is null") == 1 and errors.count("'text' is empty") == 1
    assert READ_ERROR_COLUMN not in joined.column_names


def test_reducer_restores_input_order_per_block():
    cfg = EnsembleConfig.model_validate(
        {
            "name": "t",
            "labels": ["a", "b"],
            "members": [{"name": "m", "model": "org/m"}],
            "reducer": {"output_members": False},
        }
    )
    plan = EnsemblePlan(cfg, (MemberSpec("m", (0, 1), False, False, ("a", "b"), None),), False)
    reducer = OrderedReducer(plan)
    rng = np.random.default_rng(0)
    blocks = []
    for block_id, n in ((1, 300), (2, 120)):
        texts = [f"{block_id}-{i}" + " pad" * int(rng.integers(0, 30)) for i in range(n)]
        blocks.append(texts)
    windows = []
    for block_id, texts in zip((1, 2), blocks, strict=True):
        ready = validate_rows(
            sort_by_text_length(block(texts, block_id), ["text"]),
            text_column="text",
            text_pair_column=None,
        )
        for w in (ready.slice(i, 64) for i in range(0, ready.num_rows, 64)):
            logits = rng.normal(size=(w.num_rows, 2)).astype(np.float32)
            column = pa.FixedSizeListArray.from_arrays(pa.array(logits.reshape(-1)), 2)
            windows.append(w.append_column(member_output_column("m"), column))
    outputs = [reducer(w) for w in windows]
    sizes = [o.num_rows for o in outputs]
    # Nothing leaves before its block is whole; each block leaves once, in input order.
    assert sorted(s for s in sizes if s) == [120, 300]
    assert sizes.index(300) == 4 and sizes[-1] == 120
    out = pa.concat_tables(outputs)
    assert [t.split(" ")[0] for t in out.column("text").to_pylist()] == [
        t.split(" ")[0] for texts in blocks for t in texts
    ]
    assert set(out.column_names) >= {"label", "probs", "error"}
    assert not {BLOCK_COLUMN, POSITION_COLUMN, BLOCK_ROWS_COLUMN} & set(out.column_names)
    assert not reducer.pending
