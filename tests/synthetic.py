"""A synthetic dataset for stage-two tests: UCF101 layout (class folders of empty video files, splits/classInd.txt,
trainlistNN / testlistNN) plus a feature store whose mean rgb feature tells the class. Groups 1-2 of each class are
test, the rest train (as UCF101's split 1 holds out groups 1-7)."""

from __future__ import annotations

import contextlib
from pathlib import Path

import cv2
import numpy as np

from pipeline.store import FeatureStore


def write_ucf_store(tmp_path: Path, classes: list[str], *, groups: int = 7, clips: int = 2,
                    T: int | tuple[int, int] = 8, dims: tuple[int, int] = (6, 4), splits: tuple[int, ...] = (1,),
                    seed: int = 0, skip_in_store: tuple[str, ...] = (), frame_step: int = 1,
                    config: dict | None = None) -> tuple[Path, Path]:
    """Returns (dataset root, store path). ``T``: frames per video, or a (low, high) range drawn per video;
    ``splits``: which split numbers get (the same) list files; ``skip_in_store``: listed videos left out of the store;
    ``config``: the store's extraction config (e.g. its ``sampling``)."""
    root, store_path = tmp_path / "data", tmp_path / "store"
    (root / "splits").mkdir(parents=True)
    rng = np.random.default_rng(seed)
    train, test = [], []
    with FeatureStore.writer(store_path, {"backbone": "synthetic", **(config or {})}, classes) as w:
        for c, name in enumerate(classes):
            (root / name).mkdir()
            for g in range(1, groups + 1):
                for k in range(1, clips + 1):
                    rel = f"{name}/v_{name}_g{g:02d}_c{k:02d}.avi"
                    (root / rel).touch()
                    (test if g <= 2 else train).append(rel if g <= 2 else f"{rel} {c + 1}")
                    if rel in skip_in_store:
                        continue
                    t = int(rng.integers(*T)) if isinstance(T, tuple) else T
                    rgb = rng.normal(0, 1, (t, dims[0])).astype(np.float32)
                    rgb[:, c] += 2.0  # the class is readable from the mean rgb feature
                    flow = rng.normal(0, 1, (t, dims[1])).astype(np.float32)
                    w.add(rel, {"rgb": rgb.astype(np.float16), "flow": flow.astype(np.float16)},
                          meta={"frame_indices": np.arange(t) * frame_step, "fps": 25.0, "n_frames": frame_step * t,
                                "duration": frame_step * t / 25})
    (root / "splits" / "classInd.txt").write_text("".join(f"{i + 1} {n}\n" for i, n in enumerate(classes)))
    for n in splits:
        (root / "splits" / f"trainlist{n:02d}.txt").write_text("\n".join(train) + "\n")
        (root / "splits" / f"testlist{n:02d}.txt").write_text("\n".join(test) + "\n")
    return root, store_path


def data_warnings(metrics: dict) -> list[str]:
    """A run's warnings about its data and protocol, without the did-not-learn verdict (tests that train one epoch
    on purpose check the former; the verdict has tests of its own)."""
    return [w for w in metrics["warnings"] if not w.startswith("did not learn")]


def write_video(path: Path, n: int, h: int = 48, w: int = 64, seed: int = 0, gray: bool = False) -> Path:
    """An MJPG .avi of ``n`` frames: one random image shifted 2 pixels right per frame (a known, constant motion)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"MJPG"), 25, (w, h), isColor=not gray)
    base = rng.integers(0, 255, (h, w, 3), dtype=np.uint8)
    for i in range(n):
        frame = np.roll(base, 2 * i, axis=1)
        vw.write(frame[..., 0].copy() if gray else frame)
    vw.release()
    return path


def write_tiny_folders(root: Path) -> Path:
    """Folder-per-class layout: 2 classes ("left", "right") x 3 videos of 12-30 frames."""
    for c, cls in enumerate(["left", "right"]):
        for k in range(3):
            write_video(root / cls / f"{cls}{k}.avi", 12 + 6 * k, seed=10 * c + k)
    return root


def run_over_store(store: Path, tmp: Path) -> Path:
    """A complete run directory of an (untrained) temporal-pool head over ``store``'s features: enough for
    ``Predictor`` to rebuild the store's extraction."""
    import json
    from dataclasses import asdict

    from safetensors.torch import save_file

    import pipeline.heads  # noqa: F401  (registers every head)
    from pipeline.extraction import extraction_record
    from pipeline.training import build_head, resolve_configs

    fs = FeatureStore.open(store)
    streams = tuple(fs.streams)
    run = tmp / "runs" / "temporal-pool-000000000000"
    run.mkdir(parents=True)
    head_cfg, cfg = resolve_configs("temporal-pool", {"frames": "0"})
    dims = tuple(fs.streams[s] for s in streams)
    head = build_head("temporal-pool", head_cfg, sum(dims), len(fs.classes), dims, 0)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(run / "weights.safetensors"))
    (run / "config.json").write_text(json.dumps({"head": "temporal-pool", "head_config": asdict(head_cfg),
                                                 "train": asdict(cfg), "streams": list(streams), "split": 1,
                                                 "classes": fs.classes}))
    (run / "extraction.json").write_text(json.dumps(extraction_record(fs, streams, [])))
    (run / "COMPLETE").write_text("x\n")
    return run


@contextlib.contextmanager
def threads_of_extract_workers(workers: int):
    """Run the block with the torch thread count an extraction with ``--workers N`` gives its CNNs on the CPU
    (``worker_threads``): features are the same bit for bit only at equal thread counts, and the test modules pin
    their process to one thread."""
    import torch

    from pipeline.extraction import worker_threads

    before = torch.get_num_threads()
    torch.set_num_threads(worker_threads(workers))
    try:
        yield
    finally:
        torch.set_num_threads(before)
