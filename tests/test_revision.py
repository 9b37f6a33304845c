"""A member given as a hub id is pinned to one commit for the whole job.

The hub is not reachable here, so each test lays out a hub cache of its own, as
huggingface_hub writes it (``models--org--name/refs/<ref>`` holding a commit hash,
``snapshots/<commit>/`` holding the files), and runs offline (HF_HUB_OFFLINE=1): the
real resolution and loading code reads it. Two commits hold models with different
weights, so which one was loaded shows in the outputs; the oracle is plain transformers
on the snapshot folder itself.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import numpy as np
import psutil
import pyarrow.parquet as pq
import pytest

from jobs.example import build_classifier, make_texts
from pipelines.config import ConfigError, config_from_dict
from pipelines.plan import plan_ensemble
from tests.oracle import plain_logits
from tests.test_faults import start, wait_for_first_part

ROOT = Path(__file__).resolve().parents[1]
REPO = "org/tiny"
LABELS = ["negative", "positive"]
COMMIT_A = "a" * 8 + "0123456789abcdef0123456789abcdef"
COMMIT_B = "b" * 8 + "fedcba9876543210fedcba9876543210"
TEXTS = make_texts(12, seed=4, max_words=20)


def snapshot(cache: Path, commit: str) -> Path:
    return cache / f"models--{REPO.replace('/', '--')}" / "snapshots" / commit


def point(cache: Path, ref: str, commit: str) -> None:
    """Move ``ref`` to ``commit``, as a fetch of a moved branch leaves the cache."""
    path = cache / f"models--{REPO.replace('/', '--')}" / "refs" / ref
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(commit)  # huggingface_hub writes the bare hash, no newline


@pytest.fixture(scope="module")
def hub(tmp_path_factory) -> Path:
    """A hub cache whose main is commit A; commit B (other weights) is there too."""
    cache = tmp_path_factory.mktemp("hub")
    for commit, seed in ((COMMIT_A, 1), (COMMIT_B, 2)):
        build_classifier(snapshot(cache, commit), id2label=dict(enumerate(LABELS)), seed=seed)
    point(cache, "main", COMMIT_A)
    return cache


@pytest.fixture
def offline_hub(hub, monkeypatch) -> Path:
    """This process reads ``hub`` as its hub cache, offline; main back at A afterwards."""
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_CACHE when it is imported; its loaders read this.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(hub))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    yield hub
    point(hub, "main", COMMIT_A)


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


@pytest.fixture(scope="module")
def expected(hub) -> dict[str, np.ndarray]:
    """Each commit's probabilities for TEXTS, by plain transformers on its snapshot."""
    out = {c: softmax(plain_logits(snapshot(hub, c), TEXTS)) for c in (COMMIT_A, COMMIT_B)}
    # The commits differ visibly, so the outputs tell which one was loaded.
    assert np.abs(out[COMMIT_A] - out[COMMIT_B]).max() > 0.05
    return out


def plan_for(tmp_path: Path, **member):
    cfg = config_from_dict(
        {"name": "t", "labels": LABELS, "members": [{"name": "tiny", "model": REPO, **member}]},
        base_dir=tmp_path,
    )
    return plan_ensemble(cfg)


def member_probs(plan) -> np.ndarray:
    """The member's probabilities through the code an actor runs (no Ray needed)."""
    from actors.host import MemberHost

    host = MemberHost(member=plan.config.members[0], spec=plan.specs[0], plan=plan)
    return softmax(host.infer(TEXTS).astype(np.float64))


def test_main_resolves_to_its_commit_once_and_the_plan_keeps_it(offline_hub, expected, tmp_path):
    plan = plan_for(tmp_path)
    assert plan.revisions == {"tiny": COMMIT_A}
    assert plan.config.members[0].options.revision == COMMIT_A
    assert plan.member_summaries()[0]["model"] == REPO
    assert plan.member_summaries()[0]["revision"] == COMMIT_A
    assert np.allclose(member_probs(plan), expected[COMMIT_A], atol=1e-5)

    # main moves on: the plan made before still loads A (an actor built, or rebuilt by
    # Ray, from it reads the commit the plan carries); a new plan resolves B.
    point(offline_hub, "main", COMMIT_B)
    assert np.allclose(member_probs(plan), expected[COMMIT_A], atol=1e-5)
    moved = plan_for(tmp_path)
    assert moved.revisions == {"tiny": COMMIT_B}
    assert np.allclose(member_probs(moved), expected[COMMIT_B], atol=1e-5)

    # A resumed job pins the new plan to the revisions its first run recorded.
    recorded = json.loads(json.dumps(plan.revisions))  # as a job record stores it
    resumed = moved.with_revisions(recorded)
    assert resumed.revisions == {"tiny": COMMIT_A}
    assert resumed.specs == plan.specs
    assert np.allclose(member_probs(resumed), expected[COMMIT_A], atol=1e-5)
    assert moved.with_revisions({}) is moved


