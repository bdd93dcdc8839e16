"""Backbones and preprocessing: embedded weights are real, key mapping, cross-modality init, TTA geometry,
flow flips, foveated views, spatial grid, weights files and errors. CPU, tiny inputs except one 224 px test."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from pipeline.backbones import (
    build_backbone,
    cross_modality_init,
    embedded_weights_path,
    load_by_position,
    read_state_dict,
)
from pipeline.errors import UserError
from pipeline.preprocess import foveated_views, hflip, preprocess, view_flips

torch.set_num_threads(1)

TINY = {"in_chans": 3, "modality": "rgb", "resize": 8, "input_size": 6, "interpolation": "bilinear",
        "mean": [0.0, 0.0, 0.0], "std": [1.0, 1.0, 1.0]}


@pytest.fixture(scope="module")
def lite0():
    return build_backbone("efficientnet_lite0")


@pytest.fixture(scope="module")
def r50(tmp_path_factory):
    """A random torchvision ResNet-50 and its state dict saved as a .pth file (made once: init is slow)."""
    import torchvision
    torch.manual_seed(0)
    net = torchvision.models.resnet50(weights=None).eval()
    path = tmp_path_factory.mktemp("w") / "resnet50-0676ba61.pth"
    torch.save(net.state_dict(), path)
    return net, path


# ------------------------------------------------------------------------------------------- embedded weights

def test_embedded_weights_recognise_known_images(lite0):
    """skimage's bundled photos: an espresso cup (ImageNet 967 espresso) and a tabby cat (281/282/285)."""
    data = pytest.importorskip("skimage.data")
    frames = [data.coffee(), data.chelsea()]
    logits = torch.cat([lite0.classify(preprocess(f[None], lite0.spec)[:, 0]) for f in frames])
    top1 = logits.argmax(-1).tolist()
    assert top1[0] == 967, top1
    assert top1[1] in (281, 282, 285), top1
    assert logits.softmax(-1)[0, 967] > 0.5  # confident, not a lucky argmax
    assert lite0.spec["weights_sha256"].startswith("57934424")  # the hash prefix in the package's file name


def _role(key: str, timm_names: bool) -> tuple:
    """(block index, layer role, tensor) of an EfficientNet key in either naming; BNs named by the conv before."""
    if timm_names:
        m = re.match(r"blocks\.(\d+)\.(\d+)\.(\w+)\.(\w+)$", key)
        if m:
            stage, idx, layer, tensor = m.groups()
            return ("block", (int(stage), int(idx)), layer, tensor)
        layer, tensor = key.split(".")
        return ("top", {"conv_stem": "stem", "bn1": "stem_bn", "conv_head": "head", "bn2": "head_bn",
                        "classifier": "fc"}[layer], tensor)
    m = re.match(r"_blocks\.(\d+)\.(\w+)\.(\w+)$", key)
    if m:
        return ("block", int(m.group(1)), m.group(2), m.group(3))
    layer, tensor = key.split(".")
    return ("top", {"_conv_stem": "stem", "_bn0": "stem_bn", "_conv_head": "head", "_bn1": "head_bn",
                    "_fc": "fc"}[layer], tensor)


# lukemelas layer -> timm layer, for depthwise-separable (first) blocks and inverted-residual blocks
DS = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
IR = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
      "_project_conv": "conv_pwl", "_bn2": "bn3"}


def test_embedded_key_mapping_is_one_to_one_and_layerwise(lite0):
    import timm
    sd = read_state_dict(embedded_weights_path())
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    pairs = load_by_position(model, sd)
    assert len(pairs) == len(sd) == len(model.state_dict()) == 296
    assert len({s for s, _ in pairs}) == len({d for _, d in pairs}) == 296  # a bijection
    flat_blocks = [(s, i) for s, stage in enumerate(model.blocks) for i in range(len(stage))]
    for src, dst in pairs:
        a, b = _role(src, False), _role(dst, True)
        assert a[0] == b[0], (src, dst)
        if a[0] == "top":
            assert a[1:] == b[1:], (src, dst)
        else:  # same block, corresponding layer, same tensor
            assert flat_blocks[a[1]] == b[1], (src, dst)
            table = DS if a[1] == 0 else IR
            assert table[a[2]] == b[2] and a[3] == b[3], (src, dst)
        assert torch.equal(model.state_dict()[dst], sd[src])
    # and the backbone built by name holds exactly these tensors
    assert torch.equal(lite0.net.model.conv_stem.weight.detach().cpu(), sd["_conv_stem.weight"])


