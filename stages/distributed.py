"""Scale-out extraction: the manifest cut into shards, each shard extracted by one Ray task into one store.

Shards. ``--shard i/N`` is 0-based (``i`` in ``0 .. N-1``, as SLURM's ``--array=0-15`` counts) and names the
contiguous block ``videos[i*n//N : (i+1)*n//N]`` of the manifest's ``n`` videos, which are sorted by id. The N
blocks are disjoint, cover every video exactly once and differ in size by at most one. The Ray engine cuts the
manifest into ``N = ceil(n / shard_size)`` such shards, so ``--engine ray --shard-size S`` and a job array of
``--shard i/N`` make the same shards, writer names and files, and can finish each other's work.

Files. Each attempt of shard ``i/N`` writes its parts under a writer name of its own, ``sIIIIofNNNN.aXXXXXX``
(``parts/s0003of0016.a1f2e3-000000.h5``; ``XXXXXX`` random per attempt), and, once every video of its slice is committed or has an error line, its shard manifest
``shards/s0003of0016.json`` (atomic write): the slice's ids, where each committed one lives, the failed ones,
each part's size and sha256, the config hash and a digest of the whole manifest's ids. The shard manifest is the
shard's commit: a shard that has one is never redone (the engine skips it before starting a task, without
building a model; so the store's config is checked by the shards that do run, and by ``merge``).

Failures. Each shard is one Ray task with ``max_retries``: a worker or node that dies mid-shard is redone
elsewhere, and the new attempt resumes from the parts every earlier attempt of the shard committed (its
``*.partial`` files are removed), so nothing committed is computed twice. Exceptions inside a task (a store with
another config, a missing dataset) are not retried: they would fail again. A video that kills its decoder
costs that video only, as in the single-process run: the task uses the same isolated decode workers.

Merge. ``merge(STORE)`` checks every shard manifest against the parts present (a shard that is missing, or
has parts but no manifest, is an error naming it; so is a part that is missing, resized or holds other ids)
and writes ``index.json``: the parts, and per video its part and rows, in the reader's rule (first part in name
order wins); videos committed in more than one part are listed under ``duplicates`` and reported. No HDF5
virtual datasets: they fill missing sources silently, and the reader refuses them.

Fencing. An attempt cut off from the cluster that keeps running while its task is retried elsewhere commits
under its own attempt name, so it never takes the name of the attempt that replaced it. The shard manifest names
the parts of the shard's commit; ``merge`` moves parts of the shard that it does not name (written by such an
attempt after the commit) to ``STORE/superseded/`` and reports them, so the store holds exactly one copy of each
video.

Limits. Features are bitwise equal to the single-process run's at the same torch thread count (a Ray task
with ``num_cpus=1`` runs torch on one thread; fp32 convolutions sum in a thread-dependent order, and 1 vs 2
threads moves about 0.5% of the float16 features by one unit in the last place). The shard lock refuses a second
live attempt on the same machine; across machines, attempt names and ``merge`` keep attempts apart (Fencing).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pipeline.errors import UserError

__all__ = [
    "DistributedSummary",
    "ShardError",
    "merge",
    "parse_shard",
    "run_ray",
    "shard_bounds",
    "shard_name",
    "shard_slice",
]

SHARD_FORMAT = "twostream-shard"
INDEX_FORMAT = "twostream-store-index"
_SHARD_NAME = re.compile(r"^s(\d+)of(\d+)$")


class ShardError(UserError):
    """A shard that is missing, not committed, or does not match its manifest or the dataset."""


# ------------------------------------------------------------------------------------------- shard arithmetic

def parse_shard(text: str) -> tuple[int, int]:
    """``"3/16"`` -> ``(3, 16)``: shard 3 of 16, 0-based."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", str(text))
    if not m:
        raise UserError(f"--shard expects i/N (0-based, e.g. 0/16 .. 15/16); got {text!r}")
    i, n = int(m.group(1)), int(m.group(2))
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {text}: need 0 <= i < N (shards are 0-based: 0/{max(n, 1)} .. {max(n, 1) - 1}/{max(n, 1)})")
    return i, n


