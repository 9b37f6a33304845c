"""Progress of a scoring job: hosts count the rows they finish, the driver logs a line
per interval.

The count lives in a small actor, because the hosts that add to it run in other
processes (and on other nodes)."""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Iterator
from typing import Any

__all__ = ["progress_log"]

logger = logging.getLogger("pipelines.offline")


class _Progress:
    """Counts rows as hosts finish windows; the driver logs one line per interval.

    Holds a number only: if it is lost, the log goes quiet and no row is harmed."""

    def __init__(self) -> None:
        self.rows = 0

    def add(self, rows: int) -> None:
        self.rows += rows

    def get(self) -> int:
        return self.rows


@contextlib.contextmanager
def progress_log(total: int | None, done: int, interval_s: float) -> Iterator[Any]:
    import ray

    counter = ray.remote(num_cpus=0)(_Progress).remote()
    stop = threading.Event()
    started = time.perf_counter()

    def report() -> None:
        while not stop.wait(interval_s):
            try:
                rows = ray.get(counter.get.remote(), timeout=5)
            except Exception:  # the counter is gone: keep scoring, stop reporting
                return
            took = time.perf_counter() - started
            rate = rows / took if took > 0 else 0.0
            if rows == 0:
                # Hosts report whole windows: "0 rows, 0 rows/s" would read as a hang.
                logger.info("score: %.0fs in, loading members and scoring the first windows", took)
            elif total:
                # Windows a restarted host scores again count twice here; never show > 100%.
                shown = min(done + rows, total)
                eta = f", about {(total - shown) / rate:.0f}s left" if rate > 0 else ""
                logger.info(
                    "score: %s of %s rows (%.1f%%), %.0f rows/s%s",
                    f"{shown:,}",
                    f"{total:,}",
                    100 * shown / total,
                    rate,
                    eta,
                )
            else:
                logger.info("score: %s rows, %.0f rows/s", f"{done + rows:,}", rate)

    thread = threading.Thread(target=report, name="score-progress", daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join(timeout=1)
        ray.kill(counter)
