"""Time-fusion heads of Karpathy et al., "Large-scale Video Classification with Convolutional Neural Networks"
(CVPR 2014), Section 3.1 and Figure 1, over cached per-frame features.

Every model reads a short clip and has the same depth; they differ only in where time is fused:

- ``single-frame``: one frame per clip; frames never meet (the static-appearance baseline).
- ``early-fusion``: a window of T = 10 frames joined at the first layer ("filters ... of size 11 x 11 x 3 x T").
- ``late-fusion``: two frames 15 apart, run through shared towers and "merged in the first fully connected layer".
- ``slow-fusion``: temporal extents 4, 2, 2 with stride 2 in the first three layers: 10 frames -> 4 -> 2 -> 1
  responses, "the third convolutional layer has access to information across all 10 input frames".

Adaptation to cached features: the spatial CNN is the frozen backbone of stage one, so a frame is a vector. The
paper's convolutional layers become a small trainable "tower" of ``len(tower_dims)`` layers that are
convolutions over time only (``Conv1d`` over the per-frame vectors, + ReLU): kernel 1 is a per-frame layer shared
across frames (Single-Frame, Late Fusion, Early Fusion above its first layer), kernel 10 joins a whole window
(Early Fusion), kernels 4, 2, 2 with stride 2 fuse progressively (Slow Fusion). The tower output is flattened
(time x channels, like a conv map flattened into FC-4096) into the paper's top: FC(4096) - FC(4096) - softmax.
The paper's spatial kernels, strides and LRN layers have no counterpart over vectors and are not modelled. Clip
lengths are counted in stored frames; the paper's 10 and 15 frames assume the full frame rate (10 frames "or
approximately a third of a second"), so stage two refuses a store sampled more sparsely (``--frames 25``) unless
``any_rate=True`` says to count clips in stored frames (``pipeline.features.check_frames``); extract with
``--all-frames`` for the paper's clips.

Clips and video scores (``pipeline.clips``): in training the head reads one random clip per video; in evaluation
it scores ``num_clips`` clips (20, Sec. 4.1) and returns the log of their averaged class probabilities, so the
common trainer calls it like any head. ``clip_logits`` exposes the per-clip scores for clip Hit@k.

Transfer learning (Sec. 4.2): ``finetune="top"`` trains only the classifier ("a classifier on the last
4096-dimensional layer, with dropout regularization"), ``"top3"`` trains the two FC layers and the classifier;
both freeze everything below (``requires_grad=False``) and put dropout before every trained layer, with keep
probability as low as 0.1 (``dropout=0.9``). ``"all"`` trains everything with Krizhevsky-style dropout on the two
FC layers' outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pipeline.clips import (
    EVAL_CLIPS,
    average_clip_scores,
    clip_span,
    eval_clip_starts,
    gather_clips,
    random_clip_starts,
)
from pipeline.errors import UserError
from pipeline.heads.base import Head
from pipeline.registry import HEADS

__all__ = [
    "FINETUNE",
    "ClipHead",
    "EarlyFusionConfig",
    "LateFusionConfig",
    "SingleFrameConfig",
    "SlowFusionConfig",
]

FINETUNE = ("all", "top3", "top")

# recipe=paper (Karpathy et al. 2014, Sec. 3.3): "mini-batches of 32 examples, momentum of 0.9 and weight decay of 0.0005 ... learning rates of 1e-3".
# frames=0: the trainer hands over every stored frame (padded and masked) and the head cuts its own contiguous clips.
KARPATHY_TRAIN_DEFAULTS: dict = {
    "optimizer": "sgd",
    "lr": 1e-3,
    "momentum": 0.9,
    "weight_decay": 5e-4,
    "batch_size": 32,
    "frames": 0,
}


# ----------------------------------------------------------------------------------------------------------------
# configs


@dataclass(frozen=True)
class SingleFrameConfig:
    """Single-Frame (Karpathy Sec. 3.1): per-frame classifier, clip scores averaged over the video."""

    tower_dims: tuple[int, ...] = (1024, 1024, 1024)  # the temporal stand-in for conv1-conv3 (module docstring)
    fc_dim: int = 4096  # FC(4096)-FC(4096)
    dropout: float = 0.5  # drop probability; Sec. 4.2 transfer: 0.9 (keep 10%)
    finetune: str = "all"  # all | top3 | top (Sec. 4.2)
    num_clips: int = EVAL_CLIPS  # clips averaged per video in evaluation; 0 = every clip position
    clip_seed: int = 0  # evaluation clips are a function of this seed and the video length
    views: int = 1  # V > 1: per-frame input is V crop/flip views (a `*_views` stream, `extract --keep-views`)
    any_rate: bool = False  # True: count clips in stored frames of a store not sampled at the full frame rate
    train_defaults: ClassVar[dict] = KARPATHY_TRAIN_DEFAULTS
    frame_rate: ClassVar[str] = "full"  # clips are consecutive frames (pipeline.features.check_frames)

    def __post_init__(self):
        if not self.tower_dims or min(self.tower_dims) < 1 or self.fc_dim < 1:
            raise UserError(f"{type(self).__name__}: tower_dims and fc_dim must be positive")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"{type(self).__name__}: dropout is a drop probability in [0, 1)")
        if self.finetune not in FINETUNE:
            raise UserError(f"{type(self).__name__}: finetune must be one of {FINETUNE}, got {self.finetune!r}")
        if self.num_clips < 0:
            raise UserError(f"{type(self).__name__}: num_clips must be >= 0")
        if self.views < 1:
            raise UserError(f"{type(self).__name__}: views must be >= 1")

    @property
    def clip_span(self) -> int:
        """Consecutive frames one clip covers: 1, 10, 16 (Late Fusion's 0 and 15), 10."""
        return clip_span(self.temporal_plan()[0])

    # how a clip is read and how its frames are fused: (frame offsets, tower kernels, tower strides)
    def temporal_plan(self) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        n = len(self.tower_dims)
        return (0,), (1,) * n, (1,) * n


@dataclass(frozen=True)
class EarlyFusionConfig(SingleFrameConfig):
    """Early Fusion (Karpathy Sec. 3.1): a window of T = 10 frames joined at the first layer."""

    clip_frames: int = 10

    def __post_init__(self):
        super().__post_init__()
        if self.clip_frames < 1:
            raise UserError("EarlyFusionConfig: clip_frames must be >= 1")

    def temporal_plan(self):
        n = len(self.tower_dims)
        return tuple(range(self.clip_frames)), (self.clip_frames,) + (1,) * (n - 1), (1,) * n


@dataclass(frozen=True)
class LateFusionConfig(SingleFrameConfig):
    """Late Fusion (Karpathy Sec. 3.1): two frames 15 apart, shared towers, merged at the first FC layer."""

    gap: int = 15

    def __post_init__(self):
        super().__post_init__()
        if self.gap < 1:
            raise UserError("LateFusionConfig: gap must be >= 1")

    def temporal_plan(self):
        n = len(self.tower_dims)
        return (0, self.gap), (1,) * n, (1,) * n


@dataclass(frozen=True)
class SlowFusionConfig(SingleFrameConfig):
    """Slow Fusion (Karpathy Sec. 3.1): temporal extents 4, 2, 2 with stride 2 over a 10-frame clip."""

    clip_frames: int = 10
    extents: tuple[int, ...] = (4, 2, 2)
    strides: tuple[int, ...] = (2, 2, 2)

    def __post_init__(self):
        super().__post_init__()
        if not (len(self.extents) == len(self.strides) == len(self.tower_dims)):
            raise UserError("SlowFusionConfig: extents, strides and tower_dims need one entry per tower layer")
        n = self.clip_frames
        for k, s in zip(self.extents, self.strides):
            if k < 1 or s < 1 or n < k:
                raise UserError(
                    f"SlowFusionConfig: extents {self.extents} / strides {self.strides} do not fit a "
                    f"{self.clip_frames}-frame clip"
                )
            n = (n - k) // s + 1

    def temporal_plan(self):
        return tuple(range(self.clip_frames)), tuple(self.extents), tuple(self.strides)


# ----------------------------------------------------------------------------------------------------------------
# the head


def _tower_lengths(clip_len: int, kernels, strides) -> list[int]:
    """Time steps after each tower layer (valid convolution): 10 -> 4 -> 2 -> 1 for Slow Fusion."""
    out = [clip_len]
    for k, s in zip(kernels, strides):
        out.append((out[-1] - k) // s + 1)
    return out


class ClipHead(Head):
    """A Karpathy network over clips of cached frames; forward averages clip scores over the video."""

    #: transfer to another dataset keeps a fresh classifier when the class count differs (pipeline.clips.expand_network)
    fresh_on_transfer = ("classifier.1.weight", "classifier.1.bias")

    def __init__(self, cfg: SingleFrameConfig, input_dim: int, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.offsets, kernels, strides = cfg.temporal_plan()
        self.span = clip_span(self.offsets)
        self.steps = _tower_lengths(len(self.offsets), kernels, strides)  # time steps through the tower
        if input_dim % cfg.views:
            raise UserError(f"input of {input_dim} dims does not split into views={cfg.views} equal views")
        dims = (input_dim // cfg.views,) + tuple(cfg.tower_dims)
        layers: list[nn.Module] = []
        for i, (k, s) in enumerate(zip(kernels, strides)):
            layers += [nn.Conv1d(dims[i], dims[i + 1], k, stride=s), nn.ReLU(inplace=True)]
        self.tower = nn.Sequential(*layers)
        # dropout before every trained layer of the top three (Sec. 4.2); Krizhevsky's FC dropout when training all
        p = cfg.dropout
        drop = {"all": (0.0, p, p), "top3": (p, p, p), "top": (0.0, 0.0, p)}[cfg.finetune]  # fc1, fc2, classifier
        flat = self.steps[-1] * dims[-1]
        self.fc1 = nn.Sequential(nn.Dropout(drop[0]), nn.Linear(flat, cfg.fc_dim), nn.ReLU(inplace=True))
        self.fc2 = nn.Sequential(nn.Dropout(drop[1]), nn.Linear(cfg.fc_dim, cfg.fc_dim), nn.ReLU(inplace=True))
        self.classifier = nn.Sequential(nn.Dropout(drop[2]), nn.Linear(cfg.fc_dim, num_classes))
        frozen = {"all": [], "top3": [self.tower], "top": [self.tower, self.fc1, self.fc2]}[cfg.finetune]
        for module in frozen:
            module.requires_grad_(False)

    def clip_features(self, clips: torch.Tensor) -> torch.Tensor:
        """Clips [N,L,D] -> FC-4096 features [N,fc_dim]."""
        h = self.tower(clips.transpose(1, 2))  # [N,D,L] -> [N,d,L']
        return self.fc2(self.fc1(h.flatten(1)))  # [N,d*L'] -> [N,fc_dim]

    def clip_logits(self, x: torch.Tensor, mask: torch.Tensor | None = None):
        """Scores of the clips this head reads: -> (logits [B,K,C], clip_mask [B,K]).

        Training: K = 1 random clip per video. Evaluation: ``num_clips`` clips fixed by ``clip_seed``.
        With ``views`` V > 1 (stored TTA crops/flips, Sec. 4.1 "crops and flips"), training reads one random view
        per video and evaluation scores every clip of every view (K = V * num_clips), so video scores average both.
        """
        B, V = x.shape[0], self.cfg.views
        if V > 1:
            xv = x.view(B, x.shape[1], V, -1)  # [B,T,V*D] -> [B,T,V,D]
            if self.training:
                pick = torch.randint(V, (B,), device=x.device)  # the trainer seeds the global RNG
                x = xv[torch.arange(B, device=x.device), :, pick]  # -> [B,T,D]
            else:
                x = xv.permute(0, 2, 1, 3).reshape(B * V, x.shape[1], -1)  # -> [B*V,T,D]
                mask = None if mask is None else mask.repeat_interleave(V, 0)
                logits, cmask = self._clip_logits(x, mask)  # [B*V,K,C]
                return logits.reshape(B, -1, logits.shape[-1]), cmask.reshape(B, -1)  # -> [B,V*K,C]
        return self._clip_logits(x, mask)

    def _clip_logits(self, x: torch.Tensor, mask: torch.Tensor | None):
        B = x.shape[0]
        lengths = mask.long().sum(1) if mask is not None else torch.full((B,), x.shape[1], device=x.device)
        if self.training:
            starts = random_clip_starts(lengths, self.span)  # [B,1]
            cmask = torch.ones_like(starts, dtype=torch.bool)
        else:
            starts, cmask = eval_clip_starts(lengths, self.span, self.cfg.num_clips, self.cfg.clip_seed)
        clips = gather_clips(x, lengths, starts, self.offsets)  # [B,K,L,D]
        K = clips.shape[1]
        logits = self.classifier(self.clip_features(clips.flatten(0, 1)))  # [B*K,C]
        return logits.view(B, K, -1), cmask  # [B,K,C]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        logits, cmask = self.clip_logits(x, mask)  # [B,K,C]
        if self.training:
            return logits[:, 0]  # [B,C]: one clip, trained with cross-entropy on its own scores
        return average_clip_scores(logits, cmask)  # [B,C] log of the averaged clip probabilities


# ----------------------------------------------------------------------------------------------------------------
# registered builders


@HEADS.register("single-frame", SingleFrameConfig)
def build_single_frame(cfg: SingleFrameConfig, input_dim: int, num_classes: int, stream_dims=()) -> ClipHead:
    """Karpathy et al. Single-Frame: per-frame network, clip scores averaged over the video."""
    return ClipHead(cfg, input_dim, num_classes)


@HEADS.register("early-fusion", EarlyFusionConfig)
def build_early_fusion(cfg: EarlyFusionConfig, input_dim: int, num_classes: int, stream_dims=()) -> ClipHead:
    """Karpathy et al. Early Fusion: 10 frames joined at the first layer."""
    return ClipHead(cfg, input_dim, num_classes)


@HEADS.register("late-fusion", LateFusionConfig)
def build_late_fusion(cfg: LateFusionConfig, input_dim: int, num_classes: int, stream_dims=()) -> ClipHead:
    """Karpathy et al. Late Fusion: two frames 15 apart merged at the first FC layer."""
    return ClipHead(cfg, input_dim, num_classes)


@HEADS.register("slow-fusion", SlowFusionConfig)
def build_slow_fusion(cfg: SlowFusionConfig, input_dim: int, num_classes: int, stream_dims=()) -> ClipHead:
    """Karpathy et al. Slow Fusion: temporal extents 4, 2, 2 (stride 2) over a 10-frame clip."""
    return ClipHead(cfg, input_dim, num_classes)
