"""Config and usage errors: exit code 2, a message naming the key and the fix, no traceback,
and no Ray started."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from jobs.cli import main
from pipelines.config import ConfigError, load_config


def write_config(tmp_path: Path, models: dict[str, Path], **overrides) -> Path:
    cfg = {
        "name": "t",
        "labels": ["negative", "positive"],
        "members": [
            {"name": "alpha", "model": str(models["alpha"])},
            {"name": "beta", "model": str(models["beta"])},
        ],
    }
    cfg.update(overrides)
    path = tmp_path / "ensemble.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture
def data(tmp_path) -> Path:
    path = tmp_path / "in.jsonl"
    path.write_text(json.dumps({"text": "good film"}) + "\n")
    return path


def run_score(capsys, config: Path, data: Path, out: Path, *extra: str) -> tuple[int, str]:
    import ray

    was_up = ray.is_initialized()  # another test module's session cluster, maybe
    code = main(["score", str(config), "--input", str(data), "--output", str(out), *extra])
    err = capsys.readouterr().err
    assert "Traceback" not in err
    # the CLI says "ray: ready" whenever it starts or joins Ray
    assert "ray: ready" not in err, "a usage error must be caught before Ray starts"
    assert was_up or not ray.is_initialized()
    return code, err


def member(models, model="alpha", **kw):
    return {"name": model, "model": str(models[model]), **kw}


def one(model, **kw):
    """Overrides with a single member built from the named test model."""
    return lambda models: {"members": [member(models, model, **kw)]}


def fixed(**overrides):
    return lambda models: overrides


CASES = {
    "unknown top-level key": (fixed(nmae="x"), "nmae: unknown key"),
    "unknown member key": (one("alpha", wieght=2), "members[0] (alpha).wieght: unknown key"),
    "negative weight": (one("alpha", weight=-1), "members[0] (alpha).weight"),
    "zero temperature": (one("alpha", temperature=0), "temperature"),
    "bad dtype": (one("alpha", dtype="int8"), "dtype: Input should be"),
    "bad member name": (one("alpha", name="Alpha!"), "name: String should match"),
    "bad replicas": (one("alpha", replicas={"min": 3, "max": 1}), "must be at least min"),
    "renamed serve key": (fixed(serve={"ingress_replicas": 2}), "now serve.replicas"),
    "bad serve replicas": (fixed(serve={"replicas": {"min": 2, "max": 1}}), "at least min"),
    "no serve replicas": (fixed(serve={"replicas": 0}), "replicas must be at least 1"),
    "no member replicas": (one("alpha", replicas=0), "replicas must be at least 1"),
    "unknown combine": (fixed(reducer={"combine": "median"}), "reducer.combine"),
    "stacking not yet": (fixed(reducer={"combine": "stacking"}), "stacking"),
    "duplicate names": (
        lambda models: {"members": [member(models, "alpha"), member(models, "alpha")]},
        "duplicate member name(s) ['alpha']",
    ),
    "missing labels": (fixed(labels=None), "labels: a classification ensemble needs"),
    "missing model dir": (
        fixed(members=[{"name": "ghost", "model": "./models/ghost"}]),
        "members[0] (ghost).model: directory",
    ),
    "labels cannot align": (
        one("gamma"),
        "model label 'LABEL_0' matches none of the ensemble labels",
    ),
    "label_map to unknown label": (
        one("gamma", label_map={"LABEL_0": "neg", "LABEL_1": "positive"}),
        "'neg', which is not one of the ensemble labels",
    ),
    "single logit needs two labels": (
        lambda models: {"labels": ["a", "b", "c"], "members": [member(models, "single")]},
        "single-logit (binary) head",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_config_errors_exit_2(case, tmp_path, models, data, capsys):
    overrides, needle = CASES[case]
    config = write_config(tmp_path, models, **overrides(models))
    code, err = run_score(capsys, config, data, tmp_path / "out")
    assert code == 2, err
    assert needle in err, err


def test_label_map_fixes_alignment(tmp_path, models):
    cfg = write_config(
        tmp_path,
        models,
        members=[member(models, "gamma", label_map={"LABEL_0": "negative", "LABEL_1": "positive"})],
    )
    from pipelines.plan import plan_ensemble

    plan = plan_ensemble(load_config(cfg))
    assert plan.specs[0].label_index == (0, 1)


def test_relative_model_paths_resolve_against_the_config_file(tmp_path, models):
    cfg = {
        "name": "t",
        "labels": ["negative", "positive"],
        "members": [{"name": "alpha", "model": "./alpha"}],
    }
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "alpha").symlink_to(models["alpha"])
    (tmp_path / "conf" / "e.yaml").write_text(yaml.safe_dump(cfg))
    loaded = load_config(tmp_path / "conf" / "e.yaml")
    assert Path(loaded.members[0].model) == (tmp_path / "conf" / "alpha").resolve()


def test_not_yaml_and_not_a_mapping(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    bad.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(bad)
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_input_errors_exit_2(tmp_path, models, data, capsys):
    config = write_config(tmp_path, models)
    code, err = run_score(capsys, config, tmp_path / "missing.jsonl", tmp_path / "o1")
    assert code == 2 and "does not exist" in err
    (tmp_path / "x.txt").write_text("hello")
    code, err = run_score(capsys, config, tmp_path / "x.txt", tmp_path / "o2")
    assert code == 2 and "x.txt (its suffix)" in err and ".jsonl" in err
    wrong = tmp_path / "wrong.jsonl"
    wrong.write_text(json.dumps({"body": "good"}) + "\n")
    code, err = run_score(capsys, config, wrong, tmp_path / "o3")
    assert code == 2 and "has no column 'text'" in err and "input.text_column" in err
    scored = tmp_path / "scored.jsonl"
    scored.write_text(json.dumps({"text": "a", "label": "x"}) + "\n")
    code, err = run_score(capsys, config, scored, tmp_path / "o4")
    assert code == 2 and "names of output columns" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.parquet").write_text("x")
    code, err = run_score(capsys, config, data, tmp_path / "full")
    assert code == 2 and "--overwrite" in err
    # --overwrite replaces only an output of ours: a foreign file is a usage error and stays.
    code, err = run_score(capsys, config, data, tmp_path / "full", "--overwrite")
    assert code == 2 and "old.parquet" in err and "did not write" in err
    assert (tmp_path / "full" / "old.parquet").read_text() == "x"


def test_console_script_exit_code_and_no_traceback(tmp_path):
    bad = tmp_path / "e.yaml"
    bad.write_text("name: t\nlabels: [a, b]\nmembers: [{name: m, model: ./nowhere}]\nextra: 1\n")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "jobs.cli",
            "score",
            str(bad),
            "--input",
            "x.jsonl",
            "--output",
            "o",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "extra: unknown key" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run(
        [sys.executable, "-m", "jobs.cli", "score"], capture_output=True, text=True, timeout=120
    )
    assert proc.returncode == 2 and "usage:" in proc.stderr
