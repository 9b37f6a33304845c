"""On a CUDA GPU: members equal their CPU selves, out-of-memory backs off, members share a
GPU, a member spans two GPUs, and ``dtype: auto`` picks the GPU's half precision.

Every test is marked ``gpu`` and skipped without CUDA, so CI (no GPU) is unchanged;
``bash bench/gpu_check.sh`` runs them on a GPU node (``pytest -m gpu``). The models are
tiny BERTs built here from a config with random weights: no hub, no network.

Tolerances: half precision against the float32 CPU member, on probabilities, to 1e-2.
Measured on CPU with the same models (initializer_range 0.2, hidden 32, 2 layers), the
largest difference over 200 rows was 0.0005 in float16 and 0.0045 in bfloat16; the
models' probabilities spread enough (std > 0.02) that 1e-2 still tells rows apart.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.backends.base import resolve_dtype
from actors.host import EnsembleHost
from jobs.example import build_classifier, build_tokenizer, make_texts
from pipelines.config import config_from_dict
from pipelines.plan import plan_ensemble

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

LABELS = ["negative", "positive"]
TOLERANCE = 1e-2


def plan_of(tmp_path: Path, members: list[dict]):
    return plan_ensemble(
        config_from_dict({"name": "gpu", "labels": LABELS, "members": members}, base_dir=tmp_path)
    )


def batch_of(texts: list[str]) -> pa.Table:
    """The input columns plus ``error`` (null: score the row), as the reader hands them."""
    return pa.table(
        {"text": pa.array(texts, pa.string()), "error": pa.nulls(len(texts), pa.string())}
    )


def probs(table: pa.Table, column: str = "probs") -> np.ndarray:
    return np.array(table.column(column).to_pylist(), dtype=np.float64)


def model_devices(host: EnsembleHost) -> set[torch.device]:
    return {p.device for p in host.members[0].backend.model.parameters()}


def free_cuda() -> None:
    """Hosts of earlier tests hold GPU memory until collected."""
    gc.collect()
    torch.cuda.empty_cache()


@pytest.fixture(scope="module")
def small_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("gpu-models")
    return {
        "alpha": build_classifier(
            root / "alpha",
            id2label={0: "negative", 1: "positive"},
            seed=1,
            initializer_range=0.2,
        ),
        # reversed label order: alignment runs on the GPU path too
        "beta": build_classifier(
            root / "beta",
            id2label={0: "POSITIVE", 1: "NEGATIVE"},
            seed=2,
            initializer_range=0.2,
        ),
    }


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_member_on_cuda_equals_the_cpu_member(small_models, tmp_path, dtype):
    if dtype == "bfloat16" and not torch.cuda.is_bf16_supported(including_emulation=False):
        pytest.skip("this GPU has no native bfloat16")
    model = str(small_models["alpha"])
    texts = make_texts(96, seed=5, max_words=60)
    cpu = EnsembleHost(
        plan=plan_of(tmp_path, [{"name": "alpha", "model": model, "dtype": "float32"}]),
        num_gpus=0,
        threads=1,
    )
    gpu = EnsembleHost(
        plan=plan_of(tmp_path, [{"name": "alpha", "model": model, "dtype": dtype, "num_gpus": 1}]),
        num_gpus=1,
    )
    assert {d.type for d in model_devices(cpu)} == {"cpu"}
    assert {d.type for d in model_devices(gpu)} == {"cuda"}
    assert next(gpu.members[0].backend.model.parameters()).dtype == getattr(torch, dtype)
    expected, got = probs(cpu(batch_of(texts))), probs(gpu(batch_of(texts)))
    assert expected[:, 0].std() > 0.02, "the model's outputs barely vary: the check is void"
    np.testing.assert_allclose(got, expected, atol=TOLERANCE)
    del cpu, gpu
    free_cuda()


def wide_bert(folder: Path, *, intermediate: int, max_positions: int) -> Path:
    """A one-layer BERT whose feed-forward width makes activation memory grow with the
    row: about 4 x tokens x ``intermediate`` bytes in float16, whatever the attention
    kernel (an attention-heavy model would not OOM under memory-efficient SDPA)."""
    from transformers import BertConfig, BertForSequenceClassification

    tokenizer = build_tokenizer(folder)
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        num_labels=2,
        id2label=dict(enumerate(LABELS)),
        label2id={v: i for i, v in enumerate(LABELS)},
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(7)
    BertForSequenceClassification(config).eval().save_pretrained(folder)
    return folder


def test_out_of_memory_halves_the_batch_and_a_row_that_never_fits_is_an_error_row(tmp_path):
    """Under a memory cap that holds the model, short and medium rows, but not one
    8,000-token row even alone: the job does not fail; the long row becomes an error
    row naming its token count, every other row is scored as without the cap."""
    intermediate = 32_768
    model = wide_bert(tmp_path / "wide", intermediate=intermediate, max_positions=8192)
    plan = plan_of(
        tmp_path,
        [
            {
                "name": "wide",
                "model": str(model),
                "dtype": "float16",
                "num_gpus": 1,
                "max_length": 8192,
                # One pass holds every row at first: the memory cap must make it back off.
                "batch_size": 16,
                "max_batch_tokens": 1_000_000,
            }
        ],
    )
    short = make_texts(6, seed=1, min_words=3, max_words=12)
    medium = [" ".join(["good", "film"] * 150) for _ in range(6)]  # ~300 tokens each
    long_text = " ".join(["good"] * 8000)
    texts = short[:3] + medium[:3] + [long_text] + medium[3:] + short[3:]
    long_row = texts.index(long_text)
    others = [i for i in range(len(texts)) if i != long_row]

    host = EnsembleHost(plan=plan, num_gpus=1)
    assert {d.type for d in model_devices(host)} == {"cuda"}
    tokens = len(host.members[0].encode([long_text], None)["input_ids"][0])
    assert tokens > 8000
    # The reference: the other rows, without a cap (every one fits on any GPU).
    reference = probs(host(batch_of([texts[i] for i in others])))

    # On CUDA the host calls forward_on_device (outputs stay there until the window ends).
    member = host.members[0]
    name = "forward_on_device" if member.on_device else "forward"
    forward = getattr(member.backend, name)
    calls: list[tuple[int, int]] = []

    def recording(inputs):
        calls.append(tuple(inputs["input_ids"].shape))
        return forward(inputs)

    setattr(member.backend, name, recording)
    free_cuda()
    total = torch.cuda.get_device_properties(0).total_memory
    # What the process holds now (weights, cuBLAS workspace) plus 256 MiB: one medium row
    # needs ~40 MB of activations, the long row ~1 GB, and its first FFN output alone 0.5 GB.
    cap = torch.cuda.memory_reserved() + 256 * 2**20
    assert 4 * tokens * intermediate > 3 * 256 * 2**20
    torch.cuda.set_per_process_memory_fraction(cap / total)
    try:
        out = host(batch_of(texts))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        delattr(member.backend, name)  # the class's method again
        free_cuda()

    errors = out.column("error").to_pylist()
    assert errors[long_row] is not None
    assert errors[long_row].startswith(f"too long for this GPU: {tokens} tokens"), errors[long_row]
    assert [errors[i] for i in others] == [None] * len(others)
    got = probs(out.take(pa.array(others)))
    np.testing.assert_allclose(got, reference, atol=TOLERANCE)
    # It backed off down to the long row alone before giving up on it.
    assert (1, tokens) in calls, calls
    assert calls[0] == (len(texts), tokens), "the first pass should hold every row"


@pytest.fixture
def gpu_ray(no_ray):
    """A local Ray with one GPU (the session's Ray, if any, is stopped meanwhile)."""
    import ray

    ray.init(
        address="local",
        # Two GPU members ask for a CPU each; the read and write tasks need the rest.
        num_cpus=4,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
    )
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def test_two_members_share_one_gpu_in_a_score_job(gpu_ray, small_models, tmp_path):
    from pipelines.offline import score
    from pipelines.output import read_output
    from pipelines.plan import hosts_on_cluster

    texts = make_texts(500, seed=8, max_words=60)
    ids = [f"r{i}" for i in range(len(texts))]
    data = tmp_path / "in.jsonl"
    data.write_text(
        "".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in zip(ids, texts, strict=True))
    )

    def members(num_gpus: float) -> list[dict]:
        # float16 on the GPU: this test is about sharing and exactly-once; precision is
        # test_member_on_cuda_equals_the_cpu_member's.
        dtype = "float16" if num_gpus else "float32"
        return [
            {"name": n, "model": str(small_models[n]), "num_gpus": num_gpus, "dtype": dtype}
            for n in ("alpha", "beta")
        ]

    on_gpu = plan_of(tmp_path, members(0.5))
    hosts = hosts_on_cluster(on_gpu.config, cpu_fallback=False)
    assert [(h.members, h.num_gpus) for h in hosts] == [(("alpha", "beta"), 1.0)]
    summary = score(on_gpu, data, tmp_path / "gpu", cpu_fallback=False)
    assert summary.rows == summary.scored == len(texts)
    gpu = read_output(tmp_path / "gpu")

    cpu_summary = score(plan_of(tmp_path, members(0)), data, tmp_path / "cpu")
    assert cpu_summary.rows == cpu_summary.scored == len(texts)
    cpu = read_output(tmp_path / "cpu")

    assert gpu.column("id").to_pylist() == ids  # every row once, in input order
    assert gpu.column("error").null_count == len(texts)
    for column in ("probs", "probs__alpha", "probs__beta"):
        np.testing.assert_allclose(probs(gpu, column), probs(cpu, column), atol=TOLERANCE)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two visible GPUs")
