"""Score fusion of finished runs (Wu et al. 2015 Section 4.2.3: "the prediction scores from these networks are
fused linearly with weights estimated by cross-validation"; the late fusion of two-stream models).

``fuse(job)`` reads the per-video scores of K finished runs and checks that they score the same videos of the same
split with the same classes, held out the same *fusion fold* (``stages.train``: carved by group from the training
split with a fixed seed, so every run of a split shares it), and were not trained on features of CNNs fine-tuned on
another split. It combines them with ``pipeline.score_fusion.ScoreFusion``: each run normalised by a rule for its
kind (``"auto"``: log-softmax for torch heads, whose scores are logits; temperature scaling fitted on the fusion
fold for SVM margins), weights chosen by k-fold cross-validation on ``scores_fusion.npz`` only. Validation scores
are not used: torch heads chose their epoch on them (SVMs did not), so they flatter the torch heads; test scores
are only combined with the chosen weights. The result is a run directory like any other
(``OUT/score-fusion-<hash12>/``: config.json, metrics.json, fused scores of validation, fusion fold and test, the
weights and normalisation, confusion matrix, COMPLETE), so it shows up in ``twostream report`` and can itself be
fused again.
"""

from __future__ import annotations

import json
import math
import time
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.metrics import classification_report
from pipeline.runs import COMPLETE, RunDir
from pipeline.score_fusion import NORMALIZATIONS, ScoreFusion, score_metric

__all__ = ["FuseJob", "FusedRun", "fuse", "load_scores"]

FUSE_FORMAT = 2  # bump when a fused run's content changes meaning
HEAD = "score-fusion"


@dataclass(frozen=True)
class FuseJob:
    runs: tuple[str, ...]  # run directories, in the order the weights are given
    out: str = "runs"
    weights: tuple[float, ...] | None = None  # None: by cross-validation on the fusion fold's scores
    metric: str = "accuracy"  # what cross-validation maximises: "accuracy" (UCF101) or "map" (CCV)
    normalize: str = "auto"  # per-run score normalisation: "auto" (by run kind) or one of score_fusion's rules
    step: float = 0.1  # grid step over the weight simplex
    cv: int = 5
    seed: int = 0  # fold assignment

    def __post_init__(self):
        """Every option is checked here, before any score is read (the CLI and the Python API both build a FuseJob)."""
        problem = None
        if self.weights is not None and not (all(math.isfinite(w) and w >= 0 for w in self.weights)
                                             and sum(self.weights) > 0):
            problem = f"--weights {','.join(map(str, self.weights))}: weights are non-negative and not all 0"
        elif not (math.isfinite(self.step) and 0 < self.step <= 1 and math.isclose(round(1 / self.step) * self.step, 1)):
            problem = f"--step {self.step}: a step of the weight grid is in (0, 1] and divides 1 (e.g. 0.1, 0.25)"
        elif self.cv < 2:
            problem = f"--cv {self.cv}: cross-validation needs at least 2 folds"
        elif self.metric not in ("accuracy", "map"):
            problem = f"metric {self.metric!r}: choose accuracy or map"
        elif self.normalize != "auto" and self.normalize not in NORMALIZATIONS:
            problem = f"normalize {self.normalize!r}: choose auto, {', '.join(NORMALIZATIONS)}"
        if problem:
            raise UserError(problem)


@dataclass
class FusedRun:
    path: Path
    metrics: dict
    cached: bool


@dataclass
class _Scores:
    ids: np.ndarray
    labels: np.ndarray
    scores: np.ndarray
    classes: list[str]


def load_scores(path: Path) -> _Scores:
    """A run's per-video scores; a damaged file (empty, truncated, missing arrays, shapes that disagree, non-finite
    scores) is refused with one line naming it."""
    try:
        with np.load(path, allow_pickle=False) as z:
            s = _Scores(z["ids"], z["labels"], z["scores"], [str(c) for c in z["classes"]])
    except (OSError, EOFError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); rerun that run") from None
    n = len(s.ids)
    if s.labels.ndim == 2 and s.labels.shape == s.scores.shape:
        raise UserError(f"{path} holds multi-label scores; score fusion fits single-label weights and does not "
                        "combine multi-label runs")
    if s.scores.ndim != 2 or s.scores.shape != (n, len(s.classes)) or s.labels.shape != (n,):
        raise UserError(f"{path} is damaged: scores {s.scores.shape}, {n} ids, {s.labels.shape[0]} labels and "
                        f"{len(s.classes)} classes do not agree; rerun that run")
    if not np.isfinite(s.scores).all():
        raise UserError(f"{path} holds non-finite scores (NaN or Inf); rerun that run")
    return s


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is damaged ({type(e).__name__}: {e}); rerun that run") from None


