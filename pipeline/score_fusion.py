"""Linear score fusion of finished runs: the last step of Wu et al.'s hybrid framework (ACM MM 2015, Section
4.2.3: "the prediction scores from these networks are fused linearly with weights estimated by
cross-validation").

Each run gives a per-video score matrix ``[N, C]`` over the same videos and classes. The fused score is
``sum_k w_k * norm_k(S_k)`` with ``w`` on the probability simplex. ``ScoreFusion.fit`` picks ``w`` from a grid
over the simplex (step ``step``) by k-fold cross-validation on the scores it is given: the grid point with the
best held-out metric, averaged over the folds; ties go to the point closest to uniform weights. The caller
(``stages.fuse``) gives it the *fusion fold*, videos no fused run trained on or chose its epoch with: the
validation scores of a torch head that stopped early on them are optimistic, an SVM's are not, and weights
chosen on them favour the torch head. The weights can also be given by hand (``weights=``), and then ``fit``
only learns the normalisation.

Scores of different heads live on different scales, so each run is normalised first, by a rule that can differ
per run (``normalize`` is one name or one per run):

- ``"log-softmax"``: log-probabilities of a head trained with cross-entropy (its scores are logits);
- ``"temperature"``: ``log_softmax(S / T)`` with one temperature per run fitted by maximum likelihood on the fit
  scores (multiclass Platt scaling; Guo et al. 2017, "On Calibration of Modern Neural Networks", Sec. 4.2):
  turns SVM margins, whose scale is arbitrary, into log-probabilities comparable with a torch head's;
- ``"zscore"``: minus the mean, over the standard deviation of the run's fit scores; ``"softmax"``:
  probabilities; ``"none"``: unchanged.

None of these changes a run's own ranking of classes, so a weight of 1 on one run reproduces its predictions.

Pure array code (numpy + scikit-learn's fold splitter and AP); the ``twostream fuse`` command does the I/O.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence

import numpy as np
from sklearn.metrics import average_precision_score
from sklearn.model_selection import KFold, StratifiedKFold

__all__ = ["NORMALIZATIONS", "ScoreFusion", "fit_temperature", "fuse_scores", "log_softmax", "score_metric",
           "simplex_grid"]

NORMALIZATIONS = ("log-softmax", "temperature", "zscore", "softmax", "none")


def log_softmax(s: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax of [N, C] scores."""
    z = s - s.max(1, keepdims=True)
    return z - np.log(np.exp(z).sum(1, keepdims=True))


