"""Batched Brox et al. optical flow in PyTorch.

Brox, Bruhn, Papenberg & Weickert, "High Accuracy Optical Flow Estimation Based on a Theory for Warping",
ECCV 2004: energy (Eq. 5-6)

    E(u, v) = integral  Psi(|I1(x + w) - I0(x)|^2 + gamma |grad I1(x + w) - grad I0(x)|^2)
                      + alpha Psi(|grad u|^2 + |grad v|^2),      Psi(s^2) = sqrt(s^2 + eps^2), eps = 0.001

minimised coarse to fine (downsampling factor ``scale``, one warp per level, at most ``outer_iterations``
levels) with the two nested fixed-point loops of Sec. 3: the outer warping loop linearises the data term around
the current flow (Eq. 10-11), the ``inner_iterations`` loop lags the nonlinear Psi' factors, and each lagged
linear system is solved by ``solver_iterations`` red-black SOR sweeps. Defaults are those of dense_flow's Brox
(OpenCV CUDA ``BroxOpticalFlow``): alpha .197, gamma 50, scale .8, inner 10, outer 77, solver 10, on intensities in
[0, 1]. Every iteration count is fixed, so each pair's result is independent of its batch mates.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["BroxConfig", "brox"]


@dataclass(frozen=True)
class BroxConfig:
    """Parameters of :func:`brox`; defaults of dense_flow / OpenCV CUDA ``BroxOpticalFlow``."""

    alpha: float = 0.197  # smoothness weight
    gamma: float = 50.0  # gradient-constancy weight
    scale: float = 0.8  # pyramid scale factor
    inner_iterations: int = 10  # lagged-nonlinearity fixed-point iterations per level
    outer_iterations: int = 77  # pyramid levels (one warp each), capped by min_size
    solver_iterations: int = 10  # red-black SOR sweeps per linear system
    omega: float = 1.8  # SOR relaxation
    epsilon: float = 0.001  # Psi's regulariser
    min_size: int = 10  # coarsest level's shorter side, in pixels

    def to_dict(self) -> dict:
        return asdict(self)


def _dx(f: torch.Tensor) -> torch.Tensor:
    """Central x-derivative with replicated borders: [N,C,H,W] -> same."""
    p = F.pad(f, (1, 1, 0, 0), mode="replicate")
    return 0.5 * (p[..., 2:] - p[..., :-2])


def _dy(f: torch.Tensor) -> torch.Tensor:
    p = F.pad(f, (0, 0, 1, 1), mode="replicate")
    return 0.5 * (p[..., 2:, :] - p[..., :-2, :])


def _psi_prime(s2: torch.Tensor, eps: float) -> torch.Tensor:
    """Psi'(s^2) for Psi(s^2) = sqrt(s^2 + eps^2) (Brox Eq. 4): the robust (Charbonnier / TV-like) weight."""
    return 0.5 * torch.rsqrt(s2 + eps * eps)


