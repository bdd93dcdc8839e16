"""Stage two: train one head on cached features and write its run directory.

``train(job)`` follows one head name from the command line to ``OUT/<head>-<hash12>/``:

1. resolve the head config and TrainConfig (paper defaults, then ``--set``), open the store and the manifest;
2. hash the resolved config together with the store's and the manifest's fingerprints; a complete run
   directory of that name means the work is done ("cached") and nothing is loaded;
3. join the split with the store; carve the fusion fold (fixed seed, the same for every run of the split) and then
   validation from train by group, never from videos a fine-tuned CNN of the store was trained on, and refuse a
   split whose test videos such a CNN saw (``pipeline.provenance``); load features;
4. fit (torch: the recipe's step budget and early stopping, best checkpoint kept, a non-finite loss or score stops
   the run with an error and nothing marked complete; sklearn: fit on train); ``--find-lr`` first runs the
   learning-rate range test into the run directory (``lr_find.json`` / ``.png``) and, with ``apply``, trains at
   its suggested rate;
5. score validation and the fusion fold; only then read the test videos, score them, and write weights, metrics
   (with the recipe, why training stopped and a "did not learn" warning when the training loss never fell clearly
   below its start), scores, log and plots, and the COMPLETE marker last.

``train_splits`` runs several splits and writes their mean +- std; ``train_late_fusion`` trains one run per stream
and fuses their scores (the papers' two-stream route); ``train`` itself concatenates the streams per frame.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

import pipeline.heads  # noqa: F401  (registers every head)
from pipeline.backbones import view_record
from pipeline.clips import expand_network
from pipeline.datasets import load_manifest
from pipeline.errors import UserError
from pipeline.extraction import extraction_record
from pipeline.features import (
    FUSION_FOLD_SEED,
    VideoFeatures,
    carve_fusion_fold,
    carve_validation,
    check_frames,
    features_nbytes,
    iter_batches,
    join,
)
from pipeline.metrics import classification_report, hit_at_k
from pipeline.provenance import check_split, ids_digest, seen_by_cnns
from pipeline.registry import HEADS
from pipeline.runs import RunDir, write_summary
from pipeline.store import FeatureStore, file_sha256
from pipeline.training import (
    TrainingDiverged,
    build_head,
    check_kernel_budget,
    count_params,
    find_lr,
    fit,
    fit_sklearn,
    predict,
    predict_sklearn,
    resolve_configs,
    resolve_device,
    train_record,
)

__all__ = ["EARLY_FUSION_NOTE", "RunPlan", "RunResult", "SplitFolds", "TrainJob", "check_store_split",
           "default_streams", "plan_run", "result_line", "split_folds", "store_for_split", "train", "train_late_fusion", "train_splits"]

RUN_FORMAT = 2  # bump when the run directory's content changes meaning, so old runs are not reused
FUSION_FOLD = 0.1  # share of each class's training videos every run holds out for score fusion
EARLY_FUSION_NOTE = ("the streams' features are concatenated per frame into one input of this head (early fusion, "
                     "unless the head splits them itself: two-stream, nn-lf, svm-lf, ...); the papers train one model "
                     "per stream and fuse their scores: --late-fusion")


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
    fusion_fold: float = FUSION_FOLD  # held out of training for score fusion (0: none; such runs cannot be fused)
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


def store_for_split(store: str, split: int) -> str:
    """``STORE`` with ``{split}`` replaced: one store per split when each split has its own fine-tuned CNNs."""
    return store.replace("{split}", str(split))


@dataclass
class SplitFolds:
    train: list
    val: list
    fusion: list
    test: list
    fusion_record: dict | None  # what the run records of its fusion fold (None: no fold)
    finetuned: dict  # per fine-tuned stream of the run: checkpoint, split, dataset


def split_folds(job: TrainJob, store, manifest, streams: tuple[str, ...], val_fraction: float,
                seed: int) -> SplitFolds:
    """The split's videos in the store, as train / validation / fusion fold / test.

    The fusion fold is carved first with a fixed seed (``carve_fusion_fold``), so it depends only on the split,
    the store and ``job.fusion_fold``, never on the head or the seed; validation is then carved from the rest.
    Videos a fine-tuned CNN of the store was trained on stay in training (``pinned``); a split whose test videos a
    CNN saw is refused (``pipeline.provenance.check_split``).
    """
    if not 0 <= job.fusion_fold < 1:
        raise UserError(f"--fusion-fold must be in [0, 1); got {job.fusion_fold}")
    seen = seen_by_cnns(store)
    train_items, test_items = manifest.split(job.split)
    have = set(store.ids())
    train_items = join(train_items, have, job.allow_missing, what=f"training list of split {job.split}")
    test_items = join(test_items, have, job.allow_missing, what=f"test list of split {job.split}")
    pinned = frozenset().union(*(r["train"] for r in seen.values()))
    train_items, fusion_items = carve_fusion_fold(train_items, job.fusion_fold, pinned)
    train_items, val_items = carve_validation(train_items, val_fraction, seed, pinned)
    check_split(seen, streams, job.split, [it.id for it in test_items],
                {"validation": [it.id for it in val_items], "fusion-fold": [it.id for it in fusion_items]})
    if not train_items or not test_items:
        raise UserError(f"split {job.split} leaves {len(train_items)} training and {len(test_items)} test videos")
    if job.fusion_fold > 0 and not fusion_items:
        if pinned:
            raise UserError(f"split {job.split} leaves no videos for the fusion fold (every training group is needed "
                            "or was trained on by a fine-tuned CNN); fine-tune with a larger --val-fraction")
        raise UserError(f"split {job.split} has too few training groups per class to hold out a fusion fold (each "
                        "class keeps one group for training); pass --fusion-fold 0 to train without one (such runs "
                        "cannot be score-fused)")
    record = None
    if job.fusion_fold > 0:
        record = {"fraction": job.fusion_fold, "seed": FUSION_FOLD_SEED, "n": len(fusion_items),
                  "sha256": ids_digest(it.id for it in fusion_items)}
    finetuned = {s: {k: seen[s][k] for k in ("checkpoint", "split", "dataset")} for s in streams if s in seen}
    return SplitFolds(train_items, val_items, fusion_items, test_items, record, finetuned)


def check_store_split(job: TrainJob, open_store: Callable = FeatureStore.open,
                      open_manifest: Callable = load_manifest) -> None:
    """Refuse ``job`` before any training when a fine-tuned CNN of its store saw a test video of its split."""
    store = open_store(store_for_split(job.store, job.split))
    seen = seen_by_cnns(store)
    if not seen:
        return
    _, test_items = open_manifest(job.dataset, job.split_dir).split(job.split)
    streams = tuple(job.streams) if job.streams else default_streams(store.streams)
    check_split(seen, streams, job.split, [it.id for it in test_items], {})


@dataclass
class RunPlan:
    """What ``train`` resolves before any feature is loaded: configs, store, manifest, folds, and the run's name."""

    entry: Any
    head_cfg: Any
    cfg: Any
    store: Any
    manifest: Any
    streams: tuple[str, ...]
    folds: SplitFolds
    config: dict
    run: RunDir


