"""Hugging Face transformers models: a model directory or a hub id.

The task chooses the head (``task.hf_model_class``) and the step after the forward pass
(``task.from_model_output``). Weights load safetensors first; a model runs its own code
only with ``trust_remote_code: true``.

A hub id is pinned at plan time (:func:`pin`): its ``revision`` (a branch, a tag, or
``main`` when unset) is resolved once, on the driver, to a commit hash, and every load
after that (model, config and the model's own tokenizer, in every actor, including
actors Ray restarts mid-job) reads that commit, even if the branch moves meanwhile.

A decoder-only classifier (Llama, Qwen2, GPT-2, ...) reads its logits at the last token
that is not padding, so it needs a pad token id in its config: when the config has none,
the tokenizer's pad token, or else its EOS token, is used for padding and set on the
config; a model with neither is refused at plan time.
"""

from __future__ import annotations

import inspect
import re
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
    compile_model,
    load_tokenizer,
    resolve_dtype,
    safetensors_bytes,
)
from actors.tasks.base import HeadInfo

__all__ = ["HFBackend", "Options", "describe", "load", "pin", "resolve_revision", "weight_bytes"]

local_files = False  # a hub id works too
trainable = True


PICKLED = ("*.bin", "*.pt", "*.pth", "*.ckpt")
COMMIT_HASH = re.compile(r"[0-9a-f]{40}")


class Options(BackendOptions):
    allow_pickle: bool = Field(
        False,
        description="Load .bin / .pt weights (Python pickles, which can run code) from a "
        "model folder without safetensors. Only for files you trust.",
    )
    revision: str | None = Field(
        None,
        min_length=1,
        description="For a hub id: the branch, tag or commit hash to load (default: main). "
        "Resolved once, when the job is planned, to a commit hash that every actor loads, "
        "so a branch that moves mid-job changes nothing. Not for a local model folder.",
    )
    compile: bool = Field(
        False,
        description="Run the model through torch.compile (on a GPU only; ignored on CPU). "
        "Off until a GPU run shows it helps for your model: the first passes are slow "
        "while it compiles.",
    )
    attn_implementation: str | None = Field(
        None,
        min_length=1,
        description="Passed to transformers' from_pretrained: `sdpa`, `eager`, or "
        "`flash_attention_2` where the flash-attn package is installed. Default: "
        "transformers' choice.",
    )


def _check_weights(member: Any) -> None:
    """A local folder with pickled weights and no safetensors is refused unless the member
    allows pickles: torch.load would run whatever the file holds."""
    path = Path(member.model)
    if not path.is_dir() or any(path.glob("*.safetensors")) or member.options.allow_pickle:
        return
    pickled = sorted(p.name for pattern in PICKLED for p in path.glob(pattern))
    if pickled:
        raise BackendError(
            f"model: {path} holds only pickled weights ({', '.join(pickled)}), which are not "
            "loaded: convert them to safetensors (model.save_pretrained(dir)), or set "
            "allow_pickle: true on this member if you trust the files"
        )


def _is_local(member: Any) -> bool:
    return Path(member.model).is_dir()


def resolve_revision(repo_id: str, revision: str | None) -> str:
    """The commit hash that ``revision`` (default ``main``) of hub model ``repo_id`` names.

    A commit hash is taken as it is. Anything else is looked up through the file every
    model has, config.json: online the hub says which commit the ref points at; offline
    (HF_HUB_OFFLINE=1) the local cache's ``refs/<revision>`` does. Either way the file
    comes back under ``snapshots/<commit>/``, which names the commit."""
    ref = revision or "main"
    if COMMIT_HASH.fullmatch(ref):
        return ref
    from huggingface_hub import hf_hub_download

    try:
        path = Path(hf_hub_download(repo_id, "config.json", revision=ref))
    except Exception as exc:  # offline misses, 404s, network errors: all say the same to us
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BackendError(
            f"revision: cannot resolve {ref!r} of hub id '{repo_id}' to a commit "
            f"({type(exc).__name__}: {first}); check the id, the revision and your network, "
            "or download the model and point `model` at the local directory"
        ) from None
    commit = path.parent.name
    if path.parent.parent.name != "snapshots" or not COMMIT_HASH.fullmatch(commit):
        raise BackendError(
            f"revision: the hub client put '{repo_id}' at {path}, not in a snapshots/<commit> "
            "folder of its cache, so its commit is unknown; set `revision:` to the commit hash"
        )
    return commit


