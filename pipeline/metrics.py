"""Classification metrics over per-video class scores (pure numpy, no I/O).

What the papers report:
- top-1 accuracy (Ma et al. Tables 3-10, Wu et al. UCF101 results);
- Hit@k, "the fraction of test samples that contain at least one of the ground truth labels in the top k
  predictions" (Karpathy et al. Section 4.1, Ng et al. Section 4 "Evaluation");
- average precision per class and their mean, mAP (Wu et al. Section 4.1 for CCV);
- Global Average Precision at k, GAP@20 (the YouTube-8M measure, Abu-El-Haija et al. 2016, Sec. 4.2): the top k
  predictions of every video pooled into one list ranked by score, and its average precision against the total
  number of ground-truth labels;
- per-class accuracy and the confusion matrix (for the run's plots);
- mean +- std over the three UCF101 / HMDB51 splits.

``scores`` is ``[N, C]`` (any monotone score: logits, probabilities, SVM decision values). Ground truth is
either a label vector ``[N]`` of class indices or a multi-label indicator matrix ``[N, C]`` (CCV, Sports-1M),
in which case a sample counts as a hit if any of its true labels is in the top k.
"""

from __future__ import annotations

import numpy as np

__all__ = [
    "accuracy",
    "average_precision",
    "classification_report",
    "confusion_matrix",
    "gap_at_k",
    "hit_at_k",
    "label_matrix",
    "mean_average_precision",
    "mean_std",
    "multilabel_report",
    "per_class_accuracy",
    "top_k",
]


def label_matrix(y: np.ndarray, num_classes: int) -> np.ndarray:
    """Ground truth as a boolean indicator matrix [N, C]; a label vector [N] is one-hot encoded."""
    y = np.asarray(y)
    if y.ndim == 2:
        if y.shape[1] != num_classes:
            raise ValueError(f"label matrix has {y.shape[1]} columns, scores have {num_classes}")
        return y.astype(bool)
    out = np.zeros((len(y), num_classes), dtype=bool)
    out[np.arange(len(y)), y.astype(np.int64)] = True
    return out


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k highest scores per row, best first. [N, C] -> [N, k].

    Ties break towards the lower class index (a stable sort of -scores), so results are reproducible.
    """
    scores = np.asarray(scores, dtype=np.float64)
    k = min(k, scores.shape[1])
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]  # [N, k]


def hit_at_k(scores: np.ndarray, y: np.ndarray, k: int = 1) -> float:
    """Fraction of samples with at least one true label among the top k predictions (Karpathy et al. 4.1)."""
    scores = np.asarray(scores)
    if len(scores) == 0:
        return float("nan")
    truth = label_matrix(y, scores.shape[1])  # [N, C]
    top = top_k(scores, k)  # [N, k]
    hits = np.take_along_axis(truth, top, axis=1).any(axis=1)  # [N]
    return float(hits.mean())


def accuracy(scores: np.ndarray, y: np.ndarray) -> float:
    """Top-1 accuracy; for multi-label ground truth this is Hit@1."""
    return hit_at_k(scores, y, 1)


def average_precision(scores: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Per-class average precision [C] (the step-wise area of scikit-learn's ``average_precision_score``).

    AP_c = sum over the positives of class c, ranked by score, of precision at that positive's rank, divided by
    the number of positives; tied scores enter the ranking together (precision at the end of the tie block).
    Classes with no positive sample get NaN (and are left out of the mean).
    """
    scores = np.asarray(scores, dtype=np.float64)
    truth = label_matrix(y, scores.shape[1])
    ap = np.full(scores.shape[1], np.nan)
    for c in range(scores.shape[1]):
        pos = truth[:, c]
        n_pos = pos.sum()
        if n_pos == 0:
            continue
        order = np.argsort(-scores[:, c], kind="stable")
        s, p = scores[order, c], pos[order]
        tp = np.cumsum(p)
        # Ties: evaluate precision/recall only at the last element of each block of equal scores.
        last = np.r_[s[1:] != s[:-1], True]
        tp_at, n_at = tp[last], np.flatnonzero(last) + 1
        precision = tp_at / n_at
        recall_gain = np.diff(np.r_[0, tp_at]) / n_pos
        ap[c] = float((precision * recall_gain).sum())
    return ap


def mean_average_precision(scores: np.ndarray, y: np.ndarray) -> float:
    """Mean of the per-class APs over classes with at least one positive (Wu et al. 4.1)."""
    ap = average_precision(scores, y)
    return float(np.nanmean(ap)) if np.isfinite(ap).any() else float("nan")


