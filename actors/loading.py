"""Loading members' models: what the driver reads before any Ray work, and what actors load.

The driver only reads each model's config (cheap) to align labels and catch mistakes
early; the weights are loaded once per actor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actors.reducer import AlignmentError, build_label_index

if TYPE_CHECKING:
    import torch

    from pipelines.config import EnsembleConfig, MemberConfig

__all__ = [
    "MemberLoadError",
    "MemberSpec",
    "describe_member",
    "import_member_modules",
    "load_hf_model",
    "pick_device",
    "resolve_dtype",
]


@dataclass(frozen=True)
class MemberSpec:
    """What the pipeline needs to know about a member, read from its model config."""

    name: str
    label_index: tuple[int, ...]  # member output i -> canonical label index (classification)
    single_logit: bool  # a one-logit binary head
    multi_label: bool  # sigmoid per label instead of softmax
    model_labels: tuple[str, ...]  # the model's own id2label, in id order
    hidden_size: int | None  # embedding dimension (embedding task)


def _read_config(member: MemberConfig) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(member.model, trust_remote_code=member.trust_remote_code)
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
        raise MemberLoadError(
            f"model: cannot load a model config from {where} "
            f"'{member.model}': {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; {hint}"
        ) from None


class MemberLoadError(ValueError):
    """A member's model cannot be used as configured."""


def import_member_modules(member: MemberConfig) -> None:
    """Import the member's ``register`` modules (they register custom architectures)."""
    import importlib

    for name in member.register_modules:
        try:
            importlib.import_module(name)
        except Exception as exc:  # an ImportError, or anything the module raises on import
            raise MemberLoadError(
                f"register: cannot import '{name}' ({type(exc).__name__}: {exc}); install it "
                "on every node or ship it with the job (`ray job submit --working-dir .`)"
            ) from None


def describe_member(member: MemberConfig, ensemble: EnsembleConfig) -> MemberSpec:
    """Read the member's model config and align its labels to the ensemble's."""
    import_member_modules(member)
    if member.backend != "hf":
        return _describe_custom(member, ensemble)
    config = _read_config(member)
    if ensemble.task == "embedding":
        hidden = getattr(config, "hidden_size", None) or getattr(config, "dim", None)
        return MemberSpec(member.name, (), False, False, (), hidden)
    num = int(getattr(config, "num_labels", 0) or 0)
    id2label = getattr(config, "id2label", None) or {}
    model_labels = tuple(
        str(id2label.get(i, id2label.get(str(i), f"LABEL_{i}"))) for i in range(num)
    )
    multi_label = getattr(config, "problem_type", None) == "multi_label_classification"
    return _align_member(member, ensemble, model_labels, multi_label)


def _describe_custom(member: MemberConfig, ensemble: EnsembleConfig) -> MemberSpec:
    """A torch or ONNX member: checked on the driver without loading its weights (torch)
    or by opening the graph (ONNX), so mistakes surface before any Ray work."""
    from actors import backends

    width: int | None = None
    if member.backend == "onnx":
        session = backends.onnx_session(member)
        width = backends.onnx_output_width(session, member.onnx_output)
        folder = backends.find_onnx_file(member.model).parent
    else:
        import torch

        if not issubclass(backends.import_class(member.module or ""), torch.nn.Module):
            raise MemberLoadError(f"module: {member.module} is not a torch.nn.Module")
        backends.find_weights(Path(member.model))
        kwargs = backends.module_kwargs(member)
        folder = Path(member.model)
        if ensemble.task == "embedding":
            width = next(
                (int(kwargs[k]) for k in ("hidden_size", "dim", "embedding_size") if k in kwargs),
                None,
            )
    if not member.tokenizer and not any(
        (folder / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "vocab.txt")
    ):
        raise MemberLoadError(
            f"tokenizer: {folder} has no tokenizer files; set `tokenizer:` to the tokenizer's "
            "directory (or hub id)"
        )
    if ensemble.task == "embedding":
        return MemberSpec(member.name, (), False, False, (), width)
    model_labels = tuple(member.output_labels or ensemble.labels or ())
    if width is not None and width != len(model_labels):
        raise MemberLoadError(
            f"output_labels: the model gives {width} values per row but the member has "
            f"{len(model_labels)} labels {list(model_labels)}; set output_labels to the "
            "label of each output, in order"
        )
    return _align_member(member, ensemble, model_labels, False)


def _align_member(
    member: MemberConfig, ensemble: EnsembleConfig, model_labels: tuple[str, ...], multi_label: bool
) -> MemberSpec:
    num = len(model_labels)
    labels = ensemble.labels or []
    single_logit = num == 1
    try:
        if single_logit:
            if multi_label or len(labels) != 2:
                raise AlignmentError(
                    "the model has a single-logit (binary) head, so the ensemble needs exactly "
                    f"2 labels, got {labels}"
                )
            mapped = (member.label_map or {}).get(model_labels[0], model_labels[0])
            lowered = [label.lower() for label in labels]
            # A default-named single logit is the positive (second) canonical label.
            positive = lowered.index(mapped.lower()) if mapped.lower() in lowered else 1
            index: tuple[int, ...] = (positive,)
        else:
            if num < 1:
                raise AlignmentError("the model config has no labels (num_labels is 0)")
            index = build_label_index(model_labels, labels, member.label_map)
    except AlignmentError as exc:
        raise MemberLoadError(str(exc)) from None
    return MemberSpec(member.name, index, single_logit, multi_label, model_labels, None)


def pick_device(num_gpus: float) -> str:
    import torch

    return "cuda" if num_gpus > 0 and torch.cuda.is_available() else "cpu"


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``auto`` = bfloat16 (or float16) on a GPU that supports it, float32 on CPU."""
    import torch

    if dtype != "auto":
        return getattr(torch, dtype)
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_hf_model(member: MemberConfig, task: str, device: str) -> tuple[Any, Any]:
    """Tokenizer and model for a member, safetensors first, remote code only when asked."""
    from transformers import AutoModel, AutoModelForSequenceClassification, AutoTokenizer

    trust = member.trust_remote_code
    tokenizer = AutoTokenizer.from_pretrained(member.model, trust_remote_code=trust)
    cls = AutoModel if task == "embedding" else AutoModelForSequenceClassification
    local = Path(member.model)
    # Prefer safetensors; refuse to fall back to pickled weights when safetensors exist.
    has_safetensors = local.is_dir() and any(local.glob("*.safetensors"))
    model = cls.from_pretrained(
        member.model,
        trust_remote_code=trust,
        dtype=resolve_dtype(member.dtype, device),
        use_safetensors=True if has_safetensors else None,
    )
    model.to(device)
    model.eval()
    return tokenizer, model