def plan_run(job: TrainJob, open_store: Callable = FeatureStore.open,
             open_manifest: Callable = load_manifest) -> RunPlan:
    """Resolve ``job`` into its run directory without training (``sweep --dry-run`` marks the finished ones)."""
    entry = HEADS.get(job.head)
    head_cfg, cfg = resolve_configs(job.head, dict(job.overrides), seed=job.seed)
    store = open_store(store_for_split(job.store, job.split))
    manifest = open_manifest(job.dataset, job.split_dir)
    if manifest.multi_label and entry.kind != "torch":
        raise UserError(f"{job.head} is a single-label kernel baseline and the dataset is multi-label "
                        "(label1|label2); train a torch head, which learns a sigmoid per class")
    streams = tuple(job.streams) if job.streams else default_streams(store.streams)
    missing = [s for s in streams if s not in store.streams]
    if missing:
        raise UserError(f"the feature store has no stream {missing[0]!r}; it has: {', '.join(store.streams)}")

    # -- data: the split joined with the store; the fusion fold, then validation, carved from train by group,
    #    never from videos a fine-tuned CNN was trained on; a split whose test videos a CNN saw is refused
    folds = split_folds(job, store, manifest, streams, cfg.val_fraction, cfg.seed)

    # -- the run's name: a hash of everything that decides its result
    config = {
        "run_format": RUN_FORMAT,
        "head": job.head,
        "head_config": dataclasses.asdict(head_cfg),
        "train": train_record(cfg, len(folds.train)),
        "streams": list(streams),
        "split": job.split,
        "store_fingerprint": store.fingerprint,
        "manifest_fingerprint": manifest.fingerprint(),
        "classes": manifest.classes,
        "fusion_fold": folds.fusion_record,
    }
    if getattr(head_cfg, "finetune", "all") != "all" and not job.init_from:  # Karpathy et al. 4.2 transfer
        raise UserError(f"{job.head}: finetune={head_cfg.finetune} freezes the lower layers, which only a trained "
                        "source run can fill: give --init-from RUN")
    if folds.finetuned:
        config["finetuned"] = folds.finetuned
    if job.init_from:
        config["init_from"] = _init_source(job.init_from)
    if entry.kind == "sklearn":
        check_kernel_budget(job.head, len(folds.train), cfg.memory_gb)
    return RunPlan(entry, head_cfg, cfg, store, manifest, streams, folds, config, RunDir(job.out, job.head, config))


