"""Stage one on one GPU: decode frames/s, TV-L1 / Brox pairs/s, CNN images/s, end-to-end videos/s, peak memory.

One command, under five minutes on one GPU, one JSON and one Markdown table:

    python bench/gpu.py --out bench/results/gpu               # writes bench/results/gpu.json and gpu.md
    python bench/gpu.py --device cpu --quick --out /tmp/gpu   # the same code paths on the CPU at tiny sizes (~10 s)

What it measures, each through the code that ``twostream extract`` runs:

- decode: frames/s of ``pipeline.video.decode`` over every frame of a UCF101-like clip (320x240, 7 s at 25 fps;
  bench/extract.py's ``ucf_like_clip``, re-encoded as MPEG-4 part 2, UCF101's codec, and H.264) with decord, PyAV
  and torchcodec (CPU, and NVDEC on CUDA); a backend that is missing or refuses a codec is a row saying why.
- flow: pairs/s of our TV-L1 (``pipeline.flow.tvl1``, Zach et al. 2007 / Sanchez et al. IPOL 2013) and Brox
  (``pipeline.flow.brox``, Brox et al. ECCV 2004) on the device at 340x256, batch 1..256 (powers of 2), TV-L1 eager and
  through ``torch.compile`` (``--no-compile`` skips it). Every timed batch is made of frame pairs warped by a known
  smooth field, so each row also gives its mean endpoint error (EPE) against the truth; OpenCV's DualTVL1 runs on the
  same pairs for reference. Speed is not bought with accuracy when the EPE column stays put.
- cnn: images/s per stream CNN (RGB spatial, stacked-flow temporal with 2L = 20 channels, Simonyan & Zisserman 2014
  Sec. 3), built as ``extract`` builds them (``build_streams``, bf16 autocast on CUDA, fp32 on CPU), through
  ``Backbone.extract`` (host -> device -> host, as in extraction), and alone on a batch already on the device.
- e2e: videos/s of ``stages.extract.extract`` (decode -> TV-L1 -> stacks -> both CNNs -> store) over a folder of
  UCF101-like clips, default settings (25 frames per video, L = 10).
- peak memory per row: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the process's ``ru_maxrss``.

Brox runs eager only: its fixed 10 x 10 x 2 red-black sweeps per level unroll into one very large graph for
``torch.compile`` (compiling it had not finished after 6 minutes on a CPU). CUDA graphs are not tried: TV-L1 stops
each pair on its own (a host-side test of the per-pair change every inner iteration, IPOL Alg. 2 line 14) and Brox's
level loop builds a host tensor per level, so neither can be captured as is. Timings synchronise the device around
every timed call and follow a warm-up call (allocations, cuDNN plans, compilation). A time budget per section
(``--budget``, default 240 s in all; a section overruns by one row at most) skips the rows that would not fit: those
rows say so.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import cv2
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GOALS = {"tvl1_pairs_s": 1000.0, "e2e_videos_s": 5.0}  # at 340x256 on one H100-class GPU; UCF101-like videos
# Share of --budget per section (seconds are budget x share); imports and clip writing come out of the rest.
SHARES = {"decode": 0.06, "tvl1": 0.2, "tvl1-compile": 0.24, "brox": 0.14, "cnn": 0.1, "e2e": 0.18}  # + references
SECTIONS = ("decode", "flow", "cnn", "e2e")


def _bench_module(name: str):
    """A sibling bench script as a module (bench/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", ROOT / "bench" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


# ----------------------------------------------------------------------------------------------------- helpers


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def reset_peak(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)


def peak_mib(dev: torch.device) -> float:
    """Peak GPU memory allocated since the last ``reset_peak`` (CUDA), else the process's peak RSS (MiB)."""
    if dev.type == "cuda":
        return torch.cuda.max_memory_allocated(dev) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def timed_reps(fn, dev: torch.device, min_s: float, max_reps: int):
    """(seconds per call, calls, last output) of ``fn`` after the caller's warm-up: calls until ``min_s`` seconds
    or ``max_reps``, the device synchronised around each."""
    reps, total, out = 0, 0.0, None
    while reps < max_reps and (reps == 0 or total < min_s):
        sync(dev)
        t = time.perf_counter()
        out = fn()
        sync(dev)
        total += time.perf_counter() - t
        reps += 1
    return total / reps, reps, out


def why(e: BaseException) -> str:
    return f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}".rstrip(": ")