def fit_temperature(scores: np.ndarray, y: np.ndarray) -> float:
    """The T > 0 that minimises the mean negative log-likelihood of ``log_softmax(scores / T)`` (one scalar)."""
    from scipy.optimize import minimize_scalar

    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return float(-log_softmax(scores / np.exp(log_t))[rows, y].mean())

    res = minimize_scalar(nll, bounds=(-12.0, 12.0), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def simplex_grid(k: int, step: float = 0.1) -> np.ndarray:
    """All weight vectors of length ``k`` with entries in {0, step, 2 step, ..., 1} that sum to 1. -> [G, k]"""
    if k < 1:
        raise ValueError("need at least one run")
    n = round(1 / step)
    if not np.isclose(n * step, 1.0):
        raise ValueError(f"step must divide 1, got {step}")
    pts = [c for c in itertools.product(range(n + 1), repeat=k - 1) if sum(c) <= n]
    return np.array([(*c, n - sum(c)) for c in pts], dtype=np.float64) / n


def fuse_scores(scores: Sequence[np.ndarray], weights: Sequence[float]) -> np.ndarray:
    """sum_k w_k S_k over K matrices [N, C] -> [N, C]."""
    if len(scores) != len(weights):
        raise ValueError(f"{len(scores)} score matrices but {len(weights)} weights")
    return np.tensordot(np.asarray(weights, dtype=np.float64), np.stack(scores).astype(np.float64), axes=1)


def score_metric(scores: np.ndarray, y: np.ndarray, metric: str = "accuracy") -> float:
    """Accuracy (top-1; UCF-101) or mean average precision over the classes present (mAP; CCV)."""
    if metric == "accuracy":
        return float((scores.argmax(1) == y).mean())
    if metric == "map":
        present = [c for c in range(scores.shape[1]) if (y == c).any()]
        return float(np.mean([average_precision_score(y == c, scores[:, c]) for c in present]))
    raise ValueError(f"metric must be 'accuracy' or 'map', got {metric!r}")


class ScoreFusion:
    """Weighted sum of normalised score matrices, weights by cross-validation over a simplex grid or by hand."""

    def __init__(self, weights: Sequence[float] | None = None, step: float = 0.1, cv: int = 5,
                 metric: str = "accuracy", normalize: str | Sequence[str] = "zscore", random_state: int = 0):
        self.weights = weights
        self.step = step
        self.cv = cv
        self.metric = metric
        self.normalize = normalize
        self.random_state = random_state

    def _check(self, scores) -> list[np.ndarray]:
        scores = [np.asarray(s, dtype=np.float64) for s in scores]
        if not scores or any(s.ndim != 2 or s.shape != scores[0].shape for s in scores):
            raise ValueError(f"need score matrices of one shape [N, C], got {[s.shape for s in scores]}")
        return scores

    def _rules(self, k: int) -> list[str]:
        rules = [self.normalize] * k if isinstance(self.normalize, str) else list(self.normalize)
        if len(rules) != k:
            raise ValueError(f"{len(rules)} normalisations for {k} runs")
        bad = [r for r in rules if r not in NORMALIZATIONS]
        if bad:
            raise ValueError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got {bad[0]!r}")
        return rules

    def _norm(self, scores: list[np.ndarray]) -> list[np.ndarray]:
        out = []
        for s, rule, (m, sd), t in zip(scores, self.normalize_, self.stats_, self.temperatures_):
            if rule in ("log-softmax", "temperature"):
                out.append(log_softmax(s / t))
            elif rule == "softmax":
                out.append(np.exp(log_softmax(s)))
            elif rule == "zscore":
                out.append((s - m) / sd)
            else:
                out.append(s)
        return out

    def fit(self, scores: Sequence[np.ndarray], y) -> ScoreFusion:
        """scores: K matrices [N, C] of held-out videos; y: [N] labels. Sets ``weights_`` (and ``cv_results_``),
        ``normalize_`` (the rule per run) and ``temperatures_`` (1 except for "temperature")."""
        scores = self._check(scores)
        y = np.asarray(y)
        if y.shape != (scores[0].shape[0],):
            raise ValueError(f"y has shape {y.shape}, scores have {scores[0].shape[0]} rows")
        self.n_runs_ = len(scores)
        self.normalize_ = self._rules(len(scores))
        self.stats_ = [(s.mean(), s.std() if s.std() > 0 else 1.0) for s in scores]
        self.temperatures_ = [fit_temperature(s, y) if rule == "temperature" else 1.0
                              for s, rule in zip(scores, self.normalize_)]
        normed = self._norm(scores)
        if self.weights is not None:
            w = np.asarray(self.weights, dtype=np.float64)
            if w.shape != (len(scores),) or (w < 0).any() or w.sum() <= 0:
                raise ValueError(f"weights must be {len(scores)} non-negative numbers, got {self.weights}")
            self.weights_ = w / w.sum()
            return self
        grid = simplex_grid(len(scores), self.step)  # [G, K]
        _, counts = np.unique(y, return_counts=True)
        folds = min(self.cv, len(y))
        splitter = (StratifiedKFold(folds, shuffle=True, random_state=self.random_state) if counts.min() >= folds
                    else KFold(folds, shuffle=True, random_state=self.random_state))
        held_out = [test for _, test in splitter.split(np.zeros(len(y)), y)]
        results = np.array([[score_metric(fuse_scores([s[t] for s in normed], w), y[t], self.metric)
                             for t in held_out] for w in grid]).mean(1)  # [G]
        best = np.flatnonzero(results >= results.max() - 1e-12)
        uniform = np.full(len(scores), 1 / len(scores))
        pick = best[np.argmin(np.abs(grid[best] - uniform).sum(1))]  # ties: closest to uniform
        self.weights_, self.cv_results_ = grid[pick], {"weights": grid, "score": results}
        self.best_score_ = float(results[pick])
        return self

    def decision_function(self, scores: Sequence[np.ndarray]) -> np.ndarray:
        """K matrices [M, C] (same runs, same order as in ``fit``) -> fused [M, C]."""
        scores = self._check(scores)
        if len(scores) != self.n_runs_:
            raise ValueError(f"fitted on {self.n_runs_} runs, got {len(scores)}")
        return fuse_scores(self._norm(scores), self.weights_)

    def predict(self, scores: Sequence[np.ndarray]) -> np.ndarray:
        return self.decision_function(scores).argmax(1)
