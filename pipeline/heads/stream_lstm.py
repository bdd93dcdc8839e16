"""Per-stream LSTMs of Wu et al., "Modeling Spatial-Temporal Clues in a Hybrid Deep Learning Framework for
Video Classification" (ACM MM 2015), Section 3.2 and 4.1.2.

One LSTM per stream ("Spatial LSTM" on the frame features, "Motion LSTM" on the stacked-flow features), each two
layers deep (1,024 units, then 512), with a softmax over the classes at every time step; "we adopt the last step
output y_T as the video-level prediction scores". Trained with BPTT, mini-batch 10, learning rate 1e-4,
momentum 0.9 (Section 4.1.2).

    x_s [B, T, d_s] --LSTM 1024--> [B, T, 1024] --LSTM 512--> [B, T, 512] --Linear--> [B, T, C]

With several streams each LSTM sees only its own stream (``stream=None``) and their softmax scores are averaged,
the "simple late average fusion" of Section 4.2.1 (Table 1, "Spatial LSTM" + "Motion LSTM"); ``stream=k`` gives
the LSTM of one stream. Choices the paper leaves open, made here: every valid step carries the video's label in
the loss (the paper predicts at every step, Figure 1; ``loss_steps="last"`` trains on the last step only), and
PyTorch's LSTM cell, which lacks the peephole terms ``W_c. c`` of the paper's equations. The LSTM is causal, so
padding after the last valid frame (mask False at the end) does not change the scores read at that frame.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.heads.base import Head, last_valid
from pipeline.registry import HEADS

__all__ = ["StreamLSTM", "StreamLSTMConfig"]


class _LSTMStack(nn.Module):
    """Stacked LSTMs of possibly different widths (nn.LSTM's num_layers needs equal widths) + a per-step classifier."""

    def __init__(self, input_dim: int, hidden: tuple[int, ...], num_classes: int):
        super().__init__()
        dims = (input_dim, *hidden)
        self.layers = nn.ModuleList(nn.LSTM(a, b, batch_first=True) for a, b in itertools.pairwise(dims))
        self.classifier = nn.Linear(dims[-1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B, T, d] -> [B, T, C]
        for lstm in self.layers:
            x, _ = lstm(x)  # [B, T, h_l]
        return self.classifier(x)  # [B, T, C]


class StreamLSTM(Head):
    """One two-layer LSTM per stream, the last valid step's prediction as the video score."""

    scores_steps = True

    def __init__(self, stream_dims, num_classes: int, hidden=(1024, 512), stream: int | None = None,
                 loss_steps: str = "all"):
        super().__init__()
        if loss_steps not in ("all", "last"):
            raise ValueError(f"loss_steps must be 'all' or 'last', got {loss_steps!r}")
        self.stream_dims = tuple(stream_dims)
        if stream is not None and not 0 <= stream < len(self.stream_dims):
            raise ValueError(f"stream {stream} out of range for {len(self.stream_dims)} streams")
        self.stream, self.loss_steps = stream, loss_steps
        used = range(len(self.stream_dims)) if stream is None else [stream]
        self.used = list(used)
        self.lstms = nn.ModuleList(_LSTMStack(self.stream_dims[s], tuple(hidden), num_classes) for s in self.used)

    def stream_step_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """One [B, T, C] logit sequence per LSTM."""
        parts = torch.split(x, list(self.stream_dims), dim=-1)  # S x [B, T, d_s]
        return [net(parts[s]) for net, s in zip(self.lstms, self.used)]

    def step_logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # -> [B, T, C]
        logits = self.stream_step_logits(x)
        if len(logits) == 1:
            return logits[0]
        # Late average fusion of the streams' softmax scores, returned as log-probabilities.
        return torch.stack([z.softmax(-1) for z in logits]).mean(0).log()  # [B, T, C]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # [B, T, D] -> [B, C]
        return last_valid(self.step_logits(x, mask), mask)  # y_T, the last valid step

    def loss(self, x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """Cross-entropy of every LSTM's softmax against the video label (the LSTMs share nothing)."""
        total = 0.0
        for z in self.stream_step_logits(x):  # [B, T, C]
            if self.loss_steps == "last":
                total = total + F.cross_entropy(last_valid(z, mask), y)
                continue
            per_step = F.cross_entropy(z.transpose(1, 2), y[:, None].expand(-1, z.shape[1]), reduction="none")  # [B, T]
            m = torch.ones_like(per_step) if mask is None else mask.to(per_step.dtype)
            total = total + (per_step * m).sum() / m.sum().clamp_min(1)
        return total


@dataclass(frozen=True)
class StreamLSTMConfig:
    """Per-stream two-layer LSTMs (Wu et al. 2015, Section 3.2, 4.1.2)."""

    hidden: tuple[int, ...] = (1024, 512)
    stream: int | None = None  # None: one LSTM per stream, scores averaged; k: the LSTM of stream k only
    loss_steps: str = "all"  # "all": label on every valid step; "last": on the last one only
    choices: ClassVar[dict] = {"loss_steps": ("all", "last")}  # checked by registry.check_config
    # recipe=paper (Wu et al. 2015, Section 4.1.2): mini-batch 10, lr 1e-4, momentum 0.9, stopped after 150K iterations (1.5M videos seen,
    # about 157 epochs of UCF-101 split 1's 9,537 training videos).
    train_defaults: ClassVar[dict] = {"optimizer": "sgd", "lr": 1e-4, "momentum": 0.9, "weight_decay": 0.0,
                                          "batch_size": 10, "epochs": 157}


@HEADS.register("stream-lstm", StreamLSTMConfig)
def build_stream_lstm(cfg: StreamLSTMConfig, input_dim: int, num_classes: int, stream_dims) -> StreamLSTM:
    """One LSTM (1024, 512) per stream, last-step prediction as the video score (Wu et al. 2015, Section 3.2)."""
    return StreamLSTM(stream_dims or (input_dim,), num_classes, cfg.hidden, cfg.stream, cfg.loss_steps)