def said(r: dict, digits: int) -> str:
    """A row in a few words for the progress lines: its rate, or why it has none."""
    return f"{r['rate']:.{digits}f} {r['unit']}" if r["rate"] else r["note"]


class Budget:
    """Seconds left for one section; ``fits(estimate)`` says whether a row of that cost still fits."""

    def __init__(self, seconds: float):
        self.end = time.perf_counter() + seconds
        self.seconds = seconds

    def left(self) -> float:
        return self.end - time.perf_counter()

    def fits(self, estimate: float = 0.0) -> bool:
        return self.left() > estimate

    def skipped(self) -> str:
        return f"skipped: the section's time budget ({self.seconds:.0f} s) is spent"


def row(stage: str, variant: str, setting: str = "", rate: float | None = None, unit: str = "", epe: float | None = None,
        peak: float | None = None, note: str = "", **extra) -> dict:
    return {"stage": stage, "variant": variant, "setting": setting, "rate": rate, "unit": unit, "epe_px": epe,
            "peak_mib": peak, "note": note, **extra}


# ------------------------------------------------------------------------------------------------------ clips


def encode(frames: np.ndarray, path: Path, codec: str, fps: int = 25) -> Path:
    """RGB uint8 ``[N,H,W,3]`` -> a video file in ``codec`` (PyAV: mpeg4 = UCF101's MPEG-4 part 2, h264, mjpeg;
    OpenCV's writer where PyAV is not installed)."""
    try:
        import av
    except ImportError:
        return encode_opencv(frames, path, codec, fps)

    with av.open(str(path), "w") as out:
        stream = out.add_stream({"h264": "libx264"}.get(codec, codec), rate=fps)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "h264":
            stream.options = {"preset": "veryfast", "crf": "23"}
        elif codec == "mpeg4":
            stream.bit_rate = 1_500_000
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(f), format="rgb24")):
                out.mux(packet)
        for packet in stream.encode():
            out.mux(packet)
    return path


def encode_opencv(frames: np.ndarray, path: Path, codec: str, fps: int = 25) -> Path:
    fourcc = {"mjpeg": "MJPG", "mpeg4": "FMP4", "h264": "avc1"}[codec]
    vw = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*fourcc), fps, (frames.shape[2], frames.shape[1]))
    if not vw.isOpened():
        raise RuntimeError(f"OpenCV cannot write {codec} ({fourcc}) and PyAV is not installed")
    for f in frames:
        vw.write(cv2.cvtColor(f, cv2.COLOR_RGB2BGR))
    vw.release()
    return path


def ucf_frames(tmp: Path, seconds: float) -> np.ndarray:
    """RGB frames of bench/extract.py's UCF101-like clip (320x240 MJPG, a textured pan and a moving square)."""
    path = _bench_module("extract").ucf_like_clip(tmp / "ucf-like.avi", seconds=seconds)
    cap = cv2.VideoCapture(str(path))
    frames = []
    while True:
        ok, f = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(f, cv2.COLOR_BGR2RGB))
    cap.release()
    return np.stack(frames)  # [N,240,320,3]


def write_clips(frames: np.ndarray, tmp: Path, codecs: tuple[str, ...], size: tuple[int, int] | None = None,
                stem: str = "clip") -> dict[str, Path | str]:
    """One file per codec (a string saying why where the codec cannot be written); ``size`` = (W, H) resizes."""
    if size is not None and size != (frames.shape[2], frames.shape[1]):
        frames = np.stack([cv2.resize(f, size, interpolation=cv2.INTER_AREA) for f in frames])
    out: dict[str, Path | str] = {}
    for codec in codecs:
        try:
            out[codec] = encode(frames, tmp / f"{stem}-{codec}.{'mp4' if codec == 'h264' else 'avi'}", codec)
        except Exception as e:  # noqa: BLE001 - an FFmpeg build without that encoder
            out[codec] = f"cannot encode {codec}: {why(e)}"
    return out


# ----------------------------------------------------------------------------------------------------- decode


