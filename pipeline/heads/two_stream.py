"""Two-stream baseline (Ma et al. 2017, "TS-LSTM and Temporal-Inception", Sec. 3.1 and 4.1, Table 2).

Each stream (spatial RGB, temporal flow) has its own per-frame classifier, the last layer of its ConvNet.
A video's score is the mean over its frames (25 equally spaced test frames, after Simonyan and Zisserman)
of the per-frame class probabilities, and the two-stream score is "the mean values of the prediction
probabilities from both spatial and temporal-stream ConvNets" (Sec. 4.1):

    x [B,T,nS+nT] -> split by stream -> FC-C per stream -> softmax [B,T,C] per stream
      -> mean over streams and valid frames -> log [B,C]

With one stream (``stream_dims`` of length 1) this is the single-stream baseline of Table 2.
Each stream's classifier is trained on individual frames with the video label (the frame-level
classification loss of Sec. 3.1), not on the fused score, so the streams stay independent as in the paper.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.heads.base import Head, masked_mean
from pipeline.registry import HEADS

__all__ = ["TwoStreamConfig", "TwoStreamHead"]


@dataclass(frozen=True)
class TwoStreamConfig:
    """Two-stream baseline, Ma et al. Table 2 (UCF101 split 1: spatial 86.1, temporal 86.2, two-stream 92.6).

    Rows as settings: ``--streams rgb`` / ``--streams flow`` -> the spatial / temporal stream alone;
    ``--streams rgb,flow`` (both kept apart) -> two-stream. ``dropout`` applies to each frame's feature before
    its stream's classifier (not in the paper; 0 by default).
    """

    dropout: float = 0.0
    # recipe=paper (Ma et al. 2017, Sec. 3.4.1, after Simonyan and Zisserman): the paper fine-tunes whole ConvNets with SGD, momentum 0.9, weight decay 1e-4, batch 64 and lr 5e-6 (spatial)
    # / 5e-3 (temporal) (Sec. 3.4.1); only the last layer is trained here, so the temporal stream's rate is used
    # for both (5e-6 barely moves a freshly initialised layer). Epochs are not given in the paper.
    train_defaults: ClassVar[dict] = {"optimizer": "sgd", "lr": 5e-3, "momentum": 0.9, "weight_decay": 1e-4,
                                      "epochs": 30, "batch_size": 64, "frames": 25}


class TwoStreamHead(Head):
    scores_steps = True

    def __init__(self, cfg: TwoStreamConfig, input_dim: int, num_classes: int, stream_dims: tuple[int, ...]):
        super().__init__()
        stream_dims = tuple(stream_dims) or (input_dim,)
        if sum(stream_dims) != input_dim:
            raise ValueError(f"two-stream: stream_dims {stream_dims} do not add up to input_dim {input_dim}")
        self.stream_dims = stream_dims
        self.drop = nn.Dropout(cfg.dropout)
        self.classifiers = nn.ModuleList(nn.Linear(d, num_classes) for d in stream_dims)

    def stream_logits(self, x: torch.Tensor) -> torch.Tensor:
        """Per-stream, per-frame class scores: [B,T,D] -> [B,K,T,C] for K streams."""
        parts = torch.split(x, self.stream_dims, dim=-1)
        return torch.stack([fc(self.drop(p)) for fc, p in zip(self.classifiers, parts)], 1)  # [B,K,T,C]

    def step_logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Log of the stream-averaged class probabilities of each frame: [B,T,C]."""
        return F.softmax(self.stream_logits(x), -1).mean(1).clamp_min(1e-12).log()  # [B,T,C]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        p = masked_mean(F.softmax(self.stream_logits(x), -1).mean(1), mask)  # [B,C], mean over streams and frames
        return p.clamp_min(1e-12).log()

    def loss(self, x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """Frame-level cross-entropy of each stream's classifier, averaged over valid frames and streams."""
        logits = self.stream_logits(x)  # [B,K,T,C]
        B, K, T, C = logits.shape
        ce = F.cross_entropy(logits.reshape(-1, C), y[:, None, None].expand(B, K, T).reshape(-1),
                             reduction="none").reshape(B, K, T).mean(1)  # [B,T]
        if mask is None:
            return ce.mean()
        return (ce * mask).sum() / mask.sum().clamp_min(1)


@HEADS.register("two-stream", TwoStreamConfig)
def build_two_stream(cfg: TwoStreamConfig, input_dim: int, num_classes: int,
                     stream_dims: tuple[int, ...] = ()) -> TwoStreamHead:
    """Two-stream baseline: per-frame classifier per stream, probabilities averaged (Ma et al. 2017, Sec. 4.1)."""
    return TwoStreamHead(cfg, input_dim, num_classes, stream_dims)
