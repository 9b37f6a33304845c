"""The other design of issue 22, measured and not shipped: tokenise in a CPU stage.

Ray's guidance for batch inference keeps CPU work in CPU stages and lets the GPU actors
only run the model. Here a CPU actor pool (:class:`TokenizeStage`) tokenises each window
into a list<int32> column, and the host (:class:`TokenizedInputHost`) pads and forwards
those ids. :func:`installed` swaps both into ``pipelines.offline`` for one run, so the
rest of the job (reader, sink, commit) is the shipped one. ``bench/device_efficiency.py
--design tokenize-stage`` runs it beside the shipped design.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa

from actors.host import EnsembleHost, member_output_column, reduce_batch
from pipelines.plan import LIGHT_TASK_CPUS

IDS = "\x00ids"


class TokenizeStage:
    """Window in, the same window plus each row's token ids (one tokenizer: the bench's
    members share it)."""

    def __init__(self, plan: Any) -> None:
        self.host = EnsembleHost(plan=plan, members=[plan.config.members[0].name], threads=1)

    def __call__(self, batch: pa.Table) -> pa.Table:
        valid = batch.column("error").is_null().to_numpy(zero_copy_only=False)
        texts = self.host.cut(batch.column(self.host.text_column)).to_pylist()
        ids = [[] for _ in texts]
        rows = np.flatnonzero(valid)
        encoded = self.host.members[0].encode([texts[i] for i in rows], None)["input_ids"]
        for i, seq in zip(rows, encoded, strict=True):
            ids[i] = seq
        return batch.append_column(IDS, pa.array(ids, pa.list_(pa.int32())))


class TokenizedInputHost(EnsembleHost):
    """The ensemble host, fed token ids instead of texts."""

    def __call__(self, batch: pa.Table) -> pa.Table:
        ids = batch.column(IDS)
        batch = batch.drop_columns([IDS])
        valid = batch.column("error").is_null().to_numpy(zero_copy_only=False)
        rows = np.flatnonzero(valid)
        encoded = {"input_ids": ids.take(pa.array(rows)).to_pylist()}
        for member in self.members:
            values = member.run_encoded(encoded)
            full = np.full((batch.num_rows, values.shape[1]), np.nan, dtype=np.float32)
            full[rows] = values
            column = pa.FixedSizeListArray.from_arrays(pa.array(full.reshape(-1)), values.shape[1])
            batch = batch.append_column(member_output_column(member.member.name), column)
        if self.reduce:
            batch = reduce_batch(batch, plan=self.plan)
        if self.progress is not None:
            self.progress.add(batch.num_rows)
        return batch


@contextlib.contextmanager
def installed(plan: Any) -> Iterator[None]:
    """The tokenise stage before the host, in ``pipelines.offline``, for one run."""
    import ray.data
    from ray.data import ActorPoolStrategy

    import pipelines.offline as offline

    original_read, original_host = ray.data.read_datasource, offline.EnsembleHost

    def read_then_tokenise(*args, **kwargs):
        ds = original_read(*args, **kwargs)
        return ds.map_batches(
            TokenizeStage,
            fn_constructor_kwargs={"plan": plan},
            batch_format="pyarrow",
            batch_size=offline.window_rows(plan),
            compute=ActorPoolStrategy(size=1),
            # Logical CPUs: the hosts hold the rest of the cluster's share.
            num_cpus=LIGHT_TASK_CPUS,
        )

    ray.data.read_datasource = read_then_tokenise
    offline.EnsembleHost = TokenizedInputHost
    try:
        yield
    finally:
        ray.data.read_datasource = original_read
        offline.EnsembleHost = original_host
