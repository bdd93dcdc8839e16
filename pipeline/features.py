"""Cached features joined with a manifest split, as tensors for stage two.

One video id is followed from the manifest (label, group) to the feature store (``[T, D]`` float16 per
stream) to a batch ``x [B, T, D]`` with a validity ``mask [B, T]`` and labels ``y [B]``:

- ``join``: keep the manifest items whose features are committed in the store (a clear error otherwise);
- ``carve_validation``: a validation split carved from the training list by *group*, so the clips of one
  UCF101 group (same actor and scene, "ApplyEyeMakeup_g08") never straddle train and validation;
- ``sample_frames``: fixed-T sampling, 25 equally spaced frames per video (Ma et al. Section 3.3 "Testing",
  after Simonyan and Zisserman), or every stored frame (variable length, padded and masked per batch);
- ``VideoFeatures``: a torch ``Dataset`` held in memory as float16 when it fits the memory budget, streamed
  from the HDF5 store when it does not; streams (``rgb``, ``flow``) are concatenated per frame in the order given,
  and ``stream_dims`` tells the head where one ends;
- ``buffered_order``: the order a streamed training set is read and batched in: its parts in a shuffled order,
  each read front to back, through a shuffle buffer of a fixed number of videos (``iter_batches`` reads ahead in
  a background thread), so memory stays bounded whatever the store's size and a seed fixes the batches.

Labels live in the manifest and never in the store, so one extraction serves every split.
"""

from __future__ import annotations

import ctypes
import math
import threading
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from pipeline.errors import UserError

__all__ = ["FUSION_FOLD_SEED", "MIN_SHUFFLE_BUFFER", "VideoFeatures", "buffered_order", "carve_fusion_fold",
           "carve_validation", "check_frames", "collate", "describe_sampling", "features_nbytes", "iter_batches", "join",
           "sample_frames", "video_level"]

MIN_SHUFFLE_BUFFER = 256  # videos: the least a streamed training set shuffles among, whatever the budget
LOAD_CHUNK_BYTES = 16 * 2**20  # what loading into memory reads at once (on top of the set itself)


def sample_frames(n_stored: int, frames: int) -> np.ndarray:
    """Indices of ``frames`` equally spaced frames among ``n_stored`` (both ends included); all when frames <= 0.

    Ma et al. test on "25 frames ... sampled equally across each of the videos". A store that already holds 25
    equally spaced frames is returned unchanged; a video with fewer stored frames than asked repeats its
    nearest frames, so every sample of a fixed-T set has exactly ``frames`` steps.
    """
    if n_stored <= 0:
        raise ValueError("a video with no stored frames cannot be sampled")
    if frames <= 0:
        return np.arange(n_stored)
    return np.round(np.linspace(0, n_stored - 1, frames)).astype(np.int64)  # [frames]


def describe_sampling(sampling: dict) -> str:
    """A store's ``sampling`` config in words: "25 equally spaced frames per video", "1 frame per second", ..."""
    mode = sampling.get("mode")
    if mode == "frames":
        return f"{sampling['frames']} equally spaced frames per video"
    if mode == "fps":
        cap = f"padded or cut to {sampling['frames']}" if sampling.get("frames") else f"at most {sampling['max_frames']}"
        return f"{sampling['fps']:g} frames per second ({cap})"
    return "every frame"


