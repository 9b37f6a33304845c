"""The ensemble config: one frozen, validated model; YAML is only its serialisation.

Example::

    >>> from pipelines.config import EnsembleConfig
    >>> cfg = EnsembleConfig.model_validate({
    ...     "name": "demo", "labels": ["negative", "positive"],
    ...     "members": [{"name": "alpha", "model": "org/alpha"}],
    ... })
    >>> cfg.reducer.combine
    'weighted_mean'
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from actors.backends import BACKENDS, DEFAULT_BACKEND, backend_kind
from actors.tasks import TASKS, all_output_names, get_task

__all__ = [
    "COMBINE_METHODS",
    "CascadeConfig",
    "ConfigError",
    "EnsembleConfig",
    "InputConfig",
    "MemberConfig",
    "ReducerConfig",
    "Replicas",
    "TrainConfig",
    "load_config",
]

COMBINE_METHODS = tuple(dict.fromkeys(c for t in TASKS.values() for c in t.combine_methods))

# Prefixes of the per-member columns the scorer writes for some task (the declaration is
# the tasks' output fields): an input column starting with one is refused.
_, MEMBER_OUTPUT_PREFIXES = all_output_names()


class ConfigError(ValueError):
    """A mistake in the config or the command line: reported without a traceback, exit code 2."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Replicas(_Strict):
    """An autoscaling range of actor replicas."""

    min: int = Field(1, ge=1, description="Fewest replicas kept running.")
    max: int = Field(1, ge=1, description="Most replicas started under load.")

    @model_validator(mode="after")
    def _ordered(self) -> Replicas:
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be at least min ({self.min})")
        return self


def _at_least_one(value: int | Replicas) -> int | Replicas:
    if isinstance(value, int) and value < 1:
        raise ValueError("replicas must be at least 1")
    return value


# A `replicas` key, wherever it is: a number, or {min, max} to autoscale.
ReplicaCount = Annotated[int | Replicas, AfterValidator(_at_least_one)]


def replica_range(replicas: int | Replicas) -> tuple[int, int]:
    """The (min, max) of a ``replicas`` key."""
    if isinstance(replicas, int):
        return replicas, replicas
    return replicas.min, replicas.max


class InputConfig(_Strict):
    """Which input columns hold the text and the row ids."""

    text_column: str = Field("text", min_length=1, description="Column holding the text to score.")
    text_pair_column: str | None = Field(
        None, description="Optional second text segment (NLI, sentence pairs)."
    )
    id_column: str = Field(
        "id",
        min_length=1,
        description="Passed through; when absent from the input, stable unique ids are made "
        "as '<file>:<row>'.",
    )
    max_chars: int = Field(
        100_000,
        ge=1,
        description="Text is cut to this many characters before tokenising (tokens past "
        "max_length are dropped anyway), so one giant row cannot blow up a member's memory.",
    )
    words_column: str | None = Field(
        None,
        min_length=1,
        description="token_classification: a list<string> column of pre-split words (as "
        "CoNLL data comes). Set, text_column is not read; unset, the words are the text "
        r"split by re.finditer(r'\w+|[^\w\s]', text).",
    )

    @property
    def text_columns(self) -> list[str]:
        """The string columns the scorer reads (none when the words come pre-split)."""
        if self.words_column:
            return []
        return [c for c in (self.text_column, self.text_pair_column) if c]


class TrainConfig(_Strict):
    """How `ray-ensemble train` fine-tunes a member (written to the member's `model` path)."""

    base_model: str = Field(
        ...,
        min_length=1,
        description="Encoder to start from: a local Hugging Face directory (relative to the "
        "config file) or a hub id.",
    )
    epochs: float = Field(1.0, gt=0, description="Passes over the training set (may be 0.5).")
    learning_rate: float = Field(5e-5, gt=0, description="Peak AdamW learning rate.")
    weight_decay: float = Field(0.01, ge=0, description="AdamW weight decay.")
    warmup_ratio: float = Field(
        0.1, ge=0, lt=1, description="Share of steps with a linear warm-up."
    )
    batch_size: int = Field(32, ge=1, description="Examples per step, per worker.")
    freeze_encoder: bool = Field(
        False, description="Train only the pooler and the head; the encoder stays as it is."
    )
    classifier_dropout: float | None = Field(
        None, ge=0, lt=1, description="Dropout before the head (default: the base model's)."
    )
    mixed_precision: Literal["no", "bf16"] = Field(
        "no",
        description="bf16: forward passes in bfloat16 autocast (weights stay float32), "
        "about 1.5x faster on CPUs with AVX512-BF16 or AMX and on Ampere or newer GPUs.",
    )
    max_examples: int | None = Field(
        None, ge=1, description="Train on a seeded sample of at most this many rows."
    )
    seed: int = Field(0, description="Seeds the head, the shuffling and the sample.")
    num_workers: int = Field(1, ge=1, description="Ray Train workers (data parallel).")
    use_gpu: bool | None = Field(
        None, description="Train on GPUs; default: when the member asks for one and it exists."
    )
    cpus_per_worker: float | None = Field(
        None,
        gt=0,
        description="CPUs per worker (default: all but a little, shared).",
    )


