"""Vanilla LSTM and Temporal Segment LSTM (Ma et al. 2017, "TS-LSTM and Temporal-Inception", Sec. 3.2, 4.2,
Tables 3 and 7).

Vanilla LSTM ("ConvNet + LSTM", "Batch Normalization + LSTM" in Table 7): an LSTM (or a stack of LSTMs)
reads every frame's two-stream feature; the last valid step's hidden state is classified:

    x [B,T,D] -> (BN) -> LSTM-h1 -> ... -> LSTM-hk -> h at the last valid frame [B,hk] -> (BN) -> FC-C

TS-LSTM (Fig. 2): frames are divided into temporal segments, each segment is max-pooled, and the LSTM
reads the sequence of pooled segment vectors:

    x [B,T,D] -> BN -> (FC) -> max per segment [B,S,D'] -> LSTM-512 over S steps -> h_S [B,512] -> BN -> FC-C

Padding: the vanilla LSTM runs on a packed sequence, so padding frames never reach the recurrence; the TS-LSTM
pools over each video's valid frames (``segment_pool``), so its LSTM always sees exactly ``segments`` steps.
Both use ``FrameBatchNorm`` (statistics from valid frames only).

Faithfulness notes. The authors' code uses the ``rnn`` package's ``nn.LSTM`` (peephole connections) with
uniform(-0.1, 0.1) initialisation and gradient clipping at 5; the paper specifies none of these and we use
PyTorch's ``nn.LSTM`` (no peepholes) with its default initialisation. Gradient clipping belongs to the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from pipeline.heads.base import Head, masked_mean
from pipeline.heads.temporal_pool import FrameBatchNorm, segment_pool
from pipeline.registry import HEADS

__all__ = ["LSTMConfig", "LSTMHead", "LSTMStack", "TSLSTMConfig", "TSLSTMHead"]

# recipe=paper (Ma et al. 2017, Sec. 3.4.1): "The learning rate is set to 5e-5 for training Temporal Segment LSTM" (Adam). Epochs and batch
# size are the authors' RNN code defaults (maxEpoch 100, batchSize 64); 25 equally spaced frames (Sec. 3.4.1).
_LSTM_TRAIN = {"optimizer": "adam", "lr": 5e-5, "weight_decay": 0.0, "epochs": 100, "batch_size": 64, "frames": 25}


class LSTMStack(nn.Module):
    """Stacked single-layer LSTMs whose widths may differ (Table 7's "(1024, 512)").

    ``forward(x [B,T,D], mask) -> (outputs [B,T,H_last] zero at padding, last valid output [B,H_last])``.
    With a mask the sequence is packed, so an output never depends on padding frames.
    """

    def __init__(self, input_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        dims = (input_dim,) + tuple(hidden)
        self.layers = nn.ModuleList(nn.LSTM(dims[i], dims[i + 1], batch_first=True) for i in range(len(hidden)))
        self.out_dim = dims[-1]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        T = x.shape[1]
        if mask is None:
            for lstm in self.layers:
                x, (h, _) = lstm(x)  # [B,T,H]
            return x, h[-1]
        lengths = mask.long().sum(1).clamp_min(1).cpu()
        seq = pack_padded_sequence(x, lengths, batch_first=True, enforce_sorted=False)
        for lstm in self.layers:
            seq, (h, _) = lstm(seq)  # h is returned in the batch's original order
        out, _ = pad_packed_sequence(seq, batch_first=True, total_length=T)  # [B,T,H]
        return out, h[-1]


@dataclass(frozen=True)
class LSTMConfig:
    """Vanilla LSTM over all frames, Ma et al. Table 7 ("ConvNet + LSTM", "Batch Normalization + LSTM";
    Table 3 rows 1-3).

    Rows as settings (``--set``):
      ``bn=false``                 -> "1 LSTM-512 FC-101" (87.0); ``hidden=1024`` (86.2), ``hidden=2048`` (85.8)
      defaults                     -> "1 BN LSTM-512 BN FC-101" (92.8); ``hidden=1024`` (91.2), ``hidden=2048`` (91.8)
      ``hidden=512,512``           -> "1 BN LSTM-(512, 512) BN FC-101" (92.6); ``hidden=1024,512`` (91.9)
      ``hidden=512,512,512``       -> "1 BN LSTM-(512,512,512) BN FC-101" (92.1)
      ``average_steps=true``       -> average the per-frame predictions (Sec. 3.4.1 "Testing": helps LSTMs
                                      without segments, not used for the table)
    """

    hidden: tuple[int, ...] = (512,)
    bn: bool = True  # BN on the input frames and on the LSTM output
    dropout: float = 0.0
    average_steps: bool = False
    train_defaults: ClassVar[dict] = _LSTM_TRAIN


class LSTMHead(Head):
    scores_steps = True

    def __init__(self, cfg: LSTMConfig, input_dim: int, num_classes: int):
        super().__init__()
        if not cfg.hidden:
            raise ValueError("lstm: hidden must name at least one LSTM width")
        self.cfg = cfg
        self.bn_in = FrameBatchNorm(input_dim) if cfg.bn else None
        self.lstm = LSTMStack(input_dim, cfg.hidden)
        self.bn_out = FrameBatchNorm(self.lstm.out_dim) if cfg.bn else None
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(self.lstm.out_dim, num_classes)

    def _run(self, x, mask):
        if self.bn_in is not None:
            x = self.bn_in(x, mask)
        return self.lstm(x, mask)  # ([B,T,H], [B,H])

    def step_logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        out, _ = self._run(x, mask)  # [B,T,H]
        if self.bn_out is not None:
            out = self.bn_out(out, mask)
        return self.classifier(self.drop(out))  # [B,T,C]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.cfg.average_steps:
            p = masked_mean(F.softmax(self.step_logits(x, mask), -1), mask)  # [B,C]
            return p.clamp_min(1e-12).log()
        _, last = self._run(x, mask)  # [B,H] at each video's last valid frame
        if self.bn_out is not None:
            last = self.bn_out(last[:, None])[:, 0]  # one "frame" per video
        return self.classifier(self.drop(last))  # [B,C]


@dataclass(frozen=True)
class TSLSTMConfig:
    """Temporal Segment LSTM, Ma et al. Sec. 3.2, Fig. 2, Table 7 ("Temporal Segment + Max + (stacked) LSTM";
    Table 3 rows 7-9).

    Rows as settings (``--set``):
      defaults                         -> "3 BN Max + 512 BN FC-101" (94.3, the paper's TS-LSTM)
      ``hidden=1024`` / ``hidden=2048``  -> "3 BN Max + 1024 / 2048 BN FC-101" (94.0 / 94.1)
      ``segments=5``                   -> "5 BN Max + 512 BN FC-101" (94.2); with 1024 / 2048 (94.1 / 94.2)
      ``hidden=512,512``               -> "3 BN Max + (512, 512) BN FC-101" (94.2); ``hidden=1024,512`` (94.1)
      ``hidden=512,512,512``           -> "3 BN Max + (512, 512, 512) BN FC-101" (93.9); ``segments=5`` variants
      ``fc=512``                       -> adds the FC-512 before pooling (Table 7's "BN 512 Max" integration)
    """

    segments: int = 3
    pool: str = "max"  # "max" | "mean" (Sec. 3.2: "mean performed similarly with max pooling")
    bn_in: bool = True
    fc: int = 0  # linear layer before pooling (0: none)
    hidden: tuple[int, ...] = (512,)
    bn_out: bool = True
    dropout: float = 0.0
    choices: ClassVar[dict] = {"pool": ("max", "mean")}  # checked with the generic ranges (registry.check_config)
    train_defaults: ClassVar[dict] = _LSTM_TRAIN


class TSLSTMHead(Head):
    def __init__(self, cfg: TSLSTMConfig, input_dim: int, num_classes: int):
        super().__init__()
        if cfg.segments < 1 or not cfg.hidden:
            raise ValueError("ts-lstm: segments must be >= 1 and hidden must name at least one LSTM width")
        self.cfg = cfg
        self.bn_in = FrameBatchNorm(input_dim) if cfg.bn_in else None
        self.fc = nn.Linear(input_dim, cfg.fc) if cfg.fc else None
        self.lstm = LSTMStack(cfg.fc or input_dim, cfg.hidden)
        self.bn_out = nn.BatchNorm1d(self.lstm.out_dim) if cfg.bn_out else nn.Identity()
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(self.lstm.out_dim, num_classes)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if self.bn_in is not None:
            x = self.bn_in(x, mask)
        if self.fc is not None:
            x = self.fc(x)  # [B,T,D] -> [B,T,fc]
        z = segment_pool(x, mask, self.cfg.segments, self.cfg.pool)  # [B,S,D']
        _, last = self.lstm(z)  # every video has exactly S segment steps: [B,H]
        return self.bn_out(last)

    def forward_head(self, z: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.drop(z))  # [B,C]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, mask))


@HEADS.register("lstm", LSTMConfig)
def build_lstm(cfg: LSTMConfig, input_dim: int, num_classes: int, stream_dims: tuple[int, ...] = ()) -> LSTMHead:
    """Vanilla LSTM over all frames, with or without BN (Ma et al. 2017, Table 7)."""
    return LSTMHead(cfg, input_dim, num_classes)


@HEADS.register("ts-lstm", TSLSTMConfig)
def build_ts_lstm(cfg: TSLSTMConfig, input_dim: int, num_classes: int,
                  stream_dims: tuple[int, ...] = ()) -> TSLSTMHead:
    """TS-LSTM: BN, 3 segments, max pooling, LSTM-512, BN, FC (Ma et al. 2017, Sec. 3.2, Table 7)."""
    return TSLSTMHead(cfg, input_dim, num_classes)
