"""Streamed training sets: shuffled part order through a bounded shuffle buffer, read ahead in a background thread.

A synthetic store of many small parts (``commit_every=8``) with classes told apart by a class direction in noise;
the streamed batches are checked against the same set held in memory.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import pipeline.heads  # noqa: F401  (registers the heads)
from pipeline.errors import UserError
from pipeline.features import MIN_SHUFFLE_BUFFER, VideoFeatures, buffered_order, iter_batches
from pipeline.registry import HEADS
from pipeline.store import FeatureStore
from pipeline.training import fit, predict, resolve_configs

torch.set_num_threads(1)

N, T, DIM, CLASSES, PER_PART = 120, 5, 8, 3, 8


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("stream") / "store"
    rng = np.random.default_rng(0)
    directions = 2.0 * rng.standard_normal((CLASSES, DIM))
    meta = {"frame_indices": np.arange(T), "fps": 25.0, "n_frames": T, "duration": 1.0, "size": 0, "sha256": ""}
    with FeatureStore.writer(path, {"test": "stream"}, [f"c{k}" for k in range(CLASSES)], name="t",
                             commit_every=PER_PART) as w:
        for i in range(N):
            w.add(f"c{i % CLASSES}/v_{i:04d}", {"rgb": rng.standard_normal((T, DIM)) + directions[i % CLASSES]}, meta)
    fs = FeatureStore.open(path)
    yield fs
    fs.close()


def _set(fs, ids=None, **kw):
    ids = fs.ids() if ids is None else ids
    return VideoFeatures(fs, ids, [int(v[1]) for v in ids], ("rgb",), frames=T, **kw)


def _epoch(data, seed, batch_size=10):
    gen = torch.Generator().manual_seed(seed)
    return list(iter_batches(data, batch_size, shuffle=True, generator=gen))


def test_buffered_order_reads_whole_parts_and_batches_within_the_buffer():
    groups = [list(range(a, a + 8)) for a in range(0, 120, 8)]
    read, order = buffered_order(groups, 16, torch.Generator().manual_seed(3))
    assert sorted(read) == sorted(order) == list(range(120))  # every video once per epoch
    starts = [g[0] for g in groups]
    chunks = [read[k:k + 8] for k in range(0, 120, 8)]
    assert all(c in groups for c in chunks) and [c[0] for c in chunks] != starts  # whole parts, shuffled order
    at = {v: k for k, v in enumerate(read)}
    assert all(at[v] < 16 + k for k, v in enumerate(order))  # batch position k: among the first 16 + k read
    again = buffered_order(groups, 16, torch.Generator().manual_seed(3))
    other = buffered_order(groups, 16, torch.Generator().manual_seed(4))
    assert again == (read, order) and other[1] != order  # seeded
    assert order[:16] != read[:16]  # shuffled inside the buffer, not the read order
    # A buffer that holds the set: the order of a set in memory (torch.randperm), so the two train alike.
    _, whole = buffered_order(groups, 120, torch.Generator().manual_seed(3))
    assert whole == torch.randperm(120, generator=torch.Generator().manual_seed(3)).tolist()


def test_streamed_batches_are_the_stored_features_seeded_and_bounded(store):
    memory = _set(store)
    streamed = _set(store, in_memory=False, shuffle_buffer=16)
    assert memory.in_memory and not streamed.in_memory and streamed.shuffle_buffer == 16
    batches = _epoch(streamed, seed=1)
    assert streamed.held_max <= 16  # never more videos read ahead than the buffer holds
    seen = []
    for x, mask, y in batches:
        assert mask is None and x.dtype == torch.float16 and x.shape[1:] == (T, DIM)
        for row, label in zip(x, y.tolist()):
            match = [i for i in range(N) if torch.equal(memory.item(i), row)]
            assert len(match) == 1 and memory.labels[match[0]] == label
            seen.append(match[0])
    assert sorted(seen) == list(range(N))  # each video once, with its own label
    again = _epoch(_set(store, in_memory=False, shuffle_buffer=16), seed=1)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[2], b[2]) for a, b in zip(batches, again))  # same seed
    other = _epoch(streamed, seed=2)
    assert not torch.equal(torch.cat([b[2] for b in batches]), torch.cat([b[2] for b in other]))


def test_streamed_evaluation_keeps_order_and_the_reader_stops(store):
    memory, streamed = _set(store), _set(store, in_memory=False, shuffle_buffer=16)
    for (xa, _, ya), (xb, _, yb) in zip(iter_batches(memory, 32), iter_batches(streamed, 32)):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert streamed.held_max <= 16
    threads = threading.active_count()
    it = iter_batches(streamed, 10, shuffle=True, generator=torch.Generator().manual_seed(0))
    next(it)
    it.close()  # training stopped early (patience): the background reader ends
    assert threading.active_count() == threads


def test_a_read_error_in_the_background_reaches_the_caller():
    class Store:
        def __init__(self):
            self.streams = {"rgb": 2}

        def get(self, video_id, stream):
            x = np.ones((3, 2), np.float16)
            if video_id == "v7":
                x[1, 0] = np.nan
            return x

    ids = [f"v{i}" for i in range(20)]
    data = VideoFeatures(Store(), ids, [0] * 20, ("rgb",), frames=3, in_memory=False, shuffle_buffer=4)
    with pytest.raises(UserError, match="video v7: its rgb features hold 1 non-finite"):
        for _ in iter_batches(data, 4, shuffle=True, generator=torch.Generator().manual_seed(0)):
            pass


def test_the_buffer_follows_the_budget(store):
    video = T * DIM * 2
    assert _set(store, memory_gb=0, in_memory=False).shuffle_buffer == MIN_SHUFFLE_BUFFER
    assert _set(store, memory_gb=1000 * video / 2**30, in_memory=False).shuffle_buffer == 1000


@pytest.mark.slow  # two runs of the default recipe (600 steps each): about 15 s
def test_streamed_training_through_a_small_buffer_learns_as_in_memory(store):
    """The default recipe on a set that fits both ways: streamed through a buffer of 16 of its 72 training videos
    (other batches than in memory), the test accuracy is the same."""
    ids = store.ids()
    train, val, test = ids[::5] + ids[1::5] + ids[2::5], ids[3::5], ids[4::5]
    head_cfg, cfg = resolve_configs("temporal-pool", {"frames": str(T)}, seed=0)

    accuracy = {}
    for streamed in (False, True):
        kw = {"in_memory": False, "shuffle_buffer": 16} if streamed else {}
        torch.manual_seed(0)
        head = HEADS.get("temporal-pool").builder(head_cfg, DIM, CLASSES, (DIM,))
        fit(head, _set(store, train, **kw), _set(store, val, **kw), cfg, torch.device("cpu"), progress=False)
        te = _set(store, test, **kw)
        accuracy[streamed] = float((predict(head, te, torch.device("cpu")).argmax(1) == te.labels).mean())
    assert accuracy[True] == accuracy[False] >= 0.9
