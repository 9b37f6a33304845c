"""Cascades: the exit rule, one host and several, offline and online.

The members are the tiny classifiers of conftest; the thresholds are chosen from their
own answers on the texts, so that rows stop at every stage.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from actors.host import EnsembleHost, reduce_batch
from actors.reducer import cascade_stages, stack
from jobs.example import make_texts
from pipelines.config import ConfigError, config_from_dict
from pipelines.plan import plan_ensemble, plan_hosts

LABELS = ["negative", "positive"]
NAMES = ["alpha", "beta", "gamma"]
WEIGHTS = np.array([2.0, 1.0, 1.0])


def members_for(models, **extra):
    members = [
        {"name": "alpha", "model": str(models["alpha"]), "weight": 2.0},
        {"name": "beta", "model": str(models["beta"]), "temperature": 1.5},
        {
            "name": "gamma",
            "model": str(models["gamma"]),
            "label_map": {"LABEL_0": "negative", "LABEL_1": "positive"},
        },
    ]
    return [{**m, **extra.get(m["name"], {})} for m in members]


# --- the exit rule against numpy -------------------------------------------------------------


def _numpy_stages(probs, weights, stages, exit_at, pool):
    """Row by row, stage by stage, as the issue states the rule."""
    out = []
    for r in range(probs.shape[1]):
        ran = len(stages)
        for i, threshold in enumerate(exit_at):
            idx = [m for stage in stages[: i + 1] for m in stage]
            w = weights[idx] / weights[idx].sum()
            if pool == "weighted_mean":
                p = (w[:, None] * probs[idx, r]).sum(0)
            else:  # geometric_mean: normalised weighted log-linear pooling
                p = np.exp((w[:, None] * np.log(probs[idx, r])).sum(0))
                p = p / p.sum()
            if p.max() >= threshold:
                ran = i + 1
                break
        out.append(ran)
    return np.array(out)


@pytest.mark.parametrize("pool", ["weighted_mean", "geometric_mean"])
@pytest.mark.parametrize(
    ("stages", "exit_at"),
    [([[0], [1], [2]], [0.8, 0.7]), ([[2, 0], [1]], [0.75]), ([[1], [0, 2]], [1.0])],
)
def test_exit_rule_matches_numpy(pool, stages, exit_at):
    rng = np.random.default_rng(3)
    logits = rng.normal(0, 2.0, size=(3, 400, 3))
    probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    weights = np.array([2.0, 0.5, 1.0])
    ours = cascade_stages(probs, weights, pool, stages, exit_at)
    theirs = _numpy_stages(probs, weights, stages, exit_at, pool)
    np.testing.assert_array_equal(ours, theirs)
    assert set(ours) == set(range(1, len(stages) + 1)) - ({1} if exit_at[0] == 1.0 else set())


# --- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cascade", "extra", "needle"),
    [
        ({"stages": [["a"], ["b"]], "exit_at": [0.9]}, {}, r"\['c'\] are in no stage"),
        ({"stages": [["a", "b"], ["b", "c"]], "exit_at": [0.9]}, {}, "more than one stage"),
        ({"stages": [["a", "x"], ["b", "c"]], "exit_at": [0.9]}, {}, r"\['x'\] are not members"),
        ({"stages": [["a"], ["b"], ["c"]], "exit_at": [0.9]}, {}, "need 2 thresholds"),
        ({"stages": [["a"], ["b", "c"]], "exit_at": [0.0]}, {}, r"in \(0, 1\]"),
        ({"stages": [["a", "b", "c"]], "exit_at": []}, {}, "at least 2"),
        (
            {"stages": [["a"], ["b", "c"]], "exit_at": [0.9]},
            {"task": "embedding", "labels": None},
            "cascade: embedding ensembles need every member",
        ),
    ],
)
def test_cascade_block_is_checked(tmp_path, cascade, extra, needle):
    members = [{"name": n, "model": "org/" + n} for n in ("a", "b", "c")]
    data = {"name": "x", "labels": LABELS, "members": members, "cascade": cascade, **extra}
    with pytest.raises(ConfigError, match=needle):
        config_from_dict(data, base_dir=tmp_path)


def test_stacking_cascade_needs_a_meta_model_per_prefix(models, tmp_path):
    """A stacking file fitted without a cascade has no ensemble so far: refused at plan
    time, naming the prefixes and the command that fits them; a quorum still refuses
    stacking outright."""
    from pipelines.stacking import StackingModel

    meta = StackingModel(tuple(LABELS), tuple(NAMES), np.ones((2, 6)), np.zeros(2))
    meta.save(tmp_path / "m.json")
    base = {
        "name": "s",
        "labels": LABELS,
        "members": members_for(models),
        "reducer": {"combine": "stacking", "stacking": "m.json"},
    }
    cascade = {"stages": [["beta"], ["alpha"], ["gamma"]], "exit_at": [0.9, 0.9]}
    cfg = config_from_dict({**base, "cascade": cascade}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match=r"\['beta'\], \['alpha', 'beta'\]\].*--cascade"):
        plan_ensemble(cfg)
    prefixes = (
        StackingModel(tuple(LABELS), ("beta",), np.eye(2), np.zeros(2)),
        StackingModel(tuple(LABELS), ("alpha", "beta"), np.ones((2, 4)), np.zeros(2)),
    )
    StackingModel(
        *[getattr(meta, f) for f in ("labels", "members", "coef", "intercept")], prefixes
    ).save(tmp_path / "m.json")
    assert len(plan_ensemble(cfg).stacking.prefixes) == 2
    with pytest.raises(ConfigError, match="stacking meta-model reads every member"):
        config_from_dict({**base, "serve": {"min_members": 2}}, base_dir=tmp_path)


def test_multi_label_refuses_a_cascade_at_plan_time(tmp_path):
    from jobs.example import build_classifier

    multi = build_classifier(
        tmp_path / "multi",
        id2label={0: "negative", 1: "positive"},
        problem_type="multi_label_classification",
    )
    cfg = config_from_dict(
        {
            "name": "m",
            "labels": LABELS,
            "members": [{"name": "a", "model": str(multi)}, {"name": "b", "model": str(multi)}],
            "cascade": {"stages": [["a"], ["b"]], "exit_at": [0.9]},
        },
        base_dir=tmp_path,
    )
    with pytest.raises(ConfigError, match="multi-label"):
        plan_ensemble(cfg)


def test_offline_hosts_follow_the_stages(models, tmp_path):
    """Offline, hosts are passed in turn: they follow the stages, and members on one
    device share a host only across consecutive stages."""
    members = members_for(models, beta={"own_host": True})
    cascade = {"stages": [["gamma"], ["beta"], ["alpha"]], "exit_at": [0.9, 0.9]}
    cfg = config_from_dict(
        {"name": "h", "labels": LABELS, "members": members, "cascade": cascade},
        base_dir=tmp_path,
    )
    hosts = plan_hosts(cfg, {"CPU": 4.0}, 4.0, cpu_fallback=True, pipeline=True)
    assert [h.members for h in hosts] == [("gamma",), ("beta",), ("alpha",)]
    together = cfg.model_copy(
        update={
            "cascade": cfg.cascade.model_copy(update={"stages": [["gamma"], ["alpha"], ["beta"]]})
        }
    )
    hosts = plan_hosts(together, {"CPU": 4.0}, 4.0, cpu_fallback=True, pipeline=True)
    assert [h.members for h in hosts] == [("gamma", "alpha"), ("beta",)]
    # Online, the endpoint runs the stages itself: the usual layout.
    hosts = plan_hosts(together, {"CPU": 4.0}, 4.0, cpu_fallback=True)
    assert [h.members for h in hosts] == [("alpha", "gamma"), ("beta",)]


# --- one host and several, in process -----------------------------------------------------------

TEXTS = make_texts(60, seed=31, max_words=30)


def _table(texts):
    n = len(texts)
    rows = [None if t is None else t for t in texts]
    return pa.table(
        {
            "id": [f"r{i}" for i in range(n)],
            "text": pa.array(rows, pa.string()),
            "error": pa.array([None if t else "no text" for t in texts], pa.string()),
        }
    )


@pytest.fixture(scope="module")
def setup(models, tmp_path_factory):
    """The full ensemble's member distributions on TEXTS, and thresholds from them that
    stop rows at every stage."""
    tmp = tmp_path_factory.mktemp("cascade")
    base = {"name": "c", "labels": LABELS, "members": members_for(models)}
    full_plan = plan_ensemble(config_from_dict(base, base_dir=tmp))
    full = EnsembleHost(plan=full_plan)(_table(TEXTS)).to_pylist()
    probs = np.array([[row[f"probs__{m}"] for row in full] for m in NAMES], dtype=np.float64)
    top1 = probs[0].max(-1)
    first = float(np.quantile(top1, 0.4))
    open_ = top1 < first
    p12 = (2 * probs[0] + probs[1]) / 3
    second = float(np.quantile(p12[open_].max(-1), 0.5))
    cascade = {"stages": [["alpha"], ["beta"], ["gamma"]], "exit_at": [first, second]}
    plan = plan_ensemble(config_from_dict({**base, "cascade": cascade}, base_dir=tmp))
    expected = cascade_stages(probs, WEIGHTS, "weighted_mean", [[0], [1], [2]], [first, second])
    assert set(expected) == {1, 2, 3}
    return {
        "tmp": tmp,
        "base": base,
        "cascade": cascade,
        "plan": plan,
        "probs": probs,
        "expected": expected,
    }


def check_rows(rows, setup, texts=TEXTS):
    """Each row: its stage as the rule says, members past it null, the ensemble the
    weighted mean of the members that ran, agreement over them."""
    probs, expected = setup["probs"], setup["expected"]
    k = 0
    for row, text in zip(rows, texts, strict=True):
        if text is None:
            assert row["error"] and row["cascade_stage"] is None and row["label"] is None
            continue
        stage = int(expected[k])
        assert row["cascade_stage"] == stage, (k, row)
        ran = NAMES[:stage]
        for i, name in enumerate(NAMES):
            if name in ran:
                np.testing.assert_allclose(row[f"probs__{name}"], probs[i, k], atol=1e-5)
            else:
                assert row[f"probs__{name}"] is None
        w = WEIGHTS[:stage]
        p = (w[:, None] * probs[:stage, k]).sum(0) / w.sum()
        np.testing.assert_allclose(row["probs"], p, atol=1e-5)
        label = int(np.argmax(p))
        assert row["label"] == LABELS[label]
        agree = sum(w[i] for i in range(stage) if np.argmax(probs[i, k]) == label) / w.sum()
        assert row["agreement"] == pytest.approx(agree, abs=1e-6)
        k += 1


def test_one_host_runs_each_stage_on_the_open_rows_only(setup):
    texts = [*TEXTS[:10], None, *TEXTS[10:]]
    host = EnsembleHost(plan=setup["plan"])
    rows = host(_table(texts)).to_pylist()
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(texts))]
    check_rows(rows, setup, texts)
    # gamma, the last stage, saw only the rows that reached it: its tokens are theirs.
    gamma = host.members[2]
    reached = [t for t, s in zip(TEXTS, setup["expected"], strict=True) if s == 3]
    tokens = gamma.encode(reached)["input_ids"]
    assert gamma.real_tokens == sum(len(t) for t in tokens)
    assert host.members[0].real_tokens > gamma.real_tokens


def test_several_hosts_pass_the_open_rows_on(setup):
    """alpha and beta in one host, gamma in another, then the reduce: the same rows as
    one host, every row once."""
    plan = setup["plan"]
    first = EnsembleHost(plan=plan, members=["alpha", "beta"], reduce=False)
    second = EnsembleHost(plan=plan, members=["gamma"], reduce=False)
    rows = reduce_batch(second(first(_table(TEXTS))), plan=plan).to_pylist()
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(TEXTS))]
    check_rows(rows, setup)
    reached = [t for t, s in zip(TEXTS, setup["expected"], strict=True) if s == 3]
    tokens = second.members[0].encode(reached)["input_ids"]
    assert second.members[0].real_tokens == sum(len(t) for t in tokens)


def _numpy_stack(probs, doc, members, r):
    """One row's distribution from a stacking file's entry, by its formula: softmax of
    ``coef @ [log p_member]`` (members in order, log-probabilities floored at 1e-7)."""
    feats = np.concatenate([np.log(np.clip(probs[NAMES.index(m), r], 1e-7, 1)) for m in members])
    z = np.array(doc["coef"]) @ feats + np.array(doc["intercept"])
    return np.exp(z - z.max()) / np.exp(z - z.max()).sum()


@pytest.fixture(scope="module")
def stacked(setup):
    """A stacking cascade: a meta-model per stage prefix (written beside the config),
    thresholds from their own answers so that rows stop at every stage, and what the
    stacking formula, computed row by row, says of each row."""
    tmp = setup["tmp"]
    probs = setup["probs"]
    rng = np.random.default_rng(5)
    doc = {
        "format": "ray-ensemble-stacking/1",
        "labels": LABELS,
        "members": NAMES,
        "coef": rng.normal(0, 1, (2, 6)).tolist(),
        "intercept": [0.1, -0.1],
        "prefixes": [
            {"members": ["alpha"], "coef": [[1.2, -0.3], [-0.4, 0.9]], "intercept": [0, 0.2]},
            {
                "members": ["alpha", "beta"],
                "coef": rng.normal(0, 1, (2, 4)).tolist(),
                "intercept": [0.0, 0.0],
            },
        ],
    }
    (tmp / "cs.stacking.json").write_text(json.dumps(doc))
    entries = [doc["prefixes"][0], doc["prefixes"][1], doc]
    n = probs.shape[1]
    by_prefix = [
        np.array([_numpy_stack(probs, e, e["members"], r) for r in range(n)]) for e in entries
    ]
    first = float(np.quantile(by_prefix[0].max(-1), 0.6))
    open_ = by_prefix[0].max(-1) < first
    second = float(np.quantile(by_prefix[1][open_].max(-1), 0.5))
    stage = np.where(
        by_prefix[0].max(-1) >= first, 1, np.where(by_prefix[1].max(-1) >= second, 2, 3)
    )
    assert set(stage) == {1, 2, 3}
    cfg = {
        **setup["base"],
        "reducer": {"combine": "stacking", "stacking": "cs.stacking.json"},
        "cascade": {"stages": [["alpha"], ["beta"], ["gamma"]], "exit_at": [first, second]},
    }
    return {"cfg": cfg, "by_prefix": by_prefix, "stage": stage}


def check_stacked_rows(rows, stacked):
    """Each row's stage, answer and members as the prefix meta-models say."""
    by_prefix, stage = stacked["by_prefix"], stacked["stage"]
    assert [r["id"] for r in rows] == [f"r{i}" for i in range(len(stage))]
    for r, row in enumerate(rows):
        k = int(stage[r])
        assert row["cascade_stage"] == k, (r, row)
        np.testing.assert_allclose(row["probs"], by_prefix[k - 1][r], atol=1e-5)
        assert row["label"] == LABELS[int(np.argmax(by_prefix[k - 1][r]))]
        assert [row[f"probs__{m}"] is None for m in NAMES] == [i >= k for i in range(3)]


