"""Multi-label data (several classes per video, ``label1|label2`` in a CSV): the manifest, the metrics of such data
(GAP@20 against a hand-computed answer and an independent computation, mAP against scikit-learn), the per-class
sigmoid loss of every torch head, and a run trained end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import sklearn.metrics as skm
import torch

from pipeline import metrics as M
from pipeline.datasets import ManifestError, load_manifest
from pipeline.heads import HEADS
from pipeline.store import FeatureStore
from pipeline.training import batch_loss

torch.set_num_threads(1)


# ---------------------------------------------------------------- metrics

SCORES = np.array([[0.9, 0.8, 0.1, 0.0],
                   [0.2, 0.7, 0.6, 0.3],
                   [0.5, 0.05, 0.4, 0.95]])
TRUTH = np.array([[1, 0, 1, 0],
                  [0, 0, 1, 0],
                  [0, 1, 0, 0]], dtype=bool)


def test_gap_known_answer():
    # top 2 per video, pooled and ranked: .95 F, .9 T, .8 F, .7 F, .6 T, .5 F; 4 true labels in all
    # GAP@2 = (1/2 + 2/5) / 4
    assert M.gap_at_k(SCORES, TRUTH, 2) == pytest.approx((1 / 2 + 2 / 5) / 4)
    # k >= C pools every pair: true labels at ranks 2, 5, 10 (.1) and 11 (.05)
    assert M.gap_at_k(SCORES, TRUTH, 20) == pytest.approx((1 / 2 + 2 / 5 + 3 / 10 + 4 / 11) / 4)
    # ... which is the average precision of the flattened list (micro AP), computed by scikit-learn
    assert M.gap_at_k(SCORES, TRUTH, 20) == pytest.approx(skm.average_precision_score(TRUTH.ravel(), SCORES.ravel()))


def gap_by_hand(scores: np.ndarray, truth: np.ndarray, k: int) -> float:
    """GAP written out as the YouTube-8M evaluation describes it, one prediction at a time."""
    pooled = []
    for s, t in zip(scores, truth):
        for c in sorted(range(len(s)), key=lambda c: -s[c])[:k]:
            pooled.append((s[c], bool(t[c])))
    pooled.sort(key=lambda p: -p[0])
    hits, total = 0, 0.0
    for i, (_, rel) in enumerate(pooled, start=1):
        if rel:
            hits += 1
            total += hits / i
    return total / truth.sum()


def test_gap_equals_an_independent_computation_and_labels_outside_the_top_count():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(40, 30))
    truth = rng.random((40, 30)) < 0.1
    truth[np.arange(40), rng.integers(0, 30, 40)] = True
    assert M.gap_at_k(scores, truth, 20) == pytest.approx(gap_by_hand(scores, truth, 20))
    assert M.gap_at_k(scores, truth, 3) == pytest.approx(gap_by_hand(scores, truth, 3))
    assert M.gap_at_k(scores, truth, 3) < M.gap_at_k(scores, truth, 20)  # labels never ranked cost recall
    perfect = np.where(truth, 1.0, 0.0) + 0.01 * rng.random(truth.shape)
    assert M.gap_at_k(perfect, truth, 30) == pytest.approx(1.0)


def test_gap_on_single_label_data():
    y = np.array([0, 2, 1])
    assert M.gap_at_k(SCORES[:, :3], y, 20) == pytest.approx(gap_by_hand(SCORES[:, :3], M.label_matrix(y, 3), 20))


def test_map_matches_scikit_learn_on_multilabel_data():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(60, 7))
    truth = rng.random((60, 7)) < 0.3
    truth[:7, :] |= np.eye(7, dtype=bool)  # every class has a positive
    assert M.mean_average_precision(scores, truth) == pytest.approx(
        skm.average_precision_score(truth, scores, average="macro"))


def test_multilabel_report():
    r = M.classification_report(SCORES, TRUTH, ["a", "b", "c", "d"])
    assert r["multi_label"] and r["n_test"] == 3
    assert r["accuracy"] == r["hit@1"] == pytest.approx(1 / 3)  # top-1: a (hit), b (miss), d (miss)
    assert r["gap@20"] == pytest.approx(M.gap_at_k(SCORES, TRUTH, 20))
    assert r["per_class_ap"]["d"] is None  # no positive
    assert "confusion" not in r and r["labels_per_video"] == pytest.approx(4 / 3)
    single = M.classification_report(SCORES, np.array([0, 2, 1]), ["a", "b", "c", "d"])
    assert "confusion" in single and "gap@20" in single and "multi_label" not in single


# ---------------------------------------------------------------- the manifest

def _touch(root, names):
    for n in names:
        (root / n).parent.mkdir(parents=True, exist_ok=True)
        (root / n).touch()


def test_csv_with_several_labels_is_multi_label(tmp_path):
    _touch(tmp_path, ["a.avi", "b.avi", "c.avi"])
    (tmp_path / "manifest.csv").write_text("path,label,split\na.avi,dog|cat,train\nb.avi,cat,train\n"
                                           "c.avi, bird | dog ,test\n")
    m = load_manifest(tmp_path)
    assert m.multi_label and m.classes == ["bird", "cat", "dog"]
    by = m.by_id()
    assert by["a.avi"].labels == (1, 2) and by["a.avi"].label == 2  # first listed: dog
    assert by["b.avi"].labels == (1,) and by["c.avi"].labels == (0, 2)


def test_single_label_csv_is_unchanged(tmp_path):
    _touch(tmp_path, ["a.avi", "b.avi"])
    (tmp_path / "manifest.csv").write_text("a.avi,dog\nb.avi,cat\n")
    m = load_manifest(tmp_path)
    assert not m.multi_label and all(v.labels == () for v in m.videos)
    (tmp_path / "manifest.csv").write_text("a.avi,dog|cat\nb.avi,cat\n")
    assert load_manifest(tmp_path).fingerprint() != m.fingerprint()


def test_empty_class_name_in_labels_is_one_clear_error(tmp_path):
    _touch(tmp_path, ["a.avi"])
    (tmp_path / "manifest.csv").write_text("a.avi,dog||cat\n")
    with pytest.raises(ManifestError, match=r"manifest\.csv:1: empty class name"):
        load_manifest(tmp_path)


# ---------------------------------------------------------------- training

@pytest.mark.parametrize("name", ["netvlad", "nextvlad", "attention-pool", "transformer", "ts-lstm", "lstm",
                                  "temporal-pool", "temporal-inception", "deep-lstm", "late-pool"])
def test_every_head_trains_with_a_sigmoid_per_class(name):
    small = {"netvlad": {"clusters": 4, "hidden": 16, "reduce": 8}, "nextvlad": {"clusters": 4, "hidden": 16, "reduce": 8},
             "deep-lstm": {"hidden": 8}, "late-pool": {"hidden": 16}, "transformer": {"d_model": 32, "ff": 32}}
    torch.manual_seed(0)
    head = HEADS.get(name).builder(HEADS.make_config(name, small.get(name, {})), 12, 4, (8, 4)).train()
    x = torch.randn(3, 10, 12)
    y = torch.tensor([[1.0, 0, 1, 0], [0, 1, 0, 0], [1, 1, 1, 0]])
    loss = batch_loss(head, x, None, y)
    head.eval()
    with torch.no_grad():
        logits = head(x)
    head.train()
    torch.manual_seed(0)
    assert loss.shape == () and torch.isfinite(loss)
    loss.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in head.parameters())
    assert logits.shape == (3, 4)


def write_multilabel_dataset(tmp_path, n_per_split=(96, 48), classes=("bird", "cat", "dog", "fish"), T=6, dim=8):
    """A CSV dataset (path,label,split with label1|label2 cells) and a store whose rgb features carry +2 on the
    component of every class a video has; one or two classes per video."""
    root, store = tmp_path / "data", tmp_path / "store"
    root.mkdir()
    rng = np.random.default_rng(0)
    lines = ["path,label,split"]
    with FeatureStore.writer(store, {"backbone": "synthetic"}, list(classes)) as w:
        for split, n in zip(("train", "test"), n_per_split):
            for i in range(n):
                labels = sorted(rng.choice(len(classes), size=1 + i % 2, replace=False).tolist())
                rel = f"{split}_{i:03d}.avi"
                (root / rel).touch()
                lines.append(f"{rel},{'|'.join(classes[c] for c in labels)},{split}")
                rgb = rng.normal(0, 1, (T, dim)).astype(np.float32)
                rgb[:, labels] += 2.0
                flow = rng.normal(0, 1, (T, 4)).astype(np.float32)
                w.add(rel, {"rgb": rgb.astype(np.float16), "flow": flow.astype(np.float16)},
                      meta={"frame_indices": np.arange(T), "fps": 25.0, "n_frames": T, "duration": T / 25})
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root, store


def test_multilabel_run_end_to_end_and_in_the_leaderboard(tmp_path):
    from stages.report import write_report
    from stages.train import TrainJob, train

    root, store = write_multilabel_dataset(tmp_path)
    job = TrainJob(store=str(store), dataset=str(root), head="attention-pool", streams=("rgb",),
                   out=str(tmp_path / "runs"), overrides=(("frames", "6"),))  # the store holds 6 frames
    res = train(job, progress=False, echo=lambda _: None)
    m = res.metrics
    assert m["multi_label"] and m["labels_per_video"] == pytest.approx(1.5)
    with np.load(res.path / "scores_test.npz") as z:
        labels, scores = z["labels"], z["scores"]
    assert labels.shape == scores.shape == (48, 4)
    assert m["gap@20"] == pytest.approx(gap_by_hand(scores, labels.astype(bool), 20))
    assert m["map"] == pytest.approx(skm.average_precision_score(labels, scores, average="macro"))
    assert m["map"] > 0.9 and m["hit@1"] > 0.9, m  # the classes are plain in the features
    assert json.loads((res.path / "metrics.json").read_text())["gap@20"] == pytest.approx(m["gap@20"])
    assert not (res.path / "confusion.png").exists()
    write_report(tmp_path / "runs", tmp_path / "report")
    board = (tmp_path / "report" / "leaderboard.md").read_text()
    assert "GAP@20" in board and f"{100 * m['gap@20']:.2f}" in board


def test_kernel_baselines_refuse_multilabel_data(tmp_path):
    from pipeline.errors import UserError
    from stages.train import TrainJob, train

    root, store = write_multilabel_dataset(tmp_path, n_per_split=(8, 4))
    with pytest.raises(UserError, match="single-label kernel baseline"):
        train(TrainJob(store=str(store), dataset=str(root), head="svm", streams=("rgb",), out=str(tmp_path / "r")),
              progress=False, echo=lambda _: None)
