"""Fit, stacking and metrics math against independent computations (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
import yaml
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss

from actors.reducer import combine, normalise, stack, stacking_features
from pipelines.config import ConfigError, config_from_dict, load_config
from pipelines.evaluation import brier, classification_metrics, ece
from pipelines.fitting import (
    CV_FOLDS,
    cv_folds,
    fit_stacking,
    fit_temperature,
    fit_weights,
    label_indices,
    nll,
)
from pipelines.io import InputError
from pipelines.stacking import StackingModel


def sample(probs: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    cum = probs.cumsum(axis=1)
    return (rng.random((len(probs), 1)) > cum).sum(axis=1)


def test_fit_temperature_recovers_the_true_temperature():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=4.0, size=(6000, 3))
    y = sample(normalise(z, temperature=2.5, multi_label=False), rng)
    t = fit_temperature(z, y)
    assert t == pytest.approx(2.5, rel=0.12)
    fitted = nll(normalise(z, temperature=t, multi_label=False), y)
    assert fitted < nll(normalise(z, temperature=1.0, multi_label=False), y)
    # nll agrees with scikit-learn's log loss
    p = normalise(z, temperature=t, multi_label=False)
    assert fitted == pytest.approx(log_loss(y, p, labels=[0, 1, 2]), rel=1e-9)


def test_fit_weights_favours_the_informative_member_and_lowers_nll():
    rng = np.random.default_rng(1)
    n = 3000
    y = rng.integers(0, 2, n)
    good = np.where(y[:, None] == np.arange(2), 0.8, 0.2)
    noise = rng.dirichlet([1, 1], n)
    member_probs = np.stack([good, noise])
    w = fit_weights(member_probs, y, "weighted_mean")
    assert w.min() >= 0 and w.sum() == pytest.approx(1.0)
    assert w[0] > 0.8
    uniform = nll(combine(member_probs, np.ones(2), "weighted_mean", multi_label=False), y)
    assert nll(combine(member_probs, w, "weighted_mean", multi_label=False), y) < uniform


@pytest.mark.parametrize("num_labels", [2, 3])
def test_stacking_matches_scikit_learn(num_labels):
    rng = np.random.default_rng(num_labels)
    n = 800
    y = rng.integers(0, num_labels, n)
    logits = [rng.normal(size=(n, num_labels)) + 2.0 * np.eye(num_labels)[y] * s for s in (1, 0.3)]
    member_probs = np.stack([normalise(z, temperature=1.0, multi_label=False) for z in logits])
    labels = [f"l{i}" for i in range(num_labels)]
    model = fit_stacking(member_probs, y, labels, ["a", "b"])
    reference = LogisticRegression(C=1.0, max_iter=5000).fit(stacking_features(member_probs), y)
    ours = stack(member_probs, model.coef, model.intercept)
    np.testing.assert_allclose(
        ours, reference.predict_proba(stacking_features(member_probs)), atol=1e-6
    )
    # features: member-major log-probabilities
    np.testing.assert_allclose(
        stacking_features(member_probs)[:, num_labels : 2 * num_labels], np.log(member_probs[1])
    )


def test_stacking_file_round_trip_and_mismatches(tmp_path, models):
    base = {
        "name": "s",
        "labels": ["negative", "positive"],
        "members": [{"name": "alpha", "model": str(models["alpha"])}],
    }
    cfg = config_from_dict(base, base_dir=tmp_path)
    model = StackingModel(("negative", "positive"), ("alpha",), np.eye(2), np.array([0.1, -0.1]))
    path = tmp_path / "m.stacking.json"
    model.save(path)
    back = StackingModel.load(path, cfg)
    np.testing.assert_array_equal(back.coef, model.coef)
    np.testing.assert_array_equal(back.intercept, model.intercept)
    other = config_from_dict({**base, "labels": ["positive", "negative"]}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="fitted for labels"):
        StackingModel.load(path, other)
    StackingModel(("negative", "positive"), ("alpha",), np.eye(3), np.zeros(2)).save(path)
    with pytest.raises(ConfigError, match="do not fit"):
        StackingModel.load(path, cfg)
    # combine: stacking needs its file, named in the message
    with pytest.raises(ConfigError, match="reducer.stacking"):
        config_from_dict({**base, "reducer": {"combine": "stacking"}}, base_dir=tmp_path)
    with pytest.raises(ConfigError, match="does not exist"):
        config_from_dict(
            {**base, "reducer": {"combine": "stacking", "stacking": "nope.json"}},
            base_dir=tmp_path,
        )


def test_metrics_against_hand_and_scikit_learn():
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.7, 0.3], [0.2, 0.8]])
    y = np.array([0, 0, 1, 1])
    # Brier by hand: (0.01+0.01) + (0.36+0.36) + (0.49+0.49) + (0.04+0.04) = 1.8 / 4
    assert brier(probs, y) == pytest.approx(0.45)
    # ECE, 15 bins: confidences 0.9, 0.6, 0.7, 0.8 fall in separate bins;
    # correct: yes, no, no, yes -> |1-.9| + |0-.6| + |0-.7| + |1-.8| = 1.6 / 4
    assert ece(probs, y) == pytest.approx(0.4)
    m = classification_metrics(probs, y)
    assert m["accuracy"] == accuracy_score(y, probs.argmax(1))
    assert m["macro_f1"] == pytest.approx(f1_score(y, probs.argmax(1), average="macro"))
    assert m["nll"] == pytest.approx(log_loss(y, probs))


def test_label_indices():
    got = label_indices(["Positive", None, "negative", " "], ["negative", "positive"], "label")
    assert got.tolist() == [1, -1, 0, -1]
    with pytest.raises(InputError, match=r"values \['neutral'\] are not labels"):
        label_indices(["neutral", "positive"], ["negative", "positive"], "label")


def test_gain_over_best_member_matches_an_independent_paired_bootstrap():
    from pipelines.evaluation import gain_over_best_member

    rng = np.random.default_rng(3)
    n = 400
    y = rng.integers(0, 3, n)

    def member(acc: float) -> np.ndarray:
        p = rng.dirichlet(np.ones(3), n)
        right = rng.random(n) < acc
        top = np.where(right, y, (y + 1) % 3)
        p[np.arange(n), top] += 1.0
        return p / p.sum(axis=1, keepdims=True)

    probs = {"a": member(0.6), "b": member(0.7), "ensemble": member(0.78)}
    gain = gain_over_best_member(probs, y, ["a", "b"])
    correct = {k: (v.argmax(1) == y).astype(float) for k, v in probs.items()}
    best = max(["a", "b"], key=lambda k: correct[k].mean())
    assert gain["best_member"] == best
    acc = gain["accuracy"]
    assert acc["delta"] == pytest.approx(correct["ensemble"].mean() - correct[best].mean())
    # The same rows resampled for both: a plain loop, another generator.
    draw = np.random.default_rng(99).integers(0, n, (4000, n))
    deltas = correct["ensemble"][draw].mean(1) - correct[best][draw].mean(1)
    lo, hi = np.percentile(deltas, [2.5, 97.5])
    assert acc["low"] == pytest.approx(lo, abs=0.01) and acc["high"] == pytest.approx(hi, abs=0.01)
    loss = {k: -np.log(v[np.arange(n), y]) for k, v in probs.items()}
    assert gain["nll"]["delta"] == pytest.approx(loss["ensemble"].mean() - loss[best].mean())
    assert gain["nll"]["low"] <= gain["nll"]["delta"] <= gain["nll"]["high"]
    # An ensemble that equals its best member shows no gain at all.
    same = gain_over_best_member({**probs, "ensemble": probs[best]}, y, ["a", "b"])
    assert same["accuracy"]["low"] == same["accuracy"]["high"] == 0.0


def test_fit_warns_when_the_ensemble_does_not_beat_its_best_member():
    from pipelines.fitting import FitResult

    rng = np.random.default_rng(5)
    y = rng.integers(0, 2, 300)
    good = np.where(rng.random(300) < 0.9, y, 1 - y)
    logits = [np.eye(2)[good] * 4.0, rng.normal(size=(300, 2))]  # a strong member and noise
    probs = np.stack([normalise(z, temperature=1.0, multi_label=False) for z in logits])

    def result(weights):
        p = combine(probs, np.asarray(weights), "weighted_mean", multi_label=False)
        return FitResult(
            combine="weighted_mean",
            temperatures=[1.0, 1.0],
            weights=list(weights),
            stacking=None,
            rows=300,
            member_nll={"strong": (nll(probs[0], y),) * 2, "noise": (nll(probs[1], y),) * 2},
            ensemble_nll=(nll(p, y), nll(p, y)),
        )

    # Equal weights drag the strong member down: the warning names it.
    warning = result([0.5, 0.5]).no_gain_warning()
    assert warning is not None and "Score with strong alone" in warning
    # All weight on the strong member equals it: still no gain, still a warning.
    assert result([1.0, 0.0]).no_gain_warning() is not None
    # Two members that err independently: their mean beats either, so no warning.
    other = np.where(rng.random(300) < 0.9, y, 1 - y)
    logits2 = [np.eye(2)[good] * 1.5, np.eye(2)[other] * 1.5]
    probs2 = np.stack([normalise(z, temperature=1.0, multi_label=False) for z in logits2])
    mean = combine(probs2, np.array([0.5, 0.5]), "weighted_mean", multi_label=False)
    diverse = FitResult(
        combine="weighted_mean",
        temperatures=[1.0, 1.0],
        weights=[0.5, 0.5],
        stacking=None,
        rows=300,
        member_nll={"a": (nll(probs2[0], y),) * 2, "b": (nll(probs2[1], y),) * 2},
        ensemble_nll=(nll(mean, y), nll(mean, y)),
    )
    assert nll(mean, y) < min(nll(probs2[0], y), nll(probs2[1], y))
    assert diverse.no_gain_warning() is None


def test_fit_auto_picks_the_best_cross_validated_combination(models, tmp_path):
    from pipelines.fitting import SHRINKAGE, LabelledOutputs, fit_ensemble
    from pipelines.plan import plan_ensemble

    cfg = config_from_dict(
        {
            "name": "f",
            "labels": ["negative", "positive"],
            "members": [
                {"name": "a", "model": str(models["alpha"])},
                {"name": "b", "model": str(models["alpha"])},
                {"name": "c", "model": str(models["alpha"])},
            ],
        },
        base_dir=tmp_path,
    )
    plan = plan_ensemble(cfg)
    rng = np.random.default_rng(11)
    n = 600
    y = rng.integers(0, 2, n)
    # Two members that err independently, and one that is mostly noise.
    logits = [
        (np.eye(2)[np.where(rng.random(n) < acc, y, 1 - y)] - 0.5) * scale
        + rng.normal(scale=0.3, size=(n, 2))
        for acc, scale in ((0.8, 3.0), (0.8, 3.0), (0.55, 1.0))
    ]
    data = LabelledOutputs(["a", "b", "c"], logits, y, 0)
    result = fit_ensemble(plan, data, "auto")
    by_name = {c.combine: c for c in result.candidates}
    assert set(by_name) == {"mean", "weighted_mean", "geometric_mean", "stacking"}
    assert result.combine == min(result.candidates, key=lambda c: c.cv_nll).combine
    # `mean` fits nothing, so its held-out NLL is its plain NLL: an independent check.
    probs = np.stack(
        [
            normalise(z, temperature=t, multi_label=False)
            for z, t in zip(logits, result.temperatures, strict=True)
        ]
    )
    assert by_name["mean"].cv_nll == pytest.approx(nll(probs.mean(axis=0), y), rel=1e-9)
    for method in ("weighted_mean", "geometric_mean"):
        assert by_name[method].shrinkage in SHRINKAGE
    assert sum(result.weights) == pytest.approx(1.0)
    # Diverse members beat the best one: no warning.
    assert result.no_gain_warning() is None
    assert result.candidates and min(c.cv_nll for c in result.candidates) < result.best_member()[1]


def test_fitted_config_paths_work_from_any_folder(models, tmp_path, monkeypatch):
    """Every relative path the user wrote is rewritten relative to the fitted config's
    folder: it loads from another working directory, and from a copy of the project made
    elsewhere, with its tokenizer path at the real tokenizer folder."""
    import shutil
    from pathlib import Path

    import yaml
    from transformers import AutoTokenizer

    from jobs.example import build_tokenizer
    from pipelines.config import load_config
    from pipelines.fitting import FitResult, write_fitted_config

    project = tmp_path / "project"
    for name in ("alpha", "full", "base"):
        shutil.copytree(models["alpha"], project / "models" / name)
    tokenizer = project / "tokenizers" / "upper"
    build_tokenizer(tokenizer, lowercase=False)  # not the model folder's own tokenizer
    config = project / "configs" / "ensemble.yaml"
    config.parent.mkdir()
    config.write_text(
        yaml.safe_dump(
            {
                "name": "paths",
                "labels": ["negative", "positive"],
                "members": [
                    {
                        "name": "alpha",
                        "model": "../models/alpha",
                        "tokenizer": "../tokenizers/upper",
                    },
                    {"name": "beta", "model": str(models["beta"])},  # absolute: kept as is
                    {
                        "name": "full",
                        "model": "../models/full",
                        "train": {"base_model": "../models/base"},
                    },
                ],
            }
        )
    )
    cfg = load_config(config)
    labels, names = ("negative", "positive"), ("alpha", "beta", "full")
    result = FitResult(
        combine="stacking",
        temperatures=[1.5, 1.0, 0.5],
        weights=[0.2, 0.3, 0.5],
        stacking=StackingModel(labels, names, np.ones((2, 6)), np.zeros(2)),
        rows=10,
        member_nll={n: (0.7, 0.6) for n in names},
        ensemble_nll=(0.7, 0.5),
    )
    fitted = project / "fitted" / "deep" / "ensemble.fitted.yaml"
    write_fitted_config(config, fitted, cfg, result, revisions={"beta": "c" * 40})

    raw = yaml.safe_load(fitted.read_text())
    alpha, beta, full = raw["members"]
    assert alpha["model"] == "../../models/alpha"
    assert alpha["tokenizer"] == "../../tokenizers/upper"
    assert full["model"] == "../../models/full"
    assert full["train"]["base_model"] == "../../models/base"
    assert beta["model"] == str(models["beta"])
    assert beta["revision"] == "c" * 40 and "revision" not in alpha
    assert raw["reducer"]["stacking"] == "ensemble.fitted.stacking.json"

    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for root in (project, tmp_path / "moved" / "project"):
        if not root.exists():  # the project (models, configs, fitted) copied elsewhere
            shutil.copytree(project, root)
        loaded = load_config(root / "fitted" / "deep" / "ensemble.fitted.yaml")
        a, b, f = loaded.members
        assert Path(a.model) == (root / "models" / "alpha").resolve()
        assert Path(a.tokenizer) == (root / "tokenizers" / "upper").resolve()
        assert Path(f.train.base_model) == (root / "models" / "base").resolve()
        assert b.model == str(models["beta"])
        assert Path(loaded.reducer.stacking).parent == (root / "fitted" / "deep").resolve()
        # The tokenizer path is the real tokenizer: cased, unlike the model folder's own.
        ids = AutoTokenizer.from_pretrained(a.tokenizer)("Fine")["input_ids"]
        assert ids == AutoTokenizer.from_pretrained(str(tokenizer))("Fine")["input_ids"]
        assert ids != AutoTokenizer.from_pretrained(a.model)("Fine")["input_ids"]


def test_cv_keeps_each_sentence_in_one_fold():
    """Words of one sentence are not independent rows: a fold holds whole sentences."""
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), rng.integers(1, 9, size=40))
    y = rng.integers(0, 3, size=len(groups))
    folds = cv_folds(y, 0, groups)
    assert len(folds) == CV_FOLDS
    tested = np.zeros(len(y), dtype=int)
    for train, test in folds:
        assert not set(groups[train]) & set(groups[test])
        assert len(train) + len(test) == len(y)
        tested[test] += 1
    assert (tested == 1).all()
    # Without groups, rows are split one by one (here stratified by label).
    assert any(set(groups[train]) & set(groups[test]) for train, test in cv_folds(y, 0))


def test_fit_stacking_on_a_cascade_config_fits_its_stage_prefixes(models, tmp_path):
    """`fit --combine stacking` without --cascade keeps the config's cascade working: a
    meta-model for each of its stage prefixes, fitted on every row (scikit-learn on the
    same features, independently), and the written config plans."""
    from pipelines.fitting import LabelledOutputs, fit_ensemble, write_fitted_config
    from pipelines.plan import plan_ensemble

    data = {
        "name": "f",
        "labels": ["negative", "positive"],
        "members": [{"name": n, "model": str(models["alpha"])} for n in ("a", "b", "c")],
        "cascade": {"stages": [["c"], ["a"], ["b"]], "exit_at": [0.9, 0.8]},
    }
    cfg = config_from_dict(data, base_dir=tmp_path)
    rng = np.random.default_rng(12)
    n = 400
    y = rng.integers(0, 2, n)
    logits = [
        (np.eye(2)[np.where(rng.random(n) < acc, y, 1 - y)] - 0.5) * 3.0
        + rng.normal(scale=0.3, size=(n, 2))
        for acc in (0.8, 0.75, 0.7)
    ]
    result = fit_ensemble(
        plan_ensemble(cfg), LabelledOutputs(["a", "b", "c"], logits, y, 0), "stacking"
    )
    assert [p.members for p in result.stacking.prefixes] == [("c",), ("a", "c")]
    probs = np.stack(
        [
            normalise(z, temperature=t, multi_label=False)
            for z, t in zip(logits, result.temperatures, strict=True)
        ]
    )
    for meta, idx in zip(result.stacking.prefixes, ([2], [0, 2]), strict=True):
        lr = LogisticRegression(C=1.0, max_iter=5000).fit(stacking_features(probs[idx]), y)
        np.testing.assert_allclose(
            stack(probs[idx], meta.coef, meta.intercept),
            lr.predict_proba(stacking_features(probs[idx])),
            atol=1e-6,
        )
    (tmp_path / "in.yaml").write_text(yaml.safe_dump(data))
    out = write_fitted_config(tmp_path / "in.yaml", tmp_path / "out.yaml", cfg, result)
    plan = plan_ensemble(load_config(out))
    assert plan.config.cascade is not None and len(plan.stacking.prefixes) == 2
