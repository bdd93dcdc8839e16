"""Stage: fine-tune the spatial or the temporal stream CNN on a dataset's training split, before extraction.

Provenance:
- Ma et al. 2017, Sec. 3.1: both streams are ImageNet-pretrained CNNs fine-tuned on the target dataset; the
  temporal stream (a stack of 10 flow images) is pre-trained "following the same procedure shown by Wang et al."
  (TSN's cross-modality initialisation, ``pipeline.backbones.cross_modality_init``).
- Ma et al. 2017, Sec. 3.4.1: SGD with momentum 0.9 and weight decay 1e-4, learning rate 5e-6 (spatial) and
  5e-3 (temporal) "divided by 10 when the accuracy is saturated" (here: validation accuracy did not improve for
  ``lr_patience`` epochs), batch size 64; the augmentations of ``pipeline.augment`` (random 0.08-1 area crop,
  aspect 3/4-4/3, resize to 224, flip; colour jitter for RGB only). Flow clipped at +-20 as uint8 images.
- Wu et al. 2015, Sec. 4.1.2: both CNNs trained by mini-batch SGD with momentum 0.9 (their motion CNN starts
  from scratch; we follow Ma et al. and TSN and start it from ImageNet by cross-modality init).
- TSN (Wang et al. 2016, Sec. 3.1-3.2), which Ma et al. build on: 3 segments per video per step, one snippet each,
  class scores averaged over the segments (segmental consensus); partial BN (every BatchNorm but the first keeps
  its ImageNet statistics and affine parameters); dropout before the classifier (0.8 spatial, 0.7 temporal);
  tsn-pytorch's gradient-norm clipping (20 spatial, 40 temporal).
Ma et al. give no schedule length; the default epochs (30 spatial, 80 temporal) are ours, set with ``--epochs``.

Follow one video: ``carve_validation`` puts its group in train or validation (the split's test videos are never
read); each epoch an RNG seeded by (seed, epoch, video) draws a snippet start in each of 3 segments; the snippet
(an RGB frame, or a stack of L flow images from the flow cache or computed on the fly exactly as extraction
computes them) is augmented and normalised as the backbone's ``spec`` says; the CNN scores the 3 snippets, the
scores are averaged, and cross-entropy against the video's label drives SGD.

Outputs in OUT, one set per stream (so ``ckpt/rgb.safetensors`` and ``ckpt/flow.safetensors`` share a folder):

``<stream>.safetensors``  the backbone's weights at the best validation epoch, key for key the network
                          ``build_backbone`` makes, so ``twostream extract --rgb-checkpoint / --flow-checkpoint``
                          loads it as any weights file (and the store records its name and sha256). Metadata
                          ``"twostream"``: JSON of the config, backbone, classes, flow settings (method, every
                          parameter, bound, L), validation accuracy, and the dataset fingerprint, split and sorted
                          ids of the videos it trained and validated on (``seen``: what stage two must not test on;
                          ``checkpoint_provenance`` hands it to extraction). The 1000-way ImageNet classifier of the
                          start weights is carried over untouched; the dataset classifier is not a feature.
``<stream>.json``         the same record, readable, with the per-epoch history; ``"complete": true`` at the end.
``<stream>.epochs/epoch_NNNN.safetensors``  resume points: network with its dataset classifier, SGD momentum,
                          LR-scheduler state and history (the last ``keep_last`` are kept).

A rerun with the same config resumes after the last finished epoch (a kill loses at most the epoch in flight;
``--epochs`` may be raised on a rerun); a different config in the same OUT is refused. All randomness of an
epoch is seeded by (seed, epoch), so a resumed run computes what the uninterrupted run computes.
``check_checkpoints`` is the guard extraction calls: a fine-tuned flow checkpoint is only used with the flow
settings it was trained on.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.augment import TrainAugment, segment_starts
from pipeline.errors import UserError
from pipeline.provenance import seen_record

__all__ = [
    "STREAM_DEFAULTS",
    "FinetuneConfig",
    "FinetuneNet",
    "FinetuneOptions",
    "FinetuneResult",
    "SnippetDataset",
    "check_checkpoints",
    "finetune",
    "freeze_bn_except_first",
    "read_checkpoint_record",
]

CKPT_FORMAT = "twostream-finetune/1"
STREAMS = ("rgb", "flow")

#: per-stream defaults: lr Ma et al. 3.4.1; dropout and gradient clipping TSN; epochs ours (the paper gives none)
STREAM_DEFAULTS: dict[str, dict[str, Any]] = {
    "rgb": {"lr": 5e-6, "epochs": 30, "dropout": 0.8, "clip_grad": 20.0},
    "flow": {"lr": 5e-3, "epochs": 80, "dropout": 0.7, "clip_grad": 40.0},
}


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything that determines the fine-tuned weights (recorded in the checkpoint). None: stream default."""

    stream: str = "rgb"                    # rgb | flow
    split: int = 1                         # train on this split's training videos (its test videos unread)
    backbone: str = "efficientnet_lite0"
    weights: str | None = None             # start weights; None: the backbone's ImageNet weights
    epochs: int | None = None
    lr: float | None = None                # Ma et al.: 5e-6 rgb, 5e-3 flow; divided by 10 on a plateau
    momentum: float = 0.9
    weight_decay: float = 1e-4
    batch_size: int = 64                   # videos per step (x segments snippets)
    segments: int = 3                      # TSN
    partial_bn: bool = True                # TSN partial BN
    dropout: float | None = None           # TSN: 0.8 rgb, 0.7 flow
    clip_grad: float | None = None         # max gradient norm (0: off); tsn-pytorch: 20 rgb, 40 flow
    input_size: int | None = None          # None: the backbone's (224); smaller for quick runs
    crop_scale: tuple[float, float] = (0.08, 1.0)
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip: bool = True
    jitter: float = 0.4                    # colour jitter strength (rgb only)
    val_fraction: float = 0.2              # of the training groups, held out for validation
    lr_patience: int = 2                   # epochs without a better val accuracy before lr /= 10
    seed: int = 0
    flow_method: str | None = None         # None: the flow cache's, else tvl1
    flow_params: tuple[tuple[str, Any], ...] = ()
    flow_bound: float | None = None        # None: the flow cache's, else 20 (Ma et al.)
    flow_stack: int = 10                   # L flow fields per snippet (2L input channels)
    decoder: str = "auto"


