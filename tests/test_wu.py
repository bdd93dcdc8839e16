"""Wu et al. (ACM MM 2015): proximal operator, chi-square kernels, SVM / MKL baselines, fusion networks,
stream LSTMs and score fusion. Small inputs, CPU, one thread."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from scipy.optimize import minimize
from sklearn.base import clone
from sklearn.metrics.pairwise import additive_chi2_kernel as sk_additive_chi2
from sklearn.metrics.pairwise import chi2_kernel as sk_chi2

import pipeline.baselines  # registers the sklearn heads
import pipeline.heads  # noqa: F401  (registers the torch heads)
from pipeline.baselines import Chi2SVM, LpMKL, SVMEarlyFusion, SVMLateFusion
from pipeline.kernels import additive_chi2_kernel, chi2_distance, chi2_gamma, chi2_kernel
from pipeline.prox import prox_fusion_layer, prox_l21_l11, structural_penalty, zero_rows
from pipeline.registry import HEADS
from pipeline.score_fusion import ScoreFusion, fuse_scores, simplex_grid

torch.set_num_threads(1)


def build(name, stream_dims, num_classes, **overrides):
    cfg = HEADS.make_config(name, overrides)
    return HEADS.get(name).builder(cfg, sum(stream_dims), num_classes, tuple(stream_dims))


def sgd_train(head, x, y, epochs, lr, batch=50, seed=0):
    """The trainer's contract in miniature: loss -> backward -> SGD step -> after_step(lr)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(head.parameters(), lr=lr)
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), batch):
            idx = perm[i : i + batch]
            opt.zero_grad()
            head.loss(x[idx], None, y[idx]).backward()
            opt.step()
            head.after_step(lr)
    return head


def synthetic_streams(n, dims, num_classes, noise_streams=(), seed=0, spread=0.6):
    """Non-negative video-level features: class prototypes plus noise; streams in noise_streams carry no label."""
    rng = np.random.default_rng(seed)
    protos = [np.abs(np.random.default_rng(100 + s).normal(size=(num_classes, d))) for s, d in enumerate(dims)]
    y = rng.integers(0, num_classes, n)
    parts = [rng.random((n, d)) if s in noise_streams else np.maximum(p[y] + spread * rng.normal(size=(n, d)), 0)
             for s, (p, d) in enumerate(zip(protos, dims))]
    return np.hstack(parts).astype(np.float32), y


# --- proximal operator (Eq. 4) -------------------------------------------------------------------------


def prox_reference(v, t21, t1):
    """Eq. 4 written out row by row."""
    out = np.zeros_like(v)
    for r in range(v.shape[0]):
        u = np.maximum(np.abs(v[r]) - t1, 0) * np.sign(v[r])
        nrm = np.linalg.norm(u)
        out[r] = max(0.0, 1 - t21 / nrm) * u if nrm > 0 else 0
    return out


def test_prox_matches_closed_form_by_hand():
    v = np.array([[3.0, -4.0], [0.1, 0.2], [0.0, 0.0]])
    # Row 0: soft threshold 1 -> [2, -3], norm sqrt(13); shrink by 1 - 2/sqrt(13).
    # Row 1: soft threshold kills both entries. Row 2: stays 0.
    want = np.array([[2.0, -3.0], [0, 0], [0, 0]]) * np.array([[1 - 2 / np.sqrt(13)], [0], [0]])
    np.testing.assert_allclose(prox_l21_l11(v, t21=2.0, t1=1.0), want, atol=1e-12)
    rng = np.random.default_rng(0)
    for _ in range(5):
        v = rng.normal(size=(7, 5))
        np.testing.assert_allclose(prox_l21_l11(v, 0.8, 0.3), prox_reference(v, 0.8, 0.3), atol=1e-12)
    # Torch in, torch out, same values; the step-size version scales both thresholds by lr (lambda2 halved).
    t = torch.tensor(v, dtype=torch.float32)
    np.testing.assert_allclose(prox_l21_l11(t, 0.8, 0.3).numpy(), prox_reference(v, 0.8, 0.3), atol=1e-6)
    np.testing.assert_allclose(prox_fusion_layer(v, 0.5, 0.8, 0.3), prox_reference(v, 0.5 * 0.4, 0.5 * 0.3))


