"""The member host (and the ensemble host around one member) on its own, without Ray."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from actors.host import (
    CPU_BATCH_TOKENS,
    EnsembleHost,
    MemberHost,
    member_output_column,
    micro_batches,
)
from jobs.example import make_texts
from pipelines.config import config_from_dict
from pipelines.plan import EnsemblePlan, describe_member, plan_ensemble
from tests.oracle import plain_embeddings, plain_logits


def make_host(
    models,
    model: str,
    tmp_path,
    *,
    labels=("negative", "positive"),
    task="classification",
    **member_kw,
):
    cfg = config_from_dict(
        {
            "name": "t",
            "task": task,
            "labels": list(labels) if labels else None,
            "members": [{"name": model, "model": str(models[model]), **member_kw}],
        },
        base_dir=tmp_path,
    )
    # The member alone: ensemble-level checks (every label has a voter) are not its concern.
    spec = describe_member(cfg.members[0], cfg)
    return MemberHost(member=cfg.members[0], spec=spec, plan=EnsemblePlan(cfg, (spec,)), threads=1)


def batch_of(texts, errors=None) -> pa.Table:
    return pa.table(
        {
            "text": pa.array(texts, pa.string()),
            "error": pa.array(errors or [None] * len(texts), pa.string()),
        }
    )


def binary_plan(tmp_path, members: list[dict]):
    """The plan of a negative/positive ensemble of ``members``."""
    return plan_ensemble(
        config_from_dict(
            {"name": "t", "labels": ["negative", "positive"], "members": members},
            base_dir=tmp_path,
        )
    )


def ensemble_host(models, model: str, tmp_path, **member_kw) -> EnsembleHost:
    plan = binary_plan(tmp_path, [{"name": model, "model": str(models[model]), **member_kw}])
    return EnsembleHost(plan=plan, reduce=False, threads=1)


def test_host_matches_plain_transformers_and_skips_bad_rows(models, tmp_path):
    host = ensemble_host(models, "beta", tmp_path, batch_size=4, max_length=16)
    texts = make_texts(11, seed=3)
    errors = [None] * 11
    errors[4] = "'text' is empty"
    out = host(batch_of(texts, errors))
    column = member_output_column("beta")
    assert out.column_names == ["text", "error", column]
    got = np.array(out.column(column).to_pylist(), dtype=float)
    assert np.isnan(got[4]).all()
    ok = [i for i in range(11) if i != 4]
    # beta's labels are (POSITIVE, NEGATIVE): canonical order flips them
    expected = plain_logits(models["beta"], [texts[i] for i in ok], max_length=16)[:, ::-1]
    np.testing.assert_allclose(got[ok], expected, atol=1e-5)


def test_batched_equals_single(models, tmp_path):
    host = make_host(models, "alpha", tmp_path, batch_size=8)
    texts = make_texts(30, seed=9)
    batched = host.infer(texts)
    single = np.concatenate([host.infer([t]) for t in texts])
    np.testing.assert_allclose(batched, single, atol=1e-5)


@pytest.mark.parametrize("max_rows,max_tokens", [(8, None), (64, 200), (5, 40), (300, 1)])
def test_micro_batches_cover_every_row_once_within_both_caps(max_rows, max_tokens):
    lengths = np.random.default_rng(max_rows).integers(1, 120, size=257)
    batches = micro_batches(lengths, max_rows, max_tokens)
    rows = np.concatenate(batches)
    assert sorted(rows.tolist()) == list(range(257))
    # in length order, so each batch's rows are alike
    assert (np.diff(lengths[rows]) >= 0).all()
    for batch in batches:
        assert 1 <= len(batch) <= max_rows
        if max_tokens is not None and len(batch) > 1:
            assert len(batch) * lengths[batch].max() <= max_tokens
    if max_tokens is not None:
        # greedy: adding the next row to a batch would have broken a cap
        for batch, following in zip(batches, batches[1:], strict=False):
            grown = len(batch) + 1
            assert grown > max_rows or grown * lengths[following[0]] > max_tokens


def test_token_budget_cuts_forward_passes_and_keeps_values(models, tmp_path):
    host = make_host(models, "alpha", tmp_path, batch_size=64, max_batch_tokens=96)
    assert make_host(models, "alpha", tmp_path).max_batch_tokens == CPU_BATCH_TOKENS
    shapes = []
    forward = host.backend.forward

    def recording(inputs):
        shapes.append(inputs["input_ids"].shape)
        return forward(inputs)

    host.backend.forward = recording
    texts = make_texts(40, seed=5, max_words=40)
    got = host.infer(texts)
    np.testing.assert_allclose(got, plain_logits(models["alpha"], texts), atol=1e-5)
    assert sum(rows for rows, _ in shapes) == 40
    assert all(rows * width <= 96 or rows == 1 for rows, width in shapes)
    # short rows still share passes: the budget cuts batches, it does not make them single
    assert len(shapes) < 40


def test_micro_batches_side_by_side_on_threads_keep_values_and_order(models, tmp_path):
    import torch

    plan = binary_plan(
        tmp_path,
        [
            {"name": "alpha", "model": str(models["alpha"]), "max_batch_tokens": 64},
            {"name": "beta", "model": str(models["beta"]), "batch_size": 3},
        ],
    )
    before = torch.get_num_threads()
    try:
        host = EnsembleHost(plan=plan, reduce=False, threads=2, batch_threads=True)
        assert all(m.pool is not None for m in host.members)
        assert torch.get_num_threads() == 1
        texts = make_texts(45, seed=11, max_words=30)
        alpha, beta = host.infer(texts)
    finally:
        torch.set_num_threads(before)
    np.testing.assert_allclose(alpha, plain_logits(models["alpha"], texts), atol=1e-5)
    np.testing.assert_allclose(beta, plain_logits(models["beta"], texts)[:, ::-1], atol=1e-5)


def test_length_sorting_keeps_padding_small(models, tmp_path):
    host = make_host(models, "alpha", tmp_path, batch_size=8)
    host.infer(make_texts(256, seed=1))
    assert host.padding_efficiency > 0.8


def test_truncation_to_max_length(models, tmp_path):
    host = make_host(models, "alpha", tmp_path, max_length=5)
    long_text = " ".join(["good"] * 200)
    got = host.infer([long_text])
    np.testing.assert_allclose(
        got, plain_logits(models["alpha"], [long_text], max_length=5), atol=1e-5
    )
    assert host.real_tokens == 5


def test_missing_canonical_label_is_nan(models, tmp_path):
    host = make_host(models, "alpha", tmp_path, labels=("negative", "neutral", "positive"))
    got = host.infer(["good film"])
    assert np.isnan(got[0, 1]) and np.isfinite(got[0, [0, 2]]).all()


def test_single_logit_head(models, tmp_path):
    host = make_host(models, "single", tmp_path)
    got = host.infer(["bad film"])
    z = plain_logits(models["single"], ["bad film"])[0, 0]
    np.testing.assert_allclose(got[0], [0.0, z], atol=1e-5)


def test_embedding_host_mean_pools(models, tmp_path):
    host = make_host(models, "encoder", tmp_path, labels=None, task="embedding")
    texts = make_texts(5, seed=2)
    np.testing.assert_allclose(
        host.infer(texts), plain_embeddings(models["encoder"], texts), atol=1e-5
    )


def test_all_rows_bad_gives_an_empty_forward(models, tmp_path):
    host = ensemble_host(models, "alpha", tmp_path)
    out = host(batch_of([None, ""], ["'text' is null", "'text' is empty"]))
    column = out.column(member_output_column("alpha")).to_pylist()
    assert np.isnan(np.array(column, dtype=float)).all()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_dtype_is_applied(models, tmp_path, dtype):
    import torch

    host = make_host(models, "alpha", tmp_path, dtype=dtype)
    assert next(host.backend.model.parameters()).dtype == getattr(torch, dtype)
    assert np.isfinite(host.infer(["good"])).all()


def test_ensemble_host_tokenises_once_per_tokenizer(models, tmp_path):
    plan = binary_plan(
        tmp_path,
        [
            {"name": "alpha", "model": str(models["alpha"]), "batch_size": 8},
            {"name": "beta", "model": str(models["beta"])},
            {
                "name": "gamma",
                "model": str(models["gamma"]),
                "label_map": {"LABEL_0": "negative", "LABEL_1": "positive"},
            },
        ],
    )
    host = EnsembleHost(plan=plan, reduce=False)
    # alpha and gamma are BERTs with one tokenizer (in two folders); beta, a DistilBERT,
    # takes no token_type_ids: two tokenizer calls per window, not three.
    assert sorted(host.groups.values()) == [[0, 2], [1]]
    texts = make_texts(50, seed=4, max_words=40)
    got = host.infer(texts)
    for member, values in zip(host.members, got, strict=True):
        np.testing.assert_allclose(values, member.infer(texts), atol=1e-6)
    expected = plain_logits(models["beta"], texts)[:, ::-1]
    np.testing.assert_allclose(got[1], expected, atol=1e-5, rtol=1e-4)