def test_stacking_cascade_uses_each_prefix_meta_model(setup, stacked):
    """With stacking, the ensemble so far after each stage is its prefix's own
    meta-model: rows stop on its top probability and are answered by it, across two
    hosts, against the stacking formula computed row by row."""
    plan = plan_ensemble(config_from_dict(stacked["cfg"], base_dir=setup["tmp"]))
    first_host = EnsembleHost(plan=plan, members=["alpha", "beta"], reduce=False)
    second_host = EnsembleHost(plan=plan, members=["gamma"], reduce=False)
    rows = reduce_batch(second_host(first_host(_table(TEXTS))), plan=plan).to_pylist()
    check_stacked_rows(rows, stacked)


# --- offline on Ray Data, and online --------------------------------------------------------------


@pytest.fixture(scope="module")
def offline(ray_cluster, setup):
    """The cascade scored offline across hosts (gamma, the last stage, has its own)."""
    from pipelines.offline import score

    tmp = setup["tmp"]
    data = {
        **setup["base"],
        "members": [
            {**m, "own_host": True} if m["name"] == "gamma" else m for m in setup["base"]["members"]
        ],
        "cascade": setup["cascade"],
    }
    plan = plan_ensemble(config_from_dict(data, base_dir=tmp))
    src = tmp / "in.jsonl"
    lines = [{"id": f"r{i}", "text": t} for i, t in enumerate(TEXTS)]
    lines.insert(7, {"id": "bad", "text": None})
    src.write_text("".join(json.dumps(r) + "\n" for r in lines))
    summary = score(plan, src, tmp / "out")
    rows = pq.read_table(sorted((tmp / "out").glob("*.parquet"))).to_pylist()
    return {"plan": plan, "rows": rows, "summary": summary, "ids": [r["id"] for r in lines]}