@pytest.mark.parametrize("lam2,lam3", [(0.6, 0.2), (2.0, 0.0), (0.0, 0.5), (1.2, 0.4)])
def test_prox_is_the_numerical_minimiser(lam2, lam3):
    """Prox_q(W) = argmin_V ||W - V||^2/2 + q(V) with q = lam2/2 ||V||_21 + lam3 ||V||_11, found numerically.

    The objective is a sum over rows (the l21 groups), so each row is minimised on its own by Nelder-Mead (which
    needs no gradient of the non-smooth terms), started from W's row, not from the closed form."""
    rng = np.random.default_rng(int(10 * lam2 + 100 * lam3))
    w = rng.normal(size=(5, 3))
    w[0] *= 0.1  # a small row, which the l21 term removes as a whole when lam2 > 0
    numeric = np.zeros_like(w)
    for r in range(w.shape[0]):
        def f_row(v, r=r):
            return 0.5 * np.sum((w[r] - v) ** 2) + lam2 / 2 * np.linalg.norm(v) + lam3 * np.abs(v).sum()

        v = w[r]
        for _ in range(3):  # restarts tighten the simplex around the kink
            v = minimize(f_row, v, method="Nelder-Mead", options={"xatol": 1e-10, "fatol": 1e-14, "maxiter": 20000}).x
        numeric[r] = v
    closed = prox_l21_l11(w, t21=lam2 / 2, t1=lam3)
    np.testing.assert_allclose(closed, numeric, atol=1e-6)

    def f(v):
        return 0.5 * np.sum((w - v) ** 2) + structural_penalty(v, lam2, lam3)

    assert f(closed) <= f(numeric) + 1e-12
    for _ in range(50):  # no nearby point does better (strong convexity: the minimiser is unique)
        assert f(closed) <= f(closed + 1e-3 * rng.normal(size=w.shape))
    if lam2 > 0:
        assert np.all(closed[0] == 0)


def test_row_sparsity_of_fusion_layer_grows_with_lambda2():
    dims, n_cls = (12, 8), 3
    x, y = synthetic_streams(240, dims, n_cls)
    xt, yt = torch.from_numpy(x)[:, None, :], torch.from_numpy(y)
    zeros = []
    for lam2 in (0.0, 0.1, 0.3, 1.0):
        torch.manual_seed(0)  # the same initial weights for every lambda2
        head = build("fusion-net", dims, n_cls, hidden=16, fusion=24, lambda2=lam2, lambda3=0.0)
        sgd_train(head, xt, yt, epochs=8, lr=0.7)
        zeros.append(zero_rows(head.fusion.weight))
    assert zeros == sorted(zeros), zeros
    # None without the l21 term, some fusion units switched off at a middling lambda2, all of them at a large one.
    assert zeros[0] == 0 and 0 < zeros[2] < 24 and zeros[-1] == 24, zeros


# --- chi-square kernels --------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_chi2_kernels_match_sklearn(dtype):
    rng = np.random.default_rng(1)
    x = rng.random((37, 23)).astype(dtype)
    x[x < 0.3] = 0  # ReLU-like zeros, including 0/0 terms
    y = rng.random((11, 23)).astype(dtype)
    y[:, :4] = 0
    tol = 1e-10 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(chi2_kernel(x, y, gamma=0.7), sk_chi2(x, y, gamma=0.7), rtol=tol, atol=tol)
    np.testing.assert_allclose(chi2_kernel(x, gamma=0.2), sk_chi2(x, gamma=0.2), rtol=tol, atol=tol)
    np.testing.assert_allclose(additive_chi2_kernel(x, y), sk_additive_chi2(x, y), rtol=tol, atol=tol)
    # Small blocks give the same answer (the block loop covers every pair once).
    np.testing.assert_allclose(chi2_distance(x, y, block_elems=50), -sk_additive_chi2(x, y), rtol=tol, atol=tol)
    d = chi2_distance(x)
    assert chi2_gamma(d) == pytest.approx(1 / (d.sum() / (37 * 36)))
    with pytest.raises(ValueError):
        chi2_distance(-x)


# --- SVM baselines and MKL -----------------------------------------------------------------------------


