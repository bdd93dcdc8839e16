"""Optical flow: one entry point over the tensor implementations and the OpenCV references.

``compute_flow(prev, nxt, method)`` maps uint8 grayscale frames ``[N,H,W]`` (numpy or torch) to float32 flow
``[N,2,H,W]`` in pixels (x then y) with ``nxt(p + flow(p)) ~ prev(p)``, the convention of OpenCV's
``calc(prev, nxt)``. Methods:

* ``tvl1``: batched PyTorch TV-L1 (tvl1.py; Zach et al. 2007 / Sanchez et al. IPOL 2013, OpenCV's defaults),
  CPU or CUDA.
* ``brox``: batched PyTorch Brox et al. 2004 (brox.py; dense_flow's defaults), CPU or CUDA.
* ``tvl1-opencv``, ``dis``, ``farneback``: OpenCV on the CPU (opencv_flow.py).

``default_params(method)`` is the full parameter dict a method runs with; extraction records it in the store.
The flow math is pure tensor/array code: no file or video I/O here (images.py and stacks.py likewise).
"""
from __future__ import annotations

import numpy as np
import torch

from .brox import BroxConfig, brox
from .images import flow_to_images, images_to_flow
from .opencv_flow import OPENCV_DEFAULTS, opencv_flow
from .stacks import assemble_stacks, pairs_for_stacks, stack_pair_indices
from .tvl1 import TVL1Config, tvl1

__all__ = [
    "FLOW_METHODS", "assemble_stacks", "brox", "compute_flow", "default_batch_size", "default_params",
    "flow_to_images", "images_to_flow", "opencv_flow", "pairs_for_stacks", "stack_pair_indices", "tvl1",
]

FLOW_METHODS = ("tvl1", "brox", "tvl1-opencv", "dis", "farneback")
_TORCH_METHODS = {"tvl1": (tvl1, TVL1Config), "brox": (brox, BroxConfig)}


def default_params(method: str) -> dict:
    """Every parameter ``method`` runs with by default (what a feature store records)."""
    if method in _TORCH_METHODS:
        return _TORCH_METHODS[method][1]().to_dict()
    if method in OPENCV_DEFAULTS:
        return dict(OPENCV_DEFAULTS[method])
    raise ValueError(f"unknown flow method {method!r}; choose from {', '.join(FLOW_METHODS)}")


def default_batch_size(device: torch.device) -> int:
    """Pairs per call: 1 on CPU (batches of 8 / 32 leave the cache and wait for their slowest pair: 1.35x / 1.32x
    OpenCV's rate against 1.68x for single pairs at 340x256 in bench/flow.py), 128 on a GPU to fill the device."""
    return 1 if device.type == "cpu" else 128


def compute_flow(prev, nxt, method: str = "tvl1", device=None, batch_size: int | None = None,
                 compile: bool = False, **params):
    """Flow from ``prev`` to ``nxt``: uint8 ``[N,H,W]`` x2 (numpy or torch) -> float32 ``[N,2,H,W]`` (x, y; px).

    Returns the input's type (numpy in, numpy out; torch in, a CPU torch tensor out). ``device`` picks where the
    torch methods run (default: the input tensor's device, else CPU); ``batch_size`` how many pairs go in one call
    (default :func:`default_batch_size`); ``compile`` runs TV-L1's iteration through ``torch.compile``.
    ``params`` override :func:`default_params`.
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
    extra = {"compile": compile} if method == "tvl1" else {}
    out = torch.empty((a.shape[0], 2, *a.shape[1:]), dtype=torch.float32)
    for s in range(0, a.shape[0], bs):
        p = a[s:s + bs].to(dev, torch.float32)[:, None]  # [b,1,H,W], intensities 0..255
        q = b[s:s + bs].to(dev, torch.float32)[:, None]
        out[s:s + bs] = fn(p, q, **extra, **params).cpu()
    return out.numpy() if as_numpy else out
