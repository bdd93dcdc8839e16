"""Learnable VLAD pooling of frame features: NetVLAD and NeXtVLAD, with Context Gating and a Mixture of Experts.

NetVLAD (Arandjelovic et al. 2016, "NetVLAD: CNN architecture for weakly supervised place recognition", Sec. 3.1)
soft-assigns every local descriptor to K learned clusters and sums the residuals to each centre; Miech et al. 2017
("Learnable pooling with Context Gating for video classification", Sec. 3.1-3.3, 4) take the frames of a video as
the descriptors and follow the pooled vector by an FC layer, Context Gating and a Mixture-of-Experts classifier::

    x [B,T,D] -> BN -> (Linear D -> reduce) -> a_tk = softmax_k(w_k . x_t + b_k)         [B,T,K]
              -> V_k = sum_t a_tk (x_t - c_k)                                             [B,K,D']
              -> L2 per cluster (intra-normalisation), L2 of the whole       [B,K*D'] -> dropout
              -> FC-hidden -> BN -> (Context Gating) -> classifier (linear, or MoE)

NeXtVLAD (Lin et al. 2018, "NeXtVLAD: An Efficient Neural Network to Aggregate Frame-level Features for
Large-scale Video Classification", Sec. 3.2, Fig. 2-3) expands each frame by ``expansion`` (lambda), splits it
into ``groups`` (G) lower-dimensional vectors, assigns each group vector to the clusters and weights it by a
per-group attention ``alpha_g(x_t) = sigmoid(w_g . x_t)``; the residuals of all groups are summed, so the pooled
vector is K x (lambda D' / G) instead of K x D'::

    x -> BN -> (reduce) -> Linear D' -> lambda D' = x~  -> groups x~_g [B,T,G,lambda D'/G]
      -> V_k = sum_t sum_g alpha_g(x~_t) a_gk(x~_t) (x~_g,t - c_k)       [B,K,lambda D'/G] -> as NetVLAD

Context Gating (Miech et al. Sec. 3.3, Eq. 4): ``Y = sigmoid(W X + b) * X``, a learned re-weighting of the
features; ``gating_reduction=r`` uses a bottleneck ``W = W2 ReLU(W1 .)`` of width D/r (the "SE Context Gating" of
Lin et al. Sec. 3.3, after Hu et al.'s squeeze-and-excitation). ``classifier=moe`` is the YouTube-8M Mixture of
Experts (Abu-El-Haija et al. 2016, Sec. 4.3; used by both papers): per class, a softmax gate over ``experts``
logistic experts plus one that always says "no"; its class probability is returned as a logit, so the
sigmoid / BCE loss of multi-label data trains exactly the paper's objective.

Order: both poolings sum over frames, so a video's score does not depend on the order of its frames.

Padding: assignments (and NeXtVLAD's attention) are zeroed at padded frames, and BN takes statistics from valid
frames only (``FrameBatchNorm``), so appending padding frames changes no output.

Faithfulness notes. The YouTube-8M features were PCA-reduced to 1024 (rgb) dimensions before pooling; on the
2 x 1280 features of a two-stream store a K x D VLAD would feed an FC with hundreds of millions of weights, so
a learned linear reduction ``reduce`` (256 by default; 0 pools the raw features) plays the role of that PCA.
The reference code replaces the assignment bias by BN; here the bias of Arandjelovic et al. Eq. 3 is kept.
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

__all__ = ["ContextGating", "MixtureOfExperts", "NeXtVLAD", "NeXtVLADConfig", "NetVLAD", "NetVLADConfig", "VLADHead"]

CLASSIFIERS = ("linear", "moe")


class ContextGating(nn.Module):
    """Y = sigmoid(W X + b) * X (Miech et al. Sec. 3.3, Eq. 4); with ``reduction`` r the gate is a bottleneck
    W2 ReLU(W1 X) of width dim / r (Lin et al. Sec. 3.3). X: [B, dim]."""

    def __init__(self, dim: int, reduction: int = 0):
        super().__init__()
        if reduction:
            self.gate = nn.Sequential(nn.Linear(dim, max(dim // reduction, 1)), nn.ReLU(),
                                      nn.Linear(max(dim // reduction, 1), dim))
        else:
            self.gate = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.gate(x)) * x


class MixtureOfExperts(nn.Module):
    """YouTube-8M Mixture of Experts (Abu-El-Haija et al. 2016, Sec. 4.3): p(c|x) = sum_e g_ce(x) sigmoid(w_ce . x),
    the gate a softmax over ``experts`` + 1 entries whose last ("dummy") expert always predicts 0.

    Returns the log-odds log p - log(1 - p) [B, C] (clamped at 1e-6), so ``sigmoid(output) = p``."""

    def __init__(self, dim: int, num_classes: int, experts: int):
        super().__init__()
        self.C, self.E = num_classes, experts
        self.gates = nn.Linear(dim, num_classes * (experts + 1))
        self.experts = nn.Linear(dim, num_classes * experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B = x.shape[0]
        g = torch.softmax(self.gates(x).view(B, self.C, self.E + 1), -1)[..., : self.E]  # [B,C,E]
        p = (g * torch.sigmoid(self.experts(x).view(B, self.C, self.E))).sum(-1)  # [B,C]
        p = p.clamp(1e-6, 1 - 1e-6)
        return torch.log(p) - torch.log1p(-p)


def _masked(a: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Zero a [B,T,...] at padded frames."""
    if mask is None:
        return a
    return a * mask.reshape(mask.shape + (1,) * (a.dim() - 2)).to(a.dtype)