def test_offline_across_hosts_every_row_once(offline, setup):
    rows = offline["rows"]
    assert sorted(r["id"] for r in rows) == sorted(offline["ids"])
    assert offline["summary"].rows == len(offline["ids"]) and offline["summary"].errors == 1
    by_id = {r["id"]: r for r in rows}
    assert by_id["bad"]["cascade_stage"] is None and by_id["bad"]["error"]
    check_rows([by_id[f"r{i}"] for i in range(len(TEXTS))], setup)


def test_online_cascade_equals_offline(offline, setup):
    """Served with gamma on a host of its own: the same stages and answers as offline,
    members that did not run left out of `members`."""
    from ray import serve

    from pipelines.online import build_app
    from tests.test_online import free_port, post

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(offline["plan"]), name="cas", route_prefix="/cas")
    try:
        url = f"http://127.0.0.1:{port}/cas"
        online = []
        for i in range(0, len(TEXTS), 16):
            r = post(url, {"inputs": TEXTS[i : i + 16]})
            assert r.status_code == 200, r.text
            online += r.json()["predictions"]
    finally:
        serve.delete("cas")
        serve.shutdown()
    by_id = {r["id"]: r for r in offline["rows"]}
    for i, on in enumerate(online):
        off = by_id[f"r{i}"]
        assert on["cascade_stage"] == off["cascade_stage"]
        assert on["label"] == off["label"]
        np.testing.assert_allclose([on["probs"][lab] for lab in LABELS], off["probs"], atol=1e-5)
        assert on["agreement"] == pytest.approx(off["agreement"], abs=1e-6)
        assert sorted(on["members"]) == NAMES[: off["cascade_stage"]]
        assert "members_missing" not in on
        for name in on["members"]:
            np.testing.assert_allclose(
                [on["members"][name]["probs"][lab] for lab in LABELS],
                off[f"probs__{name}"],
                atol=1e-5,
            )