# ----------------------------------------------------------------------------------- cross-modality init

def test_cross_modality_init_is_rgb_mean_replicated(tmp_path):
    import timm
    torch.manual_seed(0)
    path = tmp_path / "lite0.pth"
    torch.save(timm.create_model("tf_efficientnet_lite0", pretrained=False).state_dict(), path)
    rgb = build_backbone("efficientnet_lite0", weights=str(path))
    flow = build_backbone("efficientnet_lite0", weights=str(path), in_chans=20)
    w_rgb = rgb.net.model.conv_stem.weight
    w_flow = flow.net.model.conv_stem.weight
    assert w_rgb.shape == (32, 3, 3, 3) and w_flow.shape == (32, 20, 3, 3)
    for c in range(20):
        assert torch.allclose(w_flow[:, c], w_rgb.mean(1))
    assert torch.equal(flow.net.model.conv_head.weight, rgb.net.model.conv_head.weight)  # rest unchanged
    assert flow.spec["modality"] == "flow" and flow.spec["cross_modality_init"]
    assert flow.spec["mean"] == [0.5] * 20 and flow.spec["std"] == [0.5] * 20
    assert not flow.has_classifier
    # a flow stack whose 20 channels all equal one grey image gives the RGB net's response to that grey image
    # scaled by 20/3 in the first conv: check on the conv itself (Conv2dSame, no bias)
    x = torch.rand(1, 1, 9, 9)
    out_flow = flow.net.model.conv_stem(x.expand(1, 20, 9, 9))
    out_rgb = rgb.net.model.conv_stem(x.expand(1, 3, 9, 9))
    assert torch.allclose(out_flow, out_rgb * 20 / 3, atol=1e-5)
    assert flow(torch.randn(2, 20, 32, 32)).shape == (2, 1280)


def test_flow_trained_weights_load_as_they_are(tmp_path):
    torch.manual_seed(0)
    trained = build_backbone("efficientnet_lite0", weights="random", in_chans=20)
    with torch.no_grad():
        trained.net.model.conv_stem.weight.normal_()  # no longer an RGB mean: a "trained" flow filter
    path = tmp_path / "flow.pth"
    torch.save(trained.net.model.state_dict(), path)
    again = build_backbone("efficientnet_lite0", weights=str(path), in_chans=20)
    assert torch.equal(again.net.model.conv_stem.weight, trained.net.model.conv_stem.weight)
    assert not again.spec["cross_modality_init"]
    with pytest.raises(UserError, match="architecture"):  # a 20-channel file cannot make an RGB network
        build_backbone("efficientnet_lite0", weights=str(path))


def test_cross_modality_on_plain_conv():
    conv = torch.nn.Conv2d(3, 4, 3)
    w = conv.weight.detach().clone()
    cross_modality_init(conv, 6)
    assert conv.weight.shape == (4, 6, 3, 3) and conv.in_channels == 6
    assert torch.allclose(conv.weight[:, 5], w.mean(1))


# ------------------------------------------------------------------------------------------ preprocessing

def _frames(n=2, h=8, w=10, c=3):
    return (torch.arange(n * h * w * c) % 251).to(torch.uint8).reshape(n, h, w, c)


RESIZE_DTYPES = pytest.mark.parametrize("resize_dtype", ["uint8", "float"])  # new specs, and stores made before


@RESIZE_DTYPES
def test_tta_view_counts_and_flip_geometry(resize_dtype):
    spec = dict(TINY, resize_dtype=resize_dtype)
    fr = _frames()
    for tta, v in (("center", 1), ("flip", 2), ("10crop", 10)):
        assert preprocess(fr, spec, tta).shape == (2, v, 3, 6, 6)
    x = fr.permute(0, 3, 1, 2).float() / 255  # already 8 px on the short side: no resize
    ten = preprocess(fr, spec, "10crop")
    expect = [x[..., :6, :6], x[..., :6, 4:], x[..., 2:, :6], x[..., 2:, 4:], x[..., 1:7, 2:8]]
    for i, e in enumerate(expect):
        assert torch.allclose(ten[:, i], e)
        assert torch.allclose(ten[:, 5 + i], e.flip(-1))
    flip = preprocess(fr, spec, "flip")
    assert torch.allclose(flip[:, 0], expect[4]) and torch.allclose(flip[:, 1], expect[4].flip(-1))
    assert view_flips("10crop") == [False] * 5 + [True] * 5
    with pytest.raises(ValueError):
        preprocess(fr, TINY, "3crop")