def check_frames(sampling: dict | None, frames: int, lengths: Sequence[int], head: str, head_cfg=None) -> list[str]:
    """What a head reads that the store does not hold: raise ``UserError`` where the number would mislead,
    return notes for the run's record (``metrics.json["warnings"]``) where it is a stated departure.

    ``sampling`` is the store's sampling config (None: not recorded), ``frames`` the fixed T the trainer samples
    (0: every stored frame), ``lengths`` the stored frame counts of the run's videos. A head config may declare
    ``frame_rate``: a tuple of the rates its paper sampled at (Ng et al. Sec. 4: 1 fps on Sports-1M, 6 and 30 fps
    on UCF-101), or ``"full"`` for clips of consecutive frames (Karpathy et al. Sec. 3: 10 frames, "approximately a
    third of a second"), with ``clip_span`` and ``any_rate``.

    - A fixed T above what a store of a fixed count holds per video (25 from ``--frames 25``) would repeat
      frames in every video: refused. Variable-length stores: the videos shorter than T are counted in a note.
    - Clips of consecutive frames on a store not sampled at the full rate span far more time than the paper's
      (10 of 25 equally spaced frames: 40% of the video): refused unless ``any_rate``, which leaves a note.
    - A head on a store not sampled at one of its paper's rates: a note (Ng et al. Table 6 find the rate matters
      little "as long as the network sees enough context").
    """
    notes: list[str] = []
    how = describe_sampling(sampling) if sampling else None
    fixed = sampling and (sampling.get("frames") if sampling.get("mode") in ("frames", "fps") else None)
    if frames > 0:
        if fixed and fixed < frames:
            raise UserError(f"{head} reads {frames} frames per video but the store holds {fixed} ({how}): "
                            f"--set frames={fixed}, or extract with --frames {frames} (or --fps RATE --frames {frames})")
        short = sum(n < frames for n in lengths)
        if short:
            notes.append(f"{short} of {len(lengths)} videos have fewer than {frames} stored frames; "
                         f"their frames were repeated to make {frames}")
    rate = getattr(head_cfg, "frame_rate", None)
    if sampling and rate == "full" and getattr(head_cfg, "clip_span", 1) > 1:
        span = head_cfg.clip_span
        fps = sampling.get("fps") if sampling.get("mode") == "fps" else None
        if sampling.get("mode") == "all":
            pass
        elif fps and fps >= 15:
            notes.append(f"clips of {span} frames at {fps:g} fps span {span / fps:.2f} s")
        elif not getattr(head_cfg, "any_rate", False):
            raise UserError(f"{head} reads clips of {span} consecutive frames at the full frame rate (about 1/3 s), "
                            f"but the store holds {how}: extract with --all-frames, or --set any_rate=true to "
                            "count clips in stored frames")
        else:
            notes.append(f"clips of {span} stored frames of a store holding {how} (any_rate): the paper's clips "
                         "are consecutive frames at the full rate")
    elif sampling and isinstance(rate, tuple) and not (sampling.get("mode") == "fps" and sampling.get("fps") in rate):
        notes.append(f"{head} follows a paper that sampled {' / '.join(f'{r:g}' for r in rate)} frames per second; "
                     f"the store holds {how}")
    return notes


def join(items: Sequence, store_ids: set[str] | Sequence[str], allow_missing: bool = False, what: str = "split"):
    """Manifest items whose features are in the store. Missing ones raise ``UserError`` (count and a few ids),
    or with ``allow_missing`` are skipped with a warning (e.g. videos that failed to decode)."""
    have = store_ids if isinstance(store_ids, set) else set(store_ids)
    missing = [it.id for it in items if it.id not in have]
    if missing:
        example = ", ".join(missing[:3]) + (", ..." if len(missing) > 3 else "")
        msg = f"{len(missing)} of {len(items)} videos of the {what} are not in the feature store ({example})"
        if not allow_missing:
            raise UserError(msg + "; extract them first, or pass --allow-missing to skip them")
        warnings.warn(msg + "; skipped (--allow-missing)", stacklevel=2)
    return [it for it in items if it.id in have]