def train(job: TrainJob, progress: bool = True, echo: Callable[[str], None] = _echo,
          open_store: Callable = FeatureStore.open, open_manifest: Callable = load_manifest) -> RunResult:
    """Run ``job``. ``open_store`` / ``open_manifest`` let a sweep worker pass cached ones (load features once)."""
    plan = plan_run(job, open_store, open_manifest)
    entry, head_cfg, cfg, store, manifest = plan.entry, plan.head_cfg, plan.cfg, plan.store, plan.manifest
    streams, folds, config, run = plan.streams, plan.folds, plan.config, plan.run
    train_items, val_items, fusion_items, test_items = folds.train, folds.val, folds.fusion, folds.test
    if not run.complete:
        run.claim(echo)  # from here this process alone writes the run (waits while another process trains it)
    if run.complete:
        run.release()
        metrics = run.read_json("metrics.json")
        echo(f"cached: {result_line(run.path, metrics)}")
        return RunResult(run.path, metrics, cached=True)

    if store.classes and store.classes != manifest.classes:
        warnings.warn(f"the store was built with other class names than {job.dataset}; labels come from the dataset",
                      stacklevel=2)

    views = view_record(store.config, streams, getattr(head_cfg, "views", None))  # test-time views: how averaged
    lengths = store.lengths([it.id for it in train_items + val_items + fusion_items + test_items])
    notes = check_frames(store.config.get("sampling"), cfg.frames, lengths, job.head, head_cfg)
    for note in notes:
        echo(f"warning: {note}")

    def features(items, in_memory=None):
        return VideoFeatures(store, [it.id for it in items], labels_of(items, manifest), streams,
                             frames=cfg.frames, memory_gb=cfg.memory_gb, in_memory=in_memory)

    # Training and validation sets are held at once: one budget for both, else both are streamed.
    both = features_nbytes(store, [it.id for it in train_items + val_items], streams, cfg.frames)
    together = both <= cfg.memory_gb * 2**30
    train_set, val_set = features(train_items, together), features(val_items, together)
    classes, device = manifest.classes, resolve_device(job.device)
    if len(streams) > 1:
        echo(EARLY_FUSION_NOTE)
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
            config["train"] = train_record(cfg, len(train_items))
            config["lr_from"] = "find-lr"
            run.release()  # the run is now named by the rate found; claimed again by run.start()
            run = RunDir(job.out, job.head, config)
            if run.complete:
                metrics = run.read_json("metrics.json")
                echo(f"cached: {result_line(run.path, metrics)}")
                return RunResult(run.path, metrics, cached=True)
        run.start()
        write_lr_find(run.path, lr_find)
        echo(f"{run.path / 'lr_find.png'}")
        if job.find_lr != "apply":
            run.release()  # nothing trained: the directory holds only the range test
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
    del train_set
    # The fusion fold and the test split are held at once, with the validation set: within the same budget.
    held = val_set.nbytes if val_set.in_memory else 0
    later = held + features_nbytes(store, [it.id for it in fusion_items + test_items], streams, cfg.frames)
    later_in_memory = later <= cfg.memory_gb * 2**30
    # The fusion fold is held out by every run of the split: score fusion's weights (stages.fuse).
    fusion_set = features(fusion_items, later_in_memory)
    fusion_scores = score(fusion_set) if len(fusion_set) else np.zeros((0, len(classes)), np.float32)
    _check_finite(fusion_scores, "fusion-fold", cfg)

    # -- the test split is read only now, for the final evaluation
    test_set = features(test_items, later_in_memory)
    test_scores = score(test_set)
    _check_finite(test_scores, "test", cfg)
    metrics = classification_report(test_scores, test_set.labels, classes)
    if hasattr(head, "clip_logits") and not manifest.multi_label:  # Karpathy Table 1 / Ng Table 1: clip and video Hit@k side by side
        metrics["clip"] = clip_report(head, test_set, device, cfg.eval_batch_size)
    metrics.update({
        "head": job.head, "split": job.split, "streams": list(streams),
        "n_train": len(train_items), "n_val": len(val_items), "n_fusion": len(fusion_items), "n_test": len(test_set),
        "stream_fusion": EARLY_FUSION_NOTE if len(streams) > 1 else None,
        "val_accuracy": fitted["best_val_accuracy"], "best_epoch": fitted["best_epoch"],
        "epochs_run": fitted["epochs_run"], "fit_seconds": fitted["fit_seconds"],
        "params": count_params(head), "device": str(device), "test_views": views,
    })
    metrics["warnings"] = list(notes)  # departures from the papers' protocols, stated
    if entry.kind == "torch":
        metrics.update({k: fitted[k] for k in ("stop_reason", "steps_run", "budget_steps", "best_step", "start_loss",
                                                "lowest_loss", "did_not_learn")})
        metrics["warnings"] += fitted["warnings"]  # training that did not learn or was cut short
        metrics["recipe"] = cfg.recipe
        for w in fitted["warnings"]:
            warnings.warn(f"{run.name}: {w}", stacklevel=2)

    # -- write the run; COMPLETE last
    if entry.kind == "sklearn":
        run.write_sklearn_weights(head)
    else:
        run.write_torch_weights(head, metadata={"head": job.head, "config_hash": run.hash})
    run.write_scores("scores_val.npz", val_set.ids, val_set.labels, val_scores, classes)
    run.write_scores("scores_fusion.npz", fusion_set.ids, fusion_set.labels, fusion_scores, classes)
    run.write_scores("scores_test.npz", test_set.ids, test_set.labels, test_scores, classes)
    run.write_json("metrics.json", metrics)
    run.write_json("extraction.json", extraction_record(store, streams, [it.id for it in train_items]))
    run.plot_learning_curve(fitted["history"])
    if "confusion" in metrics:  # single-label data only
        run.plot_confusion(metrics["confusion"], classes)
    run.mark_complete()
    echo(result_line(run.path, metrics))
    return RunResult(run.path, metrics, cached=False)


