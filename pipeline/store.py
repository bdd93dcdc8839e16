"""The feature store: per-frame features of every video, in HDF5, crash-safe (DESIGN.md "Feature store").

Layout of a store directory::

    STORE/
      store.json            schema version, full extraction config and its hash, class names, package version
      parts/NAME-000000.h5  committed parts; each holds several videos, written once, never modified
      errors.jsonl          one JSON line per failed video: id, stage, error (class or signal), message
      *.partial             work in flight (ignored by readers, removed by the next writer)

A part is written to ``*.partial``, closed, fsynced and renamed, so a killed writer loses at most the videos
in flight and readers never see half a part. Inside a part the videos are concatenated along time, one
contiguous float16 dataset per stream (``streams/rgb``: ``[sum T, D]``) with ``offsets`` (``[N + 1]``), so a bulk
load is one sequential read per part and stream, as fast as reading raw bytes.

Parts are named by writer (``NAME``): one writer per file, and independent writers (shards, machines) write
under distinct names into the same store.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from pipeline import __version__
from pipeline.errors import UserError

SCHEMA = 1
FORMAT = "twostream-feature-store"
_META_FLOAT = ("fps", "duration")
_META_INT = ("n_frames", "size")


class StoreError(UserError):
    """A store that is missing, foreign, unsafe or built with another config."""


def config_hash(config: dict) -> str:
    """Stable hash of an extraction config (canonical JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a ``*.partial`` file + fsync + rename."""
    # A name of its own per call (issue 9): shards started together all write store.json; a shared temporary
    # name would let one rename the other's half-written file. Same config, same content, so the last one wins.
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.partial")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def diff_configs(a: dict, b: dict, prefix: str = "") -> list[str]:
    """Human-readable list of the keys on which two (nested) configs differ."""
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, "<absent>"), b.get(key, "<absent>")
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, f"{prefix}{key}.")
        elif json.dumps(va, sort_keys=True, default=str) != json.dumps(vb, sort_keys=True, default=str):
            out.append(f"{prefix}{key}: {va!r} (store) vs {vb!r} (now)")
    return out


def _check_safe(f: h5py.File, where: str) -> None:
    """Refuse external links, soft links, virtual datasets and object (pickled) dtypes (DESIGN.md)."""

    def walk(group: h5py.Group, prefix: str) -> None:
        for name in group:
            link = group.get(name, getlink=True)
            if not isinstance(link, h5py.HardLink):
                raise StoreError(f"{where}: {prefix}{name} is a {type(link).__name__}; stores hold no links")
            obj = group[name]
            if isinstance(obj, h5py.Group):
                walk(obj, f"{prefix}{name}/")
                continue
            if obj.is_virtual:
                raise StoreError(f"{where}: {prefix}{name} is a virtual dataset; stores hold no external data")
            if obj.dtype.kind == "V" or (obj.dtype.kind == "O" and h5py.check_string_dtype(obj.dtype) is None):
                raise StoreError(f"{where}: {prefix}{name} holds objects; stores hold no pickled data")

    walk(f, "/")


class FeatureStore:
    """Read-only view of the committed videos of a store. ``FeatureStore.open(path)``."""

    def __init__(self, path: Path, header: dict, parts: list[Path], index: dict[str, tuple[int, int, int]],
                 streams: dict[str, tuple[int, ...]]):
        self.path = path
        self.header = header
        self.parts = parts
        self._index = index  # video id -> (part number, start, stop) rows of that part
        self._stream_shapes = streams
        self._files: dict[int, h5py.File] = {}

    # -- opening ---------------------------------------------------------------------------------------
    @staticmethod
    def read_header(path: str | os.PathLike) -> dict:
        path = Path(path)
        head = path / "store.json"
        if not head.is_file():
            raise StoreError(f"{path} is not a feature store (no store.json); create one with `twostream extract`")
        try:
            header = json.loads(head.read_text())
        except json.JSONDecodeError as e:
            raise StoreError(f"{head} is not valid JSON: {e}") from None
        if header.get("format") != FORMAT:
            raise StoreError(f"{head} is not a twostream feature store")
        if header.get("schema") != SCHEMA:
            raise StoreError(f"{path}: store schema {header.get('schema')} is not supported (this version reads {SCHEMA})")
        return header

    @classmethod
    def open(cls, path: str | os.PathLike) -> FeatureStore:
        path = Path(path)
        header = cls.read_header(path)
        parts = sorted((path / "parts").glob("*.h5"))
        index: dict[str, tuple[int, int, int]] = {}
        streams: dict[str, tuple[int, ...]] = {}
        for i, part in enumerate(parts):
            with h5py.File(part, "r") as f:
                _check_safe(f, str(part))
                ids = [s.decode() if isinstance(s, bytes) else s for s in f["ids"][()]]
                offsets = f["offsets"][()]
                for name, ds in f["streams"].items():
                    shape = tuple(ds.shape[1:])
                    if streams.setdefault(name, shape) != shape:
                        raise StoreError(f"{part}: stream {name} has frame shape {shape}, other parts {streams[name]}")
            for j, vid in enumerate(ids):
                # A video committed twice (a redone shard) holds identical features: the first part wins.
                index.setdefault(vid, (i, int(offsets[j]), int(offsets[j + 1])))
        return cls(path, header, parts, index, streams)

    @staticmethod
    def writer(path: str | os.PathLike, config: dict, classes: Sequence[str] = (), name: str = "p",
               commit_every: int = 16, only_own: bool = False) -> StoreWriter:
        return StoreWriter(Path(path), config, list(classes), name=name, commit_every=commit_every,
                           only_own=only_own)

    # -- what it holds -------------------------------------------------------------------------------
    @property
    def config(self) -> dict:
        return self.header["config"]

    @property
    def classes(self) -> list[str]:
        return list(self.header.get("classes", []))

    @property
    def streams(self) -> dict[str, int]:
        """Stream name -> feature dimension per frame (spatial maps count C*g*g)."""
        return {k: int(np.prod(v)) for k, v in sorted(self._stream_shapes.items())}

    def frame_shape(self, stream: str) -> tuple[int, ...]:
        self._check_stream(stream)
        return self._stream_shapes[stream]

    def ids(self) -> list[str]:
        return sorted(self._index)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._index

    def __len__(self) -> int:
        return len(self._index)

    def lengths(self, ids: Iterable[str]) -> list[int]:
        """Stored frames T of each video (from the index: no data read)."""
        return [b - a for _, a, b in (self._locate(v) for v in ids)]

    @property
    def fingerprint(self) -> str:
        h = hashlib.sha256(self.header["config_hash"].encode())
        for vid in self.ids():
            h.update(vid.encode() + b"\0")
        return h.hexdigest()[:16]

    def errors(self) -> list[dict]:
        """Errors of videos that are not committed (a later success supersedes an error)."""
        return [e for e in read_errors(self.path) if e.get("id") not in self._index]

    # -- reading -------------------------------------------------------------------------------------
    def _file(self, i: int) -> h5py.File:
        if i not in self._files:
            self._files[i] = h5py.File(self.parts[i], "r")
        return self._files[i]

    def _check_stream(self, stream: str) -> None:
        if stream not in self._stream_shapes:
            raise StoreError(f"{self.path} has no stream {stream!r}; it has: {', '.join(self.streams) or 'none'}")

    def _locate(self, video_id: str) -> tuple[int, int, int]:
        try:
            return self._index[video_id]
        except KeyError:
            raise StoreError(f"{self.path} has no committed video {video_id!r}") from None

    def get(self, video_id: str, stream: str = "rgb") -> np.ndarray:
        """Features of one video: ``[T, D]`` float16 (spatial maps flattened; see ``frame_shape``)."""
        self._check_stream(stream)
        part, a, b = self._locate(video_id)
        arr = self._file(part)["streams"][stream][a:b]
        return arr.reshape(b - a, -1)

    def meta(self, video_id: str) -> dict[str, Any]:
        part, a, b = self._locate(video_id)
        f = self._file(part)
        j = int(np.searchsorted(f["offsets"][()], a))
        out: dict[str, Any] = {"frame_indices": f["frame_indices"][a:b]}
        for key in _META_FLOAT:
            out[key] = float(f[key][j])
        for key in _META_INT:
            out[key] = int(f[key][j])
        out["sha256"] = f["sha256"][j].decode() if isinstance(f["sha256"][j], bytes) else str(f["sha256"][j])
        return out

    def load(self, stream: str = "rgb", ids: Iterable[str] | None = None) -> list[np.ndarray]:
        """Bulk load: features of ``ids`` (default: all, sorted) as a list of ``[T, D]`` float16 arrays.

        Reads each part's stream in one sequential read when most of it is wanted (fast path), else per video.
        """
        self._check_stream(stream)
        ids = self.ids() if ids is None else list(ids)
        locs = [self._locate(v) for v in ids]
        by_part: dict[int, list[int]] = {}
        for k, (part, _, _) in enumerate(locs):
            by_part.setdefault(part, []).append(k)
        out: list[np.ndarray | None] = [None] * len(ids)
        for part, ks in by_part.items():
            ds = self._file(part)["streams"][stream]
            rows = sum(locs[k][2] - locs[k][1] for k in ks)
            if rows * 2 >= ds.shape[0]:
                block = ds[()].reshape(ds.shape[0], -1)
                for k in ks:
                    out[k] = block[locs[k][1]:locs[k][2]]
            else:
                for k in ks:
                    out[k] = ds[locs[k][1]:locs[k][2]].reshape(locs[k][2] - locs[k][1], -1)
        return out  # type: ignore[return-value]

    def info(self) -> dict[str, Any]:
        errors = self.errors()
        return {
            "path": str(self.path),
            "videos": len(self),
            "streams": self.streams,
            "frames": int(sum(b - a for _, a, b in self._index.values())),
            "parts": len(self.parts),
            "errors": len(errors),
            "config": self.config,
            "config_hash": self.header["config_hash"],
            "classes": self.classes,
            "schema": self.header["schema"],
            "package_version": self.header.get("package_version"),
            "created": self.header.get("created"),
        }

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_errors(path: str | os.PathLike) -> list[dict]:
    p = Path(path) / "errors.jsonl"
    if not p.exists():
        return []
    out = []
    for line in p.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut by a kill: the video is simply retried
    return out


def _committed_ids(parts: Iterable[Path]) -> list[str]:
    """Video ids held by the committed ``parts`` (issue 9: a writer resuming from its own parts)."""
    out: list[str] = []
    for part in parts:
        with h5py.File(part, "r") as f:
            out += [s.decode() if isinstance(s, bytes) else s for s in f["ids"][()]]
    return out


class StoreWriter:
    """Appends videos to a store, committing a part every ``commit_every`` videos and on close.

    Opening a store built with another config raises ``StoreError`` naming the differences: features of two
    configs never mix. ``done`` holds the ids already committed (by any writer), so a rerun resumes.
    """

    def __init__(self, path: Path, config: dict, classes: list[str], name: str = "p", commit_every: int = 16,
                 only_own: bool = False):
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"bad writer name {name!r}")
        self.path, self.name, self.commit_every = path, name, max(1, commit_every)
        self.config = json.loads(json.dumps(config, default=str))  # plain JSON types, as stored
        self._buffer: list[tuple[str, dict[str, np.ndarray], dict]] = []
        path.mkdir(parents=True, exist_ok=True)
        (path / "parts").mkdir(exist_ok=True)
        h = config_hash(self.config)
        if (path / "store.json").exists():
            header = FeatureStore.read_header(path)
            if header["config_hash"] != h:
                diffs = diff_configs(header["config"], self.config)
                raise StoreError(f"{path} was built with a different config ({'; '.join(diffs[:4])}); "
                                 "use another --out for this config")
        else:
            header = {"format": FORMAT, "schema": SCHEMA, "config": self.config, "config_hash": h,
                      "classes": classes, "package_version": __version__,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            atomic_write_text(path / "store.json", json.dumps(header, indent=2, sort_keys=True))
        for stale in (path / "parts").glob(f"{name}-*.partial"):
            stale.unlink()  # work in flight of a killed writer of this name
        # only_own (issue 9, shards): resume from this writer's own parts; scanning every part of a store of
        # thousands of shards at the start of each shard would cost O(shards^2) file opens.
        if only_own:
            self.done: set[str] = set(_committed_ids(sorted((path / "parts").glob(f"{name}-*.h5"))))
        else:
            self.done = set(FeatureStore.open(path).ids()) if any((path / "parts").glob("*.h5")) else set()
        taken = [int(m.group(1)) for p in (path / "parts").glob(f"{name}-*.h5")
                 if (m := re.fullmatch(rf"{re.escape(name)}-(\d+)\.h5", p.name))]
        self._seq = max(taken, default=-1) + 1

    def add(self, video_id: str, features: dict[str, np.ndarray], meta: dict[str, Any]) -> None:
        """Queue one video's features (``{stream: [T, ...]}``, all with the same T) and its provenance."""
        lengths = {k: len(v) for k, v in features.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{video_id}: streams differ in length {lengths}")
        self._buffer.append((video_id, features, meta))
        if len(self._buffer) >= self.commit_every:
            self.commit()

    def commit(self) -> None:
        """Write the queued videos as one part, atomically."""
        if not self._buffer:
            return
        final = self.path / "parts" / f"{self.name}-{self._seq:06d}.h5"
        tmp = final.with_name(final.name + ".partial")
        buf = self._buffer
        streams = sorted(buf[0][1])
        if any(sorted(f) != streams for _, f, _ in buf):
            raise ValueError("every video of a store must have the same streams")
        lengths = np.array([len(buf[i][1][streams[0]]) for i in range(len(buf))])
        offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
        str_t = h5py.string_dtype()
        with h5py.File(tmp, "w") as f:
            f.attrs["schema"] = SCHEMA
            f.create_dataset("ids", data=np.array([v for v, _, _ in buf], dtype=object), dtype=str_t)
            f.create_dataset("offsets", data=offsets)
            f.create_dataset("frame_indices",
                             data=np.concatenate([np.asarray(m["frame_indices"], np.int64) for _, _, m in buf]))
            for key in _META_FLOAT:
                f.create_dataset(key, data=np.array([float(m.get(key, np.nan)) for _, _, m in buf]))
            for key in _META_INT:
                f.create_dataset(key, data=np.array([int(m.get(key, -1)) for _, _, m in buf], np.int64))
            f.create_dataset("sha256", data=np.array([m.get("sha256", "") for _, _, m in buf], dtype=object),
                             dtype=str_t)
            g = f.create_group("streams")
            for s in streams:
                g.create_dataset(s, data=np.concatenate([np.asarray(feat[s], np.float16) for _, feat, _ in buf]))
            f.flush()
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, final)
        _fsync_dir(final.parent)
        self.done.update(v for v, _, _ in buf)
        self._buffer = []
        self._seq += 1

    def log_error(self, video_id: str, stage: str, error: str, message: str) -> None:
        """Append one line to errors.jsonl (fsynced: a failure is never lost)."""
        line = json.dumps({"id": video_id, "stage": stage, "error": error, "message": message[:2000],
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        with open(self.path / "errors.jsonl", "a") as f:
            f.write(line + "\n")
            f.flush()
            os.fsync(f.fileno())

    def prune_errors(self) -> None:
        """Drop error lines of videos that have since been committed (after ``--retry-failed``)."""
        errors = read_errors(self.path)
        keep = [e for e in errors if e.get("id") not in self.done]
        if len(keep) != len(errors):
            atomic_write_text(self.path / "errors.jsonl", "".join(json.dumps(e) + "\n" for e in keep))

    def close(self) -> None:
        self.commit()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # Commit what is complete even when the run stops on an error or Ctrl-C: nothing finished is lost.
        self.close()