def bench_decode(clips: dict, dev: torch.device, budget: Budget, min_s: float) -> list[dict]:
    from pipeline.video import _MODULE, available_backends, decode

    avail = available_backends()
    where = ["cpu"] + ([str(dev)] if dev.type == "cuda" else ["cuda"])
    rows = []
    for codec, path in clips.items():
        for backend in ("decord", "pyav", "torchcodec"):
            for d in where if backend == "torchcodec" else ["cpu"]:
                label = f"{backend} ({'NVDEC' if d.startswith('cuda') else 'CPU'})"
                r = row("decode", label, codec, unit="frames/s")
                rows.append(r)
                if isinstance(path, str):
                    r["note"] = f"not available: {path}"
                elif backend not in avail:
                    r["note"] = f"not available: {_MODULE[backend]} is not installed"
                elif d.startswith("cuda") and not torch.cuda.is_available():
                    r["note"] = "not available: no CUDA device"
                elif not budget.fits():
                    r["note"] = budget.skipped()
                else:
                    try:
                        reset_peak(dev)
                        got = decode(path, backend, device=d)  # warm-up (decoder contexts, NVDEC session)
                        n = got.n_frames
                        sec, reps, _ = timed_reps(partial(decode, path, backend, device=d), dev, min_s, 5)
                        r.update(rate=n / sec, frames=n, reps=reps, peak_mib=peak_mib(dev) if d != "cpu" else None)
                        if got.backend != backend:  # decord falls back to PyAV on files it cannot read
                            r["note"] = f"{backend} failed, {got.backend} decoded it"
                    except Exception as e:  # noqa: BLE001 - a decoder that refuses this codec: say why
                        r["note"] = f"not available: {why(e)}"
                print(f"decode {codec:5s} {label:20s} "
                      f"{said(r, 0)}", flush=True)
    return rows


# ------------------------------------------------------------------------------------------------------- flow


