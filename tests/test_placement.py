"""GPU memory checks: estimates from the weight files, and clear refusals."""

from __future__ import annotations

import pytest
from transformers import AutoModelForSequenceClassification

from pipelines.config import ConfigError, config_from_dict
from pipelines.placement import (
    CUDA_CONTEXT_BYTES,
    GIB,
    check_gpu_fit,
    cluster_gpus,
    estimate_gpu_need,
    weight_bytes,
)
from pipelines.plan import plan_hosts

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


def test_no_gpus_means_no_check_and_cpu_placement(ray_cluster, models, tmp_path, caplog):
    cfg = config(models, tmp_path, num_gpus=0.5)
    assert cluster_gpus() == []  # this machine has none
    assert check_gpu_fit(cfg, []) == [estimate_gpu_need(cfg.members[0])]
    (res,) = plan_hosts(cfg, {"CPU": 2.0}, 2.0, cpu_fallback=True)
    assert res.num_gpus == 0 and res.num_cpus > 0
    assert "running them on CPU" in caplog.text
    (res,) = plan_hosts(cfg, {"CPU": 8.0, "GPU": 1.0}, 8.0, cpu_fallback=True)
    assert res.num_gpus == 0.5 and res.num_cpus == 1.0


def test_a_joined_cluster_without_gpus_yet_waits_for_them(models, tmp_path, caplog):
    cfg = config(models, tmp_path, num_gpus=0.5)
    (res,) = plan_hosts(cfg, {"CPU": 2.0}, 2.0, cpu_fallback=False)
    assert res.num_gpus == 0.5  # the autoscaler adds GPU nodes for this request
    assert "waiting for the autoscaler" in caplog.text


def ensemble(models, tmp_path, *members):
    return config_from_dict(
        {
            "name": "g",
            "labels": LABELS,
            "members": [
                {"name": f"m{i}", "model": str(models["alpha"]), **m} for i, m in enumerate(members)
            ],
        },
        base_dir=tmp_path,
    )


def test_members_on_one_device_share_a_host(models, tmp_path):
    cpu = ensemble(models, tmp_path, {}, {}, {"replicas": {"min": 1, "max": 3}})
    (host,) = plan_hosts(cpu, {"CPU": 8.0}, 8.0, cpu_fallback=True)
    assert host.members == ("m0", "m1", "m2") and host.num_gpus == 0
    assert (host.min_replicas, host.max_replicas) == (1, 3)
    # 8 CPUs less the light stages' reserve, over the host's 3 replicas at most.
    assert host.num_cpus == pytest.approx((8.0 - 0.5) / 3, abs=0.01) and host.threads == 3
    gpus = {"CPU": 16.0, "GPU": 4.0}
    shares = ensemble(models, tmp_path, {"num_gpus": 0.5}, {"num_gpus": 0.25}, {"num_gpus": 0.5})
    hosts = plan_hosts(shares, gpus, 16.0, cpu_fallback=False)
    assert [(h.members, h.num_gpus) for h in hosts] == [(("m0", "m1"), 0.75), (("m2",), 0.5)]
    own = ensemble(models, tmp_path, {"num_gpus": 1}, {"num_gpus": 0.5}, {}, {"own_host": True})
    hosts = plan_hosts(own, gpus, 16.0, cpu_fallback=False)
    assert [h.members for h in hosts] == [("m0",), ("m1",), ("m2",), ("m3",)]
    assert [h.num_gpus for h in hosts] == [1, 0.5, 0, 0]
    split = plan_hosts(cpu, {"CPU": 8.0}, 8.0, cpu_fallback=True, colocate=False)
    assert [h.members for h in split] == [("m0",), ("m1",), ("m2",)]


def test_fixed_cpus_that_leave_none_for_reading_and_writing_are_refused(models, tmp_path, caplog):
    """Two members of num_cpus 1 on 2 CPUs would leave the read and write tasks nothing:
    the job would wait forever."""
    full = ensemble(models, tmp_path, {"num_cpus": 1}, {"num_cpus": 1})
    with pytest.raises(ConfigError) as err:
        plan_hosts(full, {"CPU": 2.0}, 2.0, cpu_fallback=True)
    assert "ask for 2 of Ray's 2 CPUs" in str(err.value)
    assert "lower the members' num_cpus or replicas" in str(err.value)
    # A joined cluster may grow: a warning, and the plan stands.
    (host,) = plan_hosts(full, {"CPU": 2.0}, 2.0, cpu_fallback=False)
    assert host.num_cpus == 2 and "the autoscaler must add a node" in caplog.text
    # Room left for the light stages: planned as asked.
    (host,) = plan_hosts(
        ensemble(models, tmp_path, {"num_cpus": 0.9}, {"num_cpus": 0.9}),
        {"CPU": 2.0},
        2.0,
        cpu_fallback=True,
    )
    assert host.num_cpus == pytest.approx(1.8) and host.threads == 2


def test_a_label_no_weighted_member_has_is_refused(models, tmp_path):
    from pipelines.plan import plan_ensemble

    members = [
        {"name": "alpha", "model": str(models["alpha"])},
        {"name": "tri", "model": str(models["tri"]), "weight": 0},
    ]
    three = ["negative", "neutral", "positive"]
    cfg = config_from_dict({"name": "g", "labels": three, "members": members}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"no member with weight > 0 can vote for \['neutral'\]"):
        plan_ensemble(cfg)
    # `mean` ignores weights: the weight-0 member votes there.
    mean = cfg.model_copy(update={"reducer": cfg.reducer.model_copy(update={"combine": "mean"})})
    assert plan_ensemble(mean).specs[1].label_index == (1, 2, 0)
