"""The feature store: atomic parts, resume, config refusal, safety checks, bulk load."""

import json
import subprocess

import h5py
import numpy as np
import pytest

from pipeline.store import FeatureStore, StoreError, process_token

CFG = {"backbone": "tiny", "frames": 4}


def _video(rng, t=4, d=6):
    return {"rgb": rng.standard_normal((t, d)).astype(np.float16)}


def _meta(t=4):
    return {"frame_indices": np.arange(t), "fps": 25.0, "n_frames": 40, "duration": 1.6, "size": 123, "sha256": "ab"}


def test_roundtrip_and_bulk_load(tmp_path):
    rng = np.random.default_rng(0)
    feats = {f"c/v{i}.avi": _video(rng, t=3 + i) for i in range(5)}
    with FeatureStore.writer(tmp_path / "s", CFG, ["a", "b"], commit_every=2) as w:
        for vid, f in feats.items():
            w.add(vid, f, _meta(len(f["rgb"])))
    fs = FeatureStore.open(tmp_path / "s")
    assert fs.ids() == sorted(feats)
    assert fs.streams == {"rgb": 6}
    assert len(fs.parts) == 3  # 2 + 2 + 1
    for vid, f in feats.items():
        np.testing.assert_array_equal(fs.get(vid, "rgb"), f["rgb"])
    bulk = fs.load("rgb", ["c/v4.avi", "c/v0.avi"])
    np.testing.assert_array_equal(bulk[0], feats["c/v4.avi"]["rgb"])
    np.testing.assert_array_equal(bulk[1], feats["c/v0.avi"]["rgb"])
    m = fs.meta("c/v2.avi")
    assert m["n_frames"] == 40 and m["fps"] == 25.0 and list(m["frame_indices"]) == [0, 1, 2, 3, 4]
    assert fs.info()["videos"] == 5 and fs.config == CFG and fs.classes == ["a", "b"]


def test_uncommitted_work_is_invisible_and_resumes(tmp_path):
    rng = np.random.default_rng(1)
    w = FeatureStore.writer(tmp_path / "s", CFG, commit_every=2)
    for i in range(3):
        w.add(f"v{i}", _video(rng), _meta())
    # simulate a kill: the third video is still buffered and the partial of a dead writer lies around
    proc = subprocess.Popen(["true"])
    proc.wait()  # a process that has exited: its pid is dead
    dead_pid = proc.pid
    token = process_token().split("-")
    stale = tmp_path / "s" / "parts" / f"x-000001.h5.{token[0]}-{dead_pid}-abcdef.partial"
    stale.write_bytes(b"garbage")
    assert FeatureStore.open(tmp_path / "s").ids() == ["v0", "v1"]
    w2 = FeatureStore.writer(tmp_path / "s", CFG, commit_every=2)
    assert w2.done == {"v0", "v1"}
    assert not list((tmp_path / "s" / "parts").glob("*.partial"))
    w2.add("v2", _video(rng), _meta())
    w2.close()
    assert FeatureStore.open(tmp_path / "s").ids() == ["v0", "v1", "v2"]


def test_different_config_is_refused(tmp_path):
    FeatureStore.writer(tmp_path / "s", CFG).close()
    with pytest.raises(StoreError, match=r"^\S+ was built with a different config \(frames: 4 \(store\) vs 8 \(requested\)\); "):
        FeatureStore.writer(tmp_path / "s", {**CFG, "frames": 8})


def test_not_a_store(tmp_path):
    with pytest.raises(StoreError, match="not a feature store"):
        FeatureStore.open(tmp_path)


@pytest.mark.parametrize("bad", ["external", "reference", "opaque"])
def test_unsafe_parts_are_refused(tmp_path, bad):
    rng = np.random.default_rng(2)
    with FeatureStore.writer(tmp_path / "s", CFG) as w:
        w.add("v0", _video(rng), _meta())
    part = next((tmp_path / "s" / "parts").glob("*.h5"))
    with h5py.File(part, "a") as f:
        if bad == "external":
            f["streams"]["evil"] = h5py.ExternalLink("/etc/passwd", "/x")
        elif bad == "reference":
            f.create_dataset("evil", (1,), dtype=h5py.ref_dtype)
        else:  # opaque bytes, the way pickles get smuggled into HDF5
            f.create_dataset("evil", data=np.void(b"\x80\x04K\x01."))
    with pytest.raises(StoreError):
        FeatureStore.open(tmp_path / "s")


def test_errors_file_and_prune(tmp_path):
    rng = np.random.default_rng(3)
    w = FeatureStore.writer(tmp_path / "s", CFG, exclusive=True)
    w.log_error("bad.avi", "decode", "RuntimeError", "boom")
    w.log_error("late.avi", "decode", "timeout", "took too long")
    w.log_error("bad.avi", "decode", "RuntimeError", "boom again")  # --retry-failed failed it once more
    assert [(e["id"], e["message"]) for e in FeatureStore.open(tmp_path / "s").errors()] == [
        ("late.avi", "took too long"), ("bad.avi", "boom again")]  # one entry per video, the latest
    w.add("late.avi", _video(rng), _meta())
    w.close()
    w.prune_errors()
    lines = [json.loads(x) for x in (tmp_path / "s" / "errors.jsonl").read_text().splitlines()]
    assert [(e["id"], e["message"]) for e in lines] == [("bad.avi", "boom again")]
    assert [e["id"] for e in FeatureStore.open(tmp_path / "s").errors()] == ["bad.avi"]