def carve_validation(items: Sequence, fraction: float, seed: int = 0,
                     pinned: frozenset[str] | set[str] = frozenset()) -> tuple[list, list]:
    """Split training items into (train, val) by group, about ``fraction`` of each class going to val.

    Groups (``item.group``; the video id where a dataset has none) are shuffled per class with ``seed`` and
    moved to validation until the class's share reaches ``fraction`` (so a class with two or more groups has at
    least one in validation, and always keeps one in training). A group whose clips carry several labels is placed with its most common label, so a group is
    never split whatever its labels.

    ``pinned``: ids that must stay in training (videos a fine-tuned CNN was trained on, ``pipeline.provenance``);
    their groups are never moved, and the shares are still taken of the whole class.
    """
    if fraction <= 0:
        return list(items), []
    members: dict[str, list] = defaultdict(list)
    for it in items:
        members[it.group or it.id].append(it)
    by_class: dict[int, list[str]] = defaultdict(list)
    pinned_total: dict[int, int] = defaultdict(int)
    for g, its in members.items():
        labels = [it.label for it in its]
        major = max(set(labels), key=lambda lab: (labels.count(lab), -lab))
        if any(it.id in pinned for it in its):
            pinned_total[major] += len(its)
        else:
            by_class[major].append(g)
    rng = np.random.default_rng(seed)
    val_groups: set[str] = set()
    for label in sorted(by_class):
        groups = sorted(by_class[label])
        rng.shuffle(groups)
        total = sum(len(members[g]) for g in groups) + pinned_total[label]
        target, taken = fraction * total, 0
        for g in (groups if pinned_total[label] else groups[:-1]):  # one group always stays in training
            if taken >= target:
                break
            val_groups.add(g)
            taken += len(members[g])
    train = [it for it in items if (it.group or it.id) not in val_groups]
    val = [it for it in items if (it.group or it.id) in val_groups]
    return train, val


def _check_finite(arr: np.ndarray, video_id: str, stream: str) -> None:
    """Refuse a video whose stored features hold NaN or Inf: a head would train on them without a word and every
    score it gives would be NaN. One vectorised pass over the array as it is read; for float16 a bit test (exponent
    all ones: Inf or NaN), twice as fast as ``np.isfinite``."""
    if arr.dtype == np.float16:
        finite = not ((arr.view(np.uint16) & 0x7C00) == 0x7C00).any()
    else:
        finite = bool(np.isfinite(arr).all())
    if not finite:
        bad = int(arr.size - np.isfinite(arr).sum())
        raise UserError(f"video {video_id}: its {stream} features hold {bad} non-finite values (NaN or Inf); "
                        "re-extract it or remove it from the store")


FUSION_FOLD_SEED = 2015  # fixed: every run on a split holds out the same fusion fold, whatever its head and seed


def carve_fusion_fold(items: Sequence, fraction: float,
                      pinned: frozenset[str] | set[str] = frozenset()) -> tuple[list, list]:
    """Split training items into (rest, fusion fold) by group, as ``carve_validation`` with a fixed seed.

    Score fusion (Wu et al. 2015, Sec. 4.2.3: weights "estimated by cross-validation") needs videos that none of
    the fused runs trained on or chose its epoch with; a fold carved first, with a seed of its own, is held out by
    every run of the split, so any set of runs can be fused on it.
    """
    return carve_validation(items, fraction, FUSION_FOLD_SEED, pinned)


def _n_stored(store, ids: Sequence[str]) -> list[int]:
    """Stored frame counts, without reading features."""
    if hasattr(store, "lengths"):
        return list(store.lengths(ids))
    return [len(store.meta(v)["frame_indices"]) for v in ids]


