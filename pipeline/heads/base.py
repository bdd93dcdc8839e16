"""The interface every torch head shares.

A head maps cached per-frame features ``x: [B, T, D]`` and a validity mask ``mask: [B, T]`` (True where a
frame is real; None means all real) to class scores ``[B, C]``. ``D`` is the per-frame concatenation of the
streams the head sees, in the order of ``stream_dims`` (e.g. ``(1280, 1280)`` for rgb then flow), so a head
that keeps streams apart splits ``x`` with ``torch.split(x, stream_dims, dim=-1)``.

Builders registered in ``pipeline.registry.HEADS`` have the signature
``build(cfg, input_dim: int, num_classes: int, stream_dims: tuple[int, ...]) -> Head``.
A config dataclass may carry ``train_defaults: ClassVar[dict]`` with the paper's optimiser settings (the
``recipe=paper`` of ``pipeline.training``; keys of ``TrainConfig``: optimizer, lr, weight_decay, momentum, epochs,
batch_size, frames) and, only where the paper's algorithm needs it, ``converge_defaults`` that the shared default
``recipe=converge`` applies on top of its own values (e.g. plain SGD for proximal updates).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Head(nn.Module):
    #: True for heads that score every time step (``step_logits``), e.g. LSTMs with a softmax per step.
    scores_steps: bool = False

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # [B,T,D] -> [B,C]
        raise NotImplementedError

    def step_logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:  # -> [B,T,C]
        raise NotImplementedError(f"{type(self).__name__} does not score time steps")

    def loss(self, x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        """Training loss for a batch of class indices ``y`` [B]; cross-entropy on video scores unless the paper says
        otherwise. Multi-label targets [B, C] do not come here: the trainer (``pipeline.training.batch_loss``) takes
        binary cross-entropy of a sigmoid per class on ``forward``'s scores for every head."""
        return F.cross_entropy(self(x, mask), y)

    def after_step(self, lr: float) -> None:
        """Called by the trainer after each optimiser step (proximal updates, Wu et al. Algorithm 1)."""


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """Mean over ``dim`` counting only valid steps. x: [B,T,...], mask: [B,T]."""
    if mask is None:
        return x.mean(dim)
    m = mask.to(x.dtype).reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return (x * m).sum(dim) / m.sum(dim).clamp_min(1)


def masked_max(x: torch.Tensor, mask: torch.Tensor | None, dim: int = 1) -> torch.Tensor:
    """Max over ``dim`` ignoring padded steps. x: [B,T,...], mask: [B,T]."""
    if mask is None:
        return x.amax(dim)
    m = mask.reshape(mask.shape + (1,) * (x.dim() - mask.dim()))
    return x.masked_fill(~m, torch.finfo(x.dtype).min).amax(dim)


def last_valid(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """x[b, last valid t] for each b. x: [B,T,...] -> [B,...]."""
    if mask is None:
        return x[:, -1]
    idx = (mask.long().sum(1) - 1).clamp_min(0)
    return x[torch.arange(x.shape[0], device=x.device), idx]
