"""A plain PyTorch ``nn.Module`` member with safetensors weights (never a pickle).

The directory holds the weights and, unless the member config gives ``module_config``,
the class's keyword arguments as ``config.json``::

    members:
      - name: cnn
        backend: torch
        module: my_models.cnn:TextCNN     # importable on every node
        model: ./models/cnn               # model.safetensors (+ config.json)
        tokenizer: ./models/cnn-tokenizer # default: the model directory

``forward(input_ids, attention_mask=..., ...)`` returns logits or an embedding: a
tensor, a tuple whose first item is one, or an object with ``logits`` or
``last_hidden_state``; a ``(b, t, d)`` output is mean-pooled over the attention mask.
"""

from __future__ import annotations

import importlib
import inspect
import json
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from actors.backends.base import (
    TOKEN_INPUTS,
    BackendError,
    BackendOptions,
    TokenizedBackend,
    TorchDevice,
    check_tokenizer_files,
    compile_model,
    load_tokenizer,
    pool,
    resolve_dtype,
    safetensors_bytes,
)
from actors.tasks.base import HeadInfo

__all__ = ["Options", "TorchModuleBackend", "build_module", "describe", "load", "weight_bytes"]

local_files = True
trainable = False


class Options(BackendOptions):
    module: str = Field(
        ...,
        pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$",
        description="The nn.Module class as `package.module:Class`, e.g. my_models:TextCNN.",
    )
    module_config: dict[str, Any] | None = Field(
        None,
        description="Keyword arguments for the class; default: the model directory's config.json.",
    )
    output_labels: list[str] | None = Field(
        None,
        description="The label of each output, in order (default: the ensemble's labels); "
        "label_map applies to them.",
    )
    compile: bool = Field(
        False,
        description="Run the module through torch.compile (on a GPU only; ignored on CPU).",
    )


def import_class(path: str) -> type:
    """``package.module:Class`` -> the class, with an error that says how to fix it."""
    module_name, _, name = path.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise BackendError(
            f"module: cannot import '{module_name}' ({exc}); install it on every node or ship "
            "it with the job (`ray job submit --working-dir .`)"
        ) from None
    cls = getattr(module, name, None)
    if not isinstance(cls, type):
        raise BackendError(f"module: '{module_name}' has no class '{name}'")
    return cls


def find_weights(model_dir: Path) -> Path:
    """The one safetensors file of a torch member; pickled weights are refused."""
    files = sorted(model_dir.glob("*.safetensors")) if model_dir.is_dir() else []
    if len(files) == 1:
        return files[0]
    if not files:
        pickled = [p.name for p in model_dir.glob("*.bin")] + [
            p.name for p in model_dir.glob("*.pt")
        ]
        hint = (
            f" ({', '.join(pickled)} are pickles, which are never loaded: convert them with "
            "safetensors.torch.save_file(model.state_dict(), 'model.safetensors'))"
            if pickled
            else ""
        )
        raise BackendError(f"model: no .safetensors weights in {model_dir}{hint}")
    raise BackendError(
        f"model: {model_dir} holds several .safetensors files {[p.name for p in files]}; "
        "keep one (model.safetensors)"
    )


def module_kwargs(member: Any) -> dict[str, Any]:
    """The class's keyword arguments: ``module_config``, else the directory's config.json."""
    if member.options.module_config is not None:
        return dict(member.options.module_config)
    path = Path(member.model) / "config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise BackendError(f"model: cannot read {path}: {exc}") from None
    if not isinstance(data, dict):
        raise BackendError(f"model: {path} must hold a JSON object of keyword arguments")
    return data


def _forward_keys(forward: Any) -> list[str]:
    params = inspect.signature(forward).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return list(TOKEN_INPUTS)
    keys = [k for k in TOKEN_INPUTS if k in params]
    if "input_ids" not in keys:
        raise BackendError(
            "module: forward() must take `input_ids` (and may take attention_mask, "
            f"token_type_ids); it takes {list(params)}"
        )
    return keys


def build_module(member: Any) -> Any:
    """Instantiate the member's class and load its safetensors state dict (on CPU)."""
    from safetensors.torch import load_file

    cls = import_class(member.options.module)
    kwargs = module_kwargs(member)
    try:
        model = cls(**kwargs)
    except TypeError as exc:
        raise BackendError(
            f"module_config: {member.options.module}({', '.join(kwargs)}) failed: {exc}"
        ) from None
    state = load_file(str(find_weights(Path(member.model))))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ from the class's
        detail = " ".join(str(exc).split())[:400]
        raise BackendError(
            f"model: the weights do not fit {member.options.module}: {detail}; check module_config"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise BackendError(
            f"model: the weights do not fit {member.options.module}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; save them from the same class and config"
        )
    return model


def describe(member: Any, task: Any) -> HeadInfo:
    """Checked without loading the weights, so mistakes surface before any Ray work."""
    import torch

    if not issubclass(import_class(member.options.module), torch.nn.Module):
        raise BackendError(f"module: {member.options.module} is not a torch.nn.Module")
    find_weights(Path(member.model))
    kwargs = module_kwargs(member)
    check_tokenizer_files(member, Path(member.model))
    width = next(
        (int(kwargs[k]) for k in ("hidden_size", "dim", "embedding_size") if k in kwargs), None
    )
    labels = tuple(member.options.output_labels) if member.options.output_labels else None
    return HeadInfo(labels=labels, hidden_size=width)


class TorchModuleBackend(TorchDevice, TokenizedBackend):
    forward_in_threads = True

    def __init__(self, member: Any, task: Any, device: str) -> None:
        import torch

        self._torch = torch
        self.device = device
        self.input_device = torch.device(device)
        self.model = build_module(member).to(device, resolve_dtype(member.dtype, device)).eval()
        self._keys = _forward_keys(self.model.forward)
        self._use_tokenizer(
            load_tokenizer(member, Path(member.model)),
            member.max_length,
            self._keys,
            member.tokenizer or member.model,
        )
        self._run = compile_model(self.model, device, member.options.compile)

    def forward(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        # On CPU, numpy all the way: the (b, t, d) pooling there is pool()'s.
        if self.input_device.type != "cpu":
            return super().forward(inputs)
        out = self._outputs(self._inputs_on_device(inputs, self._keys))
        return pool(out.float().numpy(), inputs["attention_mask"])

    def forward_on_device(self, inputs: dict[str, np.ndarray]) -> Any:
        tensors = self._inputs_on_device(inputs, self._keys)
        out = self._outputs(tensors).float()
        if out.ndim == 3:
            mask = tensors["attention_mask"].to(out.device).unsqueeze(-1).float()
            out = (out * mask).sum(1) / mask.sum(1).clamp(min=1.0)
        elif out.ndim != 2:
            pool(out.cpu().numpy(), inputs["attention_mask"])  # raises its clear error
        return out

    def _outputs(self, tensors: dict[str, Any]) -> Any:
        with self._torch.inference_mode():
            out = self._run(**tensors)
        for attr in ("logits", "last_hidden_state"):
            if hasattr(out, attr):
                out = getattr(out, attr)
                break
        if isinstance(out, (tuple, list)):
            out = out[0]
        return out


def load(member: Any, task: Any, device: str, threads: int | None = None) -> TorchModuleBackend:
    return TorchModuleBackend(member, task, device)


def weight_bytes(member: Any, on_gpu: bool = True) -> int | None:
    path = Path(member.model)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    return safetensors_bytes(files, member.dtype, on_gpu=on_gpu) if files else None
