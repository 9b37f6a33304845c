"""Progress of a scoring job: hosts count the rows they finish, the driver logs a line
per interval.

The count lives in a small actor, because the hosts that add to it run in other
processes (and on other nodes). The log must outlive any node but the driver's: the
actor is pinned to the driver's node (which lives as long as the job), and restarts
under the same handle if its own process dies (the hosts keep the handle they were
given when the job started, so a new actor would never hear from them).
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

__all__ = ["RowCounter", "progress_log"]

logger = logging.getLogger("pipelines.offline")

# A read that takes longer means the counter is restarting: skip a line, not the log.
READ_TIMEOUT_S = 5.0


class _Progress:
    """Counts rows as hosts finish windows; the driver logs one line per interval.

    Holds a number only: if it is lost, no row is harmed. A restarted counter starts from
    0 under a new ``run`` token, so the driver adds what it had seen before."""

    def __init__(self) -> None:
        self.run = uuid.uuid4().hex
        self.rows = 0
        self.seconds: dict[str, float] = {}

    def add(self, rows: int) -> None:
        self.rows += rows

    def add_seconds(self, seconds: dict[str, float]) -> None:
        """Members' forward seconds, timed in a host (what `evaluate` reports as cost)."""
        for name, s in seconds.items():
            self.seconds[name] = self.seconds.get(name, 0.0) + s

    def member_seconds(self) -> dict[str, float]:
        return dict(self.seconds)

    def get(self) -> tuple[str, int]:
        return self.run, self.rows


class _Tally:
    """The driver's running total across restarts of the counter."""

    def __init__(self) -> None:
        self.run: str | None = None
        self.before = 0  # rows counted by earlier runs of the counter
        self.last = 0  # the current run's count at the last read

    def update(self, run: str, rows: int) -> int:
        if self.run is not None and run != self.run:
            # What the old counter took after the last read is lost: the count runs low.
            self.before += self.last
        self.run, self.last = run, rows
        return self.before + rows

    @property
    def rows(self) -> int:
        return self.before + self.last


@dataclass(frozen=True)
class RowCounter:
    """What the hosts are given to count their rows: the counter's name, not its handle.

    A handle in an actor's constructor arguments makes Ray keep them in the object store
    (ray#53727: a restarted host would depend on them, and Ray logs an error for every
    host). A name is plain data; the counter keeps it when it restarts."""

    name: str
    namespace: str

    @property
    def handle(self) -> Any:
        import ray

        return ray.get_actor(self.name, namespace=self.namespace)

    def add(self, rows: int) -> None:
        """Fire and forget: a count is lost, never a row."""
        if (handle := self._resolved()) is not None:
            handle.add.remote(rows)

    def add_seconds(self, seconds: dict[str, float]) -> None:
        """Members' forward seconds, timed in a host (what `evaluate` reports as cost)."""
        if (handle := self._resolved()) is not None:
            handle.add_seconds.remote(seconds)

    def _resolved(self) -> Any:
        handle = _HANDLES.get(self.name)
        if handle is None:
            try:
                handle = _HANDLES[self.name] = self.handle
            except ValueError:  # the job is over, or its counter is restarting
                return None
        return handle


# Per process: the handle each host resolved once.
_HANDLES: dict[str, Any] = {}


def _start_counter() -> RowCounter:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # Left to the scheduler, a 0-CPU actor lands on any node, and the log went quiet for
    # the rest of the job when that node died. The driver's node dies only with the job.
    # A counter that dies anyway restarts there; the adds sent meanwhile wait for it.
    here = ray.get_runtime_context().get_node_id()
    counter = RowCounter(
        f"ray-ensemble-progress-{uuid.uuid4().hex}", ray.get_runtime_context().namespace
    )
    _HANDLES[counter.name] = (
        ray.remote(_Progress)
        .options(
            name=counter.name,
            namespace=counter.namespace,
            num_cpus=0,
            max_restarts=-1,
            max_task_retries=-1,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        )
        .remote()
    )
    return counter


def _line(total: int | None, done: int, rows: int, took: float) -> str:
    rate = rows / took if took > 0 else 0.0
    if rows == 0:
        # Hosts report whole windows: "0 rows, 0 rows/s" would read as a hang.
        return f"score: {took:.0f}s in, loading members and scoring the first windows"
    if total:
        # Windows a restarted host scores again count twice here; never show > 100%.
        shown = min(done + rows, total)
        eta = f", about {(total - shown) / rate:.0f}s left" if rate > 0 else ""
        return (
            f"score: {shown:,} of {total:,} rows ({100 * shown / total:.1f}%), "
            f"{rate:.0f} rows/s{eta}"
        )
    return f"score: {done + rows:,} rows, {rate:.0f} rows/s"


@contextlib.contextmanager
def progress_log(total: int | None, done: int, interval_s: float) -> Iterator[RowCounter]:
    """Log one progress line every ``interval_s`` seconds while the block runs; yields
    the counter whose ``add(rows)`` the hosts call (Ray must be running), and whose
    ``add_seconds({member: seconds})`` they call with each member's forward seconds.

    ``total``: the job's rows when known up front (Parquet), ``done``: rows committed by
    an earlier run (``--resume``)."""
    import ray

    counter = _start_counter()
    handle = _HANDLES[counter.name]
    stop = threading.Event()
    started = time.perf_counter()
    tally = _Tally()

    def report() -> None:
        while not stop.wait(interval_s):
            took = time.perf_counter() - started
            try:
                run, rows = ray.get(handle.get.remote(), timeout=READ_TIMEOUT_S)
            except Exception:  # restarting: say so, and keep scoring and reporting
                if stop.is_set():
                    return  # the job is over (and the counter killed): no line after its summary
                logger.info(
                    "score: %.0fs in, %s rows counted so far; the row counter is restarting",
                    took,
                    f"{done + tally.rows:,}",
                )
                continue
            if stop.is_set():
                return
            logger.info("%s", _line(total, done, tally.update(run, rows), took))

    thread = threading.Thread(target=report, name="score-progress", daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join(timeout=1)
        ray.kill(_HANDLES.pop(counter.name))
