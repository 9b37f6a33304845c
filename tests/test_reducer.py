"""The reducer's math against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from actors.reducer import (
    AlignmentError,
    agreement,
    align_logits,
    build_label_index,
    combine,
    combine_embeddings,
    entropy,
    member_top,
    normalise,
    reduce_classification,
    vote_labels,
)

NAN = float("nan")


def softmax2(a: float, b: float) -> list[float]:
    ea, eb = math.exp(a), math.exp(b)
    return [ea / (ea + eb), eb / (ea + eb)]


def test_softmax_with_temperature():
    p = normalise(np.array([[1.0, 2.0]]), temperature=2.0, multi_label=False)
    np.testing.assert_allclose(p[0], softmax2(0.5, 1.0), rtol=1e-12)


def test_softmax_ignores_missing_labels():
    p = normalise(np.array([[1.0, NAN, 3.0]]), temperature=1.0, multi_label=False)
    assert math.isnan(p[0, 1])
    np.testing.assert_allclose(p[0, [0, 2]], softmax2(1.0, 3.0), rtol=1e-12)


def test_unscored_row_stays_nan():
    p = normalise(np.array([[NAN, NAN]]), temperature=1.0, multi_label=False)
    assert np.isnan(p).all()


def test_sigmoid_for_multi_label():
    p = normalise(np.array([[0.0, math.log(3.0)]]), temperature=1.0, multi_label=True)
    np.testing.assert_allclose(p[0], [0.5, 0.75], rtol=1e-12)


def test_single_logit_head_is_binary():
    aligned = align_logits(np.array([[2.0]]), (1,), 2, single_logit=True)
    p = normalise(aligned, temperature=1.0, multi_label=False)
    positive = 1 / (1 + math.exp(-2.0))
    np.testing.assert_allclose(p[0], [1 - positive, positive], rtol=1e-12)


def test_align_scatters_into_canonical_order():
    out = align_logits(np.array([[1.0, 2.0]]), (2, 0), 3)
    np.testing.assert_array_equal(out[0, [0, 2]], [2.0, 1.0])
    assert math.isnan(out[0, 1])


def test_label_index_by_name_case_insensitive_and_by_map():
    assert build_label_index(["POSITIVE", "negative"], ["negative", "positive"]) == (1, 0)
    assert build_label_index(
        ["LABEL_0", "LABEL_1"], ["neg", "pos"], {"LABEL_0": "pos", "LABEL_1": "neg"}
    ) == (1, 0)


@pytest.mark.parametrize(
    ("labels", "label_map", "needle"),
    [
        (["LABEL_0", "LABEL_1"], None, "add a label_map"),
        (["a", "b"], {"c": "neg"}, "not labels of this model"),
        (["a", "b"], {"a": "maybe", "b": "neg"}, "not one of the ensemble labels"),
        (["a", "b"], {"a": "neg", "b": "neg"}, "two model labels"),
    ],
)
def test_label_index_errors(labels, label_map, needle):
    with pytest.raises(AlignmentError, match=needle):
        build_label_index(labels, ["neg", "pos"], label_map)


P1 = [0.2, 0.8]
P2 = [0.6, 0.4]


def probs(*rows):
    return np.array([[r] for r in rows], dtype=float)  # (M, n=1, L)


def test_weighted_mean():
    out = combine(probs(P1, P2), np.array([3.0, 1.0]), "weighted_mean", multi_label=False)
    np.testing.assert_allclose(out[0], [(3 * 0.2 + 0.6) / 4, (3 * 0.8 + 0.4) / 4])


def test_mean_ignores_weights():
    out = combine(probs(P1, P2), np.array([3.0, 1.0]), "mean", multi_label=False)
    np.testing.assert_allclose(out[0], [0.4, 0.6])


def test_missing_label_gets_no_vote_and_weights_renormalise_per_class():
    a = [0.2, 0.3, 0.5]
    b = [0.4, NAN, 0.6]
    out = combine(probs(a, b), np.array([1.0, 1.0]), "weighted_mean", multi_label=False)
    raw = [(0.2 + 0.4) / 2, 0.3, (0.5 + 0.6) / 2]
    np.testing.assert_allclose(out[0], np.array(raw) / sum(raw))


def test_geometric_mean():
    out = combine(probs(P1, P2), np.array([1.0, 1.0]), "geometric_mean", multi_label=False)
    a, b = math.sqrt(0.2 * 0.6), math.sqrt(0.8 * 0.4)
    np.testing.assert_allclose(out[0], [a / (a + b), b / (a + b)])


def test_weighted_geometric_mean():
    out = combine(probs(P1, P2), np.array([3.0, 1.0]), "geometric_mean", multi_label=False)
    a, b = (0.2**3 * 0.6) ** 0.25, (0.8**3 * 0.4) ** 0.25
    np.testing.assert_allclose(out[0], [a / (a + b), b / (a + b)])


def test_geometric_mean_multi_label_is_bernoulli_pooling():
    out = combine(
        np.array([[[0.9]], [[0.5]]]), np.array([1.0, 1.0]), "geometric_mean", multi_label=True
    )
    # sqrt(0.9*0.5) / (sqrt(0.9*0.5) + sqrt(0.1*0.5)) = 3 / 4
    np.testing.assert_allclose(out[0], [0.75])


def test_max_takes_the_most_confident_member():
    out = combine(probs(P1, [0.95, 0.05], P2), np.ones(3), "max", multi_label=False)
    np.testing.assert_allclose(out[0], [0.95, 0.05])


def test_majority_vote_weighted():
    members = probs([0.9, 0.1], [0.3, 0.7], [0.4, 0.6])
    mean = combine(members, np.ones(3), "majority_vote", multi_label=False)
    assert vote_labels(members, np.ones(3), mean, multi_label=False)[0] == 1
    weighted = np.array([3.0, 1.0, 1.0])
    mean_w = combine(members, weighted, "majority_vote", multi_label=False)
    assert vote_labels(members, weighted, mean_w, multi_label=False)[0] == 0


def test_majority_vote_tie_goes_to_higher_mean_probability():
    # one vote each; mean probability of label 0 is (0.9 + 0.4) / 2 = 0.65
    members = probs([0.9, 0.1], [0.4, 0.6])
    mean = combine(members, np.ones(2), "majority_vote", multi_label=False)
    assert vote_labels(members, np.ones(2), mean, multi_label=False)[0] == 0
    members = probs([0.55, 0.45], [0.1, 0.9])
    mean = combine(members, np.ones(2), "majority_vote", multi_label=False)
    assert vote_labels(members, np.ones(2), mean, multi_label=False)[0] == 1


def test_agreement_is_weight_share():
    tops = np.array([[1], [0], [1]])
    np.testing.assert_allclose(agreement(tops, np.array([2.0, 1.0, 1.0]), np.array([1])), [0.75])


def test_member_top_skips_missing_labels():
    p = np.array([[[NAN, 0.3, 0.7]], [[NAN, NAN, NAN]]])
    np.testing.assert_array_equal(member_top(p), [[2], [-1]])


def test_entropy():
    np.testing.assert_allclose(
        entropy(np.array([[0.5, 0.5], [1.0, 0.0]]), multi_label=False), [math.log(2), 0.0]
    )
    expected = -(0.25 * math.log(0.25) + 0.75 * math.log(0.75))
    np.testing.assert_allclose(entropy(np.array([[0.25, 1.0]]), multi_label=True), [expected])


def test_reduce_classification_end_to_end():
    z1 = np.array([[0.0, 1.0], [NAN, NAN]])
    z2 = np.array([[2.0, 0.0], [NAN, NAN]])
    red = reduce_classification(
        [z1, z2],
        member_names=["a", "b"],
        temperatures=[1.0, 2.0],
        weights=[1.0, 3.0],
        method="weighted_mean",
        multi_label=False,
        valid=np.array([True, False]),
    )
    pa_, pb = softmax2(0.0, 1.0), softmax2(1.0, 0.0)
    expected = [(pa_[0] + 3 * pb[0]) / 4, (pa_[1] + 3 * pb[1]) / 4]
    np.testing.assert_allclose(red.probs[0], expected)
    assert red.label[0] == 0 and red.score[0] == pytest.approx(expected[0])
    assert red.agreement[0] == pytest.approx(0.75)  # b (weight 3) agrees, a does not
    assert red.entropy[0] == pytest.approx(-sum(p * math.log(p) for p in expected))
    assert np.isnan(red.probs[1]).all() and math.isnan(red.score[1])
    assert red.error == [None, None]


def test_non_finite_logits_become_a_row_error():
    red = reduce_classification(
        [np.array([[np.inf, 0.0], [0.0, 1.0]])],
        member_names=["a"],
        temperatures=[1.0],
        weights=[1.0],
        method="mean",
        multi_label=False,
    )
    assert red.error[0] == "member 'a' returned non-finite logits"
    assert red.error[1] is None and math.isnan(red.score[0])


def test_embeddings_concat_and_mean_are_normalised():
    a = np.array([[3.0, 4.0]])
    b = np.array([[0.0, 2.0]])
    cat = combine_embeddings([a, b], [1.0, 1.0], "concat")
    np.testing.assert_allclose(cat[0], np.array([0.6, 0.8, 0.0, 1.0]) / math.sqrt(2))
    mean = combine_embeddings([a, b], [1.0, 1.0], "mean")
    v = np.array([0.6, 1.8]) / 2
    np.testing.assert_allclose(mean[0], v / np.linalg.norm(v))
    with pytest.raises(ValueError, match="one dimension"):
        combine_embeddings([a, np.ones((1, 3))], [1.0, 1.0], "mean")
