"""Batched TV-L1 optical flow (Zach, Pock & Bischof 2007, dual formulation) in PyTorch.

The algorithm is the one described by Sanchez, Meinhardt-Llopis & Facciolo, "TV-L1 Optical Flow Estimation",
IPOL 2013 (Algorithm 1 and 2), in the variant OpenCV's ``DualTVL1OpticalFlow`` implements, with the same defaults
(tau .25, lambda .15, theta .3, 5 scales of step .8, 5 warps, epsilon .01, 30 inner x 10 outer iterations,
5x5 median filtering of the flow at the start of every outer iteration):

* pyramid: bilinear down-scaling by ``scale_step`` with OpenCV's sampling (exact ``1 / scale_step`` step, sizes
  rounded; no pre-smoothing), stop below 16 px; flow up-sampled bilinearly and multiplied by ``1 / scale_step``.
* warping (IPOL Alg. 2, line 5): ``I1(x + u0)`` and its centred gradient by bicubic interpolation
  (a = -0.75, OpenCV's kernel), zero outside the image as OpenCV's ``remap`` (BORDER_CONSTANT); replicating the
  border instead measured worse near the image edges (EPE 0.148 vs 0.103 on a 4 px test pair).
* thresholding step (IPOL Eq. 13-14) with ``rho(u) = I1(x+u0) + grad I1 . (u - u0) - I0``.
* ``u = v + theta div p`` (Eq. 15) and the dual projection ``p = (p + tau/theta grad u) / (1 + tau/theta |grad u|)``
  (Eq. 16) with forward differences and the matching backward-difference divergence (Eq. 17-18).
* stopping (Alg. 2, line 14): inside a warp, iterations stop once ``mean |u^{n+1} - u^n|^2 <= epsilon^2``.

Batching: ``N`` pairs run in lock step, but every pair keeps its own stopping state. A converged pair is frozen
(its updates are masked out) until the next warp, exactly as it would stop when run alone, so a pair's result
does not depend on its batch mates. All code is device agnostic (CPU and CUDA run the same ops); on the CPU the
inner loop and the median run as fused C where a C compiler is found (tvl1_cpu.py: the same arithmetic, the median
bit for bit), pair after pair.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from .tvl1_cpu import inner_loop
from .tvl1_cpu import load as load_fused
from .tvl1_cpu import median_ as median_fused

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


# --- 5x5 median as exact, separable selection networks ---------------------------------------------------------
#
# Min/max comparator networks instead of a sort: every comparator is one vectorised pass over the image, no gather.
# The work is shared between overlapping windows (Adams, "Fast median filters using separable sorting networks",
# SIGGRAPH 2021): sort every 5-pixel column once; merge adjacent sorted columns into pairs (10) and two pairs into
# quads (20, only the ranks the median can take); a window is a quad plus one column. A quad starting at an even
# column serves two windows (the one it starts and the one to its left), so pairs and quads are computed at even
# columns only. 18 + 13 + 18 + 10 = 59 full-image passes per median against 142 for a pruned 25-input network.


def _merge(a: list[int], b: list[int], net: list) -> list[int]:
    """Batcher's odd-even merge of two sorted wire lists of any lengths (Knuth 5.3.4): appends comparators
    ``(i, j)`` (min to wire i, max to wire j) to ``net`` and returns the wires in sorted order."""
    if not a or not b:
        return list(a or b)
    if len(a) == 1 and len(b) == 1:
        net.append((a[0], b[0]))
        return [a[0], b[0]]
    v = _merge(a[0::2], b[0::2], net)
    w = _merge(a[1::2], b[1::2], net)
    out = [v[0]]
    for k in range(max(len(v) - 1, len(w))):
        if k < len(w) and k + 1 < len(v):
            net.append((w[k], v[k + 1]))
            out += [w[k], v[k + 1]]
        else:
            out.append(w[k] if k < len(w) else v[k + 1])
    return out


def _prune(network, outs):
    """Keep, per comparator, only the outputs (min, max) that the wires ``outs`` depend on."""
    needed, kept = set(outs), []
    for i, j in reversed(network):
        want_min, want_max = i in needed, j in needed
        if want_min or want_max:
            needed |= {i, j}
            kept.append((i, j, want_min, want_max))
    return tuple(reversed(kept))


def _run(network, v: list) -> list:
    for i, j, want_min, want_max in network:
        a, b = v[i], v[j]
        if want_min:
            v[i] = torch.minimum(a, b)
        if want_max:
            v[j] = torch.maximum(a, b)
    return v


_SORT5_NET = ((0, 1), (3, 4), (2, 4), (2, 3), (0, 3), (0, 2), (1, 4), (1, 3), (1, 2))  # Knuth's optimal 9 comparators
_SORT5 = _prune(_SORT5_NET, range(5))
_net: list = []
_PAIR_ORDER = _merge([0, 1, 2, 3, 4], [5, 6, 7, 8, 9], _net)  # two sorted columns -> sorted 10
_PAIR = _prune(_net, _PAIR_ORDER)
_net = []
_quad_order = _merge(list(range(10)), list(range(10, 20)), _net)  # two sorted pairs -> sorted 20
# A window is a quad (20) plus a column (5): its median (rank 12 of 25) takes 0..5 values from the column and
# 13..8 from the quad, so only the quad's ranks 7..12 matter.
_QUAD_OUT = tuple(_quad_order[7:13])
_QUAD = _prune(_net, _QUAD_OUT)
del _net, _quad_order


def _median_of_quad_and_column(q: list, c: list) -> torch.Tensor:
    """Rank 12 of (sorted quad ranks q[0..5] = 7..12) and (sorted column c[0..4]):
    ``min over i = 0..5 of max(c[i-1], quad[12-i])`` (i values taken from the column, c[-1] = -inf)."""
    m = q[5]
    for i in range(1, 6):
        m = torch.minimum(m, torch.maximum(c[i - 1], q[5 - i]))
    return m


def median5(x: torch.Tensor) -> torch.Tensor:
    """Exact 5x5 median filter with replicated borders (OpenCV ``medianBlur(x, 5)``): [..., H, W] -> same shape."""
    shape = x.shape
    h, w = shape[-2:]
    xp = F.pad(x.reshape(-1, 1, h, w), (2, 2, 2, 2), mode="replicate")[:, 0]  # [M,H+4,W+4]
    # Even and odd columns de-interleaved once into contiguous buffers: every comparator below then reads memory
    # with unit stride (a min/max over stride-2 views ran 5x slower per element).
    xe, xo = xp[..., 0::2].contiguous(), xp[..., 1::2].contiguous()  # columns 2j and 2j+1
    ev = _run(_SORT5, [xe[:, k:k + h] for k in range(5)])  # even columns sorted, 5 x [M,H,ceil((W+4)/2)]
    od = _run(_SORT5, [xo[:, k:k + h] for k in range(5)])
    kq = w // 2 + 1  # quads start at even columns 0, 2, .., 2 (kq - 1)
    pair = _run(_PAIR, [c[..., :kq + 1] for c in ev] + [c[..., :kq + 1] for c in od])  # 10 x [M,H,kq+1]
    pair = [pair[i] for i in _PAIR_ORDER]  # sorted columns 2j..2j+1
    quad = _run(_QUAD, [p[..., :kq] for p in pair] + [p[..., 1:] for p in pair])  # columns 2k..2k+3
    quad = [quad[i] for i in _QUAD_OUT]  # ranks 7..12, 6 x [M,H,kq]
    ne, no = (w + 1) // 2, w // 2
    # window 2k: quad k + column 2k+4; window 2k+1: column 2k+1 + quad k+1
    even = _median_of_quad_and_column([q[..., :ne] for q in quad], [c[..., 2:2 + ne] for c in ev])
    odd = _median_of_quad_and_column([q[..., 1:1 + no] for q in quad], [c[..., :no] for c in od])
    out = x.new_empty(xp.shape[0], h, w)
    out[..., 0::2], out[..., 1::2] = even, odd  # (3x faster than torch.stack((even, odd), -1) here)
    return out.reshape(shape)


# --- one primal-dual iteration (IPOL Alg. 2, lines 9-13) -----------------------------------------------------------


# State layout: the two flow components are stacked (one op updates both), and every variable lives in a buffer
# with one extra row / column, so that the finite differences are single subtractions of two views (no padding
# copies) and the updates run in place:
#   U  [n, 2, H+1, W+1]: u in [..., :H, :W]; row H and column W repeat the last row / column (forward difference 0)
#   PX [n, 2, H, W+1]:   x-component of theta p_1, theta p_2 in [..., 1:]; column 0 stays 0 (divergence's zero
#                        boundary). p is stored times theta, which saves the multiplication in u's update.
#   PY [n, 2, H+1, W]:   y-component of theta p_1, theta p_2 in [..., 1:, :]; row 0 stays 0


def _refresh_border(u: torch.Tensor) -> None:
    u[..., -1, :] = u[..., -2, :]
    u[..., :, -1] = u[..., :, -2]


def _tvl1_iteration(U, PX, PY, a, b, g, lt: float, tau: float, taut: float):
    """One primal-dual iteration in place on the state buffers; returns the per-pair mean |u^{n+1} - u^n|^2 [n].

    ``a + b . u = -rho(u) / |grad I1|^2`` (``a`` [n,H,W], ``b`` [n,2,H,W], precomputed per warp), so the
    thresholding step TH of IPOL Eq. 13 is ``v = u + clip(-rho / |grad I1|^2, -lambda theta, lambda theta) g``
    with ``g = grad I1`` [n,2,H,W]; then ``u = v + theta div p`` (Eq. 15) and
    ``p = (p + tau/theta grad u) / (1 + tau/theta |grad u|)`` (Eq. 16), i.e. for ``q = theta p`` (the stored one)
    ``u = v + div q`` and ``q = (q + tau grad u) / (1 + tau/theta |grad u|)``.
    """
    h, w = a.shape[-2:]
    u = U[..., :h, :w]  # view of the interior [n,2,H,W]
    fi = torch.addcmul(a, b[:, 0], u[:, 0]).addcmul_(b[:, 1], u[:, 1]).clamp_(-lt, lt)  # [n,H,W]
    d = torch.sub(PX[..., 1:], PX[..., :-1]).add_(PY[..., 1:, :]).sub_(PY[..., :-1, :])  # theta div p (Eq. 17)
    d.addcmul_(fi[:, None], g)  # u^{n+1} - u^n = TH step + theta div p
    u.add_(d)
    err = torch.linalg.vector_norm(d.flatten(1), dim=1).square_()  # [n]
    _refresh_border(U)
    ux = U[..., :h, 1:] - u  # forward differences (Eq. 18)
    uy = U[..., 1:, :w] - u
    # 1 + tau/theta |grad u|; sqrt of the sum of squares, not torch.hypot (6x slower per element on CPU, and
    # |grad u| is far from overflow)
    ng = torch.mul(ux, ux).addcmul_(uy, uy).sqrt_().mul_(taut).add_(1.0)
    PX[..., 1:].add_(ux, alpha=tau).div_(ng)
    PY[..., 1:, :].add_(uy, alpha=tau).div_(ng)
    return err / (h * w)


def _median_(U) -> None:
    """5x5 median of both flow components, in place on the state buffer."""
    h, w = U.shape[-2] - 1, U.shape[-1] - 1
    U[..., :h, :w] = median5(U[..., :h, :w])
    _refresh_border(U)


_COMPILED: dict[str, object] = {}


def _kernels(compile: bool):
    """The hot iteration, eager or through ``torch.compile`` (compiled once per process, dynamic shapes).

    Optional and off by default: on this 2-core CPU (1 thread, 340x256, batch 1, bench/flow.py) the compiled
    iteration ran at 1.11x OpenCV's rate against eager's 2.52x in the same run (first call 17 s); static shapes
    per pyramid level (``dynamic=False``) reached 0.76x eager, a copy-returning iteration compiled static 0.80x.
    Each new batch shape recompiles, and inductor turned the median network into a slower kernel than eager's
    (77 ms vs 30 ms for the old 25-input network), so the median always runs eager.
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


