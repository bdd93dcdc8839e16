"""Kernel baselines of Wu et al. (ACM MM 2015, Section 4.1.3, Table 2) as scikit-learn estimators.

- ``Chi2SVM`` (``svm``): chi-square kernel SVM on one stream ("Spatial SVM", "Motion SVM") or on all columns.
- ``SVMEarlyFusion`` (``svm-ef``): "chi^2-kernel is computed for each video-level CNN feature and then the two
  kernels are averaged for classification".
- ``SVMLateFusion`` (``svm-lf``): "separate SVM classifiers are trained for each video-level CNN feature and
  the prediction outputs are averaged".
- ``LpMKL`` (``svm-mkl``): "combines the two features with the lp-norm MKL [Kloft et al., JMLR 2011] by
  fixing p = 2": kernel weights beta >= 0, ||beta||_p <= 1, learnt by alternating an SVM solve on
  K = sum_m beta_m K_m with Kloft's closed-form update (Eq. 12 of Kloft et al.)::

      beta_m = ||w_m||^(2/(p+1)) / (sum_m' ||w_m'||^(2p/(p+1)))^(1/p),   ||w_m||^2 = beta_m^2 a^T K_m a

  where ``a`` are the signed dual coefficients (``SVC.dual_coef_``).

Inputs are video-level features ``X: [N, D]`` (average-pooled frames, streams concatenated in the order of
``stream_dims``; each estimator splits them). Multi-class problems are solved one-vs-rest with binary
``sklearn.svm.SVC(kernel="precomputed")`` (scikit-learn is the solver; this file adds what it lacks: the
chi-square kernels per stream, the fusions, and the MKL weight updates). One-vs-rest gives every class a real
margin, which is what late fusion averages and what MKL needs (one dual vector per binary problem; the kernel
weights are shared by all classes, so ``||w_m||^2`` sums over the binary problems). Not in the paper and
chosen here: C = 1 (LIBSVM's default) and gamma = 1 / mean training chi-square distance per stream.

``__init__`` only assigns; ``fit`` validates and sets attributes ending in ``_``; ``decision_function``
returns ``[N, n_classes]`` with columns in the order of ``classes_``. The training recipes of the torch heads
(``recipe=paper`` / ``converge``: optimiser, schedule, step budget) do not apply: an SVM is solved to its optimum
in one ``fit``, and ``recipe`` is only recorded in the run's config.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from joblib import Parallel, delayed
from sklearn.base import BaseEstimator, ClassifierMixin
from sklearn.svm import SVC
from sklearn.utils.validation import check_is_fitted, check_X_y, validate_data

from pipeline.kernels import chi2_distance, chi2_gamma
from pipeline.registry import HEADS

__all__ = ["Chi2SVM", "LpMKL", "SVMEarlyFusion", "SVMLateFusion"]


# --- shared pieces -------------------------------------------------------------------------------------


def _split(X: np.ndarray, stream_dims) -> list[np.ndarray]:
    dims = tuple(stream_dims) if stream_dims else (X.shape[1],)
    if sum(dims) != X.shape[1]:
        raise ValueError(f"stream_dims {dims} sum to {sum(dims)} but X has {X.shape[1]} columns")
    return np.split(X, np.cumsum(dims)[:-1], axis=1)


def _fit_ovr(K: np.ndarray, y: np.ndarray, classes: np.ndarray, C: float, n_jobs: int | None = None) -> list[SVC]:
    """One binary SVC per class on a precomputed [N, N] kernel (class c against the rest).

    LIBSVM releases the GIL while it trains, so threads share the one kernel matrix and run in parallel.
    """
    def one(c):
        return SVC(kernel="precomputed", C=C).fit(K, np.where(y == c, 1, -1))

    return Parallel(n_jobs=n_jobs, prefer="threads")(delayed(one)(c) for c in classes)


def _decide_ovr(svms: list[SVC], K: np.ndarray) -> np.ndarray:
    """[M, N] test-by-train kernel -> [M, n_classes] margins."""
    return np.stack([s.decision_function(K) for s in svms], axis=1)


def _dual_norms(svms: list[SVC], kernels: list[np.ndarray]) -> np.ndarray:
    """sum over binary problems of a^T K_m a for every kernel m (a: signed duals on the support vectors)."""
    out = np.zeros(len(kernels))
    for s in svms:
        a, sv = s.dual_coef_[0], s.support_
        for m, K in enumerate(kernels):
            out[m] += a @ K[np.ix_(sv, sv)] @ a
    return out


class _Chi2Base(ClassifierMixin, BaseEstimator):
    """Validation and per-stream chi-square kernels shared by the estimators below."""

    def _validate_fit(self, X, y):
        X, y = check_X_y(X, y, dtype=(np.float32, np.float64))
        self.n_features_in_ = X.shape[1]
        if (X < 0).any():
            raise ValueError("chi-square kernels need non-negative features (ReLU outputs)")
        self.classes_ = np.unique(y)
        if len(self.classes_) < 2:
            raise ValueError("need at least two classes")
        return X, y

    def _parts(self, X: np.ndarray) -> list[np.ndarray]:
        """The per-stream column blocks of X, one kernel each."""
        return _split(X, self.stream_dims)

    def _train_kernels(self, X: np.ndarray) -> list[np.ndarray]:
        """Chi-square kernels [N, N] of the training streams; keeps ``train_X_`` (kernel machines need their
        training vectors at test time) and the kernel widths ``gammas_``."""
        self.train_X_, self.gammas_, kernels = X.copy(), [], []
        for p in self._parts(X):
            d = chi2_distance(p)  # [N, N]
            g = self.gamma if self.gamma is not None else chi2_gamma(d)
            self.gammas_.append(g)
            kernels.append(np.exp(-g * d))
        return kernels

    def _test_kernels(self, X: np.ndarray) -> list[np.ndarray]:
        """Test-by-train kernels [M, N], one per stream."""
        return [np.exp(-g * chi2_distance(p, tp)) for p, tp, g in zip(self._parts(X), self._parts(self.train_X_),
                                                                       self.gammas_)]

    def _keep_duals(self, svms: list[SVC]) -> None:
        """Numeric copies of the SVM solutions (for ``weights.npz``): signed duals over all training videos
        ``dual_coef_`` [C, N] (zero off the support vectors) and ``intercept_`` [C]."""
        n = self.train_X_.shape[0]
        self.dual_coef_ = np.zeros((len(svms), n))
        for c, s in enumerate(svms):
            self.dual_coef_[c, s.support_] = s.dual_coef_[0]
        self.intercept_ = np.array([s.intercept_[0] for s in svms])

    def _validate_test(self, X) -> np.ndarray:
        check_is_fitted(self)
        return validate_data(self, X, reset=False, dtype=(np.float32, np.float64))

    def predict(self, X) -> np.ndarray:
        return self.classes_[self.decision_function(X).argmax(1)]


# --- estimators ----------------------------------------------------------------------------------------


class Chi2SVM(_Chi2Base):
    """Chi-square kernel SVM on one stream (``stream`` index into ``stream_dims``) or on all columns (None)."""

    def __init__(self, C: float = 1.0, gamma: float | None = None, stream: int | None = None, stream_dims=None,
                 n_jobs: int | None = None):
        self.C = C
        self.gamma = gamma
        self.stream = stream
        self.stream_dims = stream_dims
        self.n_jobs = n_jobs

    def _parts(self, X):
        return [X] if self.stream is None else [_split(X, self.stream_dims)[self.stream]]

    def fit(self, X, y):
        X, y = self._validate_fit(X, y)
        (K,) = self._train_kernels(X)
        self.svms_ = _fit_ovr(K, y, self.classes_, self.C, self.n_jobs)
        self._keep_duals(self.svms_)
        return self

    def decision_function(self, X) -> np.ndarray:
        (K,) = self._test_kernels(self._validate_test(X))
        return _decide_ovr(self.svms_, K)


class SVMEarlyFusion(_Chi2Base):
    """SVM-EF: one SVM on the average of the per-stream chi-square kernels."""

    def __init__(self, C: float = 1.0, gamma: float | None = None, stream_dims=None, n_jobs: int | None = None):
        self.C = C
        self.gamma = gamma
        self.stream_dims = stream_dims
        self.n_jobs = n_jobs

    def fit(self, X, y):
        X, y = self._validate_fit(X, y)
        K = np.mean(self._train_kernels(X), axis=0)  # [N, N]
        self.svms_ = _fit_ovr(K, y, self.classes_, self.C, self.n_jobs)
        self._keep_duals(self.svms_)
        return self

    def decision_function(self, X) -> np.ndarray:
        K = np.mean(self._test_kernels(self._validate_test(X)), axis=0)  # [M, N]
        return _decide_ovr(self.svms_, K)


class SVMLateFusion(_Chi2Base):
    """SVM-LF: one SVM per stream; the margins are averaged."""

    def __init__(self, C: float = 1.0, gamma: float | None = None, stream_dims=None, n_jobs: int | None = None):
        self.C = C
        self.gamma = gamma
        self.stream_dims = stream_dims
        self.n_jobs = n_jobs

    def fit(self, X, y):
        X, y = self._validate_fit(X, y)
        self.stream_svms_ = [_fit_ovr(K, y, self.classes_, self.C, self.n_jobs) for K in self._train_kernels(X)]
        duals = []
        for svms in self.stream_svms_:
            self._keep_duals(svms)
            duals.append((self.dual_coef_, self.intercept_))
        self.dual_coef_ = np.stack([d for d, _ in duals])  # [S, C, N]
        self.intercept_ = np.stack([b for _, b in duals])  # [S, C]
        return self

    def decision_function(self, X) -> np.ndarray:
        kernels = self._test_kernels(self._validate_test(X))
        return np.mean([_decide_ovr(s, K) for s, K in zip(self.stream_svms_, kernels)], axis=0)


class LpMKL(_Chi2Base):
    """lp-norm MKL (Kloft et al. 2011) over the per-stream chi-square kernels, p = 2 as in Wu et al."""

    def __init__(self, C: float = 1.0, p: float = 2.0, gamma: float | None = None, max_iter: int = 20,
                 tol: float = 1e-3, stream_dims=None, n_jobs: int | None = None):
        self.C = C
        self.p = p
        self.gamma = gamma
        self.max_iter = max_iter
        self.tol = tol
        self.stream_dims = stream_dims
        self.n_jobs = n_jobs

    def fit(self, X, y):
        X, y = self._validate_fit(X, y)
        if self.p < 1:
            raise ValueError("lp-norm MKL needs p >= 1")
        kernels = self._train_kernels(X)
        m = len(kernels)
        beta = np.full(m, m ** (-1.0 / self.p))  # uniform start on the unit lp sphere
        self.weight_history_ = [beta.copy()]
        for it in range(1, self.max_iter + 1):
            combined = np.tensordot(beta, kernels, axes=1)  # K = sum_m beta_m K_m: [N, N]
            svms = _fit_ovr(combined, y, self.classes_, self.C, self.n_jobs)
            norms = beta**2 * _dual_norms(svms, kernels)  # ||w_m||^2, summed over the binary problems
            new = norms ** (1 / (self.p + 1)) / np.sum(norms ** (self.p / (self.p + 1))) ** (1 / self.p)
            change, beta = np.abs(new - beta).max(), new
            self.weight_history_.append(beta.copy())
            if change < self.tol:
                break
        self.weights_ = beta
        self.n_iter_ = it
        # The SVMs of the final weights (the loop's last solve used the weights before the last update).
        self.svms_ = _fit_ovr(np.tensordot(beta, kernels, axes=1), y, self.classes_, self.C, self.n_jobs)
        self._keep_duals(self.svms_)
        return self

    def decision_function(self, X) -> np.ndarray:
        kernels = self._test_kernels(self._validate_test(X))
        return _decide_ovr(self.svms_, np.tensordot(self.weights_, kernels, axes=1))


# --- registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SVMConfig:
    """Chi-square SVM on one stream (Wu et al. Table 2, "Spatial SVM" / "Motion SVM")."""

    C: float = 1.0
    gamma: float | None = None  # None: 1 / mean training chi-square distance
    stream: int | None = None  # index into the streams; None: all columns as one feature
    n_jobs: int = 1  # threads for the one-vs-rest SVM solves (-1: all cores)


@dataclass(frozen=True)
class SVMFusionConfig:
    """Chi-square SVM fusion of the streams (SVM-EF / SVM-LF)."""

    C: float = 1.0
    gamma: float | None = None
    n_jobs: int = 1


@dataclass(frozen=True)
class MKLConfig:
    """lp-norm MKL over per-stream chi-square kernels (SVM-MKL, p = 2)."""

    C: float = 1.0
    p: float = 2.0
    gamma: float | None = None
    max_iter: int = 20
    tol: float = 1e-3
    n_jobs: int = 1


@HEADS.register("svm", SVMConfig, kind="sklearn")
def build_svm(cfg: SVMConfig, input_dim: int, num_classes: int, stream_dims) -> Chi2SVM:
    """Chi-square kernel SVM, one stream or all columns (Wu et al. 2015, Section 4.1.3)."""
    return Chi2SVM(C=cfg.C, gamma=cfg.gamma, stream=cfg.stream, stream_dims=tuple(stream_dims or (input_dim,)),
                   n_jobs=cfg.n_jobs)


@HEADS.register("svm-ef", SVMFusionConfig, kind="sklearn")
def build_svm_ef(cfg: SVMFusionConfig, input_dim: int, num_classes: int, stream_dims) -> SVMEarlyFusion:
    """SVM early fusion: averaged chi-square kernels (Wu et al. 2015, Section 4.1.3)."""
    return SVMEarlyFusion(C=cfg.C, gamma=cfg.gamma, stream_dims=tuple(stream_dims or (input_dim,)), n_jobs=cfg.n_jobs)


@HEADS.register("svm-lf", SVMFusionConfig, kind="sklearn")
def build_svm_lf(cfg: SVMFusionConfig, input_dim: int, num_classes: int, stream_dims) -> SVMLateFusion:
    """SVM late fusion: averaged per-stream SVM margins (Wu et al. 2015, Section 4.1.3)."""
    return SVMLateFusion(C=cfg.C, gamma=cfg.gamma, stream_dims=tuple(stream_dims or (input_dim,)), n_jobs=cfg.n_jobs)


@HEADS.register("svm-mkl", MKLConfig, kind="sklearn")
def build_svm_mkl(cfg: MKLConfig, input_dim: int, num_classes: int, stream_dims) -> LpMKL:
    """lp-norm (p = 2) multiple kernel learning over per-stream chi-square kernels (Wu et al. 2015, 4.1.3)."""
    return LpMKL(C=cfg.C, p=cfg.p, gamma=cfg.gamma, max_iter=cfg.max_iter, tol=cfg.tol,
                 stream_dims=tuple(stream_dims or (input_dim,)), n_jobs=cfg.n_jobs)
