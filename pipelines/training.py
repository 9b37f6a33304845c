"""Fine-tune members with Ray Train: `ray-ensemble train`.

Each member with a ``train:`` block becomes a sequence classifier over the ensemble's
labels, started from ``train.base_model``. Rows travel as a Ray Dataset sharded across
``TorchTrainer`` workers (CPU here, GPUs on a cluster); each epoch ends with a
checkpoint, and the last one is written as a Hugging Face directory at the member's
``model`` path, with ``id2label`` set to the ensemble's labels.
"""

from __future__ import annotations

import logging
import math
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actors.tasks import get_task
from pipelines.config import ConfigError, EnsembleConfig, MemberConfig
from pipelines.fitting import label_indices
from pipelines.io import InputError, list_input_files, peek_columns, read_column, require_column

logger = logging.getLogger(__name__)

__all__ = ["TrainSet", "read_train_set", "train_member", "train_members"]

LABEL_COLUMN = "__y"


@dataclass(frozen=True)
class TrainSet:
    texts: list[str]
    pairs: list[str] | None
    y: np.ndarray
    skipped: int
    # Token classification: per row, its pre-split words (else the texts are split) and
    # a label index per word.
    words: list[list[str]] | None = None
    tags: list[list[int]] | None = None

    @property
    def rows(self) -> int:
        return len(self.tags) if self.tags is not None else len(self.texts)


def read_train_set(cfg: EnsembleConfig, input_path: str | Path, label_column: str) -> TrainSet:
    """The labelled rows, checked before Ray starts: unknown labels are a usage error;
    rows with no label or no usable text are skipped (and counted)."""
    task = get_task(cfg.task)
    if not task.trainable:
        raise ConfigError(f"`ray-ensemble train` trains classifiers; this ensemble is {cfg.task}")
    files, fmt, _ = list_input_files(input_path)
    columns = peek_columns(files[0], fmt)
    if task.takes_words:
        return _read_tagged_set(cfg, files, fmt, columns, label_column)
    text, pair = cfg.input.text_column, cfg.input.text_pair_column
    for col, flag in ((text, "input.text_column"), (label_column, "--label-column")):
        require_column(files[0], fmt, columns, col, flag)
    texts = read_column(files, fmt, text)
    pairs = read_column(files, fmt, pair) if pair else None
    y = label_indices(read_column(files, fmt, label_column), cfg.labels, label_column)

    def usable(value: Any) -> bool:
        return isinstance(value, str) and bool(value.strip())

    keep = [
        i
        for i in range(len(texts))
        if y[i] >= 0 and usable(texts[i]) and (pairs is None or usable(pairs[i]))
    ]
    if not keep:
        raise InputError(f"--input: no row has both a text and a label in '{label_column}'")
    return TrainSet(
        [texts[i] for i in keep],
        [pairs[i] for i in keep] if pairs is not None else None,
        y[keep],
        len(texts) - len(keep),
    )


def _read_tagged_set(
    cfg: EnsembleConfig, files: list, fmt: str, columns: list[str], label_column: str
) -> TrainSet:
    """A tagger's rows: words (``input.words_column``, or the text to split) and, in
    ``label_column``, one tag per word. Rows whose tags are not as many as their words
    are skipped (and counted)."""
    from actors.tasks.token_classification import split_words
    from pipelines.io import word_list_error

    words_column = cfg.input.words_column
    source = words_column or cfg.input.text_column
    flag = "input.words_column" if words_column else "input.text_column"
    for col, why in ((source, flag), (label_column, "--label-column")):
        require_column(files[0], fmt, columns, col, why)
    values = read_column(files, fmt, source, as_text=not words_column)
    tag_lists = read_column(files, fmt, label_column, as_text=False)
    lookup = {t.lower(): i for i, t in enumerate(cfg.labels)}
    texts: list[str] = []
    words: list[list[str]] = []
    tags: list[list[int]] = []
    for i, (value, truth) in enumerate(zip(values, tag_lists, strict=True)):
        if not isinstance(truth, list):
            continue
        unknown = [t for t in truth if str(t).lower() not in lookup]
        if unknown:
            raise InputError(
                f"--label-column {label_column}: row {i} has tags {unknown[:3]} that are not "
                f"in the ensemble's labels {cfg.labels}; fix the data or the config's labels"
            )
        if words_column:
            if word_list_error(value, words_column) is not None:
                continue
            count = len(value)
        else:
            if not isinstance(value, str) or not value.strip():
                continue
            count = len(split_words(value)[0])
        if count != len(truth):
            continue
        (words.append(list(value)) if words_column else texts.append(value))
        tags.append([lookup[str(t).lower()] for t in truth])
    if not tags:
        raise InputError(
            f"--input: no row has words and as many tags in '{label_column}' (one per word of "
            f"{'input.words_column' if words_column else 'the split text'})"
        )
    return TrainSet(
        texts,
        None,
        np.zeros(0, dtype=np.int64),
        len(values) - len(tags),
        words=words if words_column else None,
        tags=tags,
    )


