"""``twostream flow DATASET --out DIR``: optical flow of every consecutive frame pair, cached as uint8 images.

Fine-tuning the temporal stream (stages/finetune.py) draws random flow stacks from every video in every
epoch; computing TV-L1 anew each time would cost far more than the CNN, so flow is computed once here
. The images are the ones extraction feeds the temporal stream: each component clipped at
+-bound and rescaled to uint8 with 128 = zero motion (Ma et al. 3.4.1; ``pipeline.flow.flow_to_images``),
computed by extraction's own ``stages.extract.flow_stacks_for`` (same grayscale conversion, same flow call).

Layout::

    DIR/flow_cache.json        format, flow {method, params (all of them), bound, encoding}, classes, created
    DIR/videos/<video id>.h5   dataset ``flow`` uint8 [n_frames - 1, 2, H, W] (pair i = frames (i, i+1)),
                               one LZF-compressed chunk per pair; attrs n_frames, fps, height, width, size, sha256
    DIR/errors.jsonl           one JSON line per failed video (id, stage, error, message)

Each video is computed in one of ``stages.extract``'s isolated workers (a crashing decoder costs one video)
and written to ``*.partial``, fsynced and renamed, so a killed run loses at most the videos in flight and a
rerun skips the finished ones. A cache built with other flow settings is refused, naming both.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import UserError

__all__ = ["FlowCache", "FlowCacheConfig", "cache_video", "describe_flow", "flow_cache", "resolved_flow"]

FORMAT = 1
HEADER = "flow_cache.json"
ENCODING = "uint8, 128 = zero motion"
CHUNK_PAIRS = {"cpu": 32, "cuda": 256}  # pairs per flow call (a GPU wants large batches; bounds memory on CPU)


@dataclass(frozen=True)
class FlowCacheConfig:
    """The flow a cache holds (recorded in ``flow_cache.json``; a cache holds one setting)."""

    method: str = "tvl1"
    params: tuple[tuple[str, Any], ...] = ()
    bound: float = 20.0
    decoder: str = "auto"


def resolved_flow(method: str, params=(), bound: float = 20.0) -> dict:
    """``{method, params, bound, encoding}`` with every parameter the method runs with, as plain JSON."""
    from pipeline import flow as flowlib

    try:
        full = {**flowlib.default_params(method), **dict(params)}
    except ValueError as e:
        raise UserError(str(e)) from None
    return json.loads(json.dumps({"method": method, "params": full, "bound": float(bound), "encoding": ENCODING},
                                 sort_keys=True, default=str))


def describe_flow(flow: dict, other: dict | None = None) -> str:
    """``tvl1 bound 20 L=10`` plus the parameters that differ from ``other`` (one line, for error messages)."""
    text = f"{flow.get('method')} bound {flow.get('bound'):g}"
    if flow.get("stack") is not None:
        text += f" L={flow['stack']}"
    if other is not None and other.get("method") == flow.get("method"):
        p, q = flow.get("params", {}), other.get("params", {})
        diff = [f"{k}={p.get(k)}" for k in sorted(set(p) | set(q)) if p.get(k) != q.get(k)]
        if diff:
            text += " (" + ", ".join(diff) + ")"
    return text


def _video_file(root: Path, video_id: str) -> Path:
    return root / "videos" / f"{video_id}.h5"


# ---------------------------------------------------------------------------------------------- worker side

def cache_video(task: dict) -> dict:
    """Runs in a worker: decode one video, compute the flow of every consecutive pair, write it atomically."""
    import h5py

    from pipeline.extraction import flow_stacks_for
    from pipeline.store import file_sha256
    from pipeline.video import DecodeError, decode, decode_for_sampling

    t0 = time.perf_counter()
    path, out, flow = Path(task["path"]), Path(task["out"]), task["flow"]
    dec = decode_for_sampling(path, task["decoder"], task["device"])
    n = dec.n_frames
    if n < 2:
        raise DecodeError(f"{n} frame(s): flow needs at least 2")

    def frames(lo: int, hi: int) -> np.ndarray:  # RGB frames [lo, hi)
        if len(dec.frames):
            return dec.frames[lo:hi]
        return decode(path, task["decoder"], np.arange(lo, hi), task["device"]).frames

    h, w = frames(0, 1).shape[1:3]
    pair_flow = {**flow, "stack": 1}  # extraction's own stack builder with L = 1: one image per pair
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    seconds_flow = 0.0
    with h5py.File(tmp, "w") as f:
        ds = f.create_dataset("flow", shape=(n - 1, 2, h, w), dtype=np.uint8, chunks=(1, 2, h, w),
                              compression="lzf")  # one pair per chunk: a stack reads only its L pairs
        chunk = CHUNK_PAIRS["cuda" if str(flow["device"]).startswith("cuda") else "cpu"]
        for lo in range(0, n - 1, chunk):
            hi = min(lo + chunk, n - 1)
            rgb = frames(lo, hi + 1)  # [hi-lo+1,H,W,3]
            t = time.perf_counter()
            ds[lo:hi] = flow_stacks_for(rgb, np.arange(hi - lo), pair_flow)  # [hi-lo,2,H,W] uint8
            seconds_flow += time.perf_counter() - t
        f.attrs.update({"n_frames": n, "fps": float(dec.fps), "height": h, "width": w,
                        "size": os.path.getsize(path), "sha256": file_sha256(path), "method": flow["method"],
                        "bound": float(flow["bound"]), "params": json.dumps(flow["params"], sort_keys=True)})
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, out)
    return {"n_frames": n, "pairs": n - 1, "seconds": {"flow": seconds_flow,
                                                       "decode+write": time.perf_counter() - t0 - seconds_flow}}


# ---------------------------------------------------------------------------------------------- the reader

class FlowCache:
    """Read flow stacks from a cache directory (used by fine-tuning)."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root)
        header = self.root / HEADER
        if not header.is_file():
            raise UserError(f"{root} is not a flow cache (no {HEADER}); make one with: twostream flow DATASET "
                            f"--out {root}")
        self.header = json.loads(header.read_text())
        if self.header.get("format") != FORMAT:
            raise UserError(f"{root}: flow cache format {self.header.get('format')} is not {FORMAT}")
        self.flow: dict = self.header["flow"]

    def has(self, video_id: str) -> bool:
        return _video_file(self.root, video_id).is_file()

    def n_frames(self, video_id: str) -> int:
        import h5py

        with h5py.File(self._file(video_id), "r") as f:
            return int(f.attrs["n_frames"])

    def _file(self, video_id: str) -> Path:
        p = _video_file(self.root, video_id)
        if not p.is_file():
            raise UserError(f"flow cache {self.root} has no flow for {video_id} (run twostream flow again; "
                            "failed videos are listed in its errors.jsonl)")
        return p

    def stacks(self, video_id: str, positions, length: int) -> np.ndarray:
        """uint8 stacks ``[K, 2L, H, W]`` starting at frame ``positions`` (``pipeline.flow.assemble_stacks``:
        channels ``x1, y1, ...``; a stack that runs past the last pair repeats it)."""
        import h5py

        from pipeline.flow import assemble_stacks, pairs_for_stacks

        with h5py.File(self._file(video_id), "r") as f:
            ds = f["flow"]
            if not isinstance(ds, h5py.Dataset) or ds.dtype != np.uint8 or ds.ndim != 4 or ds.external:
                raise UserError(f"{self._file(video_id)}: not a flow cache file")
            n = int(f.attrs["n_frames"])
            pairs = pairs_for_stacks(n, positions, length)
            images = ds[[p[0] for p in pairs]]  # [P,2,H,W]: only the pairs the stacks use
        return assemble_stacks(images, pairs, n, positions, length)  # [K,2L,H,W]