def test_stacking_cascade_offline_across_hosts_and_online(ray_cluster, setup, stacked):
    """The stacking cascade on Ray: offline with gamma on a host of its own, every row
    once and as the prefix meta-models say; served, the same answers."""
    from ray import serve

    from pipelines.offline import score
    from pipelines.online import build_app
    from tests.test_online import free_port, post

    tmp = setup["tmp"]
    cfg = stacked["cfg"]
    cfg = {
        **cfg,
        "members": [{**m, "own_host": True} if m["name"] == "gamma" else m for m in cfg["members"]],
    }
    plan = plan_ensemble(config_from_dict(cfg, base_dir=tmp))
    src = tmp / "stacked.jsonl"
    src.write_text(
        "".join(json.dumps({"id": f"r{i}", "text": t}) + "\n" for i, t in enumerate(TEXTS))
    )
    score(plan, src, tmp / "stacked-out")
    rows = pq.read_table(sorted((tmp / "stacked-out").glob("*.parquet"))).to_pylist()
    rows.sort(key=lambda r: int(r["id"][1:]))
    check_stacked_rows(rows, stacked)

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    serve.run(build_app(plan), name="stk", route_prefix="/stk")
    try:
        online = []
        for i in range(0, len(TEXTS), 16):
            r = post(f"http://127.0.0.1:{port}/stk", {"inputs": TEXTS[i : i + 16]})
            assert r.status_code == 200, r.text
            online += r.json()["predictions"]
    finally:
        serve.delete("stk")
        serve.shutdown()
    for on, off in zip(online, rows, strict=True):
        assert on["cascade_stage"] == off["cascade_stage"] and on["label"] == off["label"]
        np.testing.assert_allclose([on["probs"][lab] for lab in LABELS], off["probs"], atol=1e-5)
        assert sorted(on["members"]) == NAMES[: off["cascade_stage"]]