def gap_at_k(scores: np.ndarray, y: np.ndarray, k: int = 20) -> float:
    """Global Average Precision of the top ``k`` predictions per video (Abu-El-Haija et al. 2016, Sec. 4.2).

    The ``k`` highest-scoring (video, class) pairs of every video are pooled and ranked by score (ties: the order
    of ``top_k`` then of the videos); GAP = sum_i precision@i * rel_i / P, where rel_i says whether pair i is a
    true label and P is the number of true labels of all videos (also those outside any top k, so a label never
    ranked costs recall), as the YouTube-8M evaluation code does.
    """
    scores = np.asarray(scores, dtype=np.float64)
    if len(scores) == 0:
        return float("nan")
    truth = label_matrix(y, scores.shape[1])  # [N, C]
    top = top_k(scores, k)  # [N, k]
    s = np.take_along_axis(scores, top, axis=1).ravel()  # [N*k]
    rel = np.take_along_axis(truth, top, axis=1).ravel()  # [N*k]
    positives = truth.sum()
    if positives == 0:
        return float("nan")
    rel = rel[np.argsort(-s, kind="stable")]
    precision = np.cumsum(rel) / np.arange(1, len(rel) + 1)
    return float((precision * rel).sum() / positives)


def confusion_matrix(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Counts [C, C]: row = true class, column = predicted class (scikit-learn's convention)."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(y_true, dtype=np.int64), np.asarray(y_pred, dtype=np.int64)), 1)
    return cm


def per_class_accuracy(y_true: np.ndarray, y_pred: np.ndarray, num_classes: int) -> np.ndarray:
    """Recall of each class [C] (diagonal of the row-normalised confusion matrix); NaN for absent classes."""
    cm = confusion_matrix(y_true, y_pred, num_classes)
    support = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(support > 0, np.diag(cm) / np.maximum(support, 1), np.nan)


def mean_std(values) -> tuple[float, float]:
    """Mean and sample standard deviation (ddof=1) over runs (splits, seeds), as in "94.1 +- 0.6" style reports;
    the std is NaN for one value (no spread can be measured from one number), both are NaN for none."""
    v = np.asarray(list(values), dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else float("nan")


def _nan_to_none(x: float) -> float | None:
    return None if x is None or not np.isfinite(x) else float(x)


def classification_report(scores: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    """All metrics of a run's ``metrics.json`` for single-label ground truth ``y`` [N], or multi-label ground truth
    (an indicator matrix [N, C]; ``multilabel_report``).

    Per-class entries are keyed by class name; classes absent from ``y`` get ``None`` (JSON null).
    """
    scores = np.asarray(scores)
    if np.asarray(y).ndim == 2:
        return multilabel_report(scores, y, classes)
    y = np.asarray(y, dtype=np.int64)
    C = len(classes)
    pred = top_k(scores, 1)[:, 0] if len(scores) else np.zeros(0, dtype=np.int64)
    ap = average_precision(scores, y) if len(scores) else np.full(C, np.nan)
    pca = per_class_accuracy(y, pred, C)
    return {
        "accuracy": accuracy(scores, y),
        "hit@1": hit_at_k(scores, y, 1),
        "hit@5": hit_at_k(scores, y, 5),
        "map": mean_average_precision(scores, y) if len(scores) else float("nan"),
        "gap@20": gap_at_k(scores, y, 20) if len(scores) else float("nan"),
        "per_class_ap": {c: _nan_to_none(a) for c, a in zip(classes, ap)},
        "per_class_accuracy": {c: _nan_to_none(a) for c, a in zip(classes, pca)},
        "confusion": confusion_matrix(y, pred, C).tolist(),
        "n_test": len(y),
    }


def multilabel_report(scores: np.ndarray, y: np.ndarray, classes: list[str]) -> dict:
    """The metrics of multi-label data (``y``: indicator matrix [N, C]): ``accuracy`` is Hit@1 (a top prediction
    among the video's labels, Karpathy et al. 4.1), then Hit@5, mAP over classes, GAP@20 (YouTube-8M) and per-class
    AP. A confusion matrix and per-class accuracy have no meaning with several true classes and are left out."""
    scores = np.asarray(scores)
    truth = label_matrix(y, len(classes))
    ap = average_precision(scores, truth) if len(scores) else np.full(len(classes), np.nan)
    return {
        "multi_label": True,
        "accuracy": hit_at_k(scores, truth, 1),
        "hit@1": hit_at_k(scores, truth, 1),
        "hit@5": hit_at_k(scores, truth, 5),
        "map": mean_average_precision(scores, truth) if len(scores) else float("nan"),
        "gap@20": gap_at_k(scores, truth, 20),
        "labels_per_video": float(truth.sum(1).mean()) if len(truth) else float("nan"),
        "per_class_ap": {c: _nan_to_none(a) for c, a in zip(classes, ap)},
        "n_test": len(truth),
    }
