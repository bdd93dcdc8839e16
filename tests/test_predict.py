"""predict / export / timeline: new videos scored exactly as the run's test split was, a model folder that works
alone, the switch between two actions found in a concatenated video, and refusals in one line."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import save_file

import pipeline.heads  # noqa: F401  (registers every head)
from pipeline.demo_data import _write_avi, render_video, write_demo_dataset
from pipeline.predictor import Predictor, list_videos, probabilities, top_k
from pipeline.store import FeatureStore
from stages.timeline import segments, windows
from tests.synthetic import threads_of_extract_workers

# ------------------------------------------------------------------------------------------------ pure parts


def test_top_k_is_the_softmax_ranking():
    scores = np.array([1.0, 3.0, 2.0, -1.0])
    p = probabilities(scores)
    assert np.isclose(p.sum(), 1) and np.isclose(p[1] / p[2], np.e)
    top = top_k(scores, ["a", "b", "c", "d"], 2)
    assert [c for c, _ in top] == ["b", "c"] and np.isclose(top[0][1], p[1])
    multi = top_k(np.array([2.0, -2.0, 0.0]), ["a", "b", "c"], 2, multi_label=True)  # per-class sigmoids
    assert [c for c, _ in multi] == ["a", "c"] and np.isclose(multi[0][1], 1 / (1 + np.exp(-2))) and multi[1][1] == 0.5


def test_windows_cover_the_video_and_segments_split_halfway():
    spans = windows(100, 25.0, window=1.0, stride=0.5)  # 25-frame windows every 12-13 frames (rounded)
    assert spans[0] == (0, 25) and spans[-1][1] == 100 and all(b - a == 25 for a, b in spans)
    assert windows(10, 25.0, 1.0, 0.5) == [(0, 10)]  # shorter than a window: one window, the whole video
    segs = segments(np.array([0.5, 1.0, 1.5, 2.0]), ["x", "x", "y", "y"], 2.5)
    assert segs == [{"class": "x", "start": 0.0, "end": 1.25}, {"class": "y", "start": 1.25, "end": 2.5}]


def test_list_videos_reads_folders_and_lists(tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    for name in ("d/b.avi", "d/sub/a.mp4", "d/notes.txt"):
        (tmp_path / name).write_bytes(b"x")
    (tmp_path / "list.txt").write_text("d/b.avi\n# a comment\n\n/abs/c.avi 3\n")
    assert list_videos([str(tmp_path / "d")]) == [str(tmp_path / "d/b.avi"), str(tmp_path / "d/sub/a.mp4")]
    assert list_videos([str(tmp_path / "list.txt")]) == [str(tmp_path / "d/b.avi"), "/abs/c.avi"]


def _fake_run(tmp_path: Path, weights_name: str = "imagenet.pth", record: bool = True) -> Path:
    """A complete run directory of a temporal-pool head over a store made with a weights file nobody has."""
    from dataclasses import asdict

    from pipeline.training import build_head, resolve_configs

    run = tmp_path / "runs" / "temporal-pool-000000000000"
    run.mkdir(parents=True)
    head_cfg, cfg = resolve_configs("temporal-pool", {"frames": "4"})
    head = build_head("temporal-pool", head_cfg, 8, 3, (8,), 0)
    save_file({k: v.contiguous() for k, v in head.state_dict().items()}, str(run / "weights.safetensors"))
    config = {"head": "temporal-pool", "head_config": asdict(head_cfg), "train": asdict(cfg), "streams": ["rgb"],
              "split": 1, "classes": ["a", "b", "c"], "store_fingerprint": "f" * 16}
    (run / "config.json").write_text(json.dumps(config))
    spec = {"name": "efficientnet_lite0", "in_chans": 3, "weights": weights_name, "weights_sha256": "0" * 64,
            "foveated": False, "precision": "fp32"}
    store_config = {"streams": ["rgb"], "sampling": {"mode": "frames", "frames": 4, "fps": None, "max_frames": 120},
                    "tta": "center", "spatial_grid": None, "decoder": "pyav", "backbones": {"rgb": spec}}
    if record:
        (run / "extraction.json").write_text(json.dumps({"store_config": store_config, "stream_dims": {"rgb": 8},
                                                         "video_seconds": 1.0}))
    (run / "COMPLETE").write_text("x\n")
    return run


def test_missing_cnn_weights_are_refused_in_one_line_naming_them(tmp_path, run_cli):
    run = _fake_run(tmp_path)
    code, out = run_cli("predict", run, tmp_path / "v.avi", "--quiet")
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1 and "imagenet.pth" in lines[0] and "--weights" in lines[0], out
    code, out = run_cli("export", run, "--out", tmp_path / "model")
    assert code == 2 and "imagenet.pth" in out and not (tmp_path / "model").exists()


def test_run_without_extraction_record_asks_for_its_store(tmp_path, run_cli):
    run = _fake_run(tmp_path, record=False)
    code, out = run_cli("predict", run, tmp_path / "v.avi", "--quiet")
    assert code == 2 and "--store" in out and len(out.strip().splitlines()) == 1, out


# --------------------------------------------------------------------------- a trained run on real videos

CLASSES = ["CheckerDrift", "StripeDrift"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Demo videos of two classes, extracted as `make extract` does (rgb + DIS flow, shorter), and a head trained
    with the default recipe on split 1."""
    from cli.main import main

    root = tmp_path_factory.mktemp("predict")
    data = write_demo_dataset(root / "data", classes=CLASSES, groups=6, clips=1, frames=24)
    store, runs = root / "store", root / "runs"
    main(["extract", str(data), "--out", str(store), "--streams", "rgb,flow", "--flow", "dis", "--flow-stack", "2",
          "--frames", "4", "--workers", "1", "--quiet"])
    main(["train", str(store), "--dataset", str(data), "--split", "1", "--head", "temporal-pool", "--set", "frames=4",
          "--out", str(runs)])
    run = next(p for p in runs.iterdir() if p.is_dir())
    return data, store, run