# --- fit --cascade --------------------------------------------------------------------------------


def test_fitted_thresholds_respect_max_loss_on_held_out_folds():
    """Members that err independently, the costly one best: the cascade chosen on the
    other folds keeps the accuracy within --max-loss on the folds it never saw, and
    costs less than the full ensemble."""
    from pipelines.cascade_fitting import fit_cascade

    rng = np.random.default_rng(1)
    n = 2000
    y = rng.integers(0, 2, n)

    def member(strength):
        z = strength * (2 * y - 1) + rng.normal(0, 2.0, n)
        p = 1 / (1 + np.exp(-z))
        return np.stack([1 - p, p], -1)

    probs = np.stack([member(2.0), member(2.2), member(2.5)])
    cost = [0.001, 0.004, 0.02]
    names = ["cheap", "mid", "costly"]
    max_loss = 0.005
    fit = fit_cascade(probs, y, np.ones(3), "weighted_mean", cost, names, max_loss=max_loss)
    losses = np.array([loss for loss, _, _ in fit.held_out])
    assert len(losses) == 5
    assert losses.mean() <= max_loss, losses
    assert fit.chosen is not None and fit.chosen.cost < 0.5 * sum(cost)
    # The chosen cascade's figures, by the reducer's exit rule and plain numpy.
    stages = [[names.index(m) for m in s] for s in fit.chosen.stages]
    ran = cascade_stages(probs, np.ones(3), "weighted_mean", stages, fit.chosen.exit_at)
    prefix = [probs[[m for s in stages[:k] for m in s]].mean(0) for k in range(1, len(stages) + 1)]
    p = np.stack(prefix)[ran - 1, np.arange(n)]
    assert fit.chosen.accuracy == pytest.approx(np.mean(p.argmax(-1) == y))
    shares = np.bincount(ran - 1, minlength=len(stages)) / n
    np.testing.assert_allclose(fit.chosen.shares, shares)
    stage_cost = np.cumsum([sum(cost[m] for m in s) for s in stages])
    assert fit.chosen.cost == pytest.approx(float(shares @ stage_cost))
    full_acc = np.mean(probs.mean(0).argmax(-1) == y)
    assert full_acc - fit.chosen.accuracy <= max_loss


