"""Fine-tuning the stream CNNs and the flow cache: augmentation known answers, partial
BN, cross-modality init, checkpoint round trip, resume after kill -9, refusal of mismatched flow settings, and (slow)
the fine-tuned flow stream beating its ImageNet-only initialisation on the demo's motion-direction classes.

CPU, tiny demo videos (96x72, 24 frames), 32 px crops, Farneback flow (fast, OpenCV), stacks of L = 3.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cli.main import main
from pipeline.augment import TrainAugment, color_jitter, hflip, sample_crop_box, segment_starts
from pipeline.backbones import build_backbone, file_sha256
from pipeline.demo_data import write_demo_dataset
from pipeline.errors import UserError
from pipeline.preprocess import preprocess
from stages.extract import ExtractConfig, RunOptions
from stages.finetune import (
    FinetuneConfig,
    FinetuneNet,
    FinetuneOptions,
    check_checkpoints,
    finetune,
    freeze_bn_except_first,
    read_checkpoint_record,
)
from stages.flow_cache import FlowCache, FlowCacheConfig, flow_cache

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[1]
MOTION = ["TextureLeft", "TextureRight", "TextureUp", "TextureDown"]
L = 3
FLOW = ["--flow", "farneback", "--flow-bound", "5"]  # the demo moves ~1-2 px per frame at 96 px: bound 5 keeps it visible


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """3 groups x 1 clip of the 4 motion classes: split 1 trains on groups 2-3 (one to validation)."""
    root = tmp_path_factory.mktemp("ft") / "demo"
    return write_demo_dataset(root, classes=MOTION, groups=3, clips=1, frames=24, size=(96, 72))


@pytest.fixture(scope="module")
def small_cache(small, tmp_path_factory):
    out = tmp_path_factory.mktemp("ftc") / "flow"
    main(["flow", str(small), "--out", str(out), *FLOW, "--workers", "0", "--quiet"])
    return out


@pytest.fixture(scope="module")
def flow_run(small, small_cache, tmp_path_factory):
    """One epoch of flow fine-tuning from the cache: enough for the checkpoint format."""
    out = tmp_path_factory.mktemp("ftr") / "ckpt"
    cfg = FinetuneConfig(stream="flow", epochs=1, batch_size=4, input_size=32, flow_stack=L, flip=False,
                         val_fraction=0.3)
    r = finetune(small, out, cfg, FinetuneOptions(flow_cache=str(small_cache), progress=False), log=lambda m: None)
    return out, r


# ------------------------------------------------------------------------------------------- augmentation

def test_segment_starts_known_answers():
    assert segment_starts(30, 3).tolist() == [5, 15, 25]  # centre of each segment (TSN validation)
    rng = np.random.default_rng(0)
    for _ in range(50):
        s = segment_starts(30, 3, rng)
        assert all(10 * k <= s[k] < 10 * (k + 1) for k in range(3))  # one draw inside each segment
    assert segment_starts(2, 3, rng).tolist() == [0, 1, 0]  # shorter than K: repeat from the start
    s = segment_starts(5, 3, rng)  # fewer than 2 per segment: distinct and ordered
    assert len(set(s.tolist())) == 3 and (np.diff(s) > 0).all()


def test_random_resized_crop_area_and_aspect():
    g = torch.Generator().manual_seed(0)
    areas, aspects = [], []
    for _ in range(400):
        top, left, h, w = sample_crop_box(240, 320, (0.08, 1.0), (3 / 4, 4 / 3), g)
        assert 0 <= top and top + h <= 240 and 0 <= left and left + w <= 320
        areas.append(h * w / (240 * 320))
        aspects.append(w / h)
    assert min(areas) > 0.07 and max(areas) <= 1.0 and min(areas) < 0.2 and max(areas) > 0.8
    assert min(aspects) > 0.7 and max(aspects) < 1.4
    # a frame far outside the aspect range falls back to the centre crop clamped to 4/3
    assert sample_crop_box(10, 1000, (1.0, 1.0), (3 / 4, 4 / 3), g) == (0, 493, 10, 13)


def test_flip_negates_flow_x():
    rng = np.random.default_rng(0)
    stack = torch.from_numpy(rng.integers(0, 256, size=(2, 4, 5, 6), dtype=np.uint8))  # [K, 2L=4, H, W]
    f = hflip(stack, flow=True)
    assert torch.equal(f[:, 0::2], 255 - stack[:, 0::2].flip(-1))  # x: mirrored and negated (255 - x)
    assert torch.equal(f[:, 1::2], stack[:, 1::2].flip(-1))  # y: mirrored only
    assert torch.equal(hflip(stack), stack.flip(-1))  # RGB: mirrored only
    fl = stack.float() / 255
    assert torch.allclose(hflip(fl, flow=True)[:, 0::2], 1 - fl[:, 0::2].flip(-1))
    # through the training transform: whole-frame box (scale 1, the frame's own aspect), no resize
    aug = TrainAugment(size=5, mean=(0.0,) * 4, std=(1.0,) * 4, modality="flow", scale=(1.0, 1.0),
                       ratio=(6 / 5, 6 / 5), jitter=0.4)
    frames = stack[..., :5].permute(0, 2, 3, 1).contiguous()  # [K, 5, 5, 4] uint8
    plain = frames.permute(0, 3, 1, 2).float() / 255
    outs = [aug(frames, torch.Generator().manual_seed(s)) for s in range(8)]
    flipped = [o for o in outs if not torch.allclose(o, plain)]
    assert 0 < len(flipped) < 8  # flips happen about half the time; flow gets no colour jitter
    for o in flipped:
        assert torch.allclose(o[:, 0::2], 1 - plain[:, 0::2].flip(-1), atol=1e-6)
        assert torch.allclose(o[:, 1::2], plain[:, 1::2].flip(-1), atol=1e-6)


def test_colour_jitter_only_for_rgb_and_in_range():
    x = torch.rand(3, 3, 8, 8)
    g = torch.Generator().manual_seed(1)
    y = color_jitter(x, 0.4, 0.4, 0.4, g)
    assert y.shape == x.shape and y.min() >= 0 and y.max() <= 1 and not torch.allclose(x, y)
    grey = torch.full((1, 3, 4, 4), 0.5)
    assert torch.allclose(color_jitter(grey, 0.0, 0.4, 0.4, g), grey)  # contrast/saturation leave grey alone
    rgb = TrainAugment(size=8, mean=(0.0,) * 3, std=(1.0,) * 3, scale=(1.0, 1.0), ratio=(1.0, 1.0), flip=False)
    frames = (x.permute(0, 2, 3, 1) * 255).round().to(torch.uint8)
    assert not torch.allclose(rgb(frames, torch.Generator().manual_seed(0)), frames.permute(0, 3, 1, 2) / 255)


# ------------------------------------------------------------------------------------ network and partial BN

def test_cross_modality_init_and_consensus_shapes():
    rgb = build_backbone("efficientnet_lite0")
    flow = build_backbone("efficientnet_lite0", in_chans=2 * L)
    w_rgb, w_flow = rgb.net.model.conv_stem.weight, flow.net.model.conv_stem.weight
    assert w_rgb.shape == (32, 3, 3, 3) and w_flow.shape == (32, 2 * L, 3, 3)
    for c in range(2 * L):
        assert torch.allclose(w_flow[:, c], w_rgb.mean(1))  # RGB filter averaged, replicated over 2L channels
    assert torch.equal(flow.net.model.blocks[1][0].conv_pw.weight, rgb.net.model.blocks[1][0].conv_pw.weight)
    net = FinetuneNet(flow, num_classes=4, dropout=0.5).eval()
    x = torch.randn(2, 3, 2 * L, 32, 32)  # [B, K segments, 2L, S, S]
    out = net(x)
    assert out.shape == (2, 4)
    per_snippet = net.fc(net.backbone(x.flatten(0, 1))).view(2, 3, 4)
    assert torch.allclose(out, per_snippet.mean(1), atol=1e-6)  # segmental consensus = average of the scores


def test_partial_bn_freezes_every_bn_but_the_first():
    net = FinetuneNet(build_backbone("timm:resnet10t", weights="random"), num_classes=3, partial_bn=True)
    net.train()
    bns = [m for m in net.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    assert bns[0].training and bns[0].weight.requires_grad
    assert all(not m.training and not m.weight.requires_grad for m in bns[1:])
    before = [m.running_mean.clone() for m in bns]
    net(torch.randn(2, 3, 3, 32, 32) * 3 + 1)
    assert not torch.equal(bns[0].running_mean, before[0])  # the first layer adapts its statistics
    assert all(torch.equal(m.running_mean, b) for m, b in zip(bns[1:], before[1:]))  # the rest keep ImageNet's
    assert len(freeze_bn_except_first(torch.nn.Sequential(torch.nn.BatchNorm2d(2)))) == 0


# ----------------------------------------------------------------------------------------------- flow cache

def test_flow_cache_resumes_and_refuses_other_settings(small, small_cache, tmp_path, run_cli):
    cache = FlowCache(small_cache)
    assert cache.flow["method"] == "farneback" and cache.flow["bound"] == 5.0
    assert cache.flow["params"]["winsize"] == 15  # every parameter recorded, not only overrides
    vid = "TextureLeft/v_TextureLeft_g01_c01.avi"
    st = cache.stacks(vid, [0, 22], L)  # the second stack runs past the last pair: repeats pair 22
    assert st.shape == (2, 2 * L, 72, 96) and st.dtype == np.uint8
    assert np.array_equal(st[1, 2:4], st[1, 4:6])
    assert st[:, 0::2].mean() < 126 and abs(st[:, 1::2].mean() - 128) < 2  # leftward motion: x < 0, y ~ 0
    # resumable: a run limited to 3 videos, then the rest; a stale partial is cleaned up
    out = tmp_path / "flow"
    opts = RunOptions(workers=0, progress=False, limit=3)
    s1 = flow_cache(small, out, FlowCacheConfig("farneback", bound=5), opts)
    (out / "videos" / "TextureUp").mkdir(parents=True, exist_ok=True)
    (out / "videos" / "TextureUp" / "x.avi.h5.partial").write_bytes(b"junk")
    s2 = flow_cache(small, out, FlowCacheConfig("farneback", bound=5), RunOptions(workers=0, progress=False))
    assert (s1.done, s2.skipped, s2.done) == (3, 3, 9)
    assert not list(out.rglob("*.partial"))
    a = FlowCache(out).stacks(vid, [4], L)
    assert np.array_equal(a, cache.stacks(vid, [4], L))  # same settings, same images
    code, text = run_cli("flow", small, "--out", out, "--flow", "farneback", "--flow-bound", "20", "--quiet")
    assert code == 2 and "bound 5" in text and "bound 20" in text and len(text.strip().splitlines()) == 1


def test_flow_on_the_fly_equals_cache_and_extraction(small, small_cache):
    """Three ways to the same flow stacks: the cache, fine-tuning's on-the-fly path, extraction's worker."""
    from pipeline.datasets import load_manifest
    from pipeline.video import decode
    from stages.extract import flow_stacks_for
    from stages.finetune import _CachedFlow, _LiveFlow

    v = load_manifest(small).by_id()["TextureDown/v_TextureDown_g02_c01.avi"]
    flow = {"method": "farneback", "params": FlowCache(small_cache).flow["params"], "bound": 5.0}
    starts = np.array([0, 9, 20])
    live = _LiveFlow("decord", flow, L).read(v, starts)
    cached = _CachedFlow(str(small_cache), L).read(v, starts)
    assert live.shape == (3, 72, 96, 2 * L) and np.array_equal(live, cached)
    frames = decode(v.path, "decord").frames
    ext = flow_stacks_for(frames, starts, {**flow, "stack": L, "device": "cpu"})  # [T, 2L, H, W]
    assert np.array_equal(ext.transpose(0, 2, 3, 1), cached)
    assert _LiveFlow("decord", flow, L).positions(v) == 24 - L


# ------------------------------------------------------------------------------------------------ the stage

def test_checkpoint_round_trips_through_build_backbone(flow_run, small, small_cache):
    out, r = flow_run
    assert r.complete and r.checkpoint == out / "flow.safetensors" and len(r.history) == 1
    rec = read_checkpoint_record(r.checkpoint)
    assert rec["stream"] == "flow" and rec["backbone"] == "efficientnet_lite0" and rec["classes"] == MOTION
    assert rec["flow"]["method"] == "farneback" and rec["flow"]["bound"] == 5.0 and rec["flow"]["stack"] == L
    assert rec["flow"]["params"]["poly_n"] == 5 and rec["input_size"] == 32
    summary = json.loads((out / "flow.json").read_text())
    assert summary["complete"] and summary["history"][0]["epoch"] == 1
    # extraction's loader takes the file as is: same tensors, and the spec names the file and its hash
    bb = build_backbone("efficientnet_lite0", str(r.checkpoint), in_chans=2 * L)
    from safetensors.torch import load_file

    sd = load_file(str(r.checkpoint))
    assert all(torch.equal(v, sd[k]) for k, v in bb.net.model.state_dict().items())
    init = build_backbone("efficientnet_lite0", in_chans=2 * L)
    assert not torch.equal(bb.net.model.conv_stem.weight, init.net.model.conv_stem.weight)  # it was trained
    assert bb.spec["weights"] == "flow.safetensors" and bb.spec["weights_sha256"] == file_sha256(r.checkpoint)
    # resume points hold the dataset classifier and SGD momentum
    ep = sorted((out / "flow.epochs").glob("epoch_*.safetensors"))
    keys = load_file(str(ep[-1])).keys()
    assert "model.fc.weight" in keys and any(k.startswith("optim.") and k.endswith("momentum_buffer") for k in keys)
    # a rerun is idempotent; another config in the same folder is refused
    again = finetune(small, out, FinetuneConfig(stream="flow", epochs=1, batch_size=4, input_size=32, flow_stack=L,
                                                flip=False, val_fraction=0.3),
                     FinetuneOptions(flow_cache=str(small_cache), progress=False), log=lambda m: None)
    assert again.resumed_from == 1 and len(again.history) == 1
    with pytest.raises(UserError, match="another config"):
        finetune(small, out, FinetuneConfig(stream="flow", epochs=1, batch_size=4, input_size=32, flow_stack=L,
                                            flip=False, val_fraction=0.3, lr=0.1),
                 FinetuneOptions(flow_cache=str(small_cache), progress=False), log=lambda m: None)


def test_extract_refuses_flow_checkpoint_with_other_flow_settings(flow_run, small, tmp_path, run_cli):
    ckpt = flow_run[0] / "flow.safetensors"
    base = ["extract", small, "--out", tmp_path / "store", "--streams", "flow", "--flow-checkpoint", ckpt,
            "--flow-stack", L, "--frames", 2, "--quiet", "--workers", 0]
    code, text = run_cli(*base, "--flow", "tvl1", "--flow-bound", "5")
    assert code == 2, text
    line = text.strip().splitlines()
    assert len(line) == 1 and "flow.safetensors" in line[0] and "farneback" in line[0] and "tvl1" in line[0]
    code, text = run_cli(*base, "--flow", "farneback", "--flow-bound", "20")
    assert code == 2 and "bound 5" in text and "bound 20" in text
    code, text = run_cli(*base, "--flow", "farneback", "--flow-bound", "5", "--flow-param", "winsize=9")
    assert code == 2 and "winsize=15" in text and "winsize=9" in text
    assert not (tmp_path / "store").exists()  # refused before anything was written
    # the matching settings pass the guard; so does a weights file that is not a fine-tuning checkpoint
    ok = ExtractConfig(streams=("flow",), flow_weights=str(ckpt), flow_method="farneback", flow_bound=5.0,
                       flow_stack=L)
    check_checkpoints(ok)
    with pytest.raises(UserError, match="stack|L=3"):
        check_checkpoints(ExtractConfig(streams=("flow",), flow_weights=str(ckpt), flow_method="farneback",
                                        flow_bound=5.0, flow_stack=10))
    with pytest.raises(UserError, match="backbone"):
        check_checkpoints(ExtractConfig(streams=("flow",), flow_weights=str(ckpt), backbone="resnet50",
                                        flow_method="farneback", flow_bound=5.0, flow_stack=L))
    check_checkpoints(ExtractConfig(streams=("flow",), flow_weights=str(tmp_path / "other.pth")))


def test_checkpoint_records_its_videos_and_stage_two_refuses_the_other_splits(flow_run, small, tmp_path, run_cli):
    """A real fine-tuning run on split 1 records the videos it trained and validated on; a store extracted with it
    carries that record; `train` on split 2 (whose test group the CNN trained on) is refused in one line, split 1
    trains, and holds out for validation and the fusion fold only videos the CNN did not train on."""
    from pipeline.datasets import load_manifest
    from pipeline.provenance import PROVENANCE_FILE
    from pipeline.store import FeatureStore

    ckpt = flow_run[0] / "flow.safetensors"
    rec = read_checkpoint_record(ckpt)
    manifest = load_manifest(small)
    train_ids, test_ids = ({v.id for v in part} for part in manifest.split(1))
    seen_train, seen_val = set(rec["seen"]["train"]), set(rec["seen"]["val"])
    assert rec["split"] == 1 and rec["dataset"] == manifest.fingerprint()
    assert seen_train | seen_val == train_ids and not seen_train & seen_val and seen_val
    assert not (seen_train | seen_val) & test_ids  # its own split's test videos were never read
    store = tmp_path / "store"
    code, text = run_cli("extract", small, "--out", store, "--streams", "flow", "--flow-checkpoint", ckpt,
                         "--flow", "farneback", "--flow-bound", "5", "--flow-stack", L, "--frames", 2, "--quiet",
                         "--workers", 0)
    assert code == 0, text
    ft = FeatureStore.open(store).config["finetuned"]["flow"]
    assert ft["split"] == 1 and ft["checkpoint"] == "flow.safetensors" and ft["n_train"] == len(seen_train)
    lists = json.loads((store / PROVENANCE_FILE).read_text())
    assert set(lists["flow"]["train"]) == seen_train
    runs = tmp_path / "runs"
    common = ["--dataset", small, "--head", "temporal-pool", "--set", "epochs=1", "frames=2", "--out", runs, "--quiet"]
    code, text = run_cli("train", store, "--split", 2, *common)
    lines = text.strip().splitlines()
    assert code == 2 and len(lines) == 1, text
    n_test = len(manifest.split(2)[1])
    assert (f"stream flow's CNN (flow.safetensors) was fine-tuned on split 1 and saw {n_test} of the {n_test} test "
            "videos of split 2") in lines[0]
    assert not runs.exists()
    code, text = run_cli("train", store, "--split", 1, *common)
    assert code == 0, text
    (run,) = [p for p in runs.iterdir() if not p.name.startswith(".")]  # not the run lock
    for part in ("val", "fusion"):
        with np.load(run / f"scores_{part}.npz", allow_pickle=False) as z:
            assert not set(z["ids"].tolist()) & seen_train, part
    with np.load(run / "scores_fusion.npz", allow_pickle=False) as z:
        assert len(z["ids"]) > 0


def test_checkpoint_without_its_videos_is_refused_by_extraction_and_completed_by_a_rerun(flow_run, small,
                                                                                           small_cache, tmp_path):
    """A checkpoint written before checkpoints recorded their videos cannot be checked: extraction refuses it; the
    same `finetune` rerun into its folder adds the record and leaves the weights as they were."""
    import shutil

    from safetensors.torch import load_file, save_file

    from stages.finetune import checkpoint_provenance

    out = tmp_path / "ckpt"
    shutil.copytree(flow_run[0], out)
    ckpt = out / "flow.safetensors"
    rec = read_checkpoint_record(ckpt)
    old = {k: v for k, v in rec.items() if k not in ("seen", "split")}
    tensors = load_file(str(ckpt))
    save_file(tensors, str(ckpt), metadata={"twostream": json.dumps(old)})
    cfg = ExtractConfig(streams=("flow",), flow_weights=str(ckpt), flow_method="farneback", flow_bound=5.0,
                        flow_stack=L)
    with pytest.raises(UserError, match="does not record the videos it was trained on"):
        checkpoint_provenance(cfg)
    finetune(small, out, FinetuneConfig(stream="flow", epochs=1, batch_size=4, input_size=32, flow_stack=L,
                                        flip=False, val_fraction=0.3),
             FinetuneOptions(flow_cache=str(small_cache), progress=False), log=lambda m: None)
    assert read_checkpoint_record(ckpt)["seen"] == rec["seen"]
    again = load_file(str(ckpt))
    assert all(torch.equal(again[k], v) for k, v in tensors.items())
    summary, lists = checkpoint_provenance(cfg)
    assert summary["flow"]["split"] == 1 and lists["flow"]["train"] == rec["seen"]["train"]


def test_resume_after_kill_equals_uninterrupted_run(small, tmp_path):
    """kill -9 after epoch 1, resume: the epoch-3 weights equal those of a run that was never interrupted."""
    args = ["--stream", "rgb", "--backbone", "timm:resnet10t", "--weights", "random", "--batch-size", "2",
            "--input-size", "32", "--lr", "0.01", "--val-fraction", "0.3", "--quiet", "--keep-last", "5"]
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    p = subprocess.Popen([sys.executable, "-m", "cli.main", "finetune", str(small), "--out", str(killed),
                          "--epochs", "50", *args], env=env, cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT)
    first = killed / "rgb.epochs" / "epoch_0001.safetensors"
    deadline = time.time() + 240
    while not first.exists() and p.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert first.exists(), p.stdout.read().decode()[-2000:]
    done = sorted(int(f.stem.split("_")[1]) for f in (killed / "rgb.epochs").glob("epoch_*.safetensors"))
    assert done[-1] < 3
    cfg = FinetuneConfig(stream="rgb", backbone="timm:resnet10t", weights="random", epochs=3, batch_size=2,
                         input_size=32, lr=0.01, val_fraction=0.3)
    logs: list[str] = []
    resumed = finetune(small, killed, cfg, FinetuneOptions(progress=False, keep_last=5), log=logs.append)
    assert resumed.resumed_from == done[-1] and any("resuming" in m for m in logs)
    fresh = finetune(small, tmp_path / "fresh", cfg, FinetuneOptions(progress=False, keep_last=5),
                     log=lambda m: None)
    from safetensors.torch import load_file

    a = load_file(str(killed / "rgb.epochs" / "epoch_0003.safetensors"))
    b = load_file(str(tmp_path / "fresh" / "rgb.epochs" / "epoch_0003.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-6, rtol=1e-5), k
    assert [round(h["train_loss"], 5) for h in resumed.history] == [round(h["train_loss"], 5) for h in fresh.history]


# ------------------------------------------------------------------------------------------ learning (slow)

def _probe_features(bb, cache: FlowCache, items, size: int) -> np.ndarray:
    """Video features: mean of the backbone's features at 5 centred stacks (centre crop at ``size``)."""
    spec = {**bb.spec, "input_size": size, "resize": size}
    out = []
    for v in items:
        n = cache.n_frames(v.id)
        raw = cache.stacks(v.id, segment_starts(n - L, 5), L).transpose(0, 2, 3, 1)  # [5, H, W, 2L]
        with torch.no_grad():
            out.append(bb(preprocess(raw, spec)[:, 0]).mean(0).numpy())  # [5, D] -> [D]
    return np.stack(out)