def gt_pairs(frames: np.ndarray, size: tuple[int, int], k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``k`` grey pairs at ``size`` (W, H) of UCF101-like frames warped by known smooth fields (~4 and ~10 px at
    340 px wide, scaled with the width): prev(p) = nxt(p + flow(p)), as bench/flow.py's ``make_pairs``."""
    flow_bench = _bench_module("flow")
    w, h = size
    prevs, nxts, gts = [], [], []
    for j in range(k):
        f = frames[(37 * j) % len(frames)]
        img = cv2.resize(cv2.cvtColor(f, cv2.COLOR_RGB2GRAY), size, interpolation=cv2.INTER_AREA)
        gt = flow_bench.smooth_field(h, w, (4.0 if j % 2 == 0 else 10.0) * w / 340, seed=j)
        prevs.append(flow_bench.warp_by(img, gt))
        nxts.append(img)
        gts.append(gt)
    return np.stack(prevs), np.stack(nxts), np.stack(gts)


def epe(flow: torch.Tensor | np.ndarray, gt: torch.Tensor | np.ndarray) -> float:
    """Mean endpoint error (px) of ``[N,2,H,W]`` against ``[N,2,H,W]``."""
    f, g = torch.as_tensor(flow).float(), torch.as_tensor(gt).float().to(torch.as_tensor(flow).device)
    return float((f - g).norm(dim=1).mean())


def skip_reason(last: float | None, budget: Budget) -> str:
    """Why the next batch is not run ("" to run it): a smaller batch failed (``last`` inf), or a row costs about
    a warm-up plus one timed call, 2x the last call's time on twice as many items, more than the budget has left."""
    if last == float("inf"):
        return "skipped: a smaller batch failed"
    return "" if budget.fits(0 if last is None else 4 * last) else budget.skipped()


def flow_sweep(method: str, variant: str, fn, pairs, dev: torch.device, batches: list[int], budget: Budget,
               min_s: float, size: tuple[int, int], warm_each: bool = True) -> list[dict]:
    """Pairs/s of ``fn(prev, nxt)`` (float [B,1,H,W] on ``dev``) per batch size; batches tile the known pairs, so a
    row's EPE is over the first min(B, 8) of them (rows of batch 8 and up hold the same pairs: equal EPE expected).
    A warm-up call precedes every row (``warm_each``; a new shape can mean new allocations, cuDNN plans, a
    recompilation), else only the first (the quick CPU run)."""
    prev, nxt, gt = (torch.from_numpy(a) for a in pairs)
    rows, last = [], None
    for b in batches:
        r = row(method, variant, f"{size[0]}x{size[1]}, batch {b}", unit="pairs/s", batch=b)
        rows.append(r)
        r["note"] = r["note"] or skip_reason(last, budget)
        if r["note"]:
            print(f"{method} {variant} batch {b}: {r['note']}", flush=True)
            continue
        print(f"{method} {variant} batch {b}: running", flush=True)  # a compiling first call can take a minute
        idx = torch.arange(b) % len(prev)
        p = prev[idx].to(dev, torch.float32)[:, None]  # [b,1,H,W], 0..255
        q = nxt[idx].to(dev, torch.float32)[:, None]
        try:
            reset_peak(dev)
            first = None
            if warm_each or b == batches[0] or variant != "eager":  # compiled: a new shape can recompile
                t0 = time.perf_counter()
                fn(p, q)  # warm-up (and compilation)
                sync(dev)
                first = time.perf_counter() - t0
            sec, reps, out = timed_reps(partial(fn, p, q), dev, min_s, 3)
            last = sec
            r.update(rate=b / sec, reps=reps, first_call_s=first, epe_px=epe(out, gt[idx]), peak_mib=peak_mib(dev))
            notes = [f"EPE over {b} of the {len(prev)} pairs"] if b < len(prev) else []
            if variant != "eager" and first is not None:
                notes.append(f"first call {first:.1f} s")
            r["note"] = "; ".join(notes)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory at a large batch: the row says so
            r["note"] = f"failed: {why(e)}"
            if dev.type == "cuda":
                torch.cuda.empty_cache()
            last = float("inf")
        print(f"{method} {variant} batch {b}: "
              f"{said(r, 2)}" + (f", EPE {r['epe_px']:.3f} px" if r["rate"] else ""), flush=True)
    return rows


def bench_flow(frames: np.ndarray, dev: torch.device, size: tuple[int, int], batches: list[int], compile_: bool,
               budget: float, min_s: float, n_ref: int, warm_each: bool = True) -> list[dict]:
    from pipeline.flow import brox, tvl1

    k = min(8, max(batches))
    pairs = gt_pairs(frames, size, k)
    rows = []
    # kernel="torch": the torch ops, on the CPU too (the CPU's fused C loop is another code path, bench/flow.py)
    rows += flow_sweep("TV-L1", "eager", lambda p, q: tvl1(p, q, kernel="torch"), pairs, dev, batches,
                       Budget(budget * SHARES["tvl1"]), min_s, size, warm_each)
    if compile_:
        rows += flow_sweep("TV-L1", "torch.compile", lambda p, q: tvl1(p, q, compile=True), pairs, dev, batches,
                           Budget(budget * SHARES["tvl1-compile"]), min_s, size, warm_each)
    else:
        rows.append(row("TV-L1", "torch.compile", note="skipped: --no-compile"))
    rows += flow_sweep("Brox", "eager", lambda p, q: brox(p, q), pairs, dev, batches,
                       Budget(budget * SHARES["brox"]), min_s, size, warm_each)
    rows += flow_references(pairs, dev, size, n_ref)
    return rows


def flow_references(pairs, dev: torch.device, size: tuple[int, int], n_ref: int) -> list[dict]:
    """Two references on the first ``n_ref`` known pairs, each against our TV-L1 on ``dev`` (torch ops): OpenCV's
    DualTVL1 (the flow our TV-L1 reproduces; needs opencv-contrib) and our TV-L1 as the CPU runs it in extraction
    (the fused C loop where it builds), which shows that the device's flow is the CPU's."""
    from pipeline.flow import compute_flow, flow_kernel, opencv_flow, tvl1

    prev, nxt, gt = pairs
    n = min(n_ref, len(prev))
    setting = f"{size[0]}x{size[1]}, {n} pairs"
    ours = tvl1(torch.from_numpy(prev[:n]).to(dev, torch.float32)[:, None],
                torch.from_numpy(nxt[:n]).to(dev, torch.float32)[:, None], kernel="torch").cpu()  # [n,2,H,W]
    kernel = "fused C" if flow_kernel("tvl1", "cpu") == "c" else "torch ops"
    rows = []
    for label, run in (
            ("OpenCV DualTVL1 (CPU, reference)", lambda: opencv_flow(prev[:n], nxt[:n], "tvl1-opencv")),
            (f"ours on the CPU ({kernel}, {torch.get_num_threads()} threads, reference)",
             lambda: compute_flow(prev[:n], nxt[:n], method="tvl1", device="cpu"))):
        r = row("TV-L1", label, setting, unit="pairs/s")
        try:
            t = time.perf_counter()
            ref = run()
            sec = time.perf_counter() - t
            gap = epe(ours, ref)
            r.update(rate=n / sec, epe_px=epe(ref, gt[:n]), ours_epe_px=epe(ours, gt[:n]), ours_vs_ref_px=gap,
                     note=f"{gap:.3f} px mean EPE between this flow and ours on {dev} (torch ops; its EPE "
                          f"{epe(ours, gt[:n]):.3f} px)")
        except Exception as e:  # noqa: BLE001 - an OpenCV build without the contrib module (optflow)
            r["note"] = f"not available: {why(e)}"
        print(f"{label}: {r['note']}", flush=True)
        rows.append(r)
    return rows


# -------------------------------------------------------------------------------------------------------- cnn


def on_device(bb, x: torch.Tensor) -> torch.Tensor:
    """Pooled features of a batch already on the device, as ``Backbone.extract`` runs it (inference mode, bf16
    autocast when the backbone's precision says so) without the copies in and out."""
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bb.precision == "bf16"):
        return bb.embed(x)[0]