def test_stacking_cascade_fit_judges_each_prefix_on_held_out_rows():
    """With stacking, every ensemble so far the fit weighs is a meta-model scored on the
    CV folds it was not fitted on (scikit-learn's cross_val_predict on the same folds,
    independently), the held-out losses keep --max-loss, and the meta-models stored
    for the chosen stages are fitted on every row."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold, cross_val_predict

    from actors.reducer import stacking_features
    from pipelines.cascade_fitting import fit_cascade
    from pipelines.fitting import fit_stacking, with_prefix_models

    rng = np.random.default_rng(4)
    n = 1500
    y = rng.integers(0, 2, n)

    def member(strength, bias):
        z = strength * (2 * y - 1) + bias + rng.normal(0, 2.0, n)
        p = 1 / (1 + np.exp(-z))
        return np.stack([1 - p, p], -1)

    probs = np.stack([member(2.0, 0.8), member(2.2, -0.5), member(2.6, 0.0)])
    cost = [0.001, 0.004, 0.02]
    names = ["cheap", "mid", "costly"]
    fit = fit_cascade(probs, y, np.ones(3), "stacking", cost, names, max_loss=0.01, labels=LABELS)
    assert fit.chosen is not None and fit.chosen.cost < sum(cost)
    losses = np.array([loss for loss, _, _ in fit.held_out])
    assert losses.mean() <= 0.01, losses

    folds = StratifiedKFold(5, shuffle=True, random_state=0)

    def oof(idx):
        lr = LogisticRegression(C=1.0, max_iter=5000)
        return cross_val_predict(
            lr, stacking_features(probs[idx]), y, cv=folds, method="predict_proba"
        )

    full = oof([0, 1, 2])
    assert fit.full.accuracy == pytest.approx(np.mean(full.argmax(-1) == y))
    stages = [[names.index(m) for m in s] for s in fit.chosen.stages]
    prefix = [oof(sorted(m for s in stages[:k] for m in s)) for k in range(1, len(stages) + 1)]
    ran = np.full(n, len(stages))
    for k in range(len(stages) - 1, 0, -1):
        ran[prefix[k - 1].max(-1) >= fit.chosen.exit_at[k - 1]] = k
    p = np.stack(prefix)[ran - 1, np.arange(n)]
    assert fit.chosen.accuracy == pytest.approx(np.mean(p.argmax(-1) == y))
    np.testing.assert_allclose(fit.chosen.shares, np.bincount(ran - 1, minlength=len(stages)) / n)

    metas = with_prefix_models(
        fit_stacking(probs, y, LABELS, names), fit.chosen.stages, probs, y, names
    ).prefixes
    assert len(metas) == len(stages) - 1
    for k, meta in enumerate(metas, start=1):
        idx = sorted(m for s in stages[:k] for m in s)
        assert meta.members == tuple(names[i] for i in idx)
        lr = LogisticRegression(C=1.0, max_iter=5000).fit(stacking_features(probs[idx]), y)
        np.testing.assert_allclose(
            stack(probs[idx], meta.coef, meta.intercept),
            lr.predict_proba(stacking_features(probs[idx])),
            atol=1e-6,
        )


class _Lines(logging.Handler):
    """The CLI's log lines (its loggers do not propagate to pytest's capture)."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_fit_cascade_cli_writes_a_cascade_that_scores(ray_cluster, setup):
    """`ray-ensemble fit --cascade` on labels the ensemble mostly gets right: it times
    the members, prints the candidates and writes a cascade block that loads."""
    import yaml

    from jobs.cli import main
    from pipelines.config import load_config

    tmp = setup["tmp"]
    texts = make_texts(200, seed=41, max_words=30)
    full = EnsembleHost(plan=plan_ensemble(config_from_dict(setup["base"], base_dir=tmp)))
    rows = full(_table(texts)).to_pylist()
    rng = np.random.default_rng(2)
    labels = [
        r["label"] if rng.random() < 0.9 else LABELS[1 - LABELS.index(r["label"])] for r in rows
    ]
    src = tmp / "val.jsonl"
    src.write_text(
        "".join(
            json.dumps({"text": t, "label": lab}) + "\n"
            for t, lab in zip(texts, labels, strict=True)
        )
    )
    path = tmp / "fit.yaml"
    path.write_text(yaml.safe_dump(setup["base"]))
    out = tmp / "fitted.yaml"
    args = ["fit", str(path), "--input", str(src), "--label-column", "label"]
    lines = _Lines()
    logging.getLogger("ray_ensemble").addHandler(lines)
    try:
        code = main(
            [*args, "--output", str(out), "--cascade", "--max-loss", "0.02"]
            + ["--combine", "weighted_mean"]
        )
    finally:
        logging.getLogger("ray_ensemble").removeHandler(lines)
    assert code == 0
    text = "\n".join(lines.lines)
    assert "member forward ms/row: alpha" in text and "(full ensemble)" in text, text
    assert "held out (chosen on the other folds)" in text
    cfg = load_config(out)
    assert cfg.cascade is not None, text
    assert sorted(m for s in cfg.cascade.stages for m in s) == sorted(NAMES)
    assert len(cfg.cascade.exit_at) == len(cfg.cascade.stages) - 1
    assert cfg.reducer.combine == "weighted_mean"
    # With stacking: a meta-model per stage prefix beside the config, and the cascade
    # scores with them.
    stacked = tmp / "stacked.yaml"
    more = ["--cascade", "--max-loss", "0.02", "--combine", "stacking"]
    assert main([*args, "--output", str(stacked), *more]) == 0
    plan = plan_ensemble(load_config(stacked))
    assert plan.config.reducer.combine == "stacking" and plan.config.cascade is not None
    doc = json.loads(Path(plan.config.reducer.stacking).read_text())
    stages = plan.config.cascade.stages
    assert [e["members"] for e in doc["prefixes"]] == [
        [m for m in NAMES if any(m in s for s in stages[:k])] for k in range(1, len(stages))
    ]
    scored = EnsembleHost(plan=plan)(_table(texts)).to_pylist()
    # The members' calibrated distributions (the fitted temperatures), NaN where not run.
    probs = np.array(
        [[r[f"probs__{m}"] or [np.nan, np.nan] for r in scored] for m in NAMES], dtype=np.float64
    )
    # Some rows are answered by a prefix's meta-model, the others by the full one.
    assert min(r["cascade_stage"] for r in scored) < len(stages)
    for r, row in enumerate(scored):
        k = row["cascade_stage"]
        entry = doc if k == len(stages) else doc["prefixes"][k - 1]
        np.testing.assert_allclose(
            row["probs"], _numpy_stack(probs, entry, entry["members"], r), atol=1e-5
        )


