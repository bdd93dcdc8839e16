"""Stage one under faults: concurrent writers, a full disk, a read-only store, damaged parts, non-finite
features, bad settings. Real processes and real files; a real full filesystem where the test may mount one."""

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import h5py
import numpy as np
import pytest

import stages.extract as ex
from pipeline.sampling import Sampling
from pipeline.store import DamagedPart, FeatureStore, StoreWriteError, verify_store
from stages.extract import ExtractConfig, RunOptions, extract
from tests.synthetic import write_tiny_folders, write_video

ROOT = Path(__file__).resolve().parents[1]
# A tiny random-weight CNN: the code path of any backbone at a fraction of the cost.
CFG = ExtractConfig(sampling=Sampling(mode="frames", frames=4), backbone="timm:test_efficientnet", weights="random")
OPTS = RunOptions(workers=0, commit_every=2, progress=False)
FAST = ["--streams", "rgb", "--backbone", "timm:test_efficientnet", "--weights", "random", "--frames", "4", "--quiet",
        "--workers", "0", "--commit-every", "2"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    return write_tiny_folders(tmp_path_factory.mktemp("faults"))


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """The whole dataset extracted in one uninterrupted run: 3 parts of 2 videos."""
    out = tmp_path_factory.mktemp("ref") / "store"
    assert extract(dataset, out, CFG, OPTS).done == 6
    return out


def same_features(a: Path, b: Path) -> bool:
    with FeatureStore.open(a) as x, FeatureStore.open(b) as y:
        return x.ids() == y.ids() and all(np.array_equal(x.get(v), y.get(v)) for v in x.ids())


def partials(store: Path) -> list[str]:
    return [str(p.relative_to(store)) for p in store.rglob("*.partial")]


def one_line(out: str) -> str:
    lines = [x for x in out.strip().splitlines() if x.strip()]
    assert len(lines) == 1 and "Traceback" not in out, out
    return lines[0]


# ------------------------------------------------------------------------------------ writers and the lock

@pytest.mark.faults
def test_two_writers_of_one_name_never_replace_each_others_parts(tmp_path):
    """Two writers, same name, commit the same part number."""
    rng = np.random.default_rng(0)
    meta = {"frame_indices": np.arange(3)}
    a = FeatureStore.writer(tmp_path / "s", {"b": 1}, name="w", commit_every=1)
    b = FeatureStore.writer(tmp_path / "s", {"b": 1}, name="w", commit_every=1)  # both will take w-000000
    a.add("a0", {"rgb": rng.standard_normal((3, 4))}, meta)
    b.add("b0", {"rgb": rng.standard_normal((3, 4))}, meta)
    a.add("a1", {"rgb": rng.standard_normal((3, 4))}, meta)
    with FeatureStore.open(tmp_path / "s") as fs:
        assert fs.ids() == ["a0", "a1", "b0"] and not fs.duplicates
        assert [p.name for p in fs.parts] == ["w-000000.h5", "w-000001.h5", "w-000002.h5"]


_WRITER = """
import sys, time, numpy as np
from pathlib import Path
from pipeline.store import FeatureStore
store, tag = Path(sys.argv[1]), sys.argv[2]
w = FeatureStore.writer(store, {"b": 1}, name="same", commit_every=1)
(store / f"ready-{tag}").touch()
while not (store / "go").exists():
    time.sleep(0.005)
for i in range(15):
    w.add(f"{tag}{i:02d}", {"rgb": np.full((2, 3), i, np.float16)}, {"frame_indices": [0, 1]})
"""


@pytest.mark.faults
def test_concurrent_writer_processes_lose_and_duplicate_nothing(tmp_path):
    """Two writer processes commit at the same moment."""
    store = tmp_path / "s"
    FeatureStore.writer(store, {"b": 1}).close()
    procs = [subprocess.Popen([sys.executable, "-c", _WRITER, str(store), tag], env=ENV, cwd=ROOT) for tag in "ab"]
    deadline = time.time() + 120
    while not all((store / f"ready-{t}").exists() for t in "ab") and time.time() < deadline:
        time.sleep(0.01)
    (store / "go").touch()
    assert [p.wait(timeout=120) for p in procs] == [0, 0]
    with FeatureStore.open(store) as fs:
        assert fs.ids() == sorted(f"{t}{i:02d}" for t in "ab" for i in range(15))
        assert not fs.duplicates and len(fs.parts) == 30
    assert not partials(store)


@pytest.mark.faults
@pytest.mark.slow
def test_second_extract_is_refused_naming_the_first_unless_distinct_shards(dataset, reference, tmp_path, run_cli):
    """Two extracts into one store at once."""
    store = tmp_path / "store"
    first = subprocess.Popen([sys.executable, "-m", "cli.main", "extract", str(dataset), "--out", str(store), *FAST,
                              "--commit-every", "1"], env=ENV, cwd=ROOT, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not list((store / "parts").glob("*.h5")) and time.time() < deadline and first.poll() is None:
            time.sleep(0.01)
        os.kill(first.pid, signal.SIGSTOP)  # alive, holding the store, mid-run
        code, out = run_cli("extract", dataset, "--out", store, *FAST)
        line = one_line(out)
        assert code == 2 and f"pid {first.pid}" in line and "being written" in line
    finally:
        os.kill(first.pid, signal.SIGCONT)
    assert first.wait(timeout=300) == 0, first.stdout.read()
    code, out = run_cli("extract", dataset, "--out", store, *FAST)  # the first has finished: nothing left to do
    assert code == 0 and "done 0, skipped 6" in out, out
    assert same_features(reference, store) and not FeatureStore.open(store).duplicates

    sharded = tmp_path / "sharded"
    shard0 = subprocess.Popen([sys.executable, "-m", "cli.main", "extract", str(dataset), "--out", str(sharded),
                               *FAST, "--commit-every", "1", "--shard", "0/2"], env=ENV, cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        while not list((sharded / "parts").glob("*.h5")) and shard0.poll() is None:
            time.sleep(0.01)
        os.kill(shard0.pid, signal.SIGSTOP)
        code, out = run_cli("extract", dataset, "--out", sharded, *FAST, "--shard", "1/2")  # another shard: runs
        assert code == 0 and "done 3" in out, out
        code, out = run_cli("extract", dataset, "--out", sharded, *FAST, "--shard", "0/2")  # the same shard: refused
        assert code == 2 and f"pid {shard0.pid}" in one_line(out)
        code, out = run_cli("extract", dataset, "--out", sharded, *FAST)  # a plain writer: refused
        assert code == 2 and "being written" in one_line(out)
    finally:
        os.kill(shard0.pid, signal.SIGCONT)
    assert shard0.wait(timeout=300) == 0, shard0.stdout.read()
    assert same_features(reference, sharded)


# ------------------------------------------------------------------------------------------ write failures

def _enospc_after(monkeypatch, n_ok: int) -> list[int]:
    """Let ``n_ok`` file writes of the store through, then fail every write with ENOSPC after half its bytes."""
    import pipeline.store as store_mod

    real = store_mod._write_all
    calls = [0]

    def failing(fd, data):
        calls[0] += 1
        if calls[0] <= n_ok:
            return real(fd, data)
        os.write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(store_mod, "_write_all", failing)
    return calls


@pytest.mark.faults
def test_injected_enospc_mid_part_is_one_line_and_a_rerun_resumes(dataset, reference, tmp_path, run_cli,
                                                                  monkeypatch):
    """No space left on device while a part is written."""
    store = tmp_path / "store"
    # store.json, part 0 and its checksum get through; part 1 fails half-written
    _enospc_after(monkeypatch, 3)
    code, out = run_cli("extract", dataset, "--out", store, *FAST)
    line = one_line(out)
    assert code == 2 and "No space left on device" in line and str(store) in line
    assert not partials(store)
    with FeatureStore.open(store) as fs:
        assert len(fs.parts) == 1 and len(fs) == 2  # the committed part, intact
    assert not [f for f in verify_store(store)[0] if f.damage]
    monkeypatch.undo()  # space is back
    code, out = run_cli("extract", dataset, "--out", store, *FAST)
    assert code == 0 and "done 4, skipped 2" in out, out
    assert same_features(reference, store)


@pytest.mark.faults
def test_injected_enospc_before_the_store_exists_leaves_no_partial(dataset, tmp_path, monkeypatch):
    """No space left on device for store.json."""
    _enospc_after(monkeypatch, 0)
    with pytest.raises(StoreWriteError, match="store.json: No space left on device"):
        extract(dataset, tmp_path / "store", CFG, OPTS)
    assert not partials(tmp_path / "store") and not (tmp_path / "store" / "store.json").exists()


@pytest.fixture
def small_fs(tmp_path):
    """A real 2 MiB tmpfs (needs mount permission)."""
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=False, capture_output=True,
                       text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(folder: Path) -> Path:
    filler = folder / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


@pytest.mark.faults
@pytest.mark.slow
def test_real_full_filesystem_is_one_line_and_a_rerun_resumes(dataset, reference, small_fs, run_cli):
    """A real full filesystem (tmpfs) under extract."""
    store = small_fs / "store"
    assert run_cli("extract", dataset, "--out", store, *FAST, "--limit", "2")[0] == 0
    parts_before = {p.name: p.read_bytes() for p in (store / "parts").iterdir()}
    filler = _fill(small_fs)
    # a separate process, as a user runs it: a crash in C (h5py closing a failed file) would show as a signal
    p = subprocess.run([sys.executable, "-m", "cli.main", "extract", str(dataset), "--out", str(store), *FAST],
                       env=ENV, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False)
    line = one_line(p.stdout + p.stderr)
    assert p.returncode == 2 and "No space left on device" in line and str(store) in line
    assert not partials(store)
    assert {p.name: p.read_bytes() for p in (store / "parts").iterdir()} == parts_before
    fresh = small_fs / "fresh"  # a new store on the full disk: refused before anything, nothing half-written
    code, out = run_cli("extract", dataset, "--out", fresh, *FAST)
    assert code == 2 and "No space left on device" in one_line(out)
    assert not partials(fresh) and not (fresh / "store.json").exists()
    filler.unlink()
    code, out = run_cli("extract", dataset, "--out", store, *FAST)
    assert code == 0 and "done 4, skipped 2" in out, out
    assert same_features(reference, store)
    assert run_cli("verify", store)[0] == 0


@pytest.fixture
def read_only(tmp_path):
    """Bind-mount a folder read-only over itself (root ignores file modes, not a read-only mount)."""
    mounted = []

    def make(folder: Path) -> Path:
        r = subprocess.run(["mount", "--bind", str(folder), str(folder)], check=False, capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot bind-mount here: {r.stderr.strip()}")
        mounted.append(folder)
        subprocess.run(["mount", "-o", "remount,bind,ro", str(folder)], check=True)
        return folder

    yield make
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


@pytest.mark.faults
def test_read_only_store_refused_before_any_work_or_nothing_to_do(dataset, reference, tmp_path, run_cli,
                                                                   read_only, monkeypatch):
    """A read-only store, with and without work to do."""
    full = tmp_path / "full"
    shutil.copytree(reference, full)
    read_only(full)
    code, out = run_cli("extract", dataset, "--out", full, *FAST)
    assert code == 0 and "done 0, skipped 6" in out and "Traceback" not in out, out
    partial = tmp_path / "partial"
    assert run_cli("extract", dataset, "--out", partial, *FAST, "--limit", "2")[0] == 0
    read_only(partial)
    monkeypatch.setattr(ex, "build_streams", lambda *a: pytest.fail("the model was built for an unwritable store"))
    code, out = run_cli("extract", dataset, "--out", partial, *FAST)
    line = one_line(out)
    assert code == 2 and "cannot be written" in line and "Read-only file system" in line


# ------------------------------------------------------------------------------------------- damaged parts

def _damage(part: Path, how: str) -> None:
    if how == "truncated":
        data = part.read_bytes()
        part.write_bytes(data[: len(data) // 2])
    elif how == "no-ids":
        with h5py.File(part, "a") as f:
            del f["ids"]
    elif how == "wrong-offset":
        with h5py.File(part, "a") as f:
            f["offsets"][-1] = 416
    elif how == "bit-flip":  # one byte of feature data: the file still reads, only the checksum knows
        with h5py.File(part, "r") as f:
            at = f["streams"]["rgb"].id.get_offset() + 7
        with open(part, "r+b") as fh:
            fh.seek(at)
            b = fh.read(1)
            fh.seek(at)
            fh.write(bytes([b[0] ^ 0x01]))


@pytest.mark.faults
@pytest.mark.parametrize("how", ["truncated", "no-ids", "wrong-offset"])
def test_damaged_part_is_named_by_every_reader_and_repaired(dataset, reference, tmp_path, run_cli, how):
    """A damaged committed part (truncated, no ids, wrong offset)."""
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    part = sorted((store / "parts").glob("*.h5"))[1]
    _damage(part, how)
    for cmd in (["info", store], ["extract", dataset, "--out", store, *FAST]):
        code, out = run_cli(*cmd)
        line = one_line(out)
        assert code == 2 and part.name in line and "damaged part" in line, (cmd, out)
    with pytest.raises(DamagedPart, match=part.name):
        FeatureStore.open(store)  # what `train` opens
    code, out = run_cli("verify", store)
    assert code == 1 and f"damaged parts/{part.name}" in out, out
    if how == "wrong-offset":
        assert "offsets end at frame 416 but stream rgb holds 8" in out
    code, out = run_cli("verify", store, "--repair")
    assert code == 0 and (store / "quarantine" / part.name).is_file(), out
    assert not part.exists() and (store / "quarantine" / f"{part.name}.sha256").is_file()
    code, out = run_cli("extract", dataset, "--out", store, *FAST)
    assert code == 0 and "done 2, skipped 4" in out, out  # exactly the videos of the moved part
    assert same_features(reference, store)
    assert run_cli("verify", store)[0] == 0


@pytest.mark.faults
def test_flipped_byte_is_caught_by_the_checksum(reference, tmp_path, run_cli):
    """A part whose bytes changed after commit."""
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    part = sorted((store / "parts").glob("*.h5"))[2]
    _damage(part, "bit-flip")
    assert len(FeatureStore.open(store)) == 6  # opening stays cheap: no hashing, the structure is intact
    code, out = run_cli("verify", store)
    assert code == 1 and f"damaged parts/{part.name}: its bytes do not match the sha256 recorded at commit" in out
    assert "1 damaged part(s) holding 2 videos" in out


@pytest.mark.faults
def test_info_counts_frames_not_a_wrong_offset(reference, tmp_path, run_cli):
    """info on a part whose last offset is wrong."""
    store = tmp_path / "store"
    shutil.copytree(reference, store)
    code, out = run_cli("info", store)
    assert code == 0 and "6 committed in 3 parts, 24 frames" in out
    part = min((store / "parts").glob("*.h5"))
    _damage(part, "wrong-offset")
    code, out = run_cli("info", store)
    line = one_line(out)
    assert code == 2 and part.name in line and "offsets end at frame 416 but stream rgb holds 8" in line


# ----------------------------------------------------------------------------------------- non-finite values

@pytest.mark.faults
def test_non_finite_features_are_a_failed_video_not_a_commit(dataset, tmp_path, monkeypatch):
    """A backbone that returns NaN for one video."""
    real, calls = ex.embed, [0]

    def nan_on_second(stream, arr, batch_size, seconds):
        out = real(stream, arr, batch_size, seconds)
        calls[0] += 1
        if calls[0] == 2:
            out[stream.name][1, 3] = np.nan
        return out

    monkeypatch.setattr(ex, "embed", nan_on_second)
    s = extract(dataset, tmp_path / "store", CFG, OPTS)
    assert s.done == 5 and s.failed == 1
    with FeatureStore.open(tmp_path / "store") as fs:
        assert len(fs) == 5 and all(np.isfinite(fs.get(v).astype(np.float32)).all() for v in fs.ids())
        (err,) = fs.errors()
        assert err["stage"] == "features" and err["error"] == "NonFinite" and err["id"] not in fs
        assert "1 of 1024 values" in err["message"]


@pytest.mark.faults
def test_writer_refuses_values_that_overflow_float16(tmp_path):
    """Features beyond float16's range (stored as Inf)."""
    w = FeatureStore.writer(tmp_path / "s", {"b": 1})
    assert not w.add("big", {"rgb": np.full((2, 3), 7e4, np.float32)}, {"frame_indices": [0, 1]})
    assert w.add("ok", {"rgb": np.ones((2, 3), np.float32)}, {"frame_indices": [0, 1]})
    w.close()
    fs = FeatureStore.open(tmp_path / "s")
    assert fs.ids() == ["ok"] and [e["id"] for e in fs.errors()] == ["big"]


# ----------------------------------------------------------------------------------------------- settings

@pytest.mark.faults
@pytest.mark.parametrize("args, expect", [
    (["--streams", "rgb,flow", "--flow", "dis", "--flow-param", "preset=bogus"], "flow dis with preset=bogus"),
    (["--streams", "rgb,flow", "--flow", "tvl1", "--flow-param", "nosuch=1"], "unexpected keyword argument"),
    (["--streams", "rgb,flow", "--flow", "tvl1", "--flow-param", "tau=fast"], "--flow-param tau='fast'"),
    (["--streams", "rgb,flow", "--flow-bound", "-5"], "--flow-bound must be a finite number > 0"),
    (["--streams", "rgb,flow", "--flow-stack", "0"], "--flow-stack must be >= 1"),
    (["--frames", "0"], "--frames must be >= 1"),
    (["--fps", "0"], "--fps must be a finite rate > 0"),
    (["--fps", "1", "--max-frames", "0"], "--max-frames must be >= 1"),
    (["--commit-every", "0"], "--commit-every must be >= 1"),
    (["--timeout", "0"], "--timeout must be > 0"),
])
def test_bad_setting_refused_before_a_store_exists(dataset, tmp_path, run_cli, args, expect):
    """An invalid extraction setting."""
    code, out = run_cli("extract", dataset, "--out", tmp_path / "s", "--quiet", *args)
    assert code == 2 and expect in one_line(out)
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------------------- errors file, caching

@pytest.mark.faults
def test_retry_failed_keeps_one_error_per_video(tmp_path, run_cli):
    """--retry-failed on videos that fail again."""
    root = tmp_path / "data"
    write_video(root / "ok" / "good.avi", 10)
    (root / "bad").mkdir()
    (root / "bad" / "empty.avi").write_bytes(b"")
    (root / "bad" / "text.avi").write_text("not a video\n" * 20)
    store = tmp_path / "store"
    assert run_cli("extract", root, "--out", store, *FAST)[0] == 0
    code, out = run_cli("extract", root, "--out", store, *FAST, "--retry-failed")
    assert code == 0 and "failed 2 of 2" in out, out
    code, out = run_cli("info", store, "--json")
    assert json.loads(out)["errors"] == 2
    assert len((store / "errors.jsonl").read_text().splitlines()) == 2


def _write_store(path: Path, videos: dict[str, np.ndarray], sources: dict[str, str]) -> None:
    with FeatureStore.writer(path, {"b": 1}, ["a"], commit_every=2) as w:
        for vid, rgb in videos.items():
            w.add(vid, {"rgb": rgb}, {"frame_indices": np.arange(len(rgb)), "sha256": sources[vid]})


@pytest.mark.faults
def test_fingerprint_follows_features_and_sources(tmp_path):
    """A video re-extracted from another file."""
    rng = np.random.default_rng(0)
    videos = {f"v{i}": rng.standard_normal((3, 4)).astype(np.float16) for i in range(3)}
    sources = {v: f"sha-{v}" for v in videos}
    _write_store(tmp_path / "a", videos, sources)
    base = FeatureStore.open(tmp_path / "a").fingerprint
    _write_store(tmp_path / "same", videos, sources)
    assert FeatureStore.open(tmp_path / "same").fingerprint == base  # same data, same name: runs stay cached
    changed = {**videos, "v1": videos["v1"] + np.float16(1)}
    _write_store(tmp_path / "b", changed, sources)
    assert FeatureStore.open(tmp_path / "b").fingerprint != base
    _write_store(tmp_path / "c", videos, {**sources, "v2": "sha-other"})
    assert FeatureStore.open(tmp_path / "c").fingerprint != base
    # a store written before feature digests: computed from the stored data, the same fingerprint
    for part in (tmp_path / "same" / "parts").glob("*.h5"):
        with h5py.File(part, "a") as f:
            del f["digests"]
    assert FeatureStore.open(tmp_path / "same").fingerprint == base


@pytest.mark.faults
@pytest.mark.slow
def test_train_is_not_cached_after_a_video_is_re_extracted(tmp_path):
    """Stage two after a video's features changed."""
    import stages.train as st
    from tests.synthetic import write_ucf_store

    root, store = write_ucf_store(tmp_path, ["Alpha", "Beta"], groups=3, clips=1, T=4)
    job = st.TrainJob(store=str(store), dataset=str(root), head="late-pool", streams=("rgb",),
                      overrides=(("epochs", "1"), ("hidden", "8"), ("frames", "1")), out=str(tmp_path / "runs"),
                      fusion_fold=0.0)  # one training group per class: none to spare for a fusion fold
    first = st.train(job, progress=False, echo=lambda _: None)
    assert st.train(job, progress=False, echo=lambda _: None).cached
    with FeatureStore.open(store) as fs:
        feats = {v: {s: fs.get(v, s) for s in fs.streams} for v in fs.ids()}
        classes, config = fs.classes, fs.config
    victim = min(feats)
    feats[victim]["rgb"] = feats[victim]["rgb"] + np.float16(0.5)  # its file was replaced and extracted again
    shutil.rmtree(store)
    with FeatureStore.writer(store, config, classes) as w:
        for v, f in feats.items():
            w.add(v, f, {"frame_indices": np.arange(len(f["rgb"]))})
    again = st.train(job, progress=False, echo=lambda _: None)
    assert not again.cached and again.path != first.path


@pytest.mark.faults
def test_merge_reports_a_video_committed_twice(dataset, tmp_path):
    """merge over a store where a video landed in two parts."""
    from stages.distributed import merge

    store = tmp_path / "store"
    for i in range(2):
        extract(dataset, store, CFG, replace(OPTS, shard=(i, 2)))
    # a plain writer that raced a shard and committed one of its videos too
    with FeatureStore.open(store) as fs:
        vid = fs.ids()[0]
        feats, meta = {"rgb": fs.get(vid)}, fs.meta(vid)
    with FeatureStore.writer(store, FeatureStore.read_header(store)["config"]) as w:
        w.done.discard(vid)
        w.add(vid, feats, meta)
    r = merge(store)
    assert list(r["duplicates"]) == [vid] and r["videos"] == 6
    findings, _ = verify_store(store)
    (dup,) = [f for f in findings if "also in" in f.why]
    assert not dup.damage and "same features" in dup.why