def test_svm_baselines_fit_predict_and_registry():
    dims = (10, 6)
    x, y = synthetic_streams(150, dims, 3)
    labels = np.array([3, 7, 9])[y]  # labels need not be 0..C-1
    xt, yt = synthetic_streams(90, dims, 3, seed=5)
    for name, extra in [("svm", {"stream": 0}), ("svm", {}), ("svm-ef", {}), ("svm-lf", {}), ("svm-mkl", {})]:
        assert HEADS.get(name).kind == "sklearn"
        est = build(name, dims, 3, **extra)
        est.fit(x, labels)
        scores = est.decision_function(xt)
        assert scores.shape == (90, 3)
        assert list(est.classes_) == [3, 7, 9]
        assert (est.predict(xt) == np.array([3, 7, 9])[yt]).mean() > 0.9, name
        clone(est)  # __init__ only assigns: get_params round-trips
    # The numeric learned arrays alone (what a run's weights.npz keeps) reproduce the scores of SVM-EF.
    ef = SVMEarlyFusion(stream_dims=dims).fit(x, labels)
    k = np.mean([chi2_kernel(xt[:, sl], ef.train_X_[:, sl], gamma=g)
                 for sl, g in zip((slice(0, 10), slice(10, 16)), ef.gammas_)], axis=0)  # [M, N]
    np.testing.assert_allclose(k @ ef.dual_coef_.T + ef.intercept_, ef.decision_function(xt), atol=1e-8)
    assert SVMLateFusion(stream_dims=dims).fit(x, y).dual_coef_.shape == (2, 3, 150)
    with pytest.raises(ValueError):
        SVMEarlyFusion(stream_dims=dims).fit(-x, y)
    with pytest.raises(ValueError):
        SVMLateFusion(stream_dims=(10, 7)).fit(x, y)


def test_mkl_weights_go_to_the_informative_kernel():
    dims = (15, 15)
    x, y = synthetic_streams(200, dims, 4, noise_streams=(1,))
    mkl = LpMKL(p=2.0, stream_dims=dims).fit(x, y)
    assert np.linalg.norm(mkl.weights_, 2) == pytest.approx(1.0)  # on the unit l2 sphere
    assert mkl.weights_[0] > 2 * mkl.weights_[1], mkl.weights_
    # Swapping the streams swaps the weights.
    swapped = np.hstack([x[:, 15:], x[:, :15]])
    assert LpMKL(stream_dims=dims).fit(swapped, y).weights_.argmax() == 1
    # The noise stream alone is near chance; MKL keeps the informative stream's accuracy.
    xt, yt = synthetic_streams(120, dims, 4, noise_streams=(1,), seed=9)
    assert Chi2SVM(stream=1, stream_dims=dims).fit(x, y).score(xt, yt) < 0.5
    assert mkl.score(xt, yt) >= Chi2SVM(stream=0, stream_dims=dims).fit(x, y).score(xt, yt) - 0.03


def mkl_objective(beta, kernels, y, C=1.0):
    """Kloft et al. (JMLR 2011) lp-MKL in beta: the optimal one-vs-rest SVM dual objectives under
    K = sum_m beta_m K_m, summed over the binary problems, D(beta) = sum_c [sum_i alpha_ci - 1/2 a_c^T K a_c]
    (a_c = y_i alpha_ci), and its gradient dD/dbeta_m = -1/2 sum_c a_c^T K_m a_c (Danskin), from tight SVM solves."""
    from sklearn.svm import SVC

    K = np.tensordot(beta, kernels, axes=1)
    value, grad = 0.0, np.zeros(len(kernels))
    for c in np.unique(y):
        svm = SVC(kernel="precomputed", C=C, tol=1e-8).fit(K, np.where(y == c, 1, -1))
        a, sv = svm.dual_coef_[0], svm.support_
        value += np.abs(a).sum() - 0.5 * a @ K[np.ix_(sv, sv)] @ a
        grad -= 0.5 * np.array([a @ Km[np.ix_(sv, sv)] @ a for Km in kernels])
    return value, grad


def _mkl_problem():
    dims = (6, 6, 6)  # informative, weakly informative, noise
    x, y = synthetic_streams(60, dims, 3, noise_streams=(2,), seed=3)
    x[:, 6:12] = np.maximum(x[:, 6:12] + np.random.default_rng(4).normal(0, 0.8, (60, 6)), 0)
    mkl = LpMKL(p=2.0, stream_dims=dims, max_iter=50, tol=1e-6).fit(x, y)
    kernels = [chi2_kernel(x[:, 6 * m:6 * m + 6], gamma=g) for m, g in enumerate(mkl.gammas_)]
    return mkl, kernels, y


def test_mkl_objective_decreases_over_the_iterations():
    """Alternating an exact SVM solve with Kloft's closed-form beta update is block-coordinate descent on D."""
    mkl, kernels, y = _mkl_problem()
    values = [mkl_objective(b, kernels, y)[0] for b in mkl.weight_history_]
    assert len(values) >= 3
    assert all(b <= a + 1e-6 * abs(a) for a, b in itertools.pairwise(values)), values
    assert values[-1] < values[0] - 1e-3 * abs(values[0]), values  # it moved from the uniform start