def bench_cnn(dev: torch.device, batches: list[int], budget: Budget, min_s: float) -> list[dict]:
    from pipeline.extraction import ExtractConfig, build_streams

    torch.manual_seed(0)
    streams = build_streams(ExtractConfig(streams=("rgb", "flow")), str(dev))  # as extract builds them
    rows = []
    for s in streams:
        spec = s.backbone.spec
        c, px = int(spec["in_chans"]), int(spec["input_size"])
        label = f"{s.name} ({spec['name']}, {c} ch, {px} px)"
        last = None
        for b in batches:
            r = row("CNN", label, f"{spec['precision']}, batch {b}", unit="images/s", batch=b)
            rows.append(r)
            r["note"] = r["note"] or skip_reason(last, budget)
            if r["note"]:
                print(f"CNN {label} batch {b}: {r['note']}", flush=True)
                continue
            x = torch.rand(b, 1, c, px, px)  # preprocessed views [N,V,C,S,S] on the host, as embed() passes them
            try:
                reset_peak(dev)
                s.backbone.extract(x, batch_size=b)  # warm-up: cuDNN plans, allocations
                sec, reps, _ = timed_reps(partial(s.backbone.extract, x, batch_size=b), dev, min_s, 5)
                last = sec
                # the CNN alone: the same batch already on the device (no host -> device copy, no copy back)
                xd = x[:, 0].to(dev).contiguous(memory_format=torch.channels_last)
                on_device(s.backbone, xd)
                sec_d, _, _ = timed_reps(partial(on_device, s.backbone, xd), dev, min_s, 5)
                del xd
                r.update(rate=b / sec, reps=reps, peak_mib=peak_mib(dev), device_input_rate=b / sec_d,
                         note=f"{b / sec_d:,.1f} images/s with the input already on the device")
            except Exception as e:  # noqa: BLE001 - out of memory at a large batch
                r["note"] = f"failed: {why(e)}"
                last = float("inf")
            print(f"CNN {label} batch {b}: {said(r, 1)}", flush=True)
    return rows


# -------------------------------------------------------------------------------------------------------- e2e


