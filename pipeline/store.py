"""The feature store: per-frame features of every video, in HDF5, crash-safe.

Layout of a store directory::

    STORE/
      store.json            schema version, full extraction config and its hash, class names, package version
      parts/NAME-000000.h5  committed parts; each holds several videos, written once, never modified
      parts/NAME-000000.h5.sha256   the part's sha256, recorded at commit (``sha256sum -c`` format)
      index.npz             the readers' index: per video its part, rows, source sha256 and feature digest,
                            and the size and mtime of every part it covers (rebuilt when parts change)
      errors.jsonl          one JSON line per failed video: id, stage, error (class or signal), message
      writer.lock           advisory lock of the process writing the store (shards: shards/NAME.lock)
      quarantine/           parts that ``verify --repair`` moved aside (never deleted)
      *.partial             work in flight (ignored by readers, removed by the next writer)

A part is built in memory, written to ``*.partial`` with plain file calls, fsynced, and linked to its final
name, which must not exist yet (a hard link fails rather than replace): a killed writer loses at most the
videos in flight, readers never see half a part, and two writers never overwrite each other's parts. A write
that fails (a full disk) removes its partial and raises :class:`StoreWriteError`; committed parts are untouched.
Inside a part the videos are concatenated along time, one contiguous float16 dataset per stream
(``streams/rgb``: ``[sum T, D]``) with ``offsets`` (``[N + 1]``), so a bulk load is one sequential read per
part and stream, as fast as reading raw bytes. Per video a part also records the source file's sha256 and a
digest of its stored features (``digests``), which :attr:`FeatureStore.fingerprint` covers.

Parts are named by writer (``NAME``): every writer process has a name of its own (host, pid and a random
token, or its shard), so writers on many machines can share one store.

Opening reads ``index.npz`` (sorted arrays: a lookup is a binary search) and the size and mtime of each part, not
the parts: opening a store of a million videos takes a fraction of a second. Parts committed after the index was
written are read and folded in; a part that changed size or mtime, or vanished (``verify --repair``), makes the
reader rebuild the index from every part, saying so. Readers rewrite the index when they had to update it.
"""

from __future__ import annotations

import errno
import fcntl
import hashlib
import io
import json
import os
import re
import secrets
import socket
import sys
import threading
import time
import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
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
LOCK_NAME = "writer.lock"
QUARANTINE = "quarantine"


class StoreError(UserError):
    """A store that is missing, foreign, unsafe, damaged or built with another config."""


class StoreWriteError(StoreError):
    """Writing to the store failed (a full disk, an I/O error, a read-only folder); nothing committed is lost."""


class StoreBusy(StoreError):
    """Another live process is writing the store."""


def config_hash(config: dict) -> str:
    """Stable hash of an extraction config (canonical JSON)."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def feature_digest(features: dict[str, np.ndarray]) -> str:
    """Digest of one video's stored features: every stream's name, shape and float16 bytes."""
    h = hashlib.sha256()
    for name in sorted(features):
        arr = np.ascontiguousarray(features[name], dtype=np.float16)
        h.update(f"{name}\0{arr.shape}\0".encode())
        h.update(arr.tobytes())
    return h.hexdigest()[:32]


def process_token() -> str:
    """``host-pid-random``: a name no other live writer has (the pid tells whose partial files are stale)."""
    host = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:24] or "host"
    return f"{host}-{os.getpid()}-{secrets.token_hex(3)}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        view = view[n:]


def _write_new_file(path: Path, data: bytes) -> None:
    """Create ``path`` (it must not exist), write ``data``, fsync; on any error remove it and re-raise."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        _unlink_quietly(path)
        raise
    os.close(fd)


def _unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def _partial_name(path: Path) -> Path:
    return path.with_name(f"{path.name}.{process_token()}.partial")


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a ``*.partial`` file + fsync + rename (``atomic_write_bytes``)."""
    atomic_write_bytes(path, text.encode())


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` via a ``*.partial`` file + fsync + rename (replacing ``path``). A failed write
    leaves no partial behind."""
    # A partial name of its own per call: shards started together all write some files; a shared temporary
    # name would let one rename the other's half-written file.
    tmp = _partial_name(path)
    _write_new_file(tmp, data)
    try:
        os.replace(tmp, path)
    except BaseException:
        _unlink_quietly(tmp)
        raise
    _fsync_dir(path.parent)


def create_exclusive(path: Path, data: bytes) -> bool:
    """Commit ``data`` as ``path`` only if ``path`` does not exist (partial + fsync + hard link). False if it did."""
    tmp = _partial_name(path)
    _write_new_file(tmp, data)
    try:
        os.link(tmp, path)
    except FileExistsError:
        return False
    finally:
        _unlink_quietly(tmp)
    _fsync_dir(path.parent)
    return True


def write_error(store: Path, what: str, e: OSError) -> StoreWriteError:
    """The one line for a failed write: the cause (``No space left on device``), the store, what is safe."""
    cause = e.strerror or str(e)
    return StoreWriteError(f"{store}: cannot write {what}: {cause}; committed parts are intact, rerun to resume "
                           "once this is fixed")


_ABSENT = object()


def _short(value, width: int = 48) -> str:
    """A config value in a few words: a long list as its length, a mapping as its keys, anything long cut."""
    if value is _ABSENT:
        return "absent"
    if isinstance(value, dict):
        text = f"set ({', '.join(sorted(map(str, value)))})"
    elif isinstance(value, list) and len(value) > 6:
        text = f"[{len(value)} values]"
    elif isinstance(value, str) and re.fullmatch(r"[0-9a-f]{40,}", value):  # a digest: its first digits tell it
        text = f'"{value[:12]}..."'
    else:
        text = json.dumps(value, sort_keys=True, default=str)
    return text if len(text) <= width else text[: width - 3] + "..."


