"""Feature-pooling heads of Ng et al., "Beyond Short Snippets: Deep Networks for Video Classification" (CVPR 2015).

Section 3.1 and Figure 2 of the paper: CNN towers share weights across frames and a max-pooling layer combines
them over time. Five placements of that pooling are registered here:

- ``conv-pool``  (Fig. 2a): max over time of the last convolutional layer, then two FC layers and a softmax.
- ``late-pool``  (Fig. 2b): two shared FC layers per frame, then max over time, then the softmax.
- ``slow-pool``  (Fig. 2c): max over 10-frame windows with stride 5, a shared FC per window, max over windows,
  a second FC, then the softmax (two-stage pooling; "each max-pooling layer is followed by a FC layer").
- ``local-pool`` (Fig. 2d): max over 10-frame windows with stride 5, two shared FC layers per tower, and one
  larger softmax connected to all towers (so the number of towers is fixed by ``frames``).
- ``time-conv``  (Fig. 2e): a time-domain convolution (256 kernels, 3x3 in space, 10 frames, stride 5), then
  max over time, two FC layers and the softmax.

Adaptation to cached features: the CNN tower is the frozen backbone of stage one, so a frame arrives as a vector.
For ``conv-pool`` (and optionally ``time-conv``) that vector is the last convolutional map pooled to a small grid,
``[C, g, g]`` flattened channel-major (``feat.reshape(T, -1)`` of a ``[T, C, g, g]`` array, which is also what
concatenating the flattened rgb and flow maps per frame gives); ``grid`` in the config is ``g``. With ``grid=1``
``conv-pool`` is the paper's GoogLeNet Conv Pooling (max after the average-pooling layer, two FC-4096 + ReLU).

Windows: a window of ``window`` frames starts every ``stride`` frames. A video of ``L`` valid frames has
``num_windows(L) = 1`` if ``L <= window`` else ``ceil((L - window) / stride) + 1``: the last window may be partial
so that no frame is dropped when ``L`` is not a multiple of the stride, and a video shorter than one window is one
(partial) window. Window maxima only see valid frames, so padding never changes a head's output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
from pipeline.heads.base import Head, masked_max
from pipeline.registry import HEADS

__all__ = [
    "ConvPool",
    "ConvPoolConfig",
    "LatePool",
    "LatePoolConfig",
    "LocalPool",
    "LocalPoolConfig",
    "SlowPool",
    "SlowPoolConfig",
    "TimeConv",
    "TimeConvConfig",
    "fc_stack",
    "num_windows",
    "valid_lengths",
    "window_mask",
    "window_max",
]

# recipe=paper (Ng et al. 2015, Section 3.3): Downpour SGD, learning rate 1e-5, momentum 0.9, weight decay 0.0005; Section 1 / 4.1: 1 fps,
# 30-frame models (expanded to 120 frames, see pipeline.clips.expand_network).
# Sec. 4.1: Sports-1M "sampled at a frame rate of 1fps"; Sec. 4.2 / Table 6: UCF-101 at 30 and 6 fps (and 1 fps,
# "no further improvements"). Rates a store may have without a note (pipeline.features.check_frames).
NG_FRAME_RATE = (1.0, 6.0, 30.0)
NG_TRAIN_DEFAULTS: dict = {"optimizer": "sgd", "lr": 1e-5, "momentum": 0.9, "weight_decay": 5e-4, "frames": 30}


# ----------------------------------------------------------------------------------------------------------------
# window arithmetic (pure, shared with the tests)


def valid_lengths(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Number of valid frames per video. x: [B,T,...] -> [B] long."""
    if mask is None:
        return torch.full((x.shape[0],), x.shape[1], dtype=torch.long, device=x.device)
    return mask.long().sum(1)


def num_windows(lengths: torch.Tensor, window: int, stride: int) -> torch.Tensor:
    """Windows covering ``lengths`` frames (module docstring): 1 if L <= window, else ceil((L-window)/stride) + 1."""
    extra = (lengths - window).clamp_min(0)
    return torch.div(extra + stride - 1, stride, rounding_mode="floor") + 1


def window_mask(lengths: torch.Tensor, n: int, window: int, stride: int) -> torch.Tensor:
    """[B, n] bool: window k is real for a video iff k < num_windows(L) (never a window made only of padding)."""
    k = torch.arange(n, device=lengths.device)
    return k[None, :] < num_windows(lengths, window, stride)[:, None]


