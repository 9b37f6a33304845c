"""Fit, stacking and metrics math against independent computations (no Ray)."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score, log_loss

from actors.reducer import combine, normalise, stack, stacking_features
from pipelines.config import ConfigError, config_from_dict
from pipelines.evaluation import brier, classification_metrics, ece
from pipelines.fitting import fit_stacking, fit_temperature, fit_weights, label_indices, nll
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
