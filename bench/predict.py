"""What one prediction costs: seconds per video for a 10 s 320x240 clip, split into the steps of ``predict``.

    python bench/predict.py [--flow dis,tvl1,tvl1-opencv] [--frames 25] [--stack 10] [--threads 2] [--out FILE.md]

Builds a run the way ``make extract`` + ``make train`` would leave it (a store config from the real extraction
code: embedded EfficientNet-Lite0, 25 equally spaced frames, flow stacks of L = 10 fields, Ma et al.; a TS-LSTM head
on rgb + flow, untrained: the head's cost does not depend on its weights), then times ``Predictor`` on the clip
in-process: decode, flow, preprocessing, the two stream CNNs, the head. Prints a table (seconds and share of the
total) per flow method.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pipeline.heads  # noqa: F401  (registers every head)
from pipeline.extraction import ExtractConfig, build_streams, store_config
from pipeline.predictor import Predictor
from pipeline.sampling import Sampling
from pipeline.training import build_head, resolve_configs

STEPS = ("decode", "flow", "preprocess", "cnn", "head")


def ucf_like_clip(path: Path, seconds: float = 10.0, fps: int = 25) -> Path:
    """320x240 MJPG clip: a textured scene panning (wrapping around) and a square moving across it."""
    import cv2

    rng = np.random.default_rng(0)
    scene = cv2.resize(rng.integers(0, 255, (60, 200, 3), dtype=np.uint8), (800, 240), interpolation=cv2.INTER_CUBIC)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), fps, (320, 240))
    for i in range(round(seconds * fps)):
        frame = np.ascontiguousarray(np.roll(scene, -2 * i, axis=1)[:, :320])
        x = 20 + 3 * i % 260
        frame[100:140, x:x + 40] = (30, 200, 240)
        vw.write(frame)
    vw.release()
    return path


def make_run(root: Path, flow: str, frames: int, stack: int, head: str = "ts-lstm") -> Path:
    """A complete run directory whose extraction record is what ``extract`` writes for these settings."""
    from safetensors.torch import save_file

    cfg = ExtractConfig(streams=("rgb", "flow"), sampling=Sampling(mode="frames", frames=frames), flow_method=flow,
                        flow_stack=stack, precision="fp32")
    torch.manual_seed(0)
    streams = build_streams(cfg, "cpu")
    conf = store_config(cfg, streams, "decord")
    dims = {s.name: int(s.backbone.feature_dim) for s in streams}
    head_cfg, train_cfg = resolve_configs(head, {"frames": str(frames)})
    module = build_head(head, head_cfg, sum(dims.values()), 101, tuple(dims.values()), 0)
    run = root / f"{head}-bench-{flow}"
    run.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(run / "weights.safetensors"))
    config = {"head": head, "head_config": asdict(head_cfg), "train": asdict(train_cfg), "streams": ["rgb", "flow"],
              "split": 1, "classes": [f"class{i}" for i in range(101)]}
    (run / "config.json").write_text(json.dumps(config, default=str))
    (run / "extraction.json").write_text(json.dumps({"store_config": conf, "stream_dims": dims,
                                                     "video_seconds": 7.0}, default=str))
    (run / "COMPLETE").write_text("bench\n")
    return run


def time_one(pred: Predictor, video: Path) -> dict[str, float]:
    secs = {k: 0.0 for k in STEPS}
    t0 = time.perf_counter()
    feats = pred.features(video, secs)
    t1 = time.perf_counter()
    pred.scores([feats])
    secs["head"] = time.perf_counter() - t1
    secs["total"] = time.perf_counter() - t0
    return secs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--flow", default="dis,tvl1,tvl1-opencv", help="comma list of flow methods")
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--stack", type=int, default=10)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--out", default=None, help="also write the table to this file (bench/results/...)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        video = ucf_like_clip(tmp / "clip.avi", seconds=args.seconds)
        from pipeline.video import count_frames

        n, _fps, (h, w) = count_frames(video, "decord")
        assert (n, h, w) == (round(args.seconds * 25), 240, 320), (n, h, w)
        print(f"{args.seconds:g} s 320x240 clip, {args.frames} frames, flow stacks of {args.stack}, rgb + flow "
              f"EfficientNet-Lite0 (fp32, CPU, {args.threads} threads), TS-LSTM head\n")
        lines = ["| flow | " + " | ".join(STEPS) + " | total (s/video) |", "|---|" + "---:|" * (len(STEPS) + 1)]
        print("\n".join(lines), flush=True)
        for flow in args.flow.split(","):
            pred = Predictor.load(make_run(tmp, flow, args.frames, args.stack), device="cpu")
            pred.streams(next(iter(pred.extractions)))  # build the CNNs outside the timing
            runs = [time_one(pred, video) for _ in range(args.repeat)]
            mean = {k: float(np.mean([r[k] for r in runs])) for k in runs[0]}
            total = mean["total"]
            cells = [f"{mean[k]:.2f} s ({100 * mean[k] / total:.0f}%)" for k in STEPS]
            lines.append(f"| {flow} | " + " | ".join(cells) + f" | {total:.2f} |")
            print(lines[-1], flush=True)
            if args.out:  # after every row: the slow flows come last
                Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