@RESIZE_DTYPES
def test_normalisation_and_resize_shorter_side(resize_dtype):
    spec = dict(TINY, mean=[0.5, 0.5, 0.5], std=[0.25, 0.25, 0.25], resize=4, input_size=4, resize_dtype=resize_dtype)
    fr = torch.full((1, 8, 16, 3), 255, dtype=torch.uint8)
    out = preprocess(fr, spec)
    assert out.shape == (1, 1, 3, 4, 4)
    assert torch.allclose(out, torch.full_like(out, 2.0))  # (1 - .5) / .25


@RESIZE_DTYPES
def test_flow_flip_negates_x(resize_dtype):
    """uint8 flow (128 = 0): mirroring maps u -> 255 - u at the mirrored pixel; v only moves."""
    rng = np.random.default_rng(0)
    stack = rng.integers(0, 256, size=(1, 6, 6, 4), dtype=np.uint8)  # L = 2: channels x1, y1, x2, y2
    spec = dict(TINY, in_chans=4, modality="flow", resize=6, mean=[0.5] * 4, std=[0.226] * 4,
                resize_dtype=resize_dtype)
    views = preprocess(stack, spec, "flip")
    back = (views * 0.226 + 0.5) * 255  # undo normalisation -> uint8 values
    plain, mirrored = back[0, 0], back[0, 1]
    s = torch.from_numpy(stack[0]).permute(2, 0, 1).float()
    assert torch.allclose(plain, s, atol=1e-3)
    assert torch.allclose(mirrored[0::2], 255 - s[0::2].flip(-1), atol=1e-3)  # x channels negated and mirrored
    assert torch.allclose(mirrored[1::2], s[1::2].flip(-1), atol=1e-3)  # y channels mirrored only
    # zero motion stays zero motion
    z = torch.full((1, 4, 2, 2), 128 / 255)
    assert torch.allclose(hflip(z, flow=True)[:, 0::2], torch.full((1, 2, 2, 2), 127 / 255))
    z8 = torch.full((1, 4, 2, 2), 128, dtype=torch.uint8)
    assert torch.equal(hflip(z8, flow=True)[:, 0::2], torch.full((1, 2, 2, 2), 127, dtype=torch.uint8))


@RESIZE_DTYPES
@pytest.mark.parametrize("tta", ["center", "flip", "10crop"])
@pytest.mark.parametrize("mean", [[0.5] * 6, [0.4, 0.6] * 3, [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]])
def test_flow_stacks_preprocessed_per_image_equal_the_assembled_stacks_bit_for_bit(tta, mean, resize_dtype):
    """Overlapping stacks (L = 3, stacks at frames 0, 1, 3 of 6 pairs): each flow image preprocessed once and the
    stacks gathered give exactly ``preprocess`` of the assembled stacks, up- and downsampled, any per-channel mean."""
    from pipeline.extraction import FlowImages
    from pipeline.preprocess import flow_stack_views

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(6, 2, 12, 17), dtype=np.uint8)  # [P,2,H,W]
    rows = np.array([[0, 1, 2], [1, 2, 3], [3, 4, 5]])  # [T,L]
    stacks = np.asarray(FlowImages(images, rows))  # [T,2L,H,W]: x1, y1, x2, y2, x3, y3
    assert np.array_equal(stacks[1, 2:4], images[2]) and stacks.shape == (3, 6, 12, 17)
    for resize, size in ((20, 16), (8, 6)):
        spec = dict(TINY, in_chans=6, modality="flow", resize=resize, input_size=size, interpolation="bicubic",
                    mean=mean, std=[0.25] * 6, resize_dtype=resize_dtype)
        want = preprocess(np.ascontiguousarray(stacks.transpose(0, 2, 3, 1)), spec, tta)  # [T,V,2L,S,S]
        assert torch.equal(flow_stack_views(images, rows, spec, tta), want)


def test_resize_values_do_not_depend_on_memory_layout():
    """preprocess resizes planar (contiguous) frames; stores made when it resized channels-last ones keep their
    features only if both give the same values, up- and downsampling, RGB and flow-stack channel counts."""
    from pipeline.preprocess import resize_shorter, to_chw, to_float_chw

    rng = np.random.default_rng(0)
    for h, w, c in ((120, 160, 3), (480, 640, 3), (100, 133, 20), (300, 400, 20)):
        x = to_float_chw(rng.integers(0, 256, (2, h, w, c), dtype=np.uint8), c)  # channels-last memory
        for mode in ("bicubic", "bilinear"):
            assert torch.equal(resize_shorter(x, 256, mode), resize_shorter(x.contiguous(), 256, mode)), (h, w, c)
            x8 = to_chw(rng.integers(0, 256, (2, h, w, c), dtype=np.uint8), c)  # uint8 kernels: the same rule
            assert torch.equal(resize_shorter(x8, 256, mode), resize_shorter(x8.contiguous(), 256, mode)), (h, w, c)


