"""What every backend shares: the interface a loaded member offers, tokenising, devices.

A backend is a module registered in :mod:`actors.backends` that defines:

- ``Options``: a :class:`BackendOptions` model of the member keys only it reads;
- ``local_files``: True when ``model`` must be a local path (no hub ids);
- ``trainable``: whether `ray-ensemble train` can fine-tune its members;
- ``describe(member, task) -> HeadInfo``: what the plan needs of the model, read without
  loading its weights; raises :class:`BackendError` for a model it cannot use;
- ``load(member, task, device, threads) -> MemberBackend``: the model, ready to run;
- ``weight_bytes(member, on_gpu) -> int | None``: its weights in the dtype it runs with;
- optionally ``pin(member) -> member``: the member with what it loads fixed, called once
  on the driver at plan time (the hf backend resolves a hub revision to a commit hash).

Example (a backend whose "model" is a lookup table, as in tests/test_backend_plugin.py)::

    class Options(BackendOptions):
        bias: float = 0.0

    local_files, trainable = True, False

    def describe(member, task):
        return HeadInfo(labels=("negative", "positive"))

    def load(member, task, device, threads):
        return TableBackend(member)      # encode() and forward(), see MemberBackend

    def weight_bytes(member, on_gpu=True):
        return None
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict

if TYPE_CHECKING:
    import torch

__all__ = [
    "TOKEN_INPUTS",
    "BackendError",
    "BackendOptions",
    "MemberBackend",
    "TokenEncoder",
    "TokenizedBackend",
    "TorchDevice",
    "check_tokenizer_files",
    "compile_model",
    "import_member_modules",
    "load_tokenizer",
    "native_bfloat16",
    "pick_device",
    "pool",
    "resolve_dtype",
    "safetensors_bytes",
]

TOKEN_INPUTS = ("input_ids", "attention_mask", "token_type_ids")
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


class BackendError(ValueError):
    """A member's model files or code cannot be used as configured."""


