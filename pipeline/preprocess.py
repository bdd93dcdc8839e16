"""Frames to normalised CNN input, as the backbone's ``spec`` says (pure torch, no file or video I/O).

The pipeline a weights file was trained with ships with it (torchvision's weights entries, timm's
``pretrained_cfg``): resize the shorter side to ``spec["resize"]``, crop ``spec["input_size"]``, scale to
[0, 1], subtract ``mean`` and divide by ``std``. ``preprocess`` returns ``[N, V, C, S, S]`` where V counts the
test-time views (``center`` 1, ``flip`` 2, ``10crop`` 10); features are averaged over V afterwards.

A spec with ``resize_dtype: "uint8"`` (every backbone built now) resizes and crops the uint8 frames and converts
only the crops to float, as PIL does for the pipelines these weights were trained with: PyTorch's uint8 kernels
give PIL's values (to two grey levels) several times faster than resizing floats. Specs without the key (stores
made before it) resize floats, so those stores' features are reproduced exactly.

Flow stacks (Simonyan & Zisserman; TSN; Ma et al. 3.1) arrive as uint8 flow images ``[N, H, W, 2L]`` with
channels interleaved ``(x_1, y_1, x_2, y_2, ...)`` and 128 meaning zero motion. Mirroring a flow field
negates its horizontal component, which on uint8 images is ``x -> 255 - x`` (``1 - x`` after /255).

Stacks share flow images (the stack at frame t and the one at t + 2 have L - 2 fields in common): ``flow_stack_views``
preprocesses each distinct flow image once and gathers the stacks afterwards, the same values as ``preprocess`` of
the stacks (every step is per pixel and channel), for about a fifth of the work on 25 stacks of 10 from 48 frames.

Multiresolution (Karpathy et al. 2014, Section 3.2): ``foveated_views`` splits a full-resolution crop into a
context view (the whole crop downsampled by 2) and a fovea view (the centre crop at full resolution, half the
side); each view has a quarter of the pixels, so the pair costs about half a full-resolution pass.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

__all__ = [
    "TTA_VIEWS",
    "center_crop",
    "five_crop",
    "flow_stack_views",
    "foveated_views",
    "hflip",
    "normalize",
    "preprocess",
    "resize_shorter",
    "to_chw",
    "to_float_chw",
    "tta_views",
    "view_flips",
]

#: number of views each test-time augmentation yields
TTA_VIEWS = {"center": 1, "flip": 2, "10crop": 10}


def to_chw(frames, in_chans: int = 3) -> torch.Tensor:
    """Frames ``[N, H, W, C]`` (or ``[N, H, W]`` grayscale) -> ``[N, C, H, W]``, dtype kept (a view of the input:
    channels-last memory). Grayscale (1 channel) is replicated to 3 channels when the network expects RGB."""
    x = torch.from_numpy(np.ascontiguousarray(frames)) if isinstance(frames, np.ndarray) else torch.as_tensor(frames)
    if x.dim() == 3:
        x = x.unsqueeze(-1)  # [N,H,W] -> [N,H,W,1]
    if x.dim() != 4:
        raise ValueError(f"frames must be [N, H, W, C] or [N, H, W]; got shape {tuple(x.shape)}")
    if x.shape[-1] == 1 and in_chans == 3:
        x = x.expand(-1, -1, -1, 3)  # [N,H,W,1] -> [N,H,W,3]
    if x.shape[-1] != in_chans:
        raise ValueError(f"frames have {x.shape[-1]} channels, the backbone expects {in_chans}")
    return x.permute(0, 3, 1, 2)  # [N,H,W,C] -> [N,C,H,W]


def to_float_chw(frames, in_chans: int = 3) -> torch.Tensor:
    """uint8 frames ``[N, H, W, C]`` (or ``[N, H, W]`` grayscale) -> float ``[N, C, H, W]`` in [0, 1]."""
    x = to_chw(frames, in_chans)
    return x.float().div_(255.0 if x.dtype == torch.uint8 else 1.0)


def resize_shorter(x: torch.Tensor, size: int, interpolation: str = "bilinear") -> torch.Tensor:
    """Resize ``[N, C, H, W]`` so that min(H, W) == size, keeping the aspect ratio (antialiased, like PIL).

    uint8 input gives uint8 output, rounded and saturated as PIL does; the values do not depend on memory layout.
    """
    h, w = x.shape[-2:]
    if min(h, w) == size:
        return x
    scale = size / min(h, w)
    out_hw = (size, max(size, round(w * scale))) if h <= w else (max(size, round(h * scale)), size)
    if x.dtype == torch.uint8:  # PyTorch's uint8 kernels: channels-last is the fast one for 3 or 4 channels
        layout = torch.channels_last if x.shape[1] in (3, 4) else torch.contiguous_format
        return F.interpolate(x.contiguous(memory_format=layout), size=out_hw, mode=interpolation,
                             align_corners=False, antialias=True)
    y = F.interpolate(x, size=out_hw, mode=interpolation, align_corners=False, antialias=True)  # [N,C,h',w']
    # bicubic overshoots; PIL's uint8 output clips, so do the same
    return y.clamp_(0.0, 1.0) if interpolation == "bicubic" else y


def _crop(x: torch.Tensor, top: int, left: int, size: int) -> torch.Tensor:
    return x[..., top:top + size, left:left + size]  # [...,H,W] -> [...,S,S]


def center_crop(x: torch.Tensor, size: int) -> torch.Tensor:
    """Centre ``size x size`` crop of ``[..., H, W]`` (torchvision rounding)."""
    h, w = x.shape[-2:]
    if h < size or w < size:
        raise ValueError(f"cannot crop {size}x{size} from {h}x{w}")
    return _crop(x, round((h - size) / 2.0), round((w - size) / 2.0), size)


def five_crop(x: torch.Tensor, size: int) -> list[torch.Tensor]:
    """Top-left, top-right, bottom-left, bottom-right and centre crops (torchvision ``five_crop`` order)."""
    h, w = x.shape[-2:]
    return [_crop(x, 0, 0, size), _crop(x, 0, w - size, size), _crop(x, h - size, 0, size),
            _crop(x, h - size, w - size, size), center_crop(x, size)]


def hflip(x: torch.Tensor, flow: bool = False) -> torch.Tensor:
    """Mirror ``[..., C, H, W]`` (uint8, or float in [0, 1]). For a flow stack (interleaved x, y) the x channels
    become 255 - x (1 - x on floats)."""
    y = x.flip(-1)
    if flow:
        top = 255 if x.dtype == torch.uint8 else 1.0
        y = y.clone()
        y[..., 0::2, :, :] = top - y[..., 0::2, :, :]  # u -> -u around 128 (0.5 on floats)
    return y


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(x - mean) / std per channel of ``[..., C, H, W]``."""
    m = torch.tensor(mean, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    s = torch.tensor(std, dtype=x.dtype, device=x.device).view(-1, 1, 1)
    return (x - m) / s


def view_flips(tta: str) -> list[bool]:
    """Which of the ``tta`` views are mirrored (to un-mirror spatial maps before averaging them)."""
    if tta not in TTA_VIEWS:
        raise ValueError(f"unknown tta {tta!r}; choose one of {', '.join(TTA_VIEWS)}")
    n = TTA_VIEWS[tta]
    return [False] * n if n == 1 else [False] * (n // 2) + [True] * (n // 2)


def tta_views(x: torch.Tensor, size: int, tta: str = "center", flow: bool = False) -> torch.Tensor:
    """``[N, C, H, W]`` (already resized) -> ``[N, V, C, S, S]``.

    ``center``: the centre crop. ``flip``: centre crop and its mirror. ``10crop``: the four corners and the
    centre, then the mirrors of those five in the same order (view ``5 + i`` is ``hflip`` of view ``i``).
    """
    flips = view_flips(tta)
    crops = five_crop(x, size) if tta == "10crop" else [center_crop(x, size)]
    if any(flips):
        crops = crops + [hflip(c, flow=flow) for c in crops]
    return torch.stack(crops, dim=1)  # V x [N,C,S,S] -> [N,V,C,S,S]


def preprocess(frames, spec: dict, tta: str = "center") -> torch.Tensor:
    """uint8 frames ``[N, H, W, C]`` (RGB, or a flow stack with ``C = 2L``) -> normalised ``[N, V, C, S, S]``.

    ``spec`` is a backbone's ``spec`` (keys ``resize``, ``input_size``, ``interpolation``, ``mean``, ``std``,
    ``in_chans``, ``modality``). A foveated backbone takes the same full-resolution crop and splits it itself.
    """
    x = to_chw(frames, int(spec["in_chans"]))  # [N,H,W,C] -> [N,C,H,W]
    x = _resized_views(x, spec, tta, flow=spec.get("modality") == "flow")  # -> [N,V,C,S,S] in [0,1]
    return normalize(x, spec["mean"], spec["std"])


def _resized_views(x: torch.Tensor, spec: dict, tta: str, flow: bool) -> torch.Tensor:
    """``[N, C, H, W]`` (uint8, or float in [0, 1]) -> resized test-time views ``[N, V, C, S, S]`` in [0, 1]: as uint8
    for a spec with ``resize_dtype: uint8``, else as floats (module docstring)."""
    if x.dtype == torch.uint8 and spec.get("resize_dtype") == "uint8":
        x = resize_shorter(x, int(spec["resize"]), spec["interpolation"])  # uint8 [N,C,R,R*w/h]
        return tta_views(x, int(spec["input_size"]), tta, flow=flow).float().div_(255.0)
    # floats: contiguous, as PyTorch's planar float resize kernel is faster than its channels-last one
    x = x.float().div_(255.0 if x.dtype == torch.uint8 else 1.0).contiguous()
    x = resize_shorter(x, int(spec["resize"]), spec["interpolation"])  # [N,C,R,R*w/h]
    return tta_views(x, int(spec["input_size"]), tta, flow=flow)


def flow_stack_views(images, rows, spec: dict, tta: str = "center") -> torch.Tensor:
    """Flow images ``[P, 2, H, W]`` uint8 and the stacks' rows ``[N, L]`` (stack n is images ``rows[n]``, channels
    x, y of each in turn) -> normalised ``[N, V, 2L, S, S]``: bit for bit ``preprocess`` of the assembled stacks
    ``[N, H, W, 2L]``, with each image scaled, resized, cropped, mirrored and normalised once."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else torch.as_tensor(images)
    if x.dim() != 4 or x.shape[1] != 2:
        raise ValueError(f"flow images must be [P, 2, H, W]; got shape {tuple(x.shape)}")
    rows = torch.as_tensor(np.asarray(rows), dtype=torch.int64)  # [N,L]
    n, length = rows.shape
    if 2 * length != int(spec["in_chans"]):
        raise ValueError(f"stacks of {length} flow fields have {2 * length} channels, the backbone expects "
                         f"{spec['in_chans']}")
    views = _resized_views(x, spec, tta, flow=True)  # [P,V,2,S,S] in [0,1], as preprocess
    mean, std = list(spec["mean"]), list(spec["std"])
    per_image = len(set(mean[0::2])) == 1 and len(set(mean[1::2])) == 1 and len(set(std[0::2])) == 1 \
        and len(set(std[1::2])) == 1  # every x channel alike and every y channel alike: normalise each image once
    if per_image:
        views = normalize(views, mean[:2], std[:2])
    p, v, _, s, _ = views.shape
    out = torch.empty((n, v, 2 * length, s, s), dtype=views.dtype)  # [N,V,2L,S,S]
    flat = rows.reshape(-1)  # [N*L]
    if v == 1:  # straight into place: [P,2,S,S] -> [N*L,2,S,S] = [N,1,2L,S,S]
        torch.index_select(views.view(p, 2, s, s), 0, flat, out=out.view(n * length, 2, s, s))
    for i in range(v if v > 1 else 0):  # gather the stacks of view i: [N*L,2,S,S] -> [N,2L,S,S]
        out[:, i] = views[:, i].index_select(0, flat).view(n, 2 * length, s, s)
    return out if per_image else normalize(out, mean, std)


def foveated_views(x: torch.Tensor, size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Karpathy et al. 3.2: ``[..., C, S, S]`` -> (context, fovea), each ``[..., C, size, size]``.

    ``size`` defaults to S // 2. Context: the whole frame downsampled to ``size`` (a 2x2 average when
    S == 2 * size, the antialiased equivalent otherwise). Fovea: the centre ``size x size`` region at full
    resolution. The paper uses 178 -> two 89x89 streams.
    """
    s = x.shape[-1]
    size = s // 2 if size is None else int(size)
    lead = x.shape[:-3]
    flat = x.reshape(-1, *x.shape[-3:])  # [...,C,S,S] -> [M,C,S,S]
    if s == 2 * size and x.shape[-2] == s:
        context = F.avg_pool2d(flat, 2)  # [M,C,S,S] -> [M,C,S/2,S/2]
    else:
        context = F.interpolate(flat, size=(size, size), mode="bilinear", align_corners=False, antialias=True)
    fovea = center_crop(flat, size)  # [M,C,S,S] -> [M,C,size,size]
    return context.reshape(*lead, *context.shape[1:]), fovea.reshape(*lead, *fovea.shape[1:])