def _train_loop(config: dict) -> None:
    """Runs on every Ray Train worker."""
    import ray.train
    import ray.train.torch
    import torch
    import transformers
    from transformers import AutoTokenizer, get_linear_schedule_with_warmup

    from actors.tasks.token_classification import training_batch

    torch.manual_seed(config["seed"])
    torch.set_num_threads(config["threads"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    labels = config["labels"]
    extra = {}
    if config["classifier_dropout"] is not None:
        extra["classifier_dropout"] = config["classifier_dropout"]
    from transformers.utils import logging as hf_logging

    # Its load report would list the new head as missing weights, which it is meant to be.
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(config["base_model"])
    auto = getattr(transformers, config["model_class"])
    model = auto.from_pretrained(
        config["base_model"],
        num_labels=len(labels),
        id2label=dict(enumerate(labels)),
        label2id={label: i for i, label in enumerate(labels)},
        trust_remote_code=config["trust_remote_code"],
        # A base checkpoint with a head for other labels (a tagger of another tag set)
        # gets a new head for the ensemble's.
        ignore_mismatched_sizes=True,
        **extra,
    )
    if config["freeze_encoder"]:
        # The encoder stays; the pooler (if any) and the head learn.
        base = model.base_model
        for name, param in base.named_parameters():
            param.requires_grad = name.startswith("pooler")
    model = ray.train.torch.prepare_model(model)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(
        params, lr=config["learning_rate"], weight_decay=config["weight_decay"]
    )
    batch_size = config["batch_size"]
    steps_per_epoch = max(1, math.ceil(config["rows"] / world / batch_size))
    total_steps = max(1, math.ceil(config["epochs"] * steps_per_epoch))
    scheduler = get_linear_schedule_with_warmup(
        optimizer, int(config["warmup_ratio"] * total_steps), total_steps
    )
    # bfloat16 keeps float32's range, so no loss scaling is needed; weights and optimizer
    # state stay float32.
    autocast = torch.autocast(
        "cuda" if config["use_gpu"] else "cpu",
        dtype=torch.bfloat16,
        enabled=config["mixed_precision"] == "bf16",
    )
    shard = ray.train.get_dataset_shard("train")
    has_pair = config["has_pair"]
    tagging, given = config["tagging"], config["given_words"]
    step, epoch, started = 0, 0, time.perf_counter()
    report_every = max(1, total_steps // 10)
    model.train()
    while step < total_steps:
        losses = []
        for batch in shard.iter_batches(
            batch_size=batch_size,
            batch_format="numpy",
            local_shuffle_buffer_size=max(4 * batch_size, 256),
            local_shuffle_seed=config["seed"] + epoch,
        ):
            if tagging:
                # Each word's tag on its first sub-token, -100 (no loss) on the rest.
                rows = [list(w) for w in batch["words"]] if given else list(batch["text"])
                inputs, labels = training_batch(
                    tokenizer,
                    rows,
                    [list(y) for y in batch[LABEL_COLUMN]],
                    config["max_length"],
                    given=given,
                )
                enc = {k: torch.tensor(v) for k, v in inputs.items()}
                target = torch.tensor(labels, dtype=torch.long)
            else:
                enc = tokenizer(
                    list(batch["text"]),
                    list(batch["text_pair"]) if has_pair else None,
                    truncation=True,
                    max_length=config["max_length"],
                    padding=True,
                    return_tensors="pt",
                )
                target = torch.tensor(batch[LABEL_COLUMN], dtype=torch.long)
            with autocast:
                out = model(**enc, labels=target)
            out.loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
            step += 1
            if rank == 0 and (step % report_every == 0 or step == total_steps):
                # Not print(): Ray Train echoes printed lines a second time.
                sys.stderr.write(
                    f"  [{config['member']}] step {step}/{total_steps} "
                    f"loss {np.mean(losses[-report_every:]):.4f} "
                    f"({time.perf_counter() - started:.0f}s)\n"
                )
                sys.stderr.flush()
            if step >= total_steps:
                break
        epoch += 1
        metrics = {"epoch": epoch, "step": step, "loss": float(np.mean(losses)) if losses else 0.0}
        with tempfile.TemporaryDirectory() as tmp:
            checkpoint = None
            if rank == 0:
                unwrapped = model.module if hasattr(model, "module") else model
                unwrapped.save_pretrained(tmp, safe_serialization=True)
                tokenizer.save_pretrained(tmp)
                checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint)


def _worker_cpus(member: MemberConfig, cluster_cpus: float, workers: int) -> float:
    if member.train.cpus_per_worker is not None:
        return member.train.cpus_per_worker
    # Leave a little for Ray Data's feeding, like the scoring pipeline does.
    return max(0.5, round((cluster_cpus - 0.5) / workers, 2))


def train_member(
    cfg: EnsembleConfig, member: MemberConfig, data: TrainSet, workdir: str | Path
) -> dict:
    """Fine-tune one member and write it to ``member.model``. Ray must be running."""
    import pyarrow as pa
    import ray
    import ray.data
    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from pipelines.offline import job_data_context

    spec = member.train
    assert spec is not None
    rng = np.random.default_rng(spec.seed)
    index = np.arange(data.rows)
    if spec.max_examples is not None and spec.max_examples < len(index):
        index = np.sort(rng.choice(index, size=spec.max_examples, replace=False))
    if data.tags is not None:
        columns = {LABEL_COLUMN: pa.array([data.tags[i] for i in index], pa.list_(pa.int64()))}
        if data.words is not None:
            columns["words"] = pa.array([data.words[i] for i in index], pa.list_(pa.string()))
        else:
            columns["text"] = pa.array([data.texts[i] for i in index], pa.string())
    else:
        columns = {
            "text": pa.array([data.texts[i] for i in index], pa.string()),
            LABEL_COLUMN: pa.array(data.y[index], pa.int64()),
        }
    if data.pairs is not None:
        columns["text_pair"] = pa.array([data.pairs[i] for i in index], pa.string())
    cluster = ray.cluster_resources()
    use_gpu = spec.use_gpu
    if use_gpu is None:
        use_gpu = member.num_gpus > 0 and cluster.get("GPU", 0) > 0
    elif use_gpu and cluster.get("GPU", 0) <= 0:
        raise ConfigError(
            f"members ({member.name}).train.use_gpu: the cluster has no GPU; set use_gpu: false"
        )
    cpus = _worker_cpus(member, float(cluster.get("CPU", 1)), spec.num_workers)
    storage = Path(workdir).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    # A dataset keeps the Ray Data settings it was made under, in Ray Train's processes
    # too: no progress dumps or memory warnings for the workers' feed.
    with job_data_context():
        ds = ray.data.from_arrow(pa.table(columns))
    trainer = TorchTrainer(
        _train_loop,
        train_loop_config={
            "member": member.name,
            "base_model": spec.base_model,
            "labels": list(cfg.labels),
            "epochs": spec.epochs,
            "learning_rate": spec.learning_rate,
            "weight_decay": spec.weight_decay,
            "warmup_ratio": spec.warmup_ratio,
            "batch_size": spec.batch_size,
            "freeze_encoder": spec.freeze_encoder,
            "mixed_precision": spec.mixed_precision,
            "use_gpu": use_gpu,
            "classifier_dropout": spec.classifier_dropout,
            "seed": spec.seed,
            "max_length": member.max_length,
            "rows": len(index),
            "has_pair": data.pairs is not None,
            "tagging": data.tags is not None,
            "given_words": data.words is not None,
            "model_class": get_task(cfg.task).hf_model_class,
            "threads": max(1, math.ceil(cpus - 1e-9)),
            "trust_remote_code": member.trust_remote_code,
        },
        scaling_config=ScalingConfig(
            num_workers=spec.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cpus, **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=f"train-{member.name}-{int(time.time())}",
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=1),
        ),
        datasets={"train": ds},
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise RuntimeError(f"member {member.name}: training produced no checkpoint")
    target = Path(member.model)
    staging = target.with_name(target.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    with result.checkpoint.as_directory() as ckpt:
        shutil.copytree(ckpt, staging)
    # Swap in whole: a crash mid-write never leaves a half-written member.
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    return {
        "member": member.name,
        "rows": int(len(index)),
        "loss": float(result.metrics.get("loss", float("nan"))),
        "seconds": time.perf_counter() - started,
        "model": str(target),
    }


def train_members(
    cfg: EnsembleConfig,
    data: TrainSet,
    *,
    workdir: str | Path,
    only: list[str] | None = None,
    skip_existing: bool = False,
) -> list[dict]:
    """Train every member with a ``train:`` block (or those in ``only``)."""
    members = [m for m in cfg.members if m.train is not None]
    if only:
        unknown = sorted(set(only) - {m.name for m in members})
        if unknown:
            raise ConfigError(f"--member: {unknown} have no train: block in the config")
        members = [m for m in members if m.name in only]
    if not members:
        raise ConfigError(
            "no member has a train: block; add one (base_model, epochs, ...) to train it"
        )
    done = []
    for k, member in enumerate(members, 1):
        if skip_existing and (Path(member.model) / "config.json").exists():
            logger.info("train: %s already at %s; reusing it", member.name, member.model)
            continue
        logger.info(
            "train: member %d/%d '%s' from %s",
            k,
            len(members),
            member.name,
            member.train.base_model,
        )
        info = train_member(cfg, member, data, workdir)
        logger.info(
            "train: %s done in %.0fs (final loss %.4f) -> %s",
            member.name,
            info["seconds"],
            info["loss"],
            info["model"],
        )
        done.append(info)
    return done