def diff_configs(a: dict, b: dict, prefix: str = "", labels: tuple[str, str] = ("store", "requested")) -> list[str]:
    """The keys on which two (nested) configs differ, one short line each: ``key: A (store) vs B (requested)``.

    Only differing leaves are named (``backbones.rgb.weights_sha256``), never whole dicts; a long list is named by
    its length and its first differing index, so a 20-channel mean does not fill the screen.
    """
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += diff_configs(va, vb, f"{prefix}{key}.", labels)
            continue
        if json.dumps(va, sort_keys=True, default=str) == json.dumps(vb, sort_keys=True, default=str):
            continue
        where = ""
        if isinstance(va, list) and isinstance(vb, list) and max(len(va), len(vb)) > 6:
            i = next((i for i, (x, y) in enumerate(zip(va, vb)) if x != y), min(len(va), len(vb)))
            if len(va) == len(vb):
                where = f" (first difference at [{i}]: {_short(va[i], 20)} vs {_short(vb[i], 20)})"
        out.append(f"{prefix}{key}: {_short(va)} ({labels[0]}) vs {_short(vb)} ({labels[1]}){where}")
    return out


def _check_safe(f: h5py.File, where: str) -> None:
    """Refuse external links, soft links, virtual datasets and object (pickled) dtypes."""

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


# ------------------------------------------------------------------------------------------- reading a part

class DamagedPart(StoreError):
    """A committed part that cannot be read or whose datasets disagree (its message names the file and why)."""

    def __init__(self, part: Path, why: str):
        self.part, self.why = part, why
        store = part.parent.parent
        super().__init__(f"{part}: damaged part ({why}); `twostream verify {store} --repair` moves it aside and the "
                         "next extract redoes its videos")


def _strings(ds) -> list[str]:
    return [s.decode() if isinstance(s, bytes) else str(s) for s in ds[()]]


@dataclass
class PartIndex:
    """What a reader needs of one part, read from its small datasets only (no feature data)."""

    path: Path
    ids: list[str]
    offsets: np.ndarray
    streams: dict[str, tuple[int, ...]]
    sources: list[str]                   # source file sha256 per video ("" when not recorded)
    digests: list[str] | None            # feature digest per video (None: a part written before digests)


def read_part_index(part: Path) -> PartIndex:
    """Open ``part`` and check that its datasets agree; raises :class:`DamagedPart` naming it otherwise."""
    try:
        f = h5py.File(part, "r")
    except OSError as e:
        raise DamagedPart(part, f"not a readable HDF5 file: {str(e).split(';')[0]}") from None
    try:
        with f:
            _check_safe(f, str(part))
            for name in ("ids", "offsets", "streams", "frame_indices"):
                if name not in f:
                    raise DamagedPart(part, f"no {name!r} dataset")
            ids = _strings(f["ids"])
            offsets = np.asarray(f["offsets"][()])
            n = len(ids)
            if offsets.shape != (n + 1,) or offsets[0] != 0 or np.any(np.diff(offsets) < 0):
                raise DamagedPart(part, f"offsets {offsets.tolist()[:8]} do not index {n} videos")
            if len(set(ids)) != n:
                raise DamagedPart(part, "a video id appears twice")
            total = int(offsets[-1])
            streams: dict[str, tuple[int, ...]] = {}
            for name, ds in f["streams"].items():
                if not isinstance(ds, h5py.Dataset) or ds.ndim < 2:
                    raise DamagedPart(part, f"stream {name} is not a [frames, ...] dataset")
                if ds.shape[0] != total:
                    raise DamagedPart(part, f"offsets end at frame {total} but stream {name} holds {ds.shape[0]}")
                streams[name] = tuple(ds.shape[1:])
            if not streams:
                raise DamagedPart(part, "no streams")
            if f["frame_indices"].shape[0] != total:
                raise DamagedPart(part, f"offsets end at frame {total} but frame_indices holds "
                                        f"{f['frame_indices'].shape[0]}")
            for key in (*_META_FLOAT, *_META_INT, "sha256", *(("digests",) if "digests" in f else ())):
                if key in f and f[key].shape[0] != n:
                    raise DamagedPart(part, f"{key} holds {f[key].shape[0]} rows for {n} videos")
            sources = _strings(f["sha256"]) if "sha256" in f else [""] * n
            digests = _strings(f["digests"]) if "digests" in f else None
    except DamagedPart:
        raise
    except StoreError:
        raise
    except (OSError, KeyError, ValueError, TypeError, RuntimeError) as e:
        raise DamagedPart(part, f"{type(e).__name__}: {str(e).split(';')[0]}") from None
    return PartIndex(part, ids, offsets, streams, sources, digests)


def committed_parts(path: Path, name: str | None = None) -> list[Path]:
    """Committed parts of a store (of writer ``name``), in name order: the reader's order."""
    pattern = f"{name}-*.h5" if name else "*.h5"
    return sorted((Path(path) / "parts").glob(pattern))


def family_parts(path: Path, family: str) -> list[Path]:
    """Committed parts of writer ``family`` and of its attempts ``FAMILY.aXXXXXX`` (the attempts of one shard), in
    name order."""
    return sorted(set(committed_parts(path, family)) | set(committed_parts(path, f"{family}.a*")))


INDEX_NAME = "index.npz"
INDEX_VERSION = 1


def _stamp(part: Path) -> tuple[int, int]:
    """(size, mtime in ns) of a committed part: parts are written once, so any change means damage or repair."""
    st = part.stat()
    return st.st_size, st.st_mtime_ns


def _enc(values: Iterable[str]) -> np.ndarray:
    """Strings as a fixed-width bytes array (utf-8): sortable and searchable in numpy, loadable without pickle."""
    out = np.array([v.encode() for v in values], dtype=np.bytes_)
    return out if out.size else np.zeros(0, "S1")


