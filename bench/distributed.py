"""Scale-out extraction on Ray: videos/s with 1 and 2 Ray workers against the single-process extractor,
and the fixed cost of one shard.

    python bench/distributed.py [--videos 24] [--frames 8] [--shard-size 4] [--backbone efficientnet_lite0]

Extracts the first ``--videos`` videos of the demo dataset (``pipeline.demo_data.write_demo_dataset``, through a
CSV manifest) five times into fresh stores, with the same ``RunOptions`` (one decode worker per extractor):

1. single process, torch's default thread count: ``stages.extract.extract``;
2. single process, one torch thread (as each Ray task gets with ``num_cpus=1``): the reference for bitwise
   equality, since fp32 convolutions sum in an order that depends on the thread count (1 vs 2 threads moves
   about 0.5% of the float16 features by one unit in the last place);
3. Ray, ``ray.init(num_cpus=1)``: one shard at a time, ``--shard-size`` videos per shard;
4. Ray, ``ray.init(num_cpus=2)``: two shards at a time;
5. Ray, one worker, one shard of every video: with (3) this gives the cost of one more shard,
   ``(wall(3) - wall(5)) / (shards(3) - 1)`` (model build, decode-worker start, manifest load, store open,
   shard manifest, scheduling).

Ray's start (``ray.init``) is timed apart and not counted in videos/s; worker processes start cold (imports)
inside the timed runs, as they do on a real cluster. Prints one table; checks that every run's features are
bitwise equal to the one-thread single-process ones.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.datasets import load_manifest
from pipeline.demo_data import write_demo_dataset
from pipeline.sampling import Sampling
from pipeline.store import FeatureStore
from stages.distributed import run_ray, shards_for
from stages.extract import ExtractConfig, RunOptions, extract


def subset_csv(root: Path, n: int, out: Path) -> Path:
    """A CSV manifest of ``n`` demo videos, spread over the classes (every k-th id)."""
    videos = load_manifest(root).videos
    step = max(1, len(videos) // n)
    classes = load_manifest(root).classes
    rows = [f"{v.id},{classes[v.label]}" for v in videos[::step][:n]]
    out.write_text("path,label\n" + "\n".join(rows) + "\n")
    return out


def same(a: Path, b: Path) -> bool:
    with FeatureStore.open(a) as x, FeatureStore.open(b) as y:
        return x.ids() == y.ids() and all(np.array_equal(x.get(v), y.get(v)) for v in x.ids())


def ray_run(ray, cpus: int, data: Path, csv: Path, out: Path, cfg, opts, shard_size: int) -> tuple[float, float]:
    t0 = time.perf_counter()
    ray.init(num_cpus=cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1])}})
    t_init = time.perf_counter() - t0
    try:
        s = run_ray(data, out, cfg, opts, shard_size=shard_size, csv=csv, progress=False)
    finally:
        ray.shutdown()
    if s.failed or s.videos_done == 0:
        raise SystemExit(f"ray run with {cpus} CPU(s) failed: {s.failed}")
    return s.wall, t_init


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--videos", type=int, default=24, help="Demo videos to extract.")
    ap.add_argument("--frames", type=int, default=8, help="Frames sampled per video.")
    ap.add_argument("--shard-size", type=int, default=4, help="Videos per shard in the Ray runs.")
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None, help="None: the embedded weights; 'random' for a quick look.")
    args = ap.parse_args()
    import ray

    cfg = ExtractConfig(sampling=Sampling(mode="frames", frames=args.frames), backbone=args.backbone,
                        weights=args.weights)
    opts = RunOptions(workers=1, progress=False, commit_every=8)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = write_demo_dataset(tmp / "demo")
        csv = subset_csv(data, args.videos, tmp / "subset.csv")
        n = len(load_manifest(data, csv=csv).videos)
        rows = []
        warm = tmp / "warm.csv"  # imports and weights read once, so the single-process rows time extraction only
        warm.write_text(csv.read_text().splitlines()[0] + "\n" + csv.read_text().splitlines()[1] + "\n")
        extract(data, tmp / "warm", cfg, opts, csv=warm)
        t0 = time.perf_counter()
        extract(data, tmp / "single", cfg, opts, csv=csv)
        t_single = time.perf_counter() - t0
        rows.append((f"single process, {torch.get_num_threads()} threads", 1, t_single, 0.0, None))
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        t0 = time.perf_counter()
        extract(data, tmp / "single1", cfg, opts, csv=csv)
        rows.append(("single process, 1 thread", 1, time.perf_counter() - t0, 0.0, "(reference)"))
        torch.set_num_threads(threads)
        shards = shards_for(n, args.shard_size)
        walls = {}
        for cpus, size in [(1, args.shard_size), (2, args.shard_size), (1, n)]:
            out = tmp / f"ray{cpus}-{size}"
            wall, t_init = ray_run(ray, cpus, data, csv, out, cfg, opts, size)
            walls[(cpus, size)] = wall
            label = f"ray, {cpus} worker{'s' if cpus > 1 else ''}, {shards_for(n, size)} shard(s)"
            rows.append((label, cpus, wall, t_init, same(tmp / "single1", out)))
    print(f"{n} demo videos, {args.frames} frames each, backbone {args.backbone}, shard size {args.shard_size}")
    print(f"{'run':34s} {'wall s':>8s} {'videos/s':>9s} {'vs single':>9s} {'ray.init s':>10s}  bitwise equal")
    for label, _, wall, t_init, eq in rows:
        print(f"{label:34s} {wall:8.1f} {n / wall:9.2f} {t_single / wall:8.2f}x {t_init:10.1f}  "
              f"{'-' if eq is None else eq}")
    per_shard = (walls[(1, args.shard_size)] - walls[(1, n)]) / max(1, shards - 1)
    print(f"per-shard overhead (1 worker, {shards} shards vs 1): {per_shard:.2f} s")


if __name__ == "__main__":
    main()
