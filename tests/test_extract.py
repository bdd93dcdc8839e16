"""Stage one end to end: extraction, resume after kill -9, idempotence, config refusal, bad inputs, CLI."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from cli.main import main
from pipeline.sampling import Sampling, sample_indices
from pipeline.store import FeatureStore
from pipeline.video import choose_backend, decode
from stages.isolation import isolated_map
from tests.synthetic import write_tiny_folders, write_video

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory):
    return write_tiny_folders(tmp_path_factory.mktemp("tiny"))


def run_cli_subprocess(*args) -> tuple[int, str]:
    """Run the CLI in a subprocess (exit codes and stderr exactly as a user sees them)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.run([sys.executable, "-m", "cli.main", *map(str, args)], capture_output=True, text=True, env=env, check=False,
                       cwd=ROOT, timeout=600)
    return p.returncode, p.stdout + p.stderr


FAST = ["--streams", "rgb", "--frames", "4", "--quiet", "--workers", "1", "--commit-every", "2"]


def test_extract_info_and_idempotent_rerun(tiny_dataset, tmp_path, run_cli):
    store = tmp_path / "store"
    code, out = run_cli("extract", tiny_dataset, "--out", store, *FAST)
    assert code == 0, out
    assert "done 6, skipped 0" in out
    fs = FeatureStore.open(store)
    assert len(fs.ids()) == 6 and fs.streams == {"rgb": 1280}
    assert fs.get("left/left0.avi", "rgb").shape == (4, 1280)
    assert np.isfinite(fs.get("left/left0.avi", "rgb").astype(np.float32)).all()
    m = fs.meta("right/right2.avi")
    assert m["n_frames"] == 24 and list(m["frame_indices"]) == [3, 9, 15, 21]
    parts_before = sorted(p.name for p in (store / "parts").iterdir())
    code, out = run_cli("extract", tiny_dataset, "--out", store, *FAST)
    assert code == 0 and "done 0, skipped 6 (already in the store), failed 0 of 6 in" in out, out
    assert sorted(p.name for p in (store / "parts").iterdir()) == parts_before
    code, out = run_cli("info", store, "--json")
    assert code == 0
    info = json.loads(out)
    assert info["videos"] == 6 and info["streams"] == {"rgb": 1280}
    assert info["config"]["sampling"]["frames"] == 4
    assert info["config"]["backbones"]["rgb"]["weights_sha256"]


def test_different_config_is_refused(tiny_dataset, tmp_path, run_cli):
    store = tmp_path / "store"
    code, out = run_cli("extract", tiny_dataset, "--out", store, *FAST, "--limit", "1")
    assert code == 0 and "done 1, skipped 0 (already in the store), failed 0 of 6, 5 left for the next run" in out
    code, out = run_cli_subprocess("extract", tiny_dataset, "--out", store, *FAST[:2], *FAST[4:], "--frames", "5")
    assert code == 2
    lines = out.strip().splitlines()
    assert len(lines) == 1 and "different config" in lines[0] and "Traceback" not in out
    assert "sampling.frames: 4 (store) vs 5 (requested)" in lines[0] and "backbones" not in lines[0], lines[0]


