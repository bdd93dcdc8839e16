"""Training-time sampling and augmentation for fine-tuning the stream CNNs (pure tensor code, no I/O).

Provenance:
- Segments (TSN, Wang et al. 2016, Sec. 3.1; Ma et al. 2017 build on it): a video is split into K equal segments
  and one snippet is drawn at random from each (K = 3); validation takes the centre of each segment.
  ``segment_starts`` is TSN's ``_sample_indices`` / ``_get_val_indices``.
- Crops (Ma et al. 2017, Sec. 3.4.1, "Data augmentation"): a region of 0.08 to 1 of the image area with aspect
  ratio between 3/4 and 4/3 is cut out and scaled to 224 x 224 (torchvision's ``RandomResizedCrop`` sampler,
  10 tries then a centre crop). The box is drawn as a fraction of the frame, so cropping the frame as decoded
  gives the same region as cropping it after the 256 px resize the paper mentions.
- Horizontal flip, for both streams. Mirroring a flow field negates its horizontal component: on uint8 flow
  images (128 = zero motion) ``x -> 255 - x``; on images scaled to [0, 1] ``x -> 1 - x`` (pipeline.preprocess).
- Colour jitter for the spatial stream only ("additional color jittering for the spatial-stream ConvNet, but not
  temporal-stream ConvNet"): brightness, contrast and saturation factors drawn from [1 - s, 1 + s]; the paper
  gives no strength, 0.4 is the common ImageNet setting.
As in TSN's group transforms, every snippet of one video gets the same crop, flip and jitter.

Snippets are ``[K, C, H, W]``: RGB (C = 3) or a flow stack (C = 2L, channels ``x1, y1, x2, y2, ...``).
Randomness comes from an explicit ``torch.Generator``, so a seeded run is reproducible and a resumed run
draws what the uninterrupted run would have drawn.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.preprocess import normalize, to_float_chw

__all__ = ["TrainAugment", "color_jitter", "hflip", "resized_crop", "sample_crop_box", "segment_starts"]


def segment_starts(n_positions: int, segments: int, rng: np.random.Generator | None = None) -> np.ndarray:
    """Start of one snippet in each of ``segments`` equal segments of ``n_positions`` valid starts (TSN).

    ``n_positions`` is the number of places a snippet can start: frames for RGB, ``n_frames - L`` for a stack
    of L flow fields (at least 1). With ``rng``: a random start inside each segment (training); without: the
    centre of each segment (validation). Returns int64 ``[segments]``, non-decreasing.
    """
    n = max(int(n_positions), 1)
    if rng is None:
        tick = n / segments
        return np.array([int(tick / 2.0 + tick * k) for k in range(segments)], dtype=np.int64)
    avg = n // segments
    if avg > 0:
        return np.arange(segments, dtype=np.int64) * avg + rng.integers(0, avg, size=segments)
    if n > segments:  # fewer positions than 2 per segment: random distinct positions, in order
        return np.sort(rng.choice(n, size=segments, replace=False)).astype(np.int64)
    return np.resize(np.arange(n, dtype=np.int64), segments)  # shorter than K: repeat from the start


def sample_crop_box(height: int, width: int, scale: Sequence[float] = (0.08, 1.0),
                    ratio: Sequence[float] = (3 / 4, 4 / 3), generator: torch.Generator | None = None
                    ) -> tuple[int, int, int, int]:
    """(top, left, h, w) of a random region covering ``scale`` of the area with aspect ``ratio`` (w / h).

    torchvision's ``RandomResizedCrop.get_params``: 10 tries with log-uniform aspect, then a centre crop
    whose aspect is clamped into ``ratio``.
    """
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * float(torch.empty(1).uniform_(scale[0], scale[1], generator=generator))
        aspect = math.exp(float(torch.empty(1).uniform_(log_ratio[0], log_ratio[1], generator=generator)))
        w = round(math.sqrt(target * aspect))
        h = round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(torch.randint(0, height - h + 1, (1,), generator=generator))
            left = int(torch.randint(0, width - w + 1, (1,), generator=generator))
            return top, left, h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, round(width / min(ratio))
    elif in_ratio > max(ratio):
        h, w = height, round(height * max(ratio))
    else:
        h, w = height, width
    return (height - h) // 2, (width - w) // 2, h, w


def resized_crop(x: torch.Tensor, box: tuple[int, int, int, int], size: int,
                 interpolation: str = "bilinear") -> torch.Tensor:
    """Cut ``box`` = (top, left, h, w) out of float ``[N, C, H, W]`` and scale it to ``[N, C, size, size]``."""
    top, left, h, w = box
    region = x[..., top:top + h, left:left + w]  # [N,C,H,W] -> [N,C,h,w]
    if (h, w) == (size, size):
        return region
    y = F.interpolate(region, size=(size, size), mode=interpolation, align_corners=False,
                      antialias=interpolation in ("bilinear", "bicubic"))  # -> [N,C,S,S]
    return y.clamp_(0.0, 1.0) if interpolation == "bicubic" else y


def hflip(x: torch.Tensor, flow: bool = False) -> torch.Tensor:
    """Mirror ``[..., C, H, W]``; for a flow stack the x channels (0, 2, 4, ...) are negated as well.

    uint8 flow images: ``x -> 255 - x``; float images in [0, 1]: ``x -> 1 - x``.
    """
    y = x.flip(-1)
    if flow:
        y = y.clone()
        top = 255 if y.dtype == torch.uint8 else 1.0
        y[..., 0::2, :, :] = top - y[..., 0::2, :, :]  # u -> -u around the zero-motion value
    return y


def _gray(x: torch.Tensor) -> torch.Tensor:
    """ITU-R 601 luma of RGB ``[..., 3, H, W]`` -> ``[..., 1, H, W]`` (torchvision's rgb_to_grayscale)."""
    return (0.299 * x[..., 0:1, :, :] + 0.587 * x[..., 1:2, :, :] + 0.114 * x[..., 2:3, :, :])


def color_jitter(x: torch.Tensor, brightness: float = 0.4, contrast: float = 0.4, saturation: float = 0.4,
                 generator: torch.Generator | None = None) -> torch.Tensor:
    """Random brightness, contrast and saturation of RGB ``[N, 3, H, W]`` in [0, 1], one draw for all N frames.

    Factors are uniform in ``[1 - s, 1 + s]``; the order is fixed (brightness, contrast, saturation), each
    blend clipped to [0, 1] as torchvision's functional ops do.
    """
    def factor(s: float) -> float:
        return float(torch.empty(1).uniform_(max(0.0, 1 - s), 1 + s, generator=generator)) if s > 0 else 1.0

    b, c, s = factor(brightness), factor(contrast), factor(saturation)
    x = (x * b).clamp(0.0, 1.0)
    mean = _gray(x).mean(dim=(-3, -2, -1), keepdim=True)  # [N,1,1,1] per-frame mean luma
    x = (c * x + (1 - c) * mean).clamp(0.0, 1.0)
    x = (s * x + (1 - s) * _gray(x)).clamp(0.0, 1.0)
    return x


@dataclass(frozen=True)
class TrainAugment:
    """uint8 snippets ``[K, H, W, C]`` -> normalised ``[K, C, size, size]`` (Ma et al. 3.4.1).

    ``modality`` "rgb" or "flow" (flow: flip negates x, no colour jitter); ``mean`` / ``std`` from the
    backbone's ``spec``, so training sees the normalisation extraction will use.
    """

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    modality: str = "rgb"
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter: float = 0.4
    interpolation: str = "bilinear"

    def __call__(self, snippets, generator: torch.Generator | None = None) -> torch.Tensor:
        top, left, h, w = sample_crop_box(snippets.shape[1], snippets.shape[2], self.scale, self.ratio, generator)
        region = snippets[:, top:top + h, left:left + w]  # cut on uint8 first: less to convert
        x = to_float_chw(region, len(self.mean))  # [K,h,w,C] -> [K,C,h,w] in [0,1]
        x = resized_crop(x, (0, 0, h, w), self.size, self.interpolation)  # -> [K,C,S,S]
        if self.flip and float(torch.rand(1, generator=generator)) < 0.5:
            x = hflip(x, flow=self.modality == "flow")
        if self.modality == "rgb" and self.jitter > 0:
            x = color_jitter(x, self.jitter, self.jitter, self.jitter, generator)
        return normalize(x, self.mean, self.std)