def _pad_time(x: torch.Tensor, length: int, value: float) -> torch.Tensor:
    """Pad (or keep) x: [B,T,...] along T to ``length`` with ``value``."""
    if x.shape[1] >= length:
        return x[:, :length]
    pad = x.new_full((x.shape[0], length - x.shape[1]) + x.shape[2:], value)
    return torch.cat([x, pad], 1)


def window_max(x: torch.Tensor, mask: torch.Tensor | None, window: int, stride: int):
    """Max over windows of ``window`` frames every ``stride`` frames, counting only valid frames.

    x: [B,T,D] -> (y [B,N,D], wmask [B,N]) with N = num_windows(T). Windows that are padding only are zeroed
    and marked False in ``wmask``.
    """
    T = x.shape[1]
    lengths = valid_lengths(x, mask)
    n = int(num_windows(torch.tensor(T), window, stride))
    low = torch.finfo(x.dtype).min
    if mask is not None:
        x = x.masked_fill(~mask[:, :, None], low)
    x = _pad_time(x, (n - 1) * stride + window, low)  # [B,P,D], P = (N-1)*stride + window
    y = x.unfold(1, window, stride).amax(-1)  # [B,N,D]
    wmask = window_mask(lengths, n, window, stride)
    return y.masked_fill(~wmask[:, :, None], 0.0), wmask


def fc_stack(in_dim: int, hidden: int, layers: int, dropout: float) -> nn.Sequential:
    """``layers`` x (Linear -> ReLU -> Dropout): the paper's fully connected layers (AlexNet: 4096, dropout 0.6)."""
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(in_dim if i == 0 else hidden, hidden), nn.ReLU(inplace=True), nn.Dropout(dropout)]
    return nn.Sequential(*mods)


# ----------------------------------------------------------------------------------------------------------------
# configs


def _check_common(cfg) -> None:
    if cfg.hidden < 1 or cfg.fc_layers < 1:
        raise UserError(f"{type(cfg).__name__}: hidden and fc_layers must be >= 1")
    if not 0.0 <= cfg.dropout < 1.0:
        raise UserError(f"{type(cfg).__name__}: dropout is a drop probability in [0, 1)")


def _check_window(cfg) -> None:
    if not 1 <= cfg.stride <= cfg.window:
        raise UserError(f"{type(cfg).__name__}: need 1 <= stride <= window, got {cfg.window=} {cfg.stride=}")


@dataclass(frozen=True)
class ConvPoolConfig:
    """Conv Pooling (Ng et al. Sec. 3.1, Fig. 2a): max over time of the conv map, FC layers, softmax."""

    grid: int = 3  # per-frame input is a [C, grid, grid] map flattened channel-major
    hidden: int = 4096  # Sec. 3.1 GoogLeNet Conv Pooling: two FC layers of 4096 with ReLU
    fc_layers: int = 2
    dropout: float = 0.6  # Sec. 3: dropout ratio 0.6 on the FC layers (keep 40%)
    train_defaults: ClassVar[dict] = NG_TRAIN_DEFAULTS
    frame_rate: ClassVar[tuple] = NG_FRAME_RATE

    def __post_init__(self):
        _check_common(self)
        if self.grid < 1:
            raise UserError("ConvPoolConfig: grid must be >= 1")


@dataclass(frozen=True)
class LatePoolConfig:
    """Late Pooling (Ng et al. Sec. 3.1, Fig. 2b): shared FC layers per frame, max over time, softmax."""

    hidden: int = 4096
    fc_layers: int = 2  # "passes convolutional features through two fully connected layers"
    dropout: float = 0.6
    train_defaults: ClassVar[dict] = NG_TRAIN_DEFAULTS
    frame_rate: ClassVar[tuple] = NG_FRAME_RATE

    def __post_init__(self):
        _check_common(self)


@dataclass(frozen=True)
class SlowPoolConfig:
    """Slow Pooling (Ng et al. Sec. 3.1, Fig. 2c): window max (10, stride 5), shared FC, max, FC, softmax."""

    window: int = 10
    stride: int = 5
    hidden: int = 4096
    fc_layers: int = 1  # FC layers after each of the two max-pooling stages
    dropout: float = 0.6
    train_defaults: ClassVar[dict] = NG_TRAIN_DEFAULTS
    frame_rate: ClassVar[tuple] = NG_FRAME_RATE

    def __post_init__(self):
        _check_common(self)
        _check_window(self)


