"""Batched TV-L1 optical flow (Zach, Pock & Bischof 2007, dual formulation) in PyTorch.

The algorithm is the one described by Sanchez, Meinhardt-Llopis & Facciolo, "TV-L1 Optical Flow Estimation",
IPOL 2013 (Algorithm 1 and 2), in the variant OpenCV's ``DualTVL1OpticalFlow`` implements, with the same defaults
(tau .25, lambda .15, theta .3, 5 scales of step .8, 5 warps, epsilon .01, 30 inner x 10 outer iterations,
5x5 median filtering of the flow at the start of every outer iteration):

* pyramid: bilinear down-scaling by ``scale_step`` (as OpenCV, no pre-smoothing), stop below 16 px;
  flow up-sampled bilinearly and multiplied by ``1 / scale_step``.
* warping (IPOL Alg. 2, line 5): ``I1(x + u0)`` and its centred gradient by bicubic interpolation
  (a = -0.75, OpenCV's kernel), zero outside the image as OpenCV's ``remap`` (BORDER_CONSTANT); replicating the
  border instead measured worse near the image edges (EPE 0.148 vs 0.103 on a 4 px test pair).
* thresholding step (IPOL Eq. 13-14) with ``rho(u) = I1(x+u0) + grad I1 . (u - u0) - I0``.
* ``u = v + theta div p`` (Eq. 15) and the dual projection ``p = (p + tau/theta grad u) / (1 + tau/theta |grad u|)``
  (Eq. 16) with forward differences and the matching backward-difference divergence (Eq. 17-18).
* stopping (Alg. 2, line 14): inside a warp, iterations stop once ``mean |u^{n+1} - u^n|^2 <= epsilon^2``.

Batching: ``N`` pairs run in lock step, but every pair keeps its own stopping state. A converged pair is frozen
(its updates are masked out) until the next warp, exactly as it would stop when run alone, so a pair's result
does not depend on its batch mates. All code is device agnostic (CPU and CUDA run the same ops).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

__all__ = ["TVL1Config", "median5", "tvl1"]

_FLT_EPS = 1.1920929e-07  # numeric_limits<float>::epsilon(), OpenCV's guard on |grad I1|^2


@dataclass(frozen=True)
class TVL1Config:
    """Parameters of :func:`tvl1`; defaults equal OpenCV ``DualTVL1OpticalFlow_create()`` (= TSN / denseflow)."""

    tau: float = 0.25  # time step of the dual ascent (IPOL Eq. 16); < 1/8 is the proven bound, .25 works
    lambda_: float = 0.15  # weight of the data term (attachment)
    theta: float = 0.3  # coupling between u and v (tightness)
    nscales: int = 5
    warps: int = 5
    epsilon: float = 0.01  # stopping threshold on the rms change of u
    inner_iterations: int = 30
    outer_iterations: int = 10
    scale_step: float = 0.8
    median_filtering: int = 5  # 5 = 5x5 median of the flow per outer iteration; 1 = off

    def to_dict(self) -> dict:
        return asdict(self)


# --- finite differences (IPOL Eq. 17-18; OpenCV centeredGradient / forwardGradient / divergence) ----------------


def _centered_gradient(img: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences with replicated borders: [N,H,W] -> two [N,H,W]."""
    p = F.pad(img[:, None], (1, 1, 1, 1), mode="replicate")[:, 0]  # [N,H+2,W+2]
    return 0.5 * (p[:, 1:-1, 2:] - p[:, 1:-1, :-2]), 0.5 * (p[:, 2:, 1:-1] - p[:, :-2, 1:-1])


