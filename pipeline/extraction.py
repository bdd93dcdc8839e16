"""The extraction core: decode -> sample -> flow stacks -> stream CNNs, shared by every stage that needs features.

``extract`` (into a store), ``finetune`` (live flow), the flow cache and ``predict`` (new videos) all run this one
path, so a video's features are the same whoever computes them:

- ``prepare_video`` (a worker process: decode, sample with the store's ``Sampling``, flow stacks of L fields,
  Ma et al. 3.1) returns uint8 frames and stacks; ``worker_init`` keeps each worker to one thread;
- ``build_streams`` builds each stream's CNN (``pipeline.backbones``), seeded, rgb first, so random-weight test
  backbones are reproducible too; ``embed`` preprocesses (with the test-time views) and runs one stream's CNN;
- ``extract_video`` (CPU runs with workers: the whole chain in a worker process, its CNNs built once by
  ``cnn_worker_init`` with ``cores // workers`` threads), so each core runs a video's decode, flow, preprocessing
  and CNNs while the others run theirs and the main process only writes;
- ``store_config`` is what a store records of all this; ``streams_from_config`` and ``video_task`` rebuild the
  same CNNs and worker task from such a record (``predict`` on a new video).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, NamedTuple

import numpy as np

from pipeline.errors import UserError
from pipeline.sampling import Sampling, sample_indices

__all__ = [
    "ExtractConfig",
    "FlowImages",
    "Stream",
    "build_streams",
    "cnn_worker_init",
    "embed",
    "extract_video",
    "extraction_record",
    "flow_images_for",
    "flow_stacks_for",
    "flow_task",
    "prepare_video",
    "resolve_device",
    "store_config",
    "streams_from_config",
    "video_task",
    "worker_init",
    "worker_threads",
]


@dataclass(frozen=True)
class ExtractConfig:
    """Everything that determines the features (recorded in the store; a store holds one config)."""

    streams: tuple[str, ...] = ("rgb",)
    sampling: Sampling = field(default_factory=Sampling)
    backbone: str = "efficientnet_lite0"
    weights: str | None = None            # None: the embedded ImageNet weights of the default backbone
    flow_weights: str | None = None       # temporal-stream CNN weights (None: cross-modality init of `weights`)
    tta: str = "center"                   # center | flip | 10crop (features averaged over the views)
    keep_views: bool = False              # also store each view's features as `<stream>_views` [T, V, D]
    precision: str = "auto"               # fp32 | bf16 | auto (bf16 on CUDA)
    spatial_grid: int | None = None       # also store the last conv map pooled to g x g (conv pooling, Ng et al.)
    foveated: bool = False                # Karpathy et al. 3.2 context + fovea streams
    flow_method: str = "tvl1"
    flow_params: tuple[tuple[str, Any], ...] = ()
    flow_bound: float = 20.0              # clip at +-bound before quantising to uint8 (Ma et al.: 20)
    flow_stack: int = 10                  # L consecutive flow fields per temporal-stream input (2L channels)
    decoder: str = "auto"
    runtime: str = "torch"                # torch | onnx: the stream CNNs run by ONNX Runtime (CPU, fp32)


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {device}: CUDA is not available on this machine")
    if device != "cpu" and not device.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N]; got {device!r}")
    return device


# ---------------------------------------------------------------------------------------------- worker side

def worker_init() -> None:
    # Workers run in parallel with each other and the CNN: one thread each keeps the cores busy without thrash.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2

    cv2.setNumThreads(1)
    try:
        import torch

        torch.set_num_threads(1)
    except ImportError:
        pass


def prepare_video(task: dict) -> dict:
    """Runs in a worker: decode one video, sample frames, compute flow stacks. Returns uint8 arrays + meta."""
    from pipeline.store import file_sha256
    from pipeline.video import decode, decode_for_sampling

    t0 = time.perf_counter()
    path, sampling = task["path"], task["sampling"]
    dec = decode_for_sampling(path, task["decoder"], task["device"])
    idx = sample_indices(dec.n_frames, dec.fps, sampling)
    frames = dec.frames
    if len(frames) == 0:  # a long video: second pass for the needed frames only
        need = np.unique(idx)
        if task["flow"]:
            need = np.unique(np.concatenate([need, *[np.arange(i, i + task["flow"]["stack"] + 1) for i in need]]))
            need = need[need < dec.n_frames]
        sub = decode(path, task["decoder"], need, task["device"]).frames
        frames = np.zeros((dec.n_frames, *sub.shape[1:]), np.uint8)
        frames[need] = sub
    out: dict[str, Any] = {"rgb": frames[idx] if "rgb" in task["streams"] else None}
    t1 = time.perf_counter()
    if task["flow"]:
        out["flow"] = flow_images_for(frames, idx, task["flow"])  # FlowImages: stacks unassembled
    t2 = time.perf_counter()
    out["meta"] = {"frame_indices": idx, "fps": dec.fps, "n_frames": dec.n_frames,
                   "duration": dec.n_frames / dec.fps, "size": os.path.getsize(path), "sha256": file_sha256(path),
                   "decoder": dec.backend, "height": int(frames.shape[1]), "width": int(frames.shape[2])}
    out["seconds"] = {"decode": t1 - t0, "flow": t2 - t1}
    return out


class FlowImages(NamedTuple):
    """A video's flow stacks, unassembled: the distinct uint8 flow images ``[P, 2, H, W]`` and the image of each
    slot of each stack ``rows [T, L]`` (``np.asarray`` gives the assembled stacks ``[T, 2L, H, W]``). A fifth of
    the stacks' bytes on the demo, and ``embed`` preprocesses each image once (``flow_stack_views``)."""

    images: np.ndarray
    rows: np.ndarray

    def __array__(self, dtype=None, copy=None):
        stacks = self.images[self.rows.reshape(-1)].reshape(len(self.rows), -1, *self.images.shape[2:])
        return stacks if dtype is None else stacks.astype(dtype)


