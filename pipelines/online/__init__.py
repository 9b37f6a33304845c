"""Online scoring on Ray Serve: an HTTP layer (:mod:`.http`, :mod:`.protocols`) over the
deployments (:mod:`.deployments`) that run the same host and reducer as ``score``.

``serve run`` / ``serve deploy`` import ``pipelines.online:app_builder``. Names are
loaded on first use, so the pure codecs in :mod:`.protocols` import without Ray.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["PredictRequest", "app_builder", "build_app"]

_HOMES = {
    "app_builder": "pipelines.online.deployments",
    "build_app": "pipelines.online.deployments",
    "PredictRequest": "pipelines.online.http",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
