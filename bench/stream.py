"""Training over a store larger than memory: ts-lstm streamed from the parts vs held in memory.

Writes a synthetic store (``--videos`` videos of 25 frames x ``--dim`` float16 features, classes told apart by a
class-specific direction hidden in noise), then trains ``ts-lstm`` with its default recipe twice, each in a fresh
Python process: with the features in memory, and streamed from the store with a budget (``memory_gb``) of a quarter
of their size. Prints peak RSS (``ru_maxrss``), fit time and test accuracy of both, side by side.

    PYTHONPATH=. .venv/bin/python bench/stream.py                     # 2,000 videos x 25 x 1280: 122 MiB of features
    PYTHONPATH=. .venv/bin/python bench/stream.py --videos 8000
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

ROOT = Path(__file__).resolve().parents[1]
FRAMES = 25

PROBE = r"""
import json, resource, sys, time
import numpy as np, torch
import pipeline.heads  # registers the heads
from pipeline.features import VideoFeatures
from pipeline.registry import HEADS
from pipeline.store import FeatureStore
from pipeline.training import fit, predict, resolve_configs
path, budget, classes = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(1)
fs = FeatureStore.open(path)
ids = fs.ids()
labels = [int(v.split("/")[0][1:]) for v in ids]
test = [i for i, v in enumerate(ids) if int(v.split("_")[-1]) % 5 == 0]
val = [i for i, v in enumerate(ids) if int(v.split("_")[-1]) % 5 == 1]
train = [i for i in range(len(ids)) if i not in set(test) | set(val)]
def part(ix, gb):
    return VideoFeatures(fs, [ids[i] for i in ix], [labels[i] for i in ix], ["rgb"], frames=25, memory_gb=gb)
head_cfg, cfg = resolve_configs("ts-lstm", {"memory_gb": budget}, seed=0)
torch.manual_seed(0)
entry = HEADS.get("ts-lstm")
head = entry.builder(head_cfg, fs.streams["rgb"], classes, (fs.streams["rgb"],))
tr, va, te = part(train, budget), part(val, budget), part(test, budget)
t0 = time.perf_counter()
out = fit(head, tr, va, cfg, torch.device("cpu"), progress=False)
secs = time.perf_counter() - t0
acc = float((predict(head, te, torch.device("cpu"), 64).argmax(1) == te.labels).mean())
print(json.dumps({"in_memory": tr.in_memory, "fit_s": secs, "steps": out["steps_run"], "accuracy": acc,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build(path: Path, n: int, dim: int, classes: int, seed: int = 0) -> int:
    from pipeline.store import FeatureStore

    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((classes, dim)).astype(np.float32)
    meta = {"frame_indices": np.arange(FRAMES), "fps": 25.0, "n_frames": FRAMES, "duration": 1.0, "size": 0,
            "sha256": ""}
    with FeatureStore.writer(path, {"bench": "stream", "dim": dim}, [f"c{k}" for k in range(classes)],
                             name="bench", commit_every=64) as w:
        for i in tqdm(range(n), desc="store", unit="video", leave=False):
            c = i % classes
            x = rng.standard_normal((FRAMES, dim)).astype(np.float32) + 0.15 * directions[c]
            w.add(f"c{c}/v_{i:06d}", {"rgb": x}, meta)
    return n * FRAMES * dim * 2


def probe(path: Path, budget_gb: float, classes: int) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(budget_gb), str(classes)], check=False,
                         capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", type=int, default=2000)
    ap.add_argument("--dim", type=int, default=1280)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--out", default=None, help="also write the table to this file (bench/results/...)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="twostream-stream-"))
    try:
        nbytes = build(root / "store", args.videos, args.dim, args.classes)
        gb = nbytes / 2**30
        rows = [("in memory", probe(root / "store", 2 * gb + 1, args.classes)),
                ("streamed, budget 1/4 of the features", probe(root / "store", gb / 4, args.classes))]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"ts-lstm (default recipe, 1 thread), {args.videos} videos x {FRAMES} frames x {args.dim}: "
          f"{nbytes / 2**20:.0f} MiB of float16 features")
    lines = ["| features | held in memory | peak RSS (MiB) | fit (s) | optimiser steps | test accuracy (%) |",
             "|---|---|---:|---:|---:|---:|"]
    for name, r in rows:
        lines.append(f"| {name} | {r['in_memory']} | {r['rss_mb']:.0f} | {r['fit_s']:.0f} | {r['steps']} | "
                     f"{100 * r['accuracy']:.1f} |")
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