def result_line(path: Path, metrics: dict) -> str:
    """One line of a finished run's test metrics; a cached run prints the same line after ``cached:``."""

    def pct(key: str) -> str:
        v = metrics.get(key)
        return "n/a" if v is None else f"{100 * v:.2f}"

    extra = [f"{metrics['n_test']} test videos" if "n_test" in metrics else None,
             f"best epoch {metrics['best_epoch']}" if metrics.get("best_epoch") is not None else None,
             f"{metrics['recipe']} recipe, stopped: {metrics['stop_reason']}" if "stop_reason" in metrics else None,
             "did not learn" if metrics.get("did_not_learn") else None]
    extra = [e for e in extra if e]
    first = "hit@1" if metrics.get("multi_label") else "accuracy"
    return (f"{path}: {first} {pct('accuracy')}  hit@5 {pct('hit@5')}  mAP {pct('map')}  GAP@20 {pct('gap@20')}"
            + (f"  ({', '.join(extra)})" if extra else ""))


def labels_of(items, manifest) -> np.ndarray:
    """Training targets: class indices [N], or for a multi-label dataset an indicator matrix [N, C] (every class a
    video carries; trained with a sigmoid per class, ``pipeline.training.batch_loss``)."""
    if not manifest.multi_label:
        return np.asarray([it.label for it in items], dtype=np.int64)
    y = np.zeros((len(items), len(manifest.classes)), dtype=np.float32)
    for i, it in enumerate(items):
        y[i, list(it.labels or (it.label,))] = 1.0
    return y


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