def test_mkl_matches_a_generic_solver():
    """The same problem, min D(beta) over beta >= 0, ||beta||_2 <= 1, solved by scipy's SLSQP."""
    mkl, kernels, y = _mkl_problem()
    def fun(b):
        return mkl_objective(b, kernels, y)

    res = minimize(fun, np.full(3, 3 ** -0.5), jac=True, method="SLSQP", bounds=[(0, None)] * 3,
                   constraints=[{"type": "ineq", "fun": lambda b: 1 - b @ b, "jac": lambda b: -2 * b}],
                   options={"ftol": 1e-10, "maxiter": 200})
    assert res.success, res.message
    ours = fun(mkl.weights_)[0]
    assert ours == pytest.approx(res.fun, rel=1e-4), (ours, res.fun)
    np.testing.assert_allclose(mkl.weights_, res.x, atol=1e-2)
    assert mkl.weights_[0] > mkl.weights_[1] > mkl.weights_[2]


# --- torch heads ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream_dims", [(9,), (9, 5), (4, 6, 3)])
@pytest.mark.parametrize("name", ["fusion-net", "nn-ef", "nn-lf", "stream-lstm"])
def test_torch_heads_shapes_and_masks_for_any_number_of_streams(name, stream_dims):
    torch.manual_seed(0)
    extra = {"hidden": (12, 8)} if name == "stream-lstm" else {"hidden": 10, "fusion": 7}
    head = build(name, stream_dims, 5, **extra)
    b, t = 4, 6
    x = torch.rand(b, t, sum(stream_dims))
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 3:] = False
    mask[2, 1:] = False
    out = head(x, mask)
    assert out.shape == (b, 5) and torch.isfinite(out).all()
    # Padded frames do not change the scores.
    x2 = x.clone()
    x2[~mask] = 100.0
    torch.testing.assert_close(head(x2, mask), out)
    loss = head.loss(x, mask, torch.tensor([0, 1, 2, 4]))
    loss.backward()
    assert loss.ndim == 0 and torch.isfinite(loss)
    if name == "fusion-net":
        assert head.fusion.weight.shape == (7, 10 * len(stream_dims))  # W^E = [W_1, ..., W_S]: [P, hidden * S]
    if name == "stream-lstm":
        steps = head.step_logits(x, mask)
        assert steps.shape == (b, t, 5)
        torch.testing.assert_close(out[1], steps[1, 2])  # last valid step of a padded video
        assert len(head.lstms) == len(stream_dims)
        assert len(build(name, stream_dims, 5, stream=0, **extra).lstms) == 1


def test_fusion_net_defaults_follow_the_paper():
    cfg = HEADS.make_config("fusion-net")
    assert (cfg.hidden, cfg.fusion, cfg.lambda1) == (200, 200, 3e-5)
    assert cfg.train_defaults["lr"] == 0.7 and cfg.train_defaults["weight_decay"] == 0.0
    lstm = HEADS.make_config("stream-lstm")
    assert lstm.hidden == (1024, 512)
    td = lstm.train_defaults
    assert (td["batch_size"], td["lr"], td["momentum"]) == (10, 1e-4, 0.9)
    head = build("fusion-net", (20, 30), 4)
    assert head.fusion.weight.shape == (200, 400)
    # Non-regularized baseline: after_step leaves W^E alone.
    plain = build("fusion-net", (20, 30), 4, lambda2=0, lambda3=0)
    before = plain.fusion.weight.detach().clone()
    plain.after_step(0.7)
    torch.testing.assert_close(plain.fusion.weight, before)