def _normalise(v: torch.Tensor) -> torch.Tensor:
    """Intra-normalisation (L2 per cluster; Arandjelovic et al. Sec. 3.1 after Arandjelovic and Zisserman 2013)
    then L2 of the flattened vector. v: [B,K,d] -> [B,K*d]."""
    return F.normalize(F.normalize(v, dim=-1).flatten(1), dim=-1)


class NetVLAD(nn.Module):
    """x [B,T,d], mask -> V [B,K,d] (Arandjelovic et al. Sec. 3.1, Eq. 4, frames as descriptors)."""

    def __init__(self, dim: int, clusters: int):
        super().__init__()
        self.assign = nn.Linear(dim, clusters)
        self.centres = nn.Parameter(torch.randn(clusters, dim) * dim ** -0.5)
        self.out_dim = clusters * dim

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        a = _masked(torch.softmax(self.assign(x), -1), mask)  # [B,T,K]
        x = _masked(x, mask)
        return torch.einsum("btk,btd->bkd", a, x) - a.sum(1)[..., None] * self.centres  # [B,K,d]


class NeXtVLAD(nn.Module):
    """x [B,T,d], mask -> V [B,K,lambda d/G] (Lin et al. Sec. 3.2, Eq. 3-5)."""

    def __init__(self, dim: int, clusters: int, groups: int, expansion: int):
        super().__init__()
        wide = expansion * dim
        if wide % groups:
            raise UserError(f"nextvlad: expansion x input width ({expansion} x {dim}) must divide into groups={groups}")
        self.G, self.K, self.sub = groups, clusters, wide // groups
        self.expand = nn.Linear(dim, wide)
        self.attention = nn.Linear(wide, groups)  # alpha_g(x~_t)
        self.assign = nn.Linear(wide, groups * clusters)  # a_gk(x~_t): each group's assignment reads the whole x~
        self.centres = nn.Parameter(torch.randn(clusters, self.sub) * self.sub ** -0.5)
        self.out_dim = clusters * self.sub

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        xw = self.expand(x)  # [B,T,lambda d]
        alpha = torch.sigmoid(self.attention(xw))  # [B,T,G]
        a = torch.softmax(self.assign(xw).view(B, T, self.G, self.K), -1) * alpha[..., None]  # [B,T,G,K]
        a = _masked(a, mask)
        xg = _masked(xw.view(B, T, self.G, self.sub), mask)  # [B,T,G,sub]
        v = torch.einsum("btgk,btgs->bks", a, xg)  # [B,K,sub]
        return v - a.sum((1, 2))[..., None] * self.centres


