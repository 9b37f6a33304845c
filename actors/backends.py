"""Members that are not transformers models: a plain ``nn.Module`` and an ONNX graph.

Both follow :class:`actors.member.MemberBackend`, so the member host, the offline
pipeline and the Serve deployments treat them exactly like a Hugging Face member:
``encode`` tokenises with the member's tokenizer, ``forward`` maps padded int64 arrays
to ``(b, k)`` float32 (logits, or an embedding; a ``(b, t, d)`` output is mean-pooled
over the attention mask).

A torch member is a directory with the weights as safetensors (never a pickle) and,
unless the member config gives ``module_config``, the class's keyword arguments as
``config.json``::

    members:
      - name: cnn
        backend: torch
        module: my_models.cnn:TextCNN     # importable on every node
        model: ./models/cnn               # model.safetensors (+ config.json)
        tokenizer: ./models/cnn-tokenizer # default: the model directory

An ONNX member is an ``.onnx`` file (or a directory holding one) with inputs named
``input_ids`` / ``attention_mask`` / ``token_type_ids``::

      - name: onnx
        backend: onnx
        model: ./models/minilm.onnx
        onnx_output: logits               # default: the first output
"""

from __future__ import annotations

import importlib
import inspect
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from actors.loading import MemberLoadError

__all__ = [
    "OnnxBackend",
    "TokenEncoder",
    "TokenizedBackend",
    "TorchModuleBackend",
    "find_onnx_file",
    "find_weights",
    "import_class",
    "module_kwargs",
    "onnx_session",
    "pool",
]

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


# A member's model files or code cannot be used as configured.
BackendError = MemberLoadError


class TokenEncoder:
    """Tokenises rows for a model that takes some of ``TOKEN_INPUTS``."""

    def __init__(self, tokenizer: Any, max_length: int, keys: Sequence[str]) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.keys = list(keys)
        if "attention_mask" not in self.keys:
            self.keys.append("attention_mask")  # always built: padding and pooling use it
        pad = tokenizer.pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0

    def encode(
        self, texts: Sequence[str], pairs: Sequence[str] | None
    ) -> dict[str, list[list[int]]]:
        enc = self.tokenizer(
            list(texts),
            list(pairs) if pairs is not None else None,
            truncation=True,
            max_length=self.max_length,
            padding=False,
            return_attention_mask=False,
        )
        out = {"input_ids": enc["input_ids"]}
        if "token_type_ids" in self.keys and "token_type_ids" in enc:
            out["token_type_ids"] = enc["token_type_ids"]
        return out


class TokenizedBackend:
    """The tokenising half every backend shares; subclasses call ``_use_tokenizer``."""

    _encoder: TokenEncoder
    pad_token_id: int
    # True where forward() may run on several threads at once over one model: a torch
    # module in inference mode keeps no state between calls. ONNX Runtime runs its own pool.
    forward_in_threads = False

    def _use_tokenizer(
        self, tokenizer: Any, max_length: int, keys: Sequence[str], source: str
    ) -> None:
        self._encoder = TokenEncoder(tokenizer, max_length, keys)
        self.pad_token_id = self._encoder.pad_token_id
        # Backends whose keys are equal encode a text identically (see EnsembleHost).
        self.tokenizer_key = (
            tokenizer_fingerprint(tokenizer, source),
            max_length,
            tuple(self._encoder.keys),
        )

    def encode(
        self, texts: Sequence[str], pairs: Sequence[str] | None
    ) -> dict[str, list[list[int]]]:
        return self._encoder.encode(texts, pairs)


def tokenizer_fingerprint(tokenizer: Any, source: str) -> str:
    """Equal for tokenizers that split every text alike, wherever their files are (members
    fine-tuned from one base model each keep a copy of its tokenizer)."""
    import hashlib

    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow tokenizer: only its files tell it apart
        return f"path:{source}"
    state = f"{backend.to_str()}|{getattr(tokenizer, 'truncation_side', 'right')}"
    return hashlib.sha256(state.encode()).hexdigest()