def _labelled_set(setup, name: str, n: int, seed: int) -> tuple:
    """``n`` labelled texts in ``<name>.jsonl`` and the cascade's config in
    ``<name>.yaml``, under the module's folder."""
    import yaml

    tmp = setup["tmp"]
    rng = np.random.default_rng(seed)
    src = tmp / f"{name}.jsonl"
    src.write_text(
        "".join(
            json.dumps({"id": f"{name}{i}", "text": t, "label": LABELS[int(rng.integers(2))]})
            + "\n"
            for i, t in enumerate(make_texts(n, seed=seed, max_words=30))
        )
    )
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({**setup["base"], "cascade": setup["cascade"]}))
    return src, path


def test_evaluate_scores_the_cascade_and_the_full_ensemble(ray_cluster, setup):
    """`evaluate` on a cascade: a real cascade run and a full one, side by side."""
    import pyarrow.parquet as pq

    from jobs.cli import main

    tmp = setup["tmp"]
    src, path = _labelled_set(setup, "t", 80, seed=43)
    report = tmp / "report"
    args = ["evaluate", str(path), "--input", str(src), "--label-column", "label"]
    assert main([*args, "--report", str(report)]) == 0
    metrics = json.loads((report / "metrics.json").read_text())
    block = metrics["cascade"]
    scored = pq.read_table(sorted((report / "scored").glob("*.parquet"))).to_pylist()
    full = pq.read_table(sorted((report / "scored-full").glob("*.parquet"))).to_pylist()
    y = np.array([LABELS.index(r["true_label"]) for r in scored])
    ours = np.array([r["probs"] for r in scored])
    theirs = np.array([r["probs"] for r in full])
    assert block["accuracy"] == pytest.approx(np.mean(ours.argmax(-1) == y))
    assert block["full"]["accuracy"] == pytest.approx(np.mean(theirs.argmax(-1) == y))
    assert metrics["ensemble"]["accuracy"] == block["accuracy"]
    stages = np.array([r["cascade_stage"] for r in scored])
    np.testing.assert_allclose(block["stage_shares"], np.bincount(stages - 1, minlength=3) / 80)
    assert "cascade_stage" not in full[0]
    assert block["member_s_per_row"] > 0 and block["full"]["member_s_per_row"] > 0
    # Members' own metrics come from the full run, where each scored every row.
    alpha = np.array([r["probs__alpha"] for r in full])
    assert metrics["members"]["alpha"]["accuracy"] == pytest.approx(np.mean(alpha.argmax(-1) == y))
    md = (report / "report.md").read_text()
    assert "cost_accuracy.png" in md and (report / "cost_accuracy.png").is_file()
    assert "Cascade against the full ensemble" in md


