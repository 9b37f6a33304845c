"""An ONNX graph run with onnxruntime (CUDA when the member has a GPU and the
onnxruntime-gpu build is installed, CPU otherwise).

``model`` is an ``.onnx`` file (or a directory holding one) with inputs named
``input_ids`` / ``attention_mask`` / ``token_type_ids``::

      - name: onnx
        backend: onnx
        model: ./models/minilm.onnx
        onnx_output: logits               # default: the first output

A ``(b, t, d)`` output is mean-pooled over the attention mask.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from actors.backends.base import (
    TOKEN_INPUTS,
    BackendError,
    BackendOptions,
    TokenizedBackend,
    check_tokenizer_files,
    load_tokenizer,
    pool,
)
from actors.tasks.base import HeadInfo

__all__ = ["OnnxBackend", "Options", "describe", "find_onnx_file", "load", "weight_bytes"]

local_files = True
trainable = False


class Options(BackendOptions):
    onnx_output: str | None = Field(None, description="The output to read (default: the first).")
    output_labels: list[str] | None = Field(
        None,
        description="The label of each output, in order (default: the ensemble's labels); "
        "label_map applies to them.",
    )


def find_onnx_file(model: str) -> Path:
    path = Path(model)
    if path.is_file():
        return path
    files = sorted(path.glob("*.onnx")) if path.is_dir() else []
    if len(files) != 1:
        found = [p.name for p in files] or "none"
        raise BackendError(
            f"model: expected one .onnx file in {path}, found {found}; point `model` at the file"
        )
    return files[0]


def onnx_session(member: Any, device: str = "cpu", threads: int | None = None) -> Any:
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendError(
            "backend onnx needs onnxruntime: pip install onnxruntime (onnxruntime-gpu on GPU nodes)"
        ) from None
    options = ort.SessionOptions()
    if threads:
        options.intra_op_num_threads = threads
    providers = ["CPUExecutionProvider"]
    if device.startswith("cuda") and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    path = find_onnx_file(member.model)
    try:
        session = ort.InferenceSession(str(path), options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own exception types
        raise BackendError(f"model: onnxruntime cannot load {path}: {exc}") from None
    unknown = [i.name for i in session.get_inputs() if i.name not in TOKEN_INPUTS]
    if unknown:
        raise BackendError(
            f"model: {path.name} takes inputs {unknown}; an ONNX member may take only "
            f"{list(TOKEN_INPUTS)}"
        )
    outputs = [o.name for o in session.get_outputs()]
    if member.options.onnx_output and member.options.onnx_output not in outputs:
        raise BackendError(
            f"onnx_output: {path.name} has no output '{member.options.onnx_output}'; "
            f"its outputs are {outputs}"
        )
    return session


def _output_width(session: Any, name: str | None) -> int | None:
    """The last dimension of the output, when the graph fixes it."""
    out = next(o for o in session.get_outputs() if name in (None, o.name))
    last = out.shape[-1] if out.shape else None
    return last if isinstance(last, int) else None


def describe(member: Any, task: Any) -> HeadInfo:
    """Opens the graph (not a forward pass), so mistakes surface before any Ray work."""
    session = onnx_session(member)
    check_tokenizer_files(member, find_onnx_file(member.model).parent)
    labels = tuple(member.options.output_labels) if member.options.output_labels else None
    return HeadInfo(labels=labels, width=_output_width(session, member.options.onnx_output))


class OnnxBackend(TokenizedBackend):
    def __init__(self, member: Any, task: Any, device: str, threads: int | None = None) -> None:
        self.session = onnx_session(member, device, threads)
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._output = member.options.onnx_output or self.session.get_outputs()[0].name
        folder = find_onnx_file(member.model).parent
        self._use_tokenizer(
            load_tokenizer(member, folder),
            member.max_length,
            self._inputs,
            member.tokenizer or str(folder),
        )

    def forward(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        ids = inputs["input_ids"]
        # A graph that wants token_type_ids gets zeros when the tokenizer gives none.
        feed = {k: inputs[k] if k in inputs else np.zeros_like(ids) for k in self._inputs}
        (out,) = self.session.run([self._output], feed)
        return pool(np.asarray(out), inputs["attention_mask"])


def load(member: Any, task: Any, device: str, threads: int | None = None) -> OnnxBackend:
    return OnnxBackend(member, task, device, threads)


def weight_bytes(member: Any, on_gpu: bool = True) -> int | None:
    try:
        return find_onnx_file(member.model).stat().st_size
    except BackendError:  # not one .onnx file: the plan has said so already
        return None
