"""Stage two: train one head on cached features and write its run directory (DESIGN.md "Runs").

``train(job)`` follows one head name from the command line to ``OUT/<head>-<hash12>/``:

1. resolve the head config and TrainConfig (paper defaults, then ``--set``), open the store and the manifest;
2. hash the resolved config together with the store's and the manifest's fingerprints; a complete run
   directory of that name means the work is done ("cached") and nothing is loaded;
3. join the split with the store, carve a validation split from train by group, load features;
4. fit (torch: the recipe's step budget and early stopping, best checkpoint kept, a non-finite loss or score stops
   the run with an error and nothing marked complete; sklearn: fit on train); ``--find-lr`` first runs the
   learning-rate range test into the run directory (``lr_find.json`` / ``.png``) and, with ``apply``, trains at
   its suggested rate;
5. only then read the test videos, score them, and write weights, metrics (with the recipe, why training stopped
   and a "did not learn" warning when the training loss never fell clearly below its start), scores, log and
   plots, and the COMPLETE marker last.

``train_splits`` runs several splits and writes their mean +- std.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import pipeline.heads  # noqa: F401  (registers every head)
from pipeline.clips import expand_network
from pipeline.datasets import load_manifest
from pipeline.errors import UserError
from pipeline.features import VideoFeatures, carve_validation, iter_batches, join
from pipeline.metrics import classification_report, hit_at_k
from pipeline.registry import HEADS
from pipeline.runs import RunDir, write_summary
from pipeline.store import FeatureStore, file_sha256
from pipeline.training import (
    TrainingDiverged,
    build_head,
    count_params,
    find_lr,
    fit,
    fit_sklearn,
    predict,
    predict_sklearn,
    resolve_configs,
    resolve_device,
)

__all__ = ["RunResult", "TrainJob", "default_streams", "train", "train_splits"]

RUN_FORMAT = 1  # bump when the run directory's content changes meaning, so old runs are not reused


@dataclass(frozen=True)
class TrainJob:
    store: str
    dataset: str
    head: str = "ts-lstm"
    split: int = 1
    streams: tuple[str, ...] | None = None  # None: rgb and flow, those the store has
    overrides: tuple[tuple[str, str], ...] = ()  # --set key=value, in order
    out: str = "runs"
    seed: int = 0
    device: str = "auto"  # not part of the run hash: the same config on CPU or GPU names the same run
    allow_missing: bool = False
    split_dir: str | None = None
    init_from: str | None = None  # a finished run whose weights initialise this head (Ng et al. 3.3 expansion)
    find_lr: str | None = None  # "plot": learning-rate range test only; "apply": then train with its suggested lr


@dataclass
class RunResult:
    path: Path
    metrics: dict
    cached: bool


def default_streams(available: dict[str, int]) -> tuple[str, ...]:
    """Both two-stream features, rgb then flow, where the store has them; otherwise every stream it has."""
    picked = tuple(s for s in ("rgb", "flow") if s in available)
    return picked or tuple(sorted(available))


def _echo(msg: str) -> None:
    print(msg)


def train(job: TrainJob, progress: bool = True, echo: Callable[[str], None] = _echo,
          open_store: Callable = FeatureStore.open, open_manifest: Callable = load_manifest) -> RunResult:
    """Run ``job``. ``open_store`` / ``open_manifest`` let a sweep worker pass cached ones (load features once)."""
    entry = HEADS.get(job.head)
    head_cfg, cfg = resolve_configs(job.head, dict(job.overrides), seed=job.seed)
    store = open_store(job.store)
    manifest = open_manifest(job.dataset, job.split_dir)
    streams = tuple(job.streams) if job.streams else default_streams(store.streams)
    missing = [s for s in streams if s not in store.streams]
    if missing:
        raise UserError(f"the feature store has no stream {missing[0]!r}; it has: {', '.join(store.streams)}")

    # -- the run's name: a hash of everything that decides its result
    config = {
        "run_format": RUN_FORMAT,
        "head": job.head,
        "head_config": dataclasses.asdict(head_cfg),
        "train": dataclasses.asdict(cfg),
        "streams": list(streams),
        "split": job.split,
        "store_fingerprint": store.fingerprint,
        "manifest_fingerprint": manifest.fingerprint(),
        "classes": manifest.classes,
    }
    if job.init_from:
        config["init_from"] = _init_source(job.init_from)
    run = RunDir(job.out, job.head, config)
    if run.complete:
        echo(f"cached: {run.path}")
        return RunResult(run.path, run.read_json("metrics.json"), cached=True)

    # -- data: the split joined with the store; validation carved from train by group
    if store.classes and store.classes != manifest.classes:
        warnings.warn(f"the store was built with other class names than {job.dataset}; labels come from the dataset",
                      stacklevel=2)
    train_items, test_items = manifest.split(job.split)
    have = set(store.ids())
    train_items = join(train_items, have, job.allow_missing, what=f"training list of split {job.split}")
    test_items = join(test_items, have, job.allow_missing, what=f"test list of split {job.split}")
    train_items, val_items = carve_validation(train_items, cfg.val_fraction, cfg.seed)
    if not train_items or not test_items:
        raise UserError(f"split {job.split} leaves {len(train_items)} training and {len(test_items)} test videos")

    def features(items):
        return VideoFeatures(store, [it.id for it in items], [it.label for it in items], streams,
                             frames=cfg.frames, memory_gb=cfg.memory_gb)

    train_set, val_set = features(train_items), features(val_items)
    classes, device = manifest.classes, resolve_device(job.device)
    head = build_head(job.head, head_cfg, train_set.dim, len(classes), train_set.stream_dims, cfg.seed)
    if job.init_from:
        if entry.kind != "torch":
            raise UserError(f"--init-from needs a torch head; {job.head} is {entry.kind}")
        _expand_from(job.init_from, head, echo)
    echo(f"{run.name}: {job.head} on {'+'.join(streams)} ({train_set.dim} dims), split {job.split}: "
         f"{len(train_set)} train / {len(val_set)} val / {len(test_items)} test videos, "
         f"{'in memory' if train_set.in_memory else 'streamed'}, {device}")

    if job.find_lr:
        if entry.kind != "torch":
            raise UserError(f"--find-lr needs a torch head; {job.head} is {entry.kind}")
        lr_find = find_lr(head, train_set, cfg, device)
        echo(f"learning-rate range test: lowest smoothed loss at lr {lr_find['lowest_at_lr']:.3g} "
             f"({lr_find['steps']} steps, stopped: {lr_find['stopped']}); suggested lr {lr_find['suggested_lr']:.3g}")
        if job.find_lr == "apply":
            cfg = dataclasses.replace(cfg, lr=float(f"{lr_find['suggested_lr']:.3g}"))
            config["train"] = dataclasses.asdict(cfg)
            config["lr_from"] = "find-lr"
            run = RunDir(job.out, job.head, config)
            if run.complete:
                echo(f"cached: {run.path}")
                return RunResult(run.path, run.read_json("metrics.json"), cached=True)
        run.start()
        write_lr_find(run.path, lr_find)
        echo(f"{run.path / 'lr_find.png'}")
        if job.find_lr != "apply":
            return RunResult(run.path, {"lr_find": {k: lr_find[k] for k in ("suggested_lr", "lowest_at_lr",
                                                                              "stopped", "steps")}}, cached=False)
    else:
        run.start()

    # -- fit
    if entry.kind == "sklearn":
        fitted = fit_sklearn(head, train_set, val_set)
        score = lambda data: predict_sklearn(head, data, len(classes))
    else:
        fitted = fit(head, train_set, val_set, cfg, device, on_epoch=run.log, progress=progress)
        score = lambda data: predict(head, data, device, cfg.eval_batch_size)
    val_scores = score(val_set) if len(val_set) else np.zeros((0, len(classes)), np.float32)
    _check_finite(val_scores, "validation", cfg)

    # -- the test split is read only now, for the final evaluation
    del train_set
    test_set = features(test_items)
    test_scores = score(test_set)
    _check_finite(test_scores, "test", cfg)
    metrics = classification_report(test_scores, test_set.labels, classes)
    if hasattr(head, "clip_logits"):  # Karpathy Table 1 / Ng Table 1: clip and video Hit@k side by side
        metrics["clip"] = clip_report(head, test_set, device, cfg.eval_batch_size)
    metrics.update({
        "head": job.head, "split": job.split, "streams": list(streams),
        "n_train": len(train_items), "n_val": len(val_items), "n_test": len(test_set),
        "val_accuracy": fitted["best_val_accuracy"], "best_epoch": fitted["best_epoch"],
        "epochs_run": fitted["epochs_run"], "fit_seconds": fitted["fit_seconds"],
        "params": count_params(head), "device": str(device),
    })
    if entry.kind == "torch":
        metrics.update({k: fitted[k] for k in ("stop_reason", "steps_run", "budget_steps", "best_step", "start_loss",
                                                "lowest_loss", "did_not_learn", "warnings")})
        metrics["recipe"] = cfg.recipe
        for w in fitted["warnings"]:
            warnings.warn(f"{run.name}: {w}", stacklevel=2)

    # -- write the run; COMPLETE last
    if entry.kind == "sklearn":
        run.write_sklearn_weights(head)
    else:
        run.write_torch_weights(head, metadata={"head": job.head, "config_hash": run.hash})
    run.write_scores("scores_val.npz", val_set.ids, val_set.labels, val_scores, classes)
    run.write_scores("scores_test.npz", test_set.ids, test_set.labels, test_scores, classes)
    run.write_json("metrics.json", metrics)
    run.plot_learning_curve(fitted["history"])
    run.plot_confusion(metrics["confusion"], classes)
    run.mark_complete()
    echo(f"{run.path}: accuracy {100 * metrics['accuracy']:.2f}  hit@5 {100 * metrics['hit@5']:.2f}  "
         f"mAP {100 * metrics['map']:.2f}  ({metrics['n_test']} test videos, best epoch {metrics['best_epoch']}"
         + (f", {metrics['recipe']} recipe, stopped: {metrics['stop_reason']}" if "stop_reason" in metrics else "")
         + ")")
    return RunResult(run.path, metrics, cached=False)


def _check_finite(scores: np.ndarray, what: str, cfg) -> None:
    """Non-finite scores are divergence, never a result: stop before anything is marked complete."""
    if not np.isfinite(scores).all():
        raise TrainingDiverged(f"training diverged: non-finite {what} scores (lr={cfg.lr:g}, {cfg.optimizer}); "
                               f"lower lr, or pick one with --find-lr")


def write_lr_find(path: Path, result: dict) -> None:
    """``lr_find.json`` (the sweep) and ``lr_find.png`` (loss against learning rate, log scale) in a run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from pipeline.runs import write_json

    write_json(path / "lr_find.json", result)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result["lr"], result["loss"], color="tab:blue", alpha=0.3, label="loss")
    ax.plot(result["lr"], result["smoothed"], color="tab:blue", label="smoothed loss")
    ax.axvline(result["suggested_lr"], color="tab:red", ls="--", label=f"suggested lr {result['suggested_lr']:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss",
           title=f"learning-rate range test ({result['stopped']})")
    lo, hi = min(result["smoothed"]), max(result["smoothed"][0], min(result["smoothed"]) * 1.5)
    ax.set_ylim(lo - 0.1 * (hi - lo + 1e-9), hi + 0.5 * (hi - lo + 1e-9))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path / "lr_find.png", dpi=100)
    plt.close(fig)