def _read_run(path: str) -> dict:
    d = Path(path)
    if not (d / "config.json").is_file():
        raise UserError(f"{d} is not a run directory (no config.json)")
    if not (d / COMPLETE).is_file():
        raise UserError(f"{d} is not complete (no {COMPLETE} marker): finish or rerun it before fusing")
    for name in ("scores_val.npz", "scores_test.npz"):
        if not (d / name).is_file():
            raise UserError(f"{d} has no {name}; only runs that saved per-video scores can be fused")
    fusion = d / "scores_fusion.npz"
    return {"path": d, "config": _read_json(d / "config.json"),
            "metrics": _read_json(d / "metrics.json") if (d / "metrics.json").is_file() else {},
            "val": load_scores(d / "scores_val.npz"), "test": load_scores(d / "scores_test.npz"),
            "fusion": load_scores(fusion) if fusion.is_file() else None}


def run_kind(config: dict) -> str:
    """"torch" for a head trained with cross-entropy (scores are logits), else "margins" (SVMs, fused runs)."""
    import pipeline.baselines  # registers the kernel baselines
    import pipeline.heads  # noqa: F401
    from pipeline.registry import HEADS

    head = config.get("head")
    return "torch" if head in HEADS and HEADS.get(head).kind == "torch" else "margins"


def normalisations(runs: list[dict], normalize: str) -> list[str]:
    """The rule per run: "auto" picks log-softmax for torch heads and fitted temperature for margins."""
    if normalize == "auto":
        return ["log-softmax" if run_kind(r["config"]) == "torch" else "temperature" for r in runs]
    if normalize not in NORMALIZATIONS:
        raise UserError(f"--normalize must be auto or one of {', '.join(NORMALIZATIONS)}; got {normalize!r}")
    return [normalize] * len(runs)


def check_protocol(runs: list[dict], fitted: bool) -> None:
    """Refuse runs that do not share one fusion fold (when anything is fitted), or whose features come from CNNs
    fine-tuned on another split of the same dataset (their test videos were training videos of those CNNs)."""
    for r in runs:
        cfg = r["config"]
        for stream, rec in (cfg.get("finetuned") or {}).items():
            if rec.get("dataset") == cfg.get("manifest_fingerprint") and rec.get("split") != cfg.get("split"):
                raise UserError(f"{r['path']}: stream {stream}'s CNN ({rec.get('checkpoint')}) was fine-tuned on "
                                f"split {rec.get('split')} but the run tests on split {cfg.get('split')}; "
                                "its test videos were training videos of that CNN")
    if not fitted:
        return
    for r in runs:
        if not (r["config"].get("fusion_fold") or {}).get("sha256") or r["fusion"] is None:
            raise UserError(f"{r['path']} holds no fusion fold (trained before fusion folds, or with --fusion-fold 0)"
                            "; retrain it, or give --weights by hand with --normalize log-softmax, softmax or none")
    folds = {r["config"]["fusion_fold"]["sha256"] for r in runs}
    if len(folds) > 1:
        which = ", ".join(f"{r['path'].name}: {r['config']['fusion_fold']['sha256'][:12]}" for r in runs)
        raise UserError(f"the runs held out different fusion folds ({which}); fuse runs of one split and store "
                        "trained with the same --fusion-fold")


def _align(runs: list[dict], part: str) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """Score matrices of every run in the first run's video order, after checking videos, labels and classes."""
    ref = runs[0][part]
    order = {v: i for i, v in enumerate(ref.ids.tolist())}
    mats = []
    for r in runs:
        s = r[part]
        if s.classes != ref.classes:
            raise UserError(f"{r['path']} scores other classes than {runs[0]['path']} "
                            f"({len(s.classes)} vs {len(ref.classes)}); fuse runs of one dataset")
        ids = s.ids.tolist()
        if len(ids) != len(order) or set(ids) != set(order):
            extra, missing = sorted(set(ids) - set(order)), sorted(set(order) - set(ids))
            raise UserError(
                f"{r['path']} and {runs[0]['path']} score different {part} videos "
                f"({len(ids)} vs {len(order)}; e.g. {(extra or missing)[0]!r} is in one only); "
                "fuse runs of one split and one dataset")
        idx = np.array([order[v] for v in ids])
        m = np.empty_like(s.scores)
        m[idx] = s.scores  # reorder into the first run's video order
        lab = np.empty_like(s.labels)
        lab[idx] = s.labels
        if not np.array_equal(lab, ref.labels):
            raise UserError(f"{r['path']} labels the {part} videos differently from {runs[0]['path']}")
        mats.append(m)
    return mats, ref.ids, ref.labels


