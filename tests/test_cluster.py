"""cluster.yaml is a valid Ray cluster launcher config with a CPU head and GPU workers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jsonschema
import ray
import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_yaml_matches_rays_schema():
    schema = json.loads(
        Path(os.path.dirname(ray.__file__), "autoscaler", "ray-schema.json").read_text()
    )
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    assert workers and all(t["max_workers"] >= t["min_workers"] for t in workers)
