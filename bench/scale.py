"""Feature stores at Kinetics / Sports-1M / YouTube-8M sizes: open time, lookup latency, bulk-load rate, memory.

Builds synthetic stores of N videos (small features, so that a million videos fit a laptop's disk: T frames of a
D-dim float16 stream, ``--per-part`` videos per part, written by the real ``StoreWriter``), then measures, each in a
fresh Python process:

- open, no index: ``FeatureStore.open`` with ``index.npz`` removed, so every part is read (what every open cost
  before the index, and what a rebuild costs);
- open, index: the next open, through ``index.npz`` (one small file plus a stat of each part);
- get: median latency of fetching one random video's features (opened store, 1,000 ids);
- bulk load: videos/s of ``FeatureStore.load`` over every video (at these tiny sizes, the per-video cost);
- peak RSS of the process after open and one get (``ru_maxrss``).

    PYTHONPATH=. .venv/bin/python bench/scale.py                          # 10k and 100k videos
    PYTHONPATH=. .venv/bin/python bench/scale.py --sizes 10000,100000,1000000

Prints a Markdown table. Stores are written under --root (default: a temporary folder, removed at the end).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]

PROBE = r"""
import json, resource, sys, time
import numpy as np
from pipeline.store import FeatureStore
path, mode = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
fs = FeatureStore.open(path, log=lambda m: None)
t_open = time.perf_counter() - t0
out = {"open_s": t_open, "videos": len(fs), "parts": len(fs.parts)}
if mode == "full":
    rng = np.random.default_rng(0)
    ids = fs.ids()
    pick = [ids[i] for i in rng.integers(0, len(ids), 1000)]
    lat = []
    for v in pick:
        t = time.perf_counter(); fs.get(v, "rgb"); lat.append(time.perf_counter() - t)
    out["get_ms"] = 1e3 * float(np.median(lat))
    out["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t = time.perf_counter(); arrs = fs.load("rgb"); dt = time.perf_counter() - t
    out["load_videos_s"] = len(arrs) / dt
print(json.dumps(out))
"""


def build(path: Path, n: int, frames: int, dim: int, per_part: int, seed: int = 0) -> float:
    from pipeline.store import FeatureStore

    rng = np.random.default_rng(seed)
    block = rng.standard_normal((1024, frames, dim)).astype(np.float16)
    meta = {"frame_indices": np.arange(frames), "fps": 25.0, "n_frames": frames, "duration": frames / 25,
            "size": 0, "sha256": ""}
    t0 = time.perf_counter()
    with FeatureStore.writer(path, {"bench": "scale", "frames": frames, "dim": dim}, ["c"], name="bench",
                             commit_every=per_part) as w:
        for i in tqdm(range(n), desc=f"build {n:,}", unit="video", unit_scale=True, leave=False):
            w.add(f"class{i % 400:03d}/v_{i:08d}.mp4", {"rgb": block[i % 1024] + np.float16(i % 7)}, meta)
    return time.perf_counter() - t0


def probe(path: Path, mode: str) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), mode], check=False, capture_output=True, text=True,
                         cwd=ROOT, env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if out.returncode:
        raise SystemExit(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--frames", type=int, default=4)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--per-part", type=int, default=100, help="videos per part (commit_every)")
    ap.add_argument("--root", default=None)
    ap.add_argument("--out", default=None, help="also write the table to this file (bench/results/...)")
    args = ap.parse_args()
    from pipeline.store import INDEX_NAME

    root = Path(args.root or tempfile.mkdtemp(prefix="twostream-scale-"))
    rows = []
    try:
        for n in (int(s) for s in args.sizes.split(",")):
            path = root / f"store-{n}"
            shutil.rmtree(path, ignore_errors=True)
            build_s = build(path, n, args.frames, args.dim, args.per_part)
            (path / INDEX_NAME).unlink(missing_ok=True)
            cold = probe(path, "open")          # reads every part, writes index.npz
            warm = probe(path, "full")          # through the index
            assert cold["videos"] == warm["videos"] == n, (cold, warm)
            rows.append((n, warm["parts"], build_s, cold["open_s"], warm["open_s"], warm["get_ms"],
                         warm["load_videos_s"], warm["rss_mb"], (path / INDEX_NAME).stat().st_size / 2**20))
            print(f"{n:,} videos: open {cold['open_s']:.2f} s without the index, {warm['open_s']:.3f} s with it",
                  flush=True)
    finally:
        if not args.root:
            shutil.rmtree(root, ignore_errors=True)
    lines = [("| videos | parts | build (s) | open, reading every part (s) | open, through `index.npz` (s) | speed-up | "
              "one random `get` (ms) | bulk load (videos/s) | peak RSS (MB) | `index.npz` (MB) |"),
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n, parts, b, c, w, g, lv, rss, ix in rows:
        lines.append(f"| {n:,} | {parts:,} | {b:.0f} | {c:.2f} | {w:.3f} | {c / w:.0f}x | {g:.2f} | {lv:,.0f} | "
                     f"{rss:.0f} | {ix:.1f} |")
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
