"""Feature-fusion methods of Wu et al. (ACM MM 2015, Table 2) side by side on synthetic two-stream features:
seconds to fit and test accuracy for svm (each stream), svm-ef, svm-lf, svm-mkl, nn-ef, nn-lf and the fusion
network without and with its structural norms.

The features imitate UCF-101 split 1 at video level (9,537 training and 3,783 test videos, 101 classes, two
4,096-d ReLU streams): each stream is a rectified random projection of a 32-d latent, which is the video's class
mean plus per-video noise. The streams are complementary on purpose: in each stream, classes come in
look-alike pairs (different pairs in the two streams), as with classes that share a scene but not a motion.
Accuracy on such data says which methods exploit two partly informative streams, not what they score on UCF-101;
the paper's numbers are printed alongside for reference only.

    PYTHONPATH=. .venv/bin/python bench/fusion.py --quick          # 1,500 / 600 videos, 20 classes, 2 x 256-d
    PYTHONPATH=. .venv/bin/python bench/fusion.py                  # UCF-101 sizes (11-24 min per SVM method, 1 thread)

The networks are trained by the real trainer (``pipeline.training.fit``) with a training recipe: ``--recipe
converge`` (the default of `twostream train`: plain SGD at lr 0.7 with warm-up and cosine decay, a budget in
optimiser steps and early stopping on a 10% validation carve of the training videos, best checkpoint restored)
or ``--recipe paper`` (Section 4.1.2: constant lr 0.7, ``--epochs`` or 100 epochs, no validation). Fit times
include computing the chi-square kernels (each SVM method computes its own). The last lines say whether the
ranking of Table 2 holds: Kendall's tau between measured and published accuracies and the pairs ranked otherwise.
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import numpy as np
import torch

import pipeline.baselines  # registers the sklearn heads
import pipeline.heads  # noqa: F401  (registers the torch heads)
from pipeline.registry import HEADS
from pipeline.training import fit, resolve_configs

# Table 2 of the paper, UCF-101 (mean over three splits).
PAPER_UCF101 = {"svm rgb": 78.6, "svm flow": 78.2, "svm-ef": 86.6, "svm-lf": 85.3, "svm-mkl": 86.8,
                "nn-ef": 86.5, "nn-lf": 85.1, "fusion-net (lambda2=lambda3=0)": 87.0, "fusion-net": 88.4}

# name shown -> (registered head, config overrides)
METHODS = {
    "svm rgb": ("svm", {"stream": 0}),
    "svm flow": ("svm", {"stream": 1}),
    "svm-ef": ("svm-ef", {}),
    "svm-lf": ("svm-lf", {}),
    "svm-mkl": ("svm-mkl", {}),
    "nn-ef": ("nn-ef", {}),
    "nn-lf": ("nn-lf", {}),
    "fusion-net (lambda2=lambda3=0)": ("fusion-net", {"lambda2": 0.0, "lambda3": 0.0}),
    "fusion-net": ("fusion-net", {}),
}


def synthetic_two_stream(n_train, n_test, num_classes, dims, noise, latent=32, seed=0):
    """Video-level features [N, sum(dims)] and labels; see the module docstring.

    Each stream is a rectified random projection of a low-dimensional latent (as CNN features lie near a
    low-dimensional manifold): z = class mean + noise[s] * N(0, I) in R^latent, x = relu(A_s z + 0.1 N(0, I)).
    """
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    y = rng.integers(0, num_classes, n)
    parts = []
    for s, d in enumerate(dims):
        base = rng.normal(size=(num_classes, latent))
        # Look-alike pairs: stream 0 pairs (0,1), (2,3), ...; stream 1 pairs (1,2), (3,4), ... (cyclic).
        partner = [(c ^ 1) % num_classes if s == 0 else (c + 1 if c % 2 else c - 1) % num_classes
                   for c in range(num_classes)]
        means = 0.7 * base + 0.3 * base[partner]  # [C, latent]
        z = means[y] + noise[s] * rng.normal(size=(n, latent))  # [N, latent]
        proj = rng.normal(size=(latent, d)) / np.sqrt(latent)
        parts.append(np.maximum(z @ proj + 0.1 * rng.normal(size=(n, d)), 0).astype(np.float32))  # [N, d]
    x = np.hstack(parts)
    return x[:n_train], y[:n_train], x[n_train:], y[n_train:]


class VideoLevel:
    """Video-level features as the trainer's dataset: ``len``, ``labels`` and ``batch(index) -> (x [B, 1, D], None,
    y [B])`` (one "frame" per video, already pooled)."""

    def __init__(self, x, y):
        self.x, self.y, self.labels = torch.from_numpy(x)[:, None, :], torch.from_numpy(y), y

    def __len__(self):
        return len(self.y)

    def batch(self, index):
        index = list(index)
        return self.x[index], None, self.y[index]


def fit_torch(head, x, y, cfg, device):
    """The real trainer on video-level features; under the converge recipe 10% of the videos validate (early
    stopping, best checkpoint), under the paper's every video trains for the full budget."""
    if cfg.recipe == "converge":
        order = np.random.default_rng(cfg.seed).permutation(len(y))
        val, tr = order[: len(y) // 10], order[len(y) // 10 :]
        out = fit(head, VideoLevel(x[tr], y[tr]), VideoLevel(x[val], y[val]), cfg, torch.device(device), progress=False)
    else:
        out = fit(head, VideoLevel(x, y), None, cfg, torch.device(device), progress=False)
    head.eval()
    return out


def tune_lambdas(entry, cfg, x, y, dims, n_cls, train_cfg, device, grid=(3e-6, 3e-5, 3e-4)):
    """lambda2, lambda3 by accuracy on a 20% hold-out of the training videos; the fit time includes this search."""
    rng = np.random.default_rng(1)
    idx = rng.permutation(len(y))
    hold, fit_idx = idx[: len(y) // 5], idx[len(y) // 5 :]
    best = None
    for lam2 in grid:
        for lam3 in grid:
            trial = dataclasses.replace(cfg, lambda2=lam2, lambda3=lam3)
            m = entry.builder(trial, sum(dims), n_cls, dims)
            fit_torch(m, x[fit_idx], y[fit_idx], train_cfg, device)
            acc = float((predict_torch(m, x[hold], device) == y[hold]).mean())
            if best is None or acc > best[0]:
                best = (acc, trial)
    return best[1], f"hold-out {100 * best[0]:.1f}%"


@torch.no_grad()
def predict_torch(head, x, device):
    return head(torch.from_numpy(x)[:, None, :].to(device)).argmax(1).cpu().numpy()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small problem: 1500 / 600 videos, 20 classes, 2 x 256-d")
    ap.add_argument("--train", type=int, default=None, help="training videos (default 9537, quick 1500)")
    ap.add_argument("--test", type=int, default=None, help="test videos (default 3783, quick 600)")
    ap.add_argument("--classes", type=int, default=None, help="classes (default 101, quick 20)")
    ap.add_argument("--dim", type=int, default=None, help="dimension of each stream (default 4096, quick 256)")
    ap.add_argument("--noise", type=float, nargs=2, default=(1.3, 1.35), help="per-video latent noise of rgb and flow")
    ap.add_argument("--recipe", choices=["converge", "paper"], default="converge", help="training recipe of the networks")
    ap.add_argument("--epochs", type=int, default=None, help="epochs for the networks (default: the recipe's)")
    ap.add_argument("--methods", nargs="*", default=list(METHODS), help="subset of: " + ", ".join(METHODS))
    ap.add_argument("--device", default="cpu", help="torch device for the networks")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--jobs", type=int, default=1, help="threads for the one-vs-rest SVM solves")
    ap.add_argument("--seed", type=int, default=0, help="seed of the networks' initial weights and batch order")
    ap.add_argument("--tune", action="store_true",
                    help="choose fusion-net's lambda2, lambda3 in {3e-6, 3e-5, 3e-4} on a 20%% hold-out of the "
                         "training videos (the paper: 'tune lambda2 and lambda3 in the same range as lambda1')")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    n_train = args.train or (1500 if args.quick else 9537)
    n_test = args.test or (600 if args.quick else 3783)
    n_cls = args.classes or (20 if args.quick else 101)
    dim = args.dim or (256 if args.quick else 4096)
    dims = (dim, dim)
    x, y, xt, yt = synthetic_two_stream(n_train, n_test, n_cls, dims, args.noise)
    print(f"synthetic two-stream features: {n_train} train / {n_test} test videos, {n_cls} classes, "
          f"streams {dims}, noise {tuple(args.noise)}; torch threads {args.threads}, device {args.device}")

    rows = []
    for shown in args.methods:
        name, overrides = METHODS[shown]
        entry = HEADS.get(name)
        if entry.kind == "sklearn":
            overrides = {**overrides, "n_jobs": args.jobs}
        cfg = HEADS.make_config(name, overrides)
        torch.manual_seed(args.seed)  # initial weights depend on the seed only, not on the methods run before
        model = entry.builder(cfg, sum(dims), n_cls, dims)
        t0 = time.perf_counter()
        extra = ""
        if entry.kind == "sklearn":
            model.fit(x, y)
            fit_s = time.perf_counter() - t0
            pred = model.predict(xt)
            if hasattr(model, "weights_"):
                extra = "kernel weights " + ", ".join(f"{w:.2f}" for w in model.weights_) + f" ({model.n_iter_} it)"
        else:
            sets = {"recipe": args.recipe, **({"epochs": args.epochs} if args.epochs else {})}
            _, train_cfg = resolve_configs(name, sets, seed=args.seed)
            if args.tune and shown == "fusion-net":
                cfg, tuned = tune_lambdas(entry, cfg, x, y, dims, n_cls, train_cfg, args.device)
                torch.manual_seed(args.seed)
                model = entry.builder(cfg, sum(dims), n_cls, dims)
                extra = f"lambda2 {cfg.lambda2:g}, lambda3 {cfg.lambda3:g} by hold-out ({tuned}); "
            fitted = fit_torch(model, x, y, train_cfg, args.device)
            if args.device.startswith("cuda"):
                torch.cuda.synchronize()
            fit_s = time.perf_counter() - t0
            pred = predict_torch(model, xt, args.device)
            extra += (f"{args.recipe}: {fitted['steps_run']} steps ({fitted['stop_reason']}), lr {train_cfg.lr}, "
                      f"batch {train_cfg.batch_size}")
            if name == "fusion-net":
                w = model.fusion.weight.detach().cpu()
                extra += f"; zero rows of W^E {int((w.abs().amax(1) == 0).sum())}/{w.shape[0]}"
        acc = 100 * float((pred == yt).mean())
        rows.append((shown, acc, fit_s, PAPER_UCF101[shown], extra))
        print(f"  {shown}: {acc:.1f}% in {fit_s:.1f} s {extra}", flush=True)

    print()
    print("| method | synthetic accuracy (%) | fit (s) | paper, UCF-101 (%) | notes |")
    print("|---|---:|---:|---:|---|")
    for shown, acc, fit_s, paper, extra in rows:
        print(f"| {shown} | {acc:.1f} | {fit_s:.1f} | {paper:.1f} | {extra} |")
    print()
    print(table2_order([(shown, acc) for shown, acc, *_ in rows]))


def table2_order(measured: list[tuple[str, float]]) -> str:
    """Does the measured ranking follow Table 2's? Kendall's tau over the methods run, and the pairs ranked otherwise
    (published ties, e.g. none here, would count as agreeing)."""
    from scipy.stats import kendalltau

    names = [n for n, _ in measured]
    ours = [a for _, a in measured]
    paper = [PAPER_UCF101[n] for n in names]
    if len(names) < 2:
        return "Table 2 ordering: fewer than two methods run"
    tau = kendalltau(ours, paper).statistic
    flipped = [f"{a} vs {b}" for i, a in enumerate(names) for j, b in enumerate(names)
               if i < j and (PAPER_UCF101[a] - PAPER_UCF101[b]) * (ours[i] - ours[j]) < 0]
    verdict = "holds" if not flipped else f"differs in {len(flipped)} of {len(names) * (len(names) - 1) // 2} pairs"
    return (f"Table 2 ordering {verdict} (Kendall tau {tau:.2f})" + (": " + "; ".join(flipped) if flipped else ""))


if __name__ == "__main__":
    main()
