"""The host built for fast devices, checked on CPU: tokenising through the Rust core,
windows side by side, the out-of-memory back-off, the dtype rule and the GPU keys."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch

from actors.backends.base import TokenEncoder, native_bfloat16, resolve_dtype
from actors.host import EnsembleHost, member_output_column
from jobs.example import make_texts
from pipelines.config import ConfigError, config_from_dict
from pipelines.placement import check_gpu_fit
from pipelines.plan import plan_ensemble
from tests.oracle import plain_logits
from tests.test_member import batch_of, binary_plan


def test_the_tokenizer_core_gives_the_wrappers_ids_for_texts_and_pairs(models):
    from transformers import AutoTokenizer

    for name, keys in (
        ("alpha", ["input_ids", "attention_mask", "token_type_ids"]),
        ("beta", ["input_ids", "attention_mask"]),  # DistilBERT: no type ids
    ):
        tok = AutoTokenizer.from_pretrained(str(models[name]))
        encoder = TokenEncoder(tok, 12, keys)
        assert encoder._core is not None, name
        texts = make_texts(40, seed=7, max_words=30) + ["", "naïve café ÜBER 123 !!"]
        pairs = list(reversed(texts))
        single = tok(texts, truncation=True, max_length=12)
        paired = tok(texts, pairs, truncation=True, max_length=12)
        for got, want in (
            (encoder.encode(texts, None), single),
            (encoder.encode(texts, pairs), paired),
        ):
            assert got["input_ids"] == want["input_ids"]
            assert max(len(ids) for ids in got["input_ids"]) == 12
        # Type ids as the wrapper gives them for pairs; single texts' are all 0, the
        # models' default, and are left out.
        assert encoder.encode(texts, pairs).get("token_type_ids") == paired.get("token_type_ids")
        assert not any(any(t) for t in single.get("token_type_ids", []))


def test_a_slow_tokenizer_goes_through_the_wrapper(models):
    from transformers import AutoTokenizer

    class Slow:  # what the encoder sees of a tokenizer with no Rust core
        def __init__(self, tok):
            self.tok = tok
            self.pad_token_id = tok.pad_token_id

        def __call__(self, *args, **kwargs):
            return self.tok(*args, **kwargs)

    tok = AutoTokenizer.from_pretrained(str(models["alpha"]))
    encoder = TokenEncoder(Slow(tok), 16, ["input_ids", "attention_mask"])
    assert encoder._core is None
    texts = make_texts(10, seed=2)
    assert (
        encoder.encode(texts, None)["input_ids"]
        == tok(texts, truncation=True, max_length=16)["input_ids"]
    )


def test_windows_side_by_side_equal_windows_one_at_a_time(models, tmp_path):
    """Offline, a host runs two windows at once on threads of its actor."""
    plan = binary_plan(
        tmp_path,
        [
            {"name": "alpha", "model": str(models["alpha"]), "batch_size": 4},
            {"name": "beta", "model": str(models["beta"]), "batch_size": 8},
        ],
    )
    host = EnsembleHost(plan=plan, threads=2, batch_threads=True)
    windows = [batch_of(make_texts(37, seed=s, max_words=60)) for s in range(6)]
    alone = [host(w) for w in windows]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(host, windows))
    for a, b in zip(alone, together, strict=True):
        np.testing.assert_allclose(
            np.array(a.column("probs").to_pylist()),
            np.array(b.column("probs").to_pylist()),
            atol=1e-6,
        )
        assert a.column("label").to_pylist() == b.column("label").to_pylist()


class SmallDevice:
    """A backend over a real model whose device holds at most ``budget`` padded tokens
    per pass: above it, the pass raises CUDA's out-of-memory error, as a GPU does."""

    def __init__(self, inner, budget: int) -> None:
        self.inner = inner
        self.budget = budget
        self.pad_token_id = inner.pad_token_id
        self.tokenizer_key = inner.tokenizer_key
        self.passes: list[int] = []
        self.lock = threading.Lock()

    def encode(self, texts, pairs):
        return self.inner.encode(texts, pairs)

    def forward(self, inputs):
        tokens = int(inputs["input_ids"].size)
        with self.lock:
            self.passes.append(tokens)
        if tokens > self.budget:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.inner.forward(inputs)


def test_out_of_memory_halves_the_pass_and_a_row_too_long_is_an_error_row(models, tmp_path):
    from actors.host import make_backend

    plan = binary_plan(
        tmp_path,
        [{"name": "alpha", "model": str(models["alpha"]), "batch_size": 16, "max_length": 64}],
    )
    inner = make_backend(plan.config.members[0], plan.task, "cpu")
    device = SmallDevice(inner, budget=40)
    host = EnsembleHost(plan=plan, reduce=False, threads=1, backends={"alpha": device})
    texts = make_texts(30, seed=11, max_words=12)
    texts[7] = " ".join(["word"] * 80)  # 64 tokens after truncation: never fits in 40
    tokens = inner.encode([texts[7]], None)["input_ids"][0]
    out = host(batch_of(texts))
    errors = out.column("error").to_pylist()
    assert errors[7] == f"too long for this GPU: {len(tokens)} tokens"
    assert [i for i, e in enumerate(errors) if e] == [7]
    got = np.array(out.column(member_output_column("alpha")).to_pylist(), dtype=float)
    assert np.isnan(got[7]).all()
    ok = [i for i in range(30) if i != 7]
    want = plain_logits(models["alpha"], [texts[i] for i in ok], max_length=64)
    np.testing.assert_allclose(got[ok], want, atol=1e-4)
    # Every pass that ran fit the device; later windows start under the size that failed.
    assert host.members[0].max_batch_tokens <= 40
    device.passes.clear()
    host(batch_of(texts[:7] + texts[8:]))
    assert max(device.passes) <= 40


