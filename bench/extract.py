"""`make extract` on the demo, timed idle and under load side by side: wall time, cores busy, where the time goes.

    PYTHONPATH=. .venv/bin/python bench/extract.py --out bench/results/extract.md
    PYTHONPATH=. .venv/bin/python bench/extract.py --per-video      # seconds per video of each step, in-process

Writes the demo dataset (96 videos) to a temporary folder and runs ``twostream extract`` on it exactly as
``make extract`` does (RGB + DIS flow, 25 frames, ``--workers 2``), in a fresh process, twice: on the machine as it is
("idle") and with two busy-looping processes that this script starts beside it ("loaded", i.e. two other jobs on a
2-core machine). For each it reports the wall time, the cores-busy fraction (CPU seconds of the extractor and every
process it started, from ``os.wait4``, / wall seconds / cores) and the split of the extractor's own time between
decoding, flow, preprocessing and the CNNs (``last_run.json``: each step's seconds summed over the processes that
ran it, so with workers the steps overlap in time and the split is one of work, not of wall time). The 1-minute load average before each run is
recorded: an "idle" figure taken with a load average over 0.5 shared the cores with other jobs.

``--per-video`` is the older in-process breakdown (no workers, one video at a time) on demo videos and on a
UCF101-like 320x240 clip.

``--resize`` compares the two ways ``preprocess`` can resize, on the same decoded frames and flow images of demo
videos, side by side: uint8 (what backbones record now, PIL's values) against float (stores made before), per
stream: preprocessing seconds per video and the cosine between the two paths' per-frame CNN features.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

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


def per_video(args) -> None:
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


def resize_paths(args) -> str:
    """Preprocessing time and feature cosine, uint8 resize against float resize (see the module docstring)."""
    torch.set_num_threads(args.threads)
    cfg = ExtractConfig(streams=tuple(args.streams.split(",")), sampling=Sampling("frames", args.frames),
                        flow_method=args.flow)
    streams = _build_streams(cfg, "cpu")
    conf = store_config(cfg, streams, "decord")
    flow = {"method": cfg.flow_method, "params": conf["flow"]["params"], "bound": cfg.flow_bound,
            "stack": cfg.flow_stack, "device": "cpu"} if "flow" in cfg.streams else None
    stats = {s.name: {"uint8": [0.0, []], "float": [0.0, []]} for s in streams}
    with tempfile.TemporaryDirectory() as tmp:
        demo = load_manifest(write_demo_dataset(Path(tmp) / "demo"))
        step = max(1, len(demo.videos) // args.videos)
        videos = demo.videos[::step][: args.videos]
        for i, v in enumerate([videos[0], *videos]):  # the first video twice: a warm-up, not counted
            prepared = prepare_video({"path": str(v.path), "sampling": cfg.sampling, "decoder": "decord",
                                      "device": "cpu", "streams": cfg.streams, "flow": flow})
            for s in streams:
                feats = {}
                for dtype in ("uint8", "float")[::1 if i % 2 else -1]:  # each path first on every other video
                    s.backbone.spec["resize_dtype"] = dtype
                    secs = {"preprocess": 0.0, "cnn": 0.0}
                    feats[dtype] = torch.from_numpy(
                        _embed(s, prepared[s.name], args.batch_size, secs)[s.name].astype(np.float32))
                    stats[s.name][dtype][0] += secs["preprocess"] if i else 0.0
                cos = torch.nn.functional.cosine_similarity(feats["uint8"], feats["float"], dim=1)  # [T]
                stats[s.name]["uint8"][1] += cos.tolist() if i else []
    lines = ["| stream | preprocess, float resize (s/video) | preprocess, uint8 resize (s/video) | speed-up | "
             "feature cosine, mean | feature cosine, min |", "|---|---:|---:|---:|---:|---:|"]
    for name, st in stats.items():
        f, u = st["float"][0] / len(videos), st["uint8"][0] / len(videos)
        cos = np.array(st["uint8"][1])
        lines.append(f"| {name} | {f:.3f} | {u:.3f} | {f / u:.1f}x | {cos.mean():.5f} | {cos.min():.5f} |")
    caption = (f"{len(videos)} demo videos (160x120), {args.frames} frames, flow {args.flow}, "
               f"{streams[0].backbone.spec['name']} (resize {streams[0].backbone.spec['resize']}, "
               f"{streams[0].backbone.spec['interpolation']}), {args.threads} thread(s), torch {torch.__version__}; "
               f"the same decoded frames and flow images through both paths, one after the other per video.")
    return "\n".join(lines) + "\n\n" + caption + "\n"


# ------------------------------------------------------------------------------------- the whole demo

BUSY = "while True:\n    pass\n"
STEPS = ("decode", "flow", "preprocess", "cnn")


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def run_extract(data: Path, store: Path, args) -> dict:
    """One ``twostream extract`` in a fresh process: wall seconds, CPU seconds of it and its workers, its summary."""
    cmd = [sys.executable, "-m", "cli.main", "extract", str(data), "--out", str(store), "--streams", args.streams,
           "--flow", args.flow, "--frames", str(args.frames), "--workers", str(args.workers), "--quiet"]
    if args.limit:
        cmd += ["--limit", str(args.limit)]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    load = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    err = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)  # the extractor's and its (waited-for) workers' CPU time
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"extract failed ({proc.returncode}): {err.decode()[-2000:]}")
    summary = json.loads((store / "last_run.json").read_text())
    return {"wall": wall, "cpu": usage.ru_utime + usage.ru_stime, "load": load, "summary": summary}


def whole_demo(args) -> str:
    n_cores = cores()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(args.data) if args.data else write_demo_dataset(Path(tmp) / "demo")
        n_videos = len(load_manifest(data).videos)
        for cond in ("idle", "loaded"):
            busy = []
            if cond == "loaded":
                busy = [subprocess.Popen([sys.executable, "-c", BUSY]) for _ in range(args.busy)]
                time.sleep(1.0)
            try:
                r = run_extract(data, Path(tmp) / f"store-{cond}", args)
            finally:
                for b in busy:
                    b.kill()
                    b.wait()
            r["cond"] = cond if cond == "idle" else f"loaded ({args.busy} busy processes)"
            rows.append(r)
            time.sleep(2.0)
    head = ["machine", "load avg at start", "wall (s)", "videos/s", "cores busy", "CPU s/video", *STEPS[:3], "CNN"]
    lines = ["| " + " | ".join(head) + " |", "|---" + "|---:" * (len(head) - 1) + "|"]
    for r in rows:
        s = r["summary"]
        secs = {k: s["seconds"][k] for k in STEPS}
        tot = sum(secs.values()) or 1.0
        done = s["done"]
        lines.append(f"| {r['cond']} | {r['load']:.2f} | {r['wall']:.0f} | {done / r['wall']:.2f} | "
                     f"{r['cpu'] / r['wall'] / n_cores:.0%} | {r['cpu'] / max(done, 1):.2f} | "
                     + " | ".join(f"{secs[k]:.0f} s ({secs[k] / tot:.0%})" for k in STEPS) + " |")
    disturbed = rows[0]["load"] > 0.5
    caption = (f"{n_videos if not args.limit else min(args.limit, n_videos)} demo videos, streams {args.streams}, "
               f"flow {args.flow}, {args.frames} frames, --workers {args.workers}; {n_cores} cores, torch "
               f"{torch.__version__}. Steps: seconds each step took inside the extractor's processes, summed over "
               "processes (share of their sum)."
               + (f" The idle run started at load average {rows[0]['load']:.2f} (> 0.5): other jobs shared the "
                  "cores, so it is not a clean idle figure." if disturbed else ""))
    return "\n".join(lines) + "\n\n" + caption + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--per-video", action="store_true", help="the in-process breakdown per video instead")
    ap.add_argument("--resize", action="store_true", help="uint8 against float resizing: time and feature cosine")
    ap.add_argument("--data", default=None, help="a dataset folder instead of a fresh demo")
    ap.add_argument("--limit", type=int, default=0, help="extract only the first N videos (0: all)")
    ap.add_argument("--busy", type=int, default=2, help="busy-looping processes of the loaded run")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", default=None, help="also write the table here (bench/results/extract.md)")
    ap.add_argument("--videos", type=int, default=6, help="--per-video, --resize: demo videos to use")
    ap.add_argument("--streams", default="rgb,flow")
    ap.add_argument("--flow", default="dis")
    ap.add_argument("--frames", type=int, default=25)
    ap.add_argument("--threads", type=int, default=2, help="--per-video, --resize: torch threads")
    ap.add_argument("--batch-size", type=int, default=32)
    args = ap.parse_args()
    if args.per_video:
        per_video(args)
        return
    table = resize_paths(args) if args.resize else whole_demo(args)
    print(table)
    if args.out:
        Path(args.out).write_text(table)


if __name__ == "__main__":
    main()