@pytest.mark.parametrize("name", ["fusion-net", "nn-ef", "nn-lf"])
def test_fusion_networks_learn_a_two_stream_problem(name):
    """Class evidence split across two streams: each stream alone is ambiguous, together they are not."""
    rng = np.random.default_rng(3)
    n, n_cls = 400, 4
    y = rng.integers(0, n_cls, n)
    # Stream 0 tells {0,1} from {2,3}; stream 1 tells {0,2} from {1,3}.
    a = np.eye(2)[y // 2].repeat(6, 1) + 0.3 * rng.random((n, 12))
    b = np.eye(2)[y % 2].repeat(5, 1) + 0.3 * rng.random((n, 10))
    x = torch.tensor(np.hstack([a, b]), dtype=torch.float32)[:, None, :]  # [N, 1, D]
    yt = torch.from_numpy(y)
    torch.manual_seed(0)
    head = build(name, (12, 10), n_cls, hidden=32, fusion=32)
    with torch.no_grad():
        before = (head(x).argmax(1) == yt).float().mean().item()
    sgd_train(head, x[:300], yt[:300], epochs=10 if name != "nn-lf" else 40, lr=0.7)
    with torch.no_grad():
        acc = (head(x[300:]).argmax(1) == yt[300:]).float().mean().item()
    assert before < 0.5 and acc > 0.95, (before, acc)


# --- score fusion --------------------------------------------------------------------------------------


def test_simplex_grid():
    g = simplex_grid(3, 0.25)
    assert g.shape == (15, 3)  # C(4 + 2, 2)
    np.testing.assert_allclose(g.sum(1), 1.0)
    assert (g >= 0).all() and len(np.unique(g, axis=0)) == 15
    np.testing.assert_allclose(fuse_scores([np.ones((2, 3)), 3 * np.ones((2, 3))], [0.25, 0.75]), 2.5)


def test_score_fusion_picks_the_informative_run_over_noise():
    rng = np.random.default_rng(0)
    n, c = 600, 6
    y = rng.integers(0, c, n)

    def informative(m, yy):
        s = rng.normal(size=(m, c))
        s[np.arange(m), yy] += 1.5  # about 70% top-1
        return 3.0 * s

    val_good, val_noise = informative(n, y), rng.normal(size=(n, c)) * 0.01  # different scales on purpose
    yt = rng.integers(0, c, n)
    test_good, test_noise = informative(n, yt), rng.normal(size=(n, c)) * 0.01
    for order in ((0, 1), (1, 0)):
        val = [[val_good, val_noise][i] for i in order]
        test = [[test_good, test_noise][i] for i in order]
        fus = ScoreFusion(step=0.1, cv=5).fit(val, y)
        good_idx = order.index(0)
        assert fus.weights_[good_idx] == pytest.approx(1.0), fus.weights_
        np.testing.assert_array_equal(fus.predict(test), test_good.argmax(1))
    # Two informative, complementary runs: the fusion beats both.
    other = informative(n, y)
    fus = ScoreFusion(step=0.1).fit([val_good, other], y)
    assert 0.2 < fus.weights_[0] < 0.8
    assert fus.best_score_ > max((val_good.argmax(1) == y).mean(), (other.argmax(1) == y).mean())
    # Weights by hand, normalised to sum 1.
    hand = ScoreFusion(weights=[2, 2], normalize="none").fit([val_good, other], y)
    np.testing.assert_allclose(hand.decision_function([val_good, other]), (val_good + other) / 2)


# --- the real trainer and the proximal step (Algorithm 1) -----------------------------------------------


def test_trainer_applies_the_prox_rows_of_the_fusion_layer_become_exactly_zero(tmp_path):
    """Through stages.train (fit, default recipe): a strong l21 weight zeroes every row of W^E, none without it."""
    from safetensors.torch import load_file

    from stages.train import TrainJob, train
    from tests.synthetic import write_ucf_store

    root, store = write_ucf_store(tmp_path, ["A", "B", "C"], groups=6, T=4, dims=(6, 4))
    zero = {}
    for lam2 in ("0", "50"):
        job = TrainJob(store=str(store), dataset=str(root), head="fusion-net", out=str(tmp_path / "runs"),
                       overrides=(("hidden", "8"), ("fusion", "12"), ("lambda2", lam2), ("lambda3", "0"),
                                  ("min_steps", "30"), ("patience_steps", "0")))
        res = train(job, progress=False, echo=lambda m: None)
        assert res.metrics["recipe"] == "converge"
        w = load_file(str(res.path / "weights.safetensors"))["fusion.weight"]  # [fusion, hidden * streams]
        zero[lam2] = zero_rows(w)
    assert zero == {"0": 0, "50": 12}, zero


@pytest.mark.parametrize("sets", [{"optimizer": "adamw"}, {"optimizer": "adam"}, {"momentum": "0.9"},
                                  {"weight_decay": "1e-4"}])
def test_fusion_net_refuses_optimisers_under_which_the_prox_is_not_a_proximal_step(sets):
    from pipeline.errors import UserError
    from pipeline.training import resolve_configs

    with pytest.raises(UserError, match="proximal updates.*plain SGD"):
        resolve_configs("fusion-net", sets)
    resolve_configs("fusion-net", {**sets, "lambda2": "0", "lambda3": "0"})  # no prox: any optimiser is fine
    _, cfg = resolve_configs("fusion-net")
    assert (cfg.recipe, cfg.optimizer, cfg.momentum, cfg.weight_decay) == ("converge", "sgd", 0.0, 0.0)
    _, paper = resolve_configs("fusion-net", {"recipe": "paper"})
    assert (paper.optimizer, paper.lr, paper.momentum) == ("sgd", 0.7, 0.0)