@dataclass
class StoreIndex:
    """Every (video, part) row of a store, sorted by video id and then part name: the first row of an id is the
    one readers use (the first part in name order), later rows are duplicates. Arrays, so that a million
    videos load and search in milliseconds."""

    parts: list[str]                     # part names, sorted; ``part`` indexes this list
    stamps: list[tuple[int, int]]        # (size, mtime_ns) of each part when indexed
    streams: dict[str, tuple[int, ...]]
    ids: np.ndarray                      # [R] bytes, sorted
    part: np.ndarray                     # [R] int32
    start: np.ndarray                    # [R] int64
    stop: np.ndarray                     # [R] int64
    source: np.ndarray | None            # [R] bytes: source file sha256 ("" when not recorded); None: not read yet
    digest: np.ndarray | None            # [R] bytes: feature digest ("" for parts written before digests)
    fingerprint: str | None = None
    saved: Any = None                    # the open index.npz that source / digest are read from when first needed

    def provenance(self) -> tuple[np.ndarray, np.ndarray]:
        """(source, digest) columns, read on first use: only the fingerprint needs them, and it is saved. They come
        from the file this index was loaded from, still open: another reader replacing index.npz meanwhile
        replaces the name, not the file these rows were read from."""
        if self.source is None or self.digest is None:
            self.source, self.digest = self.saved["source"], self.saved["digest"]
            self.close()
        return self.source, self.digest

    def close(self) -> None:
        if self.saved is not None:
            self.saved.close()
            self.saved = None

    @classmethod
    def build(cls, indexes: list[PartIndex]) -> StoreIndex:
        """From the per-part indexes (``read_part_index``) of a store's parts, in any order."""
        indexes = sorted(indexes, key=lambda p: p.path.name)
        streams: dict[str, tuple[int, ...]] = {}
        for p in indexes:
            for name, shape in p.streams.items():
                if streams.setdefault(name, shape) != shape:
                    raise DamagedPart(p.path, f"stream {name} has frame shape {shape}, other parts {streams[name]}")
        ids = _enc(v for p in indexes for v in p.ids)
        part = np.concatenate([np.full(len(p.ids), k, np.int32) for k, p in enumerate(indexes)] or [np.zeros(0, np.int32)])
        start = np.concatenate([p.offsets[:-1] for p in indexes] or [np.zeros(0)]).astype(np.int64)
        stop = np.concatenate([p.offsets[1:] for p in indexes] or [np.zeros(0)]).astype(np.int64)
        source = _enc(v for p in indexes for v in p.sources)
        digest = _enc(d for p in indexes for d in (p.digests if p.digests is not None else [""] * len(p.ids)))
        order = np.lexsort((part, ids))  # by id, then by part name
        return cls([p.path.name for p in indexes], [_stamp(p.path) for p in indexes], streams, ids[order],
                   part[order], start[order], stop[order], source[order], digest[order])

    def extend(self, new: list[PartIndex]) -> StoreIndex:
        """This index plus parts committed since (``new``), renumbered into name order."""
        if not new:
            return self
        names = sorted(self.parts + [p.path.name for p in new])
        position = {n: i for i, n in enumerate(names)}  # a dict, not list.index: 10,000 parts would be quadratic
        remap = np.array([position[n] for n in self.parts], np.int32)
        added = StoreIndex.build(new)
        for name, shape in added.streams.items():
            if self.streams.setdefault(name, shape) != shape:
                raise DamagedPart(new[0].path, f"stream {name} has frame shape {shape}, other parts {self.streams[name]}")
        added_remap = np.array([position[n] for n in added.parts], np.int32)
        stamps = dict(zip(self.parts, self.stamps)) | dict(zip(added.parts, added.stamps))
        part = np.concatenate([remap[self.part], added_remap[added.part]]).astype(np.int32)
        ids = np.concatenate([self.ids, added.ids])
        order = np.lexsort((part, ids))
        cols = [np.concatenate([a, b])[order] for a, b in ((self.start, added.start), (self.stop, added.stop),
                                                           *zip(self.provenance(), added.provenance()))]
        return StoreIndex(names, [stamps[n] for n in names], self.streams, ids[order], part[order], *cols)

    @property
    def first(self) -> np.ndarray:
        """[R] bool: the row a reader uses for its id (the first part in name order)."""
        return np.r_[True, self.ids[1:] != self.ids[:-1]] if len(self.ids) else np.zeros(0, bool)

    def save(self, path: Path) -> None:
        meta = {"version": INDEX_VERSION, "parts": self.parts, "stamps": self.stamps,
                "streams": {k: list(v) for k, v in self.streams.items()}, "fingerprint": self.fingerprint}
        buf = io.BytesIO()
        source, digest = self.provenance()
        np.savez(buf, meta=np.array(json.dumps(meta)), ids=self.ids, part=self.part, start=self.start,
                 stop=self.stop, source=source, digest=digest)
        atomic_write_bytes(path, buf.getvalue())

    @classmethod
    def load(cls, path: Path) -> StoreIndex | None:
        """The saved index, or None when there is none or it cannot be read (it is then rebuilt from the parts)."""
        try:
            z = np.load(path, allow_pickle=False)
        except (OSError, ValueError, EOFError):
            return None
        try:
            meta = json.loads(str(z["meta"]))
            arrays = {k: z[k] for k in ("ids", "part", "start", "stop")}
            ok = (meta.get("version") == INDEX_VERSION and len(meta["parts"]) == len(meta["stamps"])
                  and all(len(a) == len(arrays["ids"]) for a in arrays.values())
                  and all(k in z.files for k in ("source", "digest")))
        except (OSError, ValueError, KeyError, TypeError, json.JSONDecodeError, EOFError):
            ok = False
        if not ok:
            z.close()
            return None
        return cls(meta["parts"], [tuple(s) for s in meta["stamps"]],
                   {k: tuple(v) for k, v in meta["streams"].items()}, source=None, digest=None,
                   fingerprint=meta.get("fingerprint"), saved=z, **arrays)


def _scan_parts(path: Path) -> dict[str, tuple[int, int]]:
    """name -> (size, mtime_ns) of every committed part (one directory scan: no Path objects, no file opened)."""
    try:
        with os.scandir(path / "parts") as it:
            return {e.name: ((st := e.stat()).st_size, st.st_mtime_ns) for e in it
                    if e.name.endswith(".h5") and e.is_file()}
    except FileNotFoundError:
        return {}


