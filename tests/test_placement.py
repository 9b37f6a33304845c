"""GPU memory checks: estimates from the weight files, and clear refusals."""

from __future__ import annotations

import warnings

import pytest
from transformers import AutoModelForSequenceClassification

from pipelines.config import ConfigError, config_from_dict
from pipelines.offline import member_resources
from pipelines.placement import (
    CUDA_CONTEXT_BYTES,
    GIB,
    check_gpu_fit,
    cluster_gpus,
    estimate_gpu_need,
    weight_bytes,
)

LABELS = ["negative", "positive"]


def config(models, tmp_path, **member):
    return config_from_dict(
        {
            "name": "g",
            "labels": LABELS,
            "members": [{"name": "alpha", "model": str(models["alpha"]), **member}],
        },
        base_dir=tmp_path,
    )


def test_weight_bytes_count_the_parameters_in_the_dtype_they_run_with(models, tmp_path):
    params = sum(
        p.numel()
        for p in AutoModelForSequenceClassification.from_pretrained(models["alpha"]).parameters()
    )
    auto = config(models, tmp_path).members[0]
    assert weight_bytes(auto, on_gpu=True) == 2 * params  # half precision on a GPU
    assert weight_bytes(auto, on_gpu=False) == 4 * params  # stored as float32
    assert weight_bytes(config(models, tmp_path, dtype="float32").members[0]) == 4 * params
    need = estimate_gpu_need(config(models, tmp_path, num_gpus=0.25).members[0])
    assert need.weights == 2 * params and need.bytes > need.weights + CUDA_CONTEXT_BYTES - 1


def test_a_share_too_small_names_the_member_and_the_fix(models, tmp_path):
    cfg = config(models, tmp_path, num_gpus=0.25)
    need = estimate_gpu_need(cfg.members[0]).bytes / GIB
    assert check_gpu_fit(cfg, [24.0])[0].member == "alpha"  # a tiny model fits a quarter
    with pytest.raises(ConfigError) as err:
        check_gpu_fit(cfg, [need * 2])  # a quarter of a GPU twice its need is too small
    msg = str(err.value)
    assert "alpha" in msg and "num_gpus 0.25" in msg
    assert f"raise num_gpus to at least {need / (need * 2):.2f}" in msg
    with pytest.raises(ConfigError, match="use a smaller model"):
        check_gpu_fit(config(models, tmp_path, num_gpus=1), [need / 2])  # no GPU is enough


def test_no_gpus_means_no_check_and_cpu_placement(ray_cluster, models, tmp_path):
    cfg = config(models, tmp_path, num_gpus=0.5)
    assert cluster_gpus() == []  # this machine has none
    assert check_gpu_fit(cfg, []) == [estimate_gpu_need(cfg.members[0])]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        (res,) = member_resources(cfg, {"CPU": 2.0}, 2.0)
    assert res.num_gpus == 0 and res.num_cpus > 0
    assert any("running them on CPU" in str(w.message) for w in caught)
    (res,) = member_resources(cfg, {"CPU": 8.0, "GPU": 1.0}, 8.0)
    assert res.num_gpus == 0.5 and res.num_cpus == 1.0


def test_a_joined_cluster_without_gpus_yet_waits_for_them(models, tmp_path, capsys):
    cfg = config(models, tmp_path, num_gpus=0.5)
    (res,) = member_resources(cfg, {"CPU": 2.0}, 2.0, cpu_fallback=False)
    assert res.num_gpus == 0.5  # the autoscaler adds GPU nodes for this request
    assert "waiting for the autoscaler" in capsys.readouterr().err