def bench_e2e(frames: np.ndarray, tmp: Path, dev: torch.device, codec: str, size: tuple[int, int], videos: int,
              n_frames: int, decoder: str, budget: Budget) -> list[dict]:
    """Videos/s of ``stages.extract.extract`` over a class-folder dataset of UCF101-like clips: one video first
    (warm-up; its time also sizes the timed run to the budget), then ``videos`` in a fresh store. The rate is over
    the run's wall time (setup included); the note adds the rate over the per-video work alone."""
    from pipeline.sampling import Sampling
    from stages.extract import ExtractConfig, RunOptions, extract

    clip = write_clips(frames, tmp, (codec,), size, stem="e2e")[codec]
    label = f"TV-L1 + rgb/flow CNNs, {codec} {size[0]}x{size[1]} clips of {len(frames)} frames"
    r = row("end to end", label, unit="videos/s")
    if isinstance(clip, str):
        r["note"] = f"not available: {clip}"
        return [r]

    def dataset(n: int) -> Path:
        root = tmp / f"data-{n}"
        for i in range(n):
            d = root / f"Class{i % 2}"
            d.mkdir(parents=True, exist_ok=True)
            shutil.copy(clip, d / f"v_Class{i % 2}_g{i // 2 + 1:02d}_c01{clip.suffix}")
        return root

    def config(dec: str) -> ExtractConfig:
        return ExtractConfig(streams=("rgb", "flow"), sampling=Sampling("frames", n_frames), flow_method="tvl1",
                             decoder=dec)

    # workers=0: in-process (extract does so anyway on CUDA with GPU flow; on the CPU it saves spawning a worker)
    opts = RunOptions(device=str(dev), workers=0, progress=True)
    fallback = ""
    try:
        from pipeline import video

        reset_peak(dev)
        cfg = config(decoder)
        chosen = video.choose_backend(decoder, str(dev))
        first = extract(dataset(1), tmp / "store-warm-up", cfg, opts, log=lambda m: None)
        if first.failed and decoder == "auto" and chosen == "torchcodec":
            cpu_decoder = video.choose_backend("auto", "cpu")  # torchcodec (NVDEC) refused the clip: the CPU decodes
            fallback = (f"auto decoder failed ({first.failures[0]['message'][:80]}), so {cpu_decoder} decoded; ")
            cfg = config(cpu_decoder)
            first = extract(dataset(1), tmp / "store-warm-up-cpu-decoder", cfg, opts, log=lambda m: None)
        if first.failed:
            raise RuntimeError(f"{first.failures[0]['error']}: {first.failures[0]['message'][:160]}")
        n = videos
        if first.wall * (n + 1) > budget.left():  # keep to the budget: fewer videos
            n = max(1, int(budget.left() / max(first.wall, 1e-3)) - 1)
        reset_peak(dev)
        run = extract(dataset(n), tmp / "store-timed", cfg, opts, log=lambda m: None)  # a fresh store: no video skipped
        per = {k: v / max(run.done, 1) for k, v in run.seconds.items()}
        loop = sum(run.seconds.values())  # the per-video work (decode, flow, preprocess, CNN, write), not the setup
        loop_rate = run.done / loop if loop > 0 else None
        used = chosen if cfg.decoder == decoder else cfg.decoder
        r.update(setting=f"{run.done} videos, {n_frames} frames each, decoder {used}", rate=run.done / run.wall,
                 videos=run.done, failed=run.failed, wall_s=run.wall, per_video_work_videos_s=loop_rate,
                 seconds_per_video=per, frames_per_video=n_frames, peak_mib=peak_mib(dev),
                 note=(fallback + "; ".join(f"{k} {v:.3f}" for k, v in per.items()) + " s/video"
                       + (f"; {loop_rate:.2f} videos/s without the run's setup (CNNs built, store opened)"
                          if loop_rate else "")
                       + (f"; {run.failed} failed: {run.failures[0]['message'][:80]}" if run.failed else "")))
    except Exception as e:  # noqa: BLE001 - a decoder that refuses the clip, out of memory: the row says so
        r["note"] = f"failed: {why(e)}"
    print(f"end to end: {said(r, 2)}", flush=True)
    return [r]


# ---------------------------------------------------------------------------------------------------- report


def fmt(v, digits: int = 2) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:,.0f}" if abs(v) >= 100 else f"{v:.{digits}f}"
    return str(v)