def test_kill_9_then_resume_is_bitwise_equal(tiny_dataset, tmp_path, run_cli):
    ref = tmp_path / "ref"
    assert run_cli("extract", tiny_dataset, "--out", ref, *FAST)[0] == 0
    store = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    args = [sys.executable, "-m", "cli.main", "extract", str(tiny_dataset), "--out", str(store), "--streams", "rgb",
            "--frames", "4", "--quiet", "--workers", "1", "--commit-every", "1"]
    p = subprocess.Popen(args, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                         start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:
        if len(list((store / "parts").glob("*.h5"))) >= 2:
            os.killpg(p.pid, signal.SIGKILL)  # the extractor and its decode worker
            break
        time.sleep(0.02)
    p.wait()
    killed_mid_run = p.returncode == -signal.SIGKILL
    n_before = len(FeatureStore.open(store).ids())
    assert n_before >= 2
    code, out = run_cli("extract", tiny_dataset, "--out", store, *FAST)
    assert code == 0, out
    a, b = FeatureStore.open(ref), FeatureStore.open(store)
    assert a.ids() == b.ids()
    for vid in a.ids():
        assert np.array_equal(a.get(vid, "rgb"), b.get(vid, "rgb")), vid
    if killed_mid_run:
        assert f"done {6 - n_before}, skipped {n_before}" in out


def test_cnn_in_workers_gives_the_in_process_features_bit_for_bit(tiny_dataset, tmp_path, run_cli):
    """On the CPU, workers run the whole chain (decode, flow, preprocessing, CNNs) with cores // workers threads;
    the main process alone (--workers 0) makes the same features, both streams, overlapping flow stacks."""
    args = ["--streams", "rgb,flow", "--flow", "dis", "--flow-stack", "3", "--frames", "4", "--quiet"]
    stores = {}
    for w in ("0", "2"):
        stores[w] = tmp_path / f"w{w}"
        code, out = run_cli("extract", tiny_dataset, "--out", stores[w], *args, "--workers", w, "--limit", "3")
        assert code == 0 and "done 3" in out, out
    a, b = FeatureStore.open(stores["0"]), FeatureStore.open(stores["2"])
    assert a.ids() == b.ids() and len(a.ids()) == 3
    for vid in a.ids():
        for s in ("rgb", "flow"):
            assert np.array_equal(a.get(vid, s), b.get(vid, s)), (vid, s)
    secs = json.loads((stores["2"] / "last_run.json").read_text())["seconds"]
    assert secs["cnn"] > 0 and secs["preprocess"] > 0 and secs["flow"] > 0  # the workers' steps are reported


def test_bad_videos_each_get_one_error_and_run_exits_0(tmp_path, run_cli):
    root = tmp_path / "bad"
    write_video(root / "ok" / "good.avi", 10)
    write_video(root / "ok" / "odd.avi", 6, h=17, w=33)
    write_video(root / "ok" / "gray.avi", 6, gray=True)
    write_video(root / "ok" / "one.avi", 1)
    (root / "broken").mkdir()
    (root / "broken" / "empty.avi").write_bytes(b"")
    (root / "broken" / "text.avi").write_text("this is not a video\n" * 50)
    good = (root / "ok" / "good.avi").read_bytes()
    (root / "broken" / "truncated.avi").write_bytes(good[: len(good) // 3])
    store = tmp_path / "store"
    code, out = run_cli("extract", root, "--out", store, *FAST)
    assert code == 0, out
    fs = FeatureStore.open(store)
    for vid in ["ok/good.avi", "ok/odd.avi", "ok/gray.avi", "ok/one.avi"]:
        assert fs.get(vid, "rgb").shape == (4, 1280), vid
    assert list(fs.meta("ok/one.avi")["frame_indices"]) == [0, 0, 0, 0]  # repeats from the start
    errors = {e["id"]: e for e in fs.errors()}
    assert {"broken/empty.avi", "broken/text.avi"} <= set(errors)
    assert all(vid.startswith("broken/") for vid in errors)
    # truncated: either an error line or the frames that survive, never both, never neither
    assert ("broken/truncated.avi" in errors) != ("broken/truncated.avi" in fs)
    n_lines = len((store / "errors.jsonl").read_text().splitlines())
    assert n_lines == len(errors)
    # --retry-failed: fix one file, only the failed videos are tried, the fixed one lands
    write_video(root / "broken" / "empty.avi", 8)
    code, out = run_cli("extract", root, "--out", store, *FAST, "--retry-failed")
    assert code == 0 and f"of {len(errors)} " in out, out
    fs = FeatureStore.open(store)
    assert "broken/empty.avi" in fs and "broken/empty.avi" not in {e["id"] for e in fs.errors()}


@pytest.mark.parametrize("args, expect", [
    (["extract", "/no/such/dir", "--out", "x"], "does not exist"),
    (["extract", "{tiny}", "--out", "{tmp}/s", "--streams", "rgb,depth"], "unknown stream"),
    (["extract", "{tiny}", "--out", "{tmp}/s", "--device", "cuda"], "CUDA is not available"),
    (["info", "{tmp}"], "not a feature store"),
])
def test_bad_cli_input_is_one_line(tiny_dataset, tmp_path, args, expect, run_cli):
    args = [a.format(tiny=tiny_dataset, tmp=tmp_path) for a in args]
    code, out = run_cli(*args)
    assert code != 0 and expect in out and "Traceback" not in out, out


# --- isolation: a crashing or hanging decoder costs one video ------------------------------------------------

def _crash_or_hang(x):
    if x == "segv":
        os.kill(os.getpid(), signal.SIGSEGV)
    if x == "hang":
        time.sleep(60)
    if x == "raise":
        raise ValueError("bad input")
    return x * 2


def test_isolated_map_survives_segfault_hang_and_exception():
    tasks = [(k, k) for k in ["a", "segv", "b", "hang", "raise", "c"]]
    out = {o.key: o for o in isolated_map(_crash_or_hang, tasks, workers=2, timeout=3)}
    assert out["a"].value == "aa" and out["b"].value == "bb" and out["c"].value == "cc"
    assert out["segv"].error == "SIGSEGV" and not out["segv"].ok
    assert out["hang"].error == "timeout"
    assert out["raise"].error == "ValueError" and "bad input" in out["raise"].message


# --- sampling and decoding ---------------------------------------------------------------------------------------

def test_sampling_modes():
    assert list(sample_indices(100, 25, Sampling("frames", 4))) == [12, 37, 62, 87]
    assert list(sample_indices(3, 25, Sampling("frames", 5))) == [0, 1, 2, 0, 1]  # repeat from the start
    assert list(sample_indices(100, 25, Sampling("fps", None, fps=1))) == [0, 25, 50, 75]
    assert list(sample_indices(60, 30, Sampling("fps", 4, fps=1))) == [0, 30, 0, 30]
    assert len(sample_indices(100000, 25, Sampling("fps", None, fps=1))) == 120  # Ng et al.'s cap
    assert list(sample_indices(5, 25, Sampling("all", None))) == [0, 1, 2, 3, 4]


def test_decoder_choice():
    assert choose_backend("auto", "cuda", ["decord", "pyav", "torchcodec"]) == "torchcodec"
    assert choose_backend("auto", "cpu", ["decord", "pyav", "torchcodec"]) == "decord"
    assert choose_backend("auto", "cuda", ["pyav"]) == "pyav"
    from pipeline.errors import UserError

    with pytest.raises(UserError, match="not installed"):
        choose_backend("torchcodec", "cpu", ["decord"])


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_decoders_agree_on_true_frame_count(tmp_path, backend):
    p = write_video(tmp_path / "v.avi", 17)
    d = decode(p, backend)
    assert d.n_frames == 17 and d.frames.shape == (17, 48, 64, 3) and d.frames.dtype == np.uint8
    sub = decode(p, backend, indices=np.array([3, 3, 16]))
    np.testing.assert_array_equal(sub.frames[0], d.frames[3])
    np.testing.assert_array_equal(sub.frames[2], d.frames[16])


def test_main_wraps_user_errors(capsys):
    with pytest.raises(SystemExit) as e:
        main(["info", "/definitely/missing"])
    assert e.value.code == 2


def test_keep_views_stores_each_tta_view_and_their_mean(tiny_dataset, tmp_path, run_cli):
    store = tmp_path / "views"
    code, out = run_cli("extract", tiny_dataset, "--out", store, *FAST, "--tta", "flip", "--keep-views", "--limit", "2")
    assert code == 0, out
    fs = FeatureStore.open(store)
    assert fs.streams == {"rgb": 1280, "rgb_views": 2 * 1280} and fs.frame_shape("rgb_views") == (2, 1280)
    vid = fs.ids()[0]
    views = fs.get(vid, "rgb_views").reshape(4, 2, 1280).astype(np.float32)
    assert not np.array_equal(views[:, 0], views[:, 1])  # the mirror is another view
    # the averaged stream is the mean of the views (float16 rounding of both sides)
    np.testing.assert_allclose(views.mean(1), fs.get(vid, "rgb").astype(np.float32), atol=2e-3, rtol=1e-2)
    code, out = run_cli("info", store)  # which stream averaged features, which keeps every view
    assert "views      rgb: features averaged over 2 views (flip)" in out and "rgb_views: 2 views (flip)" in out
    code, out = run_cli("extract", tiny_dataset, "--out", tmp_path / "c", *FAST, "--keep-views")
    assert code == 2 and "--tta flip or 10crop" in out


def test_runtime_onnx_gives_the_torch_features_in_a_store_of_its_own(tiny_dataset, tmp_path):
    """`--runtime onnx`: the CNN run by ONNX Runtime, features at cosine >= 0.999 to torch's; the store records the
    engine, so the two never mix (and predict rebuilds the same engine from the record)."""
    pytest.importorskip("onnxruntime")
    pytest.importorskip("onnx")
    from dataclasses import replace

    from stages.extract import ExtractConfig, RunOptions, extract

    opts = RunOptions(workers=0, progress=False)
    cfg = ExtractConfig(sampling=Sampling(mode="frames", frames=4), backbone="timm:test_efficientnet", weights="random")
    stores = {}
    for runtime in ("torch", "onnx"):
        stores[runtime] = tmp_path / runtime
        s = extract(tiny_dataset, stores[runtime], replace(cfg, runtime=runtime), opts, log=lambda *_: None)
        assert s.failed == 0
    a, b = FeatureStore.open(stores["torch"]), FeatureStore.open(stores["onnx"])
    assert a.ids() == b.ids() and b.config["backbones"]["rgb"]["runtime"] == "onnxruntime"
    assert "runtime" not in a.config["backbones"]["rgb"]
    for v in a.ids():
        x, y = a.get(v).astype(np.float32), b.get(v).astype(np.float32)
        cos = (x * y).sum(1) / (np.linalg.norm(x, axis=1) * np.linalg.norm(y, axis=1))
        assert cos.min() >= 0.999, (v, cos.min())
    with pytest.raises(Exception, match="different config"):  # torch features into the onnx store: refused
        extract(tiny_dataset, stores["onnx"], cfg, replace(opts, retry_failed=True), log=lambda *_: None)


def test_runtime_onnx_without_onnxruntime_is_one_line(tiny_dataset, tmp_path, monkeypatch):
    import importlib.util

    from pipeline.errors import UserError
    from stages.extract import ExtractConfig, RunOptions, check_settings

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name.startswith("onnx") else real(name, *a))
    with pytest.raises(UserError, match=r"--runtime onnx needs ONNX Runtime: pip install -e '\.\[onnx\]'"):
        check_settings(ExtractConfig(runtime="onnx"), RunOptions())
    code, text = run_cli_subprocess("extract", str(tiny_dataset), "--out", str(tmp_path / "s"), "--runtime", "gpu")
    assert code == 2 and len(text.strip().splitlines()) == 1 and "--runtime" in text
