"""pipeline.metrics against scikit-learn and hand-computed answers."""

import numpy as np
import pytest
from sklearn import metrics as skm

from pipeline import metrics as M


@pytest.fixture
def scores_labels():
    rng = np.random.default_rng(0)
    N, C = 200, 7
    y = rng.integers(0, C, N)
    scores = rng.normal(size=(N, C)) + 1.5 * np.eye(C)[y]  # informative but imperfect
    scores[:20] = np.round(scores[:20])  # some ties
    return scores, y


def test_top_k_accuracy_matches_sklearn(scores_labels):
    scores, y = scores_labels
    C = scores.shape[1]
    scores = scores + 1e-6 * np.arange(C)  # no ties: sklearn breaks them towards the higher index, we the lower
    for k in (1, 2, 5):
        want = skm.top_k_accuracy_score(y, scores, k=k, labels=np.arange(C))
        assert M.hit_at_k(scores, y, k) == pytest.approx(want)
    assert M.accuracy(scores, y) == pytest.approx(skm.accuracy_score(y, scores.argmax(1)))


def test_average_precision_matches_sklearn(scores_labels):
    scores, y = scores_labels
    onehot = np.eye(scores.shape[1])[y]
    want = [skm.average_precision_score(onehot[:, c], scores[:, c]) for c in range(scores.shape[1])]
    np.testing.assert_allclose(M.average_precision(scores, y), want, rtol=1e-12)
    assert M.mean_average_precision(scores, y) == pytest.approx(np.mean(want))


def test_ties_break_towards_lower_class_like_argmax():
    scores = np.array([[1.0, 1.0, 0.0], [0.0, 2.0, 2.0]])
    np.testing.assert_array_equal(M.top_k(scores, 1)[:, 0], scores.argmax(1))


def test_average_precision_with_ties_matches_sklearn():
    truth = np.array([1, 0, 1, 0, 0, 1], dtype=bool)
    s = np.array([0.5, 0.5, 0.2, 0.2, 0.9, 0.5])
    want = skm.average_precision_score(truth, s)
    got = M.average_precision(s[:, None], truth[:, None])[0]
    assert got == pytest.approx(want)


def test_average_precision_absent_class_is_nan_and_left_out_of_map():
    scores = np.array([[0.9, 0.1, 0.0], [0.2, 0.8, 0.0]])
    y = np.array([0, 1])
    ap = M.average_precision(scores, y)
    assert ap[0] == 1.0 and ap[1] == 1.0 and np.isnan(ap[2])
    assert M.mean_average_precision(scores, y) == 1.0


def test_confusion_and_per_class_accuracy(scores_labels):
    scores, y = scores_labels
    C = scores.shape[1]
    pred = scores.argmax(1)
    cm = M.confusion_matrix(y, pred, C)
    np.testing.assert_array_equal(cm, skm.confusion_matrix(y, pred, labels=np.arange(C)))
    np.testing.assert_allclose(M.per_class_accuracy(y, pred, C), skm.recall_score(y, pred, average=None))


def test_multilabel_hit_at_k_counts_any_true_label():
    scores = np.array([[0.9, 0.5, 0.1], [0.1, 0.2, 0.7], [0.3, 0.2, 0.1]])
    truth = np.array([[0, 1, 1], [1, 0, 1], [0, 1, 0]], dtype=bool)
    # top-1: 0 (miss), 2 (hit), 0 (miss); top-2: {0,1} hit, {2,1} hit, {0,1} hit
    assert M.hit_at_k(scores, truth, 1) == pytest.approx(1 / 3)
    assert M.hit_at_k(scores, truth, 2) == pytest.approx(1.0)
    want = [skm.average_precision_score(truth[:, c], scores[:, c]) for c in range(3)]
    np.testing.assert_allclose(M.average_precision(scores, truth), want)


def test_mean_std_and_report():
    assert M.mean_std([0.9, 0.8, 0.7]) == pytest.approx((0.8, np.std([0.9, 0.8, 0.7], ddof=1)))
    assert M.mean_std([0.5])[0] == 0.5 and np.isnan(M.mean_std([0.5])[1])  # one run: no spread
    scores = np.array([[2.0, 1.0, 0.0], [0.0, 3.0, 1.0], [1.0, 0.0, 0.5]])
    y = np.array([0, 2, 2])
    r = M.classification_report(scores, y, ["a", "b", "c"])
    assert r["accuracy"] == pytest.approx(1 / 3) and r["hit@5"] == 1.0 and r["n_test"] == 3
    assert r["per_class_accuracy"] == {"a": 1.0, "b": None, "c": 0.0}
    assert r["per_class_ap"]["b"] is None
    assert r["confusion"] == [[1, 0, 0], [0, 0, 0], [1, 1, 0]]
