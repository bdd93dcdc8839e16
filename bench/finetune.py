"""Images/s of fine-tuning per stream: the SGD step of the CNN and the augmentation that feeds it.

    PYTHONPATH=. .venv/bin/python bench/finetune.py [--backbone efficientnet_lite0] [--size 224] [--videos 4]
                                                    [--iters 3] [--threads 2] [--device cpu] [--stack 10]

For each stream (rgb: 3 channels; flow: a stack of L flow fields, 2L channels, cross-modality init) it times
one training step as ``stages.finetune`` runs it (3 segments per video, forward, consensus, cross-entropy,
backward, gradient clipping, SGD with momentum) with partial BN on and off, and the training augmentation
(``pipeline.augment.TrainAugment``: random resized crop, flip, colour jitter for RGB) on 320x240 uint8 frames,
against the same crop/flip/jitter done with torchvision.transforms.v2 (the reference), in the same run.
An "image" is one snippet: an RGB frame or one flow stack. Timings on a shared machine swing by +-30%.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.augment import TrainAugment
from pipeline.backbones import build_backbone
from stages.finetune import STREAM_DEFAULTS, FinetuneNet


def step_images_per_s(net: FinetuneNet, x: torch.Tensor, y: torch.Tensor, iters: int, clip: float) -> float:
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=1e-6, momentum=0.9, weight_decay=1e-4)
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)
    net.train()

    def step():
        loss = F.cross_entropy(net(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, clip)
        opt.step()

    step()  # warm-up (allocations, oneDNN plans)
    sync()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    sync()
    return iters * x.shape[0] * x.shape[1] / (time.perf_counter() - t)


def augment_images_per_s(aug: TrainAugment, frames: torch.Tensor, iters: int) -> float:
    g = torch.Generator().manual_seed(0)
    aug(frames, g)
    t = time.perf_counter()
    for _ in range(iters):
        aug(frames, g)
    return iters * len(frames) / (time.perf_counter() - t)


def reference_images_per_s(frames: torch.Tensor, size: int, rgb: bool, iters: int) -> float | None:
    """torchvision.transforms.v2 on the same uint8 snippets (no flow-aware flip: it is the speed reference)."""
    try:
        from torchvision.transforms import v2
    except ImportError:
        return None
    ops = [v2.RandomResizedCrop(size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), antialias=True),
           v2.RandomHorizontalFlip()]
    if rgb:
        ops.append(v2.ColorJitter(0.4, 0.4, 0.4))
    ops += [v2.ToDtype(torch.float32, scale=True)]
    tf = v2.Compose(ops)
    chw = frames.permute(0, 3, 1, 2).contiguous()  # [K,H,W,C] -> [K,C,H,W]
    if not rgb:  # v2's colour ops need 3 channels; crop and flip take any count
        tf(chw)
    tf(chw)
    t = time.perf_counter()
    for _ in range(iters):
        tf(chw)
    return iters * len(frames) / (time.perf_counter() - t)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--backbone", default="efficientnet_lite0")
    ap.add_argument("--weights", default=None, help="default: embedded weights (lite0) or random (others)")
    ap.add_argument("--size", type=int, default=224, help="crop side (Ma et al.: 224)")
    ap.add_argument("--videos", type=int, default=4, help="videos per step (x 3 segments)")
    ap.add_argument("--iters", type=int, default=3, help="timed steps per configuration")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--stack", type=int, default=10, help="L flow fields per stack")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    weights = args.weights or (None if args.backbone == "efficientnet_lite0" else "random")
    segments = 3
    print(f"fine-tuning throughput: {args.backbone} at {args.size} px, {args.videos} videos x {segments} segments "
          f"per step, {args.threads} threads, {args.device}")
    rng = np.random.default_rng(0)
    for stream in ("rgb", "flow"):
        chans = 3 if stream == "rgb" else 2 * args.stack
        x = torch.randn(args.videos, segments, chans, args.size, args.size, device=args.device)
        y = torch.randint(0, 101, (args.videos,), device=args.device)
        rates = {}
        for pbn in (True, False):
            bb = build_backbone(args.backbone, weights, in_chans=chans, device=args.device, precision="fp32")
            net = FinetuneNet(bb, 101, STREAM_DEFAULTS[stream]["dropout"], partial_bn=pbn).to(args.device)
            rates[pbn] = step_images_per_s(net, x, y, args.iters, STREAM_DEFAULTS[stream]["clip_grad"])
        frames = torch.from_numpy(rng.integers(0, 256, (segments * args.videos, 240, 320, chans), dtype=np.uint8))
        aug = TrainAugment(size=args.size, mean=tuple(bb.spec["mean"]), std=tuple(bb.spec["std"]), modality=stream,
                           jitter=0.4 if stream == "rgb" else 0.0)
        ours = augment_images_per_s(aug, frames, args.iters * 3)
        ref = reference_images_per_s(frames, args.size, stream == "rgb", args.iters * 3)
        ref_txt = f"{ref:8.1f} images/s, ours/torchvision {ours / ref:.2f}x" if ref else "n/a"
        print(f"{stream:4s} ({chans:2d} ch)  SGD step, partial BN {rates[True]:7.2f} images/s | full BN "
              f"{rates[False]:7.2f} images/s | ratio {rates[True] / rates[False]:.2f}x")
        print(f"{'':14s}augmentation (320x240 -> {args.size}) ours {ours:8.1f} images/s | torchvision.v2 {ref_txt}")


if __name__ == "__main__":
    main()