def test_a_spec_without_resize_dtype_resizes_floats_as_stores_made_before_it():
    """Stores made before the uint8 resize record no ``resize_dtype``: their features are reproduced only if
    preprocess still scales to float first and resizes the floats, bit for bit, RGB and flow images."""
    from pipeline.preprocess import flow_stack_views, normalize, resize_shorter, to_float_chw, tta_views

    rng = np.random.default_rng(0)
    spec = dict(TINY, resize=20, input_size=16, interpolation="bicubic", mean=[0.4, 0.5, 0.6], std=[0.2, 0.3, 0.4])
    fr = rng.integers(0, 256, (2, 12, 17, 3), dtype=np.uint8)
    x = resize_shorter(to_float_chw(fr).contiguous(), 20, "bicubic")
    assert torch.equal(preprocess(fr, spec, "flip"), normalize(tta_views(x, 16, "flip"), spec["mean"], spec["std"]))
    assert not torch.equal(preprocess(fr, dict(spec, resize_dtype="uint8"), "flip"), preprocess(fr, spec, "flip"))
    images = rng.integers(0, 256, (3, 2, 12, 17), dtype=np.uint8)
    fspec = dict(spec, in_chans=2, modality="flow", mean=[0.5, 0.5], std=[0.25, 0.25])
    y = resize_shorter(torch.from_numpy(images).float().div_(255.0).contiguous(), 20, "bicubic")
    want = normalize(tta_views(y, 16, "center", flow=True), [0.5, 0.5], [0.25, 0.25])  # [P,1,2,S,S]
    assert torch.equal(flow_stack_views(images, np.array([[0], [2]]), fspec), want[[0, 2]])


@pytest.mark.parametrize("mode, pil_mode", [("bicubic", "BICUBIC"), ("bilinear", "BILINEAR")])
def test_uint8_resize_gives_pils_values(mode, pil_mode):
    """Known answer: the ImageNet pipelines behind these weights resize uint8 images with PIL (timm, torchvision).
    Resizing uint8 (new specs) lands within two grey levels of PIL everywhere and equals it at 98% of the values,
    up- and downsampling; resizing floats (stores made before) strays further on the same frames."""
    from PIL import Image

    from pipeline.preprocess import resize_shorter, to_chw, to_float_chw

    yy, xx = np.mgrid[0:120, 0:160]
    frame = np.stack([(xx * 1.6 + 40 * np.sin(yy / 7.0)) % 256, (yy * 2.1) % 256,
                      128 + 100 * np.sin(xx / 9.0) * np.cos(yy / 5.0)], -1).astype(np.uint8)  # [120,160,3]
    for size in (256, 64):
        w = round(160 * size / 120)
        pil = np.asarray(Image.fromarray(frame).resize((w, size), getattr(Image.Resampling, pil_mode)))
        ours = resize_shorter(to_chw(frame[None]), size, mode)[0].permute(1, 2, 0).numpy()  # uint8 [size,w,3]
        floats = resize_shorter(to_float_chw(frame[None]).contiguous(), size, mode)[0].permute(1, 2, 0).numpy()
        diff = np.abs(ours.astype(int) - pil.astype(int))
        assert ours.dtype == np.uint8 and ours.shape == pil.shape, size
        assert diff.max() <= 2 and (diff == 0).mean() >= 0.98, (size, diff.max(), (diff == 0).mean())
        assert np.abs(np.round(floats * 255) - pil).mean() > diff.mean(), size


def test_grayscale_and_odd_sizes(lite0):
    gray = np.arange(33 * 17, dtype=np.uint8).reshape(1, 33, 17)  # [N, H, W], 33x17
    out = preprocess(gray, lite0.spec, "center")
    assert out.shape == (1, 1, 3, 224, 224)
    assert torch.equal(out[:, :, 0], out[:, :, 1]) and torch.equal(out[:, :, 1], out[:, :, 2])
    odd = np.zeros((2, 17, 33, 3), dtype=np.uint8)
    assert preprocess(odd, lite0.spec, "10crop").shape == (2, 10, 3, 224, 224)
    with pytest.raises(ValueError):
        preprocess(np.zeros((1, 8, 8, 4), np.uint8), lite0.spec)