@dataclass(frozen=True)
class LocalPoolConfig:
    """Local Pooling (Ng et al. Sec. 3.1, Fig. 2d): window max, two shared FCs per tower, softmax over all towers."""

    frames: int = 30  # fixes the number of towers the softmax sees: num_windows(frames)
    window: int = 10
    stride: int = 5
    hidden: int = 4096
    fc_layers: int = 2
    dropout: float = 0.6
    train_defaults: ClassVar[dict] = NG_TRAIN_DEFAULTS
    frame_rate: ClassVar[tuple] = NG_FRAME_RATE

    def __post_init__(self):
        _check_common(self)
        _check_window(self)
        if self.frames < 1:
            raise UserError("LocalPoolConfig: frames must be >= 1")


@dataclass(frozen=True)
class TimeConvConfig:
    """Time-Domain Convolution (Ng et al. Sec. 3.1, Fig. 2e): 256 kernels 3x3 over 10 frames stride 5, max, FCs."""

    grid: int = 1  # 1: per-frame vectors (a 1-D conv in time); g > 1: [C, g, g] maps and 3x3 spatial kernels
    kernels: int = 256
    window: int = 10
    stride: int = 5
    hidden: int = 4096
    fc_layers: int = 2
    dropout: float = 0.6
    train_defaults: ClassVar[dict] = NG_TRAIN_DEFAULTS
    frame_rate: ClassVar[tuple] = NG_FRAME_RATE

    def __post_init__(self):
        _check_common(self)
        _check_window(self)
        if self.grid < 1 or self.kernels < 1:
            raise UserError("TimeConvConfig: grid and kernels must be >= 1")


# ----------------------------------------------------------------------------------------------------------------
# heads


class _PoolHead(Head):
    """forward = forward_features ([B,T,D] -> [B,H] video descriptor) + forward_head ([B,H] -> [B,C])."""

    classifier: nn.Linear

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        raise NotImplementedError

    def forward_head(self, z: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return z if pre_logits else self.classifier(z)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, mask))


class ConvPool(_PoolHead):
    def __init__(self, cfg: ConvPoolConfig, input_dim: int, num_classes: int):
        super().__init__()
        if input_dim % (cfg.grid * cfg.grid):
            raise UserError(f"conv-pool: input dim {input_dim} is not C x {cfg.grid} x {cfg.grid} (set grid=...)")
        self.cfg = cfg
        self.fc = fc_stack(input_dim, cfg.hidden, cfg.fc_layers, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, num_classes)

    def forward_features(self, x, mask=None):
        # the max is taken per channel and grid cell, so the spatial layout of the map survives pooling
        return self.fc(masked_max(x, mask))  # [B,T,C*g*g] -> [B,C*g*g] -> [B,H]


