"""Stage two, many runs: a sweep file expanded into training jobs, run by parallel workers over cached features.

A sweep file (YAML) lists heads with parameter grids, streams, splits and seeds::

    set: {epochs: 30}                  # optional: fixed overrides for every run (as --set key=value)
    runs:
      - head: temporal-pool
        streams: [rgb]                 # the streams one run sees (concatenated per frame); [[rgb], [flow]] sweeps them
        splits: [1]
        grid: {segments: [1, 3]}       # cartesian product of the listed values
      - head: ts-lstm
        seeds: [0, 1]
        set: {hidden: "1024,512"}      # fixed overrides of this line

``expand`` turns each line into one ``stages.train.TrainJob`` per (grid point, streams, split, seed); every value
becomes the ``--set key=value`` string a user would type, so a sweep run and ``twostream train`` with the same
settings name the same run directory. ``run_sweep`` hands the jobs to worker processes; each calls
``stages.train.train``, which skips a run whose directory is complete (the same resolved config hash). So a rerun
after adding one line trains only that line, and a sweep killed halfway resumes where it stopped. Precedence of
overrides: the file's top-level ``set``, the line's ``set``, its grid point, then ``--set`` from the command line.

Workers load the features once: each keeps a ``FeatureCache`` of the stores it opened (every stream held in memory
while it fits ``cache_gb``) and of the dataset manifests, shared by all the runs it trains. With CUDA the workers
share the GPUs (worker k on GPU k mod n): the heads are small, so several train side by side. A failing run is
reported and the sweep goes on.

The sweep owns its workers: each dies with the process that started it (``PR_SET_PDEATHSIG`` on Linux, and a
watchdog thread that polls the parent's pid everywhere), so killing a sweep, even with ``kill -9``, leaves no worker
training. Each run directory is written under its lock (``pipeline.runs.RunDir.claim``), so two sweeps over one
``--out`` never write the same run: the second waits for it and finds it cached.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pipeline.baselines  # registers the kernel baselines: svm, svm-ef, svm-lf, svm-mkl
import pipeline.heads  # noqa: F401  (registers every torch head)
from pipeline.errors import UserError
from pipeline.runs import ensure_writable

__all__ = ["FeatureCache", "SweepOutcome", "check_streams", "dedupe", "die_with_parent", "expand", "load_sweep",
           "plan_sweep", "run_sweep", "set_value"]

RUN_KEYS = ("head", "grid", "set", "streams", "splits", "seeds")
TOP_KEYS = ("runs", "set", "streams", "splits", "seeds")
LOG_NAME = "sweep-log.jsonl"  # one JSON line per trained or failed run, appended (how long; the traceback of a failure)


# ---------------------------------------------------------------------------------------------- the sweep file


def load_sweep(path: str | os.PathLike) -> dict:
    """Read and check a sweep file; returns the parsed mapping."""
    import yaml

    p = Path(path)
    if not p.is_file():
        raise UserError(f"sweep file {p} does not exist")
    try:
        spec = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"{p} is not valid YAML: {e}") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("runs"), list) or not spec["runs"]:
        raise UserError(f"{p}: a sweep file is a mapping with a non-empty list under 'runs:'")
    return spec


def set_value(value: Any) -> str:
    """A YAML value as the string of ``--set key=value``: lists join with commas, booleans are true/false."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "none"
    if isinstance(value, (list, tuple)):
        return ",".join(set_value(v) for v in value)
    if isinstance(value, dict):
        raise UserError(f"a --set value cannot be a mapping: {value!r}")
    return str(value)


def _as_list(value: Any, what: str, cast=int) -> list:
    values = value if isinstance(value, (list, tuple)) else [value]
    try:
        out = [cast(v) for v in values]
    except (TypeError, ValueError):
        raise UserError(f"{what}: cannot read {value!r} as a list of {cast.__name__}") from None
    if not out:
        raise UserError(f"{what} is empty")
    return out


def _stream_choices(value: Any, what: str) -> list[tuple[str, ...] | None]:
    """``None`` (the store's default), ``rgb`` / ``rgb,flow`` / ``[rgb, flow]`` (one choice: the streams one run sees),
    or a list of those (several choices, one run each)."""
    if value is None:
        return [None]

    def one(v) -> tuple[str, ...]:
        parts = v.split(",") if isinstance(v, str) else v
        if not isinstance(parts, (list, tuple)) or not parts or not all(isinstance(s, str) and s.strip() for s in parts):
            raise UserError(f"{what}: cannot read {v!r} as streams (e.g. rgb, 'rgb,flow' or [rgb, flow])")
        return tuple(s.strip() for s in parts)

    if isinstance(value, list) and any(isinstance(v, list) for v in value):
        return [one(v) for v in value]
    return [one(value)]