def goal_rows(rows: list[dict], dev: torch.device, size: tuple[int, int]) -> list[dict]:
    tv = [r for r in rows if r["stage"] == "TV-L1" and r["rate"] and "reference" not in r["variant"]]
    e2e = [r for r in rows if r["stage"] == "end to end" and r["rate"]]
    best_tv = max(tv, key=lambda r: r["rate"]) if tv else None
    full = size == (340, 256) and dev.type == "cuda"
    out = []
    for name, best, goal, unit in (("TV-L1 pairs/s at 340x256, best row", best_tv, GOALS["tvl1_pairs_s"], "pairs/s"),
                                   ("UCF101-like videos/s end to end", e2e[0] if e2e else None,
                                    GOALS["e2e_videos_s"], "videos/s")):
        rate = best["rate"] if best else None
        verdict = ("not measured" if rate is None else ("met" if rate >= goal else "not met")) if full else \
            "not judged: CPU smoke run or not 340x256"
        where = f" ({best['variant']}, {best['setting']})" if best else ""
        out.append(row("goal", f"{name} >= {goal:,.0f}", rate=rate, unit=unit, note=f"{verdict}{where}", goal=goal))
    return out


def table(report: dict) -> str:
    m = report["machine"]
    lines = ["| stage | variant | setting | rate | unit | EPE (px) | peak memory (MiB) | note |",
             "|---|---|---|---:|---|---:|---:|---|",
             (f"| machine | {m['device_name']} | torch {m['torch']}, CUDA {m['cuda'] or '-'}, {m['cpus']} CPUs | | | "
              f"| | {'GPU memory: max_memory_allocated' if m['device'] != 'cpu' else 'CPU memory: peak RSS'} |")]
    for r in report["rows"]:
        note = str(r["note"]).replace("|", "/")
        lines.append(f"| {r['stage']} | {r['variant']} | {r['setting']} | {fmt(r['rate'])} | {r['unit']} | "
                     f"{fmt(r['epe_px'], 3)} | {fmt(r['peak_mib'], 0)} | {note} |")
    return "\n".join(lines) + "\n"


def out_paths(args) -> tuple[Path | None, Path | None]:
    """``--out PATH`` writes PATH.json and PATH.md (a .md / .json suffix is dropped); --json / --md override."""
    base = None
    if args.out:
        base = Path(args.out)
        if base.suffix in (".md", ".json"):
            base = base.with_suffix("")
    js = Path(args.json) if args.json else (base.with_suffix(".json") if base else None)
    md = Path(args.md) if args.md else (base.with_suffix(".md") if base else None)
    return js, md


def ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v.strip()]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda[:N]")
    ap.add_argument("--quick", action="store_true", help="tiny sizes (automatic on the CPU): a smoke run in seconds")
    ap.add_argument("--out", default=None, help="write OUT.json and OUT.md (e.g. bench/results/gpu)")
    ap.add_argument("--json", default=None, help="JSON path (overrides --out)")
    ap.add_argument("--md", default=None, help="Markdown table path (overrides --out)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help=f"any of {','.join(SECTIONS)}")
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows of TV-L1")
    ap.add_argument("--budget", type=float, default=240.0,
                    help="seconds shared by the sections (default 240; a section may overrun by one row)")
    ap.add_argument("--flow-size", default=None, help="W x H of the flow pairs (default 340x256; quick 64x48)")
    ap.add_argument("--flow-batches", default=None, help="default 1,2,4,...,256 on CUDA; 1,2 on the CPU")
    ap.add_argument("--cnn-batches", default=None, help="default 32,64,128,256 on CUDA; 1,2 on the CPU")
    ap.add_argument("--clip-seconds", type=float, default=None, help="UCF101-like clip length (default 7; quick 1)")
    ap.add_argument("--codecs", default="mjpeg,mpeg4,h264", help="clips to decode (PyAV encoder names)")
    ap.add_argument("--e2e-videos", type=int, default=None, help="videos timed end to end (default 8; quick 2)")
    ap.add_argument("--e2e-codec", default="mpeg4", help="codec of the end-to-end clips (UCF101: MPEG-4 part 2)")
    ap.add_argument("--e2e-size", default=None, help="W x H of the end-to-end clips (default 320x240; quick 64x48)")
    ap.add_argument("--e2e-frames", type=int, default=None, help="frames sampled per video (default 25; quick 2)")
    ap.add_argument("--decoder", default="auto", help="decoder of the end-to-end run (auto: torchcodec on CUDA)")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: 1 when the device is the CPU, else torch's)")
    args = ap.parse_args(argv)

    from pipeline.extraction import resolve_device

    dev = torch.device(resolve_device(args.device))
    if args.threads or dev.type == "cpu":  # one thread: intra-op threads stall each other on shared cores (README)
        torch.set_num_threads(args.threads or 1)
    quick = args.quick or dev.type == "cpu"
    sections = [s for s in args.sections.split(",") if s]
    bad = [s for s in sections if s not in SECTIONS]
    if bad:
        raise SystemExit(f"unknown section(s) {', '.join(bad)}; choose from {', '.join(SECTIONS)}")

    def wh(s: str | None, default: tuple[int, int]) -> tuple[int, int]:
        return default if not s else tuple(int(v) for v in s.lower().split("x"))  # type: ignore[return-value]

    flow_size = wh(args.flow_size, (32, 24) if quick else (340, 256))
    flow_batches = ints(args.flow_batches) if args.flow_batches else ([1, 2] if quick else [2**i for i in range(9)])
    cnn_batches = ints(args.cnn_batches) if args.cnn_batches else ([1, 2] if quick else [32, 64, 128, 256])
    clip_s = args.clip_seconds or (1.0 if quick else 7.0)
    e2e_videos = args.e2e_videos or (2 if quick else 8)
    e2e_size = wh(args.e2e_size, (64, 48) if quick else (320, 240))
    e2e_frames = args.e2e_frames or (2 if quick else 25)
    min_s = 0.0 if quick else 1.0  # timed seconds per row (at least one call)

    machine = {"device": str(dev), "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda"
               else f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
               "torch": torch.__version__, "cuda": torch.version.cuda if dev.type == "cuda" else None,
               "cpus": len(os.sched_getaffinity(0)), "python": platform.python_version(),
               "quick": quick}
    print(f"# {machine['device_name']}, torch {machine['torch']}; sections {','.join(sections)}; "
          f"budget {args.budget:.0f} s{' (quick sizes)' if quick else ''}", flush=True)
    t_start = time.perf_counter()
    rows: list[dict] = []
    tmp = Path(tempfile.mkdtemp(prefix="twostream-gpu-"))
    try:
        frames = ucf_frames(tmp, clip_s)  # [N,240,320,3] RGB
        runs = {
            "decode": lambda: bench_decode(write_clips(frames, tmp, tuple(c for c in args.codecs.split(",") if c)),
                                           dev, Budget(args.budget * SHARES["decode"]), 0.0 if quick else 0.5),
            "flow": lambda: bench_flow(frames, dev, flow_size, flow_batches, not args.no_compile, args.budget, min_s,
                                       1 if quick else 8, warm_each=not quick),
            "cnn": lambda: bench_cnn(dev, cnn_batches, Budget(args.budget * SHARES["cnn"]), min_s),
            # last: the in-process extraction keeps torch to one CPU thread afterwards
            "e2e": lambda: bench_e2e(frames, tmp, dev, args.e2e_codec, e2e_size, e2e_videos, e2e_frames,
                                     args.decoder, Budget(args.budget * SHARES["e2e"])),
        }
        for name in SECTIONS:
            if name in sections:
                t = time.perf_counter()
                print(f"# {name}", flush=True)
                rows += runs[name]()
                print(f"# {name}: {time.perf_counter() - t:.0f} s ({time.perf_counter() - t_start:.0f} s in all)",
                      flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    rows += goal_rows(rows, dev, flow_size)
    report = {"machine": machine, "goals": GOALS, "wall_s": time.perf_counter() - t_start,
              "settings": {"sections": sections, "flow_size": list(flow_size), "flow_batches": flow_batches,
                           "cnn_batches": cnn_batches, "compile": not args.no_compile, "clip_seconds": clip_s,
                           "e2e_videos": e2e_videos, "e2e_size": list(e2e_size), "e2e_frames": e2e_frames,
                           "e2e_codec": args.e2e_codec, "decoder": args.decoder, "budget_s": args.budget},
              "rows": rows}
    md = table(report)
    print("\n" + md, flush=True)
    print(f"# {report['wall_s']:.0f} s in all", flush=True)
    js_path, md_path = out_paths(args)
    for path, text in ((js_path, json.dumps(report, indent=2, default=str) + "\n"), (md_path, md)):
        if path:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text)
            print(f"wrote {path}", flush=True)
    return report


if __name__ == "__main__":
    from pipeline.errors import UserError

    try:
        main()
    except UserError as e:  # e.g. --device cuda on a machine without CUDA: one line, exit 2
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