def test_a_text_too_long_online_is_the_requests_error(models, tmp_path):
    from actors.host import UnscorableText, make_backend

    plan = binary_plan(tmp_path, [{"name": "alpha", "model": str(models["alpha"])}])
    inner = make_backend(plan.config.members[0], plan.task, "cpu")
    host = EnsembleHost(
        plan=plan, reduce=False, threads=1, backends={"alpha": SmallDevice(inner, budget=8)}
    )
    with pytest.raises(UnscorableText, match=r"text 1: too long for this GPU: \d+ tokens"):
        host.infer(["ok", "a rather longer text than the device holds at all"])


def test_dtype_auto_on_cpu_follows_the_cpus_bfloat16(monkeypatch):
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    native = " avx512_bf16" in flags or " amx_bf16" in flags
    monkeypatch.delenv("RAY_ENSEMBLE_CPU_BFLOAT16", raising=False)
    assert native_bfloat16() is native
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if native else torch.float32)
    monkeypatch.setenv("RAY_ENSEMBLE_CPU_BFLOAT16", "0")
    assert resolve_dtype("auto", "cpu") == torch.float32
    monkeypatch.setenv("RAY_ENSEMBLE_CPU_BFLOAT16", "1")
    assert resolve_dtype("auto", "cpu") == torch.bfloat16
    assert resolve_dtype("float16", "cpu") == torch.float16


def gpu_config(tmp_path, models, **member_kw):
    return config_from_dict(
        {
            "name": "g",
            "labels": ["negative", "positive"],
            "members": [{"name": "alpha", "model": str(models["alpha"]), **member_kw}],
        },
        base_dir=tmp_path,
    )


def test_num_gpus_above_one_must_be_whole(models, tmp_path):
    with pytest.raises(ConfigError, match=r"1.5 GPUs: above 1, num_gpus must be a whole number"):
        gpu_config(tmp_path, models, num_gpus=1.5)
    assert gpu_config(tmp_path, models, num_gpus=2).members[0].num_gpus == 2


def test_the_fit_check_counts_every_gpu_of_a_spread_member(models, tmp_path):
    from pipelines.placement import estimate_gpu_need

    need = estimate_gpu_need(gpu_config(tmp_path, models, num_gpus=1).members[0])
    gib = need.bytes / 2**30
    # Between one and two GPUs' worth: one GPU is too small, two are enough.
    size = gib * 0.7
    with pytest.raises(ConfigError, match="raise num_gpus to 2"):
        check_gpu_fit(gpu_config(tmp_path, models, num_gpus=1), [size])
    check_gpu_fit(gpu_config(tmp_path, models, num_gpus=2), [size])


def test_attn_implementation_reaches_transformers_and_compile_is_off_on_cpu(models, tmp_path):
    plan = plan_ensemble(gpu_config(tmp_path, models, attn_implementation="eager", compile=True))
    host = EnsembleHost(plan=plan, threads=1)
    backend = host.members[0].backend
    assert backend.model.config._attn_implementation == "eager"
    assert backend._run is backend.model  # compile applies on a GPU only
    texts = make_texts(5, seed=1)
    got = np.array(host(batch_of(texts)).column("probs").to_pylist())
    z = plain_logits(models["alpha"], texts)
    want = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(got, want, atol=1e-5)
    with pytest.raises(ConfigError, match="attn_implementation"):
        gpu_config(tmp_path, models, attn_implementation="")


def test_windows_in_flight_on_a_real_job(ray_cluster, models, tmp_path):
    """Two windows per host at once, through Ray Data: every row once, in input order."""
    import pyarrow.parquet as pq

    from pipelines import offline
    from pipelines.output import read_output

    assert offline.WINDOWS_IN_FLIGHT == 2
    texts = make_texts(700, seed=5, max_words=20)
    pq.write_table(
        pa.table({"id": [f"r{i}" for i in range(700)], "text": texts}), tmp_path / "in.parquet"
    )
    plan = binary_plan(
        tmp_path, [{"name": "alpha", "model": str(models["alpha"]), "batch_size": 2}]
    )
    summary = offline.score(plan, tmp_path / "in.parquet", tmp_path / "out")
    assert summary.rows == summary.scored == 700
    table = read_output(tmp_path / "out")
    assert table.column("id").to_pylist() == [f"r{i}" for i in range(700)]
    z = plain_logits(models["alpha"], texts[:50])
    want = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(np.array(table.column("probs").to_pylist()[:50]), want, atol=1e-5)