def test_tags_and_commit_hashes(offline_hub, expected, tmp_path):
    point(offline_hub, "v1.0", COMMIT_B)
    assert plan_for(tmp_path, revision="v1.0").revisions == {"tiny": COMMIT_B}
    # A commit hash is used as it is, whatever main says.
    pinned = plan_for(tmp_path, revision=COMMIT_B)
    assert pinned.revisions == {"tiny": COMMIT_B}
    assert np.allclose(member_probs(pinned), expected[COMMIT_B], atol=1e-5)


def test_revision_errors_name_the_key_and_the_fix(offline_hub, models, tmp_path):
    with pytest.raises(
        ConfigError,
        match=r"members\[0\] \(tiny\): revision: cannot resolve 'nope' of hub id 'org/tiny'",
    ):
        plan_for(tmp_path, revision="nope")
    local = config_from_dict(
        {
            "name": "t",
            "labels": LABELS,
            "members": [{"name": "alpha", "model": str(models["alpha"]), "revision": "main"}],
        },
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match=r"alpha\): revision: .*local folder.*remove"):
        plan_ensemble(local)
    plan = plan_for(tmp_path)
    with pytest.raises(ConfigError, match=r"\['other'\].*not members given as hub ids"):
        plan.with_revisions({"other": COMMIT_B})
    with pytest.raises(ConfigError, match="not commit hashes"):
        plan.with_revisions({"tiny": "main"})


def test_a_host_restarted_after_main_moved_loads_the_planned_commit(no_ray, hub, tmp_path):
    """`ray-ensemble score` on a hub member; once a part is committed, main moves to B
    and the ensemble host is killed. Ray restarts it mid-job, and every row, before and
    after the restart, has commit A's probabilities."""
    rows = 12_000
    texts = make_texts(200, seed=7, max_words=40)
    # Few distinct texts, many rows: the oracle scores each text once.
    src = tmp_path / "in.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": f"r{i}", "text": texts[i % len(texts)]}) + "\n" for i in range(rows)
        )
    )
    config = tmp_path / "hub.yaml"
    config.write_text(
        json.dumps({"name": "t", "labels": LABELS, "members": [{"name": "tiny", "model": REPO}]})
    )
    out, log = tmp_path / "out", tmp_path / "log"
    cmd = [
        sys.executable,
        "-m",
        "jobs.cli",
        "score",
        str(config),
        "--input",
        str(src),
        "--output",
        str(out),
        "--num-cpus",
        "2",
        "--rows-per-file",
        "500",
    ]
    os.environ["HF_HUB_CACHE"] = str(hub)  # read by start(); restored below
    try:
        proc = start(cmd, log)
    finally:
        del os.environ["HF_HUB_CACHE"]
    try:
        wait_for_first_part(proc, out, log)
        point(hub, "main", COMMIT_B)
        hosts = [
            p
            for p in psutil.Process(proc.pid).children(recursive=True)
            if "EnsembleHost" in " ".join(p.cmdline())
        ]
        assert hosts, "no ensemble host process found"
        for host in hosts:
            host.send_signal(signal.SIGKILL)
        assert proc.wait(timeout=300) == 0, log.read_text()[-3000:]
    finally:
        point(hub, "main", COMMIT_A)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    table = pq.read_table(out).to_pydict()
    assert sorted(table["id"], key=lambda i: int(i[1:])) == [f"r{i}" for i in range(rows)]
    want = {
        c: dict(zip(texts, softmax(plain_logits(snapshot(hub, c), texts)), strict=True))
        for c in (COMMIT_A, COMMIT_B)
    }
    got = np.array(table["probs__tiny"], dtype=np.float64)
    a = np.stack([want[COMMIT_A][t] for t in table["text"]])
    b = np.stack([want[COMMIT_B][t] for t in table["text"]])
    assert np.abs(a - b).max() > 0.05  # B's rows would show
    assert np.allclose(got, a, atol=1e-5)