class MemberConfig(_Strict):
    """One model of the ensemble."""

    # Keys beyond the ones below belong to the member's backend (see _backend_keys).
    model_config = ConfigDict(extra="allow", frozen=True)

    _options: Any = PrivateAttr(None)

    name: str = Field(
        ...,
        pattern=r"^[a-z0-9_]+$",
        description="Unique; lower-case letters, digits and '_'. Used in output column names.",
    )
    model: str = Field(
        ...,
        min_length=1,
        description="Local Hugging Face model directory (relative to the config file) or a hub id.",
    )
    weight: float = Field(1.0, ge=0, description="Weight in the combination.")
    temperature: float = Field(1.0, gt=0, description="Logits are divided by it before softmax.")
    label_map: dict[str, str] | None = Field(
        None, description="Member label -> canonical label; by name (case-insensitive) when absent."
    )
    max_length: int = Field(
        256, ge=1, description="Longer inputs are truncated to this many tokens."
    )
    batch_size: int = Field(64, ge=1, description="Most rows per forward pass.")
    aggregation: Literal["first", "average", "max"] | None = Field(
        None,
        description="token_classification: a word's logits from its sub-tokens': the first "
        "one's (default), their mean, or their element-wise max.",
    )
    stride: int | None = Field(
        None,
        ge=0,
        description="token_classification: a text longer than max_length tokens is scored in "
        "windows that overlap by this many tokens (default: max_length // 4); each word "
        "reads the window where it is furthest from an edge.",
    )
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Most padded tokens (rows x longest row) per forward pass; a row longer "
        "than it still runs alone. Default: 2048 on CPU, no cap on GPU.",
    )
    num_gpus: float = Field(
        0,
        ge=0,
        description="GPUs per replica: 0.25 a share of one, 1 a whole one, 2 or more (whole "
        "numbers) spreads the model over that many GPUs; 0: CPU.",
    )
    num_cpus: float | None = Field(
        None,
        gt=0,
        description="CPUs reserved per replica (also its torch thread count, rounded up). "
        "Default: 1 with a GPU; on CPU an even share of the cluster's CPUs.",
    )
    replicas: ReplicaCount = Field(
        1, description="Actor replicas: a number, or {min, max} to autoscale."
    )
    own_host: bool = Field(
        False,
        description="Run this member in an ensemble host of its own instead of sharing one "
        "with the other members on its device (a member with whole GPUs always has its own).",
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="auto = bfloat16 on a GPU that has it natively (compute capability 8.0+), "
        "float16 on older GPUs; on CPU float32, or bfloat16 where the CPU multiplies it in "
        "hardware (AVX512-BF16, AMX).",
    )
    trust_remote_code: bool = Field(
        False, description="Run the model repository's own code. Only for models you trust."
    )
    train: TrainConfig | None = Field(
        None, description="Fine-tuning settings used by `ray-ensemble train`."
    )
    backend: str = Field(
        DEFAULT_BACKEND,
        description=f"The runtime that loads and runs the model: {' | '.join(BACKENDS)}. Each "
        "backend takes keys of its own (README.md, 'Bring your own models'); a new one is "
        "registered in actors/backends/__init__.py.",
    )

    # `register` would shadow BaseModel.register (from ABCMeta); the key users write is it.
    register_modules: list[str] = Field(
        default_factory=list,
        alias="register",
        description="Modules imported before loading, e.g. to register a custom architecture "
        "with AutoConfig / AutoModelForSequenceClassification (no trust_remote_code needed).",
    )
    tokenizer: str | None = Field(
        None,
        description="Tokenizer directory or hub id; default: the model directory (the ONNX "
        "file's folder for onnx).",
    )

    @field_validator("register_modules", mode="before")
    @classmethod
    def _module_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("num_gpus")
    @classmethod
    def _whole_gpus_above_one(cls, value: float) -> float:
        if value > 1 and value != int(value):
            raise ValueError(
                f"{value:g} GPUs: above 1, num_gpus must be a whole number (the model is "
                f"spread over that many GPUs); use {int(value)} or {int(value) + 1}, or a "
                "share of one GPU (at most 1)"
            )
        return value

    @field_validator("backend")
    @classmethod
    def _known_backend(cls, value: str) -> str:
        backend_kind(value)
        return value

    @model_validator(mode="after")
    def _backend_keys(self) -> MemberConfig:
        # The keys beyond the common ones are the backend's: its Options checks them, and
        # its errors keep their place (members[i].<key>).
        self._options = backend_kind(self.backend).Options.model_validate(self.model_extra or {})
        if self.train is not None and not backend_kind(self.backend).trainable:
            able = [n for n in BACKENDS if backend_kind(n).trainable]
            raise ValueError(
                f"train: members of backend {self.backend} cannot be trained, only those of "
                f"backend {' or '.join(able)}"
            )
        return self

    @property
    def replica_range(self) -> tuple[int, int]:
        return replica_range(self.replicas)

    @property
    def options(self) -> Any:
        """The backend's own keys, validated, with their defaults."""
        return self._options

    def with_options(self, **options: Any) -> MemberConfig:
        """A copy with some of its backend's keys set, validated like the original.

        >>> m = MemberConfig(name="a", model="org/a", revision="main")
        >>> m.with_options(revision="0" * 40).options.revision == "0" * 40
        True
        """
        data = self.model_dump(by_alias=True)
        return type(self).model_validate({**data, **options})

    @property
    def backend_module(self) -> Any:
        """The backend's module, found from the options' class: a process that never saw
        the backend's registration (a Ray worker) still finds it."""
        return importlib.import_module(type(self._options).__module__)


