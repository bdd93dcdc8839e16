"""Proximal operator of the structural norms on the fusion layer (Wu et al., ACM MM 2015, Section 3.3).

The regularized fusion network adds, on the fusion-layer weights ``W^E`` in ``R^{P x D}`` (P fusion units,
D = the concatenated abstraction units of all streams; a torch ``nn.Linear(D, P).weight`` has exactly this
layout), the non-smooth term of Eq. 3::

    q(W) = lambda2 / 2 * ||W||_{2,1} + lambda3 * ||W||_{1,1},
    ||W||_{2,1} = sum_r ||W_r.||_2     (rows r = 1..P are the groups, as the paper defines them)
    ||W||_{1,1} = sum_r sum_j |w_rj|

and trains that layer by proximal gradient descent: ``W <- Prox_{eta q}(W - eta * grad p(W))`` (Algorithm 1).
The proximal operator has the closed form of Eq. 4 (the sparse-group-lasso prox): soft-threshold every
entry, then shrink every row towards zero::

    U_r. = sign(V_r.) * [|V_r.| - t1]_+
    W_r. = [1 - t21 / ||U_r.||_2]_+ * U_r.

For ``Prox_{eta q}`` the thresholds are ``t1 = eta * lambda3`` and ``t21 = eta * lambda2 / 2``. Two notes on
reading Eq. 4 against Eq. 3: the paper writes the row threshold as ``lambda2`` (its ``q`` carries
``lambda2 / 2``) and leaves the step size and the ``[.]_+`` on the row factor implicit; we follow the
objective of Eq. 3 exactly, so the operator below is the true minimiser of ``||W - V||^2 / 2 + eta * q(V)``
(tests/test_wu.py checks this against a numerical minimisation).

Pure tensor code: accepts torch tensors or numpy arrays and returns the same kind.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["l11_norm", "l21_norm", "prox_fusion_layer", "prox_l21_l11", "structural_penalty", "zero_rows"]


def _as_tensor(w):
    return (torch.from_numpy(np.asarray(w, dtype=np.float64)), True) if not torch.is_tensor(w) else (w, False)


def l21_norm(w) -> float:
    """||W||_{2,1}: the sum over rows of each row's l2 norm."""
    t, _ = _as_tensor(w)
    return float(t.norm(dim=1).sum())


def l11_norm(w) -> float:
    """||W||_{1,1}: the sum of absolute values."""
    t, _ = _as_tensor(w)
    return float(t.abs().sum())


def structural_penalty(w, lambda2: float, lambda3: float) -> float:
    """q(W) = lambda2/2 ||W||_{2,1} + lambda3 ||W||_{1,1} (the non-smooth part of Eq. 3)."""
    return lambda2 / 2 * l21_norm(w) + lambda3 * l11_norm(w)


def prox_l21_l11(v, t21: float, t1: float):
    """argmin_W ||W - V||^2 / 2 + t21 ||W||_{2,1} + t1 ||W||_{1,1}, rows as groups (Eq. 4).

    v: [P, D]. Returns an array of the same kind, shape and dtype.
    """
    if t21 < 0 or t1 < 0:
        raise ValueError("proximal thresholds must be non-negative")
    t, was_numpy = _as_tensor(v)
    if t.dim() != 2:
        raise ValueError(f"expected a [P, D] weight matrix, got shape {tuple(t.shape)}")
    u = torch.sign(t) * (t.abs() - t1).clamp_min(0)  # element-wise soft threshold (l1 part)
    norms = u.norm(dim=1, keepdim=True)  # [P, 1]
    # Row shrinkage (l21 part); a row whose norm is below t21 goes to zero as a whole.
    scale = (1 - t21 / norms.clamp_min(torch.finfo(t.dtype).tiny)).clamp_min(0)
    out = scale * u
    return out.numpy() if was_numpy else out


def prox_fusion_layer(w, lr: float, lambda2: float, lambda3: float):
    """Prox of ``lr * q`` for q of Eq. 3: the step of Algorithm 1 line 7 after a gradient step of size ``lr``."""
    return prox_l21_l11(w, t21=lr * lambda2 / 2, t1=lr * lambda3)


def zero_rows(w, atol: float = 0.0) -> int:
    """How many rows of W are entirely zero (fusion units that no stream uses)."""
    t, _ = _as_tensor(w)
    return int((t.abs().amax(dim=1) <= atol).sum())
