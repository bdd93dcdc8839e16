"""Temporal segment pooling (Ma et al. 2017, "TS-LSTM and Temporal-Inception", Sec. 3.2 and 4.2, Tables 3 and 7).

The frames of a video are divided into ``segments`` equal temporal segments, each segment is max- or
mean-pooled over time, and the pooled vectors are concatenated and classified:

    x [B,T,D] -> BN -> (FC-512) -> pool per segment -> concat [B,S*D'] -> BN -> FC-C

This file also holds the two blocks that the LSTM heads (``lstm.py``) reuse:

- ``FrameBatchNorm``: batch normalisation over the valid frames only, so that padding frames never enter
  the batch statistics (a video's output does not depend on how much padding the batch has).
- ``segment_pool``: per-video segments over the valid length; a video with fewer frames than segments
  still gets ``segments`` segments of at least one frame each.

Faithfulness notes. The reference implementation splits 25 frames into ``floor(25/S)``-frame segments and
drops the remainder (8+8+8 of 25 frames for S=3); here segment ``s`` of a video with ``L`` valid frames
covers frames ``[floor(s*L/S), max(floor((s+1)*L/S), floor(s*L/S)+1))`` so every frame is used (8+8+9).
The FC before pooling is linear (no ReLU), as in the reference code.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pipeline.heads.base import Head, masked_max
from pipeline.registry import HEADS

__all__ = ["FrameBatchNorm", "TemporalPoolConfig", "TemporalPoolHead", "segment_bounds", "segment_pool"]


class FrameBatchNorm(nn.BatchNorm1d):
    """BatchNorm1d over the feature axis of per-frame tensors, with statistics from valid frames only.

    x: [B, T, F] (features last) or [B, T, C, L] (channels, then positions that share the statistics);
    mask: [B, T] bool or None. Padded frames come out as zeros.
    """

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if mask is None:
            flat = x.reshape((-1,) + x.shape[2:])  # [B*T, F] or [B*T, C, L]
            return super().forward(flat).reshape(x.shape)
        out = x.new_zeros(x.shape)
        out[mask] = super().forward(x[mask])  # BN sees [N_valid, F] / [N_valid, C, L]
        return out


def segment_bounds(lengths: torch.Tensor, segments: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Start (inclusive) and end (exclusive) frame of each segment: two [B, S] long tensors.

    Equal split of each video's valid length ``L`` (Ma et al. Sec. 3.2, after TSN); every segment holds at
    least one frame, so ``L < S`` repeats frames instead of producing empty segments.
    """
    s = torch.arange(segments, device=lengths.device)
    L = lengths.long().clamp_min(1)[:, None]  # [B,1]
    start = torch.div(s * L, segments, rounding_mode="floor")  # [B,S]
    end = torch.maximum(torch.div((s + 1) * L, segments, rounding_mode="floor"), start + 1)  # [B,S]
    return start, end


def segment_pool(x: torch.Tensor, mask: torch.Tensor | None, segments: int, pool: str = "max") -> torch.Tensor:
    """Temporal max or mean pooling inside each segment. x: [B,T,D], mask: [B,T] -> [B,S,D]."""
    B, T, _ = x.shape
    lengths = mask.long().sum(1) if mask is not None else torch.full((B,), T, device=x.device)
    start, end = segment_bounds(lengths, segments)
    t = torch.arange(T, device=x.device)
    member = (t[None, None, :] >= start[..., None]) & (t[None, None, :] < end[..., None])  # [B,S,T]
    if mask is not None:
        member = member & mask[:, None, :]
    if pool == "max":
        return torch.stack([masked_max(x, member[:, i]) for i in range(segments)], 1)  # [B,S,D]
    if pool == "mean":
        w = member.to(x.dtype)
        return torch.einsum("bst,btd->bsd", w, x) / w.sum(-1, keepdim=True)  # [B,S,D]
    raise ValueError(f"pool must be 'max' or 'mean', got {pool!r}")


@dataclass(frozen=True)
class TemporalPoolConfig:
    """Temporal segment pooling, Ma et al. Table 7 ("Temporal Segment + Max Pooling + BN" and
    "Feature integration + Dimension Reduction" blocks; Table 3 rows 4-6).

    Rows as settings (``--set``):
      ``segments=1 bn_in=false bn_out=false``  -> "1 Max FC-101" (89.0)
      ``segments=1 bn_in=false``               -> "1 Max BN FC-101" (92.8)
      ``segments=1``                           -> "1 BN Max BN FC-101" (92.8)
      defaults (``segments=3``)                -> "3 BN Max BN FC-101" (93.4)
      ``segments=5``                           -> "5 BN Max BN FC-101" (93.2)
      ``fc=512``                               -> "3 BN 512 Max BN FC-101" (93.9); ``segments=5 fc=512`` (93.7)
      ``pool=mean``                            -> mean instead of max ("performed similarly", Sec. 4.2)
    """

    segments: int = 3
    pool: str = "max"  # "max" | "mean"
    bn_in: bool = True  # BN on every frame's feature vector before pooling
    fc: int = 0  # width of the linear layer before pooling (0: none; the paper's FC-512)
    bn_out: bool = True  # BN on the concatenated segment vector
    dropout: float = 0.0
    choices: ClassVar[dict] = {"pool": ("max", "mean")}  # checked with the generic ranges (registry.check_config)
    # recipe=paper: Ma et al. 2017, Sec. 3.4.1 trains the TS-LSTM family with Adam 5e-5; epochs and batch size from the authors' RNN code
    # (maxEpoch 100, batchSize 64); 25 equally spaced frames (Sec. 3.4.1 "Testing").
    train_defaults: ClassVar[dict] = {"optimizer": "adam", "lr": 5e-5, "weight_decay": 0.0, "epochs": 100,
                                      "batch_size": 64, "frames": 25}


class TemporalPoolHead(Head):
    def __init__(self, cfg: TemporalPoolConfig, input_dim: int, num_classes: int):
        super().__init__()
        if cfg.segments < 1:
            raise ValueError("segments must be >= 1")
        self.cfg = cfg
        self.bn_in = FrameBatchNorm(input_dim) if cfg.bn_in else None
        self.fc = nn.Linear(input_dim, cfg.fc) if cfg.fc else None
        dim = (cfg.fc or input_dim) * cfg.segments
        self.bn_out = nn.BatchNorm1d(dim) if cfg.bn_out else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(dim, num_classes)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.bn_in is not None:
            x = self.bn_in(x, mask)
        if self.fc is not None:
            x = self.fc(x)  # [B,T,D] -> [B,T,fc]
        z = segment_pool(x, mask, self.cfg.segments, self.cfg.pool)  # [B,S,D']
        return self.bn_out(z.flatten(1))  # [B,S*D']

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(z))  # [B,C]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, mask))


@HEADS.register("temporal-pool", TemporalPoolConfig)
def build_temporal_pool(cfg: TemporalPoolConfig, input_dim: int, num_classes: int,
                        stream_dims: tuple[int, ...] = ()) -> TemporalPoolHead:
    """Temporal segment pooling (Ma et al. 2017, Table 7): BN, segments, max/mean, BN, FC."""
    return TemporalPoolHead(cfg, input_dim, num_classes)