def pin(member: Any) -> Any:
    """The member with its hub revision resolved to a commit hash (a local folder as it is).

    Called once, on the driver, by the plan: the plan carries the pinned member to every
    actor, so none resolves the ref again."""
    if _is_local(member):
        if member.options.revision is not None:
            raise BackendError(
                f"revision: {member.options.revision!r} is only for a hub id, and model "
                f"'{member.model}' is a local folder, which has no revisions; remove "
                "`revision:`, or set `model:` to the hub id"
            )
        return member
    commit = resolve_revision(member.model, member.options.revision)
    if commit == member.options.revision:
        return member
    return member.with_options(revision=commit)


def _pinned(member: Any) -> dict[str, str]:
    """``from_pretrained``'s revision argument for the member's model: none for a folder."""
    return {"revision": member.options.revision} if member.options.revision else {}


def _tokenizer_revision(member: Any) -> str | None:
    """The pinned commit applies to the tokenizer when it is the model's own; a
    ``tokenizer:`` of another hub repository loads as that repository names it."""
    return member.options.revision if member.tokenizer in (None, member.model) else None


def read_config(member: Any) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(
            member.model,
            trust_remote_code=member.trust_remote_code,
            **_pinned(member),
        )
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError... for bad models
        where = "directory" if Path(member.model).is_dir() else "hub id"
        hint = (
            "check that it holds a Hugging Face model (config.json)"
            if where == "directory"
            else "check the id and your network, or download the model and point `model` at "
            "the local directory"
        )
        if "does not recognize this architecture" in str(exc):
            hint = (
                "this architecture is not in transformers: name the module that registers it "
                "(AutoConfig.register / AutoModelForSequenceClassification.register) under "
                "`register:`, or set trust_remote_code: true if the model ships its own code "
                "and you trust it"
            )
        elif "trust_remote_code" in str(exc):
            hint = "this model runs its own code: set trust_remote_code: true only if you trust it"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise BackendError(
            f"model: cannot load a model config from {where} '{member.model}': {first}; {hint}"
        ) from None


def _decoder_only(config: Any) -> bool:
    """Models whose classifier pools the last non-pad token: causal LMs with no masked-LM
    form (BERT-likes appear in both tables and pool their first token)."""
    from transformers.models.auto.modeling_auto import (
        MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
        MODEL_FOR_MASKED_LM_MAPPING_NAMES,
    )

    kind = getattr(config, "model_type", None)
    return (
        kind in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES and kind not in MODEL_FOR_MASKED_LM_MAPPING_NAMES
    )


def _tokenizer(member: Any) -> Any:
    return load_tokenizer(member, member.model, revision=_tokenizer_revision(member))