def load_store_index(path: Path, log=None) -> tuple[StoreIndex, bool]:
    """The index of the store at ``path`` over its committed parts: the saved one when it covers them unchanged,
    extended by parts committed since, or rebuilt from every part when an indexed part changed or vanished
    (``log`` says so once the rebuild succeeded). Returns (index, whether it differs from the saved one)."""
    saved = StoreIndex.load(path / INDEX_NAME)
    on_disk = _scan_parts(path)
    every = [path / "parts" / n for n in sorted(on_disk)]
    if saved is not None:
        changed = [n for n, st in zip(saved.parts, saved.stamps) if on_disk.get(n) != st]
        if changed:
            saved.close()
            index = StoreIndex.build([read_part_index(p) for p in every])  # a damaged part raises, naming it
            if log:
                log(f"{path}: {len(changed)} part(s) changed or removed since the index was written "
                    f"(e.g. {changed[0]}); rebuilt the index from {len(every)} parts")
            return index, True
    if saved is None:
        return StoreIndex.build([read_part_index(p) for p in every]), True
    known = set(saved.parts)
    new = [read_part_index(path / "parts" / n) for n in sorted(on_disk) if n not in known]
    return saved.extend(new), bool(new)


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


class FeatureStore:
    """Read-only view of the committed videos of a store. ``FeatureStore.open(path)``."""

    # An open part costs about 0.5 MiB (HDF5's per-file state) and up to 1 MiB in a streaming run; bulk reads go
    # part by part, so a few open parts serve every reader (training, validation, test) at once. Reopening one
    # costs about 0.2 ms. With 64, streaming's peak RSS grew by 60 MiB between 2,000 and 8,000 videos.
    OPEN_PARTS = 8

    def __init__(self, path: Path, header: dict, index: StoreIndex):
        self.path = path
        self.header = header
        self._parts: list[Path] | None = None
        self._idx = index
        first = index.first
        self._rows = np.flatnonzero(first)  # the row read for each id, in id order
        self._uids = index.ids[first]       # sorted unique ids (bytes)
        self._stream_shapes = index.streams
        self._ids: list[str] | None = None
        self.duplicates: dict[str, list[str]] = {}  # video id -> part names holding it (the first is the one read)
        counts = np.diff(np.r_[self._rows, len(index.ids)])
        for k in np.flatnonzero(counts > 1):
            r = self._rows[k]
            self.duplicates[index.ids[r].decode()] = [index.parts[j] for j in index.part[r:r + counts[k]]]
        self._files: dict[int, h5py.File] = {}
        self._lock = threading.RLock()  # a background reader (streamed training) and the main thread share the files
        self._fingerprint: str | None = index.fingerprint

    # -- opening ---------------------------------------------------------------------------------------
    @staticmethod
    def read_header(path: str | os.PathLike) -> dict:
        path = Path(path)
        head = path / "store.json"
        if not head.is_file():
            raise StoreError(f"{path} is not a feature store (no store.json); create one with `twostream extract`")
        try:
            header = json.loads(head.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"{head} is not valid JSON: {e}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT:
            raise StoreError(f"{head} is not a twostream feature store")
        if header.get("schema") != SCHEMA:
            raise StoreError(f"{path}: store schema {header.get('schema')} is not supported (this version reads {SCHEMA})")
        return header

    @classmethod
    def open(cls, path: str | os.PathLike, log=_note) -> FeatureStore:
        """Open a store through its index (``index.npz``; module docstring): parts committed since it was written
        are read and folded in, and it is rebuilt from every part when an indexed part changed or vanished.

        A part that cannot be read or whose offsets disagree with its datasets raises ``DamagedPart`` naming it.
        A video in two parts (writers that raced) is read from the first part in name order, deterministically,
        and listed in ``duplicates``. The updated index is saved when the store can be written (else kept in memory).
        """
        path = Path(path)
        header = cls.read_header(path)
        index, changed = load_store_index(path, log)
        fs = cls(path, header, index)
        if changed:
            fs._save_index()
        return fs

    @property
    def parts(self) -> list[Path]:
        """Committed parts in name order (``locations`` numbers them in this order)."""
        if self._parts is None:
            self._parts = [self.path / "parts" / n for n in self._idx.parts]
        return self._parts

    def _save_index(self) -> None:
        if self._idx.fingerprint is None and all(self._idx.provenance()[1][self._rows]):
            self._idx.fingerprint = self.fingerprint  # cheap here (every digest recorded): saved for the next open
        try:
            self._idx.save(self.path / INDEX_NAME)
        except OSError:
            pass  # a read-only store: readers index it in memory each time

    @staticmethod
    def writer(path: str | os.PathLike, config: dict, classes: Sequence[str] = (), name: str | None = None,
               commit_every: int = 16, only_own: bool | str = False, exclusive: bool = False) -> StoreWriter:
        return StoreWriter(Path(path), config, list(classes), name=name, commit_every=commit_every,
                           only_own=only_own, exclusive=exclusive)

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
        """Committed video ids, sorted."""
        if self._ids is None:
            self._ids = [v.decode() for v in self._uids.tolist()]
        return list(self._ids)

    def _find(self, video_id: str) -> int | None:
        """Row of ``video_id`` in the index (binary search), None when it is not committed."""
        key = video_id.encode()
        k = int(np.searchsorted(self._uids, key))
        return int(self._rows[k]) if k < len(self._uids) and self._uids[k] == key else None

    def __contains__(self, video_id: str) -> bool:
        return self._find(video_id) is not None

    def __len__(self) -> int:
        return len(self._uids)

    def locations(self) -> Iterable[tuple[str, tuple[int, int, int]]]:
        """(video id, (part number, start row, stop row)) of every committed video, in id order."""
        idx = self._idx
        for vid, r in zip(self.ids(), self._rows.tolist()):
            yield vid, (int(idx.part[r]), int(idx.start[r]), int(idx.stop[r]))

    def positions(self, ids: Iterable[str]) -> np.ndarray:
        """[N, 2] int64: (part number as in ``parts``, first row in it) of each video, from the index (no data read):
        sorting by it gives the order of sequential reads."""
        return np.array([self._locate(v)[:2] for v in ids], dtype=np.int64).reshape(-1, 2)

    def lengths(self, ids: Iterable[str]) -> list[int]:
        """Stored frames T of each video (from the index: no data read)."""
        return [b - a for _, a, b in (self._locate(v) for v in ids)]

    @property
    def fingerprint(self) -> str:
        """Hash of the config and, per committed video, its id, source sha256 and stored-feature digest: it
        changes when any video's features or source file change. Parts written before feature digests were
        recorded get theirs computed from the stored data (one read of those parts)."""
        if self._fingerprint is None:
            idx = self._idx
            h = hashlib.sha256(self.header["config_hash"].encode())
            sources, digests = idx.provenance()
            for vid, r in zip(self._uids.tolist(), self._rows.tolist()):
                digest = digests[r] or self.stored_digest(vid.decode()).encode()
                h.update(b"%s\0%s\0%s\n" % (vid, sources[r], digest))
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def stored_digest(self, video_id: str) -> str:
        """:func:`feature_digest` of the features stored for ``video_id`` (reads them)."""
        part, a, b = self._locate(video_id)
        f = self._file(part)
        return feature_digest({s: self._read(part, f["streams"][s], a, b) for s in self._stream_shapes})

    def errors(self) -> list[dict]:
        """Latest error of each video that is not committed (a later success supersedes an error)."""
        return [e for e in read_errors(self.path) if e.get("id") not in self]

    # -- reading -------------------------------------------------------------------------------------
    def _file(self, i: int) -> h5py.File:
        """Part ``i``, opened once and kept among the ``OPEN_PARTS`` most recently used: random access over a
        store of thousands of parts must not hold a file (and its HDF5 caches) per part it ever touched."""
        f = self._files.pop(i, None)
        if f is None:
            try:
                f = h5py.File(self.parts[i], "r")
            except OSError as e:
                raise DamagedPart(self.parts[i], f"cannot be opened: {str(e).split(';')[0]}") from None
            if len(self._files) >= self.OPEN_PARTS:
                self._files.pop(next(iter(self._files))).close()  # the least recently used
        self._files[i] = f  # dicts keep insertion order: the end is the most recently used
        return f

    def _read(self, part: int, ds, a: int | None = None, b: int | None = None) -> np.ndarray:
        try:
            return ds[()] if a is None else ds[a:b]
        except (OSError, RuntimeError, ValueError) as e:
            raise DamagedPart(self.parts[part], f"reading {ds.name} failed: {str(e).split(';')[0]}") from None

    def _check_stream(self, stream: str) -> None:
        if stream not in self._stream_shapes:
            raise StoreError(f"{self.path} has no stream {stream!r}; it has: {', '.join(self.streams) or 'none'}")

    def _locate(self, video_id: str) -> tuple[int, int, int]:
        r = self._find(video_id)
        if r is None:
            raise StoreError(f"{self.path} has no committed video {video_id!r}")
        idx = self._idx
        return int(idx.part[r]), int(idx.start[r]), int(idx.stop[r])

    def get(self, video_id: str, stream: str = "rgb") -> np.ndarray:
        """Features of one video: ``[T, D]`` float16 (spatial maps flattened; see ``frame_shape``)."""
        self._check_stream(stream)
        part, a, b = self._locate(video_id)
        with self._lock:
            arr = self._read(part, self._file(part)["streams"][stream], a, b)
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
        with self._lock:
            self._load_parts(stream, by_part, locs, out)
        return out  # type: ignore[return-value]

    def _load_parts(self, stream: str, by_part: dict[int, list[int]], locs: list, out: list) -> None:
        for part, ks in by_part.items():
            ds = self._file(part)["streams"][stream]
            rows = sum(locs[k][2] - locs[k][1] for k in ks)
            if rows * 2 >= ds.shape[0]:
                block = self._read(part, ds).reshape(ds.shape[0], -1)
                for k in ks:
                    out[k] = block[locs[k][1]:locs[k][2]]
            else:
                for k in ks:
                    out[k] = self._read(part, ds, locs[k][1], locs[k][2]).reshape(locs[k][2] - locs[k][1], -1)

    def info(self) -> dict[str, Any]:
        errors = self.errors()
        return {
            "path": str(self.path),
            "videos": len(self),
            "streams": self.streams,
            "frames": int((self._idx.stop[self._rows] - self._idx.start[self._rows]).sum()),
            "parts": len(self.parts),
            "errors": len(errors),
            "duplicates": len(self.duplicates),
            "config": self.config,
            "config_hash": self.header["config_hash"],
            "classes": self.classes,
            "schema": self.header["schema"],
            "package_version": self.header.get("package_version"),
            "created": self.header.get("created"),
        }

    def close(self) -> None:
        with self._lock:
            for f in self._files.values():
                f.close()
            self._files.clear()
        self._idx.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_errors(path: str | os.PathLike) -> list[dict]:
    """The latest error line of each video in errors.jsonl (a retried video that failed again appears once)."""
    p = Path(path) / "errors.jsonl"
    if not p.exists():
        return []
    latest: dict[Any, dict] = {}
    for line in p.read_text(errors="replace").splitlines():
        line = line.strip()
        if line:
            try:
                e = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a kill: the video is simply retried
            if isinstance(e, dict):
                latest.pop(e.get("id"), None)
                latest[e.get("id")] = e
    return list(latest.values())


def _committed_ids(parts: Iterable[Path]) -> list[str]:
    """Video ids held by the committed ``parts`` (a shard writer resuming from its own parts)."""
    out: list[str] = []
    for part in parts:
        out += read_part_index(part).ids
    return out


# ------------------------------------------------------------------------------------------------- locking

class StoreLock:
    """Advisory lock (``fcntl.flock``) of a store on this machine.

    A plain writer holds ``writer.lock`` exclusively; a shard holds it shared plus ``shards/NAME.lock``
    exclusively, so distinct shards run together while a second plain writer, or a second process on the same
    shard, is refused with a line naming the holder. The kernel drops a flock when its process dies, so a
    lock left by a killed process is simply taken over. Filesystems without flock (some network mounts) run
    unlocked: commits stay exclusive there, the lock only gives the early refusal.
    """

    def __init__(self, store: str | os.PathLike, shard: str | None = None):
        self.store, self.shard = Path(store), shard
        self._fds: list[int] = []

    def acquire(self) -> StoreLock:
        try:
            self.store.mkdir(parents=True, exist_ok=True)
            store_fd = os.open(self.store / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise StoreWriteError(f"{self.store} cannot be written: {e.strerror or e}") from None
        self._fds.append(store_fd)
        try:
            if not self._flock(store_fd, fcntl.LOCK_SH if self.shard else fcntl.LOCK_EX):
                raise StoreBusy(f"{self.store} is being written by {self._holders()}; wait for it to finish "
                                "(or give each process its own --shard i/N)")
            own_fd = store_fd
            if self.shard:
                (self.store / "shards").mkdir(exist_ok=True)
                own_fd = os.open(self.store / "shards" / f"{self.shard}.lock", os.O_RDWR | os.O_CREAT, 0o644)
                self._fds.append(own_fd)
                if not self._flock(own_fd, fcntl.LOCK_EX):
                    raise StoreBusy(f"shard {self.shard} of {self.store} is being written by "
                                    f"{self._describe(self.store / 'shards' / f'{self.shard}.lock') or 'another process'}")
            self._record(own_fd)
        except BaseException:
            self.release()
            raise
        return self

    @staticmethod
    def _flock(fd: int, mode: int) -> bool:
        try:
            fcntl.flock(fd, mode | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        except OSError as e:
            if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                return True  # no locks on this filesystem: run unlocked
            raise
        return True

    @staticmethod
    def _record(fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv)[:300],
                "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError:
            pass  # a full disk: the lock holds without the note of who holds it

    @staticmethod
    def _describe(lock: Path) -> str | None:
        try:
            info = json.loads(lock.read_text())
            pid = int(info["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
        if info.get("host") == socket.gethostname() and not _pid_alive(pid):
            return None
        cmd = info.get("command", "")
        return f"pid {pid} on {info.get('host')} (since {info.get('started')}{f': {cmd}' if cmd else ''})"

    def _holders(self) -> str:
        found = [d for d in [self._describe(self.store / LOCK_NAME)] if d]
        if not found:  # shards hold the store lock shared and note themselves in their own lock files
            found = [f"shard {p.stem}: {d}" for p in sorted((self.store / "shards").glob("*.lock"))
                     if (d := self._describe(p))]
        return "; ".join(found[:3]) or "another process"

    def release(self) -> None:
        for fd in self._fds:
            os.close(fd)  # closing drops the flock
        self._fds = []

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


def writable_error(path: str | os.PathLike) -> OSError | None:
    """The error that creating a file in ``path`` (or ``path`` itself) would meet, or None when it can be written."""
    path = Path(path)
    probe_dir = path
    while not probe_dir.exists() and probe_dir != probe_dir.parent:
        probe_dir = probe_dir.parent
    if not probe_dir.is_dir():
        return NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(probe_dir))
    probe = probe_dir / f".write-probe.{process_token()}"
    try:
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except OSError as e:
        return e
    os.close(fd)
    _unlink_quietly(probe)
    return None


def remove_stale_partials(path: Path, name: str | None = None) -> None:
    """Remove work in flight of dead writers on this machine, and of writer ``name`` (this one's earlier
    attempts: a shard redone after its worker died elsewhere)."""
    host = re.sub(r"[^A-Za-z0-9]+", "", socket.gethostname())[:24] or "host"
    for folder in (path, path / "parts", path / "shards"):
        for partial in folder.glob("*.partial"):
            m = re.search(r"\.([A-Za-z0-9]+)-(\d+)-[0-9a-f]+\.partial$", partial.name)
            if m is not None:
                mine = m.group(1) == host and int(m.group(2)) == os.getpid()
                dead = m.group(1) == host and not _pid_alive(int(m.group(2)))
                same_writer = bool(name) and partial.name.startswith(f"{name}-")
                if not mine and (dead or same_writer):
                    _unlink_quietly(partial)
            elif name and folder.name == "parts" and partial.name.startswith(f"{name}-"):
                _unlink_quietly(partial)  # an unnamed partial of this writer (older versions)


# ------------------------------------------------------------------------------------------------- writing

def _part_image(buf: list[tuple[str, dict[str, np.ndarray], dict]], digests: list[str]) -> bytes:
    """The bytes of one part holding the videos of ``buf``, built in memory (no file is touched)."""
    streams = sorted(buf[0][1])
    lengths = np.array([len(feat[streams[0]]) for _, feat, _ in buf])
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    str_t = h5py.string_dtype()
    with h5py.File(f"part-{uuid.uuid4().hex}.h5", "w", driver="core", backing_store=False) as f:
        f.attrs["schema"] = SCHEMA
        f.create_dataset("ids", data=np.array([v for v, _, _ in buf], dtype=object), dtype=str_t)
        f.create_dataset("offsets", data=offsets)
        f.create_dataset("frame_indices",
                         data=np.concatenate([np.asarray(m["frame_indices"], np.int64) for _, _, m in buf]))
        for key in _META_FLOAT:
            f.create_dataset(key, data=np.array([float(m.get(key, np.nan)) for _, _, m in buf]))
        for key in _META_INT:
            f.create_dataset(key, data=np.array([int(m.get(key, -1)) for _, _, m in buf], np.int64))
        f.create_dataset("sha256", data=np.array([m.get("sha256", "") for _, _, m in buf], dtype=object), dtype=str_t)
        f.create_dataset("digests", data=np.array(digests, dtype=object), dtype=str_t)
        g = f.create_group("streams")
        for s in streams:
            g.create_dataset(s, data=np.concatenate([np.asarray(feat[s], np.float16) for _, feat, _ in buf]))
        f.flush()
        return f.id.get_file_image()


class StoreWriter:
    """Appends videos to a store, committing a part every ``commit_every`` videos and on close.

    Opening a store built with another config raises ``StoreError`` naming the differences: features of two
    configs never mix. ``done`` holds the ids already committed (by any writer), so a rerun resumes. ``name``
    defaults to one no other process has; ``exclusive`` says the caller holds the store's lock alone (then the
    errors file may be compacted).
    """

    def __init__(self, path: Path, config: dict, classes: list[str], name: str | None = None,
                 commit_every: int = 16, only_own: bool | str = False, exclusive: bool = False):
        name = name or process_token()
        if not re.fullmatch(r"[A-Za-z0-9_.-]+", name):
            raise ValueError(f"bad writer name {name!r}")
        self.path, self.name, self.commit_every = path, name, max(1, commit_every)
        self.exclusive = exclusive
        self.config = json.loads(json.dumps(config, default=str))  # plain JSON types, as stored
        self._buffer: list[tuple[str, dict[str, np.ndarray], dict]] = []
        self._broken = False
        try:
            path.mkdir(parents=True, exist_ok=True)
            (path / "parts").mkdir(exist_ok=True)
        except OSError as e:
            raise write_error(path, "the store folder", e) from None
        h = config_hash(self.config)
        if not (path / "store.json").exists():
            header = {"format": FORMAT, "schema": SCHEMA, "config": self.config, "config_hash": h,
                      "classes": classes, "package_version": __version__,
                      "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
            try:  # exclusive: of two writers creating a store at once, the second sees the first's config
                create_exclusive(path / "store.json", json.dumps(header, indent=2, sort_keys=True).encode())
            except OSError as e:
                raise write_error(path, "store.json", e) from None
        header = FeatureStore.read_header(path)
        if header["config_hash"] != h:
            diffs = diff_configs(header["config"], self.config)
            more = f"; and {len(diffs) - 6} more" if len(diffs) > 6 else ""
            raise StoreError(f"{path} was built with a different config ({'; '.join(diffs[:6])}{more}); "
                             "use another --out for this config")
        family = only_own if isinstance(only_own, str) else name
        remove_stale_partials(path, family)
        # only_own (shards): resume from this writer's own parts, or (a string) from the parts of every attempt of
        # that writer family (a shard retried under a new attempt name); scanning every part of a store of
        # thousands of shards at the start of each shard would cost O(shards^2) file opens.
        if only_own:
            self.done: set[str] = set(_committed_ids(family_parts(path, family)))
        else:
            self.done = set(FeatureStore.open(path).ids()) if committed_parts(path) else set()
        taken = [int(m.group(1)) for p in committed_parts(path, name)
                 if (m := re.fullmatch(rf"{re.escape(name)}-(\d+)\.h5", p.name))]
        self._seq = max(taken, default=-1) + 1

    def add(self, video_id: str, features: dict[str, np.ndarray], meta: dict[str, Any]) -> bool:
        """Queue one video's features (``{stream: [T, ...]}``, all with the same T) and its provenance.

        Features that are not finite once stored as float16 (NaN, Inf, or beyond float16's range) are not
        queued: the video is recorded in errors.jsonl (stage ``features``) and False is returned.
        """
        lengths = {k: len(v) for k, v in features.items()}
        if len(set(lengths.values())) != 1:
            raise ValueError(f"{video_id}: streams differ in length {lengths}")
        with np.errstate(over="ignore"):  # beyond float16's range becomes Inf, refused just below
            stored = {k: np.asarray(v, np.float16) for k, v in features.items()}
        bad = {k: int((~np.isfinite(v)).sum()) for k, v in stored.items()}
        bad = {k: n for k, n in bad.items() if n}
        if bad:
            self.log_error(video_id, "features", "NonFinite",
                           "; ".join(f"stream {k}: {n} of {stored[k].size} values are NaN or Inf" for k, n in bad.items()))
            return False
        self._buffer.append((video_id, stored, meta))
        if len(self._buffer) >= self.commit_every:
            self.commit()
        return True

    def commit(self) -> None:
        """Write the queued videos as one new part, exclusively: it never replaces an existing part."""
        if not self._buffer or self._broken:
            return
        buf = self._buffer
        streams = sorted(buf[0][1])
        if any(sorted(f) != streams for _, f, _ in buf):
            raise ValueError("every video of a store must have the same streams")
        image = _part_image(buf, [feature_digest(f) for _, f, _ in buf])
        checksum = hashlib.sha256(image).hexdigest()
        final = self.path / "parts" / f"{self.name}-{self._seq:06d}.h5"
        try:
            while not create_exclusive(final, image):  # another writer took this number: take the next
                self._seq += 1
                final = self.path / "parts" / f"{self.name}-{self._seq:06d}.h5"
            try:
                atomic_write_text(final.with_name(final.name + ".sha256"), f"{checksum}  {final.name}\n")
            except BaseException:
                _unlink_quietly(final)  # a part without its checksum is not committed
                raise
        except OSError as e:
            self._broken = True
            raise write_error(self.path, f"part {final.name}", e) from None
        self.done.update(v for v, _, _ in buf)
        self._buffer = []
        self._seq += 1

    def log_error(self, video_id: str, stage: str, error: str, message: str) -> None:
        """Append one line to errors.jsonl (fsynced: a failure is never lost)."""
        line = json.dumps({"id": video_id, "stage": stage, "error": error, "message": message[:2000],
                           "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
        try:
            with open(self.path / "errors.jsonl", "a") as f:
                f.write(line + "\n")
                f.flush()
                os.fsync(f.fileno())
        except OSError as e:
            self._broken = True
            raise write_error(self.path, "errors.jsonl", e) from None

    def prune_errors(self) -> None:
        """Keep one line per video, its latest, and drop videos since committed. Only for a writer that holds
        the store alone: shards append to the same file concurrently."""
        if not self.exclusive:
            return
        p = self.path / "errors.jsonl"
        if not p.exists():
            return
        lines = [x for x in p.read_text(errors="replace").splitlines() if x.strip()]
        keep = [e for e in read_errors(self.path) if e.get("id") not in self.done]
        if len(keep) != len(lines):
            try:
                atomic_write_text(p, "".join(json.dumps(e) + "\n" for e in keep))
            except OSError as e:
                raise write_error(self.path, "errors.jsonl", e) from None

    def close(self) -> None:
        self.commit()

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb):
        # Commit what is complete even when the run stops on an error or Ctrl-C: nothing finished is lost.
        # After a failed write the disk is the problem: do not try again on the way out.
        if exc_type is None or not issubclass(exc_type, StoreWriteError):
            self.close()


# ------------------------------------------------------------------------------------------------ verifying

@dataclass
class Finding:
    part: str          # path relative to the store
    why: str
    damage: bool = True
    videos: list[str] = field(default_factory=list)


def _non_finite(arr: np.ndarray) -> int:
    return int((~np.isfinite(arr)).sum())


def _ids_if_readable(part: Path) -> list[str]:
    """The ids a damaged part still names, if it can be opened at all (for the report)."""
    try:
        with h5py.File(part, "r") as f:
            return _strings(f["ids"])
    except Exception:  # noqa: BLE001 - damaged in some other way: the report just has no ids
        return []


def verify_store(path: str | os.PathLike) -> tuple[list[Finding], dict[str, int]]:
    """Check every committed part of a store; return the findings and counts (parts, videos).

    Per part: it opens and its datasets and offsets agree; its bytes match the sha256 recorded at commit; every
    value is finite; each video's features match the digest recorded at commit; no video is also in an earlier
    part with other features (a same-feature duplicate is a note, not damage: readers take the first).
    """
    path = Path(path)
    FeatureStore.read_header(path)
    findings: list[Finding] = []
    seen: dict[str, tuple[str, str]] = {}  # video id -> (part name, digest)
    videos = 0
    parts = committed_parts(path)
    for part in parts:
        rel = f"parts/{part.name}"
        try:
            p = read_part_index(part)
        except DamagedPart as e:
            findings.append(Finding(rel, e.why, videos=_ids_if_readable(part)))
            continue
        except StoreError as e:
            findings.append(Finding(rel, str(e).removeprefix(f"{part}: ")))
            continue
        sidecar = part.with_name(part.name + ".sha256")
        if sidecar.is_file():
            recorded = sidecar.read_text().split()[:1]
            if recorded != [file_sha256(part)]:
                findings.append(Finding(rel, "its bytes do not match the sha256 recorded at commit", videos=p.ids))
                continue
        else:
            findings.append(Finding(rel, "no sha256 recorded at commit (written by an older version); "
                                         "contents checked", damage=False))
        why = None
        digests: list[str] = []
        try:
            with h5py.File(part, "r") as f:
                data = {s: f["streams"][s][()] for s in p.streams}
        except (OSError, RuntimeError, ValueError) as e:
            findings.append(Finding(rel, f"reading its features failed: {str(e).split(';')[0]}", videos=p.ids))
            continue
        for j, vid in enumerate(p.ids):
            a, b = int(p.offsets[j]), int(p.offsets[j + 1])
            feats = {s: arr[a:b] for s, arr in data.items()}
            bad = {s: n for s, arr in feats.items() if (n := _non_finite(arr))}
            if bad and why is None:
                why = f"video {vid}: " + ", ".join(f"{n} non-finite values in stream {s}" for s, n in bad.items())
            digests.append(feature_digest(feats))
            if p.digests is not None and p.digests[j] != digests[-1] and why is None:
                why = f"features of video {vid} do not match the digest recorded at commit"
        if why:
            findings.append(Finding(rel, why, videos=p.ids))
            continue
        for vid, digest in zip(p.ids, digests):
            if vid in seen:
                first, first_digest = seen[vid]
                same = first_digest == digest
                findings.append(Finding(rel, f"video {vid} is also in {first}"
                                             f"{' with the same features (readers take the first)' if same else ' with other features'}",
                                        damage=not same, videos=[] if same else p.ids))
            else:
                seen[vid] = (part.name, digest)
        videos += len(p.ids)
    return findings, {"parts": len(parts), "videos": len(seen)}


def quarantine(path: str | os.PathLike, findings: list[Finding]) -> list[str]:
    """Move every damaged part (and its checksum) to ``STORE/quarantine/`` (never deleted), so the next extract
    redoes exactly their videos. A shard whose part moved loses its shard manifest (also moved) so that its
    shard is extracted again; a merged index is moved too (it names the part)."""
    path = Path(path)
    moved: list[str] = []
    qdir = path / QUARANTINE
    shard_name = re.compile(r"^(s\d+of\d+)(?:\.a[0-9a-f]+)?-\d+\.h5$")
    for finding in findings:
        if not finding.damage:
            continue
        src = path / finding.part
        if not src.exists():
            continue
        qdir.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        targets = [src, src.with_name(src.name + ".sha256")]
        m = shard_name.match(src.name)
        if m:
            targets.append(path / "shards" / f"{m.group(1)}.json")
        for t in targets:
            if t.exists():
                dest = qdir / t.name
                if dest.exists():
                    dest = qdir / f"{t.name}.{stamp}"
                os.replace(t, dest)
        moved.append(finding.part)
    if moved and (path / "index.json").exists():
        os.replace(path / "index.json", qdir / f"index.json.{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    if moved:
        _fsync_dir(path / "parts")
    return moved