# ------------------------------------------------------------------------------- foveated and spatial grid

def test_foveated_crop_geometry():
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float).reshape(2, 3, 8, 8)
    context, fovea = foveated_views(x)
    assert context.shape == fovea.shape == (2, 3, 4, 4)
    assert torch.equal(fovea, x[..., 2:6, 2:6])  # centre, full resolution, half the side
    assert context[0, 0, 0, 0] == (x[0, 0, 0, 0] + x[0, 0, 0, 1] + x[0, 0, 1, 0] + x[0, 0, 1, 1]) / 4
    assert torch.allclose(context, x.reshape(2, 3, 4, 2, 4, 2).mean((3, 5)))
    v = torch.rand(4, 2, 3, 10, 10)  # leading dims kept, other sizes
    c, f = foveated_views(v, 5)
    assert c.shape == f.shape == (4, 2, 3, 5, 5)


def test_foveated_backbone_concatenates_streams():
    torch.manual_seed(0)
    bb = build_backbone("efficientnet_lite0", weights="random", foveated=True)
    full = build_backbone("efficientnet_lite0", weights="random")
    assert bb.spec["foveated"] and not full.spec["foveated"] and bb.spec != full.spec
    assert bb.spec["view_size"] == 112 and bb.feature_dim == 2560
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        f = bb(x)
        c, fo = foveated_views(x)
        assert torch.allclose(f, torch.cat([bb.net.pool(bb.net.maps(c)), bb.net.pool(bb.net.maps(fo))], 1))
        assert bb.forward_maps(x).shape == (2, 2560, 1, 1)


def test_spatial_grid_pools_last_map():
    torch.manual_seed(0)
    bb = build_backbone("efficientnet_lite0", weights="random")
    x = torch.randn(3, 1, 3, 128, 128)
    feats, grid = bb.extract(x, batch_size=2, grid=2)
    assert feats.shape == (3, 1280) and grid.shape == (3, 1280, 2, 2)
    with torch.inference_mode():
        maps = bb.forward_maps(x[:, 0])
    assert maps.shape == (3, 1280, 4, 4)
    # global average pooling of the map is the pooled feature, and the mean of the g x g cells
    assert torch.allclose(grid.mean((2, 3)), feats, atol=1e-5)
    assert torch.allclose(grid, maps.reshape(3, 1280, 2, 2, 2, 2).mean((3, 5)), atol=1e-5)
    # flipped views' maps are mirrored back before the average over views
    xf = torch.stack([x[:, 0], x[:, 0].flip(-1)], 1)
    _, g2 = bb.extract(xf, grid=4, flips=[False, True])
    with torch.inference_mode():
        m2 = bb.forward_maps(xf[:, 1])
    assert torch.allclose(g2, (maps + m2.flip(-1)) / 2, atol=1e-5)


def test_bf16_features_close_to_fp32(lite0):
    fr = np.random.default_rng(0).integers(0, 256, (2, 120, 160, 3), dtype=np.uint8)
    x = preprocess(fr, lite0.spec)[..., 48:176, 48:176]  # 128 px: bf16 may be emulated (slow) on this CPU
    f32, _ = lite0.extract(x)
    lite0.precision = "bf16"
    try:
        f16, _ = lite0.extract(x)
    finally:
        lite0.precision = "fp32"
    cos = torch.nn.functional.cosine_similarity(f32, f16, dim=1)
    assert (cos > 0.98).all(), cos


# ------------------------------------------------------------------------------ weights files and errors

def test_resnet_weights_file_round_trip(r50):
    net, path = r50
    bb = build_backbone("resnet50", weights=str(path))
    for k, v in net.state_dict().items():
        assert torch.equal(bb.net.model.state_dict()[k], v), k
    assert bb.spec["weights"] == path.name and len(bb.spec["weights_sha256"]) == 64
    assert bb.spec["mean"] == [0.485, 0.456, 0.406] and bb.spec["interpolation"] == "bilinear"
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(bb.classify(x), net(x), atol=1e-4)
        assert bb(x).shape == (1, 2048) and bb.forward_maps(x).shape == (1, 2048, 2, 2)
    flow = build_backbone("resnet50", weights=str(path), in_chans=20)
    assert torch.allclose(flow.net.model.conv1.weight[:, 7], net.conv1.weight.mean(1))
    assert flow.spec["std"] == [0.226] * 20