def _shift(f: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    """f at (y+dy, x+dx) with replicated borders, for neighbour sums (weights are 0 across the border)."""
    h, w = f.shape[-2:]
    p = F.pad(f, (1, 1, 1, 1), mode="replicate")
    return p[..., 1 + dy:1 + dy + h, 1 + dx:1 + dx + w]


def _neighbour_sum(f: torch.Tensor, weights) -> torch.Tensor:
    """sum_j w_ij f_j over the 4-neighbourhood; ``weights`` = (east, west, south, north)."""
    we, ww, ws, wn = weights
    return we * _shift(f, 0, 1) + ww * _shift(f, 0, -1) + ws * _shift(f, 1, 0) + wn * _shift(f, -1, 0)


def _warp(img: torch.Tensor, flow: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bicubic ``img(x + flow)``: [N,C,H,W], [N,2,H,W] -> [N,C,H,W] and the inside-image mask [N,1,H,W]."""
    h, w = img.shape[-2:]
    xs = torch.arange(w, device=img.device, dtype=img.dtype)
    ys = torch.arange(h, device=img.device, dtype=img.dtype)
    x = xs + flow[:, 0]  # [N,H,W]
    y = ys[:, None] + flow[:, 1]  # [N,H,W]
    grid = torch.stack((x * (2.0 / max(w - 1, 1)) - 1.0, y * (2.0 / max(h - 1, 1)) - 1.0), -1)  # [N,H,W,2]
    out = F.grid_sample(img, grid, mode="bicubic", padding_mode="border", align_corners=True)
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)
    return out, inside[:, None].to(img.dtype)


def _level(i0: torch.Tensor, i1: torch.Tensor, flow: torch.Tensor, cfg: BroxConfig) -> torch.Tensor:
    """One pyramid level: warp once, then inner (lagged Psi') x solver (SOR) iterations on the increment dw."""
    h, w = i0.shape[-2:]
    d1x, d1y = _dx(i1), _dy(i1)
    derivs = torch.cat((i1, d1x, d1y, _dx(d1x), _dy(d1x), _dy(d1y)), 1)  # [N,6,H,W]: I, Ix, Iy, Ixx, Ixy, Iyy
    warped, inside = _warp(derivs, flow)
    iw, ix, iy, ixx, ixy, iyy = warped.split(1, 1)  # [N,1,H,W] each
    iz, ixz, iyz = iw - i0, ix - _dx(i0), iy - _dy(i0)  # temporal differences of I and grad I
    g, a = cfg.gamma, cfg.alpha
    # constant parts of the linearised normal equations (Brox Eq. 10-11)
    j11 = ix * ix + g * (ixx * ixx + ixy * ixy)
    j12 = ix * iy + g * (ixx * ixy + ixy * iyy)
    j22 = iy * iy + g * (ixy * ixy + iyy * iyy)
    j13 = ix * iz + g * (ixx * ixz + ixy * iyz)
    j23 = iy * iz + g * (ixy * ixz + iyy * iyz)
    yy = torch.arange(h, device=i0.device)[:, None]
    xx = torch.arange(w, device=i0.device)
    red = ((yy + xx) % 2 == 0)  # [H,W] checkerboard for red-black SOR
    last_col = (xx < w - 1).to(i0.dtype)  # [W]: no east neighbour on the last column
    last_row = (yy < h - 1).to(i0.dtype)  # [H,1]
    u, v = flow[:, :1], flow[:, 1:]  # [N,1,H,W]
    du, dv = torch.zeros_like(u), torch.zeros_like(v)
    om = cfg.omega
    for _ in range(cfg.inner_iterations):
        # lagged nonlinearities (Eq. 12 of Brox et al.: Psi' of the data and smoothness terms)
        rd = (iz + ix * du + iy * dv).square() + g * ((ixz + ixx * du + ixy * dv).square()
                                                       + (iyz + ixy * du + iyy * dv).square())
        pd = _psi_prime(rd, cfg.epsilon) * inside  # [N,1,H,W]; no data term where x + w leaves the image
        uu, vv = u + du, v + dv
        ps = a * _psi_prime(_dx(uu).square() + _dy(uu).square() + _dx(vv).square() + _dy(vv).square(), cfg.epsilon)
        we = 0.5 * (ps + _shift(ps, 0, 1)) * last_col  # weight to the east neighbour
        ws = 0.5 * (ps + _shift(ps, 1, 0)) * last_row  # to the south neighbour
        ww, wn = _shift(we, 0, -1) * (xx > 0), _shift(ws, -1, 0) * (yy > 0)
        wts = (we, ww, ws, wn)
        wsum = we + ws + ww + wn

        a11, a12, a22 = pd * j11, pd * j12, pd * j22
        b1 = -pd * j13 + _neighbour_sum(u, wts) - wsum * u  # data + alpha div(Psi' grad u) at the current u
        b2 = -pd * j23 + _neighbour_sum(v, wts) - wsum * v
        d11, d22 = a11 + wsum, a22 + wsum
        for _ in range(cfg.solver_iterations):
            for colour in (red, ~red):
                du = torch.where(colour, (1 - om) * du + om * (b1 + _neighbour_sum(du, wts) - a12 * dv) / d11, du)
                dv = torch.where(colour, (1 - om) * dv + om * (b2 + _neighbour_sum(dv, wts) - a12 * du) / d22, dv)
    return torch.cat((u + du, v + dv), 1)  # [N,2,H,W]


@torch.no_grad()
def brox(prev: torch.Tensor, nxt: torch.Tensor, **params) -> torch.Tensor:
    """Brox flow from ``prev`` to ``nxt``: float [N,1,H,W] (intensities 0..255) x2 -> [N,2,H,W] (x, y; pixels).

    ``nxt(p + flow(p)) ~ prev(p)`` (OpenCV's ``calc(prev, nxt)`` convention). ``params`` are :class:`BroxConfig`
    fields.
    """
    cfg = BroxConfig(**params)
    if prev.shape != nxt.shape or prev.dim() != 4 or prev.shape[1] != 1:
        raise ValueError(f"expected two [N,1,H,W] tensors, got {tuple(prev.shape)} and {tuple(nxt.shape)}")
    i0s, i1s = [prev.float() / 255.0], [nxt.float() / 255.0]  # dense_flow feeds [0, 1] images
    while len(i0s) < cfg.outer_iterations:
        h, w = i0s[-1].shape[-2:]
        size = (round(h * cfg.scale), round(w * cfg.scale))
        if min(size) < cfg.min_size:
            break
        i0s.append(F.interpolate(i0s[-1], size=size, mode="bilinear", align_corners=False, antialias=True))
        i1s.append(F.interpolate(i1s[-1], size=size, mode="bilinear", align_corners=False, antialias=True))
    flow = torch.zeros(prev.shape[0], 2, *i0s[-1].shape[-2:], device=prev.device)
    for s in range(len(i0s) - 1, -1, -1):
        if flow.shape[-2:] != i0s[s].shape[-2:]:
            h0, w0 = flow.shape[-2:]
            flow = F.interpolate(flow, size=i0s[s].shape[-2:], mode="bilinear", align_corners=False)
            flow = flow * torch.tensor([i0s[s].shape[-1] / w0, i0s[s].shape[-2] / h0],
                                       device=flow.device).view(1, 2, 1, 1)  # [N,2,h,w] in this level's pixels
        flow = _level(i0s[s], i1s[s], flow, cfg)
    return flow