def flow_stacks_for(frames: np.ndarray, idx: np.ndarray, flow: dict) -> np.ndarray:
    """uint8 stacks ``[T, 2L, H, W]`` of the L flow fields starting at each sampled position; each needed
    consecutive pair is computed once even when stacks overlap."""
    return np.asarray(flow_images_for(frames, idx, flow))


def flow_images_for(frames: np.ndarray, idx: np.ndarray, flow: dict) -> FlowImages:
    """The flow stacks of ``flow_stacks_for`` as ``FlowImages``: each needed consecutive pair's flow image once."""
    from pipeline.flow import compute_flow
    from pipeline.flow.images import flow_to_images
    from pipeline.flow.stacks import pairs_for_stacks, stack_pair_indices

    L = flow["stack"]
    if len(frames) < 2:  # a still image has no motion: zero flow (128 in the uint8 encoding)
        return FlowImages(np.full((1, 2, *frames.shape[1:3]), 128, np.uint8), np.zeros((len(idx), L), np.int64))
    pairs = pairs_for_stacks(len(frames), idx, L)
    a = np.array([p for p, _ in pairs])
    need = np.unique(np.concatenate([a, a + 1]))  # grey only the frames some pair uses (a long video holds many more)
    gray = (frames[need].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)
    first, second = np.searchsorted(need, a), np.searchsorted(need, a + 1)
    fields = compute_flow(gray[first], gray[second], method=flow["method"], device=flow["device"],
                          kernel=flow.get("kernel", "auto"), **flow["params"])
    images = flow_to_images(np.asarray(fields), flow["bound"])  # [P,2,H,W] uint8
    # pairs are the distinct first frames in order: a stack slot's pair start -> its row by binary search
    rows = np.searchsorted(a, stack_pair_indices(len(frames), idx, L))  # [T,L]
    return FlowImages(np.ascontiguousarray(images), rows.astype(np.int64))


# ------------------------------------------------------------------------------------------------ main side

@dataclass
class Stream:
    name: str
    backbone: Any
    tta: str
    grid: int | None
    keep_views: bool = False


def build_streams(cfg: ExtractConfig, device: str) -> list[Stream]:
    from pipeline.backbones import build_backbone

    streams = []
    for s in cfg.streams:
        in_chans = 3 if s == "rgb" else 2 * cfg.flow_stack
        weights = cfg.weights if s == "rgb" else (cfg.flow_weights or cfg.weights)
        bb = build_backbone(cfg.backbone, weights, in_chans=in_chans, device=device, foveated=cfg.foveated,
                            precision=cfg.precision)
        streams.append(Stream(s, with_runtime(bb, cfg.runtime), cfg.tta, cfg.spatial_grid, cfg.keep_views))
    return streams


def with_runtime(bb, runtime: str):
    """``bb`` as ``runtime`` runs it: itself (torch), or exported to ONNX Runtime (``OnnxRuntimeBackbone``, whose
    spec records ``runtime``, so a store holds features of one engine only)."""
    if runtime in ("torch", None):
        return bb
    if runtime in ("onnx", "onnxruntime"):
        from pipeline.backbones import OnnxRuntimeBackbone

        return OnnxRuntimeBackbone(bb)
    raise UserError(f"unknown --runtime {runtime!r}; choose torch or onnx")


