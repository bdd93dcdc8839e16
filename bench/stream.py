"""Training over a store larger than memory: ts-lstm streamed from the parts with a fixed budget, as the store grows.

Writes synthetic stores (``--videos`` sizes, each video 25 frames x ``--dim`` float16 features, classes told apart
by a class-specific direction of length ``--signal`` hidden in unit noise; written class by class in parts of 64
videos, as an extraction of a manifest sorted by class writes them; 60% train, 20% validation, 20% test), then trains
``ts-lstm``, each run in a fresh Python process, one thread:

- on the smallest store, with the default recipe, twice: features in memory, and streamed with ``memory_gb`` of
  ``--budget-mib`` (a store that fits both ways: the test accuracy of each);
- on every store, one pass over the training set (``epochs=1 min_steps=0 patience_steps=0 eval_every=100``, the
  rest of the default recipe), in memory and streamed with the same budget: peak RSS as the store grows.

The training and validation sets share the budget (as ``twostream train``: held in memory together when they fit,
else both streamed); the test set is held in memory when it fits the budget alone. Each row gives the process's
RSS before any features are read (the baseline: imports, torch, the open store, the head, and one training step and
one evaluation batch of a copy of the head on random data, so that torch's kernels and workspaces are counted there)
and its peak (``ru_maxrss``), and their difference.

    PYTHONPATH=. .venv/bin/python bench/stream.py                     # 2,000 / 8,000 / 32,000 videos x 25 x 256
    PYTHONPATH=. .venv/bin/python bench/stream.py --videos 2000,8000 --dim 1280 --budget-mib 30
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
ONE_PASS = {"epochs": 1, "min_steps": 0, "patience_steps": 0, "eval_every": 100}

PROBE = r"""
import json, resource, sys, time
import numpy as np, torch
import pipeline.heads  # registers the heads
from pipeline.features import VideoFeatures, features_nbytes
from pipeline.registry import HEADS
from pipeline.store import FeatureStore
from pipeline.training import fit, predict, resolve_configs
path, budget, classes, stream, overrides = sys.argv[1], float(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "1", json.loads(sys.argv[5])
def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20
torch.set_num_threads(1)
fs = FeatureStore.open(path)
ids = fs.ids()
labels = [int(v.split("/")[0][1:]) for v in ids]
test = [i for i, v in enumerate(ids) if int(v.split("_")[-1]) % 5 == 0]
val = [i for i, v in enumerate(ids) if int(v.split("_")[-1]) % 5 == 1]
train = [i for i in range(len(ids)) if i not in set(test) | set(val)]
head_cfg, cfg = resolve_configs("ts-lstm", {"memory_gb": budget, **overrides}, seed=0)
torch.manual_seed(0)
head = HEADS.get("ts-lstm").builder(head_cfg, fs.streams["rgb"], classes, (fs.streams["rgb"],))
with torch.random.fork_rng():  # warm-up on a copy, random data: torch's kernels and workspaces join the baseline
    import copy
    warm = copy.deepcopy(head)
    dim = fs.streams["rgb"]
    warm(torch.randn(cfg.batch_size, cfg.frames, dim)).sum().backward()
    torch.optim.AdamW(warm.parameters()).step()
    with torch.no_grad():
        warm.eval()(torch.randn(cfg.eval_batch_size, cfg.frames, dim))
    del warm
baseline = rss_mib()
def part(ix, in_memory=None):
    return VideoFeatures(fs, [ids[i] for i in ix], [labels[i] for i in ix], ["rgb"], frames=cfg.frames,
                         memory_gb=budget, in_memory=in_memory)
both = features_nbytes(fs, [ids[i] for i in train + val], ["rgb"], cfg.frames) <= budget * 2**30 and not stream
tr, va = part(train, both), part(val, both)
t0 = time.perf_counter()
out = fit(head, tr, va, cfg, torch.device("cpu"), progress=False)
secs = time.perf_counter() - t0
del tr, va
te = part(test, False if stream else None)
acc = float((predict(head, te, torch.device("cpu"), cfg.eval_batch_size).argmax(1) == te.labels).mean())
print(json.dumps({"in_memory": both, "fit_s": secs, "steps": out["steps_run"], "accuracy": acc, "baseline_mb": baseline,
                  "rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def build(path: Path, n: int, dim: int, classes: int, signal: float = 0.08, seed: int = 0) -> int:
    from pipeline.store import FeatureStore

    rng = np.random.default_rng(seed)
    directions = rng.standard_normal((classes, dim)).astype(np.float32)
    meta = {"frame_indices": np.arange(FRAMES), "fps": 25.0, "n_frames": FRAMES, "duration": 1.0, "size": 0,
            "sha256": ""}
    with FeatureStore.writer(path, {"bench": "stream", "dim": dim}, [f"c{k}" for k in range(classes)],
                             name="bench", commit_every=64) as w:
        # Written in id order (class by class), as an extraction of a manifest sorted by class writes its parts.
        for i in tqdm(sorted(range(n), key=lambda i: (i % classes, i)), desc=f"store of {n:,}", unit="video", leave=False):
            c = i % classes
            x = rng.standard_normal((FRAMES, dim)).astype(np.float32) + signal * directions[c]
            w.add(f"c{c}/v_{i:06d}", {"rgb": x}, meta)
    return n * FRAMES * dim * 2


def probe(path: Path, budget_gb: float, classes: int, stream: bool, overrides: dict) -> dict:
    out = subprocess.run([sys.executable, "-c", PROBE, str(path), str(budget_gb), str(classes), str(int(stream)),
                          json.dumps(overrides)], check=False, capture_output=True, text=True, cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    if out.returncode:
        raise SystemExit(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--videos", default="2000,8000,32000", help="store sizes, comma-separated")
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--classes", type=int, default=8)
    ap.add_argument("--signal", type=float, default=0.08, help="length of the class direction added to each frame")
    ap.add_argument("--budget-mib", type=float, default=6.0, help="memory_gb of every streamed run, in MiB")
    ap.add_argument("--out", default=None, help="also write the table to this file (bench/results/...)")
    args = ap.parse_args()
    sizes = [int(v) for v in args.videos.split(",")]
    budget = args.budget_mib / 1024
    rows = []
    root = Path(tempfile.mkdtemp(prefix="twostream-stream-"))
    try:
        for k, n in enumerate(tqdm(sizes, desc="stores", unit="store")):
            path = root / f"store-{n}"
            mib = build(path, n, args.dim, args.classes, args.signal) / 2**20
            if k == 0:
                rows.append((n, mib, "default recipe, in memory", probe(path, 2 * mib / 1024 + 1, args.classes, False, {})))
                rows.append((n, mib, "default recipe, streamed", probe(path, budget, args.classes, True, {})))
            rows.append((n, mib, "one pass, in memory", probe(path, 2 * mib / 1024 + 1, args.classes, False, ONE_PASS)))
            rows.append((n, mib, "one pass, streamed", probe(path, budget, args.classes, True, ONE_PASS)))
            shutil.rmtree(path, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(f"ts-lstm (1 thread), videos x {FRAMES} frames x {args.dim} float16 features; streamed runs: memory_gb = "
          f"{args.budget_mib:g} MiB")
    lines = [("| videos | features (MiB) | run | held in memory | baseline RSS (MiB) | peak RSS (MiB) | "
              "peak - baseline (MiB) | fit (s) | optimiser steps | test accuracy (%) |"),
             "|---:|---:|---|---|---:|---:|---:|---:|---:|---:|"]
    for n, mib, name, r in rows:
        lines.append(f"| {n:,} | {mib:.0f} | {name} | {r['in_memory']} | {r['baseline_mb']:.0f} | {r['rss_mb']:.0f} | "
                     f"{r['rss_mb'] - r['baseline_mb']:.0f} | {r['fit_s']:.0f} | {r['steps']} | "
                     f"{100 * r['accuracy']:.1f} |")
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