@torch.no_grad()
def clip_report(head, data: VideoFeatures, device, batch_size: int) -> dict:
    """Clip-level Hit@1 / Hit@5: every evaluation clip scored on its own against its video's label."""
    head.eval().to(device)
    scores, labels = [], []
    for x, mask, y in iter_batches(data, batch_size):
        logits, cmask = head.clip_logits(x.to(device).float(), None if mask is None else mask.to(device))
        keep = cmask.cpu().reshape(-1)
        scores.append(logits.float().cpu().reshape(-1, logits.shape[-1])[keep])
        labels.append(y.repeat_interleave(logits.shape[1])[keep])
    s, y = torch.cat(scores).numpy(), torch.cat(labels).numpy()
    return {"hit@1": hit_at_k(s, y, 1), "hit@5": hit_at_k(s, y, 5), "n_clips": len(y)}


def _init_source(run_dir: str) -> dict:
    """What --init-from names, for the run hash: the source run and its weights' hash."""
    weights = Path(run_dir) / "weights.safetensors"
    if not weights.is_file():
        raise UserError(f"--init-from {run_dir}: no weights.safetensors there (is it a finished torch run?)")
    return {"run": Path(run_dir).name, "weights_sha256": file_sha256(weights)}


def _expand_from(run_dir: str, head, echo) -> None:
    """Network expansion (Ng et al. 3.3): copy the trained weights of a model over fewer frames."""
    from safetensors.torch import load_file

    state = load_file(str(Path(run_dir) / "weights.safetensors"))
    try:
        report = expand_network(state, head)
    except (ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"--init-from {run_dir}: weights do not fit this head ({e})") from None
    copied = sum(v == "copied" for v in report.values())
    echo(f"initialised {copied} of {len(report)} tensors from {run_dir}")


def train_splits(job: TrainJob, splits: list[int], progress: bool = True,
                 echo: Callable[[str], None] = _echo) -> tuple[list[RunResult], Path, dict]:
    """One run per split, then ``OUT/<head>-splits-<hash12>.json|.md`` with mean +- std over them."""
    if job.find_lr == "plot":
        raise UserError("--find-lr trains nothing, so it runs on one --split; --find-lr=apply works with --splits")
    results = [train(dataclasses.replace(job, split=s), progress=progress, echo=echo) for s in splits]
    path, summary = write_summary(job.out, job.head, {s: (r.path.name, r.metrics) for s, r in zip(splits, results)})
    a = summary["accuracy"]
    echo(f"{job.head} over splits {','.join(map(str, splits))}: accuracy {100 * a['mean']:.2f} +- {100 * a['std']:.2f}"
         f"  ({path})")
    return results, path, summary