class BackendOptions(BaseModel):
    """The member keys a backend reads beyond the common ones; unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class MemberBackend(Protocol):
    """What a loaded member offers the host. Hugging Face, custom and ONNX models plug in here."""

    pad_token_id: int

    def encode(
        self, texts: Sequence[str], pairs: Sequence[str] | None
    ) -> dict[str, list[list[int]]]:
        """Token ids (and any other per-token inputs) per row, truncated, not padded."""
        ...

    def forward(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        """Padded ``(b, t)`` int arrays (with ``attention_mask``) in, ``(b, k)`` float32 out:
        logits for classification, a pooled vector for embeddings."""
        ...


class TokenEncoder:
    """Tokenises rows for a model that takes some of ``TOKEN_INPUTS``.

    A fast tokenizer is called through its Rust core with truncation set once: the
    transformers wrapper re-applies its settings on every call, which costs about a
    third of the time on short rows and makes concurrent calls fail ("Already
    borrowed"). The core is used only where it gives exactly the wrapper's ids on a
    probe (single texts and pairs); otherwise, and for slow tokenizers, the wrapper is
    called under a lock. Either way ``encode`` may be called from several threads."""

    PROBE = ("Probe text, with punctuation & ÜNICODE: naïve café 123.", "And a pair, too!")

    def __init__(
        self, tokenizer: Any, max_length: int, keys: Sequence[str], pad_token_id: int | None = None
    ) -> None:
        import threading

        self.tokenizer = tokenizer
        self.max_length = max_length
        self.keys = list(keys)
        if "attention_mask" not in self.keys:
            self.keys.append("attention_mask")  # always built: padding and pooling use it
        pad = tokenizer.pad_token_id if pad_token_id is None else pad_token_id
        self.pad_token_id = int(pad) if pad is not None else 0
        self._lock = threading.Lock()
        # Type ids where the wrapper gives them (RoBERTa's, say, gives none).
        self._types = "token_type_ids" in self.keys
        self._core = self._fast_core(tokenizer, max_length)

    def _fast_core(self, tokenizer: Any, max_length: int) -> Any:
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or not hasattr(backend, "encode_batch_fast"):
            return None
        try:
            from tokenizers import Tokenizer

            core = Tokenizer.from_str(backend.to_str())
            core.enable_truncation(
                max_length,
                strategy="longest_first",
                direction=getattr(tokenizer, "truncation_side", "right"),
            )
            core.no_padding()
            short = self.PROBE[0] * 3
            probes = [([short, self.PROBE[1]], None), ([short], [self.PROBE[1]])]
            for texts, pairs in probes:
                expected = self._encode_wrapper(texts, pairs)
                self._types = "token_type_ids" in expected
                got = self._encode_core(core, texts, pairs)
                if got["input_ids"] != expected["input_ids"] or (
                    pairs is not None
                    and got.get("token_type_ids") != expected.get("token_type_ids")
                ):
                    return None
        except Exception:  # any oddity of a tokenizer: the wrapper is always right
            return None
        return core

    def _encode_core(
        self, core: Any, texts: Sequence[str], pairs: Sequence[str] | None
    ) -> dict[str, list[list[int]]]:
        inputs = list(texts) if pairs is None else list(zip(texts, pairs, strict=True))
        encodings = core.encode_batch_fast(inputs)
        out = {"input_ids": [e.ids for e in encodings]}
        # Without a pair every type id is 0, the models' default for a missing input.
        if self._types and pairs is not None:
            out["token_type_ids"] = [e.type_ids for e in encodings]
        return out

    def _encode_wrapper(
        self, texts: Sequence[str], pairs: Sequence[str] | None
    ) -> dict[str, list[list[int]]]:
        with self._lock:
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

    def encode(
        self, texts: Sequence[str], pairs: Sequence[str] | None
    ) -> dict[str, list[list[int]]]:
        if self._core is not None:
            return self._encode_core(self._core, texts, pairs)
        return self._encode_wrapper(texts, pairs)


class TokenizedBackend:
    """The tokenising half every backend here shares; subclasses call ``_use_tokenizer``."""

    _encoder: TokenEncoder
    pad_token_id: int
    # True where forward() may run on several threads at once over one model: a torch
    # module in inference mode keeps no state between calls. ONNX Runtime runs its own pool.
    forward_in_threads = False

    def _use_tokenizer(
        self,
        tokenizer: Any,
        max_length: int,
        keys: Sequence[str],
        source: str,
        pad_token_id: int | None = None,
    ) -> None:
        self._encoder = TokenEncoder(tokenizer, max_length, keys, pad_token_id)
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

    @property
    def tokenizer(self) -> Any:
        """The transformers tokenizer, for calls ``encode`` does not cover (offsets,
        windows); call it under :attr:`tokenizer_lock`."""
        return self._encoder.tokenizer

    @property
    def tokenizer_lock(self) -> Any:
        return self._encoder._lock


class TorchDevice:
    """What torch backends share on the way to and from their device.

    On CUDA the padded inputs go through pinned host memory with non-blocking copies,
    and a window's outputs stay on the device until one copy back (``to_host``)."""

    _torch: Any
    input_device: Any  # where the inputs go: the embedding layer's device

    def _inputs_on_device(
        self, inputs: dict[str, np.ndarray], keys: Sequence[str]
    ) -> dict[str, torch.Tensor]:
        torch = self._torch
        cuda = self.input_device.type == "cuda"
        out = {}
        for k in keys:
            if k in inputs:
                t = torch.from_numpy(inputs[k])
                out[k] = t.pin_memory().to(self.input_device, non_blocking=True) if cuda else t
        return out

    def to_host(self, outputs: Sequence[torch.Tensor]) -> np.ndarray:
        """The outputs of a window's passes, one ``(b, k)`` float32 array (per-token
        ``(b, t, k)`` outputs padded with NaN to the longest pass)."""
        torch = self._torch
        if len(outputs) > 1 and outputs[0].dim() == 3:
            width = max(o.shape[1] for o in outputs)
            outputs = [
                torch.nn.functional.pad(o.float(), (0, 0, 0, width - o.shape[1]), value=np.nan)
                for o in outputs
            ]
        joined = outputs[0] if len(outputs) == 1 else torch.cat([o.float() for o in outputs])
        return joined.float().cpu().numpy()

    def forward(self, inputs: dict[str, np.ndarray]) -> np.ndarray:
        return self.to_host([self.forward_on_device(inputs)])

    def forward_on_device(self, inputs: dict[str, np.ndarray]) -> torch.Tensor:
        raise NotImplementedError


def compile_model(model: Any, device: str, enabled: bool) -> Any:
    """``torch.compile`` where asked for and on a GPU; on CPU the model as it is (the
    compile costs minutes there and was not measured to pay off)."""
    if not enabled or not device.startswith("cuda"):
        return model
    import torch

    # Rows come in many lengths: one graph for all of them, not one per shape.
    return torch.compile(model, dynamic=True)


def tokenizer_fingerprint(tokenizer: Any, source: str) -> str:
    """Equal for tokenizers that split every text alike, wherever their files are (members
    fine-tuned from one base model each keep a copy of its tokenizer)."""
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


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt")


def check_tokenizer_files(member: Any, folder: Path) -> None:
    """A member whose tokenizer would come from ``folder`` needs tokenizer files there."""
    if not member.tokenizer and not any((folder / f).is_file() for f in TOKENIZER_FILES):
        raise BackendError(
            f"tokenizer: {folder} has no tokenizer files; set `tokenizer:` to the tokenizer's "
            "directory (or hub id)"
        )


def load_tokenizer(member: Any, default_dir: Path | str, revision: str | None = None) -> Any:
    """``revision``: the hub commit to read a hub id's tokenizer from (None: its default)."""
    from transformers import AutoTokenizer

    source = member.tokenizer or str(default_dir)
    pinned = {"revision": revision} if revision else {}
    try:
        return AutoTokenizer.from_pretrained(
            source, trust_remote_code=member.trust_remote_code, **pinned
        )
    except Exception as exc:  # transformers raises many kinds for a folder without a tokenizer
        raise BackendError(
            f"tokenizer: cannot load a tokenizer from '{source}' ({type(exc).__name__}); set "
            "`tokenizer:` to a directory with tokenizer.json / vocab.txt and tokenizer_config.json"
        ) from None


def import_member_modules(member: Any) -> None:
    """Import the member's ``register`` modules (they register custom architectures)."""
    import importlib

    for name in member.register_modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an ImportError, or anything the module raises on import
            raise BackendError(
                f"register: cannot import '{name}' ({type(exc).__name__}: {exc}); install it "
                "on every node or ship it with the job (`ray job submit --working-dir .`)"
            ) from None


def pick_device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


CPU_BFLOAT16_ENV = "RAY_ENSEMBLE_CPU_BFLOAT16"


def native_bfloat16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX). There a
    transformer runs about twice as fast in bfloat16 (docs/benchmarks.md); elsewhere
    bfloat16 is emulated and slower than float32. ``RAY_ENSEMBLE_CPU_BFLOAT16=0`` (or
    ``1``) overrides the answer, read at each call: for bit-for-bit float32 runs, say."""
    import os

    forced = os.environ.get(CPU_BFLOAT16_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def gpu_has_bfloat16(device: str = "cuda") -> bool:
    """Native bfloat16 needs compute capability 8.0 (Ampere) or newer.
    ``torch.cuda.is_bf16_supported()`` also says yes where it is emulated (T4, V100),
    many times slower than float16."""
    import torch

    return torch.cuda.get_device_capability(torch.device(device))[0] >= 8


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` = bfloat16 on a GPU that has it natively (compute capability 8.0+),
    float16 on older GPUs; on CPU float32, or bfloat16 where the CPU multiplies it in
    hardware (:func:`native_bfloat16`)."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if gpu_has_bfloat16(device) else torch.float16
    return torch.bfloat16 if native_bfloat16() else torch.float32


def safetensors_bytes(files: Sequence[Path], dtype: str, *, on_gpu: bool) -> int:
    """Bytes of the weights in ``files`` in the dtype they run with, from the headers alone."""
    from safetensors import safe_open

    params = stored = 0
    for path in files:
        with safe_open(str(path), framework="numpy") as f:
            for name in f.keys():
                piece = f.get_slice(name)
                count = int(np.prod(piece.get_shape(), dtype=np.int64))
                params += count
                stored += count * _SAFETENSORS_BYTES.get(piece.get_dtype(), 4)
    if dtype in DTYPE_BYTES:
        return params * DTYPE_BYTES[dtype]
    # auto: half precision on a GPU, as stored otherwise.
    return params * 2 if on_gpu else stored


_SAFETENSORS_BYTES = {
    "F64": 8,
    "F32": 4,
    "F16": 2,
    "BF16": 2,
    "I64": 8,
    "I32": 4,
    "I16": 2,
    "I8": 1,
    "U8": 1,
    "BOOL": 1,
}
