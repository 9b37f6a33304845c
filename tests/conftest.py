"""One local Ray cluster per test session, and tiny models built from configs."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_DEDUP_LOGS", "0")


def _start_ray():
    import ray

    # "local": never join a cluster another process started on this machine.
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    return ray


@pytest.fixture(scope="session")
def ray_cluster():
    ray = _start_ray()
    yield ray
    if ray.is_initialized():
        ray.shutdown()


@pytest.fixture
def no_ray():
    """For tests whose command starts a Ray of its own: two Ray instances on one machine
    make Ray Train and Data misbehave, so the session's is stopped meanwhile."""
    import ray

    running = ray.is_initialized()
    if running:
        ray.shutdown()
    yield
    if running and not ray.is_initialized():
        _start_ray()


@pytest.fixture(scope="session")
def models(tmp_path_factory) -> dict[str, Path]:
    """Members with different architectures, label orders and label names."""
    from jobs.example import build_classifier

    root = tmp_path_factory.mktemp("models")
    return {
        # canonical order, by name
        "alpha": build_classifier(root / "alpha", id2label={0: "negative", 1: "positive"}, seed=1),
        # reversed order, upper case
        "beta": build_classifier(
            root / "beta", id2label={0: "POSITIVE", 1: "NEGATIVE"}, arch="distilbert", seed=2
        ),
        # default names: needs a label_map
        "gamma": build_classifier(
            root / "gamma", id2label={0: "LABEL_0", 1: "LABEL_1"}, seed=3, layers=1
        ),
        # three labels, in its own order
        "tri": build_classifier(
            root / "tri", id2label={0: "neutral", 1: "positive", 2: "negative"}, seed=4
        ),
        # a single-logit binary head
        "single": build_classifier(root / "single", id2label={0: "LABEL_0"}, seed=5),
        # an encoder for the embedding task
        "encoder": build_classifier(root / "encoder", id2label={}, seed=6, task="embedding"),
    }