def shard_bounds(n_videos: int, i: int, n: int) -> tuple[int, int]:
    """Rows ``[start, stop)`` of shard ``i`` of ``n`` over ``n_videos`` sorted videos (balanced contiguous blocks)."""
    return i * n_videos // n, (i + 1) * n_videos // n


def shard_slice(videos: list, i: int, n: int) -> list:
    a, b = shard_bounds(len(videos), i, n)
    return videos[a:b]


def shard_name(i: int, n: int) -> str:
    """Writer name of shard ``i`` of ``n``: ``s0003of0016`` (zero-padded, so names sort in shard order)."""
    width = max(4, len(str(n)))
    return f"s{i:0{width}d}of{n:0{width}d}"


def attempt_name(shard: str) -> str:
    """Writer name of one attempt of a shard: ``s0003of0016.a1f2e3`` (random): two live attempts of a shard (a
    node cut off but still running while its task is retried elsewhere) never commit under one name."""
    import secrets

    return f"{shard}.a{secrets.token_hex(3)}"


def shard_of_writer(writer: str) -> str | None:
    """The shard a writer name belongs to (``s0003of0016`` for the shard or any of its attempts), else None."""
    base = writer.split(".a", 1)[0]
    return base if _SHARD_NAME.match(base) else None


def shards_for(n_videos: int, shard_size: int) -> int:
    """How many shards of at most ``shard_size`` videos the Ray engine cuts ``n_videos`` into."""
    if shard_size < 1:
        raise UserError(f"--shard-size must be >= 1; got {shard_size}")
    return max(1, math.ceil(n_videos / shard_size))


def ids_digest(ids: list[str]) -> str:
    """Digest of the whole manifest's ids in order: shards cut from another manifest do not mix."""
    h = hashlib.sha256()
    for vid in ids:
        h.update(vid.encode() + b"\0")
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------------------- shard manifests

def shard_manifest_path(store: str | Path, name: str) -> Path:
    return Path(store) / "shards" / f"{name}.json"


def committed_shard(store: str | Path, i: int, n: int, slice_ids: list[str], digest: str) -> dict | None:
    """The shard manifest of shard ``i/n`` when it is committed, else None. Raises when it was cut from another
    manifest (the dataset changed since): its slice would not be this slice."""
    path = shard_manifest_path(store, shard_name(i, n))
    if not path.is_file():
        return None
    doc = _read_json(path)
    if doc.get("digest") != digest or doc.get("videos") != slice_ids:
        raise ShardError(f"{path}: shard {i}/{n} was cut from another manifest (the dataset changed since it was "
                         "extracted); extract into a new --out, or use another shard count")
    return doc


