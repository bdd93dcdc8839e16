"""Score fusion of finished runs (issue 6 part 4; Wu et al. 2015 Section 4.2.3: "the prediction scores from these
networks are fused linearly with weights estimated by cross-validation").

``fuse(job)`` reads the per-video scores of K finished runs (``scores_val.npz``, ``scores_test.npz``), checks that
they score the same videos of the same split with the same classes, and combines them with
``pipeline.score_fusion.ScoreFusion``: weights chosen by k-fold cross-validation on the *validation* scores (carved
from the training split; the test scores are read only to apply the chosen weights), or given by hand. The result is
a run directory like any other (``OUT/score-fusion-<hash12>/``: config.json, metrics.json, fused scores, the fusion
weights, confusion matrix, COMPLETE), so it shows up in ``twostream report`` and can itself be fused again.
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
from pipeline.score_fusion import ScoreFusion, score_metric

__all__ = ["FuseJob", "FusedRun", "fuse", "load_scores"]

FUSE_FORMAT = 1  # bump when a fused run's content changes meaning
HEAD = "score-fusion"


@dataclass(frozen=True)
class FuseJob:
    runs: tuple[str, ...]  # run directories, in the order the weights are given
    out: str = "runs"
    weights: tuple[float, ...] | None = None  # None: by cross-validation on the validation scores
    metric: str = "accuracy"  # what cross-validation maximises: "accuracy" (UCF101) or "map" (CCV)
    normalize: str = "zscore"  # per-run score normalisation before the weighted sum (see pipeline.score_fusion)
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
        elif self.normalize not in ("zscore", "softmax", "none"):
            problem = f"normalize {self.normalize!r}: choose zscore, softmax or none"
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
    return {"path": d, "config": _read_json(d / "config.json"),
            "metrics": _read_json(d / "metrics.json") if (d / "metrics.json").is_file() else {},
            "val": load_scores(d / "scores_val.npz"), "test": load_scores(d / "scores_test.npz")}


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
    val, val_ids, y_val = _align(runs, "val")
    test, test_ids, y_test = _align(runs, "test")
    classes = runs[0]["test"].classes
    if job.weights is None and len(y_val) < 2:
        raise UserError("the runs hold no validation scores to choose weights on (trained with val_fraction=0?); "
                        "give --weights by hand")
    if len(y_val) == 0 and job.normalize == "zscore":
        raise UserError("zscore normalisation needs validation scores; use --normalize softmax or none")

    config = {
        "run_format": FUSE_FORMAT,
        "head": HEAD,
        "split": runs[0]["config"].get("split"),
        "inputs": [r["config"] for r in runs],
        "fusion": {"weights": list(job.weights) if job.weights is not None else None, "metric": job.metric,
                   "normalize": job.normalize, "step": job.step, "cv": job.cv, "seed": job.seed},
    }
    run = RunDir(job.out, HEAD, config)
    if run.complete:
        echo(f"cached: {run.path}")
        return FusedRun(run.path, run.read_json("metrics.json"), cached=True)

    # -- weights on validation scores only; the test scores are only combined with them
    t0 = time.perf_counter()
    fusion = ScoreFusion(weights=job.weights, step=job.step, cv=job.cv, metric=job.metric,
                         normalize=job.normalize, random_state=job.seed)
    if len(y_val):
        fusion.fit(val, y_val)
    else:  # hand weights and no validation scores: nothing to learn (normalize is softmax or none)
        fusion.fit(test, y_test)  # only checks shapes and normalises the given weights; stats_ are unused here
    fit_seconds = time.perf_counter() - t0
    fused_val = fusion.decision_function(val) if len(y_val) else np.zeros((0, len(classes)), np.float32)
    fused_test = fusion.decision_function(test)

    metrics = classification_report(fused_test, y_test, classes)
    streams = sorted({s for r in runs for s in r["config"].get("streams", [])})
    metrics.update({
        "head": HEAD, "split": config["split"], "streams": streams,
        "inputs": [r["path"].name for r in runs],
        "weights": [float(w) for w in fusion.weights_],
        "weights_by": "hand" if job.weights is not None else "cross-validation on validation scores",
        "cv_score": getattr(fusion, "best_score_", None),
        "input_accuracy": {r["path"].name: score_metric(m, y_test, "accuracy") for r, m in zip(runs, test)},
        "input_val_accuracy": ({r["path"].name: score_metric(m, y_val, "accuracy") for r, m in zip(runs, val)}
                               if len(y_val) else None),
        "val_accuracy": score_metric(fused_val, y_val, "accuracy") if len(y_val) else None,
        "n_val": len(y_val), "fit_seconds": fit_seconds, "params": len(runs),
    })

    run.start()
    run.write_sklearn_weights(fusion)  # weights_, normalisation statistics: weights.npz
    run.write_scores("scores_val.npz", val_ids, y_val, fused_val, classes)
    run.write_scores("scores_test.npz", test_ids, y_test, fused_test, classes)
    run.write_json("metrics.json", metrics)
    run.plot_learning_curve([])
    run.plot_confusion(metrics["confusion"], classes)
    run.mark_complete()
    inputs = ", ".join(f"{n} {100 * a:.2f}" for n, a in metrics["input_accuracy"].items())
    echo(f"{run.path}: weights {', '.join(f'{w:.2f}' for w in metrics['weights'])} -> accuracy "
         f"{100 * metrics['accuracy']:.2f}  hit@5 {100 * metrics['hit@5']:.2f}  mAP {100 * metrics['map']:.2f}"
         f"  (inputs: {inputs})")
    return FusedRun(run.path, metrics, cached=False)