def _one_scale(i0, i1, u1, u2, cfg: TVL1Config, step, median, fused=None):
    """Warps x (outer x inner) iterations at one pyramid level; returns the refined (u1, u2).

    Per-pair stopping: only the pairs still running (``idx``) are iterated. When a pair converges its state is
    written back and it leaves the working set until the next warp, so it stops exactly where it would alone.
    With ``fused`` (the C inner loop of tvl1_cpu.py) the pairs run one after the other, each inner loop one call.
    """
    n, h, w = i0.shape
    ix, iy = _centered_gradient(i1)
    img = torch.stack((i1, ix, iy), 1)  # [N,3,H,W]: warped together in one bicubic pass
    U = F.pad(torch.stack((u1, u2), 1), (0, 1, 0, 1), mode="replicate")  # [N,2,H+1,W+1]
    # the dual variables start at 0 at every scale (as OpenCV's procOneScale)
    PX, PY = i0.new_zeros(n, 2, h, w + 1), i0.new_zeros(n, 2, h + 1, w)
    state = [U, PX, PY]
    lt, taut = cfg.lambda_ * cfg.theta, cfg.tau / cfg.theta
    eps2 = cfg.epsilon ** 2
    for _ in range(cfg.warps):
        u1, u2 = state[0][:, 0, :h, :w], state[0][:, 1, :h, :w]
        i1w, i1wx, i1wy = _warp(img, u1, u2).unbind(1)  # [N,H,W] each
        inv = 1.0 / torch.clamp(i1wx.square() + i1wy.square(), min=_FLT_EPS)
        rho_c = i1w - i1wx * u1 - i1wy * u2 - i0  # rho(u) = rho_c + grad I1w . u  (IPOL Eq. 12)
        g = torch.stack((i1wx, i1wy), 1)  # [N,2,H,W]
        const = [-rho_c * inv, g * -inv[:, None], g]  # a, b, grad I1w
        if fused is not None:
            for k in range(n):
                sk, ck = [t[k] for t in state], [t[k] for t in const]
                for _ in range(cfg.outer_iterations):
                    if cfg.median_filtering > 1:
                        median_fused(fused, sk[0])
                    if inner_loop(fused, *sk, *ck, lt, cfg.tau, taut, cfg.inner_iterations, eps2):
                        break
            continue
        idx = torch.arange(n, device=i0.device)  # pairs still iterating in this warp
        sub, csub = state, const  # the working set: all pairs, then fewer (copies) as pairs converge
        for _ in range(cfg.outer_iterations):
            if cfg.median_filtering > 1:
                median(sub[0])
            for _ in range(cfg.inner_iterations):
                going = step(*sub, *csub, lt, cfg.tau, taut) > eps2  # [n_active]
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
    return state[0][:, 0, :h, :w], state[0][:, 1, :h, :w]


