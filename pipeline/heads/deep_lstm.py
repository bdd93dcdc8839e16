"""Deep video LSTM of Ng et al., "Beyond Short Snippets: Deep Networks for Video Classification" (CVPR 2015).

Section 3.2 and Figure 4: five stacked LSTM layers of 512 cells over the per-frame CNN outputs, and a softmax
that predicts the class at every frame. The cell is Eq. 3-7 (Graves' LSTM with peephole connections from the
cell to the input, forget and output gates); ``peepholes=False`` swaps in ``torch.nn.LSTM`` (no peepholes, cuDNN).

Section 3.3, "LSTM Training": the video's label is backpropagated at every frame with a gain ``g`` linearly
interpolated from 0 to 1 over the frames t = 0..T (``gain="linear"``; the paper's two alternatives, g = 1
everywhere and g = 1 at the last step only, are ``"uniform"`` and ``"last"``). We normalise each video's loss by
its sum of gains, so short and long videos weigh the same in a batch.

Section 3.3, "LSTM Inference": four video-level aggregations of the per-frame predictions (softmax
probabilities): ``last`` (the prediction at the last step), ``max`` (max over time), ``sum`` (sum over time) and
``weighted`` (sum weighted by g). ``forward`` returns the log of the aggregated scores, normalised to sum to one
for ``sum`` and ``weighted`` (a mean, which has the same arg-max as the paper's sum); the arg-max is the paper's
prediction and ``softmax(forward(x))`` gives back the aggregated distribution.

Padding at the end of a sequence never reaches a valid step (the LSTM runs forward in time) and every
aggregation and the loss read valid steps only.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
from pipeline.heads.base import Head, last_valid, masked_max
from pipeline.registry import HEADS

__all__ = ["AGGREGATES", "GAINS", "DeepLSTM", "DeepLSTMConfig", "PeepholeLSTM", "aggregate_steps", "gain_weights"]

AGGREGATES = ("last", "max", "sum", "weighted")
GAINS = ("linear", "uniform", "last")


def _lengths(T: int, mask: torch.Tensor | None, B: int, device) -> torch.Tensor:
    if mask is None:
        return torch.full((B,), T, dtype=torch.long, device=device)
    return mask.long().sum(1)


def gain_weights(lengths: torch.Tensor, T: int, kind: str = "linear") -> torch.Tensor:
    """Per-step gain g (Ng et al. Sec. 3.3) for videos of ``lengths`` valid steps padded to T -> [B,T].

    linear: g_t = t / (L - 1) for t < L (0 at the first frame, 1 at the last; 1 for a one-frame video);
    uniform: g_t = 1; last: g = 1 at the last valid step only. Padded steps get 0.
    """
    t = torch.arange(T, device=lengths.device, dtype=torch.float32)[None, :]  # [1,T]
    L = lengths[:, None].to(torch.float32)  # [B,1]
    valid = t < L
    if kind == "linear":
        g = torch.where(L > 1, t / (L - 1).clamp_min(1), torch.ones_like(t))
    elif kind == "uniform":
        g = torch.ones_like(t).expand(lengths.shape[0], T)
    elif kind == "last":
        g = (t == L - 1).float()
    else:
        raise UserError(f"unknown gain {kind!r}; choose one of {GAINS}")
    return g * valid  # [B,T]


def aggregate_steps(step_logits: torch.Tensor, mask: torch.Tensor | None, how: str) -> torch.Tensor:
    """Video scores from per-step logits (Ng et al. Sec. 3.3, "LSTM Inference"). [B,T,C] -> log-scores [B,C]."""
    B, T, _ = step_logits.shape
    p = step_logits.softmax(-1)  # [B,T,C] per-frame predictions
    if mask is not None:
        p = p.masked_fill(~mask[:, :, None], 0.0)  # whatever padding holds (even NaN) never reaches a score
    if how == "last":
        s = last_valid(p, mask)
    elif how == "max":
        s = masked_max(p, mask)
    elif how in ("sum", "weighted"):
        lengths = _lengths(T, mask, B, p.device)
        g = gain_weights(lengths, T, "uniform" if how == "sum" else "linear")  # [B,T]
        s = (p * g[:, :, None]).sum(1) / g.sum(1, keepdim=True).clamp_min(1e-12)  # [B,C]
    else:
        raise UserError(f"unknown aggregate {how!r}; choose one of {AGGREGATES}")
    return s.clamp_min(1e-30).log()  # [B,C]


class PeepholeLSTM(nn.Module):
    """One LSTM layer of Ng et al. Eq. 3-7 (Graves): peephole weights W_ci, W_cf, W_co are diagonal."""

    def __init__(self, input_dim: int, hidden: int):
        super().__init__()
        self.hidden = hidden
        self.x2g = nn.Linear(input_dim, 4 * hidden)  # W_x{i,f,c,o} and the biases b_{i,f,c,o}
        self.h2g = nn.Linear(hidden, 4 * hidden, bias=False)  # W_h{i,f,c,o}
        self.peep = nn.Parameter(torch.zeros(3, hidden))  # w_ci, w_cf, w_co
        bound = hidden**-0.5
        for lin in (self.x2g, self.h2g):
            nn.init.uniform_(lin.weight, -bound, bound)
        nn.init.uniform_(self.x2g.bias, -bound, bound)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [B,T,I] -> [B,T,H]
        B, T, _ = x.shape
        gx = self.x2g(x)  # [B,T,4H], the input part of every gate at once
        h = x.new_zeros(B, self.hidden)
        c = x.new_zeros(B, self.hidden)
        w_ci, w_cf, w_co = self.peep
        out = []
        for t in range(T):
            gi, gf, gc, go = (gx[:, t] + self.h2g(h)).chunk(4, -1)  # [B,H] each
            i = torch.sigmoid(gi + w_ci * c)  # Eq. 3
            f = torch.sigmoid(gf + w_cf * c)  # Eq. 4
            c = f * c + i * torch.tanh(gc)  # Eq. 5
            o = torch.sigmoid(go + w_co * c)  # Eq. 6 (peeks at the new cell c_t)
            h = o * torch.tanh(c)  # Eq. 7
            out.append(h)
        return torch.stack(out, 1)  # [B,T,H]


@dataclass(frozen=True)
class DeepLSTMConfig:
    """Deep video LSTM (Ng et al. Sec. 3.2-3.3): stacked LSTMs, softmax per step, gain-weighted loss."""

    hidden: int = 512  # "five stacked LSTM layers, each with 512 memory cells"
    layers: int = 5
    peepholes: bool = True  # Eq. 3-6; False uses torch.nn.LSTM (no peepholes, much faster on GPU)
    dropout: float = 0.0  # between LSTM layers; the paper does not use any here
    aggregate: str = "weighted"  # last | max | sum | weighted; "weighted predictions usually resulted in the best"
    gain: str = "linear"  # linear | uniform | last (Sec. 3.3: linear learned faster and better)
    # recipe=paper (Ng et al. 2015, Sec. 3.3): same SGD as the max-pooling models (momentum 0.9, weight decay 0.0005) with learning rate
    # N x 1e-5 for N frames; N = 30 frames at 1 fps.
    frame_rate: ClassVar[tuple] = (1.0, 6.0, 30.0)  # Sec. 4: Sports-1M at 1 fps, UCF-101 at 6 / 30 fps (Table 6)
    train_defaults: ClassVar[dict] = {
        "optimizer": "sgd",
        "lr": 30 * 1e-5,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "frames": 30,
    }

    def __post_init__(self):
        if self.hidden < 1 or self.layers < 1:
            raise UserError("DeepLSTMConfig: hidden and layers must be >= 1")
        if self.aggregate not in AGGREGATES:
            raise UserError(f"DeepLSTMConfig: aggregate must be one of {AGGREGATES}, got {self.aggregate!r}")
        if self.gain not in GAINS:
            raise UserError(f"DeepLSTMConfig: gain must be one of {GAINS}, got {self.gain!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError("DeepLSTMConfig: dropout is a drop probability in [0, 1)")


class DeepLSTM(Head):
    scores_steps = True

    def __init__(self, cfg: DeepLSTMConfig, input_dim: int, num_classes: int):
        super().__init__()
        self.cfg = cfg
        if cfg.peepholes:
            dims = [input_dim] + [cfg.hidden] * cfg.layers
            self.lstm = nn.ModuleList(PeepholeLSTM(a, b) for a, b in itertools.pairwise(dims))
            self.drop = nn.Dropout(cfg.dropout)
        else:
            self.lstm = nn.LSTM(input_dim, cfg.hidden, cfg.layers, batch_first=True, dropout=cfg.dropout)
        self.classifier = nn.Linear(cfg.hidden, num_classes)  # shared across time steps (Fig. 4)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Top-layer hidden states [B,T,H]."""
        if isinstance(self.lstm, nn.LSTM):
            return self.lstm(x)[0]  # [B,T,D] -> [B,T,H]
        for i, layer in enumerate(self.lstm):
            x = layer(self.drop(x) if i else x)  # [B,T,*] -> [B,T,H]
        return x

    def step_logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.forward_features(x, mask))  # [B,T,H] -> [B,T,C]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return aggregate_steps(self.step_logits(x, mask), mask, self.cfg.aggregate)  # [B,C]

    def loss(self, x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """Per-frame cross-entropy weighted by the gain g (Sec. 3.3), normalised per video, mean over the batch."""
        logits = self.step_logits(x, mask)  # [B,T,C]
        B, T, C = logits.shape
        ce = F.cross_entropy(logits.reshape(B * T, C), y.repeat_interleave(T), reduction="none").view(B, T)
        g = gain_weights(_lengths(T, mask, B, x.device), T, self.cfg.gain).to(ce.dtype)  # [B,T]
        ce = torch.where(g > 0, ce, torch.zeros_like(ce))  # padded steps carry no loss, even if non-finite
        return ((ce * g).sum(1) / g.sum(1).clamp_min(1e-12)).mean()


@HEADS.register("deep-lstm", DeepLSTMConfig)
def build_deep_lstm(cfg: DeepLSTMConfig, input_dim: int, num_classes: int, stream_dims=()) -> DeepLSTM:
    """Ng et al. deep LSTM: 5 x 512 stacked LSTMs, a softmax per frame, gain-weighted loss, 4 aggregations."""
    return DeepLSTM(cfg, input_dim, num_classes)
