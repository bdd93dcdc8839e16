"""Stage-two training: one readable loop over cached features (nanoGPT / torchvision references style).

``resolve_configs`` turns a head name plus ``--set key=value`` overrides into (head config, ``TrainConfig``):
TrainConfig defaults, then a named recipe (``--set recipe=...``), then ``seed``, then the user's overrides:

- ``recipe=paper``: the head's ``train_defaults``, its paper's settings (e.g. Ma et al. Section 3.4.1: Adam with
  lr 5e-5 for TS-LSTM, lr 1e-4 and weight decay 1e-1 for the Temporal-ConvNets), counted in epochs.
- ``recipe=converge`` (the default): one rule for every torch head, for heads trained from scratch on frozen
  features, so that heads are compared at what they can reach rather than by their papers' optimisers
  (``CONVERGE``): AdamW (Loshchilov and Hutter 2019) at 1e-3, linear warm-up then cosine decay per step, a budget
  of ``max(min_steps, epochs x steps per epoch)`` optimiser steps, validation every ``eval_every`` steps, early
  stopping after ``patience_steps`` steps or a third of the budget (``patience_fraction``), whichever is longer,
  without a better smoothed validation accuracy (ties: loss), the best checkpoint restored. Patience grows with the
  budget because the cosine schedule does: 200 steps are under one epoch of UCF101, where a fixed patience stopped
  runs while the rate was still high, before the decay of the schedule's last part. The head keeps its own
  ``frames`` and weight decay (``HEAD_OWN_KEYS``), and its ``converge_defaults`` where its algorithm needs another
  optimiser (plain SGD for Wu et al.'s proximal updates).

Multi-label data (``y`` an indicator matrix [B, C]) trains every torch head with a per-class sigmoid and binary
cross-entropy on its video scores (``batch_loss``; the YouTube-8M objective, Abu-El-Haija et al. 2016, Sec. 4),
in place of the head's own single-label loss; validation then reports that loss and Hit@1.

``fit`` trains a torch head; a non-finite loss or validation score raises ``TrainingDiverged`` (a ``UserError``),
and a run whose training loss never falls clearly below its start is flagged "did not learn". ``find_lr`` is the
learning-rate range test (Smith 2017). ``fit_sklearn`` fits a kernel baseline on video-level features (recipes do
not apply). ``predict`` gives the per-video class scores that metrics and score fusion consume.

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

from pipeline.errors import UserError
from pipeline.features import VideoFeatures, iter_batches, video_level
from pipeline.registry import HEADS, RegistryError, parse_value

__all__ = [
    "CONVERGE",
    "TrainConfig",
    "TrainingDiverged",
    "batch_loss",
    "budget_steps",
    "build_head",
    "count_params",
    "find_lr",
    "fit",
    "fit_sklearn",
    "patience_in_steps",
    "predict",
    "resolve_configs",
    "resolve_device",
    "train_record",
]


RECIPES = ("paper", "converge", "custom")
SCHEDULES = ("none", "step", "cosine", "plateau", "warmup-cosine")


@dataclass(frozen=True)
class TrainConfig:
    """How a head is trained; every key can be set with ``--set key=value``.

    The dataclass defaults are the trainer's historical behaviour (epochs, per-epoch evaluation, patience in
    epochs on validation accuracy); ``resolve_configs`` puts a named recipe on top (``RECIPES``, module docstring).
    """

    recipe: str = "custom"  # which recipe the values came from: "paper", "converge" or "custom" (set by hand)
    optimizer: str = "adam"  # "adam" (L2 added to the gradient, as Torch7's optim.adam), "adamw" or "sgd"
    lr: float = 1e-4
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    epochs: int = 50
    min_steps: int = 0  # the budget is max(min_steps, epochs x steps per epoch) optimiser steps (epochs=0: none)
    batch_size: int = 64  # Ma et al. Section 3.3 use batches of 64
    frames: int = 25  # fixed T, equally spaced (Ma et al.); 0 = every stored frame, padded and masked
    schedule: str = "none"  # "none" | "step" (x gamma every step_size epochs) | "cosine" | "plateau" (x gamma on a
    #                         flat val acc) | "warmup-cosine" (per step: linear warm-up, then cosine to 0 at the budget)
    warmup_steps: int = 0  # linear warm-up of "warmup-cosine" (other schedules ignore it), in optimiser steps
    step_size: int = 20
    gamma: float = 0.1  # "divided by 10 when the accuracy is saturated" (Ma et al. Section 3.3)
    eval_every: int = 0  # validate every this many optimiser steps; 0 = at the end of each epoch
    monitor: str = "accuracy"  # best checkpoint and early stopping: "accuracy" (the first on ties), "accuracy-loss"
    #                            (ties broken by the loss) or "loss"
    smoothing: float = 0.0  # exponential moving average of the validation metrics over evaluations (0 = raw)
    patience: int = 10  # stop after this many epochs without a better monitored value; 0 = off
    patience_steps: int = 0  # stop after this many optimiser steps (after warm-up) without one; 0 = off
    patience_fraction: float = 0.0  # ... or after this share of the budget, if that is longer (``patience_in_steps``)
    val_fraction: float = 0.1  # share of each class's training groups held out for validation
    seed: int = 0
    memory_gb: float = 4.0  # float16 features up to this size are held in memory, else streamed from the store
    eval_batch_size: int = 256

    def __post_init__(self):
        def finite(v):
            return isinstance(v, (int, float)) and math.isfinite(v)

        checks = {
            "recipe": self.recipe in RECIPES,
            "optimizer": self.optimizer in ("adam", "adamw", "sgd"),
            "schedule": self.schedule in SCHEDULES,
            "monitor": self.monitor in ("accuracy", "accuracy-loss", "loss"),
            "lr": finite(self.lr) and self.lr > 0,
            "weight_decay": finite(self.weight_decay) and self.weight_decay >= 0,
            "momentum": finite(self.momentum) and 0 <= self.momentum < 1,
            "epochs": self.epochs >= 0,  # 0: evaluate the initial (e.g. expanded) model as is
            "min_steps": self.min_steps >= 0,
            "batch_size": self.batch_size >= 1,
            "frames": self.frames >= 0,
            "warmup_steps": self.warmup_steps >= 0,
            "step_size": self.step_size >= 1,
            "gamma": finite(self.gamma) and 0 < self.gamma <= 1,
            "eval_every": self.eval_every >= 0,
            "smoothing": finite(self.smoothing) and 0 <= self.smoothing < 1,
            "patience": self.patience >= 0,
            "patience_steps": self.patience_steps >= 0,
            "patience_fraction": finite(self.patience_fraction) and 0 <= self.patience_fraction <= 1,
            "val_fraction": finite(self.val_fraction) and 0 <= self.val_fraction < 1,
            "memory_gb": finite(self.memory_gb) and self.memory_gb >= 0,
            "eval_batch_size": self.eval_batch_size >= 1,
        }
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise RegistryError(f"invalid train setting {bad[0]}={getattr(self, bad[0])!r}")


# The default recipe (module docstring): one rule for every torch head trained from scratch on frozen features.
CONVERGE: dict = {
    "optimizer": "adamw",  # decoupled weight decay (Loshchilov and Hutter 2019)
    "lr": 1e-3,
    "batch_size": 32,
    "epochs": 30,
    "min_steps": 600,
    "schedule": "warmup-cosine",
    "warmup_steps": 50,
    "eval_every": 10,
    "monitor": "accuracy-loss",
    "smoothing": 0.5,
    "patience": 0,
    "patience_steps": 200,
    "patience_fraction": 1 / 3,
}
# Keys of a head's paper recipe that describe its input or its own regularisation, so the converge recipe keeps them.
HEAD_OWN_KEYS = ("frames", "weight_decay")


class TrainingDiverged(UserError):
    """The loss or the scores became non-finite: the run is stopped and nothing is marked complete."""


TRAIN_KEYS = tuple(f.name for f in dataclasses.fields(TrainConfig))
# Keys that name one quantity in a head config and in TrainConfig: `frames` is both the frames a video is fed as and
# what local-pool sizes its softmax for (Ng et al. 3.1), so an unscoped `--set frames=N` sets both.
SHARED_KEYS = ("frames",)


# A key given by hand means what it says: the recipe's rule that would lengthen it is switched off, unless that rule's
# key is given too. `--set epochs=5` runs 5 epochs (no step minimum); `--set patience_steps=50` waits 50 steps (no
# share of the budget).
GIVES_WAY = {"epochs": ("min_steps", 0), "patience_steps": ("patience_fraction", 0.0)}


def resolve_configs(head: str, overrides: dict[str, typing.Any] | None = None, **train_kw):
    """(head config, TrainConfig) for ``head`` with ``overrides`` (strings are parsed to the field's type).

    A key goes to the head config if it has one of that name, else to TrainConfig (a ``SHARED_KEYS`` key to both);
    ``head.KEY`` / ``train.KEY`` pick explicitly. Unknown keys raise ``RegistryError`` naming the valid keys of both. ``train_kw`` (e.g.
    ``seed`` from ``--seed``) sit between the head's train_defaults and the overrides.
    """
    entry = HEADS.get(head)
    head_keys = [f.name for f in dataclasses.fields(entry.config_cls)]
    head_over, train_over = {}, {}
    for key, value in (overrides or {}).items():
        scope, _, name = key.rpartition(".")
        if not scope and name in SHARED_KEYS and name in head_keys:
            head_over[name] = train_over[name] = value  # one quantity: the head is built for what it is fed
        elif scope == "head" or (not scope and name in head_keys):
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
    parsed = {k: parse_value(v, hints[k], f"train.{k}") if isinstance(v, str) else v for k, v in train_over.items()}
    recipe = parsed.pop("recipe", "converge")
    train = recipe_values(entry.config_cls, recipe, entry.kind)
    train.update(train_kw)
    for key, (rule, off) in GIVES_WAY.items():
        if key in parsed and rule not in parsed:
            train[rule] = off
    train.update(parsed)
    cfg = TrainConfig(**train)
    check = getattr(head_cfg, "check_train", None)
    if check is not None:
        check(cfg)
    return head_cfg, cfg


def recipe_values(config_cls, recipe: str, kind: str = "torch") -> dict:
    """The TrainConfig keys a named recipe sets for a head (its ``recipe`` key included).

    ``paper``: the head's ``train_defaults`` (its paper's settings). ``converge``: ``CONVERGE`` plus the head's own
    ``HEAD_OWN_KEYS`` from its paper recipe, then its ``converge_defaults`` (only where the paper's algorithm needs
    another optimiser, e.g. plain SGD for proximal steps). sklearn heads ignore the training keys either way.
    """
    if recipe not in ("paper", "converge"):
        raise RegistryError(f"unknown recipe {recipe!r}; recipes: paper, converge")
    paper = dict(getattr(config_cls, "train_defaults", {}) or {})
    own = dict(getattr(config_cls, "converge_defaults", {}) or {})
    unknown = (set(paper) | set(own)) - set(TRAIN_KEYS)
    if unknown:
        raise RegistryError(f"{config_cls.__name__}: train_defaults has unknown keys {sorted(unknown)}")
    if recipe == "paper" or kind != "torch":
        return {**paper, "recipe": recipe}
    return {**{k: paper[k] for k in HEAD_OWN_KEYS if k in paper}, **CONVERGE, **own, "recipe": "converge"}


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


def warmup_for(cfg: TrainConfig, total_steps: int) -> int:
    """Warm-up steps actually used: ``warmup_steps``, but at most a tenth of the budget, so that a short run
    (``--set epochs=8`` on a small set) still trains at its learning rate and still picks a best checkpoint."""
    return min(cfg.warmup_steps, total_steps // 10)


def make_scheduler(opt: torch.optim.Optimizer, cfg: TrainConfig, total_steps: int):
    """The lr schedule. ``warmup-cosine`` is stepped after every optimiser step, the others after every epoch."""
    if cfg.schedule == "warmup-cosine":
        warmup = warmup_for(cfg, total_steps)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, warmup, total_steps))
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=cfg.step_size, gamma=cfg.gamma)
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(cfg.epochs, 1))
    if cfg.schedule == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=cfg.gamma,
                                                          patience=max(1, cfg.patience // 2))
    return None


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """lr multiplier at optimiser step ``step`` (0-based): linear from 1/(warmup+1) to 1 over ``warmup`` steps
    (Goyal et al. 2017), then half a cosine down to 0 at ``total`` (Loshchilov and Hutter 2017, without restarts)."""
    if step < warmup:
        return (step + 1) / (warmup + 1)
    span = max(total - warmup, 1)
    return 0.5 * (1 + math.cos(math.pi * min(step - warmup, span) / span))


def steps_per_epoch(n: int, batch_size: int) -> int:
    """Optimiser steps in one pass over ``n`` videos (``iter_batches`` drops a last batch of one)."""
    full, rest = divmod(n, batch_size)
    return full + (1 if rest > 1 or (rest == 1 and n == 1) else 0)


def budget_steps(cfg: TrainConfig, n_train: int) -> int:
    """Optimiser steps of a run over ``n_train`` videos: ``max(min_steps, epochs x steps per epoch)`` (epochs=0:
    none, the model is evaluated as it is)."""
    per_epoch = max(steps_per_epoch(n_train, cfg.batch_size), 1)
    return max(cfg.min_steps, cfg.epochs * per_epoch) if cfg.epochs else 0


def patience_in_steps(cfg: TrainConfig, total: int) -> int:
    """Early stopping's patience in optimiser steps for a budget of ``total``: ``patience_steps`` or
    ``patience_fraction`` of the budget, whichever is longer (0: no patience in steps)."""
    return max(cfg.patience_steps, round(cfg.patience_fraction * total))


def train_record(cfg: TrainConfig, n_train: int) -> dict:
    """The train keys of a run over ``n_train`` videos as its record and name hold them: the patience it waits, in
    steps (``patience_in_steps``), in place of the rule, so that the record says what decided the result and runs
    whose patience the rule leaves unchanged keep the names they had before the rule."""
    record = dataclasses.asdict(cfg)
    del record["patience_fraction"]
    record["patience_steps"] = patience_in_steps(cfg, budget_steps(cfg, n_train))
    return record


def check_proximal(head: torch.nn.Module, cfg: TrainConfig) -> None:
    """Proximal updates (``after_step``) are proximal-gradient steps only after a plain gradient step."""
    if getattr(head, "proximal", False) and not plain_sgd(cfg):
        raise UserError(f"{type(head).__name__} applies proximal updates (Wu et al. Algorithm 1), which are valid only "
                        f"after plain SGD steps: use optimizer=sgd momentum=0 weight_decay=0 (got optimizer="
                        f"{cfg.optimizer} momentum={cfg.momentum:g} weight_decay={cfg.weight_decay:g})")


def plain_sgd(cfg: TrainConfig) -> bool:
    return cfg.optimizer == "sgd" and cfg.momentum == 0 and cfg.weight_decay == 0


def _diverged(what: str, step: int, cfg: TrainConfig) -> TrainingDiverged:
    return TrainingDiverged(f"training diverged: {what} at optimiser step {step} (lr={cfg.lr:g}, {cfg.optimizer}); "
                            f"lower lr, or pick one with --find-lr")


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


def batch_loss(head: torch.nn.Module, x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
    """The training loss of a batch: the head's own (``head.loss``) for class indices ``y`` [B]; for multi-label
    targets ``y`` [B, C] binary cross-entropy of a sigmoid per class on the head's video scores."""
    if y.dim() == 2:
        return F.binary_cross_entropy_with_logits(head(x, mask), y.to(x.dtype))
    return head.loss(x, mask, y)