class LatePool(_PoolHead):
    def __init__(self, cfg: LatePoolConfig, input_dim: int, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.fc = fc_stack(input_dim, cfg.hidden, cfg.fc_layers, cfg.dropout)  # shared across frames
        self.classifier = nn.Linear(cfg.hidden, num_classes)

    def forward_features(self, x, mask=None):
        return masked_max(self.fc(x), mask)  # [B,T,D] -> [B,T,H] -> [B,H]


class SlowPool(_PoolHead):
    def __init__(self, cfg: SlowPoolConfig, input_dim: int, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.fc_local = fc_stack(input_dim, cfg.hidden, cfg.fc_layers, cfg.dropout)  # shared across windows
        self.fc_global = fc_stack(cfg.hidden, cfg.hidden, cfg.fc_layers, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, num_classes)

    def forward_features(self, x, mask=None):
        w, wmask = window_max(x, mask, self.cfg.window, self.cfg.stride)  # [B,T,D] -> [B,N,D]
        h = masked_max(self.fc_local(w), wmask)  # [B,N,D] -> [B,N,H] -> [B,H]
        return self.fc_global(h)  # [B,H]


class LocalPool(_PoolHead):
    #: parameters whose input grows with the number of towers (see pipeline.clips.expand_network)
    tower_blocked = ("classifier.weight",)

    def __init__(self, cfg: LocalPoolConfig, input_dim: int, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.towers = int(num_windows(torch.tensor(cfg.frames), cfg.window, cfg.stride))
        self.fc = fc_stack(input_dim, cfg.hidden, cfg.fc_layers, cfg.dropout)  # shared across towers
        self.classifier = nn.Linear(self.towers * cfg.hidden, num_classes)  # "a larger softmax ... to all towers"

    def forward_features(self, x, mask=None):
        w, wmask = window_max(x, mask, self.cfg.window, self.cfg.stride)  # [B,T,D] -> [B,N,D]
        h = self.fc(w) * wmask[:, :, None]  # [B,N,H]; towers with no frames contribute nothing
        # the softmax has a fixed number of towers: a longer input keeps the first `frames` frames' towers
        h = _pad_time(h, self.towers, 0.0)  # [B,towers,H]
        return h.flatten(1)  # [B,towers*H]


class TimeConv(_PoolHead):
    def __init__(self, cfg: TimeConvConfig, input_dim: int, num_classes: int):
        super().__init__()
        g = cfg.grid
        if input_dim % (g * g):
            raise UserError(f"time-conv: input dim {input_dim} is not C x {g} x {g} (set grid=...)")
        self.cfg = cfg
        self.channels = input_dim // (g * g)
        k = 3 if g > 1 else 1  # "kernels of size 3 x 3 across 10 frames"; a vector per frame has no space
        self.conv = nn.Conv3d(
            self.channels, cfg.kernels, (cfg.window, k, k), stride=(cfg.stride, 1, 1), padding=(0, k // 2, k // 2)
        )
        self.fc = fc_stack(cfg.kernels * g * g, cfg.hidden, cfg.fc_layers, cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, num_classes)

    def forward_features(self, x, mask=None):
        B, T, _ = x.shape
        g, cfg = self.cfg.grid, self.cfg
        lengths = valid_lengths(x, mask)
        n = int(num_windows(torch.tensor(T), cfg.window, cfg.stride))
        if mask is not None:
            x = x.masked_fill(~mask[:, :, None], 0.0)  # padded frames read as zeros, like a partial window's tail
        x = _pad_time(x, (n - 1) * cfg.stride + cfg.window, 0.0)  # [B,P,D]
        x = x.view(B, x.shape[1], self.channels, g, g).permute(0, 2, 1, 3, 4)  # [B,C,P,g,g]
        y = F.relu(self.conv(x))  # [B,K,N,g,g]
        y = y.permute(0, 2, 1, 3, 4).flatten(2)  # [B,N,K*g*g]
        return self.fc(masked_max(y, window_mask(lengths, n, cfg.window, cfg.stride)))  # [B,K*g*g] -> [B,H]


# ----------------------------------------------------------------------------------------------------------------
# registered builders


@HEADS.register("conv-pool", ConvPoolConfig)
def build_conv_pool(cfg: ConvPoolConfig, input_dim: int, num_classes: int, stream_dims=()) -> ConvPool:
    """Ng et al. Conv Pooling: max over time of the (grid-pooled) conv maps, 2 x FC, softmax."""
    return ConvPool(cfg, input_dim, num_classes)


@HEADS.register("late-pool", LatePoolConfig)
def build_late_pool(cfg: LatePoolConfig, input_dim: int, num_classes: int, stream_dims=()) -> LatePool:
    """Ng et al. Late Pooling: shared FC layers per frame, then max over time, softmax."""
    return LatePool(cfg, input_dim, num_classes)


@HEADS.register("slow-pool", SlowPoolConfig)
def build_slow_pool(cfg: SlowPoolConfig, input_dim: int, num_classes: int, stream_dims=()) -> SlowPool:
    """Ng et al. Slow Pooling: max over 10-frame windows (stride 5), shared FC, max, FC, softmax."""
    return SlowPool(cfg, input_dim, num_classes)


@HEADS.register("local-pool", LocalPoolConfig)
def build_local_pool(cfg: LocalPoolConfig, input_dim: int, num_classes: int, stream_dims=()) -> LocalPool:
    """Ng et al. Local Pooling: window max, shared FCs per tower, one softmax over all towers."""
    return LocalPool(cfg, input_dim, num_classes)


@HEADS.register("time-conv", TimeConvConfig)
def build_time_conv(cfg: TimeConvConfig, input_dim: int, num_classes: int, stream_dims=()) -> TimeConv:
    """Ng et al. Time-Domain Convolution: temporal conv (10 frames, stride 5), max over time, FCs, softmax."""
    return TimeConv(cfg, input_dim, num_classes)
