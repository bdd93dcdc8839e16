"""Flow fields as the papers store them: 8-bit images, each component clipped at +-bound.

Ma et al. 2017 (Sec. 4.1): TV-L1 flow clipped at +-20 and rescaled to [0, 255]; Ng et al. 2015 (Sec. 4):
clipped at +-40, rescaled to [0, 255], "the third dimension is set to zero". Here value 128 is zero flow, 0 is
``-bound`` and 255 is ``+bound * 127/128`` (one step of ``bound/128`` px), so zero round-trips exactly.
Works on numpy arrays and torch tensors alike; pure array code.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["DEFAULT_BOUND", "flow_to_images", "images_to_flow"]

DEFAULT_BOUND = 20.0  # Ma et al.; Ng et al. use 40


def flow_to_images(flow, bound: float = DEFAULT_BOUND, third_channel: bool = False):
    """Float flow ``[..., 2, H, W]`` (pixels) -> uint8 ``[..., 2 or 3, H, W]``; |flow| beyond ``bound`` is clipped.

    ``third_channel=True`` appends a channel of zeros (Ng et al.'s 3-channel flow images).
    """
    if flow.shape[-3] != 2:
        raise ValueError(f"expected [..., 2, H, W] flow, got {tuple(flow.shape)}")
    if bound <= 0:
        raise ValueError(f"bound must be positive, got {bound}")
    lib = torch if isinstance(flow, torch.Tensor) else np
    q = lib.round(flow * (128.0 / bound)) + 128.0
    img = lib.clip(q, 0, 255)
    img = img.to(torch.uint8) if lib is torch else img.astype(np.uint8)
    if third_channel:
        zeros = lib.zeros_like(img[..., :1, :, :])
        img = lib.cat((img, zeros), -3) if lib is torch else np.concatenate((img, zeros), -3)
    return img


def images_to_flow(images, bound: float = DEFAULT_BOUND):
    """uint8 ``[..., 2 or 3, H, W]`` -> float32 flow ``[..., 2, H, W]`` in pixels (the inverse of
    :func:`flow_to_images` up to its rounding step ``bound / 128``; a third channel is dropped)."""
    x = images[..., :2, :, :]
    if isinstance(x, torch.Tensor):
        return (x.to(torch.float32) - 128.0) * (bound / 128.0)
    return ((x.astype(np.float32) - 128.0) * np.float32(bound / 128.0)).astype(np.float32)
