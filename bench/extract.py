"""Where stage one spends its time: seconds per video split into decode, flow, preprocessing and CNN.

    python bench/extract.py [--videos 6] [--streams rgb] [--flow tvl1] [--threads 2]

Runs the same code as ``twostream extract`` (``stages.extract.prepare_video`` and the stream CNNs) on
(a) videos of the demo dataset and (b) a UCF101-like clip (320x240, 7 s at 25 fps), in-process, and prints a
table. The decode column is compared against a raw read of the same file's bytes (the floor for any decoder).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.datasets import load_manifest
from pipeline.demo_data import write_demo_dataset
from pipeline.sampling import Sampling
from stages.extract import ExtractConfig, _build_streams, _embed, prepare_video, store_config


def ucf_like_clip(path: Path, seconds: float = 7.0, fps: int = 25) -> Path:
    """320x240 MJPG clip of a textured scene panning and a square moving across it."""
    rng = np.random.default_rng(0)
    scene = cv2.resize(rng.integers(0, 255, (60, 200, 3), dtype=np.uint8), (800, 240), interpolation=cv2.INTER_CUBIC)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (320, 240))
    for i in range(int(seconds * fps)):
        frame = scene[:, 2 * i: 2 * i + 320].copy()
        x = 20 + 3 * i % 260
        frame[100:140, x:x + 40] = (30, 200, 240)
        vw.write(frame)
    vw.release()
    return path


def bench(paths: list[Path], cfg: ExtractConfig, batch_size: int) -> dict[str, float]:
    streams = _build_streams(cfg, "cpu")
    conf = store_config(cfg, streams, "decord")
    flow = None
    if "flow" in cfg.streams:
        flow = {"method": cfg.flow_method, "params": conf["flow"]["params"], "bound": cfg.flow_bound,
                "stack": cfg.flow_stack, "device": "cpu"}
    secs = {"raw read": 0.0, "decode": 0.0, "flow": 0.0, "preprocess": 0.0, "cnn": 0.0}
    frames = 0
    _embed(streams[0], np.zeros((2, 64, 64, 3), np.uint8) if streams[0].name == "rgb" else
           np.zeros((2, 2 * cfg.flow_stack, 64, 64), np.uint8), batch_size, dict(secs))  # warm-up
    for p in paths:
        t0 = time.perf_counter()
        Path(p).read_bytes()
        secs["raw read"] += time.perf_counter() - t0
        v = prepare_video({"path": str(p), "sampling": cfg.sampling, "decoder": "decord", "device": "cpu",
                           "streams": cfg.streams, "flow": flow})
        secs["decode"] += v["seconds"]["decode"]
        secs["flow"] += v["seconds"]["flow"]
        for s in streams:
            _embed(s, v[s.name], batch_size, secs)
        frames += len(v["meta"]["frame_indices"]) * len(streams)
    n = len(paths)
    out = {k: v / n for k, v in secs.items()}
    out["cnn frames/s"] = frames / max(secs["cnn"], 1e-9)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=6, help="demo videos to time")
    ap.add_argument("--streams", default="rgb")
    ap.add_argument("--flow", default="tvl1")
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cfg = ExtractConfig(streams=tuple(args.streams.split(",")), sampling=Sampling("frames", args.frames),
                        flow_method=args.flow)
    with tempfile.TemporaryDirectory() as tmp:
        demo = load_manifest(write_demo_dataset(Path(tmp) / "demo"))
        step = max(1, len(demo.videos) // args.videos)
        rows = {"demo (160x120, 48 frames)": bench([v.path for v in demo.videos[::step][: args.videos]], cfg,
                                                  args.batch_size),
                "UCF101-like (320x240, 175 frames)": bench([ucf_like_clip(Path(tmp) / "ucf.avi")] * 2, cfg,
                                                           args.batch_size)}
    cols = ["raw read", "decode", "flow", "preprocess", "cnn", "cnn frames/s"]
    print(f"streams={args.streams} flow={args.flow if 'flow' in args.streams else '-'} frames/video={args.frames} "
          f"threads={args.threads} torch={torch.__version__}")
    print("| video | " + " | ".join(c if c.endswith("/s") else f"{c} s/video" for c in cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    for name, r in rows.items():
        print(f"| {name} | " + " | ".join(f"{r[c]:.3f}" if not c.endswith("/s") else f"{r[c]:.1f}" for c in cols)
              + " |")


if __name__ == "__main__":
    main()
