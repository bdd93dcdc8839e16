"""Scale-out extraction: shard slices, sharded runs equal to one process, Ray retries, merge checks."""

import json
import os
import re
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import UserError
from pipeline.sampling import Sampling
from pipeline.store import FeatureStore
from stages.distributed import ShardError, merge, parse_shard, shard_bounds, shard_name, shard_slice, shards_for
from stages.extract import ExtractConfig, RunOptions, extract
from tests.test_extract import write_video

ROOT = Path(__file__).resolve().parents[1]
# A tiny random-weight CNN keeps a shard to a fraction of a second; the code path is the one of any backbone.
CFG = ExtractConfig(sampling=Sampling(mode="frames", frames=4), backbone="timm:test_efficientnet", weights="random")
OPTS = RunOptions(workers=0, commit_every=1, progress=False)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """2 classes x 3 videos; left1 is long, so a worker killed after left0's commit dies mid-shard."""
    root = tmp_path_factory.mktemp("shards")
    for c, cls in enumerate(["left", "right"]):
        for k in range(3):
            long = (cls, k) == ("left", 1)
            write_video(root / cls / f"{cls}{k}.avi", 240 if long else 12 + 6 * k, h=120 if long else 48,
                        w=160 if long else 64, seed=10 * c + k)
    return root


@pytest.fixture(scope="module")
def reference(dataset, tmp_path_factory):
    """The single-process run."""
    torch.set_num_threads(1)
    out = tmp_path_factory.mktemp("ref") / "store"
    s = extract(dataset, out, CFG, OPTS)
    assert s.done == 6
    return FeatureStore.open(out)


def assert_same_features(a: FeatureStore, b: FeatureStore) -> None:
    assert a.ids() == b.ids() and len(a) == 6
    for vid in a.ids():
        assert np.array_equal(a.get(vid, "rgb"), b.get(vid, "rgb")), vid  # bitwise: float16 arrays equal
        assert np.array_equal(a.meta(vid)["frame_indices"], b.meta(vid)["frame_indices"]), vid


def all_part_ids(store: Path) -> list[str]:
    import h5py

    out = []
    for part in sorted((store / "parts").glob("*.h5")):
        with h5py.File(part, "r") as f:
            out += [s.decode() for s in f["ids"][()]]
    return out


# --- shard arithmetic ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("n_videos", [0, 1, 5, 13, 100])
@pytest.mark.parametrize("n", [1, 2, 3, 7, 16])
def test_shard_slices_cover_every_video_exactly_once(n_videos, n):
    videos = [f"v{k:03d}" for k in range(n_videos)]
    slices = [shard_slice(videos, i, n) for i in range(n)]
    assert [v for s in slices for v in s] == videos  # disjoint, in order, nothing left out
    sizes = [len(s) for s in slices]
    assert max(sizes) - min(sizes) <= 1
    assert shard_bounds(n_videos, 0, n)[0] == 0 and shard_bounds(n_videos, n - 1, n)[1] == n_videos