def pool(output: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(b, k)`` as it is; ``(b, t, d)`` averaged over the tokens the mask keeps."""
    if output.ndim == 2:
        return output.astype(np.float32, copy=False)
    if output.ndim == 3:
        m = mask[..., None].astype(np.float32)
        return ((output * m).sum(1) / np.maximum(m.sum(1), 1.0)).astype(np.float32)
    raise BackendError(
        f"the model returned an array of shape {output.shape}; a member must return (batch, "
        "labels) logits, a (batch, dim) embedding or (batch, tokens, dim) hidden states"
    )


def load_tokenizer(member: Any, default_dir: Path) -> Any:
    from transformers import AutoTokenizer

    source = member.tokenizer or str(default_dir)
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=member.trust_remote_code)
    except Exception as exc:  # transformers raises many kinds for a folder without a tokenizer
        raise BackendError(
            f"tokenizer: cannot load a tokenizer from '{source}' ({type(exc).__name__}); set "
            "`tokenizer:` to a directory with tokenizer.json / vocab.txt and tokenizer_config.json"
        ) from None


# --- plain PyTorch modules ---------------------------------------------------------------


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
    if member.module_config is not None:
        return dict(member.module_config)
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

    cls = import_class(member.module)
    kwargs = module_kwargs(member)
    try:
        model = cls(**kwargs)
    except TypeError as exc:
        raise BackendError(
            f"module_config: {member.module}({', '.join(kwargs)}) failed: {exc}"
        ) from None
    state = load_file(str(find_weights(Path(member.model))))
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ from the class's
        detail = " ".join(str(exc).split())[:400]
        raise BackendError(
            f"model: the weights do not fit {member.module}: {detail}; check module_config"
        ) from None
    if result.missing_keys or result.unexpected_keys:
        raise BackendError(
            f"model: the weights do not fit {member.module}: missing {result.missing_keys[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}; save them from the same class and config"
        )
    return model


class TorchModuleBackend(TokenizedBackend):
    """A plain ``nn.Module`` whose ``forward(input_ids, attention_mask=..., ...)`` returns
    logits / an embedding (a tensor, a tuple whose first item is one, or an object with
    ``logits`` or ``last_hidden_state``)."""

    forward_in_threads = True

    def __init__(self, member: Any, task: str, device: str) -> None:
        import torch

        from actors.loading import resolve_dtype

        self._torch = torch
        self.device = device
        self.model = build_module(member).to(device, resolve_dtype(member.dtype, device)).eval()
        self._keys = _forward_keys(self.model.forward)
        self._use_tokenizer(
            load_tokenizer(member, Path(member.model)),
            member.max_length,
            self._keys,
            member.tokenizer or member.model,
        )

    def forward(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        torch = self._torch
        tensors = {
            k: torch.from_numpy(v).to(self.device) for k, v in inputs.items() if k in self._keys
        }
        with torch.inference_mode():
            out = self.model(**tensors)
        for attr in ("logits", "last_hidden_state"):
            if hasattr(out, attr):
                out = getattr(out, attr)
                break
        if isinstance(out, (tuple, list)):
            out = out[0]
        return pool(out.float().cpu().numpy(), inputs["attention_mask"])


# --- ONNX ----------------------------------------------------------------------------------


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
    if member.onnx_output and member.onnx_output not in outputs:
        raise BackendError(
            f"onnx_output: {path.name} has no output '{member.onnx_output}'; "
            f"its outputs are {outputs}"
        )
    return session


def onnx_output_width(session: Any, name: str | None) -> int | None:
    """The last dimension of the output, when the graph fixes it."""
    out = next(o for o in session.get_outputs() if name in (None, o.name))
    last = out.shape[-1] if out.shape else None
    return last if isinstance(last, int) else None


class OnnxBackend(TokenizedBackend):
    """An ONNX graph run with onnxruntime (CUDA when the member has a GPU and the
    onnxruntime-gpu build is installed, CPU otherwise)."""

    def __init__(self, member: Any, task: str, device: str, threads: int | None = None) -> None:
        self.session = onnx_session(member, device, threads)
        self._inputs = [i.name for i in self.session.get_inputs()]
        self._output = member.onnx_output or self.session.get_outputs()[0].name
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