def test_timm_safetensors_round_trip(tmp_path):
    import timm
    from safetensors.torch import save_file
    torch.manual_seed(0)
    net = timm.create_model("resnet18", pretrained=False).eval()
    path = tmp_path / "r18.safetensors"
    save_file(net.state_dict(), str(path))
    bb = build_backbone("timm:resnet18", weights=str(path))
    assert bb.feature_dim == 512 and bb.spec["arch"] == "resnet18" and bb.spec["input_size"] == 224
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        assert torch.allclose(bb.classify(x), net(x), atol=1e-4)


def test_missing_or_wrong_weights_are_user_errors(tmp_path):
    for name in ("resnet50", "resnet101", "timm:resnet18"):
        with pytest.raises(UserError, match="weights"):
            build_backbone(name)
    with pytest.raises(UserError, match="not found"):
        build_backbone("resnet50", weights=str(tmp_path / "nope.pth"))
    with pytest.raises(UserError, match="unknown backbone"):
        build_backbone("vgg16")
    with pytest.raises(UserError):
        build_backbone("efficientnet_lite0", weights="random", in_chans=5)
    import timm
    path = tmp_path / "r18.pth"
    torch.save(timm.create_model("resnet18", pretrained=False).state_dict(), path)
    with pytest.raises(UserError, match="architecture"):
        build_backbone("resnet50", weights=str(path))


def test_download_goes_through_the_library_cache(r50, monkeypatch):
    """weights="download" asks torchvision's hub cache for the V1 file (stubbed here: tests never use a network)."""
    from pipeline import backbones
    path = r50[1]
    asked = []
    monkeypatch.setattr(backbones, "_torch_hub_file", lambda url: asked.append(url) or str(path))
    bb = build_backbone("resnet50", weights="download")
    assert asked and asked[0].endswith("resnet50-0676ba61.pth")  # IMAGENET1K_V1, the 256 / 224 recipe
    assert bb.spec["weights"] == "resnet50-0676ba61.pth"

    def offline(url):
        raise OSError("network unreachable")
    monkeypatch.setattr(backbones, "_torch_hub_file", offline)
    with pytest.raises(UserError, match="could not download"):
        build_backbone("resnet50", weights="download")


def test_store_config_says_how_test_time_views_are_combined():
    """A store's plain streams hold features averaged over the views; the papers average scores, which only a
    store that keeps every view (`--keep-views`) allows. The store says which it holds."""
    from types import SimpleNamespace

    from pipeline.backbones import view_aggregation
    from stages.extract import ExtractConfig, _Stream, store_config

    def config(**kw):
        cfg = ExtractConfig(streams=("rgb",), **kw)
        return store_config(cfg, [_Stream("rgb", SimpleNamespace(spec={}), cfg.tta, None, cfg.keep_views)], "cv2")

    assert "view_aggregation" not in config()  # one view: nothing to say, and single-view stores keep their hash
    assert view_aggregation(config()) == {"rgb": "one view (center crop)"}
    ten = config(tta="10crop", keep_views=True)
    assert ten["view_aggregation"] == {
        "rgb": "features averaged over 10 views (10crop)",
        "rgb_views": "10 views (10crop), one feature each: average scores over them with views=10"}
    assert config(tta="flip")["view_aggregation"] == {"rgb": "features averaged over 2 views (flip)"}


def test_onnx_runtime_engine_matches_torch_features(lite0):
    """ONNX Runtime runs the exported backbone to the same features (cosine >= 0.999) on real-looking frames."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from pipeline.backbones import OnnxRuntimeBackbone
    from pipeline.demo_data import render_video

    frames = render_video("BeachThenForest", seed=0, group=1, clip=1, frames=4)  # [T,H,W,3] uint8
    x = preprocess(frames, lite0.spec, tta="flip")  # [4,2,3,224,224]
    ref, _ = lite0.extract(x, batch_size=3)
    ort_bb = OnnxRuntimeBackbone(lite0, threads=1)
    got, _ = ort_bb.extract(x, batch_size=3)
    assert got.shape == ref.shape == (4, 1280)
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    assert cos.min() >= 0.999, cos
    assert ort_bb.spec["runtime"] == "onnxruntime" and ort_bb.feature_dim == lite0.feature_dim
    with pytest.raises(UserError):
        ort_bb.extract(x, grid=2)