@dataclass(frozen=True)
class FinetuneOptions:
    """How to run (never changes the result, so not recorded)."""

    device: str = "auto"
    workers: int = 0                       # data-loading processes (0: in the main process)
    flow_cache: str | None = None          # a ``twostream flow`` cache; None: flow computed on the fly
    keep_last: int = 2                     # epoch checkpoints kept for resuming
    progress: bool = True
    precision: str = "auto"                # fp32 | bf16 (autocast) | auto (bf16 on CUDA)


@dataclass
class FinetuneResult:
    checkpoint: Path
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float | None = None
    resumed_from: int = 0                  # the epoch a rerun continued after (0: fresh start)
    images_per_s: float = 0.0              # training snippets per second over this run's epochs
    complete: bool = False


# -------------------------------------------------------------------------------------------------- the model

def freeze_bn_except_first(module: nn.Module) -> list[nn.Module]:
    """TSN partial BN: every BatchNorm after the first keeps its statistics (eval mode) and affine parameters.

    Returns the frozen layers; call again after each ``train()`` (``FinetuneNet.train`` does).
    """
    bns = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in bns[1:]:
        m.eval()
        for p in m.parameters(recurse=False):
            p.requires_grad_(False)
    return bns[1:]


class FinetuneNet(nn.Module):
    """A ``Backbone`` plus dropout and a dataset classifier; scores of a video's snippets are averaged (TSN)."""

    def __init__(self, backbone: nn.Module, num_classes: int, dropout: float = 0.0, partial_bn: bool = True):
        super().__init__()
        self.backbone = backbone.requires_grad_(True)
        self.drop = nn.Dropout(dropout)
        self.fc = nn.Linear(backbone.feature_dim, num_classes)
        nn.init.normal_(self.fc.weight, 0.0, 0.001)  # TSN's initialisation of the new layer
        nn.init.zeros_(self.fc.bias)
        self.partial_bn = partial_bn
        if partial_bn:
            freeze_bn_except_first(self.backbone)

    def train(self, mode: bool = True):
        super().train(mode)
        if mode and self.partial_bn:
            freeze_bn_except_first(self.backbone)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Snippets ``[B, K, C, S, S]`` -> class scores ``[B, num_classes]`` (mean over the K segments)."""
        b, k = x.shape[:2]
        flat = x.flatten(0, 1).contiguous(memory_format=torch.channels_last)  # [B,K,C,S,S] -> [B*K,C,S,S]
        f = self.backbone(flat)  # -> [B*K,D]
        logits = self.fc(self.drop(f))  # -> [B*K,num_classes]
        return logits.view(b, k, -1).mean(1)  # segmental consensus: [B,K,num_classes] -> [B,num_classes]


# --------------------------------------------------------------------------------------------- the snippets

class _RGBFrames:
    """Decoded RGB frames: one snippet = one frame."""

    def __init__(self, decoder: str):
        self.decoder = decoder
        self._n: dict[str, int] = {}

    def n_frames(self, v) -> int:
        from pipeline.video import count_frames

        if v.id not in self._n:
            self._n[v.id] = count_frames(v.path, self.decoder)[0]
        return self._n[v.id]

    def positions(self, v) -> int:
        return self.n_frames(v)

    def read(self, v, starts: np.ndarray) -> np.ndarray:
        from pipeline.video import decode

        return decode(v.path, self.decoder, starts).frames  # [K,H,W,3]


class _CachedFlow:
    """Flow stacks read from a ``twostream flow`` cache."""

    def __init__(self, root: str, length: int):
        from stages.flow_cache import FlowCache

        self.cache, self.length = FlowCache(root), length
        self._n: dict[str, int] = {}

    def n_frames(self, v) -> int:
        if v.id not in self._n:
            self._n[v.id] = self.cache.n_frames(v.id)
        return self._n[v.id]

    def positions(self, v) -> int:
        return max(self.n_frames(v) - self.length, 1)  # a stack at t needs frames t .. t+L

    def read(self, v, starts: np.ndarray) -> np.ndarray:
        return self.cache.stacks(v.id, starts, self.length).transpose(0, 2, 3, 1)  # [K,2L,H,W] -> [K,H,W,2L]


class _LiveFlow(_RGBFrames):
    """Flow stacks computed on the fly from the decoded frames the stacks need."""

    def __init__(self, decoder: str, flow: dict, length: int, device: str = "cpu"):
        super().__init__(decoder)
        self.flow, self.length, self.device = {**flow, "stack": length}, length, device

    def positions(self, v) -> int:
        return max(self.n_frames(v) - self.length, 1)

    def read(self, v, starts: np.ndarray) -> np.ndarray:
        from pipeline.extraction import flow_stacks_for
        from pipeline.video import decode

        n = self.n_frames(v)
        spans = [np.arange(s, min(s + self.length, n - 1) + 1) for s in starts]  # frames s .. s+L, in the video
        need = np.unique(np.concatenate(spans))
        frames = decode(v.path, self.decoder, need).frames  # [F,H,W,3]
        row = {int(f): k for k, f in enumerate(need)}
        flow = {**self.flow, "device": self.device}
        # extraction's own stack builder on each span; a span cut by the video's end repeats its last pair,
        # which is the video's last pair, exactly as a stack over the whole video does
        stacks = [flow_stacks_for(frames[[row[int(f)] for f in span]], np.zeros(1, np.int64), flow)[0]
                  for span in spans]  # K x [2L,H,W]
        return np.stack(stacks).transpose(0, 2, 3, 1)  # [K,2L,H,W] -> [K,H,W,2L]


class SnippetDataset(torch.utils.data.Dataset):
    """Item i -> (normalised snippets ``[K, C, S, S]``, label) of video i (TSN segment sampling).

    Training draws random starts and augmentations from an RNG seeded by (seed, epoch, i), whatever process
    loads the item; evaluation takes the centre of each segment and the centre crop.
    """

    def __init__(self, items, source, segments: int, seed: int, augment: TrainAugment | None, eval_spec: dict):
        self.items, self.source, self.segments, self.seed = list(items), source, segments, seed
        self.augment, self.eval_spec = augment, eval_spec
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int):
        from pipeline.preprocess import preprocess

        v = self.items[i]
        if self.augment is None:
            raw = self.source.read(v, segment_starts(self.source.positions(v), self.segments))
            return preprocess(raw, self.eval_spec, "center")[:, 0], v.label  # [K,C,S,S]
        rng = np.random.default_rng([self.seed, self.epoch, i])
        raw = self.source.read(v, segment_starts(self.source.positions(v), self.segments, rng))  # [K,H,W,C]
        gen = torch.Generator().manual_seed(int(rng.integers(0, 2**62)))
        return self.augment(raw, gen), v.label  # [K,C,S,S]


def _loader_init(worker_id: int) -> None:
    from pipeline.extraction import worker_init as _worker_init

    _worker_init()


def _batches(ds: SnippetDataset, batch_size: int, order: np.ndarray, workers: int):
    batches = [order[i:i + batch_size].tolist() for i in range(0, len(order), batch_size)]
    return torch.utils.data.DataLoader(ds, batch_sampler=batches, num_workers=workers,
                                       worker_init_fn=_loader_init if workers else None)


# ---------------------------------------------------------------------------------------------- checkpoints

def _atomic_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, default=str)


def read_checkpoint_record(path: str | os.PathLike) -> dict | None:
    """The ``"twostream"`` record of a fine-tuned checkpoint; None for any other weights file."""
    if not str(path).endswith(".safetensors") or not os.path.isfile(path):
        return None
    from safetensors import safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
    except Exception:  # noqa: BLE001 - not a safetensors file: build_backbone reports it
        return None
    if "twostream" not in meta:
        return None
    rec = json.loads(meta["twostream"])
    return rec if rec.get("format") == CKPT_FORMAT else None


def _export(path: Path, model: FinetuneNet, record: dict) -> None:
    """The backbone's weights, exactly the keys ``build_backbone`` loads, plus the record as metadata."""
    from safetensors.torch import save

    sd = model.backbone.net.model.state_dict()
    tensors = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    _atomic_bytes(path, save(tensors, metadata={"twostream": _json(record)}))


