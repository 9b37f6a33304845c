"""Member backends: one module per runtime, behind one small interface.

A backend module (see :mod:`actors.backends.base` for what it provides) owns its config
keys (``Options``), their checks, what the plan reads of a model without loading it
(``describe``), its loading and forward pass (``load``) and its GPU memory estimate
(``weight_bytes``). Its heavy dependencies are imported inside those functions, so
reading a config imports none of them.

Adding a backend is a module beside these and one :func:`register` line below.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = ["BACKENDS", "DEFAULT_BACKEND", "backend_kind", "register"]

# name -> module path; modules are imported on first use.
BACKENDS: dict[str, str] = {}


def register(name: str, module: str) -> None:
    """Name a backend (the member key ``backend: <name>``) by its module's import path."""
    BACKENDS[name] = module


register("hf", "actors.backends.hf")
register("torch", "actors.backends.torch_module")
register("onnx", "actors.backends.onnx")

# What a member without a `backend:` key is.
DEFAULT_BACKEND = "hf"


def backend_kind(name: str) -> Any:
    """The module of backend ``name`` (its ``Options``, ``describe``, ``load``, ...)."""
    try:
        path = BACKENDS[name]
    except KeyError:
        raise ValueError(f"'{name}' is not a backend; use one of {list(BACKENDS)}") from None
    return importlib.import_module(path)