def _forward_gradient(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward differences, zero on the last column / row (Neumann)."""
    ux = F.pad(u[..., :, 1:] - u[..., :, :-1], (0, 1))
    uy = F.pad(u[..., 1:, :] - u[..., :-1, :], (0, 0, 0, 1))
    return ux, uy


def _divergence(px: torch.Tensor, py: torch.Tensor) -> torch.Tensor:
    """Backward differences with p = 0 outside the image: the negative adjoint of :func:`_forward_gradient`."""
    return px - F.pad(px[..., :, :-1], (1, 0)) + py - F.pad(py[..., :-1, :], (0, 0, 1, 0))


# --- 5x5 median as an exact selection network ------------------------------------------------------------------

# Paeth / Devillard's 99-comparator median-of-25 network (verified exhaustively with the 0-1 principle in the tests).
_MED25 = (
    (0, 1), (3, 4), (2, 4), (2, 3), (6, 7), (5, 7), (5, 6), (9, 10), (8, 10), (8, 9), (12, 13), (11, 13), (11, 12),
    (15, 16), (14, 16), (14, 15), (18, 19), (17, 19), (17, 18), (21, 22), (20, 22), (20, 21), (23, 24), (2, 5),
    (3, 6), (0, 6), (0, 3), (4, 7), (1, 7), (1, 4), (11, 14), (8, 14), (8, 11), (12, 15), (9, 15), (9, 12), (13, 16),
    (10, 16), (10, 13), (20, 23), (17, 23), (17, 20), (21, 24), (18, 24), (18, 21), (19, 22), (8, 17), (9, 18),
    (0, 18), (0, 9), (10, 19), (1, 19), (1, 10), (11, 20), (2, 20), (2, 11), (12, 21), (3, 21), (3, 12), (13, 22),
    (4, 22), (4, 13), (14, 23), (5, 23), (5, 14), (15, 24), (6, 24), (6, 15), (7, 16), (7, 19), (13, 21), (15, 23),
    (7, 13), (7, 15), (1, 9), (3, 11), (5, 17), (11, 17), (9, 17), (4, 10), (6, 12), (7, 14), (4, 6), (4, 7),
    (12, 14), (10, 14), (6, 7), (10, 12), (6, 10), (6, 17), (12, 17), (7, 17), (7, 10), (12, 18), (7, 12), (10, 18),
    (12, 20), (10, 20), (10, 12),
)


def _prune(network, out: int):
    """Keep, per comparator, only the outputs (min, max) that the result at ``out`` depends on."""
    needed, kept = {out}, []
    for i, j in reversed(network):
        want_min, want_max = i in needed, j in needed
        if want_min or want_max:
            needed |= {i, j}
            kept.append((i, j, want_min, want_max))
    return tuple(reversed(kept))


# The network's first 23 comparators sort 7 triples and 2 pairs of inputs. Choosing those groups as vertical /
# horizontal runs of pixels lets one full-image sort serve every window that contains the run, so the per-window
# part starts at comparator 23: 5 vertical triples (rows 0-2 of each window column), 2 horizontal triples and
# 2 horizontal pairs (rows 3-4).
_MED25_REST = _prune(_MED25[23:], 12)


def _sort3(a, b, c):
    lo, hi = torch.minimum(b, c), torch.maximum(b, c)
    t = torch.maximum(a, lo)
    return torch.minimum(a, lo), torch.minimum(t, hi), torch.maximum(t, hi)


def median5(x: torch.Tensor) -> torch.Tensor:
    """Exact 5x5 median filter with replicated borders (OpenCV ``medianBlur(x, 5)``): [..., H, W] -> same shape.

    A comparator network of min/max ops instead of a sort (every op is one vectorised pass, no gather), with
    the first layer shared between overlapping windows.
    """
    shape = x.shape
    h, w = shape[-2:]
    xp = F.pad(x.reshape(-1, 1, h, w), (2, 2, 2, 2), mode="replicate")[:, 0]  # [M,H+4,W+4]
    vt = _sort3(xp[:, :-2], xp[:, 1:-1], xp[:, 2:])  # sorted vertical triples [M,H+2,W+4]
    ht = _sort3(xp[..., :-2], xp[..., 1:-1], xp[..., 2:])  # sorted horizontal triples [M,H+4,W+2]
    hp = torch.minimum(xp[..., :-1], xp[..., 1:]), torch.maximum(xp[..., :-1], xp[..., 1:])  # [M,H+4,W+3]

    def at(t, dy, dx):  # the window-relative cell (dy, dx) of every window: [M,H,W]
        return t[:, dy:dy + h, dx:dx + w]

    v = [at(t, 3, 3) for t in hp]  # 0, 1: row 3, columns 3-4
    for col in range(5):  # 2..16: rows 0-2 of columns 0..4
        v += [at(t, 0, col) for t in vt]
    v += [at(t, 3, 0) for t in ht] + [at(t, 4, 0) for t in ht]  # 17..22: rows 3 and 4, columns 0-2
    v += [at(t, 4, 3) for t in hp]  # 23, 24: row 4, columns 3-4
    for i, j, want_min, want_max in _MED25_REST:
        a, b = v[i], v[j]
        if want_min:
            v[i] = torch.minimum(a, b)
        if want_max:
            v[j] = torch.maximum(a, b)
    return v[12].reshape(shape)


# --- one primal-dual iteration (IPOL Alg. 2, lines 9-13) -----------------------------------------------------------


# State layout: every variable lives in a buffer with one extra row / column, so that the finite differences are
# single subtractions of two views (no padding copies) and the updates run in place:
#   U  [n, H+1, W+1]: u in [:, :H, :W]; row H and column W repeat the last row / column (forward difference 0)
#   PX [n, H, W+1]:   x-component of p in [..., 1:]; column 0 stays 0 (divergence's zero boundary)
#   PY [n, H+1, W]:   y-component of p in [:, 1:]; row 0 stays 0


def _refresh_border(u: torch.Tensor) -> None:
    u[:, -1, :] = u[:, -2, :]
    u[:, :, -1] = u[:, :, -2]


def _tvl1_iteration(U1, U2, P11, P12, P21, P22, a, b1, b2, ix, iy, lt: float, theta: float, taut: float):
    """One primal-dual iteration in place on the state buffers; returns the per-pair mean |u^{n+1} - u^n|^2 [n].

    ``a + b1 u1 + b2 u2 = -rho(u) / |grad I1|^2`` (precomputed per warp), so the thresholding step TH of
    IPOL Eq. 13 is ``v = u + clip(-rho / |grad I1|^2, -lambda theta, lambda theta) grad I1``; then
    ``u = v + theta div p`` (Eq. 15) and ``p = (p + tau/theta grad u) / (1 + tau/theta |grad u|)`` (Eq. 16).
    """
    h, w = a.shape[-2:]
    u1, u2 = U1[:, :h, :w], U2[:, :h, :w]  # views of the interiors
    fi = torch.addcmul(a, b1, u1).addcmul_(b2, u2).clamp_(-lt, lt)
    err = None
    for u, U, PX, PY, g in ((u1, U1, P11, P12, ix), (u2, U2, P21, P22, iy)):
        d = torch.sub(PX[..., 1:], PX[..., :-1]).add_(PY[:, 1:]).sub_(PY[:, :-1])  # div p (Eq. 17)
        d.mul_(theta).addcmul_(fi, g)  # u^{n+1} - u^n = TH step + theta div p
        u.add_(d)
        e = d.square_().sum(dim=(1, 2))  # [n]
        err = e if err is None else err + e
        _refresh_border(U)
        ux = U[:, :h, 1:] - u  # forward differences (Eq. 18)
        uy = U[:, 1:, :w] - u
        ng = torch.hypot(ux, uy).mul_(taut).add_(1.0)
        PX[..., 1:].add_(ux, alpha=taut).div_(ng)
        PY[:, 1:].add_(uy, alpha=taut).div_(ng)
    return err / (h * w)


def _median_(U1, U2) -> None:
    """5x5 median of both flow components, in place on the state buffers."""
    h, w = U1.shape[-2] - 1, U1.shape[-1] - 1
    m = median5(torch.stack((U1[:, :h, :w], U2[:, :h, :w]), 1))  # [n,2,H,W]
    for k, U in enumerate((U1, U2)):
        U[:, :h, :w] = m[:, k]
        _refresh_border(U)


_COMPILED: dict[str, object] = {}


def _kernels(compile: bool):
    """The hot iteration, eager or through ``torch.compile`` (compiled once per process, dynamic shapes).

    Optional and off by default: on this CPU the compiled in-place iteration ran at 1.05x OpenCV's rate against
    eager's 1.68x (bench/flow.py, 340x256), each new batch shape recompiles, and inductor turned the median
    network into a slower kernel than eager's (150 ms vs 90 ms), so the median always runs eager.
    """
    if not compile:
        return _tvl1_iteration, _median_
    if "step" not in _COMPILED:
        _COMPILED["step"] = torch.compile(_tvl1_iteration, dynamic=True)
    return _COMPILED["step"], _median_


# --- the coarse-to-fine driver (IPOL Alg. 1) ------------------------------------------------------------------------


def _pow2_plus_one(n: int) -> int:
    return (1 << max(n - 2, 1).bit_length()) + 1


def _warp(img: torch.Tensor, u1: torch.Tensor, u2: torch.Tensor) -> torch.Tensor:
    """Bicubic ``img(x + u)``, zero outside: [N,C,H,W], [N,H,W] x2 -> [N,C,H,W].

    The image is zero-padded to ``2^k + 1`` pixels a side so that ``grid_sample``'s normalised coordinates are
    powers-of-two multiples of the pixel ones: integer positions then round-trip exactly and zero flow
    reproduces the image bit for bit (with an arbitrary size the ~1e-5 px round-off made the border drift).
    """
    h, w = img.shape[-2:]
    hp, wp = _pow2_plus_one(h), _pow2_plus_one(w)
    padded = F.pad(img, (0, wp - w, 0, hp - h))  # [N,C,hp,wp], zeros = OpenCV's BORDER_CONSTANT
    xs = torch.arange(w, device=img.device, dtype=img.dtype)
    ys = torch.arange(h, device=img.device, dtype=img.dtype)
    gx = (xs + u1) * (2.0 / (wp - 1)) - 1.0  # [N,H,W]
    gy = (ys[:, None] + u2) * (2.0 / (hp - 1)) - 1.0  # [N,H,W]
    grid = torch.stack((gx, gy), dim=-1)  # [N,H,W,2]
    return F.grid_sample(padded, grid, mode="bicubic", padding_mode="zeros", align_corners=True)


def _one_scale(i0, i1, u1, u2, cfg: TVL1Config, step, median):
    """Warps x (outer x inner) iterations at one pyramid level; returns the refined (u1, u2).

    Per-pair stopping: only the pairs still running (``idx``) are iterated. When a pair converges its state is
    written back and it leaves the working set until the next warp, so it stops exactly where it would alone.
    """
    n, h, w = i0.shape
    ix, iy = _centered_gradient(i1)
    img = torch.stack((i1, ix, iy), 1)  # [N,3,H,W]: warped together in one bicubic pass
    U1 = F.pad(u1[:, None], (0, 1, 0, 1), mode="replicate")[:, 0]  # [N,H+1,W+1]
    U2 = F.pad(u2[:, None], (0, 1, 0, 1), mode="replicate")[:, 0]
    # the dual variables start at 0 at every scale (as OpenCV's procOneScale)
    P11, P21 = (i0.new_zeros(n, h, w + 1) for _ in range(2))
    P12, P22 = (i0.new_zeros(n, h + 1, w) for _ in range(2))
    state = [U1, U2, P11, P12, P21, P22]
    lt, taut = cfg.lambda_ * cfg.theta, cfg.tau / cfg.theta
    eps2 = cfg.epsilon ** 2
    for _ in range(cfg.warps):
        u1, u2 = state[0][:, :h, :w], state[1][:, :h, :w]
        i1w, i1wx, i1wy = _warp(img, u1, u2).unbind(1)  # [N,H,W] each
        inv = 1.0 / torch.clamp(i1wx.square() + i1wy.square(), min=_FLT_EPS)
        rho_c = i1w - i1wx * u1 - i1wy * u2 - i0  # rho(u) = rho_c + grad I1w . u  (IPOL Eq. 12)
        const = [-rho_c * inv, -i1wx * inv, -i1wy * inv, i1wx, i1wy]  # a, b1, b2, Ix, Iy
        idx = torch.arange(n, device=i0.device)  # pairs still iterating in this warp
        sub, csub = state, const  # the working set: all pairs, then fewer (copies) as pairs converge
        for _ in range(cfg.outer_iterations):
            if cfg.median_filtering > 1:
                median(sub[0], sub[1])
            for _ in range(cfg.inner_iterations):
                going = step(*sub, *csub, lt, cfg.theta, taut) > eps2  # [n_active]
                if bool(going.all()):
                    continue
                if sub is not state:
                    for full, part in zip(state, sub):
                        full[idx] = part
                keep = going.nonzero()[:, 0]
                idx = idx[keep]
                sub = [t[keep] for t in sub]
                csub = [t[keep] for t in csub]
                if len(idx) == 0:
                    break
            if len(idx) == 0:
                break
        if sub is not state and len(idx):
            for full, part in zip(state, sub):
                full[idx] = part
    return state[0][:, :h, :w], state[1][:, :h, :w]


def _pyramid_size(h: int, w: int, scale: float) -> tuple[int, int]:
    return round(h * scale), round(w * scale)  # OpenCV resize(Size(), fx, fy) rounds


@torch.no_grad()
def tvl1(prev: torch.Tensor, nxt: torch.Tensor, *, compile: bool = False, **params) -> torch.Tensor:
    """TV-L1 flow from ``prev`` to ``nxt``: float [N,1,H,W] (intensities 0..255) x2 -> [N,2,H,W] (x, y; pixels).

    ``nxt(p + flow(p)) ~ prev(p)``, OpenCV's ``calc(prev, nxt)`` convention. ``params`` are :class:`TVL1Config`
    fields. ``compile=True`` runs the primal-dual iteration through ``torch.compile`` (first call compiles).
    """
    cfg = TVL1Config(**params)
    if prev.shape != nxt.shape or prev.dim() != 4 or prev.shape[1] != 1:
        raise ValueError(f"expected two [N,1,H,W] tensors, got {tuple(prev.shape)} and {tuple(nxt.shape)}")
    if cfg.median_filtering not in (0, 1, 5):
        raise ValueError(f"median_filtering must be 0, 1 (off) or 5, got {cfg.median_filtering}")
    step, median = _kernels(compile)
    i0s, i1s = [prev[:, 0].float()], [nxt[:, 0].float()]  # [N,H,W]
    for _ in range(1, cfg.nscales):
        size = _pyramid_size(*i0s[-1].shape[-2:], cfg.scale_step)
        if min(size) < 16:
            break
        i0s.append(F.interpolate(i0s[-1][:, None], size=size, mode="bilinear", align_corners=False)[:, 0])
        i1s.append(F.interpolate(i1s[-1][:, None], size=size, mode="bilinear", align_corners=False)[:, 0])
    u1 = torch.zeros_like(i0s[-1])
    u2 = torch.zeros_like(i0s[-1])
    for s in range(len(i0s) - 1, -1, -1):
        u1, u2 = _one_scale(i0s[s], i1s[s], u1, u2, cfg, step, median)
        if s:
            up = F.interpolate(torch.stack((u1, u2), 1), size=i0s[s - 1].shape[-2:], mode="bilinear",
                               align_corners=False) / cfg.scale_step  # [N,2,h,w]
            u1, u2 = up[:, 0], up[:, 1]
    return torch.stack((u1, u2), 1)  # [N,2,H,W]