# ------------------------------------------------------------------------------------------------ main side

def _open_cache(out: Path, flow: dict, classes: list[str]) -> None:
    """Write the header of a new cache, or refuse one built with other flow settings."""
    from pipeline import __version__
    from pipeline.store import atomic_write_text

    header = out / HEADER
    if header.is_file():
        have = json.loads(header.read_text()).get("flow", {})
        if have != flow:
            raise UserError(f"{out} caches flow {describe_flow(have, flow)}, this run asks for "
                            f"{describe_flow(flow, have)}; use another --out")
        return
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(header, json.dumps({"format": FORMAT, "flow": flow, "classes": classes,
                                          "package_version": __version__,
                                          "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                         indent=2, sort_keys=True))


def _log_error(out: Path, video_id: str, stage: str, error: str, message: str) -> None:
    line = json.dumps({"id": video_id, "stage": stage, "error": error, "message": message[:2000],
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    with open(out / "errors.jsonl", "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def flow_cache(dataset: str | os.PathLike, out: str | os.PathLike, cfg: FlowCacheConfig, opts,
               split_dir: str | os.PathLike | None = None, csv: str | os.PathLike | None = None):
    """Cache the flow of every video of ``dataset`` in ``out``. Resumable and idempotent.

    ``opts`` is a ``stages.extract.RunOptions`` (device, workers, timeout, limit, retry_failed, progress; its
    batch size and commit interval do not apply). Returns a ``stages.extract.Summary``.
    """
    from pipeline.datasets import load_manifest
    from pipeline.extraction import resolve_device
    from pipeline.extraction import worker_init as _worker_init
    from pipeline.isolation import isolated_map
    from pipeline.store import atomic_write_text, read_errors
    from pipeline.video import choose_backend
    from stages.extract import Summary
    from stages.progress import warm_bar

    t_start = time.perf_counter()
    out = Path(out)
    manifest = load_manifest(dataset, split_dir=split_dir, csv=csv)
    device = resolve_device(opts.device)
    decoder = choose_backend(cfg.decoder, device)
    flow = resolved_flow(cfg.method, cfg.params, cfg.bound)
    _open_cache(out, flow, manifest.classes)
    for stale in (out / "videos").rglob("*.partial") if (out / "videos").is_dir() else ():
        stale.unlink()  # work in flight of a killed run
    items = manifest.videos
    failed_before = {e["id"] for e in read_errors(out)}
    if opts.retry_failed:
        items = [v for v in items if v.id in failed_before]
    todo = [v for v in items if not _video_file(out, v.id).is_file()]
    summary = Summary(store=str(out), skipped=len(items) - len(todo))
    summary.seconds = {"flow": 0.0, "decode+write": 0.0}
    if opts.limit is not None:
        summary.left = max(0, len(todo) - max(0, opts.limit))
        todo = todo[: max(0, opts.limit)]
    summary.total = len(todo)
    flow_dev = device if device.startswith("cuda") else "cpu"
    tasks = ((v.id, {"path": str(v.path), "out": str(_video_file(out, v.id)), "decoder": decoder,
                     "device": device if decoder == "torchcodec" else "cpu",
                     "flow": {"method": flow["method"], "params": flow["params"], "bound": flow["bound"],
                              "device": flow_dev}}) for v in todo)
    # as in extraction: CUDA work stays in-process (one CUDA context, not one per worker)
    workers = 0 if device.startswith("cuda") else opts.workers
    bar, eta = warm_bar(len(todo), disable=not opts.progress, desc="flow")  # time left measured after the first video
    for res in isolated_map(cache_video, tasks, workers=workers, timeout=opts.timeout, init=_worker_init):
        if res.ok:
            summary.done += 1
            summary.frames += res.value["n_frames"]
            for k, v in res.value["seconds"].items():
                summary.seconds[k] += v
        else:
            _log_error(out, res.key, "flow", res.error, res.message)
            summary.failed += 1
            summary.failures.append({"id": res.key, "error": res.error, "message": res.message})
        eta.update(1)
        pairs = summary.frames - summary.done
        bar.set_postfix_str(f"left {eta.text()}, pairs/s {pairs / max(summary.seconds['flow'], 1e-9):.1f}, "
                            f"failed {summary.failed}", refresh=False)
        bar.update(1)
    bar.close()
    if opts.retry_failed and failed_before:  # drop the lines of videos that now have their flow
        keep = [e for e in read_errors(out) if not _video_file(out, e["id"]).is_file()]
        atomic_write_text(out / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in keep))
    summary.wall = time.perf_counter() - t_start
    atomic_write_text(out / "last_run.json", json.dumps(summary.as_dict(), indent=2, default=str))
    return summary