def _add_seen(path: Path, record: dict) -> None:
    """Rewrite a checkpoint's record with the split and the videos it was trained on; tensors unchanged."""
    from safetensors.torch import load_file, save

    old = read_checkpoint_record(path)
    _atomic_bytes(path, save(load_file(str(path)),
                             metadata={"twostream": _json({**old, "split": record["split"], "seen": record["seen"]})}))


def _save_epoch(path: Path, model: FinetuneNet, opt, sched, state: dict) -> None:
    from safetensors.torch import save

    tensors = {f"model.{k}": v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    osd = opt.state_dict()
    for i, st in osd["state"].items():
        for name, t in st.items():
            if isinstance(t, torch.Tensor):
                tensors[f"optim.{i}.{name}"] = t.detach().cpu().contiguous()
    meta = {**state, "param_groups": osd["param_groups"], "scheduler": sched.state_dict()}
    _atomic_bytes(path, save(tensors, metadata={"twostream": json.dumps(meta, default=str)}))


def _load_epoch(path: Path, model: FinetuneNet, opt, sched, device) -> dict:
    from safetensors import safe_open
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["twostream"])
    model.load_state_dict({k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")})
    state: dict[int, dict] = defaultdict(dict)
    for k, v in tensors.items():
        if k.startswith("optim."):
            _, i, name = k.split(".", 2)
            state[int(i)][name] = v.to(device)
    opt.load_state_dict({"state": dict(state), "param_groups": meta.pop("param_groups")})
    sched.load_state_dict(meta.pop("scheduler"))
    return meta


def _epoch_files(folder: Path) -> list[tuple[int, Path]]:
    out = []
    for p in folder.glob("epoch_*.safetensors"):
        try:
            out.append((int(p.stem.split("_")[1]), p))
        except (IndexError, ValueError):
            continue
    return sorted(out)


# ------------------------------------------------------------------------------------------------- the stage

def _resolve(cfg: FinetuneConfig, cache_flow: dict | None) -> FinetuneConfig:
    """Fill the per-stream defaults and the flow settings (from the cache when one is given); validate."""
    from stages.flow_cache import describe_flow, resolved_flow

    if cfg.stream not in STREAMS:
        raise UserError(f"--stream must be one of {', '.join(STREAMS)}; got {cfg.stream!r}")
    d = STREAM_DEFAULTS[cfg.stream]
    changes: dict[str, Any] = {k: v for k, v in d.items() if getattr(cfg, k) is None}
    if cfg.stream == "flow":
        if cache_flow is not None and cfg.flow_method is None:
            method, params, bound = cache_flow["method"], cache_flow["params"], cache_flow["bound"]
            if cfg.flow_bound is not None:
                bound = cfg.flow_bound
            params = {**params, **dict(cfg.flow_params)}
        else:
            method, params = cfg.flow_method or "tvl1", dict(cfg.flow_params)
            bound = 20.0 if cfg.flow_bound is None else cfg.flow_bound
        want = resolved_flow(method, tuple(params.items()), bound)
        if cache_flow is not None and want != cache_flow:
            raise UserError(f"the flow cache holds {describe_flow(cache_flow, want)} but fine-tuning asks for "
                            f"{describe_flow(want, cache_flow)}; drop the --flow options or use another cache")
        changes.update(flow_method=method, flow_params=tuple(sorted(want["params"].items())), flow_bound=bound)
    else:
        changes.update(flow_method=None, flow_params=(), flow_bound=None)
    cfg = dataclasses.replace(cfg, **changes)
    if cfg.epochs < 1 or cfg.batch_size < 1 or cfg.segments < 1 or cfg.flow_stack < 1:
        raise UserError("--epochs, --batch-size, --segments and --flow-stack must be >= 1")
    if not 0 <= cfg.val_fraction < 1:
        raise UserError(f"--val-fraction must be in [0, 1); got {cfg.val_fraction}")
    if cfg.lr <= 0:
        raise UserError(f"--lr must be positive; got {cfg.lr}")
    return cfg


def _identity(record: dict) -> str:
    """What a resume must match: the record without the epoch count (raising --epochs continues a run)."""
    from pipeline.store import config_hash

    rec = json.loads(_json(record))
    rec["config"].pop("epochs", None)
    rec.pop("seen", None)  # follows from the config and the dataset; absent from runs begun before it was recorded
    rec.pop("split", None)
    return config_hash(rec)


def finetune(dataset: str | os.PathLike, out: str | os.PathLike, cfg: FinetuneConfig,
             opts: FinetuneOptions = FinetuneOptions(), split_dir: str | os.PathLike | None = None,
             csv: str | os.PathLike | None = None, log: Callable[[str], None] = print) -> FinetuneResult:
    """Fine-tune ``cfg.stream``'s CNN on ``dataset``'s split ``cfg.split``; write ``out/<stream>.safetensors``."""
    from tqdm import tqdm

    from pipeline import __version__
    from pipeline.backbones import build_backbone
    from pipeline.datasets import load_manifest
    from pipeline.extraction import resolve_device
    from pipeline.features import carve_validation
    from pipeline.store import atomic_write_text
    from pipeline.video import choose_backend
    from stages.flow_cache import FlowCache

    cache = FlowCache(opts.flow_cache) if (opts.flow_cache and cfg.stream == "flow") else None
    cfg = _resolve(cfg, cache.flow if cache else None)
    out = Path(out)
    manifest = load_manifest(dataset, split_dir=split_dir, csv=csv)
    train_items, _ = manifest.split(cfg.split)  # the test videos are never read
    train_items, val_items = carve_validation(train_items, cfg.val_fraction, cfg.seed)
    if not train_items:
        raise UserError(f"split {cfg.split} of {manifest.root} has no training videos")
    device = resolve_device(opts.device)
    precision = ("bf16" if device.startswith("cuda") else "fp32") if opts.precision == "auto" else opts.precision
    decoder = choose_backend(cfg.decoder, "cpu")
    flow = None
    if cfg.stream == "flow":
        flow = {"method": cfg.flow_method, "params": dict(cfg.flow_params), "bound": cfg.flow_bound,
                "stack": cfg.flow_stack, "encoding": "uint8, 128 = zero motion"}
        if cache is not None:
            from pipeline.store import read_errors

            failed = {e["id"] for e in read_errors(cache.root)}  # videos the cache could not decode: left out
            dropped = [v.id for v in train_items + val_items if v.id in failed and not cache.has(v.id)]
            if dropped:
                log(f"leaving out {len(dropped)} video(s) the flow cache failed on (its errors.jsonl), "
                    f"e.g. {dropped[0]}")
                train_items = [v for v in train_items if v.id not in dropped]
                val_items = [v for v in val_items if v.id not in dropped]
            missing = [v.id for v in train_items + val_items if not cache.has(v.id)]
            if missing:
                raise UserError(f"flow cache {opts.flow_cache} lacks {len(missing)} training video(s), e.g. "
                                f"{missing[0]}; run twostream flow on this dataset first")
            source: Any = _CachedFlow(opts.flow_cache, cfg.flow_stack)
        else:
            live_dev = device if device.startswith("cuda") and opts.workers == 0 else "cpu"
            source = _LiveFlow(decoder, flow, cfg.flow_stack, live_dev)
    else:
        source = _RGBFrames(decoder)

    torch.manual_seed(cfg.seed)
    in_chans = 3 if cfg.stream == "rgb" else 2 * cfg.flow_stack
    bb = build_backbone(cfg.backbone, cfg.weights, in_chans=in_chans, device=device, precision="fp32")
    size = int(cfg.input_size or bb.spec["input_size"])
    resize = round(size * bb.spec["resize"] / bb.spec["input_size"])
    eval_spec = {**bb.spec, "input_size": size, "resize": resize}
    model = FinetuneNet(bb, len(manifest.classes), cfg.dropout, cfg.partial_bn).to(device)
    record = {"format": CKPT_FORMAT, "stream": cfg.stream, "backbone": cfg.backbone, "config": asdict(cfg),
              "start": {k: bb.spec[k] for k in ("weights", "weights_sha256", "cross_modality_init")},
              "input_size": size, "normalisation": {"mean": bb.spec["mean"], "std": bb.spec["std"]},
              "classes": manifest.classes, "dataset": manifest.fingerprint(), "n_train": len(train_items),
              "n_val": len(val_items), "flow": flow, "package_version": __version__,
              # the videos these weights have seen: stage two refuses to test on them (pipeline.provenance)
              "split": cfg.split, "seen": seen_record([v.id for v in train_items], [v.id for v in val_items])}
    identity = _identity(record)

    augment = TrainAugment(size=size, mean=tuple(bb.spec["mean"]), std=tuple(bb.spec["std"]), modality=cfg.stream,
                           scale=tuple(cfg.crop_scale), ratio=tuple(cfg.crop_ratio), flip=cfg.flip,
                           jitter=cfg.jitter if cfg.stream == "rgb" else 0.0)
    train_ds = SnippetDataset(train_items, source, cfg.segments, cfg.seed, augment, eval_spec)
    val_ds = SnippetDataset(val_items, source, cfg.segments, cfg.seed, None, eval_spec)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, mode="max", factor=0.1, patience=cfg.lr_patience)

    # -- resume, or start fresh
    out.mkdir(parents=True, exist_ok=True)
    ckpt, summary_path, epochs_dir = (out / f"{cfg.stream}.safetensors", out / f"{cfg.stream}.json",
                                      out / f"{cfg.stream}.epochs")
    epochs_dir.mkdir(exist_ok=True)
    run_file = epochs_dir / "run.json"
    if run_file.is_file():
        have = json.loads(run_file.read_text())
        if have["identity"] != identity:
            from pipeline.store import diff_configs

            diffs = diff_configs(have["record"], json.loads(_json(record)), labels=("that run", "requested"))
            raise UserError(f"{out} holds a {cfg.stream} fine-tuning run with another config "
                            f"({'; '.join(diffs[:4])}); use another --out")
    else:
        atomic_write_text(run_file, json.dumps({"identity": identity, "record": json.loads(_json(record))},
                                               indent=2, sort_keys=True))
    history: list[dict] = []
    best_acc, best_epoch, start = -math.inf, 0, 0
    done = _epoch_files(epochs_dir)
    if done:
        start, path = done[-1]
        state = _load_epoch(path, model, opt, sched, device)
        history, best_acc, best_epoch = state["history"], state["best_acc"], state["best_epoch"]
        if start < cfg.epochs:
            log(f"resuming {cfg.stream} fine-tuning after epoch {start} ({path.name})")
    result = FinetuneResult(ckpt, history, best_epoch, None if best_epoch == 0 or not val_items else best_acc,
                            resumed_from=start)

    if start >= cfg.epochs:
        log(f"{cfg.stream} fine-tuning in {out} already ran {start} epochs; nothing to do")
    else:
        log(f"fine-tuning the {cfg.stream} stream ({cfg.backbone}, {size} px) on {len(train_items)} videos, "
            f"validating on {len(val_items)}; {cfg.segments} segments, batch {cfg.batch_size}, lr {cfg.lr:g}")
    seen_images, seconds = 0, 0.0
    for epoch in range(start + 1, cfg.epochs + 1):
        # -- one pass over the training videos; every random draw seeded by (seed, epoch)
        torch.manual_seed(cfg.seed * 100003 + epoch)  # dropout masks
        train_ds.epoch = epoch
        order = np.random.default_rng([cfg.seed, epoch]).permutation(len(train_ds))
        model.train()
        t0 = time.perf_counter()
        loss_sum, correct, n = 0.0, 0, 0
        bar = tqdm(_batches(train_ds, cfg.batch_size, order, opts.workers), total=math.ceil(len(order) / cfg.batch_size),
                   desc=f"{cfg.stream} epoch {epoch}/{cfg.epochs}", unit="batch", disable=not opts.progress,
                   leave=False, dynamic_ncols=True)
        for x, y in bar:
            x, y = x.to(device, non_blocking=True), y.to(device)  # [B,K,C,S,S], [B]
            with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = model(x)  # -> [B,num_classes]
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_(params, cfg.clip_grad)
            opt.step()
            loss_sum += float(loss.detach()) * len(y)
            correct += int((logits.argmax(1) == y).sum())
            n += len(y)
            rate = n * cfg.segments / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss_sum / n:.3f}", img_s=f"{rate:.1f}")
        bar.close()
        took = time.perf_counter() - t0
        seen_images += n * cfg.segments
        seconds += took
        row = {"epoch": epoch, "lr": opt.param_groups[0]["lr"], "train_loss": loss_sum / max(n, 1),
               "train_accuracy": correct / max(n, 1), "seconds": took, "images_per_s": n * cfg.segments / took}
        # -- validation (held-out groups of the training split), model selection, lr schedule
        improved = True
        if val_items:
            row["val_loss"], row["val_accuracy"] = _evaluate(model, val_ds, cfg.batch_size, opts.workers, device,
                                                             precision)
            improved = row["val_accuracy"] > best_acc
            sched.step(row["val_accuracy"])
        history.append(row)
        if improved:
            best_acc, best_epoch = row.get("val_accuracy", -math.inf), epoch
            _export(ckpt, model, {**record, "epoch": epoch, "val_accuracy": row.get("val_accuracy")})
        _save_epoch(epochs_dir / f"epoch_{epoch:04d}.safetensors", model, opt, sched,
                    {"identity": identity, "epoch": epoch, "history": history, "best_acc": best_acc,
                     "best_epoch": best_epoch})
        for _, old in _epoch_files(epochs_dir)[:-max(opts.keep_last, 1)]:
            old.unlink()
        log(f"{cfg.stream} epoch {epoch}/{cfg.epochs}: lr {row['lr']:.2g} loss {row['train_loss']:.4f} "
            f"train acc {row['train_accuracy']:.3f}"
            + (f" val acc {row['val_accuracy']:.3f}{' (best)' if improved else ''}" if val_items else "")
            + f", {row['images_per_s']:.1f} images/s")
        atomic_write_text(summary_path, json.dumps({**record, "best_epoch": best_epoch, "complete": False,
                                                    "best_val_accuracy": best_acc if val_items else None,
                                                    "history": history}, indent=2, sort_keys=True, default=str))
    if not ckpt.is_file():  # a rerun of a finished run whose export was removed: the last epoch is the best we have
        _export(ckpt, model, {**record, "epoch": start, "val_accuracy": None})
    elif "seen" not in (read_checkpoint_record(ckpt) or {"seen": True}):
        _add_seen(ckpt, record)  # a checkpoint written before it recorded its videos: add them, weights untouched
    atomic_write_text(summary_path, json.dumps({**record, "best_epoch": best_epoch, "complete": True,
                                                "best_val_accuracy": best_acc if val_items else None,
                                                "history": history, "checkpoint": ckpt.name},
                                               indent=2, sort_keys=True, default=str))
    result.history, result.best_epoch, result.complete = history, best_epoch, True
    result.best_val_accuracy = best_acc if val_items and best_epoch else None
    result.images_per_s = seen_images / seconds if seconds else 0.0
    return result


