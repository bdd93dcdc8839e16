"""Stage-two training: one readable loop over cached features (nanoGPT / torchvision references style).

``resolve_configs`` turns a head name plus ``--set key=value`` overrides into (head config, ``TrainConfig``):
TrainConfig defaults, then the head's ``train_defaults`` (the paper's optimiser settings, e.g. Ma et al.
Section 3.3: Adam with lr 5e-5 for TS-LSTM, lr 1e-4 and weight decay 1e-1 for the Temporal-ConvNets), then
the user's overrides. ``fit`` trains a torch head with early stopping on validation accuracy and keeps the
best epoch's weights; ``fit_sklearn`` fits a kernel baseline on video-level features. ``predict`` gives the
per-video class scores that metrics and score fusion consume.

Determinism: the head is built and trained after ``torch.manual_seed(seed)``, batches are shuffled by a
generator seeded with ``seed``, and nothing else draws random numbers, so on CPU the same config gives
bitwise the same weights and metrics.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import time
import typing
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.features import VideoFeatures, iter_batches, video_level
from pipeline.registry import HEADS, RegistryError, parse_value

__all__ = [
    "TrainConfig",
    "build_head",
    "count_params",
    "fit",
    "fit_sklearn",
    "predict",
    "resolve_configs",
    "resolve_device",
]


@dataclass(frozen=True)
class TrainConfig:
    """How a head is trained; every key can be set with ``--set key=value``."""

    optimizer: str = "adam"  # "adam" (L2 added to the gradient, as Torch7's optim.adam), "adamw" or "sgd"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    epochs: int = 50
    batch_size: int = 64  # Ma et al. Section 3.3 use batches of 64
    frames: int = 25  # fixed T, equally spaced (Ma et al.); 0 = every stored frame, padded and masked
    schedule: str = "none"  # "none" | "step" (x gamma every step_size epochs) | "cosine" | "plateau" (x gamma on a flat val acc)
    step_size: int = 20
    gamma: float = 0.1  # "divided by 10 when the accuracy is saturated" (Ma et al. Section 3.3)
    patience: int = 10  # stop after this many epochs without a better val accuracy; 0 = never stop early
    val_fraction: float = 0.1  # share of each class's training groups held out for validation
    seed: int = 0
    memory_gb: float = 4.0  # float16 features up to this size are held in memory, else streamed from the store
    eval_batch_size: int = 256

    def __post_init__(self):
        checks = {
            "optimizer": self.optimizer in ("adam", "adamw", "sgd"),
            "schedule": self.schedule in ("none", "step", "cosine", "plateau"),
            "lr": self.lr > 0,
            "epochs": self.epochs >= 0,  # 0: evaluate the initial (e.g. expanded) model as is
            "batch_size": self.batch_size >= 1,
            "val_fraction": 0 <= self.val_fraction < 1,
            "weight_decay": self.weight_decay >= 0,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise RegistryError(f"invalid train setting {bad[0]}={getattr(self, bad[0])!r}")


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))


def resolve_configs(head: str, overrides: dict[str, typing.Any] | None = None, **train_kw):
    """(head config, TrainConfig) for ``head`` with ``overrides`` (strings are parsed to the field's type).

    A key goes to the head config if it has one of that name, else to TrainConfig; ``head.KEY`` / ``train.KEY``
    pick explicitly. Unknown keys raise ``RegistryError`` naming the valid keys of both. ``train_kw`` (e.g.
    ``seed`` from ``--seed``) sit between the head's train_defaults and the overrides.
    """
    entry = HEADS.get(head)
    head_keys = [f.name for f in dataclasses.fields(entry.config_cls)]
    head_over, train_over = {}, {}
    for key, value in (overrides or {}).items():
        scope, _, name = key.rpartition(".")
        if scope == "head" or (not scope and name in head_keys):
            head_over[name] = value
        elif scope == "train" or (not scope and name in TRAIN_KEYS):
            if name not in TRAIN_KEYS:
                raise RegistryError(f"no train key {name!r}; train keys: {', '.join(TRAIN_KEYS)}")
            train_over[name] = value
        else:
            raise RegistryError(f"unknown key {key!r} for head {head!r}; head keys: {', '.join(head_keys) or 'none'}; "
                                f"train keys: {', '.join(TRAIN_KEYS)}")
    head_cfg = HEADS.make_config(head, head_over)
    hints = typing.get_type_hints(TrainConfig)
    train = dict(getattr(entry.config_cls, "train_defaults", {}) or {})
    unknown = set(train) - set(TRAIN_KEYS)
    if unknown:
        raise RegistryError(f"{head}: train_defaults has unknown keys {sorted(unknown)}")
    train.update(train_kw)
    for k, v in train_over.items():
        train[k] = parse_value(v, hints[k], f"train.{k}") if isinstance(v, str) else v
    return head_cfg, TrainConfig(**train)


def resolve_device(device: str = "auto") -> torch.device:
    """``auto``: the GPU when there is one, else the CPU; asking for an absent GPU is a user error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise RegistryError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RegistryError(f"device {device!r} asked for, but torch sees no CUDA GPU; use --device cpu")
    return dev


def build_head(name: str, cfg, input_dim: int, num_classes: int, stream_dims: tuple[int, ...], seed: int):
    """The registered builder, called after seeding so initial weights depend only on ``seed``."""
    torch.manual_seed(seed)
    return HEADS.get(name).builder(cfg, input_dim, num_classes, tuple(stream_dims))


def count_params(model) -> int:
    """Trainable parameters of a torch head; for a fitted sklearn estimator, numbers in its learned arrays."""
    if isinstance(model, torch.nn.Module):
        return int(sum(p.numel() for p in model.parameters() if p.requires_grad))
    return int(sum(np.asarray(v).size for k, v in vars(model).items()
                   if k.endswith("_") and not k.startswith("_") and isinstance(v, np.ndarray)
                   and v.dtype.kind in "fiub"))


def make_optimizer(head: torch.nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in head.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig):
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.gamma,
                                                          patience=max(1, cfg.patience // 2))
    return None


@torch.no_grad()
def predict(head: torch.nn.Module, data: VideoFeatures, device: torch.device, batch_size: int = 256) -> np.ndarray:
    """Class scores (logits) of every video, [N, C] float32, in eval mode (BN running stats, no dropout)."""
    head.eval()
    out = []
    for x, mask, _ in iter_batches(data, batch_size):
        x = x.to(device).float()  # float16 storage -> float32 compute
        mask = None if mask is None else mask.to(device)
        out.append(head(x, mask).float().cpu())  # [B, C]
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def _val_stats(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    s = torch.from_numpy(scores)
    t = torch.from_numpy(y)
    return float(F.cross_entropy(s, t)), float((s.argmax(1) == t).float().mean())


def fit(head: torch.nn.Module, train: VideoFeatures, val: VideoFeatures | None, cfg: TrainConfig,
        device: torch.device, on_epoch: Callable[[dict], None] | None = None, progress: bool = True) -> dict:
    """Train ``head`` in place; returns ``{"history": [...], "best_epoch", "best_val_accuracy", "fit_seconds"}``.

    Each epoch: one pass over shuffled training batches (``head.loss`` then an optimiser step, then
    ``head.after_step(lr)`` for heads with proximal updates), then validation. The weights of the epoch with
    the best validation accuracy (the first on ties) are restored at the end. With no validation set the last
    epoch's weights are kept and early stopping is off.
    """
    from tqdm.auto import tqdm

    torch.manual_seed(cfg.seed)  # dropout masks
    gen = torch.Generator().manual_seed(cfg.seed)  # batch order
    head.to(device)
    opt = make_optimizer(head, cfg)
    sched = make_scheduler(opt, cfg)
    history: list[dict] = []
    best_acc, best_epoch, best_state, since_best = -math.inf, 0, None, 0
    t0 = time.perf_counter()
    bar = tqdm(range(1, cfg.epochs + 1), desc="train", unit="epoch", disable=not progress, leave=False)
    for epoch in bar:
        # -- one pass over the training set
        head.train()
        te = time.perf_counter()
        loss_sum, seen = 0.0, 0
        for x, mask, y in iter_batches(train, cfg.batch_size, shuffle=True, generator=gen, drop_single=True):
            x, y = x.to(device, non_blocking=True).float(), y.to(device)  # [B, T, D] float32, [B]
            mask = None if mask is None else mask.to(device)
            loss = head.loss(x, mask, y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            head.after_step(opt.param_groups[0]["lr"])
            loss_sum += float(loss.detach()) * len(y)
            seen += len(y)
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / max(seen, 1),
               "seconds": time.perf_counter() - te, "videos_per_s": seen / max(time.perf_counter() - te, 1e-9)}
        # -- validation, model selection, early stopping
        if val is not None and len(val):
            row["val_loss"], row["val_accuracy"] = _val_stats(predict(head, val, device, cfg.eval_batch_size), val.labels)
            if row["val_accuracy"] > best_acc:
                best_acc, best_epoch, since_best = row["val_accuracy"], epoch, 0
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in head.state_dict().items()})
            else:
                since_best += 1
        history.append(row)
        if on_epoch:
            on_epoch(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row.get('val_accuracy', float('nan')):.3f}")
        if cfg.patience and best_state is not None and since_best >= cfg.patience:
            break
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched.step(row.get("val_accuracy", -row["train_loss"]))
        elif sched is not None:
            sched.step()
    bar.close()
    if best_state is not None:
        head.load_state_dict(best_state)
    else:
        best_epoch = len(history)
    return {"history": history, "best_epoch": best_epoch,
            "best_val_accuracy": None if best_state is None else best_acc,
            "epochs_run": len(history), "fit_seconds": time.perf_counter() - t0}


def fit_sklearn(estimator, train: VideoFeatures, val: VideoFeatures | None = None) -> dict:
    """Fit a kernel baseline on video-level features (mean over frames) of the training split only.

    The validation videos are held out, as for torch heads, so that their scores stay honest for choosing score
    fusion weights; a baseline's own hyperparameters (C, kernel width) come from its config or a sweep.
    """
    t0 = time.perf_counter()
    estimator.fit(video_level(train), train.labels)
    return {"history": [], "best_epoch": None, "best_val_accuracy": None, "epochs_run": 0,
            "fit_seconds": time.perf_counter() - t0}


def predict_sklearn(estimator, data: VideoFeatures, num_classes: int | None = None) -> np.ndarray:
    """``decision_function`` on video-level features, [N, C] float32.

    Columns follow ``estimator.classes_``; with ``num_classes`` they are placed at their class index, and a class
    the training split lacked scores below every other (so metrics still see C columns).
    """
    if len(data) == 0:
        return np.zeros((0, num_classes or 0), np.float32)
    s = np.asarray(estimator.decision_function(video_level(data)), dtype=np.float32)
    s = np.stack([-s, s], axis=1) if s.ndim == 1 else s  # binary: one margin -> two class scores
    seen = getattr(estimator, "classes_", None)
    if num_classes is None or seen is None or (len(seen) == num_classes and np.array_equal(seen, np.arange(num_classes))):
        return s
    out = np.full((len(s), num_classes), s.min() - 1.0, np.float32)
    out[:, np.asarray(seen, dtype=np.int64)] = s
    return out