def store_config(cfg: ExtractConfig, streams: list[Stream], decoder: str, device: str = "cpu") -> dict:
    """The config recorded in the store: every input that changes the features, resolved (``device``: where flow
    runs, which decides its kernel)."""
    out: dict[str, Any] = {
        "streams": list(cfg.streams),
        "sampling": asdict(cfg.sampling),
        "tta": cfg.tta,
        **({"keep_views": True} if cfg.keep_views else {}),  # absent when off: older stores keep their hash
        "spatial_grid": cfg.spatial_grid,
        "decoder": decoder,
        "backbones": {s.name: s.backbone.spec for s in streams},
    }
    if cfg.tta != "center":  # which streams hold averaged features, which every view (absent for one view)
        from pipeline.backbones import view_aggregation

        out["view_aggregation"] = view_aggregation(out)
    if "flow" in cfg.streams:
        from pipeline import flow as flowlib

        out["flow"] = {"method": cfg.flow_method,
                       "params": {**flowlib.default_params(cfg.flow_method), **dict(cfg.flow_params)},
                       "bound": cfg.flow_bound, "stack": cfg.flow_stack, "encoding": "uint8, 128 = zero motion"}
        kernel = flowlib.flow_kernel(cfg.flow_method, device)
        if kernel:  # absent for the torch / OpenCV code: stores made before the C loop keep their hash
            out["flow"]["kernel"] = kernel
    return out


def embed(stream: Stream, arr: np.ndarray, batch_size: int, seconds: dict[str, float]) -> dict[str, np.ndarray]:
    from pipeline.preprocess import flow_stack_views, preprocess, view_flips

    t0 = time.perf_counter()
    if isinstance(arr, FlowImages):  # each flow image preprocessed once, then the stacks gathered
        views = flow_stack_views(arr.images, arr.rows, stream.backbone.spec, stream.tta)  # -> [T,V,2L,S,S]
    else:
        if stream.name == "flow":
            arr = np.ascontiguousarray(arr.transpose(0, 2, 3, 1))  # [T,2L,H,W] -> [T,H,W,2L]
        views = preprocess(arr, stream.backbone.spec, stream.tta)  # -> [T,V,C,S,S]
    t1 = time.perf_counter()
    seconds["preprocess"] += t1 - t0
    out: dict[str, np.ndarray] = {}
    if stream.keep_views and not stream.grid:
        # Each view on its own (Karpathy 4.1: scores averaged over crops and flips at test time). The same flat
        # batches as the averaged path, so the mean over views is the stream's usual feature, bit for bit.
        t, v = views.shape[:2]
        per_view, _ = stream.backbone.extract(views.reshape(t * v, 1, *views.shape[2:]), batch_size=batch_size)
        per_view = per_view.view(t, v, -1)  # [T*V,D] -> [T,V,D]
        out[f"{stream.name}_views"] = per_view.numpy().astype(np.float16)
        feats, grid = per_view.mean(1), None
    else:
        feats, grid = stream.backbone.extract(views, batch_size=batch_size, grid=stream.grid,
                                              flips=view_flips(stream.tta))
        if stream.keep_views:
            t, v = views.shape[:2]
            per_view, _ = stream.backbone.extract(views.reshape(t * v, 1, *views.shape[2:]), batch_size=batch_size)
            out[f"{stream.name}_views"] = per_view.view(t, v, -1).numpy().astype(np.float16)  # [T,V,D]
    out[stream.name] = feats.numpy().astype(np.float16)
    if grid is not None:
        out[f"{stream.name}_map"] = grid.numpy().astype(np.float16)  # [T,C,g,g]
    seconds["cnn"] += time.perf_counter() - t1
    return out


# ------------------------------------------------------------------------------- the whole chain in a worker

_WORKER_STREAMS: tuple[list[Stream], int] | None = None  # a CNN worker's (streams, batch size)


def worker_threads(workers: int) -> int:
    """CNN threads per worker process: the cores this process may use, shared out (processes x threads = cores)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    return max(1, cores // max(1, workers))


def cnn_worker_init(cfg: ExtractConfig, threads: int, batch_size: int) -> None:
    """A worker of ``extract_video``: one thread for decoding and flow, ``threads`` for the CNNs, and the stream
    CNNs built once, seeded as the main process builds them (the same weights, random test backbones included).
    Features are the same bit for bit as another process's only at the same CNN thread count."""
    import torch

    worker_init()
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    global _WORKER_STREAMS
    _WORKER_STREAMS = (build_streams(cfg, "cpu"), batch_size)