@torch.no_grad()
def _evaluate(model: FinetuneNet, ds: SnippetDataset, batch_size: int, workers: int, device: str,
              precision: str) -> tuple[float, float]:
    """Video-level loss and accuracy: centre snippets of each segment, centre crop, scores averaged."""
    model.eval()
    loss_sum, correct, n = 0.0, 0, 0
    for x, y in _batches(ds, batch_size, np.arange(len(ds)), workers):
        x, y = x.to(device), y.to(device)
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=precision == "bf16"):
            logits = model(x).float()  # [B,num_classes]
        loss_sum += float(F.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return loss_sum / max(n, 1), correct / max(n, 1)


# ------------------------------------------------------------------------------------- guard for extraction

def check_checkpoints(cfg) -> None:
    """Refuse fine-tuned checkpoints that do not fit the extraction config ``cfg`` (``stages.extract``).

    A fine-tuned flow checkpoint must see the flow it was trained on (method, every parameter, clipping bound,
    stack length): other flow images are another input distribution, and features silently degrade. Any
    fine-tuned checkpoint must also be of the extraction's backbone. Weights files that are not fine-tuning
    checkpoints (ImageNet files, other tools' weights) pass unchecked.
    """
    from stages.flow_cache import describe_flow, resolved_flow

    for stream, path in (("rgb", cfg.weights), ("flow", cfg.flow_weights)):
        if stream not in cfg.streams or not path:
            continue
        rec = read_checkpoint_record(path)
        if rec is None:
            continue
        name = os.path.basename(str(path))
        if rec["backbone"] != cfg.backbone:
            raise UserError(f"{stream} checkpoint {name} is a fine-tuned {rec['backbone']}, but this extraction "
                            f"uses --backbone {cfg.backbone}")
        if stream == "flow" and rec.get("flow"):
            have = {**rec["flow"], "stack": int(rec["flow"]["stack"])}
            want = {**resolved_flow(cfg.flow_method, cfg.flow_params, cfg.flow_bound), "stack": int(cfg.flow_stack)}
            keys = ("method", "params", "bound", "stack")
            if any(_json(have[k]) != _json(want[k]) for k in keys):
                raise UserError(f"flow checkpoint {name} was trained on flow {describe_flow(have, want)}, but this "
                                f"extraction computes {describe_flow(want, have)}; pass the checkpoint's --flow, "
                                "--flow-param, --flow-bound and --flow-stack, or another checkpoint")


def checkpoint_provenance(cfg) -> tuple[dict, dict]:
    """What the store records of the fine-tuned CNNs of extraction config ``cfg`` (``pipeline.provenance``).

    Returns ``(summary, lists)``: per fine-tuned stream, the summary that goes into the store's config
    (checkpoint, split, dataset fingerprint, counts and digests of the videos it was trained and validated on)
    and the id lists for ``STORE/finetune.json``. Streams with ImageNet (or foreign) weights are absent. The flow
    CNN without ``--flow-checkpoint`` starts from the rgb weights (cross-modality init), so it inherits their record.
    """
    summary, lists = {}, {}
    for stream in cfg.streams:
        path = cfg.weights if stream == "rgb" else (cfg.flow_weights or cfg.weights)
        rec = read_checkpoint_record(path) if path else None
        if rec is None:
            continue
        name = os.path.basename(str(path))
        if "seen" not in rec:
            raise UserError(f"{stream} checkpoint {name} does not record the videos it was trained on (it predates "
                            "that record); rerun the same `twostream finetune` into its --out to add it")
        seen = rec["seen"]
        summary[stream] = {"checkpoint": name, "split": rec["split"], "dataset": rec["dataset"],
                           "n_train": len(seen["train"]), "n_val": len(seen["val"]),
                           "train_sha256": seen["train_sha256"], "val_sha256": seen["val_sha256"]}
        lists[stream] = {"train": seen["train"], "val": seen["val"]}
    return summary, lists