def fuse(job: FuseJob, echo: Callable[[str], None] = print) -> FusedRun:
    if len(job.runs) < 2:
        raise UserError("give at least two run directories to fuse")
    if job.weights is not None and len(job.weights) != len(job.runs):
        raise UserError(f"--weights has {len(job.weights)} numbers for {len(job.runs)} runs")
    runs = [_read_run(p) for p in job.runs]

    # -- the same split, dataset and videos, or a clear refusal
    splits = {r["config"].get("split") for r in runs}
    if len(splits) > 1:
        which = ", ".join(f"{r['path'].name}: split {r['config'].get('split')}" for r in runs)
        raise UserError(f"runs of different splits cannot be fused ({which})")
    manifests = {r["config"].get("manifest_fingerprint") for r in runs} - {None}
    if len(manifests) > 1:
        raise UserError("runs come from different datasets (manifest fingerprints differ); fuse runs of one dataset")
    rules = normalisations(runs, job.normalize)
    fitted = job.weights is None or any(r in ("temperature", "zscore") for r in rules)
    check_protocol(runs, fitted)
    val, val_ids, y_val = _align(runs, "val")
    test, test_ids, y_test = _align(runs, "test")
    have_fold = all(r["fusion"] is not None for r in runs)
    fold, fold_ids, y_fold = _align(runs, "fusion") if have_fold else ([], np.array([], str), np.array([], int))
    classes = runs[0]["test"].classes
    if fitted and len(y_fold) < 2:
        raise UserError("the runs' fusion fold holds fewer than 2 videos; retrain with a larger --fusion-fold")

    config = {
        "run_format": FUSE_FORMAT,
        "head": HEAD,
        "split": runs[0]["config"].get("split"),
        "inputs": [r["config"] for r in runs],
        "fusion_fold": runs[0]["config"].get("fusion_fold") if have_fold else None,
        "fusion": {"weights": list(job.weights) if job.weights is not None else None, "metric": job.metric,
                   "normalize": job.normalize, "step": job.step, "cv": job.cv, "seed": job.seed},
    }
    run = RunDir(job.out, HEAD, config)
    if run.complete:
        metrics = run.read_json("metrics.json")
        echo(f"cached: {_result_line(run.path, metrics)}")
        return FusedRun(run.path, metrics, cached=True)

    # -- normalisation and weights on the fusion fold only; validation and test scores are only combined
    t0 = time.perf_counter()
    fusion = ScoreFusion(weights=job.weights, step=job.step, cv=job.cv, metric=job.metric,
                         normalize=rules, random_state=job.seed)
    if fitted:
        fusion.fit(fold, y_fold)
    else:  # hand weights and a rule with nothing to learn: fit only checks shapes and normalises the weights
        fusion.fit(test, y_test)
    fit_seconds = time.perf_counter() - t0

    def combined(mats, y):
        return fusion.decision_function(mats) if len(y) else np.zeros((0, len(classes)), np.float32)

    fused_val, fused_fold, fused_test = combined(val, y_val), combined(fold, y_fold), combined(test, y_test)
    metrics = classification_report(fused_test, y_test, classes)
    streams = sorted({s for r in runs for s in r["config"].get("streams", [])})
    metrics.update({
        "head": HEAD, "split": config["split"], "streams": streams,
        "inputs": [r["path"].name for r in runs],
        "weights": [float(w) for w in fusion.weights_],
        "weights_by": "hand" if job.weights is not None else "cross-validation on the fusion fold",
        "normalization": {r["path"].name: {"rule": rule, "temperature": t}
                          for r, rule, t in zip(runs, fusion.normalize_, fusion.temperatures_)},
        "cv_score": getattr(fusion, "best_score_", None),
        "input_accuracy": {r["path"].name: score_metric(m, y_test, "accuracy") for r, m in zip(runs, test)},
        "input_fusion_accuracy": ({r["path"].name: score_metric(m, y_fold, "accuracy") for r, m in zip(runs, fold)}
                                  if len(y_fold) else None),
        "val_accuracy": score_metric(fused_val, y_val, "accuracy") if len(y_val) else None,
        "n_val": len(y_val), "n_fusion": len(y_fold), "fit_seconds": fit_seconds, "params": len(runs),
    })

    run.start()
    run.write_sklearn_weights(fusion)  # weights_, normalisation statistics: weights.npz
    run.write_scores("scores_val.npz", val_ids, y_val, fused_val, classes)
    if have_fold:
        run.write_scores("scores_fusion.npz", fold_ids, y_fold, fused_fold, classes)
    run.write_scores("scores_test.npz", test_ids, y_test, fused_test, classes)
    run.write_json("metrics.json", metrics)
    run.plot_learning_curve([])
    run.plot_confusion(metrics["confusion"], classes)
    run.mark_complete()
    echo(_result_line(run.path, metrics))
    return FusedRun(run.path, metrics, cached=False)


def _result_line(path: Path, metrics: dict) -> str:
    """A fused run's weights and test metrics in one line (a cached run prints it after ``cached:``)."""
    inputs = ", ".join(f"{n} {100 * a:.2f}" for n, a in (metrics.get("input_accuracy") or {}).items())
    return (f"{path}: weights {', '.join(f'{w:.2f}' for w in metrics.get('weights', []))} -> accuracy "
            f"{100 * metrics['accuracy']:.2f}  hit@5 {100 * metrics['hit@5']:.2f}  mAP {100 * metrics['map']:.2f}"
            f"  (inputs: {inputs})")