def test_a_member_with_two_gpus_spans_both(tmp_path):
    # Six layers, so a device map has layers to put on each GPU.
    model = str(
        build_classifier(
            tmp_path / "deep",
            id2label={0: "negative", 1: "positive"},
            seed=3,
            hidden=64,
            layers=6,
            initializer_range=0.15,
        )
    )
    texts = make_texts(64, seed=6, max_words=60)
    cpu = EnsembleHost(
        plan=plan_of(tmp_path, [{"name": "deep", "model": model, "dtype": "float32"}]),
        num_gpus=0,
        threads=1,
    )
    two = EnsembleHost(
        plan=plan_of(
            tmp_path, [{"name": "deep", "model": model, "dtype": "float16", "num_gpus": 2}]
        ),
        num_gpus=2,
    )
    devices = model_devices(two)
    assert {d.type for d in devices} == {"cuda"}
    assert {d.index for d in devices} == {0, 1}, f"the model's weights are on {devices}"
    np.testing.assert_allclose(
        probs(two(batch_of(texts))), probs(cpu(batch_of(texts))), atol=TOLERANCE
    )
    del cpu, two
    free_cuda()


def test_dtype_auto_is_bfloat16_from_ampere_and_float16_before():
    major, minor = torch.cuda.get_device_capability()
    expected = torch.bfloat16 if (major, minor) >= (8, 0) else torch.float16
    assert resolve_dtype("auto", "cuda") == expected
