"""Regularized feature fusion network and its neural-network baselines (Wu et al., "Modeling Spatial-Temporal
Clues in a Hybrid Deep Learning Framework for Video Classification", ACM MM 2015).

``fusion-net`` (Section 3.3, Eq. 1-4, Algorithm 1; sizes from Section 4.1.2): the input is the video-level
feature of each stream (average pooling of its frame features), a per-stream abstraction layer of 200 units,
a fusion layer of 200 units over the concatenated abstractions, and a logistic-regression output layer::

    x_s [B, d_s] --Linear+sigmoid--> h_s [B, 200]          (one abstraction layer per stream)
    [h_1, ..., h_S] [B, 200 S] --W^E, sigmoid--> f [B, 200]  (the fusion layer E, W^E = [W^E_1, ..., W^E_S])
    f --Linear--> z [B, C], scores sigmoid(z)                (logistic regression)

trained on the squared loss of Eq. 1 plus lambda1 * Phi(W) (an l2 penalty on all weight matrices) by gradient
steps (Eq. 5), and on the fusion layer additionally ``lambda2/2 ||W^E||_{2,1} + lambda3 ||W^E||_{1,1}``
(Eq. 3), applied by the closed-form proximal operator of Eq. 4 after every gradient step (``after_step``).
``--set lambda2=0 lambda3=0`` is the paper's "non-regularized fusion network". Any number of streams works.

``nn-ef`` and ``nn-lf`` (Section 4.1.3): early fusion (one network on the concatenated features) and late fusion
(one network per stream, output scores averaged), with the same depth and widths and the same loss.

Choices the paper leaves open, made here: sigmoid hidden units (Section 3.3 names the sigmoid as the source of
non-convexity); the squared loss is halved and averaged over the mini-batch (with a sum over N videos, lr 0.7
would diverge); Phi(W) = ||W||_F^2 / 2 over weights, not biases; each stream's pooled vector is rescaled to unit
RMS (``normalize``) so that sigmoid units do not saturate on raw FC activations; Glorot initialisation with
the sigmoid gain of 4. The loss is not the trainer's cross-entropy: ``loss`` is overridden, and lambda1 lives in
it, so the trainer must use weight_decay 0 (as ``train_defaults`` says).

Training recipes. ``recipe=paper`` is Section 4.1.2's plain gradient descent at lr 0.7. The fusion layer's update
(Algorithm 1, line 7: a gradient step on the smooth part, then the proximal operator of Eq. 4 with the same step
size) is a proximal-gradient step only when the gradient step is plain SGD: with momentum, Adam's per-coordinate
scaling or decoupled weight decay the prox would be taken with the wrong step and the iterates would no longer
minimise Eq. 3. So the default ``recipe=converge`` keeps plain SGD (momentum 0, weight decay 0, the paper's lr 0.7)
for all three networks, with the shared schedule, step minimum and early stopping of every head but 100 epochs
(plain SGD needs more passes than AdamW), and a regularized fusion network refuses another optimiser in one line
(``FusionNetConfig.check_train``). ``nn-ef`` / ``nn-lf`` use the same SGD so that Table 2's comparison differs only
in the architecture.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from pipeline.errors import UserError
from pipeline.heads.base import Head, masked_mean
from pipeline.prox import prox_fusion_layer
from pipeline.registry import HEADS

__all__ = ["EarlyFusionNet", "FusionMLPConfig", "FusionNet", "FusionNetConfig", "LateFusionNet"]

# recipe=paper: Section 4.1.2 gives lr 0.7 and lambda1 3e-5. Plain gradient steps (Eq. 5: W <- W - eta G), so no
# momentum. The paper gives neither batch size nor epochs: 100 videos a batch and 100 epochs are our choice.
_TRAIN_DEFAULTS = {"optimizer": "sgd", "lr": 0.7, "weight_decay": 0.0, "momentum": 0.0, "epochs": 100,
                   "batch_size": 100}
# recipe=converge: the shared schedule, patience and step minimum, but plain SGD at the paper's rate (module
# docstring) and 100 epochs: plain SGD needs more passes than the AdamW of other heads. At UCF101 size (bench/fusion.py)
# the network without the norms reached 76.8% in the shared 30 epochs and 84.9% in 100 (the paper recipe: 84.6%).
_CONVERGE = {"optimizer": "sgd", "lr": 0.7, "momentum": 0.0, "weight_decay": 0.0, "epochs": 100}


def _pool_streams(x: torch.Tensor, mask: torch.Tensor | None, stream_dims, normalize: bool) -> list[torch.Tensor]:
    """[B, T, D] -> one [B, d_s] video-level vector per stream (masked mean over time, Section 3.3)."""
    v = masked_mean(x, mask)  # [B, D]
    parts = list(torch.split(v, list(stream_dims), dim=-1))  # S x [B, d_s]
    if normalize:
        parts = [p * torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + 1e-12) for p in parts]
    return parts


def _mlp(dims: list[int]) -> nn.Sequential:
    """Linear + sigmoid layers through ``dims`` (hidden layers of Wu et al.'s networks)."""
    layers = []
    for a, b in itertools.pairwise(dims):
        layers += [nn.Linear(a, b), nn.Sigmoid()]
    return nn.Sequential(*layers)


class _SquaredLossHead(Head):
    """Eq. 1: ||g(x) - y||^2 on the logistic outputs, plus lambda1 * Phi(W) on every weight matrix."""

    lambda1: float

    def _init_weights(self) -> None:
        """Glorot-uniform with gain 4, the sigmoid-unit initialisation of Glorot & Bengio (2010); PyTorch's
        default is several times smaller and leaves these sigmoid / squared-loss networks on a long plateau."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight, gain=4.0)
                nn.init.zeros_(m.bias)

    def loss(self, x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        probs = torch.sigmoid(self(x, mask))  # [B, C]
        target = nn.functional.one_hot(y, probs.shape[-1]).to(probs.dtype)  # [B, C]
        data = 0.5 * (probs - target).pow(2).sum(-1).mean()
        l2 = sum(m.weight.pow(2).sum() for m in self.modules() if isinstance(m, nn.Linear))
        return data + self.lambda1 / 2 * l2


class FusionNet(_SquaredLossHead):
    """Regularized feature fusion network (Wu et al. 2015, Section 3.3, Figure 1 middle)."""

    def __init__(self, stream_dims, num_classes: int, hidden: int = 200, fusion: int = 200,
                 lambda1: float = 3e-5, lambda2: float = 3e-5, lambda3: float = 3e-5, normalize: bool = True):
        super().__init__()
        self.stream_dims = tuple(stream_dims)
        self.lambda1, self.lambda2, self.lambda3, self.normalize = lambda1, lambda2, lambda3, normalize
        self.abstract = nn.ModuleList(_mlp([d, hidden]) for d in self.stream_dims)
        self.fusion = nn.Linear(hidden * len(self.stream_dims), fusion)  # W^E: [P, D] = [fusion, hidden * S]
        self.classifier = nn.Linear(fusion, num_classes)
        self._init_weights()

    def forward_features(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        parts = _pool_streams(x, mask, self.stream_dims, self.normalize)
        h = torch.cat([f(p) for f, p in zip(self.abstract, parts)], dim=-1)  # [B, hidden * S]
        return torch.sigmoid(self.fusion(h))  # [B, fusion]

    def forward_head(self, f: torch.Tensor) -> torch.Tensor:
        return self.classifier(f)  # [B, C]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.forward_head(self.forward_features(x, mask))

    @property
    def proximal(self) -> bool:
        """True when after_step applies the prox (the trainer then insists on plain SGD)."""
        return self.lambda2 > 0 or self.lambda3 > 0

    @torch.no_grad()
    def after_step(self, lr: float) -> None:
        """Algorithm 1, line 7: W^E <- Prox_{lr q}(W^E) right after the gradient step of size lr (Eq. 4)."""
        if self.lambda2 > 0 or self.lambda3 > 0:
            w = self.fusion.weight
            w.copy_(prox_fusion_layer(w, lr, self.lambda2, self.lambda3))


class EarlyFusionNet(_SquaredLossHead):
    """NN-EF: one network on the concatenated video-level features (Wu et al. 2015, Section 4.1.3 (7))."""

    def __init__(self, stream_dims, num_classes: int, hidden: int = 200, fusion: int = 200,
                 lambda1: float = 3e-5, normalize: bool = True):
        super().__init__()
        self.stream_dims, self.lambda1, self.normalize = tuple(stream_dims), lambda1, normalize
        self.body = _mlp([sum(self.stream_dims), hidden, fusion])
        self.classifier = nn.Linear(fusion, num_classes)
        self._init_weights()

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        v = torch.cat(_pool_streams(x, mask, self.stream_dims, self.normalize), dim=-1)  # [B, D]
        return self.classifier(self.body(v))  # [B, C]


class LateFusionNet(_SquaredLossHead):
    """NN-LF: one network per stream, output scores averaged (Wu et al. 2015, Section 4.1.3 (8)).

    The networks share no parameters, so minimising the sum of their losses trains each one on its own.
    """

    def __init__(self, stream_dims, num_classes: int, hidden: int = 200, fusion: int = 200,
                 lambda1: float = 3e-5, normalize: bool = True):
        super().__init__()
        self.stream_dims, self.lambda1, self.normalize = tuple(stream_dims), lambda1, normalize
        self.nets = nn.ModuleList(nn.Sequential(_mlp([d, hidden, fusion]), nn.Linear(fusion, num_classes))
                                  for d in self.stream_dims)
        self._init_weights()

    def stream_logits(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        return [net(p) for net, p in zip(self.nets, _pool_streams(x, mask, self.stream_dims, self.normalize))]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        probs = torch.stack([torch.sigmoid(z) for z in self.stream_logits(x, mask)]).mean(0)  # [B, C]
        return torch.logit(probs, eps=1e-7)  # log-odds of the averaged scores

    def loss(self, x: torch.Tensor, mask: torch.Tensor | None, y: torch.Tensor) -> torch.Tensor:
        total = 0.0
        for z in self.stream_logits(x, mask):
            target = nn.functional.one_hot(y, z.shape[-1]).to(z.dtype)  # [B, C]
            total = total + 0.5 * (torch.sigmoid(z) - target).pow(2).sum(-1).mean()
        l2 = sum(m.weight.pow(2).sum() for m in self.modules() if isinstance(m, nn.Linear))
        return total + self.lambda1 / 2 * l2


# --- registry ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FusionNetConfig:
    """Regularized fusion network (Wu et al. 2015, Section 3.3); lambda2 = lambda3 = 0 is the non-regularized one."""

    hidden: int = 200  # abstraction units per stream (Section 4.1.2)
    fusion: int = 200  # fusion-layer units P
    lambda1: float = 3e-5  # l2 on the weights (Section 4.1.2)
    lambda2: float = 3e-5  # l21 on W^E; the paper tunes it "in the same range as lambda1" by cross-validation
    lambda3: float = 3e-5  # l11 on W^E; likewise
    normalize: bool = True  # unit-RMS video vector per stream (our choice, see the module docstring)
    train_defaults: ClassVar[dict] = _TRAIN_DEFAULTS
    converge_defaults: ClassVar[dict] = _CONVERGE

    def check_train(self, train) -> None:
        """Algorithm 1's proximal step needs a plain gradient step before it (module docstring)."""
        if (self.lambda2 > 0 or self.lambda3 > 0) and not (
                train.optimizer == "sgd" and train.momentum == 0 and train.weight_decay == 0):
            raise UserError("fusion-net: the l21/l11 proximal updates (Wu et al. Algorithm 1) are valid only after "
                            "plain SGD steps: use optimizer=sgd momentum=0 weight_decay=0, or lambda2=0 lambda3=0 "
                            f"(got optimizer={train.optimizer} momentum={train.momentum:g} "
                            f"weight_decay={train.weight_decay:g})")


@dataclass(frozen=True)
class FusionMLPConfig:
    """NN-EF / NN-LF baselines (Wu et al. 2015, Section 4.1.3), same widths and loss as the fusion network."""

    hidden: int = 200
    fusion: int = 200
    lambda1: float = 3e-5
    normalize: bool = True
    train_defaults: ClassVar[dict] = _TRAIN_DEFAULTS
    converge_defaults: ClassVar[dict] = _CONVERGE


@HEADS.register("fusion-net", FusionNetConfig)
def build_fusion_net(cfg: FusionNetConfig, input_dim: int, num_classes: int, stream_dims) -> FusionNet:
    """Regularized feature fusion network with l21 + l11 on the fusion layer (Wu et al. 2015, Eq. 3-4)."""
    return FusionNet(stream_dims or (input_dim,), num_classes, cfg.hidden, cfg.fusion,
                     cfg.lambda1, cfg.lambda2, cfg.lambda3, cfg.normalize)


@HEADS.register("nn-ef", FusionMLPConfig)
def build_nn_ef(cfg: FusionMLPConfig, input_dim: int, num_classes: int, stream_dims) -> EarlyFusionNet:
    """NN early fusion: one network on concatenated video-level features (Wu et al. 2015, Section 4.1.3)."""
    return EarlyFusionNet(stream_dims or (input_dim,), num_classes, cfg.hidden, cfg.fusion, cfg.lambda1, cfg.normalize)


@HEADS.register("nn-lf", FusionMLPConfig)
def build_nn_lf(cfg: FusionMLPConfig, input_dim: int, num_classes: int, stream_dims) -> LateFusionNet:
    """NN late fusion: one network per stream, scores averaged (Wu et al. 2015, Section 4.1.3)."""
    return LateFusionNet(stream_dims or (input_dim,), num_classes, cfg.hidden, cfg.fusion, cfg.lambda1, cfg.normalize)