def _val_stats(scores: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """(loss, accuracy) on the validation set: cross-entropy and top-1 accuracy, or for multi-label targets
    [N, C] binary cross-entropy and Hit@1."""
    s = torch.from_numpy(scores)
    t = torch.from_numpy(y)
    if t.dim() == 2:
        hit = t.gather(1, s.argmax(1, keepdim=True)) > 0
        return float(F.binary_cross_entropy_with_logits(s, t.float())), float(hit.float().mean())
    return float(F.cross_entropy(s, t)), float((s.argmax(1) == t).float().mean())


def fit(head: torch.nn.Module, train: VideoFeatures, val: VideoFeatures | None, cfg: TrainConfig,
        device: torch.device, on_epoch: Callable[[dict], None] | None = None, progress: bool = True) -> dict:
    """Train ``head`` in place; returns the history, the best checkpoint's step / epoch / validation accuracy, why
    training stopped (``stop_reason``) and whether it learned (``warnings``).

    The budget is ``max(min_steps, epochs x steps per epoch)`` optimiser steps over shuffled training batches
    (``head.loss``, an optimiser step, then ``head.after_step(lr)`` for heads with proximal updates). Validation
    runs every ``eval_every`` steps (0: after each epoch); the monitored metric (``monitor``: validation accuracy,
    the same with ties broken by the validation loss, or the loss alone; smoothed by an exponential moving average) chooses
    the best checkpoint among those after warm-up, which is restored at the end, and stops training after
    ``patience`` epochs or ``patience_in_steps`` steps (counted after warm-up) without a better value. With no
    validation set the last weights are kept and early stopping is off. A non-finite loss or validation score
    raises ``TrainingDiverged`` at once.
    """
    from tqdm.auto import tqdm

    check_proximal(head, cfg)
    torch.manual_seed(cfg.seed)  # dropout masks
    gen = torch.Generator().manual_seed(cfg.seed)  # batch order
    head.to(device)
    per_epoch = max(steps_per_epoch(len(train), cfg.batch_size), 1)
    total = budget_steps(cfg, len(train))
    patience_steps = patience_in_steps(cfg, total)
    opt = make_optimizer(head, cfg)
    sched = make_scheduler(opt, cfg, total)
    per_step_sched = cfg.schedule == "warmup-cosine"
    warmup = warmup_for(cfg, total)
    has_val = val is not None and len(val) > 0
    history: list[dict] = []
    best = {"value": (-math.inf,), "step": 0, "epoch": 0, "val_accuracy": None, "state": None}
    smoothed = None
    loss_track = LossTracker()
    t0 = time.perf_counter()
    step, epoch, stop_reason = 0, 0, "budget"
    window_loss, window_n, window_t = 0.0, 0, time.perf_counter()

    def evaluate(epoch_float: float) -> bool:
        """Log a row, update the best checkpoint; True when early stopping says stop."""
        nonlocal smoothed, window_loss, window_n, window_t
        elapsed = time.perf_counter() - window_t
        epoch_float = int(epoch_float) if float(epoch_float).is_integer() else round(epoch_float, 4)
        row = {"epoch": epoch_float, "step": step, "lr": opt.param_groups[0]["lr"],
               "train_loss": window_loss / max(window_n, 1), "seconds": elapsed,
               "videos_per_s": window_n / max(elapsed, 1e-9)}
        window_loss, window_n = 0.0, 0
        stop = False
        if has_val:
            scores = predict(head, val, device, cfg.eval_batch_size)
            if not np.isfinite(scores).all():
                raise _diverged("non-finite validation scores", step, cfg)
            row["val_loss"], row["val_accuracy"] = _val_stats(scores, val.labels)
            value = np.array([row["val_accuracy"], -row["val_loss"]])  # higher is better for both
            smoothed = value if smoothed is None else cfg.smoothing * smoothed + (1 - cfg.smoothing) * value
            key = {"accuracy": (smoothed[0],), "accuracy-loss": (smoothed[0], smoothed[1]),
                   "loss": (smoothed[1],)}[cfg.monitor]
            if step >= warmup and key > best["value"]:
                best.update(value=key, step=step, epoch=epoch_float, val_accuracy=row["val_accuracy"],
                            state=copy.deepcopy({k: v.detach().cpu() for k, v in head.state_dict().items()}))
            if cfg.patience and epoch_float - best["epoch"] >= cfg.patience:
                stop = True
            if patience_steps and step - max(best["step"], warmup) >= patience_steps:
                stop = True
        history.append(row)
        if on_epoch:
            on_epoch(row)
        bar.set_postfix(loss=f"{row['train_loss']:.3f}", val_acc=f"{row.get('val_accuracy', float('nan')):.3f}")
        window_t = time.perf_counter()
        return stop

    bar = tqdm(total=total, desc="train", unit="step", disable=not progress, leave=False)
    while step < total:
        epoch += 1
        head.train()
        for x, mask, y in iter_batches(train, cfg.batch_size, shuffle=True, generator=gen, drop_single=True):
            x, y = x.to(device, non_blocking=True).float(), y.to(device)  # [B, T, D] float32, [B]
            mask = None if mask is None else mask.to(device)
            loss = batch_loss(head, x, mask, y)
            value = float(loss.detach())
            if not math.isfinite(value):
                raise _diverged(f"the training loss is {value}", step + 1, cfg)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            head.after_step(opt.param_groups[0]["lr"])
            step += 1
            bar.update(1)
            loss_track.add(value)
            window_loss += value * len(y)
            window_n += len(y)
            if per_step_sched:
                sched.step()
            at_end = step >= total
            if cfg.eval_every and (step % cfg.eval_every == 0 or at_end):
                if evaluate(epoch - 1 + step_in_epoch(step, per_epoch)):
                    stop_reason = "patience"
                    break
                head.train()
            if at_end:
                break
        if stop_reason == "patience":
            break
        if not cfg.eval_every and evaluate(epoch - 1 + step_in_epoch(step, per_epoch)):
            stop_reason = "patience"
            break
        if step >= total:
            break
        if isinstance(sched, torch.optim.lr_scheduler.ReduceLROnPlateau):
            last = history[-1] if history else {}
            sched.step(last.get("val_accuracy", -last.get("train_loss", 0.0)))
        elif sched is not None and not per_step_sched:
            sched.step()
    bar.close()
    if best["state"] is not None:
        head.load_state_dict(best["state"])
    else:
        best.update(step=step, epoch=history[-1]["epoch"] if history else 0)
    warnings_ = loss_track.warnings()
    return {"history": history, "best_epoch": best["epoch"], "best_step": best["step"],
            "best_val_accuracy": best["val_accuracy"], "epochs_run": epoch, "steps_run": step,
            "budget_steps": total, "stop_reason": stop_reason, "start_loss": loss_track.start,
            "lowest_loss": loss_track.lowest, "did_not_learn": bool(warnings_), "warnings": warnings_,
            "fit_seconds": time.perf_counter() - t0}


def step_in_epoch(step: int, per_epoch: int) -> float:
    """Fraction of the current epoch done after global step ``step`` (1.0 at an epoch's last step)."""
    r = step % per_epoch
    return 1.0 if r == 0 else r / per_epoch


class LossTracker:
    """Training loss per step, smoothed: did the loss fall clearly below its starting value?

    The start is the first step's loss (for cross-entropy on an untrained head, about ln C: chance). A run whose
    smoothed loss never drops below ``LEARNED_FRACTION`` of it did not learn.
    """

    LEARNED_FRACTION = 0.9

    def __init__(self, beta: float = 0.9):
        self.beta, self.n, self.avg = beta, 0, 0.0
        self.start: float | None = None
        self.lowest: float | None = None

    def add(self, loss: float) -> None:
        if self.start is None:
            self.start = loss
        self.n += 1
        self.avg = self.beta * self.avg + (1 - self.beta) * loss
        debiased = self.avg / (1 - self.beta ** self.n)
        self.lowest = debiased if self.lowest is None else min(self.lowest, debiased)

    def warnings(self) -> list[str]:
        if self.start is None or self.lowest is None or self.start <= 0:
            return []
        if self.lowest < self.LEARNED_FRACTION * self.start:
            return []
        return [(f"did not learn: the smoothed training loss never fell below {self.LEARNED_FRACTION:.0%} of its "
                 f"starting value ({self.start:.4f} -> lowest {self.lowest:.4f}, {self.n} steps); raise the budget "
                 f"or the learning rate (--find-lr)")]


def find_lr(head: torch.nn.Module, train: VideoFeatures, cfg: TrainConfig, device: torch.device,
            lr_min: float = 1e-7, lr_max: float = 10.0, steps: int = 300, beta: float = 0.98,
            diverge: float = 4.0) -> dict:
    """Learning-rate range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks", Sec. 3.3).

    From ``head``'s current weights, take up to ``steps`` optimiser steps (``cfg``'s optimiser, batch size and
    proximal updates) with the rate growing exponentially from ``lr_min`` to ``lr_max``; record the training loss,
    smoothed by a bias-corrected moving average (``beta``), and stop once it exceeds ``diverge`` x its lowest value
    or turns non-finite. The suggested rate is a tenth of the rate at the lowest smoothed loss: there the loss
    still falls steeply, a safe distance below where it blows up. The head's weights are restored afterwards.

    Returns ``{"lr": [...], "loss": [...], "smoothed": [...], "suggested_lr", "lowest_at_lr", "stopped"}``.
    """
    check_proximal(head, cfg)
    initial = copy.deepcopy(head.state_dict())
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    head.to(device).train()
    opt = make_optimizer(head, dataclasses.replace(cfg, lr=lr_min))
    factor = (lr_max / lr_min) ** (1 / max(steps - 1, 1))
    lrs, losses, smooth = [], [], []
    avg, best, stopped = 0.0, math.inf, "end of range"
    step = 0
    while step < steps and stopped == "end of range":
        for x, mask, y in iter_batches(train, cfg.batch_size, shuffle=True, generator=gen, drop_single=True):
            lr = lr_min * factor ** step
            for g in opt.param_groups:
                g["lr"] = lr
            x, y = x.to(device).float(), y.to(device)
            loss = batch_loss(head, x, None if mask is None else mask.to(device), y)
            value = float(loss.detach())
            if not math.isfinite(value):
                stopped = "non-finite loss"
                break
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            head.after_step(lr)
            step += 1
            avg = beta * avg + (1 - beta) * value
            s = avg / (1 - beta ** step)
            lrs.append(lr), losses.append(value), smooth.append(s)
            best = min(best, s)
            if s > diverge * best:
                stopped = "diverged"
                break
            if step >= steps:
                break
    head.load_state_dict(initial)
    if not smooth:
        raise UserError(f"learning-rate range test: the loss was non-finite at the first step (lr {lr_min:g})")
    lowest = int(np.argmin(smooth))
    return {"lr": lrs, "loss": losses, "smoothed": smooth, "lowest_at_lr": lrs[lowest],
            "suggested_lr": lrs[lowest] / 10, "stopped": stopped, "steps": len(lrs)}


KERNEL_MATRICES = 3  # chi-square kernels an SVM baseline holds at once (per stream and their combination)


def check_kernel_budget(head: str, n_train: int, memory_gb: float) -> None:
    """Refuse a kernel baseline whose n x n float64 Gram matrices would not fit ``memory_gb`` (UCF101's 9,537
    training videos need about 2 GB; Kinetics' 240k would need about 1.3 TB): one line instead of an
    out-of-memory kill after the features were loaded."""
    need = KERNEL_MATRICES * 8 * n_train**2 / 2**30
    if need > memory_gb:
        raise UserError(f"{head}: kernel matrices over {n_train:,} training videos need about {need:,.0f} GB, over "
                        f"memory_gb={memory_gb:g}; at this scale use a torch head (e.g. temporal-pool or ts-lstm), "
                        "or raise --set memory_gb=N if the machine has the memory")


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
