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


def _write(path, vids, name, seed=0, commit_every=2):
    rng = np.random.default_rng(seed)
    with FeatureStore.writer(path, CFG, ["a"], name=name, commit_every=commit_every) as w:
        for v in vids:
            w.add(v, _video(rng), _meta())


def _view(fs):
    """Everything a reader answers, to compare an indexed open with one that read every part."""
    return (fs.ids(), list(fs.locations()), fs.duplicates, fs.fingerprint, fs.streams, len(fs), fs.info()["frames"],
            [p.name for p in fs.parts])


def test_open_reads_the_index_not_the_parts_and_folds_in_new_parts(tmp_path, monkeypatch):
    import pipeline.store as st

    _write(tmp_path / "s", [f"v{i}" for i in range(6)], "w1")
    first = _view(FeatureStore.open(tmp_path / "s"))  # builds and saves index.npz
    assert (tmp_path / "s" / st.INDEX_NAME).is_file()
    reads = []
    real = st.read_part_index
    monkeypatch.setattr(st, "read_part_index", lambda p: reads.append(p.name) or real(p))
    assert _view(FeatureStore.open(tmp_path / "s")) == first and reads == []  # no part opened
    _write(tmp_path / "s", ["v2", "x0"], "w0")  # another writer: a duplicate of v2 in a part that sorts first
    fs = FeatureStore.open(tmp_path / "s")
    assert reads == ["w0-000000.h5"]  # only the new part
    (tmp_path / "s" / st.INDEX_NAME).unlink()
    monkeypatch.setattr(st, "read_part_index", real)
    assert _view(fs) == _view(FeatureStore.open(tmp_path / "s"))  # = a reader that read every part
    assert fs.duplicates == {"v2": ["w0-000000.h5", "w1-000001.h5"]} and fs.ids()[-1] == "x0"
    np.testing.assert_array_equal(fs.get("v2"), FeatureStore.open(tmp_path / "s").get("v2"))


def test_a_changed_or_removed_part_rebuilds_the_index_and_says_so(tmp_path):
    import pipeline.store as st

    _write(tmp_path / "s", [f"v{i}" for i in range(6)], "w")
    FeatureStore.open(tmp_path / "s")
    (tmp_path / "s" / "parts" / "w-000001.h5").unlink()  # as `verify --repair` moves a damaged part away
    said = []
    fs = FeatureStore.open(tmp_path / "s", log=said.append)
    assert fs.ids() == ["v0", "v1", "v4", "v5"] and "v2" not in fs
    assert len(said) == 1 and "changed or removed" in said[0] and "w-000001.h5" in said[0]
    part = tmp_path / "s" / "parts" / "w-000000.h5"
    part.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # truncated after it was indexed
    with pytest.raises(st.DamagedPart, match="w-000000.h5"):
        FeatureStore.open(tmp_path / "s", log=said.append)
    (tmp_path / "s" / st.INDEX_NAME).write_bytes(b"not an index")  # unreadable: rebuilt from the parts
    part.unlink()
    assert FeatureStore.open(tmp_path / "s").ids() == ["v4", "v5"]


def test_a_store_that_cannot_be_written_is_indexed_in_memory(tmp_path, monkeypatch):
    import errno

    import pipeline.store as st

    _write(tmp_path / "s", ["a", "b", "c"], "w")

    def refuse(self, path):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(st.StoreIndex, "save", refuse)  # as on a read-only mount (root writes a 0o555 folder)
    assert FeatureStore.open(tmp_path / "s").ids() == ["a", "b", "c"]
    assert not (tmp_path / "s" / st.INDEX_NAME).exists()


def test_random_access_keeps_a_bounded_number_of_parts_open(tmp_path):
    rng = np.random.default_rng(1)
    feats = {f"v{i:02d}": _video(rng) for i in range(24)}
    with FeatureStore.writer(tmp_path / "s", CFG, ["a"], commit_every=1) as w:  # one part per video
        for v, f in feats.items():
            w.add(v, f, _meta())
    fs = FeatureStore.open(tmp_path / "s")
    fs.OPEN_PARTS = 4
    for v in rng.permutation(list(feats)).tolist() * 2:
        np.testing.assert_array_equal(fs.get(v), feats[v]["rgb"])
        assert len(fs._files) <= 4
    assert [len(a) for a in fs.load("rgb")] == [4] * 24


def test_provenance_comes_from_the_index_file_that_was_opened(tmp_path):
    """Another reader replacing index.npz between this reader's open and its fingerprint does not misalign rows."""
    _write(tmp_path / "s", [f"v{i}" for i in range(6)], "w1")
    expected = FeatureStore.open(tmp_path / "s").fingerprint
    reader = FeatureStore.open(tmp_path / "s")  # index loaded, provenance columns not read yet
    reader._fingerprint = None  # as for an index saved without its fingerprint: computed from the columns
    _write(tmp_path / "s", ["a0", "a1", "a2"], "w0")  # sorts first: every row moves in the new index
    FeatureStore.open(tmp_path / "s")  # a second reader saves the extended index under the same name
    assert reader.fingerprint == expected and reader.ids() == [f"v{i}" for i in range(6)]
    reader.close()
