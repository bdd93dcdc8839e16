"""Which frames of a video stage one samples (pure; no I/O).

- ``frames``: K positions equally spaced over the video, each the centre of one of K equal segments
  (Ma et al. Section 3.4.1 sample 25; TSN's test-time protocol).
- ``fps``: a fixed rate over long spans (Ng et al. Section 4: 1 frame per second, up to 120 frames).
- ``all``: every decoded frame.

A video shorter than the number of samples asked for repeats from the start (Ng et al. Section 4.1,
"the frames are repeated from the beginning"), so every video yields the same T in ``frames`` mode.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Sampling:
    mode: str = "frames"          # frames | fps | all
    frames: int | None = 25       # K for "frames"; for "fps": pad/cut to exactly K (None: natural count)
    fps: float | None = None      # target rate for "fps"
    max_frames: int = 120         # cap on the natural count of "fps" (Ng et al.: 120 frames)

    def __post_init__(self):
        if self.mode not in ("frames", "fps", "all"):
            raise ValueError(f"unknown sampling mode {self.mode!r}")
        if self.mode == "frames" and (self.frames is None or self.frames < 1):
            raise ValueError(f"--frames must be >= 1; got {self.frames}")
        if self.mode == "fps" and (self.fps is None or not math.isfinite(self.fps) or self.fps <= 0):
            raise ValueError(f"--fps must be a finite rate > 0; got {self.fps}")
        if self.mode == "fps" and self.frames is not None and self.frames < 1:
            raise ValueError(f"--frames must be >= 1 (or left out for the natural count); got {self.frames}")
        if self.max_frames < 1:
            raise ValueError(f"--max-frames must be >= 1; got {self.max_frames}")


def repeat_to(indices: np.ndarray, k: int) -> np.ndarray:
    """Cycle ``indices`` from the start until there are ``k`` of them (or cut to ``k``)."""
    if len(indices) == 0:
        raise ValueError("no frames to sample")
    return np.resize(indices, k)


def sample_indices(n_frames: int, src_fps: float, s: Sampling) -> np.ndarray:
    """Frame indices (int64, non-decreasing within a pass) for a video of ``n_frames`` decoded frames."""
    if n_frames < 1:
        raise ValueError("video has no decodable frames")
    if s.mode == "all":
        return np.arange(n_frames, dtype=np.int64)
    if s.mode == "frames":
        k = int(s.frames)
        if n_frames < k:
            return repeat_to(np.arange(n_frames, dtype=np.int64), k)
        return ((np.arange(k) + 0.5) * n_frames / k).astype(np.int64)
    # fps: one frame every src_fps / fps source frames
    src_fps = src_fps if src_fps and math.isfinite(src_fps) and src_fps > 0 else 25.0
    step = src_fps / float(s.fps)
    natural = np.unique(np.floor(np.arange(0, n_frames, step)).astype(np.int64))
    natural = natural[natural < n_frames][: s.max_frames]
    return repeat_to(natural, int(s.frames)) if s.frames else natural