class VLADHead(Head):
    """BN -> (reduce) -> NetVLAD / NeXtVLAD -> normalise -> dropout -> FC-hidden -> BN -> (CG) -> classifier."""

    def __init__(self, cfg, input_dim: int, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.bn_in = FrameBatchNorm(input_dim) if cfg.bn_in else None
        self.reduce = nn.Linear(input_dim, cfg.reduce) if cfg.reduce else None
        d = cfg.reduce or input_dim
        if isinstance(cfg, NeXtVLADConfig):
            self.pool = NeXtVLAD(d, cfg.clusters, cfg.groups, cfg.expansion)
        else:
            self.pool = NetVLAD(d, cfg.clusters)
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(self.pool.out_dim, cfg.hidden)
        self.bn = nn.BatchNorm1d(cfg.hidden)
        self.gating = ContextGating(cfg.hidden, cfg.gating_reduction) if cfg.gating else None
        if cfg.classifier == "moe":
            self.classifier = MixtureOfExperts(cfg.hidden, num_classes, cfg.experts)
        else:
            self.classifier = nn.Linear(cfg.hidden, num_classes)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.bn_in is not None:
            x = self.bn_in(x, mask)
        if self.reduce is not None:
            x = self.reduce(x)  # [B,T,reduce]
        v = _normalise(self.pool(x, mask))  # [B,K*d]
        h = self.bn(self.fc(self.drop(v)))  # [B,hidden]
        return self.gating(h) if self.gating is not None else h

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.forward_features(x, mask))  # [B,C]


@dataclass(frozen=True)
class NetVLADConfig:
    """NetVLAD over frames with Context Gating (Arandjelovic et al. 2016, Sec. 3.1; Miech et al. 2017, Sec. 3-4).

    Settings (``--set``):
      ``clusters=64 hidden=1024``   -> K and the FC after pooling (the authors' YouTube-8M code defaults)
      ``gating=true``               -> Context Gating after the FC (Miech et al. Sec. 3.3); ``gating_reduction=r``
                                       for a bottleneck gate
      ``classifier=moe experts=2``  -> the Mixture-of-Experts classifier of Miech et al. Sec. 4 (default: linear)
      ``reduce=256``                -> linear reduction of every frame before pooling (0: raw features)
      ``dropout=0.5``               -> on the pooled vector, before the FC
    """

    clusters: int = 64
    hidden: int = 1024
    reduce: int = 256
    bn_in: bool = True
    gating: bool = True
    gating_reduction: int = 0
    classifier: str = "linear"
    experts: int = 2
    dropout: float = 0.5
    choices: ClassVar[dict] = {"classifier": CLASSIFIERS}


@dataclass(frozen=True)
class NeXtVLADConfig:
    """NeXtVLAD (Lin et al. 2018, Sec. 3.2-3.3, Sec. 4.2): expansion 2, 8 groups, 128 clusters, FC-2048, SE gating.

    Settings (``--set``):
      ``clusters=128 groups=8 expansion=2`` -> K, G and lambda (Lin et al. Sec. 4.2)
      ``hidden=2048``                      -> the FC after pooling (Lin et al. Sec. 4.2)
      ``gating=true gating_reduction=8``   -> SE Context Gating (Lin et al. Sec. 3.3, r=8)
      ``classifier=moe experts=4``         -> Mixture-of-Experts classifier (default: linear)
      ``reduce=256``                       -> linear reduction of every frame before pooling (0: raw features)
      ``dropout=0.5``                      -> on the pooled vector, before the FC (Lin et al. Sec. 4.2)
    """

    clusters: int = 128
    groups: int = 8
    expansion: int = 2
    hidden: int = 2048
    reduce: int = 256
    bn_in: bool = True
    gating: bool = True
    gating_reduction: int = 8
    classifier: str = "linear"
    experts: int = 4
    dropout: float = 0.5
    choices: ClassVar[dict] = {"classifier": CLASSIFIERS}



@HEADS.register("netvlad", NetVLADConfig)
def build_netvlad(cfg: NetVLADConfig, input_dim: int, num_classes: int,
                  stream_dims: tuple[int, ...] = ()) -> VLADHead:
    """NetVLAD pooling, 64 clusters, FC-1024, Context Gating (Arandjelovic et al. 2016; Miech et al. 2017)."""
    return VLADHead(cfg, input_dim, num_classes)


@HEADS.register("nextvlad", NeXtVLADConfig)
def build_nextvlad(cfg: NeXtVLADConfig, input_dim: int, num_classes: int,
                   stream_dims: tuple[int, ...] = ()) -> VLADHead:
    """NeXtVLAD pooling, 8 groups, 128 clusters, FC-2048, SE Context Gating (Lin et al. 2018)."""
    return VLADHead(cfg, input_dim, num_classes)