class VideoFeatures(torch.utils.data.Dataset):
    """Features of a list of videos: item ``i`` is ``(x [T_i, D] float16 tensor, label)``.

    ``labels``: class indices [N] (single-label data), or for multi-label data an indicator matrix [N, C] (held as
    float32, so a batch's ``y`` is the [B, C] target of a per-class sigmoid loss).

    ``in_memory=None`` decides by ``memory_gb``: the float16 bytes of the sampled frames must fit, else the set
    is streamed from the store. Fixed-T data in memory is one ``[N, T, D]`` array, so a batch is a single index
    operation. A streamed set is read by ``iter_batches`` in a background thread: in training through a shuffle
    buffer of ``shuffle_buffer`` videos (default: as many as ``memory_gb`` holds, at least
    ``MIN_SHUFFLE_BUFFER``), in evaluation in order, one batch ahead; ``held_max`` records the most videos read
    and not yet batched at once (the batch being gathered adds one batch).
    """

    def __init__(self, store, ids: Sequence[str], labels: Sequence[int], streams: Sequence[str], frames: int = 25,
                 memory_gb: float = 4.0, in_memory: bool | None = None, chunk: int | None = None,
                 shuffle_buffer: int | None = None):
        if not streams:
            raise UserError("choose at least one stream")
        dims = store.streams
        for s in streams:
            if s not in dims:
                raise UserError(f"the feature store has no stream {s!r}; it has: {', '.join(dims)}")
        self.store, self.ids, self.streams, self.frames = store, list(ids), tuple(streams), int(frames)
        labels = np.asarray(labels)
        self.labels = labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int64)
        self.stream_dims = tuple(int(dims[s]) for s in self.streams)
        self.dim = sum(self.stream_dims)
        n_frames = [self.frames] * len(self.ids) if self.frames > 0 else _n_stored(store, self.ids)
        self.nbytes = int(sum(n_frames)) * self.dim * 2  # float16
        self.in_memory = self.nbytes <= memory_gb * 2**30 if in_memory is None else in_memory
        video_bytes = max(self.nbytes / max(len(self.ids), 1), 1.0)  # mean float16 bytes of one video
        if shuffle_buffer is not None and shuffle_buffer < 1:
            raise ValueError("shuffle_buffer must hold at least one video")
        fits = memory_gb * 2**30 // video_bytes if math.isfinite(memory_gb) else len(self.ids)  # videos
        self.shuffle_buffer = int(shuffle_buffer or max(MIN_SHUFFLE_BUFFER, fits))
        self.held_max = 0
        self._groups: list[list[int]] | None = None
        self._part: np.ndarray | None = None
        self._data: np.ndarray | list[torch.Tensor] | None = None
        if self.in_memory:
            self._data = self._load_all(chunk or max(1, int(LOAD_CHUNK_BYTES // video_bytes)))
            _release_free_memory()

    def _read(self, stream: str, ids: Sequence[str]) -> list[np.ndarray]:
        arrays = self.store.load(stream, ids) if hasattr(self.store, "load") else [self.store.get(v, stream) for v in ids]
        for video_id, arr in zip(ids, arrays):
            _check_finite(arr, video_id, stream)
        return arrays

    def _load_all(self, chunk: int):
        N = len(self.ids)
        if self.frames > 0:
            # One preallocated [N, T, D] block filled stream by stream: peak memory is the block plus one chunk.
            # Filled with numpy: many small torch copies pay for thread start-up on a busy machine.
            out = np.empty((N, self.frames, self.dim), dtype=np.float16)
            offset = 0
            for s, d in zip(self.streams, self.stream_dims):
                for a in range(0, N, chunk):
                    for i, arr in enumerate(self._read(s, self.ids[a:a + chunk]), start=a):
                        out[i, :, offset:offset + d] = arr[sample_frames(len(arr), self.frames)]
                offset += d
            return out  # [N, T, D]
        out = []
        for a in range(0, N, chunk):
            per_stream = [self._read(s, self.ids[a:a + chunk]) for s in self.streams]
            out += [torch.from_numpy(np.concatenate(arrs, axis=1, dtype=np.float16)) for arrs in zip(*per_stream)]
        return out  # N x [T_i, D]

    def __len__(self) -> int:
        return len(self.ids)

    def item(self, i: int) -> torch.Tensor:
        """Features of video ``i``: [T, D] float16."""
        if isinstance(self._data, np.ndarray):
            return torch.from_numpy(self._data[i])
        if self._data is not None:
            return self._data[i]
        parts = [self.store.get(self.ids[i], s) for s in self.streams]  # each [T_stored, d]
        for s, arr in zip(self.streams, parts):
            _check_finite(arr, self.ids[i], s)
        x = np.concatenate(parts, axis=1)
        if self.frames > 0:
            x = x[sample_frames(len(x), self.frames)]
        return torch.from_numpy(np.ascontiguousarray(x, dtype=np.float16))

    def items(self, index: Sequence[int]) -> list[np.ndarray]:
        """Features of the videos ``index``, each [T, D] float16 (its own array), read together: the videos of one
        part in one read where most of the part is wanted (``FeatureStore.load``)."""
        ids = [self.ids[i] for i in index]
        out = []
        for arrs in zip(*(self._read(s, ids) for s in self.streams)):
            x = np.concatenate(arrs, axis=1, dtype=np.float16)  # a copy: never a view of a part's block
            out.append(x[sample_frames(len(x), self.frames)] if self.frames > 0 else x)
        return out

    def part_of(self) -> np.ndarray:
        """[N] the part that stores each video (all 0 for a store without ``positions``)."""
        self.part_groups()
        return self._part

    def part_groups(self) -> list[list[int]]:
        """Indices of the set's videos grouped by the part that stores them, each group in stored order (a store
        without ``positions`` is one group in the set's order)."""
        if self._groups is None:
            if not hasattr(self.store, "positions") or not self.ids:
                self._groups = [list(range(len(self.ids)))]
                self._part = np.zeros(len(self.ids), np.int64)
            else:
                pos = self.store.positions(self.ids)  # [N, 2] (part, first row)
                order = np.lexsort((pos[:, 1], pos[:, 0]))
                cuts = np.flatnonzero(np.diff(pos[order, 0])) + 1
                self._groups = [g.tolist() for g in np.split(order, cuts)]
                self._part = pos[:, 0]
        return self._groups

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.item(i), (torch.from_numpy(self.labels[i]) if self.multi_label else int(self.labels[i]))

    def batch(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """``(x [B, T, D] float16, mask [B, T] bool or None, y)`` for the videos in ``index``; ``y`` is [B] int64, or
        [B, C] float32 for multi-label data."""
        index = list(index)
        y = torch.from_numpy(self.labels[index])
        if isinstance(self._data, np.ndarray):
            return torch.from_numpy(self._data[index]), None, y  # fixed T in memory: one gather [B, T, D]
        return collate([(self.item(i), 0) for i in index])[:2] + (y,)


def collate(batch: Sequence[tuple[torch.Tensor, int]]) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Pad a list of ``(x [T_i, D], label)`` to ``x [B, T_max, D]`` with ``mask [B, T_max]`` True on real frames.

    When every item has the same length the mask is None (the heads' fast path: all frames real).
    """
    xs, ys = [b[0] for b in batch], torch.tensor([int(b[1]) for b in batch], dtype=torch.int64)
    lengths = [len(x) for x in xs]
    if len(set(lengths)) == 1:
        return torch.stack(xs), None, ys  # [B, T, D]
    T = max(lengths)
    out = xs[0].new_zeros((len(xs), T, xs[0].shape[1]))  # [B, T_max, D]
    mask = torch.zeros((len(xs), T), dtype=torch.bool)  # [B, T_max]
    for b, x in enumerate(xs):
        out[b, : len(x)] = x
        mask[b, : len(x)] = True
    return out, mask, ys


def buffered_order(groups: Sequence[Sequence[int]], buffer: int,
                   generator: torch.Generator | None = None) -> tuple[list[int], list[int]]:
    """(read order, batch order) of one streamed epoch over videos grouped by the part that stores them.

    The parts are read in a shuffled order, each front to back (sequential reads); the videos pass through a
    shuffle buffer of ``buffer`` videos: once it is full, each video read takes the place of one drawn uniformly
    from the buffer, which goes to the batches; the last ``buffer`` leave in a shuffled order. Video ``k`` of
    the batch order is therefore among the first ``buffer + k`` read, so a reader that keeps at most ``buffer``
    videos read and not yet batched never waits on itself. Everything is drawn from ``generator``: the same seed
    gives the same batches. When the buffer holds the whole set the batch order is ``torch.randperm(n)``, that of a
    set held in memory, so the two train on the same batches.
    """
    n = sum(len(g) for g in groups)
    if buffer >= n:
        return [i for g in groups for i in g], torch.randperm(n, generator=generator).tolist()
    rng = np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    read = [i for k in rng.permutation(len(groups)).tolist() for i in groups[k]]
    held, out = read[:buffer], []
    for incoming, j in zip(read[buffer:], rng.integers(0, buffer, size=n - buffer).tolist()):
        out.append(held[j])
        held[j] = incoming
    rng.shuffle(held)
    return read, out + held


class _Reader:
    """Reads the videos ``read`` in that order in a background thread, holding at most ``capacity`` videos read and
    not yet taken; ``take(index)`` waits for those videos and returns them as a batch. Consecutive videos of one
    part are read together (``VideoFeatures.items``: one h5py read instead of one per video, about 6x faster per
    video), as many as there is room for. Reading (h5py, numpy) overlaps the training step, which releases the GIL
    in torch's kernels.

    Fixed-T videos are copied into ``capacity`` slots of one float16 array allocated once, so the memory held is
    that array whatever the store's size (per-video arrays freed by another thread than the one that allocated
    them would leave the heap fragmented); variable-length videos are held as they are read.
    """

    def __init__(self, data: VideoFeatures, read: Sequence[int], capacity: int, batch_size: int):
        _pin_mmap_threshold()
        self.data, self.read, self.capacity = data, read, max(int(capacity), 1)
        n_slots = self.capacity + batch_size  # the buffer, and the batch being gathered
        fixed = data.frames > 0
        self.slots = np.empty((n_slots, data.frames, data.dim), np.float16) if fixed else None
        self.free = list(range(n_slots))
        self.held: dict[int, int | torch.Tensor] = {}  # video -> slot (fixed T) or its tensor
        self.taken, self.error, self.stopped = 0, None, False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="twostream-reader", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            read, n, r = self.read, len(self.read), 0
            part = self.data.part_of()
            while r < n:
                with self.cond:
                    while not self.stopped and (r - self.taken >= self.capacity or
                                                (self.slots is not None and not self.free)):
                        self.cond.wait()
                    if self.stopped:
                        return
                    room = self.capacity - (r - self.taken)
                    room = min(room, len(self.free)) if self.slots is not None else room
                    m = 1  # the next videos of the same part, as many as there is room for: one read
                    while m < room and r + m < n and part[read[r + m]] == part[read[r]]:
                        m += 1
                    slots = [self.free.pop() for _ in range(m)] if self.slots is not None else None
                run = read[r:r + m]
                xs = self.data.items(run)  # read outside the lock
                if slots is not None:
                    for slot, x in zip(slots, xs):
                        self.slots[slot] = x
                with self.cond:
                    for k, i in enumerate(run):
                        self.held[i] = slots[k] if slots is not None else torch.from_numpy(xs[k])
                    self.data.held_max = max(self.data.held_max, len(self.held))
                    self.cond.notify_all()
                r += m
        except Exception as e:  # noqa: BLE001 - any read error is handed to the consumer and raised there
            with self.cond:
                self.error = e
                self.cond.notify_all()

    def take(self, index: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(x [B, T, D] float16, mask [B, T] or None)`` of the videos ``index``, taken one by one as they are
        read (each frees a place in the buffer for the next read)."""
        got = []
        with self.cond:
            for i in index:
                while i not in self.held:
                    if self.error is not None:
                        raise self.error
                    if not self.thread.is_alive():
                        raise RuntimeError(f"the background reader stopped before video {i}")
                    self.cond.wait(timeout=1.0)
                got.append(self.held.pop(i))
                self.taken += 1
                self.cond.notify_all()
        if self.slots is None:
            return collate([(t, 0) for t in got])[:2]
        x = torch.from_numpy(self.slots[got])  # one gather [B, T, D]; then the slots can be reused
        with self.cond:
            self.free += got
            self.cond.notify_all()
        return x, None

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join()
        self.held.clear()


def iter_batches(data: VideoFeatures, batch_size: int, shuffle: bool = False,
                 generator: torch.Generator | None = None, drop_single: bool = False) -> Iterator:
    """Batches ``(x, mask, y)`` over ``data``; shuffled with ``generator`` (seeded) when asked.

    A set held in memory is shuffled as a whole (``torch.randperm``). A streamed set is read in a background
    thread: shuffled, in ``buffered_order`` through ``data.shuffle_buffer`` videos; in order (evaluation), one
    batch ahead (no more than the buffer).
    ``drop_single`` drops a final batch of one video in training, where batch normalisation cannot run.
    """
    n = len(data)
    if getattr(data, "in_memory", True) or n == 0:  # (any object with ``batch``: as in memory)
        order = torch.randperm(n, generator=generator).tolist() if shuffle else list(range(n))
        for a in range(0, n, batch_size):
            index = order[a:a + batch_size]
            if drop_single and len(index) == 1 and n > 1:
                return
            yield data.batch(index)
        return
    if shuffle:
        read, order = buffered_order(data.part_groups(), data.shuffle_buffer, generator)
        reader = _Reader(data, read, data.shuffle_buffer, batch_size)
    else:
        order = list(range(n))
        reader = _Reader(data, order, min(batch_size, data.shuffle_buffer), batch_size)
    try:
        for a in range(0, n, batch_size):
            index = order[a:a + batch_size]
            if drop_single and len(index) == 1 and n > 1:
                return
            x, mask = reader.take(index)
            yield x, mask, torch.from_numpy(data.labels[index])
    finally:
        reader.close()


def video_level(data: VideoFeatures, batch_size: int = 256) -> np.ndarray:
    """Video-level features for kernel baselines: the mean over each video's (valid) frames, [N, D] float32
    (Wu et al. Section 3.3: "average pooling is adopted to aggregate the frame-level CNN features into video-level
    representations"; the same vectors feed the SVM baselines of Section 4.1.3)."""
    out = np.empty((len(data), data.dim), dtype=np.float32)
    for a in range(0, len(data), batch_size):
        x, mask, _ = data.batch(range(a, min(a + batch_size, len(data))))
        x = x.float()
        if mask is None:
            v = x.mean(1)  # [B, D]
        else:
            m = mask.unsqueeze(-1).float()
            v = (x * m).sum(1) / m.sum(1).clamp_min(1)  # [B, D]
        out[a:a + len(v)] = v.numpy()
    return out


def features_nbytes(store, ids: Sequence[str], streams: Sequence[str], frames: int) -> int:
    """float16 bytes of the sampled frames of ``ids`` over ``streams`` (read from the index, no data): what a
    ``VideoFeatures`` of them would hold in memory, compared against ``memory_gb``."""
    dim = sum(int(store.streams.get(s, 0)) for s in streams)
    n_frames = frames * len(ids) if frames > 0 else sum(_n_stored(store, ids))
    return int(n_frames) * dim * 2


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter
MMAP_THRESHOLD = 4 * 2**20
_mmap_pinned = False


def _pin_mmap_threshold(nbytes: int | None = None) -> None:
    """Fix glibc's mmap threshold (``MMAP_THRESHOLD``) for the rest of the process, once, when a set is first
    streamed. Left dynamic, glibc raises the threshold to the size of each large block freed (up to 32 MiB), after
    which the part blocks, buffers and batches a streamed epoch allocates and frees come from the heap and fragment
    it: over one pass of 32,000 videos (bench/stream.py's store at 256 dims) the peak RSS was 52 MiB higher and still
    rising at the end; fixed at 4 MiB it is flat after the first 150 steps. (At glibc's default 128 KiB it is 35 MiB
    lower still, but torch's own tensors are then mapped and unmapped at every step: training about 40% slower.)
    Elsewhere than glibc, nothing."""
    global _mmap_pinned
    if _mmap_pinned:
        return
    _mmap_pinned = True
    try:
        ctypes.CDLL("libc.so.6").mallopt(M_MMAP_THRESHOLD, nbytes or MMAP_THRESHOLD)
    except (OSError, AttributeError):
        pass


def _release_free_memory() -> None:
    """Hand the heap's free pages back to the system after a bulk load (glibc's ``malloc_trim``; elsewhere
    nothing): the load's temporary blocks are freed into the heap, where they would stay counted in the RSS."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def memory_estimate_gb(n_videos: int, frames: int, dim: int) -> float:
    """float16 gigabytes of a fixed-T set: what ``memory_gb`` is compared against."""
    return n_videos * frames * dim * 2 / 2**30 if frames > 0 else math.nan