def train_late_fusion(job: TrainJob, progress: bool = True, echo: Callable[[str], None] = _echo) -> RunResult:
    """The papers' two-stream route: one run per stream, then their scores fused on the fusion fold.

    Simonyan and Zisserman, Ng et al. (Sec. 4) and Karpathy et al. train a model per stream and combine their class
    scores; Wu et al.'s NN-LF / SVM-LF (Sec. 4.1.3) are the same late fusion. ``stages.fuse`` fits the weights on the
    fusion fold that both runs held out. Returns the fused run.
    """
    from stages.fuse import FuseJob, fuse

    streams = job.streams
    if not streams:
        streams = default_streams(FeatureStore.open(store_for_split(job.store, job.split)).streams)
    if len(streams) < 2:
        raise UserError(f"--late-fusion trains one run per stream and fuses them: give two or more streams "
                        f"(got {','.join(streams)})")
    runs = [train(dataclasses.replace(job, streams=(s,)), progress=progress, echo=echo) for s in streams]
    fused = fuse(FuseJob(runs=tuple(str(r.path) for r in runs), out=job.out), echo=echo)
    return RunResult(fused.path, fused.metrics, fused.cached)


def train_splits(job: TrainJob, splits: list[int], progress: bool = True, echo: Callable[[str], None] = _echo,
                 late_fusion: bool = False) -> tuple[list[RunResult], Path, dict]:
    """One run per split (late fusion: one fused run per split), then ``OUT/<head>-splits-<hash12>.json|.md`` with
    mean +- std over them. ``job.store`` may name one store per split with ``{split}``."""
    if job.find_lr == "plot":
        raise UserError("--find-lr trains nothing, so it runs on one --split; --find-lr=apply works with --splits")
    one = train_late_fusion if late_fusion else train
    results = [one(dataclasses.replace(job, split=s), progress=progress, echo=echo) for s in splits]
    name = f"{job.head}-late-fusion" if late_fusion else job.head
    path, summary = write_summary(job.out, name, {s: (r.path.name, r.metrics) for s, r in zip(splits, results)})
    a = summary["accuracy"]
    spread = "" if a["std"] is None else f" +- {100 * a['std']:.2f} (sample std)"
    echo(f"{name} over splits {','.join(map(str, splits))}: accuracy {100 * a['mean']:.2f}{spread}  ({path})")
    return results, path, summary
