"""Images/s of the frame CNNs: memory format and precision, and foveated vs full resolution (Karpathy 3.2).

    PYTHONPATH=. .venv/bin/python bench/cnn.py [--backbone efficientnet_lite0] [--batch 32] [--iters 3]
                                               [--threads 2] [--device cpu] [--in-chans 3]

Prints one line per configuration and the ratios against fp32 NCHW, measured in the same run: configurations
run round robin and the fastest batch of each counts (timings on shared machines swing by +-30%; the ratios are
what to compare). On a machine whose cores are oversubscribed, use --threads 1: OpenMP threads that wait on each
other made 2 threads 3-4x slower than 1 at a load average of 7 on 2 cores. The embedded EfficientNet-Lite0 weights are used when the
backbone is the default; other backbones run with random weights (speed does not depend on the values).
"""

from __future__ import annotations

import argparse
import time

import torch

from pipeline.backbones import build_backbone


def batch_seconds(bb, x: torch.Tensor, channels_last: bool, bf16: bool) -> float:
    """Seconds for one batch through ``bb`` in the given memory format and precision."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    bb.to(memory_format=fmt)
    x = x.to(bb.device).contiguous(memory_format=fmt)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    with torch.inference_mode(), torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        sync()
        t = time.perf_counter()
        bb(x)
        sync()
    return time.perf_counter() - t


def native_bf16(device: str) -> bool:
    """CUDA with bf16, or a CPU with AVX512-BF16 / AMX; elsewhere bf16 runs emulated, far slower than fp32."""
    if device.startswith("cuda"):
        return torch.cuda.is_bf16_supported()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--iters", type=int, default=3, help="timed rounds; the fastest batch of each configuration counts")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--in-chans", type=int, default=3, help="20 = a 10-field flow stack (cross-modality init)")
    ap.add_argument("--bf16", action="store_true", help="time bf16 even where it is emulated (very slow)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = None if args.backbone == "efficientnet_lite0" else "random"
    full = build_backbone(args.backbone, weights, in_chans=args.in_chans, device=args.device, precision="fp32")
    fov = build_backbone(args.backbone, weights, in_chans=args.in_chans, device=args.device, foveated=True,
                         precision="fp32")
    size = full.spec["input_size"]
    x = torch.randn(args.batch, args.in_chans, size, size)
    dev = torch.device(args.device)
    name = f"{args.backbone} in_chans={args.in_chans} batch={args.batch} {size}px"
    where = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"cpu, {args.threads} threads"
    print(f"# {name} on {where}, torch {torch.__version__}")

    native = native_bf16(args.device)
    bf16 = native or args.bf16
    print(f"# bf16: {'native' if native else 'emulated (no AVX512-BF16 / AMX), slower than fp32'}"
          f"{'' if bf16 else '; skipped (--bf16 times it anyway)'}")
    rows = [("fp32 NCHW", full, False, False), ("fp32 channels_last", full, True, False),
            ("foveated fp32 channels_last", fov, True, False)]
    if bf16:
        rows += [("bf16 autocast + channels_last", full, True, True),
                 ("foveated bf16 autocast + channels_last", fov, True, True)]
    for _, bb, cl, bf in rows:  # warm-up: allocations, oneDNN / cuDNN plans
        batch_seconds(bb, x, cl, bf)
    best = {label: float("inf") for label, *_ in rows}
    for _ in range(args.iters):  # round robin, so load from other processes hits every configuration alike
        for label, bb, cl, bf in rows:
            best[label] = min(best[label], batch_seconds(bb, x, cl, bf))
    res = {label: args.batch / sec for label, sec in best.items()}
    for label, rate in res.items():
        print(f"{label:42s} {rate:8.1f} images/s   x{rate / res['fp32 NCHW']:.2f} vs fp32 NCHW")
    print(f"foveated speed-up over full resolution (fp32 channels_last): "
          f"x{res['foveated fp32 channels_last'] / res['fp32 channels_last']:.2f} (Karpathy et al. report 2-4x)")
    if bf16:
        print(f"foveated speed-up over full resolution (bf16 channels_last): "
              f"x{res['foveated bf16 autocast + channels_last'] / res['bf16 autocast + channels_last']:.2f}")


if __name__ == "__main__":
    main()