class ReducerConfig(_Strict):
    """How the members' outputs are combined."""

    combine: str = Field(
        None,  # type: ignore[assignment]  # the task's default, filled below
        description="; ".join(
            f"{t.name}: {' | '.join(t.combine_methods)} (default {t.default_combine})"
            for t in TASKS.values()
        ),
    )
    output_members: bool = Field(True, description="Also write each member's distribution.")

    stacking: str | None = Field(
        None,
        description="The meta-model of `combine: stacking`, a JSON file written by "
        "`ray-ensemble fit` (relative to the config file).",
    )


class ServeConfig(_Strict):
    """Online serving: request limits, dynamic batching and backpressure."""

    max_inputs: int = Field(64, ge=1, description="Most inputs in one request (else 413).")
    max_body_bytes: int = Field(
        1_048_576, ge=1024, description="Largest request body in bytes (else 413)."
    )
    max_text_chars: int = Field(
        20_000, ge=1, description="Longest text (or text pair) in characters (else 413)."
    )
    max_batch_size: int = Field(
        32, ge=1, description="Most texts a member runs in one forward pass across requests."
    )
    batch_wait_timeout_s: float = Field(
        0.01,
        ge=0,
        description="Under load, how long the ingress and each member wait to fill a batch. "
        "A request that arrives alone never waits.",
    )
    max_ongoing_requests: int = Field(
        32, ge=1, description="Requests the endpoint works on at once (per ingress replica)."
    )
    max_queued_requests: int = Field(
        64, ge=0, description="Requests waiting beyond that; more get a quick 503."
    )
    request_timeout_s: float = Field(
        30.0, gt=0, description="A request not answered in time gets a 503."
    )
    replicas: ReplicaCount = Field(
        1,
        description="Replicas of the endpoint, each holding the members that share a host: "
        "a number, or {min, max} to autoscale.",
    )
    member_timeout_s: float | None = Field(
        None,
        gt=0,
        description="How long the endpoint waits for a member host of its own (own_host, "
        "whole GPUs), counted once the endpoint's own members have run; a host that has not "
        "answered by then counts as missing for that batch. Default: no limit (only "
        "request_timeout_s).",
    )
    min_members: int | None = Field(
        None,
        ge=1,
        description="Quorum: the fewest members an answer may be made from. When a member "
        "host fails or times out, the answer comes from the others, with members_missing; "
        "below this count the request gets a 503 'unavailable'. A count of members, not a "
        "weight share. Default: all members (no partial answers).",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed(cls, data: Any) -> Any:
        if isinstance(data, dict) and "ingress_replicas" in data:
            raise ValueError(
                "serve.ingress_replicas is now serve.replicas: the endpoint's replicas hold "
                "the members too (a number, or {min, max} to autoscale)"
            )
        return data

    @property
    def replica_range(self) -> tuple[int, int]:
        return replica_range(self.replicas)


class CascadeConfig(_Strict):
    """Run the members in stages, cheapest first; a row stops after a stage when the
    ensemble so far is sure enough (written by `ray-ensemble fit --cascade`)."""

    stages: list[list[str]] = Field(
        ...,
        min_length=2,
        description="Member names per stage, in the order they run; every member in "
        "exactly one stage.",
    )
    exit_at: list[float] = Field(
        ...,
        description="One threshold per stage but the last, each in (0, 1]: after stage i, "
        "a row stops when the top probability of the ensemble so far (the configured "
        "combination over the members run so far, weights renormalised) is at least "
        "exit_at[i].",
    )

    @model_validator(mode="after")
    def _shape(self) -> CascadeConfig:
        if any(not stage for stage in self.stages):
            raise ValueError("stages: a stage needs at least one member")
        if len(self.exit_at) != len(self.stages) - 1:
            raise ValueError(
                f"exit_at: {len(self.stages)} stages need {len(self.stages) - 1} thresholds "
                f"(one after each stage but the last), got {len(self.exit_at)}"
            )
        bad = [t for t in self.exit_at if not 0 < t <= 1]
        if bad:
            raise ValueError(f"exit_at: {bad} out of range; each threshold is in (0, 1]")
        return self

    def stage_of(self, member: str) -> int:
        """The index of the stage that runs ``member``."""
        return next(i for i, stage in enumerate(self.stages) if member in stage)


class EnsembleConfig(_Strict):
    """The whole ensemble: its members and how they are combined."""

    name: str = Field(..., min_length=1, description="Name of the ensemble.")
    task: str = Field(next(iter(TASKS)), description=" | ".join(TASKS), validate_default=True)
    labels: list[str] | None = Field(None, description="Canonical label order (classification).")
    input: InputConfig = Field(default_factory=InputConfig, description="Input columns.")
    members: list[MemberConfig] = Field(..., min_length=1, description="The member models.")
    reducer: ReducerConfig = Field(default_factory=ReducerConfig, description="Combination.")
    serve: ServeConfig = Field(default_factory=ServeConfig, description="Online serving.")
    cascade: CascadeConfig | None = Field(
        None, description="Run the members in stages; rows the first ones are sure of stop."
    )

    @model_validator(mode="before")
    @classmethod
    def _default_combine(cls, data: Any) -> Any:
        if isinstance(data, dict):
            reducer = data.get("reducer") or {}
            task = TASKS.get(data.get("task", next(iter(TASKS))))
            if isinstance(reducer, dict) and reducer.get("combine") is None and task:
                data = {**data, "reducer": {**reducer, "combine": task.default_combine}}
        return data

    @field_validator("task")
    @classmethod
    def _known_task(cls, value: str) -> str:
        get_task(value)
        return value

    @model_validator(mode="after")
    def _consistent(self) -> EnsembleConfig:
        names = [m.name for m in self.members]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate member name(s) {dupes}: give every member a unique name")
        get_task(self.task).check_config(self)
        if sum(m.weight for m in self.members) <= 0:
            raise ValueError("members[*].weight: at least one member needs a weight above 0")
        if self.input.text_pair_column == self.input.text_column:
            raise ValueError("input.text_pair_column must differ from input.text_column")
        task = get_task(self.task)
        if self.input.words_column and not task.takes_words:
            raise ValueError(
                f"input.words_column: pre-split words are for token_classification "
                f"ensembles, not {self.task}; remove the key"
            )
        if not task.takes_words:
            keyed = [
                f"members[{i}] ({m.name}).{key}"
                for i, m in enumerate(self.members)
                for key in ("aggregation", "stride")
                if getattr(m, key) is not None
            ]
            if keyed:
                raise ValueError(
                    f"{', '.join(keyed)}: only for token_classification ensembles; remove it"
                )
        quorum = self.serve.min_members
        if quorum is not None and quorum > len(self.members):
            raise ValueError(
                f"serve.min_members: {quorum}, but the ensemble has {len(self.members)} "
                f"members; use at most {len(self.members)}, or leave it out for all"
            )
        if quorum is not None and quorum < len(self.members):
            get_task(self.task).check_partial(
                self, "serve.min_members below the member count", any_member=True
            )
        if self.cascade is not None:
            self._check_cascade(names)
        return self

    def _check_cascade(self, names: list[str]) -> None:
        staged = [m for stage in self.cascade.stages for m in stage]  # type: ignore[union-attr]
        unknown = sorted(set(staged) - set(names))
        if unknown:
            raise ValueError(f"cascade.stages: {unknown} are not members; the members are {names}")
        twice = sorted({m for m in staged if staged.count(m) > 1})
        if twice:
            raise ValueError(
                f"cascade.stages: {twice} appear in more than one stage; list each once"
            )
        left = [m for m in names if m not in staged]
        if left:
            raise ValueError(
                f"cascade.stages: {left} are in no stage; every member runs in exactly one "
                "(put costly members in the last stage)"
            )
        get_task(self.task).check_partial(self, "cascade", any_member=False)

    def output_columns(self) -> list[str]:
        """The columns the scorer adds to each input row, in order."""
        return get_task(self.task).output_columns(self)


def is_uri(text: str | os.PathLike[str]) -> bool:
    """``scheme://...`` (object storage, ``file://``), not a local path or a hub id."""
    text = str(text)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and len(scheme) > 1 and scheme.replace("+", "").isalnum()


def _looks_like_path(model: str) -> bool:
    # A hub id is "name" or "org/name"; anything else is meant as a local path.
    return model.startswith((".", "/", "~")) or model.count("/") > 1 or "\\" in model


def local_path(path: str, base_dir: Path) -> Path:
    """``path`` as an absolute path, read relative to ``base_dir`` (the config's folder)."""
    return (base_dir / Path(path).expanduser()).resolve()


def resolve_model_path(model: str, base_dir: Path) -> str:
    """A local directory as an absolute path; a hub id unchanged."""
    candidate = local_path(model, base_dir)
    if candidate.is_dir():
        return str(candidate)
    if _looks_like_path(model):
        raise FileNotFoundError(str(candidate))
    return model


def _member_key_message(key: str, backend: str) -> str:
    """An unknown member key that some other backend takes says which one."""
    owners = [n for n in BACKENDS if n != backend and key in backend_kind(n).Options.model_fields]
    if owners:
        return (
            f"only for backend {' or '.join(owners)} (this member's backend is {backend}); "
            f"remove it or set backend: {owners[0]}"
        )
    return "unknown key; remove it or check its spelling (see the config reference in README.md)"


def format_validation_error(err: ValidationError, data: Any, source: str) -> str:
    lines = [f"{source}: invalid config"]
    items = err.errors()
    union_tags = ("int", "Replicas", "function-after[_ordered(), Replicas]")
    # `replicas` is a number or {min, max}: report only the branch the user wrote.
    items = [i for i in items if not ("int" in i["loc"] and isinstance(i["input"], dict))]
    for item in items:
        loc = ""
        node = data
        backend = None
        for depth, part in enumerate(item["loc"]):
            if isinstance(part, int):
                loc += f"[{part}]"
                if isinstance(node, list) and part < len(node) and isinstance(node[part], dict):
                    name = node[part].get("name")
                    if name:
                        loc += f" ({name})"
                    if depth == 1 and item["loc"][0] == "members":
                        backend = str(node[part].get("backend", DEFAULT_BACKEND))
            elif part in union_tags:
                continue  # union branch names say nothing to a user
            else:
                loc += f".{part}" if loc else str(part)
            node = (
                node.get(part)
                if isinstance(node, dict) and isinstance(part, str)
                else (
                    node[part]
                    if isinstance(node, list) and isinstance(part, int) and part < len(node)
                    else None
                )
            )
        msg = item["msg"].removeprefix("Value error, ")
        key = item["loc"][-1] if item["loc"] else None
        options = backend_kind(backend).Options.model_fields if backend in BACKENDS else {}
        if item["type"] == "extra_forbidden":
            msg = (
                _member_key_message(str(key), backend)
                if backend
                else "unknown key; remove it or check its spelling (see the config reference "
                "in README.md)"
            )
        elif item["type"] == "missing" and key in options:
            msg = f"backend {backend} needs it: {options[key].description or ''}"
        elif item["type"] == "literal_error":
            msg = f"{msg}, got {item.get('input')!r}"
        lines.append(f"  {loc or '(top level)'}: {msg}")
    return "\n".join(lines)


def load_config(path: str | os.PathLike[str], *, for_training: bool = False) -> EnsembleConfig:
    """Read and validate a YAML config; local model paths are resolved against its folder.

    Raises ConfigError with a message naming the key and the fix.
    """
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of keys at the top level")
    return config_from_dict(
        data, base_dir=path.resolve().parent, source=str(path), for_training=for_training
    )


def config_from_dict(
    data: dict[str, Any], *, base_dir: Path, source: str = "config", for_training: bool = False
) -> EnsembleConfig:
    """Validate ``data``; local paths are resolved against ``base_dir``.

    ``for_training``: a member with a ``train:`` block may lack its model directory (the
    trainer writes it).
    """
    try:
        cfg = EnsembleConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, data, source)) from None
    members = []
    for i, member in enumerate(cfg.members):
        try:
            if is_uri(member.model) and member.train is None:
                # Object storage: copied to each node's model cache where it is loaded.
                model = member.model
            elif member.train is not None:
                # The trainer writes here: always a local directory.
                if is_uri(member.model):
                    raise ConfigError(
                        f"{source}: members[{i}] ({member.name}).model: a member with a "
                        f"train: block writes its model there, so it must be a local folder, "
                        f"not {member.model}; train locally, upload the folder, and point "
                        "model: of a member without train: at it"
                    )
                model = str(local_path(member.model, base_dir))
                if not for_training and not Path(model).is_dir():
                    raise FileNotFoundError(model)
            elif not member.backend_module.local_files:
                model = resolve_model_path(member.model, base_dir)
            else:
                # No hub serves this backend's models: the path must be here.
                model = str(local_path(member.model, base_dir))
                if not Path(model).exists():
                    raise FileNotFoundError(model)
        except FileNotFoundError as exc:
            raise ConfigError(
                f"{source}: members[{i}] ({member.name}).model: "
                f"{'path' if member.backend_module.local_files else 'directory'} {exc} "
                "does not "
                "exist; fix the path (relative paths are read from the config file's "
                "folder), train the member first (`ray-ensemble train`), or give a hub id"
            ) from None
        update: dict[str, Any] = {"model": model}
        if member.tokenizer and not is_uri(member.tokenizer):
            try:
                update["tokenizer"] = resolve_model_path(member.tokenizer, base_dir)
            except FileNotFoundError as exc:
                raise ConfigError(
                    f"{source}: members[{i}] ({member.name}).tokenizer: directory {exc} does "
                    "not exist; fix the path (relative to the config file's folder)"
                ) from None
        if member.train is not None:
            base = member.train.base_model
            try:
                base = resolve_model_path(base, base_dir)
            except FileNotFoundError as exc:
                raise ConfigError(
                    f"{source}: members[{i}] ({member.name}).train.base_model: directory "
                    f"{exc} does not exist; fix the path (relative to the config file's folder)"
                ) from None
            update["train"] = member.train.model_copy(update={"base_model": base})
        members.append(member.model_copy(update=update))
    reducer = cfg.reducer
    if reducer.stacking:
        path = local_path(reducer.stacking, base_dir)
        if not path.is_file():
            raise ConfigError(
                f"{source}: reducer.stacking: file {path} does not exist; run "
                "`ray-ensemble fit CONFIG --combine stacking ...` to make it"
            )
        reducer = reducer.model_copy(update={"stacking": str(path)})
    return cfg.model_copy(update={"members": members, "reducer": reducer})
