"""OpenCV optical flow backends: the reference DualTVL1 and the fast CPU options DIS and Farneback.

Kept as references for the tensor implementations (tvl1.py, brox.py) and as fast CPU options. Each takes
uint8 grayscale ``[N,H,W]`` numpy arrays and returns float32 ``[N,2,H,W]`` (x, y) in OpenCV's ``calc(prev, nxt)``
convention, ``nxt(p + flow(p)) ~ prev(p)``. Parameters are OpenCV's own defaults unless given.
"""
from __future__ import annotations

import cv2
import numpy as np

__all__ = ["OPENCV_DEFAULTS", "opencv_flow"]

OPENCV_DEFAULTS: dict[str, dict] = {
    # cv2.optflow.DualTVL1OpticalFlow_create() defaults (Zach et al. 2007 / Sanchez et al. 2013; TSN's settings)
    "tvl1-opencv": {"tau": 0.25, "lambda_": 0.15, "theta": 0.3, "nscales": 5, "warps": 5, "epsilon": 0.01,
                    "inner_iterations": 30, "outer_iterations": 10, "scale_step": 0.8, "gamma": 0.0,
                    "median_filtering": 5},
    # DIS (Kroeger et al. 2016), preset MEDIUM
    "dis": {"preset": "medium"},
    # cv2.calcOpticalFlowFarneback with the values OpenCV's own samples use
    "farneback": {"pyr_scale": 0.5, "levels": 3, "winsize": 15, "iterations": 3, "poly_n": 5, "poly_sigma": 1.2,
                  "flags": 0},
}

_DIS_PRESETS = {"ultrafast": cv2.DISOPTICAL_FLOW_PRESET_ULTRAFAST, "fast": cv2.DISOPTICAL_FLOW_PRESET_FAST,
                "medium": cv2.DISOPTICAL_FLOW_PRESET_MEDIUM}


def _make(method: str, p: dict):
    if method == "tvl1-opencv":
        return cv2.optflow.DualTVL1OpticalFlow_create(
            tau=p["tau"], lambda_=p["lambda_"], theta=p["theta"], nscales=p["nscales"], warps=p["warps"],
            epsilon=p["epsilon"], innnerIterations=p["inner_iterations"],  # sic: OpenCV's spelling
            outerIterations=p["outer_iterations"], scaleStep=p["scale_step"], gamma=p["gamma"],
            medianFiltering=p["median_filtering"])
    if method == "dis":
        return cv2.DISOpticalFlow_create(_DIS_PRESETS[p["preset"]])
    if method == "farneback":
        return None
    raise ValueError(f"unknown OpenCV flow method {method!r}; choose from {sorted(OPENCV_DEFAULTS)}")


def opencv_flow(prev: np.ndarray, nxt: np.ndarray, method: str = "tvl1-opencv", **params) -> np.ndarray:
    """uint8 ``[N,H,W]`` x2 -> float32 ``[N,2,H,W]`` with one OpenCV estimator, one pair at a time."""
    if method not in OPENCV_DEFAULTS:
        raise ValueError(f"unknown OpenCV flow method {method!r}; choose from {sorted(OPENCV_DEFAULTS)}")
    unknown = set(params) - set(OPENCV_DEFAULTS[method])
    if unknown:
        raise ValueError(f"unknown parameters for {method}: {sorted(unknown)}")
    p = {**OPENCV_DEFAULTS[method], **params}
    est = _make(method, p)
    out = np.empty((len(prev), 2, *prev.shape[1:]), np.float32)
    for k, (a, b) in enumerate(zip(prev, nxt)):
        a, b = np.ascontiguousarray(a), np.ascontiguousarray(b)
        if method == "farneback":
            f = cv2.calcOpticalFlowFarneback(a, b, None, p["pyr_scale"], p["levels"], p["winsize"],
                                             p["iterations"], p["poly_n"], p["poly_sigma"], p["flags"])
        else:
            f = est.calc(a, b, None)  # [H,W,2]
        out[k] = f.transpose(2, 0, 1)  # [2,H,W]
    return out