def test_evaluate_no_compare_full_scores_the_cascade_alone(ray_cluster, setup):
    """`evaluate --no-compare-full`: the cascade's run only; each member judged on the
    rows it ran."""
    import pyarrow.parquet as pq

    from jobs.cli import main

    tmp = setup["tmp"]
    src, path = _labelled_set(setup, "a", 60, seed=47)
    report = tmp / "report-alone"
    args = ["evaluate", str(path), "--input", str(src), "--label-column", "label"]
    assert main([*args, "--report", str(report), "--no-compare-full"]) == 0
    assert not (report / "scored-full").exists()
    metrics = json.loads((report / "metrics.json").read_text())
    block = metrics["cascade"]
    assert block["full"] is None and block["member_s_per_row"] > 0
    scored = pq.read_table(sorted((report / "scored").glob("*.parquet"))).to_pylist()
    y = np.array([LABELS.index(r["true_label"]) for r in scored])
    stages = np.array([r["cascade_stage"] for r in scored])
    np.testing.assert_allclose(block["stage_shares"], np.bincount(stages - 1, minlength=3) / 60)
    ours = np.array([r["probs"] for r in scored])
    assert block["accuracy"] == pytest.approx(np.mean(ours.argmax(-1) == y))
    for i, name in enumerate(NAMES):
        ran = stages > i
        assert ran.any()
        p = np.array([r[f"probs__{name}"] for r, keep in zip(scored, ran, strict=True) if keep])
        assert all(
            r[f"probs__{name}"] is None for r, keep in zip(scored, ran, strict=True) if not keep
        )
        expected = np.mean(p.argmax(-1) == y[ran])
        assert metrics["members"][name]["accuracy"] == pytest.approx(expected)
    assert "gain" not in metrics
    md = (report / "report.md").read_text()
    assert "not run (`--no-compare-full`)" in md and "cost_accuracy.png" not in md