def extract_video(task: dict) -> dict:
    """Runs in a worker set up by ``cnn_worker_init``: ``prepare_video``, then every stream's ``embed``. Returns
    the float16 features (``feats``), ``meta`` and ``seconds``; a video the CNN cannot take comes back with
    ``cnn_error`` (class name, message) instead of features, so the caller logs it as a CNN failure."""
    if _WORKER_STREAMS is None:
        raise RuntimeError("extract_video runs in a worker started with cnn_worker_init")
    streams, batch_size = _WORKER_STREAMS
    video = prepare_video(task)
    seconds = {**video["seconds"], "preprocess": 0.0, "cnn": 0.0}
    out: dict[str, Any] = {"meta": video["meta"], "seconds": seconds}
    feats: dict[str, np.ndarray] = {}
    try:
        for s in streams:
            feats.update(embed(s, video[s.name], batch_size, seconds))
    except Exception as e:  # noqa: BLE001 - reported per video, as the in-process path does
        out["cnn_error"] = (type(e).__name__, str(e))
        return out
    out["feats"] = feats
    return out


# ------------------------------------------------------------------------------------- from a store's record

def flow_task(config: dict, device: str) -> dict | None:
    """The flow settings a worker needs, from a store's ``config`` (None when the store has no flow stream)."""
    if "flow" not in config.get("streams", []):
        return None
    from pipeline.flow import flow_kernel

    f = config["flow"]
    where = device if device.startswith("cuda") else "cpu"
    if f.get("kernel") and f["kernel"] != flow_kernel(f["method"], where):
        raise UserError(f"the store's {f['method']} flow ran the fused C loop, which cannot be built here (no C "
                        "compiler, or TWOSTREAM_FLOW_KERNEL=torch); its flow would differ in rounding")
    return {"method": f["method"], "params": dict(f["params"]), "bound": f["bound"], "stack": int(f["stack"]),
            "device": where, "kernel": "auto" if f.get("kernel") else "torch"}


def video_task(path: str, config: dict, device: str, streams: tuple[str, ...] | None = None) -> dict:
    """The ``prepare_video`` task of one video under a store's ``config``: its sampling, decoder and flow.
    ``streams`` limits the work to those streams (flow is computed only when asked)."""
    streams = tuple(config["streams"]) if streams is None else tuple(streams)
    decoder = config.get("decoder", "auto")
    return {"path": str(path), "sampling": Sampling(**config["sampling"]), "decoder": decoder,
            "device": device if decoder == "torchcodec" else "cpu", "streams": streams,
            "flow": flow_task(config, device) if "flow" in streams else None}


def streams_from_config(config: dict, weights_for: Callable[[str, dict], str], device: str) -> list[Stream]:
    """The stream CNNs a store's ``config`` records, rebuilt: the same backbone, weights (``weights_for(stream,
    spec)`` gives the file, checked by the caller against ``spec["weights_sha256"]``, or ``"random"``), input
    channels, foveation and precision, seeded and in the store's order as ``build_streams`` does, so a random-weight
    backbone comes out the same."""
    import torch

    from pipeline.backbones import build_backbone

    torch.manual_seed(0)
    out = []
    for s in config["streams"]:
        spec = config["backbones"][s]
        bb = build_backbone(spec["name"], weights_for(s, spec), in_chans=int(spec["in_chans"]), device=device,
                            foveated=bool(spec["foveated"]), precision=spec["precision"])
        bb = with_runtime(bb, spec.get("runtime", "torch"))  # the engine that made the store's features
        bb.spec = dict(spec)  # the store's record (a re-saved weights file has another name and hash)
        out.append(Stream(s, bb, config.get("tta", "center"), config.get("spatial_grid"),
                          bool(config.get("keep_views"))))
    return out


def extraction_record(store, streams: tuple[str, ...], train_ids: list[str]) -> dict:
    """How the run's features were made, for ``predict`` on new videos (not part of the run's hash): the store's
    extraction config and where it was, the dimension of each stream the head reads, and the median length in
    seconds of (up to 64 of) its training videos, the default window of a timeline."""
    from pathlib import Path

    seconds = []
    for vid in train_ids[:: max(1, len(train_ids) // 64)][:64]:
        try:
            seconds.append(float(store.meta(vid)["duration"]))
        except Exception:  # noqa: BLE001 - a store without durations: the timeline asks for --window
            break
    seconds = [s for s in seconds if np.isfinite(s) and s > 0]
    dims = store.streams
    return {"store": str(Path(getattr(store, "path", "")).resolve()) if getattr(store, "path", None) else None,
            "store_config": getattr(store, "config", None), "store_classes": getattr(store, "classes", None),
            "stream_dims": {s: int(dims[s]) for s in streams},
            "video_seconds": float(np.median(seconds)) if seconds else None}