def _mapping(value: Any, what: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise UserError(f"{what} must be a mapping of key: value, got {value!r}")
    return value


def expand(spec: dict, store: str, dataset: str, out: str, overrides: Sequence[tuple[str, str]] = (),
           device: str = "auto", split_dir: str | None = None, allow_missing: bool = False) -> list:
    """Every ``TrainJob`` of a sweep, in file order: per line, the cartesian product of its grid (keys in the order
    written), then stream choices, splits and seeds. Head names and keys are checked now, before any training."""
    from pipeline.training import resolve_configs
    from stages.train import TrainJob

    unknown = set(spec) - set(TOP_KEYS)
    if unknown:
        raise UserError(f"unknown sweep key {min(unknown)!r}; top-level keys: {', '.join(TOP_KEYS)}")
    top_set = _mapping(spec.get("set"), "set")
    jobs = []
    for n, line in enumerate(spec["runs"], start=1):
        where = f"runs[{n}]"
        if not isinstance(line, dict) or "head" not in line:
            raise UserError(f"{where}: each run needs 'head:' (and optionally {', '.join(RUN_KEYS[1:])})")
        bad = set(line) - set(RUN_KEYS)
        if bad:
            raise UserError(f"{where}: unknown key {min(bad)!r}; run keys: {', '.join(RUN_KEYS)}")
        head = str(line["head"])
        grid = _mapping(line.get("grid"), f"{where}.grid")
        keys = list(grid)
        values = [grid[k] if isinstance(grid[k], list) else [grid[k]] for k in keys]
        if any(not v for v in values):
            raise UserError(f"{where}.grid: every key needs at least one value")
        fixed = [(str(k), set_value(v)) for k, v in {**top_set, **_mapping(line.get("set"), f"{where}.set")}.items()]
        streams = _stream_choices(line.get("streams", spec.get("streams")), f"{where}.streams")
        splits = _as_list(line.get("splits", spec.get("splits", 1)), f"{where}.splits")
        seeds = _as_list(line.get("seeds", spec.get("seeds", 0)), f"{where}.seeds")
        for point in itertools.product(*values):
            sets = tuple(fixed) + tuple((str(k), set_value(v)) for k, v in zip(keys, point)) + tuple(overrides)
            for seed in seeds:
                resolve_configs(head, dict(sets), seed=seed)  # unknown head / key / bad value: fail before training
            for st, split, seed in itertools.product(streams, splits, seeds):
                jobs.append(TrainJob(store=store, dataset=dataset, head=head, split=split, streams=st,
                                     overrides=sets, out=out, seed=seed, device=device,
                                     allow_missing=allow_missing, split_dir=split_dir))
    return jobs


def dedupe(jobs: Sequence, default_streams: tuple[str, ...] | None = None) -> list:
    """Jobs with distinct resolved settings, first kept: two lines that resolve to one run would race on its
    directory. Identity is (head, resolved head config, resolved train config, streams, split, data)."""
    from pipeline.training import resolve_configs

    seen, out = set(), []
    for job in jobs:
        head_cfg, cfg = resolve_configs(job.head, dict(job.overrides), seed=job.seed)
        key = (job.head, repr(head_cfg), repr(cfg), tuple(job.streams or default_streams or ()), job.split,
               job.store, job.dataset, job.split_dir)
        if key not in seen:
            seen.add(key)
            out.append(job)
    return out


def check_streams(jobs: Sequence, available: dict[str, int] | Sequence[str]) -> None:
    """Refuse, before any run starts, a job that asks for a stream the store does not have."""
    for job in jobs:
        missing = [s for s in job.streams or () if s not in available]
        if missing:
            raise UserError(f"{describe(job)}: the feature store has no stream {missing[0]!r}; "
                            f"it has: {', '.join(available)}")


def describe(job) -> str:
    """``head [k=v ...] streams split seed`` for progress lines."""
    sets = " ".join(f"{k}={v}" for k, v in job.overrides)
    streams = "+".join(job.streams) if job.streams else "default streams"
    return f"{job.head}{' ' + sets if sets else ''} on {streams}, split {job.split}, seed {job.seed}"


# ---------------------------------------------------------------------------------------------- worker cache


class CachedStore:
    """A ``FeatureStore`` whose streams are read from HDF5 once and then served from memory.

    Everything ``stages.train`` and ``pipeline.features`` read (``streams``, ``fingerprint``, ``classes``, ``ids``,
    ``load``, ``get``, ``meta``) behaves as the store's own; a stream that does not fit the cache's budget is read
    from the store each time, as without a cache.
    """

    def __init__(self, store, cache: FeatureCache):
        self._store, self._cache = store, cache
        self._streams: dict[str, dict | None] = {}

    def __getattr__(self, name):  # streams, fingerprint, classes, config, ids, meta, path, header, ...
        return getattr(self._store, name)

    def __contains__(self, video_id: str) -> bool:
        return video_id in self._store

    def __len__(self) -> int:
        return len(self._store)

    def _held(self, stream: str) -> dict | None:
        if stream not in self._streams:
            nbytes = self._store.info()["frames"] * self._store.streams[stream] * 2  # float16
            if stream in self._store.streams and self._cache.reserve(nbytes):
                ids = self._store.ids()
                self._streams[stream] = dict(zip(ids, self._store.load(stream, ids)))
            else:
                self._streams[stream] = None
        return self._streams[stream]

    def load(self, stream: str = "rgb", ids=None) -> list:
        held = self._held(stream) if stream in self._store.streams else None
        ids = self._store.ids() if ids is None else list(ids)
        if held is None or any(v not in held for v in ids):
            return self._store.load(stream, ids)  # the store's own errors for unknown ids / streams
        return [held[v] for v in ids]

    def get(self, video_id: str, stream: str = "rgb"):
        held = self._held(stream) if stream in self._store.streams else None
        return held[video_id] if held is not None and video_id in held else self._store.get(video_id, stream)


class FeatureCache:
    """What one worker loads once and reuses for every run it trains: opened stores (``CachedStore``) and
    dataset manifests, keyed by path. Lives as long as one sweep, so files changed between sweeps are reread."""

    def __init__(self, cache_gb: float = 4.0):
        self.budget = int(cache_gb * 2**30)
        self.used = 0
        self._stores: dict[tuple, CachedStore] = {}
        self._manifests: dict[tuple, Any] = {}
        self.hits = self.misses = 0

    def reserve(self, nbytes: int) -> bool:
        if self.used + nbytes > self.budget:
            return False
        self.used += nbytes
        return True

    def open_store(self, path) -> CachedStore:
        from pipeline.store import FeatureStore

        key = (str(Path(path).resolve()),)
        if key in self._stores:
            self.hits += 1
        else:
            self.misses += 1
            self._stores[key] = CachedStore(FeatureStore.open(path), self)
        return self._stores[key]

    def load_manifest(self, root, split_dir=None):
        from pipeline.datasets import load_manifest

        key = (str(Path(root).resolve()), None if split_dir is None else str(Path(split_dir).resolve()))
        if key not in self._manifests:
            self._manifests[key] = load_manifest(root, split_dir)
        return self._manifests[key]


# ---------------------------------------------------------------------------------------------- workers

_WORKER: dict[str, Any] = {}


def die_with_parent(parent_pid: int, poll_s: float = 0.5) -> None:
    """End this process when ``parent_pid`` (the sweep that started it) is gone, however the parent died.

    Linux: the kernel sends SIGKILL when the parent dies (``prctl(PR_SET_PDEATHSIG)``). Everywhere: a daemon thread
    polls ``os.getppid()``, which changes once the parent is gone (the orphan is re-parented), and exits at once.
    """
    if sys.platform.startswith("linux"):
        import ctypes
        import ctypes.util

        try:
            libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
        except (OSError, AttributeError):
            pass  # no prctl: the watchdog below still ends the worker
    if os.getppid() != parent_pid:  # the parent died before the death signal was armed
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(poll_s)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _worker_init(cache_gb: float, devices: list[str], counter, threads: int, parent_pid: int) -> None:
    """Process-pool initializer: die with the sweep, one cache per worker, a GPU by worker number, and a share of
    the CPU threads."""
    die_with_parent(parent_pid)
    import torch

    with counter.get_lock():
        k = counter.value
        counter.value += 1
    if threads > 0:
        torch.set_num_threads(threads)
    _WORKER.update(cache=FeatureCache(cache_gb), device=devices[k % len(devices)] if devices else None)


def _run_one(job) -> dict:
    """Train (or find cached) one job; never raises for a failing run (the sweep goes on), only for Ctrl-C."""
    from stages.train import train

    cache = _WORKER.get("cache") or FeatureCache()
    if job.device == "auto" and _WORKER.get("device"):
        job = dataclasses.replace(job, device=_WORKER["device"])
    t0 = time.perf_counter()
    notes: list[str] = []  # what the sweep should tell the user (e.g. waiting for a run another process holds)

    def note(msg: str) -> None:
        if "waiting for it" in msg:
            notes.append(msg)

    try:
        res = train(job, progress=False, echo=note, open_store=cache.open_store, open_manifest=cache.load_manifest)
    except Exception as e:  # noqa: BLE001  (a failing run is reported, the sweep goes on)
        return {"status": "failed", "seconds": time.perf_counter() - t0, "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc(limit=-4), "pid": os.getpid(), "notes": notes}
    m = res.metrics
    return {"status": "cached" if res.cached else "trained", "run": res.path.name, "path": str(res.path),
            "seconds": time.perf_counter() - t0, "fit_seconds": m.get("fit_seconds"), "accuracy": m.get("accuracy"),
            "pid": os.getpid(), "device": m.get("device"), "notes": notes}


def _ray_run_one(job, cache_gb: float) -> dict:
    """One run inside a Ray worker. Ray reuses worker processes, so a worker keeps its ``FeatureCache`` (stores
    opened, features loaded) across the runs it is given, as a local pool worker does."""
    import torch

    if "cache" not in _WORKER:
        torch.set_num_threads(1)  # one CPU per task, as Ray schedules it
        _WORKER.update(cache=FeatureCache(cache_gb), device=None)
    return _run_one(job)


def _run_ray(jobs: list, cache_gb: float, done: Callable[[int, dict], None], address: str | None = None,
             max_retries: int = 3) -> None:
    """Each job one Ray task (one CPU, and one GPU when the cluster has any), results in completion order.

    Run directories live under ``job.out`` on a filesystem every node mounts; each run is written under its lock
    (``pipeline.runs.RunDir.claim``), so the same cache, locking and resume hold as for local sweeps. A task whose
    worker or node dies is retried (``max_retries``): its lock died with it, the half-written directory is reset
    and trained afresh, so a run is never trained twice into one directory and a dead node costs only its runs in
    flight.
    """
    from stages.distributed import connect_ray, ray_as_completed

    ray = connect_ray(address)
    gpus = 1 if ray.cluster_resources().get("GPU", 0) >= 1 else 0
    task = ray.remote(num_cpus=1, num_gpus=gpus, max_retries=max_retries)(_ray_run_one)
    refs = {task.remote(job, cache_gb): i for i, job in enumerate(jobs)}
    with ray_as_completed(ray, refs) as results:  # Ctrl-C: the runs still queued or training stop with the sweep
        for i, info, error in results:
            if error is not None:  # retries spent: the worker kept dying
                info = {"status": "failed", "seconds": 0.0,
                        "error": f"the Ray task died {max_retries + 1} times: {str(error).splitlines()[0]}"}
            done(i, info)


@dataclass
class SweepOutcome:
    job: Any
    status: str  # "trained" | "cached" | "failed"
    info: dict

    @property
    def failed(self) -> bool:
        return self.status == "failed"


def _log(out: str, job, info: dict) -> None:
    Path(out).mkdir(parents=True, exist_ok=True)
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "job": describe(job), **info}
    with open(Path(out) / LOG_NAME, "a") as f:
        f.write(json.dumps(row, default=str) + "\n")


def _devices() -> list[str]:
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def run_sweep(jobs: Sequence, workers: int = 1, progress: bool = True, cache_gb: float = 4.0,
              echo: Callable[[str], None] = print, engine: str = "local",
              address: str | None = None) -> list[SweepOutcome]:
    """Run every job (cached ones return at once); returns one outcome per job, in job order.

    ``engine="local"``: ``workers == 1`` trains in this process; more start that many worker processes (spawned:
    torch and HDF5 handles do not survive a fork well). A worker process that dies (out of memory, a segfault)
    fails the runs it held; the others go on in a fresh pool. ``engine="ray"``: each run is a task on the Ray
    cluster at ``address`` (``_run_ray``); ``workers`` is ignored (the cluster's resources decide).
    """
    if engine not in ("local", "ray"):
        raise UserError(f"unknown sweep engine {engine!r}; engines: local, ray")
    from tqdm.auto import tqdm

    from stages.train import check_store_split

    jobs = list(jobs)
    checker = FeatureCache(0.0)  # a split whose test videos a fine-tuned CNN of the store saw: refused before any run
    for job in {(j.store, j.dataset, j.split_dir, j.split, j.streams): j for j in jobs}.values():
        check_store_split(job, open_store=checker.open_store, open_manifest=checker.load_manifest)
    for out in sorted({job.out for job in jobs}):
        ensure_writable(out)  # before any worker starts: a folder that cannot take runs is one clear error
    outcomes: list[SweepOutcome | None] = [None] * len(jobs)
    bar = tqdm(total=len(jobs), desc="sweep", unit="run", disable=not progress)
    counts = {"trained": 0, "cached": 0, "failed": 0}
    say = bar.write if progress else echo  # lines printed above the bar, or plain lines without one

    def done(i: int, info: dict) -> None:
        outcomes[i] = SweepOutcome(jobs[i], info["status"], info)
        for msg in info.get("notes", ()):
            say(msg)
        counts[info["status"]] += 1
        if info["status"] != "cached":
            _log(jobs[i].out, jobs[i], info)
        if info["status"] == "failed":
            say(f"FAILED {describe(jobs[i])}: {info['error']}")
        elif info["status"] == "trained":
            say(f"trained {info['run']} ({describe(jobs[i])}): accuracy {100 * info['accuracy']:.2f}, "
                      f"{info['seconds']:.1f} s")
        else:  # a complete run directory of the same config: nothing trained, its metrics reused
            say(f"reused  {info['run']} ({describe(jobs[i])}): accuracy {100 * info['accuracy']:.2f}, "
                "finished before")
        bar.update(1)
        bar.set_postfix(counts)

    if workers <= 1 and engine == "local":
        cache = FeatureCache(cache_gb)
        _WORKER.update(cache=cache, device=None)
        try:
            for i, job in enumerate(jobs):
                done(i, _run_one(job))
        finally:
            _WORKER.clear()
    elif engine == "ray":
        _run_ray(jobs, cache_gb, done, address)
    else:
        _run_pool(jobs, workers, cache_gb, done)
    bar.close()
    return outcomes  # type: ignore[return-value]


def plan_sweep(jobs: Sequence) -> list[tuple[Any, Path | None, bool, str | None]]:
    """Per job, without training: (job, its run directory, whether that run is finished, why it cannot run or
    None). ``sweep --dry-run`` prints it; the stores are opened once and nothing is loaded."""
    from stages.train import plan_run

    cache = FeatureCache(0.0)
    out = []
    for job in jobs:
        try:
            run = plan_run(job, cache.open_store, cache.load_manifest).run
        except UserError as e:
            out.append((job, None, False, str(e)))
            continue
        out.append((job, run.path, run.complete, None))
    return out


def _run_pool(jobs: list, workers: int, cache_gb: float, done: Callable[[int, dict], None]) -> None:
    import multiprocessing as mp
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    devices = _devices()
    threads = 0 if devices else max(1, (os.cpu_count() or 1) // workers)  # CPU: split the cores, no oversubscription
    ctx = mp.get_context("spawn")
    todo = list(range(len(jobs)))
    broken_before: set[int] = set()
    while todo:
        pool = ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx, initializer=_worker_init,
                                   initargs=(cache_gb, devices, ctx.Value("i", 0), threads, os.getpid()))
        retry: list[int] = []
        try:
            pending = {pool.submit(_run_one, jobs[i]): i for i in todo}
            while pending:
                finished, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in finished:
                    i = pending.pop(fut)
                    try:
                        done(i, fut.result())
                    except BrokenProcessPool:
                        if i in broken_before:  # died twice: this run is the likely cause
                            done(i, {"status": "failed", "seconds": 0.0,
                                     "error": "the worker process died (killed, out of memory or crashed)"})
                        else:
                            broken_before.add(i)
                            retry.append(i)
        except KeyboardInterrupt:
            pool.shutdown(wait=False, cancel_futures=True)
            for p in list(getattr(pool, "_processes", {}).values()):  # our own workers: stop their runs too
                p.terminate()
            raise
        pool.shutdown(wait=True, cancel_futures=True)
        todo = sorted(retry)
