"""`python -m jobs.cli score` with each step of its start-up stamped, for
`bench/startup.py --breakdown` (which runs it and reads the stamps).

    STEPS_FILE=steps.jsonl PYTHONPATH=.:bench python bench/startup_steps.py score CONFIG ...

Wall-clock stamps go to ``STEPS_FILE`` (one JSON line each) from the driver and from
the host and write workers: the host and the sink are swapped for subclasses that stamp
and then do what the real ones do. Workers import this module by name, so ``bench/``
must be on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import sys
import time

import psutil

from actors.host import EnsembleHost
from pipelines.output import StagedParquetSink


def stamp(step: str, at: float | None = None) -> None:
    with open(os.environ["STEPS_FILE"], "a") as f:
        f.write(json.dumps({"pid": os.getpid(), "step": step, "t": at or time.time()}) + "\n")


class TimedHost(EnsembleHost):
    first = True

    def __init__(self, **kwargs) -> None:
        stamp("host process created", psutil.Process().create_time())
        stamp("host init")
        import torch  # noqa: F401
        import transformers  # noqa: F401

        stamp("host imported torch")
        super().__init__(**kwargs)
        stamp("host loaded")

    def __call__(self, batch):
        if TimedHost.first:
            stamp("first window start")
        out = super().__call__(batch)
        if TimedHost.first:
            stamp("first window end")
            TimedHost.first = False
        return out


class TimedSink(StagedParquetSink):
    def write(self, blocks, ctx):
        stamp("write process created", psutil.Process().create_time())
        stamp("write start")
        try:
            return super().write(blocks, ctx)
        finally:
            stamp("write end")


def _wrap(owner, name: str, step: str) -> None:
    fn = getattr(owner, name)

    def timed(*args, **kwargs):
        stamp(step + " start")
        try:
            return fn(*args, **kwargs)
        finally:
            stamp(step + " end")

    setattr(owner, name, timed)


def main() -> int:
    stamp("driver process created", psutil.Process().create_time())
    import ray
    import ray.data

    import jobs.cli
    import pipelines.offline as offline

    _wrap(ray, "init", "ray.init")
    _wrap(ray, "shutdown", "ray.shutdown")
    _wrap(offline, "prepare_job", "prepare_job")
    _wrap(offline, "verify", "verify")
    _wrap(offline, "publish", "publish")
    _wrap(ray.data.Dataset, "write_datasink", "execute")
    import pipelines.plan

    _wrap(pipelines.plan, "plan_ensemble", "plan_ensemble")
    import startup_steps  # by name, so that workers find the classes

    offline.EnsembleHost = startup_steps.TimedHost
    offline.StagedParquetSink = startup_steps.TimedSink
    code = jobs.cli.main(sys.argv[1:])
    stamp("main returned")
    return code


if __name__ == "__main__":
    sys.exit(main())
