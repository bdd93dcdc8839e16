"""A small temporal Transformer encoder over the frame features.

Self-attention over the frames of a video (Vaswani et al. 2017, "Attention Is All You Need", Sec. 3.1-3.5), read
out through a class token (Devlin et al. 2019, BERT, Sec. 3; Dosovitskiy et al. 2021, ViT, Sec. 3.1) as the Video
Transformer Network does over per-frame CNN features (Neimark et al. 2021, "Video Transformer Network", Sec. 3)::

    x [B,T,D] -> LayerNorm -> Linear D -> d_model -> + position p_t -> [CLS; frames] [B,1+T,d_model] -> dropout
              -> layers x (pre-norm block: x + MHSA(LN(x)); x + FFN(LN(x)))  -> LayerNorm
              -> the CLS output (or the mean of the frame outputs, ``pool=mean``) [B,d_model] -> dropout -> FC-C

Pre-norm (the LayerNorm inside each residual branch; Xiong et al. 2020, "On Layer Normalization in the
Transformer Architecture", Sec. 3) trains without the learning-rate warm-up the post-norm original needs, so
the shared ``converge`` recipe serves it as it serves the other heads. Positions are sinusoidal by default (Vaswani
et al. Sec. 3.5) or learned (BERT, ViT); ``positions=none`` makes the encoder a function of the set of frames. Fixed
positions need no data to be learned from: on the demo (48 training videos) the encoder with learned positions
memorised the training set before its positions told the two order classes apart (order classes at chance), while
with sinusoidal ones it separated them (every order-class test video right).

Size: the defaults (d_model 256, 2 layers, 4 heads, FFN 512) hold about 1.7M parameters on 2 x 1280 input
features, so a UCF101-sized store trains on a CPU.

Padding: padded frames are left out as keys (``src_key_padding_mask``), so no valid frame or the class token
attends to them; LayerNorm, the projection and positions act on each frame alone; ``pool=mean`` averages valid
frames only. Appending padding frames changes no output.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.heads.attention_pool import POSITIONS, PositionalEncoding
from pipeline.heads.base import Head, masked_mean
from pipeline.registry import HEADS

__all__ = ["TransformerConfig", "TransformerHead"]


@dataclass(frozen=True)
class TransformerConfig:
    """Temporal Transformer encoder with a class token (Vaswani et al. 2017; Neimark et al. 2021, Sec. 3).

    Settings (``--set``):
      ``d_model=256 layers=2 heads=4 ff=512`` -> width, depth, attention heads, feed-forward width
      ``positions=sinusoidal``                -> Vaswani et al. Sec. 3.5; ``learned`` or ``none`` (order-blind)
      ``max_frames=64``                       -> rows of the learned position table
      ``pool=cls``                            -> read out the class token; ``mean``: average the frame outputs
      ``dropout=0.1``                         -> inside every block (attention, FFN, residuals; Vaswani et al.
                                                 Sec. 5.4) and before the classifier
    """

    d_model: int = 256
    layers: int = 2
    heads: int = 4
    ff: int = 512
    positions: str = "sinusoidal"
    max_frames: int = 64
    pool: str = "cls"
    dropout: float = 0.1
    choices: ClassVar[dict] = {"positions": POSITIONS, "pool": ("cls", "mean")}

    def __post_init__(self):
        if self.heads >= 1 and self.d_model % self.heads:
            raise UserError(f"transformer: d_model={self.d_model} must be a multiple of heads={self.heads}")


class TransformerHead(Head):
    def __init__(self, cfg: TransformerConfig, input_dim: int, num_classes: int):
        super().__init__()
        self.cfg = cfg
        self.norm_in = nn.LayerNorm(input_dim)
        self.proj = nn.Linear(input_dim, cfg.d_model)
        self.pos = PositionalEncoding(cfg.positions, cfg.d_model, cfg.max_frames)
        self.cls = nn.Parameter(torch.randn(1, 1, cfg.d_model) * 0.02) if cfg.pool == "cls" else None
        self.drop_in = nn.Dropout(cfg.dropout)
        layer = nn.TransformerEncoderLayer(cfg.d_model, cfg.heads, cfg.ff, cfg.dropout, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, cfg.layers, enable_nested_tensor=False)
        self.norm_out = nn.LayerNorm(cfg.d_model)  # pre-norm blocks leave the residual stream unnormalised
        self.drop = nn.Dropout(cfg.dropout)
        self.classifier = nn.Linear(cfg.d_model, num_classes)

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        B = x.shape[0]
        h = self.pos(self.proj(self.norm_in(x)))  # [B,T,d]
        if mask is not None:
            h = h.masked_fill(~mask[..., None], 0.0)  # padding never carries junk into any sum
        pad = None if mask is None else ~mask  # True where a key is ignored
        if self.cls is not None:
            h = torch.cat([self.cls.expand(B, -1, -1).to(h.dtype), h], 1)  # [B,1+T,d]
            if pad is not None:
                pad = torch.cat([pad.new_zeros(B, 1), pad], 1)
        h = self.norm_out(self.encoder(self.drop_in(h), src_key_padding_mask=pad))
        if self.cls is not None:
            return h[:, 0]  # [B,d]
        return masked_mean(h, mask)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.classifier(self.drop(self.forward_features(x, mask)))  # [B,C]


@HEADS.register("transformer", TransformerConfig)
def build_transformer(cfg: TransformerConfig, input_dim: int, num_classes: int,
                      stream_dims: tuple[int, ...] = ()) -> TransformerHead:
    """Temporal Transformer: class token, sinusoidal positions, 2 pre-norm layers of 256 (Vaswani et al. 2017; Neimark et al. 2021)."""
    return TransformerHead(cfg, input_dim, num_classes)
