"""Temporal-ConvNets: Temporal-VGG, multi-flow Temporal-VGG and Temporal-Inception (Ma et al. 2017,
"TS-LSTM and Temporal-Inception", Sec. 3.3, 4.3, Fig. 3-4, Tables 8-10).

The video is a feature matrix ``x in R^{D x N}`` (D feature elements, N frames) treated as a one-channel image.
A Temporal-ConvNet layer (TCL) convolves along time only with a ``1 x k`` kernel shared by all D elements
("we apply 1D kernels to specifically encode temporal information", Sec. 3.3), then BN, then ReLU
("a batch normalization layer right before each ReLU", Sec. 4.3), and halves the temporal dimension.

Temporal-Inception (Fig. 3, Eq. TemConv(x) = H(G(F(F(F(F(x,W1),W2),W3),W4))))::

    x [B,T,D] -> [B,1,D,T]
    4 x multi-flow module F: (TCL k=5 || TCL k=7), each flow keeps the module's input width, outputs are
        concatenated (channels 1 -> 2 -> 4 -> 8 -> 16) and time is halved (25 -> 13 -> 7 -> 4 -> 1)
    conv fusion: 1x1 convs 16 -> 4 -> 2 -> 1 with BN + ReLU (Table 9 "Conv1,4 Conv1,2 Conv1,1")
    G: dropout -> FC-1024 -> BN -> ReLU -> dropout ("dropout layers before and after the FC-1024 layer")
    H: FC-C (softmax in the loss)

Temporal-VGG ({T,T,T,T}, Fig. 4): one flow of four stacked one-channel TCLs, then G and H. The multi-flow
Temporal-VGG ({T,T,T,T},{T,T,T,T}) runs one such tower per kernel, each with its own FC-1024, and
concatenates the towers only at the end (Fig. 4: the difference to Temporal-Inception is where the
concatenation is placed).

Padding: every TCL zeroes padded frames before the next convolution, which is exactly the zero padding a
shorter video gets at its end; BN statistics come from valid frames only (``FrameBatchNorm``); halving is a
masked max over pairs of frames, and the last layer takes a masked max over the remaining frames. So
appending padding frames changes no output.

Faithfulness notes (reference: the authors' Torch7 code, ``model-Conv-Inception-v1.lua``). The reference
pools with floor (25 -> 12 -> 6 -> 3, dropping a frame) and uses a final pool of 3 (3 -> 1); here halving
uses ceil (25 -> 13 -> 7 -> 4) and the last layer's pool is a global max, which equals pool-3 on 25 frames
and lets any length (even T=1) through. The reference's dropout before the FC is spatial dropout over the
single remaining channel; here it is ordinary element-wise dropout, as the paper's text describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
from pipeline.heads.base import Head
from pipeline.heads.temporal_pool import FrameBatchNorm
from pipeline.registry import HEADS

__all__ = ["TCL", "MultiFlow", "TemporalConvHead", "TemporalInceptionConfig", "TemporalVGGConfig"]


def _zero_padding(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """h: [B,C,D,T]; padded frames set to zero (what a shorter video's conv padding would see)."""
    return h if mask is None else h * mask[:, None, None, :].to(h.dtype)


def _bn(bn: FrameBatchNorm | None, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Channel BN of h [B,C,D,T] with statistics over batch, feature elements and valid frames."""
    if bn is None:
        return _zero_padding(h, mask)
    return bn(h.permute(0, 3, 1, 2), mask).permute(0, 2, 3, 1)  # [B,T,C,D] -> [B,C,D,T]


def halve_time(h: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Max pool 2 / stride 2 along time with ceil mode, ignoring padded frames. [B,C,D,T] -> [B,C,D,ceil(T/2)]."""
    T = h.shape[-1]
    if mask is None:
        return F.max_pool2d(h, (1, 2), (1, 2), ceil_mode=True), None
    low = torch.finfo(h.dtype).min
    h = h.masked_fill(~mask[:, None, None, :], low)
    if T % 2:
        h = F.pad(h, (0, 1), value=low)
        mask = F.pad(mask, (0, 1), value=False)
    h = h.reshape(h.shape[:3] + (T // 2 + T % 2, 2)).amax(-1)  # [B,C,D,T/2]
    mask = mask.reshape(mask.shape[0], -1, 2).any(-1)  # [B,T/2]: a window is valid if one frame in it is
    return _zero_padding(h, mask), mask


def global_time_max(h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Max over all valid frames: [B,C,D,T] -> [B,C,D,1]."""
    if mask is not None:
        h = h.masked_fill(~mask[:, None, None, :], torch.finfo(h.dtype).min)
    return h.amax(-1, keepdim=True)


class TCL(nn.Module):
    """Temporal-ConvNet layer: ``1 x k`` conv along time (shared over feature elements) -> BN -> ReLU.

    ``factorize`` replaces a k-wide conv by (k-1)/2 stacked 3-wide convs, each with BN + ReLU (Inception-v3
    factorisation, Table 10 "stacked Conv3 to replace Conv5 & Conv7"). ``stride=2`` is the "2-stride Conv"
    of Table 10 (it halves time in place of the max pooling).
    """

    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, bn: bool = True, factorize: bool = False):
        super().__init__()
        if kernel % 2 == 0:
            raise ValueError(f"temporal kernel sizes must be odd (same padding), got {kernel}")
        ks = [3] * ((kernel - 1) // 2) if factorize and kernel > 3 else [kernel]
        chans = [cin] + [cout] * len(ks)
        self.strides = [1] * (len(ks) - 1) + [stride]
        self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], (1, k), (1, s), (0, (k - 1) // 2))
                                   for i, (k, s) in enumerate(zip(ks, self.strides)))
        self.bns = nn.ModuleList(FrameBatchNorm(cout) for _ in ks) if bn else None

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        for i, (conv, s) in enumerate(zip(self.convs, self.strides)):
            h = conv(h)  # [B,Cin,D,T] -> [B,Cout,D,ceil(T/s)]
            if s == 2 and mask is not None:
                mask = mask[:, ::2]  # output i is centred on input frame 2i
            h = F.relu(_bn(self.bns[i] if self.bns is not None else None, h, mask))
        return h, mask


class MultiFlow(nn.Module):
    """Multi-flow module (Fig. 3): parallel TCLs with different kernels, concatenated over channels."""

    def __init__(self, cin: int, cout: int, kernels: tuple[int, ...], stride: int, bn: bool, factorize: bool):
        super().__init__()
        self.flows = nn.ModuleList(TCL(cin, cout, k, stride, bn, factorize) for k in kernels)
        self.out_channels = cout * len(kernels)

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        outs = [flow(h, mask) for flow in self.flows]
        return torch.cat([o for o, _ in outs], 1), outs[0][1]  # [B,K*Cout,D,T']


class ChannelReduce(nn.Module):
    """Reduce the filter dimension (Table 9): average or max over channels, or conv fusion, a chain of 1x1
    convs with BN + ReLU (``dims=(4, 2, 1)`` is "Conv1,4 Conv1,2 Conv1,1")."""

    def __init__(self, cin: int, method: str, dims: tuple[int, ...], bn: bool):
        super().__init__()
        if method not in ("conv", "max", "avg"):
            raise ValueError(f"reduce must be 'conv', 'max' or 'avg', got {method!r}")
        self.method = method
        if method == "conv":
            if not dims:
                raise ValueError("reduce=conv needs reduce_dims, e.g. 4,2,1")
            chans = (cin,) + tuple(dims)
            self.convs = nn.ModuleList(nn.Conv2d(chans[i], chans[i + 1], 1) for i in range(len(dims)))
            self.bns = nn.ModuleList(FrameBatchNorm(c) for c in dims) if bn else None
            self.out_channels = dims[-1]
        else:
            self.out_channels = 1

    def forward(self, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        if self.method == "max":
            return h.amax(1, keepdim=True)  # [B,C,D,T] -> [B,1,D,T]
        if self.method == "avg":
            return h.mean(1, keepdim=True)  # [B,C,D,T] -> [B,1,D,T]
        for i, conv in enumerate(self.convs):
            h = F.relu(_bn(self.bns[i] if self.bns is not None else None, conv(h), mask))  # [B,c_i,D,T]
        return h


def _fc_block(din: int, fc: int, bn: bool, dropout: float) -> tuple[nn.Module, int]:
    """G of the TemConv equation: dropout -> FC -> BN -> ReLU (or only dropout when fc == 0)."""
    if not fc:
        return nn.Dropout(dropout), din
    layers = [nn.Dropout(dropout), nn.Linear(din, fc)] + ([nn.BatchNorm1d(fc)] if bn else []) + [nn.ReLU()]
    return nn.Sequential(*layers), fc


@dataclass(frozen=True)
class TemporalVGGConfig:
    """Temporal-VGG {T,T,T,T} and multi-flow Temporal-VGG, Ma et al. Table 8.

    Rows as settings (``--set``):
      defaults                          -> "Temporal-VGG {T,T,T,T} BN Dropout 1024" (94.0); ``fc=512/2048/4096``
                                           (93.5 / 93.8 / 93.2)
      ``kernels=5,7``                   -> "Multi-flow Temporal-VGG ({T,T,T,T},{T,T,T,T}) BN Dropout 1024" (93.4);
                                           ``fc=512/2048/4096`` (93.6 / 93.5 / 93.2)
      ``layers=1 time_reduce=flatten``  -> "1L T" (93.6): one TCL, the remaining 13 frames flattened into the FC
      ``layers=2 time_reduce=flatten``  -> "2L {T,T}" (93.1)
      ``bn=false`` / ``dropout=0``      -> without BN / dropout
    ``time_reduce=flatten`` needs every video to have exactly ``flatten_frames`` frames (the paper's fixed 25).
    """

    kernels: tuple[int, ...] = (5,)  # one flow per kernel size
    layers: int = 4  # number of TCLs (multi-flow modules for Temporal-Inception)
    downsample: str = "pool"  # "pool" (1-stride conv + max pool 2) | "stride" (2-stride conv), Table 10
    time_reduce: str = "max"  # after the last layer: "max" (global, = pool 3 on 25 frames) | "flatten"
    flatten_frames: int = 25  # fixed input length for time_reduce=flatten (the paper's 25 frames)
    factorize: bool = False  # stacked 3-wide convs in place of 5/7 (Table 10)
    bn: bool = True  # BN before every ReLU (Sec. 4.3)
    dropout: float = 0.2  # before and after the FC (authors' code: dropout1 = dropout2 = 0.2)
    fc: int = 1024  # width of G's FC layer (0: classify the conv output directly)
    # recipe=paper (Ma et al. 2017, Sec. 3.4.1): "For Temporal-ConvNets, we use 1e-4 for learning rate and 1e-1 for weight decay" (Adam).
    # Epochs and batch size from the authors' code (30 epochs, batch 16); 25 equally spaced frames.
    train_defaults: ClassVar[dict] = {"optimizer": "adam", "lr": 1e-4, "weight_decay": 1e-1, "epochs": 30,
                                      "batch_size": 16, "frames": 25}
    choices: ClassVar[dict] = {"downsample": ("pool", "stride"), "time_reduce": ("max", "flatten")}

    def __post_init__(self):
        even = [k for k in self.kernels if k % 2 == 0]
        if even:
            raise UserError(f"{type(self).__name__}: temporal kernel sizes must be odd (same padding), got {even[0]}")


@dataclass(frozen=True)
class TemporalInceptionConfig(TemporalVGGConfig):
    """Temporal-Inception, Ma et al. Fig. 3, Tables 8-10 (UCF101 split 1: 94.2; 3 splits: 93.9).

    Rows as settings (``--set``):
      defaults                                  -> "{(T,T),(T,T),(T,T),(T,T)} BN Dropout 1024" (94.2, Table 8);
                                                   Table 10 "Conv5,1 Conv7,1"; Table 9 "Conv1,4 Conv1,2 Conv1,1"
      ``fc=0`` / ``fc=512/2048/4096``           -> Table 8 rows without FC (92.7) / 93.1 / 93.7 / 93.4
      ``bn=false dropout=0`` / ``bn=false`` / ``dropout=0`` -> Table 8 "1024" (93.3) / "Dropout 1024" (93.4) /
                                                   "BN 1024" (93.4)
      ``layers=1 time_reduce=flatten``          -> Table 8 "1L (T,T)" (92.6); ``layers=2`` -> "2L {(T,T),(T,T)}" (92.7)
      ``reduce=avg`` / ``reduce=max``           -> Table 9 "after all modules: average / max pooling" (93.0 / 93.1)
      ``reduce_dims=1`` / ``2,1`` / ``8,4,1`` ... -> Table 9 conv-fusion rows
      ``reduce_per_module=true reduce=avg|max|conv reduce_dims=1`` -> Table 9 "for each multi-flow module"
      ``kernels=3,5`` / ``3,7`` / ``3,9`` / ``5,9`` / ``7,9`` -> Table 10 kernel rows (92.0 ... 93.9)
      ``factorize=true``                        -> Table 10 "stacked Conv3 to replace Conv5 & Conv7" (93.3)
      ``downsample=stride``                     -> Table 10 "2-stride Conv" (94.4; 3 splits 93.6)
    """

    kernels: tuple[int, ...] = (5, 7)
    reduce: str = "conv"  # "conv" | "max" | "avg": how the filter dimension is reduced (Table 9)
    reduce_dims: tuple[int, ...] = (4, 2, 1)  # conv fusion widths
    reduce_per_module: bool = False  # reduce to one channel after every module instead of after all
    choices: ClassVar[dict] = {**TemporalVGGConfig.choices, "reduce": ("conv", "max", "avg")}


class TemporalConvHead(Head):
    """Temporal-ConvNet over ``[B,T,D]``: ``inception=True`` concatenates the flows after every module,
    ``inception=False`` (Temporal-VGG) keeps one tower per kernel until after the FC."""

    def __init__(self, cfg: TemporalVGGConfig, input_dim: int, num_classes: int, inception: bool):
        super().__init__()
        if cfg.layers < 1 or not cfg.kernels:
            raise ValueError("temporal conv: layers must be >= 1 and kernels non-empty")
        if cfg.downsample not in ("pool", "stride") or cfg.time_reduce not in ("max", "flatten"):
            raise ValueError("downsample must be 'pool'|'stride' and time_reduce 'max'|'flatten'")
        self.cfg, self.inception = cfg, inception
        flatten = cfg.time_reduce == "flatten"
        t_out = cfg.flatten_frames
        for _ in range(cfg.layers):
            t_out = -(-t_out // 2)
        t_out = t_out if flatten else 1
        towers = [tuple(cfg.kernels)] if inception else [(k,) for k in cfg.kernels]
        self.towers = nn.ModuleList()
        self.reducers = nn.ModuleList()  # per-module reducers (inception with reduce_per_module)
        self.fcs = nn.ModuleList()
        feat = 0
        for kernels in towers:
            mods, cin = nn.ModuleList(), 1
            for i in range(cfg.layers):
                halves = i < cfg.layers - 1 or flatten
                stride = 2 if halves and cfg.downsample == "stride" else 1
                # Inception: each flow keeps the module's input width, so concatenation doubles it (1,2,4,8 -> 16)
                mods.append(MultiFlow(cin, cin if inception else 1, kernels, stride, cfg.bn, cfg.factorize))
                cin = mods[-1].out_channels
                if inception and cfg.reduce_per_module:
                    self.reducers.append(ChannelReduce(cin, cfg.reduce, cfg.reduce_dims[-1:], cfg.bn))
                    cin = 1
            self.towers.append(mods)
            if inception and not cfg.reduce_per_module:
                self.end_reduce = ChannelReduce(cin, cfg.reduce, cfg.reduce_dims, cfg.bn)
                cin = self.end_reduce.out_channels
            fc, dim = _fc_block(cin * input_dim * t_out, cfg.fc, cfg.bn, cfg.dropout)
            self.fcs.append(fc)
            feat += dim
        self.drop = nn.Dropout(cfg.dropout) if cfg.fc else nn.Identity()  # "dropout ... after the FC-1024"
        self.classifier = nn.Linear(feat, num_classes)

    def _tower(self, i: int, h: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        cfg = self.cfg
        flatten = cfg.time_reduce == "flatten"
        for j, module in enumerate(self.towers[i]):
            h, mask = module(h, mask)  # [B,C,D,T] -> [B,C',D,T or T/2]
            if self.inception and cfg.reduce_per_module:
                h = self.reducers[j](h, mask)  # [B,C',D,T] -> [B,1,D,T]
            if (j < len(self.towers[i]) - 1 or flatten) and cfg.downsample == "pool":
                h, mask = halve_time(h, mask)  # [B,C,D,T] -> [B,C,D,ceil(T/2)]
        if not flatten:
            h = global_time_max(h, mask)  # [B,C,D,T] -> [B,C,D,1]
        if self.inception and not cfg.reduce_per_module:
            h = self.end_reduce(h, mask if flatten else None)  # [B,16,D,T'] -> [B,1,D,T']
        return self.fcs[i](h.flatten(1))  # [B,C*D*T'] -> [B,fc]

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.time_reduce == "flatten" and x.shape[1] != self.cfg.flatten_frames:
            raise ValueError(f"time_reduce=flatten needs exactly {self.cfg.flatten_frames} frames, got {x.shape[1]}")
        h = _zero_padding(x.transpose(1, 2).unsqueeze(1), mask)  # [B,T,D] -> [B,1,D,T]
        return torch.cat([self._tower(i, h, mask) for i in range(len(self.towers))], 1)  # [B,F]

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(z))  # [B,C]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, mask))


@HEADS.register("temporal-vgg", TemporalVGGConfig)
def build_temporal_vgg(cfg: TemporalVGGConfig, input_dim: int, num_classes: int,
                       stream_dims: tuple[int, ...] = ()) -> TemporalConvHead:
    """Temporal-VGG {T,T,T,T}, and its multi-flow variant via kernels (Ma et al. 2017, Fig. 4, Table 8)."""
    return TemporalConvHead(cfg, input_dim, num_classes, inception=False)


@HEADS.register("temporal-inception", TemporalInceptionConfig)
def build_temporal_inception(cfg: TemporalInceptionConfig, input_dim: int, num_classes: int,
                             stream_dims: tuple[int, ...] = ()) -> TemporalConvHead:
    """Temporal-Inception: multi-flow modules (k=5, 7), conv fusion 4-2-1, FC-1024 (Ma et al. 2017, Fig. 3)."""
    return TemporalConvHead(cfg, input_dim, num_classes, inception=True)
