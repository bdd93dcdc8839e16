"""Stage two: data (join, validation by group, sampling, masks), trainer, run directories and the CLI.

Everything runs on a tiny synthetic store (3 classes, rgb 6 + flow 4 dims) and a UCF101-layout dataset with
empty video files; the heads are test-only heads registered here, so the machinery is tested independently
of the paper heads (which have their own tests).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from torch import nn

from pipeline.datasets import VideoItem, load_manifest
from pipeline.errors import UserError
from pipeline.features import VideoFeatures, carve_validation, collate, join, sample_frames, video_level
from pipeline.heads.base import Head, masked_mean
from pipeline.registry import HEADS, RegistryError
from pipeline.runs import COMPLETE, config_hash
from pipeline.store import FeatureStore
from pipeline.training import build_head, fit, predict, resolve_configs
from tests.synthetic import write_ucf_store

torch.set_num_threads(1)

CLASSES = ["Alpha", "Beta", "Gamma"]
RGB, FLOW = 6, 4


# ---------------------------------------------------------------------------------------------- test heads


@dataclass(frozen=True)
class MeanLinearConfig:
    """Test head: masked mean over frames, then dropout and a linear layer."""

    dropout: float = 0.2
    train_defaults: ClassVar[dict] = {"optimizer": "adam", "lr": 0.05, "epochs": 30, "batch_size": 8, "frames": 0}


class MeanLinear(Head):
    def __init__(self, cfg, input_dim, num_classes):
        super().__init__()
        self.drop = nn.Dropout(cfg.dropout)
        self.fc = nn.Linear(input_dim, num_classes)
        self.seen_masks: list = []

    def forward(self, x, mask=None):
        self.seen_masks.append(None if mask is None else mask.clone())
        return self.fc(self.drop(masked_mean(x, mask)))  # [B,T,D] -> [B,D] -> [B,C]


if "test-mean-linear" not in HEADS:

    @HEADS.register("test-mean-linear", MeanLinearConfig)
    def _build_mean_linear(cfg, input_dim, num_classes, stream_dims):
        """Test head: masked mean + linear."""
        return MeanLinear(cfg, input_dim, num_classes)


@dataclass(frozen=True)
class CentroidConfig:
    """Test sklearn head: nearest class mean (decision = minus squared distance)."""

    shrink: float = 0.0


class Centroid:
    def __init__(self, shrink=0.0):
        self.shrink = shrink

    def fit(self, X, y):
        self.means_ = np.stack([X[y == c].mean(0) for c in range(int(y.max()) + 1)])
        return self

    def decision_function(self, X):
        return -((X[:, None, :] - self.means_[None]) ** 2).sum(-1)


if "test-centroid" not in HEADS:

    @HEADS.register("test-centroid", CentroidConfig, kind="sklearn")
    def _build_centroid(cfg, input_dim, num_classes, stream_dims):
        """Test sklearn head."""
        return Centroid(cfg.shrink)


# ---------------------------------------------------------------------------------------------- fixtures


def make_dataset(tmp_path, groups=7, clips=2, skip_in_store=()):
    """Synthetic UCF101-layout dataset and store (tests/synthetic.py): 8-14 frames per video, split 1 only."""
    return write_ucf_store(tmp_path, CLASSES, groups=groups, clips=clips, T=(8, 15), dims=(RGB, FLOW),
                           skip_in_store=skip_in_store, frame_step=3)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds"))


def _items(n_groups=10, clips=3, classes=2):
    return [VideoItem(f"C{c}/v_C{c}_g{g:02d}_c{k}.avi", None, c, f"C{c}_g{g:02d}")
            for c in range(classes) for g in range(n_groups) for k in range(clips)]


# ---------------------------------------------------------------------------------------------- data


def test_sample_frames_equally_spaced():
    np.testing.assert_array_equal(sample_frames(25, 25), np.arange(25))
    np.testing.assert_array_equal(sample_frames(100, 5), [0, 25, 50, 74, 99])  # round(linspace(0, 99, 5))
    np.testing.assert_array_equal(sample_frames(3, 5), [0, 0, 1, 2, 2])  # fewer stored than asked: repeats
    np.testing.assert_array_equal(sample_frames(7, 0), np.arange(7))  # 0: every stored frame
    s = sample_frames(250, 25)
    assert s[0] == 0 and s[-1] == 249 and np.ptp(np.diff(s)) <= 1


def test_validation_is_carved_by_group_and_never_straddles():
    items = _items()
    for seed in range(5):
        train, val = carve_validation(items, 0.2, seed)
        assert len(train) + len(val) == len(items)
        assert {it.group for it in train}.isdisjoint({it.group for it in val})
        for c in (0, 1):  # every class gets about 20% (2 of its 10 groups), and keeps training groups
            assert sum(it.label == c for it in val) == 6
    a, b = carve_validation(items, 0.2, 0)[1], carve_validation(items, 0.2, 0)[1]
    assert [it.id for it in a] == [it.id for it in b]  # seeded
    assert {it.group for it in carve_validation(items, 0.2, 1)[1]} != {it.group for it in a}
    assert carve_validation(items, 0.0, 0) == (items, [])


def test_join_reports_missing_videos_or_skips_them():
    items = _items(n_groups=2, clips=1)
    have = {it.id for it in items[1:]}
    with pytest.raises(UserError, match=r"1 of 4 videos .* not in the feature store .*--allow-missing"):
        join(items, have)
    with pytest.warns(UserWarning, match="skipped"):
        assert join(items, have, allow_missing=True) == items[1:]


def test_collate_pads_and_masks():
    xs = [(torch.ones(3, 2), 0), (2 * torch.ones(5, 2), 1)]
    x, mask, y = collate(xs)
    assert x.shape == (2, 5, 2) and mask.shape == (2, 5)
    assert mask.tolist() == [[True] * 3 + [False] * 2, [True] * 5]
    assert x[0, 3:].abs().sum() == 0 and torch.equal(y, torch.tensor([0, 1]))
    x, mask, _ = collate([(torch.ones(4, 2), 0), (torch.ones(4, 2), 1)])
    assert mask is None and x.shape == (2, 4, 2)  # equal lengths: no mask


def test_features_streams_fixed_and_variable_in_memory_and_streamed(dataset):
    _, store_path = dataset
    store = FeatureStore.open(store_path)
    ids = store.ids()[:5]
    labels = [0] * 5
    fixed = VideoFeatures(store, ids, labels, ("rgb", "flow"), frames=4)
    assert fixed.in_memory and fixed.stream_dims == (RGB, FLOW) and fixed.dim == RGB + FLOW
    x, mask, _ = fixed.batch(range(5))
    assert x.shape == (5, 4, RGB + FLOW) and x.dtype == torch.float16 and mask is None
    raw = np.concatenate([store.get(ids[1], "rgb"), store.get(ids[1], "flow")], axis=1)
    np.testing.assert_array_equal(x[1].numpy(), raw[sample_frames(len(raw), 4)])
    streamed = VideoFeatures(store, ids, labels, ("rgb", "flow"), frames=4, memory_gb=0)
    assert not streamed.in_memory
    assert torch.equal(streamed.batch(range(5))[0], x)
    var = VideoFeatures(store, ids, labels, ("flow",), frames=0)
    xv, mv, _ = var.batch(range(5))
    lengths = [len(store.get(i, "flow")) for i in ids]
    assert xv.shape == (5, max(lengths), FLOW) and mv.sum(1).tolist() == lengths
    var_streamed = VideoFeatures(store, ids, labels, ("flow",), frames=0, in_memory=False)
    assert torch.equal(var_streamed.batch(range(5))[0], xv)
    np.testing.assert_allclose(video_level(var)[2], store.get(ids[2], "flow").astype(np.float32).mean(0), rtol=1e-3)
    with pytest.raises(UserError, match="no stream 'depth'"):
        VideoFeatures(store, ids, labels, ("depth",))


# ---------------------------------------------------------------------------------------------- configs


def test_resolve_configs_layers_defaults_and_overrides():
    head_cfg, cfg = resolve_configs("test-mean-linear", {"dropout": "0.5", "lr": "0.01", "schedule": "cosine"}, seed=3)
    assert head_cfg.dropout == 0.5
    assert cfg.lr == 0.01 and cfg.epochs == 30 and cfg.frames == 0 and cfg.schedule == "cosine" and cfg.seed == 3
    _, cfg = resolve_configs("test-mean-linear", {"train.seed": "7", "head.dropout": "0"})
    assert cfg.seed == 7


@pytest.mark.parametrize("overrides, message", [
    ({"hidden": "3"}, r"unknown key 'hidden'.*head keys: dropout.*train keys: recipe, optimizer, lr"),
    ({"lr": "fast"}, r"cannot read 'fast' as float"),
    ({"optimizer": "rmsprop"}, r"invalid train setting optimizer"),
    ({"train.dropout": "1"}, r"no train key 'dropout'"),
])
def test_set_validation_errors(overrides, message):
    with pytest.raises(RegistryError, match=message):
        resolve_configs("test-mean-linear", overrides)


def test_config_hash_is_stable_and_sensitive():
    a = {"head": "x", "train": {"lr": 1e-4, "seed": 0}}
    assert config_hash(a) == config_hash({"train": {"seed": 0, "lr": 1e-4}, "head": "x"}) and len(config_hash(a)) == 12
    assert config_hash(a) != config_hash({"head": "x", "train": {"lr": 1e-4, "seed": 1}})


# ---------------------------------------------------------------------------------------------- trainer


def _fit_once(store, train_ids, train_y, val_ids, val_y, **over):
    head_cfg, cfg = resolve_configs("test-mean-linear", {"recipe": "paper", "epochs": 6, **over})
    tr = VideoFeatures(store, train_ids, train_y, ("rgb",), frames=cfg.frames)
    va = VideoFeatures(store, val_ids, val_y, ("rgb",), frames=cfg.frames)
    head = build_head("test-mean-linear", head_cfg, tr.dim, 3, tr.stream_dims, cfg.seed)
    out = fit(head, tr, va, cfg, torch.device("cpu"), progress=False)
    return head, out, predict(head, va, torch.device("cpu"))


def _split_ids(dataset):
    root, store_path = dataset
    manifest = load_manifest(root)
    train, test = manifest.split(1)
    return FeatureStore.open(store_path), train, test


def test_fit_learns_is_deterministic_and_keeps_best_epoch(dataset):
    store, train, test = _split_ids(dataset)
    args = (store, [i.id for i in train], [i.label for i in train], [i.id for i in test], [i.label for i in test])
    head, out, scores = _fit_once(*args)
    acc = [r["val_accuracy"] for r in out["history"]]
    assert out["best_val_accuracy"] == max(acc) and out["best_epoch"] == 1 + acc.index(max(acc))
    assert (scores.argmax(1) == np.array(args[4])).mean() == out["best_val_accuracy"] > 0.8  # well above 1/3
    assert any(m is not None and not m.all() for m in head.seen_masks)  # variable length reached the head masked
    _, out2, scores2 = _fit_once(*args)
    assert np.array_equal(scores, scores2)  # bitwise
    assert [r["train_loss"] for r in out["history"]] == [r["train_loss"] for r in out2["history"]]
    _, out3, _ = _fit_once(*args, seed="1")
    assert [r["train_loss"] for r in out3["history"]] != [r["train_loss"] for r in out["history"]]


def test_early_stopping_stops_after_patience(dataset):
    store, train, test = _split_ids(dataset)
    args = (store, [i.id for i in train], [i.label for i in train], [i.id for i in test], [i.label for i in test])
    _, out, _ = _fit_once(*args, epochs="40", patience="2", lr="0.3")
    assert out["epochs_run"] == out["best_epoch"] + 2 < 40


@pytest.mark.parametrize("schedule, want", [("step", [0.1, 0.1, 0.01, 0.01]), ("cosine", None)])
def test_lr_schedules(dataset, schedule, want):
    store, train, test = _split_ids(dataset)
    args = (store, [i.id for i in train], [i.label for i in train], [i.id for i in test], [i.label for i in test])
    _, out, _ = _fit_once(*args, epochs="4", patience="0", lr="0.1", schedule=schedule, step_size="2")
    lrs = [r["lr"] for r in out["history"]]
    if want:
        assert lrs == pytest.approx(want)
    else:
        assert lrs[0] == pytest.approx(0.1) and lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.1


# ---------------------------------------------------------------------------------------------- stage and runs


def test_stage_writes_complete_run_and_rerun_does_no_work(dataset, tmp_path, monkeypatch):
    import stages.train as st

    root, store_path = dataset
    job = st.TrainJob(store=str(store_path), dataset=str(root), head="test-mean-linear", streams=("rgb", "flow"),
                      overrides=(("recipe", "paper"), ("epochs", "3")), out=str(tmp_path / "runs"))
    res = st.train(job, progress=False, echo=lambda m: None)
    assert not res.cached and res.path.name.startswith("test-mean-linear-")
    files = {p.name for p in res.path.iterdir()}
    assert files == {"config.json", "weights.safetensors", "metrics.json", "scores_val.npz", "scores_fusion.npz",
                     "extraction.json",
                     "scores_test.npz", "train_log.jsonl", "learning_curve.png", "confusion.png", COMPLETE}
    m = json.loads((res.path / "metrics.json").read_text())
    for key in ("accuracy", "hit@1", "hit@5", "map", "per_class_ap", "per_class_accuracy", "n_test", "fit_seconds",
                "params"):
        assert key in m
    assert set(m["per_class_ap"]) == set(CLASSES) and m["n_test"] == 3 * 2 * 2 and m["params"] == (RGB + FLOW) * 3 + 3
    assert m["n_train"] + m["n_val"] + m["n_fusion"] == 3 * 5 * 2 and m["n_val"] > 0 and m["n_fusion"] > 0
    log = [json.loads(line) for line in (res.path / "train_log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2, 3]
    test_npz = np.load(res.path / "scores_test.npz", allow_pickle=False)
    assert test_npz["scores"].shape == (12, 3) and list(test_npz["classes"]) == CLASSES
    val_npz = np.load(res.path / "scores_val.npz", allow_pickle=False)
    assert set(val_npz["ids"]).isdisjoint(test_npz["ids"]) and len(val_npz["ids"]) == m["n_val"]
    from safetensors.torch import load_file

    assert set(load_file(res.path / "weights.safetensors")) == {"fc.weight", "fc.bias"}
    assert json.loads((res.path / "config.json").read_text())["streams"] == ["rgb", "flow"]

    # The same config again: no data is loaded, nothing is written.
    monkeypatch.setattr(st, "VideoFeatures", lambda *a, **k: pytest.fail("a cached run loaded features"))
    messages = []
    mtime = (res.path / "metrics.json").stat().st_mtime_ns
    again = st.train(job, progress=False, echo=messages.append)
    assert again.cached and again.path == res.path and again.metrics == m
    assert messages == [f"cached: {res.path}: accuracy {100 * m['accuracy']:.2f}  hit@5 {100 * m['hit@5']:.2f}  "
                        f"mAP {100 * m['map']:.2f}  GAP@20 {100 * m['gap@20']:.2f}  ({m['n_test']} test videos, "
                        f"best epoch {m['best_epoch']}, "
                        f"{m['recipe']} recipe, stopped: {m['stop_reason']}"
                        + (", did not learn" if m["did_not_learn"] else "") + ")"]
    assert (res.path / "metrics.json").stat().st_mtime_ns == mtime
    # A different seed is a different run.
    with pytest.raises(pytest.fail.Exception):
        st.train(dataclasses.replace(job, seed=1), progress=False, echo=lambda m: None)


def test_stage_redoes_an_unfinished_run_and_fits_sklearn_heads(dataset, tmp_path):
    import stages.train as st

    root, store_path = dataset
    job = st.TrainJob(store=str(store_path), dataset=str(root), head="test-centroid", streams=("rgb",),
                      out=str(tmp_path / "runs"))
    res = st.train(job, progress=False, echo=lambda m: None)
    assert res.metrics["accuracy"] > 0.8 and (res.path / "weights.npz").is_file()
    w = np.load(res.path / "weights.npz", allow_pickle=False)
    assert w["means_"].shape == (3, RGB) and res.metrics["params"] == 3 * RGB
    (res.path / COMPLETE).unlink()  # as if killed before the end
    (res.path / "stale.txt").write_text("left by the killed run")
    res2 = st.train(job, progress=False, echo=lambda m: None)
    assert not res2.cached and (res2.path / COMPLETE).is_file() and not (res2.path / "stale.txt").exists()


def test_stage_missing_videos(tmp_path):
    import stages.train as st

    root, store_path = make_dataset(tmp_path, groups=4, clips=1, skip_in_store=("Beta/v_Beta_g03_c01.avi",))
    job = st.TrainJob(store=str(store_path), dataset=str(root), head="test-centroid", out=str(tmp_path / "runs"))
    with pytest.raises(UserError, match="1 of 6 videos of the training list"):
        st.train(job, progress=False, echo=lambda m: None)
    with pytest.warns(UserWarning, match="skipped"):
        res = st.train(dataclasses.replace(job, allow_missing=True), progress=False, echo=lambda m: None)
    assert res.metrics["n_train"] + res.metrics["n_val"] + res.metrics["n_fusion"] == 5


# ---------------------------------------------------------------------------------------------- CLI


def test_cli_end_to_end_splits_cached_and_errors(dataset, tmp_path):
    from cli.main import cli

    root, store_path = dataset
    # a second split (same lists) so that --splits has something to average
    for kind in ("train", "test"):
        (root / "splits" / f"{kind}list02.txt").write_text((root / "splits" / f"{kind}list01.txt").read_text())
    out = tmp_path / "runs"
    args = ["train", str(store_path), "--dataset", str(root), "--head", "test-mean-linear", "--streams", "rgb",
            "--set", "recipe=paper", "--set", "epochs=2", "--out", str(out), "--quiet"]
    r = CliRunner().invoke(cli, args + ["--splits", "1,2"], standalone_mode=False, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    runs = sorted(p for p in out.iterdir() if p.is_dir())
    assert len(runs) == 2 and all((p / COMPLETE).is_file() for p in runs)
    summary = json.loads(next(out.glob("test-mean-linear-splits-*.json")).read_text())
    accs = summary["accuracy"]["per_split"]
    assert summary["splits"] == [1, 2] and summary["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert "+-" in r.output
    r = CliRunner().invoke(cli, args + ["--split", "1"], standalone_mode=False, catch_exceptions=False)
    assert "cached" in r.output
    with pytest.raises(RegistryError, match="valid|head keys"):
        CliRunner().invoke(cli, args[:-1] + ["--set", "bogus=1"], standalone_mode=False, catch_exceptions=False)
    r = CliRunner().invoke(cli, ["heads", "test-*"], standalone_mode=False, catch_exceptions=False)
    assert "test-mean-linear" in r.output and "dropout = 0.2" in r.output and "lr=0.05" in r.output


def test_cli_user_error_is_one_line(dataset, tmp_path, capsys):
    from cli.main import main

    root, _ = dataset
    with pytest.raises(SystemExit) as e:
        main(["train", str(tmp_path / "nostore"), "--dataset", str(root), "--head", "test-mean-linear"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error:") and "not a feature store" in err and "\n" not in err


@pytest.mark.parametrize("head", ["ts-lstm", "temporal-inception"])
def test_stage_runs_the_paper_heads(dataset, tmp_path, head):
    """The default head of `make train` and the Temporal-ConvNet go through the whole stage (paper recipe, one epoch)."""
    from safetensors.torch import load_file

    import pipeline.heads  # noqa: F401
    import stages.train as st

    root, store_path = dataset
    job = st.TrainJob(store=str(store_path), dataset=str(root), head=head, overrides=(("recipe", "paper"), ("epochs", "1")),
                      out=str(tmp_path / "runs"))
    res = st.train(job, progress=False, echo=lambda m: None)
    cfg = json.loads((res.path / "config.json").read_text())
    assert cfg["train"]["frames"] == 25 and cfg["streams"] == ["rgb", "flow"]  # paper: 25 frames, both streams
    # the store holds 8-14 frames per video: the run says that the 25 were made by repeating frames
    from tests.synthetic import data_warnings

    assert data_warnings(res.metrics) == [("42 of 42 videos have fewer than 25 stored frames; their frames were "
                                        "repeated to make 25")]
    saved = np.load(res.path / "scores_test.npz")
    assert res.metrics["n_test"] == len(saved["labels"]) == 12
    assert res.metrics["accuracy"] == pytest.approx((saved["scores"].argmax(1) == saved["labels"]).mean())
    # the saved weights are the model that scored the test videos
    head_cfg, _ = resolve_configs(head, {})
    model = build_head(head, head_cfg, RGB + FLOW, len(CLASSES), (RGB, FLOW), seed=1)
    model.load_state_dict(load_file(str(res.path / "weights.safetensors")))
    assert res.metrics["params"] == sum(p.numel() for p in model.parameters())
    test = VideoFeatures(FeatureStore.open(store_path), list(saved["ids"]), saved["labels"], ("rgb", "flow"), frames=25)
    np.testing.assert_allclose(predict(model, test, torch.device("cpu")), saved["scores"], rtol=1e-5, atol=1e-5)


def test_resolve_device():
    from pipeline.training import resolve_device

    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(RegistryError, match="unknown device"):
        resolve_device("tpu7")
    if not torch.cuda.is_available():
        with pytest.raises(RegistryError, match="no CUDA GPU"):
            resolve_device("cuda")


# ---------------------------------------------------------------------------------------------- recipes


@pytest.mark.parametrize("key, value", [("lr", "inf"), ("lr", "nan"), ("lr", "0"), ("lr", "-1e-3"), ("momentum", "1"),
                                        ("weight_decay", "inf"), ("patience", "-1"), ("patience_steps", "-5"),
                                        ("patience_fraction", "1.5"), ("patience_fraction", "nan"),
                                        ("warmup_steps", "-1"), ("min_steps", "-1"), ("epochs", "-1"),
                                        ("smoothing", "1"), ("gamma", "0"), ("recipe", "fast")])
def test_train_settings_out_of_range_are_refused(key, value):
    with pytest.raises(RegistryError, match=f"{key}"):
        resolve_configs("test-mean-linear", {key: value})


def test_recipes_converge_by_default_paper_on_request_and_set_keys_win():
    from pipeline.training import CONVERGE

    _, conv = resolve_configs("test-mean-linear")
    assert conv.recipe == "converge" and conv.optimizer == "adamw" and conv.schedule == "warmup-cosine"
    assert conv.lr == CONVERGE["lr"] and conv.min_steps > 0 and conv.patience_steps > 0 and conv.monitor == "accuracy-loss"
    assert conv.frames == 0  # the head's own input setting survives the recipe
    _, paper = resolve_configs("test-mean-linear", {"recipe": "paper"})
    assert (paper.recipe, paper.optimizer, paper.lr, paper.epochs, paper.batch_size) == ("paper", "adam", 0.05, 30, 8)
    assert paper.min_steps == 0 and paper.schedule == "none"  # exactly the head's paper settings
    _, short = resolve_configs("test-mean-linear", {"epochs": "2"})
    assert short.recipe == "converge" and short.epochs == 2 and short.min_steps == 0  # N epochs, as asked
    _, mixed = resolve_configs("test-mean-linear", {"recipe": "paper", "lr": "0.2"})
    assert mixed.recipe == "paper" and mixed.lr == 0.2 and mixed.optimizer == "adam"
    _, sk = resolve_configs("test-centroid", {"recipe": "paper"})
    assert sk.recipe == "paper"  # sklearn heads: recorded, nothing else to train


def test_warmup_cosine_known_values():
    from pipeline.training import warmup_cosine

    assert warmup_cosine(0, 9, 100) == pytest.approx(0.1) and warmup_cosine(8, 9, 100) == pytest.approx(0.9)
    assert warmup_cosine(9, 9, 100) == pytest.approx(1.0)
    assert warmup_cosine(9 + 91 // 2, 9, 100) == pytest.approx(0.5, abs=0.02) and warmup_cosine(100, 9, 100) == 0


def test_converge_budget_is_counted_in_steps_and_best_checkpoint_restored(dataset):
    store, train, test = _split_ids(dataset)
    tr = VideoFeatures(store, [i.id for i in train], [i.label for i in train], ("rgb",), frames=0)
    va = VideoFeatures(store, [i.id for i in test], [i.label for i in test], ("rgb",), frames=0)
    head_cfg, cfg = resolve_configs("test-mean-linear", {"min_steps": "60", "epochs": "1", "patience_steps": "0", "lr": "0.05",
                                                         "warmup_steps": "5", "eval_every": "3"})
    head = build_head("test-mean-linear", head_cfg, tr.dim, 3, tr.stream_dims, 0)
    out = fit(head, tr, va, cfg, torch.device("cpu"), progress=False)
    # 30 training videos at batch 32: one step an epoch, so 60 steps are 60 epochs (epochs=1 alone would be 1 step).
    assert out["steps_run"] == out["budget_steps"] == 60 and out["stop_reason"] == "budget"
    assert [r["step"] for r in out["history"]] == list(range(3, 61, 3))
    lrs = [r["lr"] for r in out["history"]]
    assert lrs[0] < lrs[1] and lrs[1:] == sorted(lrs[1:], reverse=True) and lrs[-1] == pytest.approx(0.0)
    restored = predict(head, va, torch.device("cpu"))
    row = next(r for r in out["history"] if r["step"] == out["best_step"])
    assert float(torch.nn.functional.cross_entropy(torch.from_numpy(restored), torch.tensor(va.labels))) == \
        pytest.approx(row["val_loss"], rel=1e-5)
    assert out["best_step"] >= 5 and not out["did_not_learn"]  # checkpoints from warm-up are not candidates and out["warnings"] == []
    # Patience in steps: stop once the smoothed validation loss has not improved for patience_steps after warm-up,
    # or for patience_fraction of the budget where that is longer (here 5% of 2000 steps).
    for patience_steps, fraction, wait in ((20, 0.0, 20), (20, 0.05, 100)):
        head2 = build_head("test-mean-linear", head_cfg, tr.dim, 3, tr.stream_dims, 0)
        cfg2 = dataclasses.replace(cfg, min_steps=2000, patience_steps=patience_steps, patience_fraction=fraction,
                                   lr=0.5)
        out2 = fit(head2, tr, va, cfg2, torch.device("cpu"), progress=False)
        assert out2["stop_reason"] == "patience" and out2["steps_run"] < 2000
        waited = out2["steps_run"] - max(out2["best_step"], 5)
        assert wait <= waited < wait + 3, (wait, waited)


def test_converge_patience_grows_with_the_budget_and_the_record_holds_the_steps_waited():
    """The default recipe waits 200 steps or a third of the budget: on the demo (600 steps) that is the 200 steps it
    always was, so those runs keep their names; on a UCF101-size set (8,583 training videos at batch 32, 30 epochs:
    8,070 steps) it is 2,690 steps, where 200 were under one epoch and stopped runs while the rate was still high."""
    from pipeline.training import budget_steps, patience_in_steps, train_record

    _, cfg = resolve_configs("ts-lstm", {})
    assert budget_steps(cfg, 43) == 600 and patience_in_steps(cfg, 600) == 200
    assert budget_steps(cfg, 8583) == 30 * 269 == 8070 and patience_in_steps(cfg, 8070) == 2690
    rec = train_record(cfg, 8583)
    assert rec["patience_steps"] == 2690 and "patience_fraction" not in rec
    assert train_record(cfg, 43) == {k: v for k, v in dataclasses.asdict(cfg).items() if k != "patience_fraction"}
    _, paper = resolve_configs("ts-lstm", {"recipe": "paper"})
    assert patience_in_steps(paper, 8070) == paper.patience_steps == 0  # the papers' patience is in epochs
    # A patience given by hand is the patience waited, as `--set epochs=N` is the epochs run; both keys keep the rule.
    _, hand = resolve_configs("ts-lstm", {"patience_steps": "50"})
    assert patience_in_steps(hand, 8070) == 50 and train_record(hand, 8583)["patience_steps"] == 50
    _, both = resolve_configs("ts-lstm", {"patience_steps": "50", "patience_fraction": "0.25"})
    assert patience_in_steps(both, 8070) == round(0.25 * 8070)


def test_huge_lr_is_divergence_not_a_result(dataset, tmp_path, capsys):
    """Huge learning rate: one-line error, exit 2, no complete run."""
    from cli.main import main

    root, store_path = dataset
    out = tmp_path / "runs"
    for lr in ("1e38", "inf"):
        with pytest.raises(SystemExit) as e:
            main(["train", str(store_path), "--dataset", str(root), "--head", "test-mean-linear", "--streams", "rgb",
                  "--set", "recipe=paper", "--set", "optimizer=sgd", "--set", f"lr={lr}", "--out", str(out), "--quiet"])
        assert e.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error:") and "\n" not in err, err
        assert ("diverged" in err) if lr == "1e38" else ("invalid train setting lr=inf" in err), err
    assert not list(out.glob(f"*/{COMPLETE}"))


def test_a_run_that_does_not_learn_says_so_in_metrics_and_leaderboard(dataset, tmp_path):
    import stages.train as st
    from stages.report import collect_runs, leaderboard

    root, store_path = dataset
    job = st.TrainJob(store=str(store_path), dataset=str(root), head="test-mean-linear", streams=("rgb",),
                      overrides=(("lr", "1e-7"), ("min_steps", "40")), out=str(tmp_path / "runs"))
    with pytest.warns(UserWarning, match="did not learn"):
        stuck = st.train(job, progress=False, echo=lambda m: None)
    assert stuck.metrics["did_not_learn"] and "did not learn" in stuck.metrics["warnings"][0]
    assert stuck.metrics["recipe"] == "converge" and stuck.metrics["stop_reason"] in ("budget", "patience")
    learned = st.train(dataclasses.replace(job, overrides=(("lr", "0.05"), ("min_steps", "40"))), progress=False,
                       echo=lambda m: None)
    assert not learned.metrics["did_not_learn"] and learned.metrics["warnings"] == []
    assert learned.metrics["lowest_loss"] < 0.5 * learned.metrics["start_loss"]
    rows = {row.settings: row for row in leaderboard(collect_runs(tmp_path / "runs")[0])}
    assert any("did not learn" in s for s in rows) and any("did not learn" not in s for s in rows), list(rows)


class _Tensors:
    """The two things ``iter_batches`` needs of a dataset: its length and a batch of given indices."""

    def __init__(self, x, y):
        self.x, self.y, self.labels = x, y, y.numpy()

    def __len__(self):
        return len(self.y)

    def batch(self, index):
        index = list(index)
        return self.x[index], None, self.y[index]


class _LeastSquares(Head):
    """0.5 * mean (x w - t)^2: gradient descent on it diverges exactly above lr = 2 / lambda_max(X^T X / N)."""

    def __init__(self, dim):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))

    def forward(self, x, mask=None):
        return (x[:, 0] @ self.w)[:, None]

    def loss(self, x, mask, y):
        return 0.5 * (self(x, mask)[:, 0] - y).pow(2).mean()


def test_find_lr_suggests_a_rate_below_the_known_divergence_point():
    from pipeline.training import TrainConfig, find_lr

    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 1, 8, generator=g) * torch.linspace(0.5, 3.0, 8)  # Hessian eigenvalues ~0.25 .. 9
    y = x[:, 0] @ torch.randn(8, generator=g)
    lam_max = float(torch.linalg.eigvalsh(x[:, 0].T @ x[:, 0] / len(y)).max())
    head = _LeastSquares(8)
    cfg = TrainConfig(optimizer="sgd", momentum=0.0, batch_size=256)
    out = find_lr(head, _Tensors(x, y), cfg, torch.device("cpu"), lr_min=1e-5, lr_max=10.0, steps=200)
    assert out["stopped"] in ("diverged", "non-finite loss") and out["lr"][-1] > 2 / lam_max
    assert 2 / lam_max / 30 < out["suggested_lr"] < 2 / lam_max / 2, (out["suggested_lr"], 2 / lam_max)
    assert torch.count_nonzero(head.w) == 0  # the weights are restored


def test_cli_find_lr_writes_plot_and_applies_the_rate(dataset, tmp_path):
    from cli.main import cli

    root, store_path = dataset
    out = tmp_path / "runs"
    base = ["train", str(store_path), "--dataset", str(root), "--head", "test-mean-linear", "--streams", "rgb",
            "--set", "min_steps=30", "--out", str(out), "--quiet"]
    r = CliRunner().invoke(cli, base + ["--find-lr"], standalone_mode=False, catch_exceptions=False)
    assert r.exit_code == 0 and "suggested lr" in r.output, r.output
    (run,) = [p for p in out.iterdir() if p.is_dir()]
    found = json.loads((run / "lr_find.json").read_text())
    assert (run / "lr_find.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and not (run / COMPLETE).exists()
    assert 1e-5 < found["suggested_lr"] < 1.0 and len(found["lr"]) == len(found["smoothed"]) > 10
    r = CliRunner().invoke(cli, base + ["--find-lr=apply"], standalone_mode=False, catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (done,) = [p for p in out.iterdir() if (p / COMPLETE).is_file()]
    cfg = json.loads((done / "config.json").read_text())
    assert cfg["train"]["lr"] == pytest.approx(found["suggested_lr"], rel=1e-2) and cfg["lr_from"] == "find-lr"
    assert (done / "lr_find.png").is_file()


def test_streamed_training_equals_in_memory_training(dataset, tmp_path):
    """A training set over the memory budget (``memory_gb``) is streamed from the store, through a shuffle buffer
    that here holds it whole (at least ``MIN_SHUFFLE_BUFFER`` videos): the same seed gives the batches of training in
    memory, so the run's scores are those of in-memory training."""
    import stages.train as st

    root, store_path = dataset
    runs = {}
    for gb in ("4", "0"):
        job = st.TrainJob(store=str(store_path), dataset=str(root), head="temporal-pool", streams=("rgb",),
                          overrides=(("memory_gb", gb), ("frames", "4")), out=str(tmp_path / "runs"))
        runs[gb] = st.train(job, progress=False, echo=lambda m: None)
    assert runs["4"].path != runs["0"].path  # two runs, not one cached
    a, b = (np.load(r.path / "scores_test.npz")["scores"] for r in runs.values())
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert runs["4"].metrics["accuracy"] == runs["0"].metrics["accuracy"]


def test_kernel_baselines_refuse_a_training_set_whose_kernels_do_not_fit(dataset, tmp_path):
    """n x n chi-square kernels grow with the square of the training set: refused in one line, nothing written."""
    import stages.train as st
    from pipeline.errors import UserError
    from pipeline.training import check_kernel_budget

    check_kernel_budget("svm", 9_537, 4.0)  # UCF101 split 1 fits the default budget
    with pytest.raises(UserError, match=r"240,000 training videos need about 1,287 GB"):
        check_kernel_budget("svm", 240_000, 4.0)  # Kinetics-400
    root, store_path = dataset
    job = st.TrainJob(store=str(store_path), dataset=str(root), head="svm", streams=("rgb",),
                      overrides=(("memory_gb", "1e-7"),), out=str(tmp_path / "runs"))
    with pytest.raises(UserError, match="svm: kernel matrices over .* use a torch head"):
        st.train(job, progress=False, echo=lambda m: None)
    assert not list((tmp_path / "runs").glob("svm-*"))
