"""TV-L1's primal-dual inner loop and 5x5 median as fused C for the CPU (the arithmetic of ``tvl1._tvl1_iteration``
and, bit for bit, ``tvl1._median_``).

Eager torch runs an iteration as ~20 full-image element-wise ops; at 340x256 each op streams its operands through
the last-level cache, and the op count, not the arithmetic, sets the time. Here one iteration is two passes over
the image (the thresholding step and ``u = v + div q``, then the dual update of ``q``; IPOL 2013 Eq. 13-18), and
a pair's whole inner loop, its stopping test included (Alg. 2, line 14), is one call: no temporaries, no
allocation, no intra-op threads (so nothing waits on a busy core). The median runs tvl1.py's separable selection
networks row by row, so a row's ~40 wires stay in the L1 cache instead of streaming ~60 full images.

The C source below is compiled on first use with the system C compiler (``cc``, or ``$CC``) into the user's
cache (``$XDG_CACHE_HOME/twostream``, else ``~/.cache/twostream``), keyed by the source, the flags and the CPU;
where no compiler is found, or ``TWOSTREAM_FLOW_KERNEL=torch`` is set, :func:`load` returns None and TV-L1 runs
its torch iteration (same results up to float rounding).
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading

import torch

__all__ = ["inner_loop", "load", "median_"]

_SOURCE = r"""
#include <math.h>
#include <stddef.h>

/* Layout per pair (contiguous float32, as tvl1.py's state buffers):
   U [2][H+1][W+1] (row H / column W repeat the last row / column), PX [2][H][W+1] (column 0 = 0),
   PY [2][H+1][W] (row 0 = 0), a [H][W], b [2][H][W], g [2][H][W]. */

static void refresh_border(float *U, int H, int W) {
    const int Wp = W + 1;
    for (int c = 0; c < 2; c++) {
        float *u = U + (size_t)c * (H + 1) * Wp;
        for (int x = 0; x < Wp; x++) u[(size_t)H * Wp + x] = u[(size_t)(H - 1) * Wp + x];
        for (int y = 0; y <= H; y++) u[(size_t)y * Wp + W] = u[(size_t)y * Wp + W - 1];
    }
}

static double iteration(float *U, float *PX, float *PY, const float *a, const float *b, const float *g,
                        int H, int W, float lt, float tau, float taut) {
    const int Wp = W + 1;
    const size_t HW = (size_t)H * W;
    float *U0 = U, *U1 = U + (size_t)(H + 1) * Wp;
    float *PX0 = PX, *PX1 = PX + (size_t)H * Wp;
    float *PY0 = PY, *PY1 = PY + (size_t)(H + 1) * W;
    double err = 0.0;
    for (int y = 0; y < H; y++) {
        float *restrict u0 = U0 + (size_t)y * Wp, *restrict u1 = U1 + (size_t)y * Wp;
        const float *restrict ar = a + (size_t)y * W;
        const float *restrict b0 = b + (size_t)y * W, *restrict b1 = b + HW + (size_t)y * W;
        const float *restrict g0 = g + (size_t)y * W, *restrict g1 = g + HW + (size_t)y * W;
        const float *restrict px0 = PX0 + (size_t)y * Wp, *restrict px1 = PX1 + (size_t)y * Wp;
        const float *restrict py0 = PY0 + (size_t)y * W, *restrict py1 = PY1 + (size_t)y * W;
        float e = 0.0f;
        #pragma omp simd reduction(+:e)
        for (int x = 0; x < W; x++) {
            float fi = ar[x] + b0[x] * u0[x];
            fi = fi + b1[x] * u1[x];
            fi = fi < -lt ? -lt : (fi > lt ? lt : fi);               /* TH step, IPOL Eq. 13-14 */
            float d0 = ((px0[x + 1] - px0[x]) + py0[x + W]) - py0[x];   /* theta div p, Eq. 17 */
            float d1 = ((px1[x + 1] - px1[x]) + py1[x + W]) - py1[x];
            d0 = d0 + fi * g0[x];
            d1 = d1 + fi * g1[x];
            u0[x] += d0;                                               /* u = v + theta div p, Eq. 15 */
            u1[x] += d1;
            e += d0 * d0 + d1 * d1;
        }
        err += e;
    }
    refresh_border(U, H, W);
    for (int c = 0; c < 2; c++) {
        const float *Uc = U + (size_t)c * (H + 1) * Wp;
        float *PXc = PX + (size_t)c * H * Wp, *PYc = PY + (size_t)c * (H + 1) * W;
        for (int y = 0; y < H; y++) {
            const float *restrict u = Uc + (size_t)y * Wp, *restrict un = u + Wp;
            float *restrict px = PXc + (size_t)y * Wp + 1, *restrict py = PYc + (size_t)(y + 1) * W;
            #pragma omp simd
            for (int x = 0; x < W; x++) {
                float ux = u[x + 1] - u[x], uy = un[x] - u[x];            /* forward differences, Eq. 18 */
                float ng = sqrtf(ux * ux + uy * uy) * taut + 1.0f;        /* dual projection, Eq. 16 */
                px[x] = (px[x] + tau * ux) / ng;
                py[x] = (py[x] + tau * uy) / ng;
            }
        }
    }
    return err / (double)HW;
}

