"""Optical flow: one entry point over the tensor implementations and the OpenCV references.

``compute_flow(prev, nxt, method)`` maps uint8 grayscale frames ``[N,H,W]`` (numpy or torch) to float32 flow
``[N,2,H,W]`` in pixels (x then y) with ``nxt(p + flow(p)) ~ prev(p)``, the convention of OpenCV's
``calc(prev, nxt)``. Methods:

* ``tvl1``: batched PyTorch TV-L1 (tvl1.py; Zach et al. 2007 / Sanchez et al. IPOL 2013, OpenCV's defaults),
  CPU or CUDA; on the CPU its inner loop and median run as fused C (tvl1_cpu.py).
* ``brox``: batched PyTorch Brox et al. 2004 (brox.py; dense_flow's defaults), CPU or CUDA.
* ``tvl1-opencv``, ``dis``, ``farneback``: OpenCV on the CPU (opencv_flow.py).

``default_params(method)`` is the full parameter dict a method runs with; extraction records it in the store.
The flow math is pure tensor/array code: no file or video I/O here (images.py and stacks.py likewise).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from .brox import BroxConfig, brox
from .images import flow_to_images, images_to_flow
from .opencv_flow import OPENCV_DEFAULTS, opencv_flow
from .stacks import assemble_stacks, pairs_for_stacks, stack_pair_indices
from .tvl1 import TVL1Config, tvl1

__all__ = [
    "FLOW_METHODS", "assemble_stacks", "brox", "compute_flow", "default_batch_size", "default_params", "flow_kernel",
    "flow_to_images", "images_to_flow", "opencv_flow", "pairs_for_stacks", "stack_pair_indices", "tvl1",
]

FLOW_METHODS = ("tvl1", "brox", "tvl1-opencv", "dis", "farneback")
_TORCH_METHODS = {"tvl1": (tvl1, TVL1Config), "brox": (brox, BroxConfig)}


def flow_kernel(method: str, device: str = "cpu") -> str | None:
    """``"c"`` when ``method`` runs the fused C loop on ``device`` (TV-L1 on the CPU where a compiler built it), else
    None (the torch or OpenCV code). A feature store records it: the two agree only up to float rounding, so a store
    is never continued with the other."""
    if method != "tvl1" or str(device).startswith("cuda"):
        return None
    from .tvl1_cpu import load

    return "c" if load() is not None else None


def default_params(method: str) -> dict:
    """Every parameter ``method`` runs with by default (what a feature store records)."""
    if method in _TORCH_METHODS:
        return _TORCH_METHODS[method][1]().to_dict()
    if method in OPENCV_DEFAULTS:
        return dict(OPENCV_DEFAULTS[method])
    raise ValueError(f"unknown flow method {method!r}; choose from {', '.join(FLOW_METHODS)}")


def default_batch_size(device: torch.device) -> int:
    """Pairs per call: 1 on CPU (pairs run one after the other in the fused loop anyway, and a batch's pyramid and
    warps leave the cache: batch 8 ran at 8.4x OpenCV's rate against 9.0x for single pairs at 340x256 in
    bench/flow.py), 128 on a GPU to fill the device."""
    return 1 if device.type == "cpu" else 128


def _one_thread_each(fn, chunks, threads: int) -> None:
    """Run ``fn(chunk)`` for every chunk on ``threads`` worker threads, each doing its tensor ops on one thread.

    Why not torch's intra-op threads: TV-L1 is thousands of small element-wise ops per pair, each ending in an
    OpenMP barrier; when the cores are shared, a thread that lost its core stalls its partner at every barrier (and
    the partner spins), so two intra-op threads ran at 0.16x OpenCV's rate under load. Pairs on separate threads
    never wait for each other: each op runs on its caller's thread with the GIL released.
    """
    chunks = list(chunks)
    threads = max(1, min(threads, len(chunks)))
    before = torch.get_num_threads()
    try:
        if threads == 1:
            torch.set_num_threads(1)
            for c in chunks:
                fn(c)
            return

        def work(c):
            torch.set_num_threads(1)  # this thread's OpenMP team size (per thread)
            fn(c)

        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(work, chunks))
    finally:
        torch.set_num_threads(before)


def compute_flow(prev, nxt, method: str = "tvl1", device=None, batch_size: int | None = None,
                 compile: bool = False, threads: int | None = None, kernel: str = "auto", **params):
    """Flow from ``prev`` to ``nxt``: uint8 ``[N,H,W]`` x2 (numpy or torch) -> float32 ``[N,2,H,W]`` (x, y; px).

    Returns the input's type (numpy in, numpy out; torch in, a CPU torch tensor out). ``device`` picks where the
    torch methods run (default: the input tensor's device, else CPU); ``batch_size`` how many pairs go in one call
    (default :func:`default_batch_size`); ``compile`` runs TV-L1's iteration through ``torch.compile``.
    ``threads`` (CPU, torch methods): the batches are spread over this many worker threads of one intra-op
    thread each (default ``torch.get_num_threads()``, the process's thread budget; see :func:`_one_thread_each`).
    ``kernel`` (TV-L1): ``auto`` runs the fused C loop on the CPU where it can be built, ``torch`` the torch ops
    (what a store recorded: :func:`flow_kernel`). ``params`` override :func:`default_params`.
    """
    if method not in FLOW_METHODS:
        raise ValueError(f"unknown flow method {method!r}; choose from {', '.join(FLOW_METHODS)}")
    as_numpy = not isinstance(prev, torch.Tensor)
    if tuple(prev.shape) != tuple(nxt.shape) or len(prev.shape) != 3:
        raise ValueError(f"expected two uint8 [N,H,W] arrays, got {tuple(prev.shape)} and {tuple(nxt.shape)}")
    if method in OPENCV_DEFAULTS:
        a = prev.cpu().numpy() if not as_numpy else np.asarray(prev)
        b = nxt.cpu().numpy() if not as_numpy else np.asarray(nxt)
        out = opencv_flow(a.astype(np.uint8, copy=False), b.astype(np.uint8, copy=False), method, **params)
        return out if as_numpy else torch.from_numpy(out)
    fn, cfg_cls = _TORCH_METHODS[method]
    cfg_cls(**params)  # validate names before any work
    a = torch.as_tensor(prev)
    b = torch.as_tensor(nxt)
    dev = torch.device(device) if device is not None else a.device
    bs = batch_size or default_batch_size(dev)
    extra = {"compile": compile, "kernel": kernel} if method == "tvl1" else {}
    out = torch.empty((a.shape[0], 2, *a.shape[1:]), dtype=torch.float32)

    def run(s: int) -> None:
        p = a[s:s + bs].to(dev, torch.float32)[:, None]  # [b,1,H,W], intensities 0..255
        q = b[s:s + bs].to(dev, torch.float32)[:, None]
        out[s:s + bs] = fn(p, q, **extra, **params).cpu()

    starts = range(0, a.shape[0], bs)
    if dev.type == "cpu":
        _one_thread_each(run, starts, threads or torch.get_num_threads())
    else:
        for s in starts:
            run(s)
    return out.numpy() if as_numpy else out