def pad_token_id(config: Any, tokenizer: Any) -> int | None:
    """The id to pad with: the config's, else the tokenizer's pad token, else its EOS."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for candidate in (
        getattr(text, "pad_token_id", None),
        getattr(tokenizer, "pad_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
        getattr(text, "eos_token_id", None),
    ):
        if isinstance(candidate, (list, tuple)):
            candidate = candidate[0] if candidate else None
        if candidate is not None:
            return int(candidate)
    return None


def describe(member: Any, task: Any) -> HeadInfo:
    config = read_config(member)
    _check_weights(member)
    if task.hf_model_class == "AutoModelForSequenceClassification" and _decoder_only(config):
        if pad_token_id(config, _tokenizer(member)) is None:
            raise BackendError(
                f"model: {type(config).__name__} is decoder-only: its classifier reads the "
                "last token that is not padding, but neither its config nor its tokenizer "
                "names a pad or EOS token; set pad_token_id in the model's config.json or "
                "pad_token in its tokenizer_config.json"
            )
    num = int(getattr(config, "num_labels", 0) or 0)
    id2label = getattr(config, "id2label", None) or {}
    labels = tuple(str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num))
    return HeadInfo(
        architectures=tuple(getattr(config, "architectures", None) or ()),
        labels=labels,
        problem_type=getattr(config, "problem_type", None),
        hidden_size=getattr(config, "hidden_size", None) or getattr(config, "dim", None),
    )


class HFBackend(TorchDevice, TokenizedBackend):
    """A transformers model run under ``torch.inference_mode``; the task reads its output.

    With ``num_gpus`` of 2 or more (whole GPUs), the model is spread over the actor's
    visible GPUs (``device_map="auto"``) and the inputs go to its embedding layer's GPU."""

    forward_in_threads = True

    def __init__(self, member: Any, task: Any, device: str) -> None:
        import torch
        import transformers

        _check_weights(member)
        self._torch = torch
        self.device = device
        self.task = task
        tokenizer = _tokenizer(member)
        auto = getattr(transformers, task.hf_model_class)
        local = Path(member.model)
        # Prefer safetensors; refuse to fall back to pickled weights when safetensors exist.
        has_safetensors = local.is_dir() and any(local.glob("*.safetensors"))
        extra: dict[str, Any] = {}
        if member.options.attn_implementation:
            extra["attn_implementation"] = member.options.attn_implementation
        spread = device.startswith("cuda") and member.num_gpus >= 2
        if spread:
            import importlib.util

            if importlib.util.find_spec("accelerate") is None:
                raise BackendError(
                    f"num_gpus: {member.num_gpus:g} spreads the model over GPUs with "
                    "device_map, which needs the accelerate package on every GPU node: "
                    "pip install 'ray-ensemble[gpu]' (or accelerate)"
                )
            extra["device_map"] = "auto"
            extra["max_memory"] = gpu_memory_map()
        self.model = auto.from_pretrained(
            member.model,
            trust_remote_code=member.trust_remote_code,
            dtype=resolve_dtype(member.dtype, device),
            use_safetensors=True if has_safetensors else None,
            **_pinned(member),
            **extra,
        )
        pad = pad_token_id(self.model.config, tokenizer)
        text = self.model.config.get_text_config()
        if pad is not None and getattr(text, "pad_token_id", None) is None:
            # Padding and the classifier's search for the last real token must agree.
            text.pad_token_id = pad
            self.model.config.pad_token_id = pad
        if not spread:
            self.model.to(device)
        self.model.eval()
        self.input_device = (
            self.model.get_input_embeddings().weight.device if spread else torch.device(device)
        )
        # The model takes only the inputs its forward() names (e.g. no token_type_ids for RoBERTa).
        accepted = set(inspect.signature(self.model.forward).parameters)
        self._use_tokenizer(
            tokenizer,
            member.max_length,
            [k for k in TOKEN_INPUTS if k in accepted],
            member.tokenizer or member.model,
            pad_token_id=pad,
        )
        self._keys = self._encoder.keys
        self._run = compile_model(self.model, device, member.options.compile)

    def forward_on_device(self, inputs: dict[str, np.ndarray]) -> Any:
        tensors = self._inputs_on_device(inputs, self._keys)
        with self._torch.inference_mode():
            out = self._run(**tensors)
            return self.task.from_model_output(out, tensors["attention_mask"])


def gpu_memory_map(headroom: float = 0.9) -> dict[int, int]:
    """Bytes ``device_map="auto"`` may place on each visible GPU: most of what is free,
    leaving room for activations."""
    import torch

    return {
        i: int(torch.cuda.mem_get_info(i)[0] * headroom) for i in range(torch.cuda.device_count())
    }


def load(member: Any, task: Any, device: str, threads: int | None = None) -> HFBackend:
    return HFBackend(member, task, device)


def weight_bytes(member: Any, on_gpu: bool = True) -> int | None:
    """None for a hub id not on disk: its size is unknown until it is downloaded."""
    path = Path(member.model)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
    if files:
        return safetensors_bytes(files, member.dtype, on_gpu=on_gpu)
    bins = sorted(path.glob("*.bin")) if path.is_dir() else []
    return sum(f.stat().st_size for f in bins) if bins else None