@pytest.mark.slow
def test_predict_gives_the_runs_test_scores_and_the_stores_features(trained):
    data, store, run = trained
    pred = Predictor.load(run, device="cpu")
    z = np.load(run / "scores_test.npz", allow_pickle=False)
    fs = FeatureStore.open(store)
    for i in range(0, len(z["ids"]), 3):
        vid = str(z["ids"][i])
        with threads_of_extract_workers(1):  # the fixture extracted with --workers 1
            feats = pred.features(data / vid)
        (key,) = feats
        for s in ("rgb", "flow"):  # one extraction path: the same float16 features as the store, bit for bit
            assert np.array_equal(feats[key][s], fs.get(vid, s)), (vid, s)
        np.testing.assert_allclose(pred.scores([feats])[0], z["scores"][i], rtol=1e-5, atol=1e-5)
    assert pred.classes == CLASSES


@pytest.mark.slow
def test_cli_prints_top_classes_and_reports_a_failed_video(trained, tmp_path, run_cli):
    data, _, run = trained
    good = min((data / "StripeDrift").glob("*.avi"))
    bad = tmp_path / "broken.avi"
    bad.write_bytes(b"not a video at all" * 100)
    out_file = tmp_path / "pred.jsonl"
    code, out = run_cli("predict", run, good, bad, "--top", "2", "--out", out_file, "--quiet")
    assert code == 0, out
    assert "broken.avi: failed" in out and "1 predicted, 1 failed" in out
    rows = [json.loads(line) for line in out_file.read_text().splitlines()]
    assert [r["status"] for r in rows] == ["ok", "failed"]
    assert rows[0]["top"][0]["class"] == "StripeDrift" and len(rows[0]["top"]) == 2
    assert np.isclose(sum(probabilities(np.array(rows[0]["scores"]))), 1)


@pytest.mark.slow
def test_exported_model_predicts_alone(trained, tmp_path, run_cli):
    data, _, run = trained
    code, out = run_cli("export", run, "--out", tmp_path / "model")
    assert code == 0, out
    files = {p.name for p in (tmp_path / "model").rglob("*") if p.is_file()}
    assert {"model.json", "README.md", "weights.safetensors", "config.json"} <= files
    assert not any(f.endswith((".pkl", ".pickle", ".pth", ".pt")) for f in files)
    card = (tmp_path / "model" / "README.md").read_text()
    assert "accuracy" in card and "fingerprint" in card and "dis" in card
    alone = tmp_path / "elsewhere" / "m"
    shutil.copytree(tmp_path / "model", alone)
    shutil.rmtree(tmp_path / "model")
    z = np.load(run / "scores_test.npz", allow_pickle=False)
    vid = str(z["ids"][0])
    scores = Predictor.load(alone, device="cpu").predict(data / vid)
    np.testing.assert_allclose(scores, z["scores"][0], rtol=1e-5, atol=1e-5)
    code, out = run_cli("predict", alone, data / vid, "--quiet")
    assert code == 0 and "1 predicted, 0 failed" in out, out