def write_shard_manifest(store: str | Path, i: int, n: int, slice_ids: list[str], n_videos: int, digest: str,
                         config_hash: str, summary: dict) -> dict | None:
    """Commit shard ``i/n`` when every video of its slice is in one of its parts or has an error line.

    Returns the manifest written, or None when the shard is not complete yet (``--limit``, an interrupted run).
    """
    from pipeline.store import atomic_write_text, family_parts, file_sha256, read_errors, read_part_index

    store = Path(store)
    name = shard_name(i, n)
    parts: dict[str, dict[str, Any]] = {}
    where: dict[str, str] = {}
    for part in family_parts(store, name):  # every attempt's parts: a retry resumes from a dead attempt's commits
        ids = read_part_index(part).ids
        parts[part.name] = {"ids": ids, "size": part.stat().st_size, "sha256": file_sha256(part)}
        for vid in ids:
            where.setdefault(vid, part.name)
    errors = {e.get("id"): e for e in read_errors(store)}
    failed = sorted(v for v in slice_ids if v not in where and v in errors)
    if any(v not in where and v not in errors for v in slice_ids):
        return None
    doc = {"format": SHARD_FORMAT, "shard": [i, n], "name": name, "config_hash": config_hash, "digest": digest,
           "n_videos": n_videos, "videos": slice_ids, "committed": {v: where[v] for v in slice_ids if v in where}, "failed": failed,
           "parts": parts, "summary": {k: summary.get(k) for k in ("done", "skipped", "failed", "frames", "wall")},
           "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    (store / "shards").mkdir(exist_ok=True)
    atomic_write_text(shard_manifest_path(store, name), json.dumps(doc, indent=1, sort_keys=True))
    return doc


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ShardError(f"{path} cannot be read: {e}") from None


# ---------------------------------------------------------------------------------------------- Ray engine

@dataclass
class DistributedSummary:
    shards: int = 0
    done: int = 0               # shards extracted by this run
    skipped: int = 0            # shards already committed
    incomplete: int = 0         # shards that ran but are not committed (videos still missing)
    failed: list[dict] = field(default_factory=list)  # {"shard", "error"} for shards whose task failed
    videos_done: int = 0
    videos_failed: int = 0
    frames: int = 0
    wall: float = 0.0
    store: str = ""

    def as_dict(self) -> dict:
        return asdict(self)


def _extract_shard(dataset: str, out: str, cfg, opts, split_dir, csv) -> dict:
    """One Ray task: the single-process extractor on one shard (same code, so the same features)."""
    from stages.extract import extract

    _record_attempt(Path(out), shard_name(*opts.shard))
    return extract(dataset, out, cfg, opts, split_dir=split_dir, csv=csv).as_dict()


def _record_attempt(store: Path, name: str) -> None:
    """Append who runs this attempt of the shard to ``shards/NAME.attempts`` (JSON lines: host, pid, time), so an
    operator sees where a shard ran and how often it was retried. Informational: merge does not read it."""
    import os
    import socket

    (store / "shards").mkdir(parents=True, exist_ok=True)
    line = json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                       "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())})
    with open(store / "shards" / f"{name}.attempts", "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_ray(dataset: str | Path, out: str | Path, cfg, opts, shard_size: int = 64, address: str | None = None,
            split_dir: str | Path | None = None, csv: str | Path | None = None, max_retries: int = 3,
            progress: bool = True) -> DistributedSummary:
    """Extract ``dataset`` into ``out`` as shards of at most ``shard_size`` videos, one Ray task per shard.

    Connects to the cluster at ``address`` (``"auto"``: the one ``ray start`` made on this node; None: a
    Ray already initialised in this process, else a new local one). The dataset and the store must be at the
    same paths on every node (a shared filesystem). ``opts`` is the single-process ``RunOptions``: each task
    gets ``opts`` with its shard set and no progress bar, ``max(1, opts.workers)`` CPUs and one GPU when the
    cluster has GPUs and ``opts.device`` is not ``cpu``.
    """
    from dataclasses import replace

    from tqdm import tqdm

    from pipeline.datasets import load_manifest

    t0 = time.perf_counter()
    if opts.shard is not None:
        raise UserError("--shard picks one slice for a job array; --engine ray runs every shard: give one of them")
    if opts.limit is not None:
        raise UserError("--limit does not combine with --engine ray (a shard is committed only when complete)")
    ids = [v.id for v in load_manifest(dataset, split_dir=split_dir, csv=csv).videos]
    n = shards_for(len(ids), shard_size)
    digest = ids_digest(ids)
    summary = DistributedSummary(shards=n, store=str(out))
    todo = []
    for i in range(n):
        a, b = shard_bounds(len(ids), i, n)
        if committed_shard(out, i, n, ids[a:b], digest) is None or opts.retry_failed:
            todo.append(i)
    summary.skipped = n - len(todo)
    if not todo:
        summary.wall = time.perf_counter() - t0
        return summary

    ray = connect_ray(address)
    gpus = 1 if opts.device != "cpu" and ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(_extract_shard).options(num_cpus=max(1, opts.workers), num_gpus=gpus,
                                              max_retries=max_retries, retry_exceptions=False)
    args = (str(Path(dataset).resolve()), str(Path(out).resolve()), cfg)
    extra = tuple(str(Path(x).resolve()) if x else None for x in (split_dir, csv))  # workers' cwd may differ
    refs = {task.remote(*args, replace(opts, shard=(i, n), progress=False), *extra): i for i in todo}
    bar = tqdm(total=n, initial=summary.skipped, unit="shard", disable=not progress, dynamic_ncols=True)
    try:
        with ray_as_completed(ray, refs) as results:  # Ctrl-C or a user error: the shards still queued stop
            for i, res, error in results:
                if isinstance(error, ray.exceptions.RayTaskError):
                    cause = error.as_instanceof_cause() if hasattr(error, "as_instanceof_cause") else error
                    if isinstance(cause, UserError):  # the same mistake in every shard: stop, say it once
                        raise UserError(f"shard {i}/{n}: {_first_line(cause)}") from None
                    summary.failed.append({"shard": f"{i}/{n}", "error": _first_line(cause)})
                elif error is not None:  # retries used up: workers or nodes kept dying
                    summary.failed.append({"shard": f"{i}/{n}", "error": f"{type(error).__name__}: {_first_line(error)}"})
                else:
                    committed = shard_manifest_path(out, shard_name(i, n)).is_file()
                    summary.done += committed
                    summary.incomplete += not committed
                    summary.videos_done += res["done"]
                    summary.videos_failed += res["failed"]
                    summary.frames += res["frames"]
                bar.update(1)
                bar.set_postfix(videos=summary.videos_done, failed=summary.videos_failed,
                                shards_failed=len(summary.failed))
    finally:
        bar.close()
    summary.wall = time.perf_counter() - t0
    return summary


@contextlib.contextmanager
def ray_as_completed(ray, refs: dict):
    """Iterate ``(key, value, error)`` over Ray tasks ``refs`` ({object ref: key}) in completion order: ``value``
    is the task's result, or ``error`` the ``RayError`` that ``ray.get`` raised. Leaving the block early (Ctrl-C,
    an error) cancels the tasks not yet done, as a local pool's workers stop with their pool."""
    pending = dict(refs)

    def results():
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            key = pending.pop(ready[0])
            try:
                value, error = ray.get(ready[0]), None
            except ray.exceptions.RayError as e:
                value, error = None, e
            yield key, value, error

    try:
        yield results()
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def connect_ray(address: str | None = None):
    """The ``ray`` module, connected: to the cluster at ``address`` (``"auto"``: the one ``ray start`` made on this
    node), else to a Ray already initialised in this process, else a new local one. One line when Ray is missing
    or the cluster cannot be reached."""
    try:
        import ray
    except ImportError:
        raise UserError("--engine ray needs Ray: pip install -e '.[ray]'") from None
    if not ray.is_initialized():
        try:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        except (ConnectionError, RuntimeError, ValueError) as e:
            raise UserError(f"cannot reach a Ray cluster at {address or 'a new local instance'}: {e}") from None
    return ray


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[-1] if text else type(e).__name__


# -------------------------------------------------------------------------------------------------- merge

def merge(store: str | Path, checksums: bool = False) -> dict:
    """Verify every shard of ``store`` against its shard manifest and the parts present; write ``index.json``.

    Raises ``ShardError`` naming the first problem: a shard missing or not committed, shards cut with two
    shard counts or from two manifests, a part missing, resized, holding other ids, or (``checksums``) other
    bytes. Parts of writers that are not shards (a plain ``extract``) are committed parts and are indexed too.
    """
    from pipeline.store import FeatureStore, StoreError, atomic_write_text, file_sha256

    store = Path(store)
    header = FeatureStore.read_header(store)
    manifests = {p.stem: _read_json(p) for p in sorted((store / "shards").glob("*.json"))}
    shard_parts: dict[str, list[str]] = {}
    for part in sorted((store / "parts").glob("*.h5")):
        shard = shard_of_writer(part.name.rsplit("-", 1)[0])
        if shard:
            shard_parts.setdefault(shard, []).append(part.name)
    counts = {doc["shard"][1] for doc in manifests.values()} | {int(_SHARD_NAME.match(w).group(2)) for w in shard_parts}
    if not counts:
        raise ShardError(f"{store} holds no shards (no shards/*.json, no parts/s*of*-*.h5): nothing to merge")
    if len(counts) > 1:
        raise ShardError(f"{store} holds shards of {len(counts)} different shard counts ({sorted(counts)}); "
                         "a store is cut one way")
    n = counts.pop()
    if len({(doc.get("digest"), doc.get("n_videos")) for doc in manifests.values()}) > 1:
        raise ShardError(f"{store}: shard manifests were cut from different dataset manifests")
    total = next(iter(manifests.values()))["n_videos"] if manifests else 0
    superseded: list[tuple[str, str]] = []  # (shard, part) committed by an attempt the shard's commit does not name
    for i in range(n):
        name = shard_name(i, n)
        doc = manifests.get(name)
        if doc is None:
            if name in shard_parts:
                raise ShardError(f"shard {i}/{n} ({name}) is not committed: {len(shard_parts[name])} part(s) but no "
                                 f"shards/{name}.json; rerun `twostream extract ... --shard {i}/{n}` to finish it")
            raise ShardError(f"shard {i}/{n} ({name}) is missing: no shards/{name}.json and no parts; "
                             f"run `twostream extract ... --shard {i}/{n}`")
        if doc.get("format") != SHARD_FORMAT or doc.get("shard") != [i, n]:
            raise ShardError(f"shards/{name}.json is not the manifest of shard {i}/{n}")
        if doc.get("config_hash") != header["config_hash"]:
            raise ShardError(f"shard {i}/{n} was extracted with another config than {store}/store.json")
        a, b = shard_bounds(total, i, n)
        if len(doc["videos"]) != b - a:
            raise ShardError(f"shard {i}/{n} lists {len(doc['videos'])} videos; a {total}-video manifest cut "
                             f"{n} ways gives it {b - a}")
        for pname, info in doc["parts"].items():
            path = store / "parts" / pname
            if not path.is_file():
                raise ShardError(f"shard {i}/{n}: part {pname} listed in shards/{name}.json is missing")
            if path.stat().st_size != info["size"]:
                raise ShardError(f"shard {i}/{n}: part {pname} is {path.stat().st_size} bytes, its shard manifest "
                                 f"says {info['size']}")
            if checksums and file_sha256(path) != info["sha256"]:
                raise ShardError(f"shard {i}/{n}: part {pname} does not match its sha256 in shards/{name}.json")
            if _part_ids(path) != info["ids"]:
                raise ShardError(f"shard {i}/{n}: part {pname} holds other videos than shards/{name}.json lists")
        # Parts of an attempt that the shard's commit does not name (an attempt cut off from the cluster that kept
        # writing after another one committed the shard): moved aside, never indexed, reported.
        superseded += [(name, p) for p in sorted(set(shard_parts.get(name, [])) - set(doc["parts"]))]
        missing = [v for v in doc["videos"] if v not in doc["committed"] and v not in doc["failed"]]
        if missing:
            raise ShardError(f"shard {i}/{n}: {len(missing)} video(s) neither committed nor failed, e.g. {missing[0]}")
    if superseded:
        aside = store / "superseded"
        aside.mkdir(exist_ok=True)
        for _, pname in superseded:
            for f in (store / "parts" / pname, store / "parts" / f"{pname}.sha256"):
                if f.exists():
                    os.replace(f, aside / f.name)
    try:
        fs = FeatureStore.open(store)  # every part: safety checks, stream shapes, the reader's duplicate rule
    except StoreError as e:
        raise ShardError(str(e)) from None
    with fs:
        parts = [p.name for p in fs.parts]
        index = {
            "format": INDEX_FORMAT,
            "config_hash": header["config_hash"],
            "shards": n,
            "parts": {p: (store / "parts" / p).stat().st_size for p in parts},
            "streams": {k: list(v) for k, v in fs._stream_shapes.items()},
            "videos": {vid: [parts[k], a, b] for vid, (k, a, b) in fs.locations()},
            "failed": sorted({v for doc in manifests.values() for v in doc["failed"]} - set(fs.ids())),
            "duplicates": fs.duplicates,
            "superseded": [p for _, p in superseded],
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    atomic_write_text(store / "index.json", json.dumps(index, sort_keys=True))
    return {"shards": n, "videos": len(index["videos"]), "failed": len(index["failed"]), "parts": len(parts),
            "duplicates": fs.duplicates, "manifest_videos": total, "index": str(store / "index.json"),
            "superseded": [f"{shard}: {p}" for shard, p in superseded]}


def _part_ids(path: Path) -> list[str]:
    from pipeline.store import read_part_index

    return read_part_index(path).ids