/* Up to `iters` iterations; 1 as soon as mean |u^{n+1} - u^n|^2 <= eps2 (the pair stops for this warp), else 0. */
int tvl1_inner(float *U, float *PX, float *PY, const float *a, const float *b, const float *g, int H, int W,
               float lt, float tau, float taut, int iters, float eps2) {
    for (int i = 0; i < iters; i++)
        if ((float)iteration(U, PX, PY, a, b, g, H, W, lt, tau, taut) <= eps2) return 1;
    return 0;
}
"""

def _network_code(network, wires: str, n: str) -> str:
    """C for a pruned comparator network (tvl1.py's ``(i, j, want_min, want_max)`` lists) over row arrays:
    ``wires[i]`` is a ``float *``, each comparator one vectorisable loop over ``n`` elements."""
    lines = []
    for i, j, want_min, want_max in network:
        body = [f"float a = {wires}[{i}][x], b = {wires}[{j}][x];"]
        if want_min:
            body.append(f"{wires}[{i}][x] = b < a ? b : a;")
        if want_max:
            body.append(f"{wires}[{j}][x] = a < b ? b : a;")
        lines.append(f"    for (int x = 0; x < {n}; x++) {{ {' '.join(body)} }}")
    return "\n".join(lines)


def _median_source() -> str:
    """The exact 5x5 median of tvl1.median5 (same separable networks, same order of comparisons) row by row, so
    that a row's ~40 wires stay in the L1 cache; in place on one pair's flow buffer U, border refreshed."""
    from .tvl1 import _PAIR, _PAIR_ORDER, _QUAD, _QUAD_OUT, _SORT5

    order = ", ".join(map(str, _PAIR_ORDER))
    qout = ", ".join(map(str, _QUAD_OUT))
    return f"""
#include <stdlib.h>
#include <string.h>

static void sort5(float **w, int n) {{
{_network_code(_SORT5, "w", "n")}
}}

static void pair10(float **w, int n) {{
{_network_code(_PAIR, "w", "n")}
}}

static void quad20(float **w, int n) {{
{_network_code(_QUAD, "w", "n")}
}}

/* 5x5 median (replicated borders) of both components of U [2][H+1][W+1] in place; 0 on success. */
int tvl1_median(float *U, int H, int W) {{
    static const int ORDER[10] = {{{order}}}, QOUT[6] = {{{qout}}};
    const int Wp = W + 1, Hp4 = H + 4, Wp4 = W + 4, NE = (Wp4 + 1) / 2, NO = Wp4 / 2;
    const int kq = W / 2 + 1, ne = (W + 1) / 2, no = W / 2;
    float *xe = malloc(sizeof(float) * (size_t)Hp4 * NE), *xo = malloc(sizeof(float) * (size_t)Hp4 * NO);
    float *buf = malloc(sizeof(float) * (size_t)40 * (NE + 1));
    if (!xe || !xo || !buf) {{ free(xe); free(xo); free(buf); return 1; }}
    float *ev[5], *od[5], *pw[10], *qw[20], *q[6];
    for (int i = 0; i < 5; i++) {{ ev[i] = buf + (size_t)i * (NE + 1); od[i] = buf + (size_t)(5 + i) * (NE + 1); }}
    for (int i = 0; i < 10; i++) pw[i] = buf + (size_t)(10 + i) * (NE + 1);
    for (int i = 0; i < 20; i++) qw[i] = buf + (size_t)(20 + i) * (NE + 1);
    for (int c = 0; c < 2; c++) {{
        float *u = U + (size_t)c * (H + 1) * Wp;
        for (int py = 0; py < Hp4; py++) {{  /* replicate-padded copy, de-interleaved into even / odd columns */
            const float *row = u + (size_t)(py < 2 ? 0 : (py - 2 > H - 1 ? H - 1 : py - 2)) * Wp;
            for (int px = 0; px < Wp4; px++) {{
                float v = row[px < 2 ? 0 : (px - 2 > W - 1 ? W - 1 : px - 2)];
                if (px & 1) xo[(size_t)py * NO + px / 2] = v; else xe[(size_t)py * NE + px / 2] = v;
            }}
        }}
        for (int y = 0; y < H; y++) {{
            for (int k = 0; k < 5; k++) {{
                memcpy(ev[k], xe + (size_t)(y + k) * NE, sizeof(float) * NE);
                memcpy(od[k], xo + (size_t)(y + k) * NO, sizeof(float) * NO);
            }}
            sort5(ev, NE);
            sort5(od, NO);
            for (int i = 0; i < 5; i++) {{
                memcpy(pw[i], ev[i], sizeof(float) * (kq + 1));
                memcpy(pw[5 + i], od[i], sizeof(float) * (kq + 1));
            }}
            pair10(pw, kq + 1);
            for (int i = 0; i < 10; i++) {{
                memcpy(qw[i], pw[ORDER[i]], sizeof(float) * kq);
                memcpy(qw[10 + i], pw[ORDER[i]] + 1, sizeof(float) * kq);
            }}
            quad20(qw, kq);
            for (int r = 0; r < 6; r++) q[r] = qw[QOUT[r]];
            float *o = u + (size_t)y * Wp;
            for (int j = 0; j < ne; j++) {{
                float m = q[5][j];
                for (int i = 1; i < 6; i++) {{
                    float t = ev[i - 1][2 + j] < q[5 - i][j] ? q[5 - i][j] : ev[i - 1][2 + j];
                    m = t < m ? t : m;
                }}
                o[2 * j] = m;
            }}
            for (int j = 0; j < no; j++) {{
                float m = q[5][1 + j];
                for (int i = 1; i < 6; i++) {{
                    float t = od[i - 1][j] < q[5 - i][1 + j] ? q[5 - i][1 + j] : od[i - 1][j];
                    m = t < m ? t : m;
                }}
                o[2 * j + 1] = m;
            }}
        }}
    }}
    free(xe); free(xo); free(buf);
    refresh_border(U, H, W);
    return 0;
}}
"""


_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp-simd", "-fPIC", "-shared", "-std=c99"]
_LOCK = threading.Lock()
_LIB: list = []  # [ctypes function or None] once tried


def _cpu_key() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith(("flags", "Features"))), "")
    except OSError:
        flags = ""
    return platform.machine() + flags


def _compile() -> str | None:
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if not cc:
        return None
    source = _SOURCE + _median_source()
    key = hashlib.sha256("\0".join([source, cc, *_FLAGS, _cpu_key()]).encode()).hexdigest()[:16]
    cache = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "twostream")
    path = os.path.join(cache, f"tvl1_cpu_{key}.so")
    if os.path.exists(path):
        return path
    try:
        os.makedirs(cache, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = os.path.join(tmp, "tvl1_cpu.c"), os.path.join(tmp, "tvl1_cpu.so")
            with open(src, "w") as f:
                f.write(source)
            subprocess.run([cc, *_FLAGS, src, "-o", out, "-lm"], check=True, capture_output=True, timeout=120)
            os.replace(out, path)  # atomic: concurrent processes never load a half-written file
    except (OSError, subprocess.SubprocessError):
        return None
    return path


def load():
    """The compiled library (ctypes; ``tvl1_inner``, ``tvl1_median``), or None where it cannot be built or is
    switched off."""
    with _LOCK:
        if not _LIB:
            fn = None
            if os.environ.get("TWOSTREAM_FLOW_KERNEL", "c") != "torch":
                path = _compile()
                if path:
                    try:
                        lib = ctypes.CDLL(path)
                        P, I, Fl = ctypes.c_void_p, ctypes.c_int, ctypes.c_float
                        lib.tvl1_inner.argtypes = [P, P, P, P, P, P, I, I, Fl, Fl, Fl, I, Fl]
                        lib.tvl1_inner.restype = I
                        lib.tvl1_median.argtypes = [P, I, I]
                        lib.tvl1_median.restype = I
                        fn = lib
                    except (OSError, AttributeError):
                        fn = None
            _LIB.append(fn)
        return _LIB[0]


def inner_loop(fn, U, PX, PY, a, b, g, lt: float, tau: float, taut: float, iters: int, eps2: float) -> bool:
    """One pair's inner loop in place on its state: ``U`` [2,H+1,W+1], ``PX`` [2,H,W+1], ``PY`` [2,H+1,W],
    ``a`` [H,W], ``b`` and ``g`` [2,H,W] (contiguous float32 CPU). True once the pair has converged."""
    for t in (U, PX, PY, a, b, g):
        if t.dtype != torch.float32 or not t.is_contiguous() or t.device.type != "cpu":
            raise ValueError("tvl1_cpu needs contiguous float32 CPU tensors")
    h, w = a.shape
    return bool(fn.tvl1_inner(U.data_ptr(), PX.data_ptr(), PY.data_ptr(), a.data_ptr(), b.data_ptr(), g.data_ptr(),
                              h, w, lt, tau, taut, iters, eps2))


def median_(fn, U) -> None:
    """5x5 median of one pair's flow buffer ``U`` [2,H+1,W+1] (contiguous float32 CPU) in place, border refreshed:
    the result of ``tvl1._median_`` bit for bit."""
    if U.dtype != torch.float32 or not U.is_contiguous() or U.device.type != "cpu" or U.dim() != 3:
        raise ValueError("tvl1_cpu needs a contiguous float32 CPU tensor [2,H+1,W+1]")
    if fn.tvl1_median(U.data_ptr(), U.shape[-2] - 1, U.shape[-1] - 1):
        raise MemoryError("tvl1_cpu: median buffers")