@pytest.mark.slow
def test_timeline_finds_the_cut_between_two_actions(trained, tmp_path, run_cli):
    _, _, run = trained
    a = render_video("CheckerDrift", 7, 1, 1, frames=48)  # a scene of the test groups, new seed
    b = render_video("StripeDrift", 7, 2, 1, frames=48)
    video = tmp_path / "two_actions.avi"
    _write_avi(video, np.concatenate([a, b]), 25.0)
    code, out = run_cli("predict", run, video, tmp_path / "missing.avi", "--timeline", "--timeline-dir",
                        tmp_path / "tl", "--quiet")
    assert code == 0 and "missing.avi: failed" in out, out
    res = json.loads((tmp_path / "tl" / "two_actions.avi.timeline.json").read_text())
    assert (tmp_path / "tl" / "two_actions.avi.timeline.png").stat().st_size > 0
    window, cut = res["window"], 48 / 25
    assert np.isclose(window, 24 / 25)  # the training videos' length by default
    top = [w["top"] for w in res["windows"]]
    assert top[0] == "CheckerDrift" and top[-1] == "StripeDrift"
    changes = [i for i in range(1, len(top)) if top[i] != top[i - 1]]
    for i in changes:  # every switch of the argmax happens within one window of the cut
        t = (res["windows"][i]["start"] + res["windows"][i]["end"]) / 2
        assert abs(t - cut) <= window, (t, top)


@pytest.mark.slow
def test_fused_run_predicts_its_fused_scores(trained, tmp_path):
    from stages.train import TrainJob, train_late_fusion

    data, store, _ = trained
    fused = train_late_fusion(TrainJob(str(store), str(data), head="temporal-pool", overrides=(("frames", "4"),),
                                       out=str(tmp_path / "runs")), progress=False, echo=lambda m: None)
    pred = Predictor.load(fused.path, device="cpu")
    assert len(pred.heads()) == 2
    z = np.load(fused.path / "scores_test.npz", allow_pickle=False)
    for i in (0, len(z["ids"]) - 1):
        np.testing.assert_allclose(pred.predict(data / str(z["ids"][i])), z["scores"][i], rtol=1e-4, atol=1e-4)
    from stages.export import export_model

    export_model(fused.path, tmp_path / "model")  # the fusion and both its input runs, in one folder
    alone = tmp_path / "elsewhere"
    shutil.copytree(tmp_path / "model", alone)
    shutil.rmtree(tmp_path / "runs")
    np.testing.assert_allclose(Predictor.load(alone, device="cpu").predict(data / str(z["ids"][0])), z["scores"][0],
                               rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_run_without_record_takes_its_own_store_only(trained, tmp_path):
    from pipeline.errors import UserError
    from tests.synthetic import write_ucf_store

    _, store, run = trained
    old = tmp_path / "runs" / run.name
    shutil.copytree(run, old)
    (old / "extraction.json").unlink()  # a run trained before runs recorded their extraction
    assert Predictor.load(old, store=store).extractions == Predictor.load(run).extractions
    _, other = write_ucf_store(tmp_path / "other", CLASSES)
    with pytest.raises(UserError, match="is not the store"):
        Predictor.load(old, store=other)


@pytest.mark.slow
def test_export_carries_cnn_weights_that_ship_with_no_package(trained, tmp_path, run_cli):
    """Random (or fine-tuned, or any local file's) CNN weights are copied into the model as safetensors, and the
    copy gives the store's features bit for bit."""
    from tests.synthetic import run_over_store

    data, _, _ = trained
    store = tmp_path / "store"
    code, out = run_cli("extract", data, "--out", store, "--streams", "rgb,flow", "--flow", "dis", "--flow-stack", "2",
                        "--frames", "2", "--weights", "random", "--limit", "2", "--workers", "1", "--quiet")
    assert code == 0, out
    run = run_over_store(store, tmp_path)
    code, out = run_cli("export", run, "--out", tmp_path / "model")
    assert code == 0, out
    meta = json.loads((tmp_path / "model" / "model.json").read_text())
    assert all(rec["file"] and rec["origin"].startswith("random") for rec in meta["cnn"].values())
    shutil.copytree(tmp_path / "model", tmp_path / "elsewhere")
    pred = Predictor.load(tmp_path / "elsewhere", device="cpu")
    fs = FeatureStore.open(store)
    for vid in fs.ids():
        with threads_of_extract_workers(1):
            (feats,) = pred.features(data / vid).values()
        assert all(np.array_equal(feats[s], fs.get(vid, s)) for s in ("rgb", "flow")), vid
