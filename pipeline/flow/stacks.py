"""Stacked optical flow (Simonyan & Zisserman's temporal stream; L = 10 as in Wu et al. and Ma et al.).

A stack at sampled frame ``t`` is the flow of the ``L`` consecutive pairs ``(t, t+1), ..., (t+L-1, t+L)``, with
channels interleaved per pair as TSN stores them: ``x1, y1, x2, y2, ...`` (``2L`` channels). Pair ``i`` means
frames ``(i, i+1)``. A stack that runs past the last pair repeats the last pair, as TSN's loader does (it stops
advancing at the last flow image). Overlapping stacks share pairs, and each pair is computed once.
Pure index / array code.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["assemble_stacks", "pairs_for_stacks", "stack_pair_indices"]


def stack_pair_indices(n_frames: int, positions, length: int = 10) -> np.ndarray:
    """Pair index of every slot of every stack: ``[n_samples, length]`` int64, clamped to the last pair."""
    if n_frames < 2:
        raise ValueError(f"stacked flow needs at least 2 frames, got {n_frames}")
    if length < 1:
        raise ValueError(f"stack length must be >= 1, got {length}")
    pos = np.asarray(positions, dtype=np.int64).reshape(-1)  # [n_samples]
    if (pos < 0).any():
        raise ValueError("sampled positions must be >= 0")
    return np.minimum(pos[:, None] + np.arange(length), n_frames - 2)  # [n_samples, length]


def pairs_for_stacks(n_frames: int, positions, length: int = 10) -> list[tuple[int, int]]:
    """The consecutive frame pairs ``(i, i+1)`` the stacks need, each once, in frame order."""
    starts = np.unique(stack_pair_indices(n_frames, positions, length))
    return [(int(i), int(i) + 1) for i in starts]


def assemble_stacks(pair_flows, pairs, n_frames: int, positions, length: int = 10):
    """Stacks ``[n_samples, 2*length, H, W]`` from per-pair flow (or flow images) ``[P, 2, H, W]``.

    ``pair_flows[k]`` is the flow of ``pairs[k]`` (as returned by :func:`pairs_for_stacks`); numpy or torch in,
    the same type out, dtype kept.
    """
    row = {p[0]: k for k, p in enumerate(pairs)}
    idx = stack_pair_indices(n_frames, positions, length)  # [n, L]
    try:
        rows = np.vectorize(row.__getitem__, otypes=[np.int64])(idx)  # [n, L] rows of pair_flows
    except KeyError as e:
        raise ValueError(f"pair starting at frame {e.args[0]} is needed but was not given") from None
    if isinstance(pair_flows, torch.Tensor):
        g = pair_flows[torch.from_numpy(rows.reshape(-1))]  # [n*L, 2, H, W]
    else:
        g = pair_flows[rows.reshape(-1)]
    return g.reshape(len(rows), 2 * length, *pair_flows.shape[-2:])  # [n, 2L, H, W]: x1, y1, x2, y2, ...