def _pyramid_size(h: int, w: int, scale: float) -> tuple[int, int]:
    return round(h * scale), round(w * scale)  # OpenCV resize(Size(), fx, fy) rounds


def _linear_taps(n_in: int, n_out: int, scale: float, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Bilinear taps of OpenCV's ``resize(src, Size(), scale, scale)`` along one axis: source coordinate
    ``(d + .5) / scale - .5`` with the exact ``1 / scale`` step, clamped at the borders as OpenCV does.
    (``F.interpolate(size=...)`` steps by ``n_in / n_out`` instead, off by up to ~0.5 % after rounding the size;
    that alone raised the mean EPE at 320x240 from 0.217 to 0.251, OpenCV's being 0.217.)"""
    f = (torch.arange(n_out, dtype=torch.float64) + 0.5) / scale - 0.5
    s = f.floor()
    a = f - s
    a[s < 0], s[s < 0] = 0.0, 0.0
    last = s >= n_in - 1
    a[last], s[last] = 0.0, n_in - 1
    s = s.long()
    return s.to(device), (s + 1).clamp(max=n_in - 1).to(device), a.float().to(device)


def _downscale(img: torch.Tensor, size: tuple[int, int], scale: float) -> torch.Tensor:
    """OpenCV-style bilinear down-scaling of [N,H,W] by ``scale`` to ``size``: rows, then columns, as OpenCV."""
    x0, x1, ax = _linear_taps(img.shape[-1], size[1], scale, img.device)
    y0, y1, ay = _linear_taps(img.shape[-2], size[0], scale, img.device)
    rows = img[..., x0] * (1.0 - ax) + img[..., x1] * ax  # [N,H,w]
    return rows[:, y0] * (1.0 - ay)[:, None] + rows[:, y1] * ay[:, None]  # [N,h,w]


@torch.no_grad()
def tvl1(prev: torch.Tensor, nxt: torch.Tensor, *, compile: bool = False, kernel: str = "auto",
         **params) -> torch.Tensor:
    """TV-L1 flow from ``prev`` to ``nxt``: float [N,1,H,W] (intensities 0..255) x2 -> [N,2,H,W] (x, y; pixels).

    ``nxt(p + flow(p)) ~ prev(p)``, OpenCV's ``calc(prev, nxt)`` convention. ``params`` are :class:`TVL1Config`
    fields. ``compile=True`` runs the primal-dual iteration through ``torch.compile`` (first call compiles).
    ``kernel``: ``auto`` runs the inner loop as fused C on CPU tensors where it can be built (tvl1_cpu.py; the
    same arithmetic) and torch ops elsewhere; ``torch`` always runs torch ops.
    """
    cfg = TVL1Config(**params)
    if prev.shape != nxt.shape or prev.dim() != 4 or prev.shape[1] != 1:
        raise ValueError(f"expected two [N,1,H,W] tensors, got {tuple(prev.shape)} and {tuple(nxt.shape)}")
    if cfg.median_filtering not in (0, 1, 5):
        raise ValueError(f"median_filtering must be 0, 1 (off) or 5, got {cfg.median_filtering}")
    if kernel not in ("auto", "torch"):
        raise ValueError(f"kernel must be 'auto' or 'torch', got {kernel!r}")
    step, median = _kernels(compile)
    fused = load_fused() if kernel == "auto" and not compile and prev.device.type == "cpu" else None
    i0s, i1s = [prev[:, 0].float()], [nxt[:, 0].float()]  # [N,H,W]
    for _ in range(1, cfg.nscales):
        size = _pyramid_size(*i0s[-1].shape[-2:], cfg.scale_step)
        if min(size) < 16:
            break
        i0s.append(_downscale(i0s[-1], size, cfg.scale_step))
        i1s.append(_downscale(i1s[-1], size, cfg.scale_step))
    u1 = torch.zeros_like(i0s[-1])
    u2 = torch.zeros_like(i0s[-1])
    for s in range(len(i0s) - 1, -1, -1):
        u1, u2 = _one_scale(i0s[s], i1s[s], u1, u2, cfg, step, median, fused)
        if s:
            up = F.interpolate(torch.stack((u1, u2), 1), size=i0s[s - 1].shape[-2:], mode="bilinear",
                               align_corners=False) / cfg.scale_step  # [N,2,h,w]
            u1, u2 = up[:, 0], up[:, 1]
    return torch.stack((u1, u2), 1)  # [N,2,H,W]