@pytest.mark.parametrize("n_videos, size", [(6, 2), (7, 2), (1000, 64), (1, 64), (0, 64)])
def test_ray_shards_hold_at_most_shard_size(n_videos, size):
    n = shards_for(n_videos, size)
    assert n == max(1, -(-n_videos // size))
    assert all(b - a <= size for a, b in (shard_bounds(n_videos, i, n) for i in range(n)))


def test_parse_shard_and_names():
    assert parse_shard("3/16") == (3, 16) and parse_shard(" 0 / 1 ") == (0, 1)
    for bad in ["16/16", "-1/3", "a/b", "3/0", "3"]:
        with pytest.raises(Exception, match="0-based|i/N"):
            parse_shard(bad)
    assert shard_name(3, 16) == "s0003of0016" and shard_name(12345, 20000) == "s12345of20000"
    names = [shard_name(i, 300) for i in range(300)]
    assert names == sorted(names)


# --- --shard i/N runs (no Ray): equal to one process, never redone, merge -------------------------------------

def test_shard_runs_equal_single_process_then_merge(dataset, reference, tmp_path):
    store = tmp_path / "store"
    for i in range(3):
        s = extract(dataset, store, CFG, replace(OPTS, shard=(i, 3)))
        assert s.done == 2 and s.failed == 0
    assert sorted(p.name for p in (store / "shards").glob("*.json")) == [f"{shard_name(i, 3)}.json" for i in range(3)]
    parts = sorted(p.name for p in (store / "parts").glob("*.h5"))  # each with its .sha256
    assert all(re.fullmatch(r"s000[0-2]of0003\.a[0-9a-f]{6}-\d{6}\.h5", p) for p in parts)  # shard.attempt-seq
    # a committed shard is never redone: nothing extracted, no new part
    s = extract(dataset, store, CFG, replace(OPTS, shard=(1, 3)))
    assert s.done == 0 and s.skipped == 2 and sorted(p.name for p in (store / "parts").glob("*.h5")) == parts
    with FeatureStore.open(store) as fs:  # stage two reads a sharded store like any other, before merge too
        assert_same_features(reference, fs)
    r = merge(store, checksums=True)
    assert r["shards"] == 3 and r["videos"] == 6 and r["failed"] == 0 and r["manifest_videos"] == 6
    index = json.loads((store / "index.json").read_text())
    assert sorted(index["parts"]) == parts and sorted(index["videos"]) == reference.ids()
    part, a, b = index["videos"]["left/left1.avi"]
    assert part.startswith("s0000of0003.a") and b - a == 4
    with FeatureStore.open(store) as fs:
        assert_same_features(reference, fs)


def test_merge_names_a_missing_or_uncommitted_shard(dataset, tmp_path):
    store = tmp_path / "store"
    for i in (0, 2):
        extract(dataset, store, CFG, replace(OPTS, shard=(i, 3)))
    with pytest.raises(ShardError, match=r"shard 1/3 \(s0001of0003\) is missing"):
        merge(store)
    assert not (store / "index.json").exists()
    # a shard that committed some videos but not all: parts, no shard manifest
    s = extract(dataset, store, CFG, replace(OPTS, shard=(1, 3), limit=1))
    assert s.done == 1 and not (store / "shards" / "s0001of0003.json").exists()
    with pytest.raises(ShardError, match=r"shard 1/3 \(s0001of0003\) is not committed: 1 part"):
        merge(store)
    s = extract(dataset, store, CFG, replace(OPTS, shard=(1, 3)))
    assert s.done == 1 and s.skipped == 1  # resumed from its own committed part
    assert merge(store)["videos"] == 6
    # a part that disappears after its shard was committed
    victim = min((store / "parts").glob("s0002of0003.a*-*.h5"))
    victim.unlink()
    with pytest.raises(ShardError, match=f"shard 2/3: part {victim.name} .* is missing"):
        merge(store)


def test_merge_cli_error_is_one_line(dataset, tmp_path, capsys):
    from cli.main import main

    store = tmp_path / "store"
    extract(dataset, store, CFG, replace(OPTS, shard=(1, 2)))
    with pytest.raises(SystemExit) as e:
        main(["merge", str(store)])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "shard 0/2 (s0000of0002) is missing" in err[0]


# --- the Ray engine ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


@pytest.mark.slow
def test_ray_engine_equals_single_process(dataset, reference, ray_cluster, tmp_path):
    from stages.distributed import run_ray

    store = tmp_path / "store"
    s = run_ray(dataset, store, CFG, OPTS, shard_size=2, progress=False)
    assert (s.shards, s.done, s.skipped, s.failed, s.videos_done) == (3, 3, 0, [], 6)
    with FeatureStore.open(store) as fs:
        assert_same_features(reference, fs)
    assert merge(store)["videos"] == 6
    s = run_ray(dataset, store, CFG, OPTS, shard_size=2, progress=False)  # committed shards are never redone
    assert (s.done, s.skipped, s.videos_done) == (0, 3, 0)
    # another config into this store: every task refuses it; the driver stops and says it once, as a user error
    other = replace(CFG, sampling=Sampling(mode="frames", frames=5))
    with pytest.raises(UserError, match=r"shard \d/2: .*different config"):
        run_ray(dataset, store, other, OPTS, shard_size=3, progress=False)


@pytest.mark.slow
def test_ray_worker_killed_mid_shard_is_retried(dataset, reference, ray_cluster, tmp_path):
    """SIGKILL the Ray worker of shard 0 after its first video is committed: Ray reruns the task, the new attempt
    reuses the committed part and extracts the rest; every video is stored once and equals the reference."""
    from stages.distributed import run_ray

    store = tmp_path / "store"
    result = {}
    runner = threading.Thread(target=lambda: result.update(s=run_ray(dataset, store, CFG, OPTS, shard_size=2,
                                                                     progress=False)))
    runner.start()
    attempts = store / "shards" / "s0000of0003.attempts"
    killed = first_part = None
    deadline = time.time() + 300
    while time.time() < deadline and runner.is_alive():
        first_part = min((store / "parts").glob("s0000of0003.a*-000000.h5"), default=None)
        if first_part is not None:
            assert not (store / "shards" / "s0000of0003.json").exists(), "shard 0 finished before it could be killed"
            killed = json.loads(attempts.read_text().splitlines()[0])["pid"]
            os.kill(killed, signal.SIGKILL)
            break
        time.sleep(0.002)
    runner.join(timeout=600)
    assert killed is not None and not runner.is_alive()
    s = result["s"]
    assert (s.shards, s.done, s.failed) == (3, 3, [])
    lines = [json.loads(x) for x in attempts.read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["pid"] == killed and lines[1]["pid"] != killed  # retried, elsewhere
    manifest = json.loads((store / "shards" / "s0000of0003.json").read_text())
    assert manifest["committed"]["left/left0.avi"] == first_part.name  # the dead attempt's commit was reused
    assert sorted(all_part_ids(store)) == reference.ids()  # each video committed exactly once
    with FeatureStore.open(store) as fs:
        assert_same_features(reference, fs)
    assert merge(store)["videos"] == 6


@pytest.mark.faults
def test_a_shard_attempt_that_writes_after_the_shard_was_committed_is_set_aside(dataset, reference, tmp_path, capsys):
    """Two attempts of one shard racing: merge keeps the committed one and names the other"""
    from cli.main import main
    from pipeline.store import family_parts
    from stages.distributed import attempt_name

    store = tmp_path / "store"
    for i in range(2):
        extract(dataset, store, CFG, replace(OPTS, shard=(i, 2)))
    with FeatureStore.open(store) as fs:
        config, classes = fs.config, fs.classes
        late = {v: {"rgb": fs.get(v, "rgb") + np.float16(1)} for v in fs.ids()[:2]}  # shard 0's first videos
    committed = family_parts(store, shard_name(0, 2))
    # an attempt cut off from the cluster keeps writing after another attempt committed shard 0
    zombie = attempt_name(shard_name(0, 2))
    with FeatureStore.writer(store, config, classes, name=zombie, only_own=shard_name(0, 2)) as w:
        w.done.clear()  # it started before the other attempt committed: it believes these videos are still to do
        for v, f in late.items():
            w.add(v, f, {"frame_indices": np.arange(4)})
    (zombie_part,) = (store / "parts").glob(f"{zombie}-*.h5")
    assert family_parts(store, shard_name(0, 2)) == sorted([*committed, zombie_part])  # both attempts' parts
    main(["merge", str(store)])  # returns on success (errors exit)
    err = capsys.readouterr().err
    assert f"superseded s0000of0002: {zombie_part.name}" in err
    assert (store / "superseded" / zombie_part.name).is_file() and not zombie_part.exists()
    index = json.loads((store / "index.json").read_text())
    assert index["superseded"] == [zombie_part.name] and not index["duplicates"]
    with FeatureStore.open(store) as fs:
        assert not fs.duplicates
        assert_same_features(reference, fs)  # the committed attempt's features, not the zombie's
