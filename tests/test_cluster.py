"""cluster.yaml is a valid Ray cluster launcher config: a CPU head and 1- and 4-GPU workers."""

from __future__ import annotations

import json
import os
import re
import shlex
from pathlib import Path

import jsonschema
import pytest
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def config() -> dict:
    return yaml.safe_load((ROOT / "cluster.yaml").read_text())


def _workers(config: dict) -> dict[str, dict]:
    head = config["head_node_type"]
    return {name: t for name, t in config["available_node_types"].items() if name != head}


def test_cluster_yaml_matches_rays_schema(config):
    schema = json.loads(
        Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text()
    )
    jsonschema.validate(config, schema)
    assert config["head_node_type"] in config["available_node_types"]


def test_head_has_cpus_and_advertises_no_gpu(config):
    head = config["available_node_types"][config["head_node_type"]]
    assert head["resources"].get("CPU", 0) > 0
    # An explicit 0: otherwise Ray would detect (and advertise) any GPU the head has.
    assert head["resources"]["GPU"] == 0
    start = " ".join(config["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in start  # the dashboard is reached by SSH tunnel


def test_one_gpu_and_four_gpu_worker_types(config):
    gpus = sorted(t["resources"].get("GPU", 0) for t in _workers(config).values())
    assert 1 in gpus and 4 in gpus, f"worker GPUs: {gpus}"
    for name, t in _workers(config).items():
        if t["resources"].get("GPU", 0):
            assert t["resources"].get("CPU", 0) >= 1, f"{name}: a GPU worker needs CPUs too"


def test_worker_counts_are_consistent(config):
    total = config["max_workers"]
    assert total > 0
    for name, t in _workers(config).items():
        assert t["min_workers"] == 0, f"{name}: GPU nodes should scale from zero"
        assert t["min_workers"] <= t["max_workers"] <= total, name
    assert config["idle_timeout_minutes"] > 0


def _pip_install_targets(command: str) -> list[str]:
    """The requirement / path arguments of a ``pip install`` command (flags dropped)."""
    words = shlex.split(command)
    if words[:2] == ["python", "-m"]:
        words = words[2:]
    if words[:2] != ["pip", "install"]:
        return []
    return [w for w in words[2:] if not w.startswith("-")]


def test_setup_installs_cuda_torch_then_the_mounted_project(config):
    mounted = [remote for remote, local in config["file_mounts"].items() if local in (".", "./")]
    assert len(mounted) == 1, f"the project folder should be mounted once: {config['file_mounts']}"
    project = mounted[0].rstrip("/")
    commands = config["setup_commands"]

    torch_at = [
        i
        for i, c in enumerate(commands)
        if any(re.fullmatch(r"torch==2\.\d+\.\d+", t) for t in _pip_install_targets(c))
    ]
    project_at = [
        i
        for i, c in enumerate(commands)
        if "-e" in shlex.split(c) and project in _pip_install_targets(c)
    ]
    assert torch_at, f"no `pip install torch==2.x.y` in {commands}"
    assert project_at, f"no `pip install -e {project}` in {commands}"
    assert torch_at[0] < project_at[0], "torch must be installed before the project"
    # A CPU-only build on GPU nodes would silently run every member on CPU.
    assert not any("+cpu" in c or "/whl/cpu" in c for c in commands)
    # Node-type setup commands would replace the global ones on that node.
    for name, t in config["available_node_types"].items():
        assert "worker_setup_commands" not in t, name
    assert not config.get("worker_setup_commands") and not config.get("head_setup_commands")