@pytest.mark.slow
def test_finetuned_flow_stream_beats_imagenet_init_on_motion_direction(tmp_path, run_cli):
    """Linear probe (logistic regression) on video features of split 1: fine-tuned flow CNN vs its init.

    Cross-modality init gives every flow channel the same filter, so x and y motion look alike to the ImageNet
    network (Left ~ Up, Right ~ Down); fine-tuning must learn to tell them apart. No flips: mirroring turns
    TextureLeft into TextureRight, so the augmentation would teach the wrong label on this demo.
    """
    from sklearn.linear_model import LogisticRegression

    from pipeline.datasets import load_manifest

    root = write_demo_dataset(tmp_path / "demo", classes=MOTION, groups=6, clips=2, frames=24, size=(96, 72))
    cache_dir = tmp_path / "flow"
    assert run_cli("flow", root, "--out", cache_dir, *FLOW, "--workers", "0", "--quiet")[0] == 0
    cfg = FinetuneConfig(stream="flow", epochs=10, batch_size=8, input_size=32, flow_stack=L, flip=False,
                         lr=0.01, partial_bn=False, dropout=0.0, val_fraction=0.25)
    r = finetune(root, tmp_path / "ckpt", cfg, FinetuneOptions(flow_cache=str(cache_dir), progress=False),
                 log=lambda m: None)
    cache = FlowCache(cache_dir)
    train, test = load_manifest(root).split(1)
    y_tr, y_te = np.array([v.label for v in train]), np.array([v.label for v in test])
    acc = {}
    for name, weights in (("init", None), ("finetuned", str(r.checkpoint))):
        bb = build_backbone("efficientnet_lite0", weights, in_chans=2 * L)
        x_tr, x_te = _probe_features(bb, cache, train, 32), _probe_features(bb, cache, test, 32)
        mu, sd = x_tr.mean(0), x_tr.std(0) + 1e-6
        clf = LogisticRegression(max_iter=2000, C=1.0).fit((x_tr - mu) / sd, y_tr)
        acc[name] = float((clf.predict((x_te - mu) / sd) == y_te).mean())
    print(f"linear probe accuracy on split 1 test videos: {acc}")
    assert acc["finetuned"] >= 0.75 and acc["finetuned"] >= acc["init"] + 0.2, (acc, r.history)
