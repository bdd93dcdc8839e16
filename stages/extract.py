"""Stage one: videos -> per-frame CNN features in a feature store.

Follow one video id: ``load_manifest`` gives its path; on the CPU a worker process runs the whole chain of the
shared extraction core ``pipeline.extraction`` on it (``extract_video``: decode, sample, flow stacks when asked,
preprocess, the stream CNNs with ``cores // workers`` threads), so the workers keep every core busy with a step of
some video and a crashing or hanging decoder costs one video; the main process hands the float16 features to the
store writer, which commits a part every few videos. On CUDA (or ``--workers 0``) the workers only decode and
compute flow (``prepare_video``) and the main process runs the CNNs. Resumable: committed ids are skipped; failures go to errors.jsonl.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.errors import UserError
from pipeline.extraction import (  # noqa: F401  (the shared extraction core; names kept importable from here)
    ExtractConfig,
    Stream,
    build_streams,
    cnn_worker_init,
    embed,
    extract_video,
    flow_stacks_for,
    prepare_video,
    resolve_device,
    store_config,
    worker_init,
    worker_threads,
)
from pipeline.sampling import Sampling

STREAMS = ("rgb", "flow")
# Older names of the shared core (bench and tests import them from here).
_Stream, _build_streams, _embed, _worker_init = Stream, build_streams, embed, worker_init


@dataclass(frozen=True)
class RunOptions:
    """How to run (never changes the features, so not recorded in the store's config hash)."""

    device: str = "auto"
    batch_size: int = 32
    workers: int = 1
    timeout: float = 600.0
    limit: int | None = None
    retry_failed: bool = False
    commit_every: int = 8
    progress: bool = True
    shard: tuple[int, int] | None = None  # (i, N), 0-based: only slice i of N of the manifest (stages/distributed.py)


@dataclass
class Summary:
    done: int = 0
    skipped: int = 0   # already committed (or cached) before this run
    failed: int = 0
    total: int = 0     # attempted this run: done + failed
    left: int = 0      # still to do after this run (--limit)
    seconds: dict[str, float] = field(default_factory=lambda: {"decode": 0.0, "flow": 0.0, "preprocess": 0.0,
                                                                "cnn": 0.0, "write": 0.0})
    frames: int = 0
    wall: float = 0.0
    store: str = ""
    failures: list[dict] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def check_settings(cfg: ExtractConfig, opts: RunOptions) -> None:
    """Refuse any setting that would fail or mean something else, before a store is created or a video decoded.

    Flow settings are checked by running the flow method once on a tiny pair of frames, so an unknown parameter
    or value fails here in one line rather than in every video.
    """
    bad = [s for s in cfg.streams if s not in STREAMS]
    if bad or not cfg.streams:
        raise UserError(f"unknown stream(s) {', '.join(bad) or '(none)'}; choose from {', '.join(STREAMS)}")
    try:
        Sampling(**asdict(cfg.sampling))  # a Sampling built elsewhere, re-checked
    except ValueError as e:
        raise UserError(str(e)) from None
    if cfg.keep_views and cfg.tta == "center":
        raise UserError("--keep-views stores the --tta views one by one: use it with --tta flip or 10crop")
    if cfg.spatial_grid is not None and cfg.spatial_grid < 1:
        raise UserError(f"--spatial-grid must be >= 1; got {cfg.spatial_grid}")
    if opts.batch_size < 1 or opts.workers < 0:
        raise UserError("--batch-size must be >= 1 and --workers >= 0")
    if not opts.timeout > 0:
        raise UserError(f"--timeout must be > 0 seconds; got {opts.timeout}")
    if opts.commit_every < 1:
        raise UserError(f"--commit-every must be >= 1; got {opts.commit_every}")
    if cfg.runtime not in ("torch", "onnx"):
        raise UserError(f"--runtime must be torch or onnx; got {cfg.runtime!r}")
    if cfg.runtime == "onnx":
        import importlib.util

        if not all(importlib.util.find_spec(m) for m in ("onnxruntime", "onnx")):
            raise UserError("--runtime onnx needs ONNX Runtime: pip install -e '.[onnx]'")
        if cfg.spatial_grid or cfg.precision == "bf16":
            raise UserError("--runtime onnx runs fp32 pooled features: drop --spatial-grid / --precision bf16")
    if "flow" in cfg.streams:
        check_flow_settings(cfg)


def check_flow_settings(cfg: ExtractConfig) -> None:
    """Bound and stack in range, and the flow method built once with its parameters on a 32 x 32 pair."""
    import math

    from pipeline import flow as flowlib

    if cfg.flow_method not in flowlib.FLOW_METHODS:
        raise UserError(f"unknown flow method {cfg.flow_method!r}; choose one of {', '.join(flowlib.FLOW_METHODS)}")
    if not (isinstance(cfg.flow_bound, int | float) and math.isfinite(cfg.flow_bound) and cfg.flow_bound > 0):
        raise UserError(f"--flow-bound must be a finite number > 0 (Ma et al.: 20); got {cfg.flow_bound}")
    if cfg.flow_stack < 1:
        raise UserError(f"--flow-stack must be >= 1; got {cfg.flow_stack}")
    params = dict(cfg.flow_params)
    shown = " ".join(f"{k}={v}" for k, v in params.items()) or "(defaults)"
    defaults = flowlib.default_params(cfg.flow_method)
    for key, value in params.items():
        want = defaults.get(key)
        if want is None:
            continue  # unknown names: the method itself refuses them below
        if isinstance(want, bool | str):
            ok = isinstance(value, type(want))
        elif isinstance(want, int):
            ok = isinstance(value, int) and not isinstance(value, bool) and value >= 0
        else:
            ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not ok:
            raise UserError(f"--flow-param {key}={value!r}: expected a {type(want).__name__} like the default "
                            f"{want!r} of flow {cfg.flow_method}")
    # One run on a 32 x 32 pair with the iteration counts capped, so the check costs a fraction of a second
    # whatever the method; every other value is used as given.
    trial = {k: (min(v, 2) if k.endswith(("iterations", "warps")) and isinstance(v, int) and v > 0 else v)
             for k, v in {**defaults, **params}.items()}
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (1, 32, 32), dtype=np.uint8)
    b = np.roll(a, 1, axis=2)
    try:
        out = np.asarray(flowlib.compute_flow(a, b, method=cfg.flow_method, device="cpu", **trial))
    except Exception as e:  # noqa: BLE001 - whatever the method raises, the settings are what is wrong
        raise UserError(f"flow {cfg.flow_method} with {shown} does not run: {type(e).__name__}: {e}") from None
    if out.shape != (1, 2, 32, 32) or not np.isfinite(out).all():
        raise UserError(f"flow {cfg.flow_method} with {shown} gives no finite flow on a test pair")


def _probe_store(out: Path, videos: list, opts: RunOptions, only_own: str | None) -> bool:
    """Whether ``out`` can be written. When it cannot and every video is already committed there (nothing to
    do), returns False; when there is work, refuses in one line before any decoding or model building."""
    from pipeline.store import FeatureStore, StoreWriteError, family_parts, read_part_index, writable_error

    err = writable_error(out)
    if err is None:
        return True
    done: set[str] = set()
    if (out / "store.json").is_file():
        if only_own:
            done = {v for p in family_parts(out, only_own) for v in read_part_index(p).ids}
        else:
            done = set(FeatureStore.open(out).ids())
    if opts.retry_failed or any(v.id not in done for v in videos):
        raise StoreWriteError(f"{out} cannot be written: {err.strerror or err}; nothing was extracted")
    return False


def extract(dataset: str | Path, out: str | Path, cfg: ExtractConfig, opts: RunOptions,
            split_dir: str | Path | None = None, csv: str | Path | None = None, log=print) -> Summary:
    """Extract features of every video of ``dataset`` into the store ``out``. Resumable and idempotent."""
    from pipeline.datasets import load_manifest
    from pipeline.store import StoreLock
    from pipeline.video import choose_backend
    from stages.finetune import check_checkpoints, checkpoint_provenance

    check_settings(cfg, opts)
    t_start = time.perf_counter()
    manifest = load_manifest(dataset, split_dir=split_dir, csv=csv)
    # Shards (scale-out): one slice of the manifest, its own writer name, committed by a shard manifest.
    videos, writer_name = manifest.videos, None  # a plain writer gets a name no other process has
    if opts.shard is not None:
        from stages.distributed import committed_shard, ids_digest, shard_name, shard_slice

        i, n = opts.shard
        if n < 1 or not 0 <= i < n:
            raise UserError(f"shard {i}/{n}: need 0 <= i < N (shards are 0-based)")
        videos, writer_name = shard_slice(manifest.videos, i, n), shard_name(i, n)
        digest = ids_digest([v.id for v in manifest.videos])
        if committed_shard(out, i, n, [v.id for v in videos], digest) is not None and not opts.retry_failed:
            return Summary(skipped=len(videos), store=str(out), wall=time.perf_counter() - t_start)
    device = resolve_device(opts.device)
    decoder = choose_backend(cfg.decoder, device)
    # Fine-tuned checkpoints: refuse one made for other flow settings or another backbone.
    check_checkpoints(cfg)
    provenance = checkpoint_provenance(cfg)  # (store config entry, id lists): which videos fine-tuning saw
    out = Path(out)
    if not _probe_store(out, videos, opts, writer_name if opts.shard is not None else None):
        return Summary(skipped=len(videos), store=str(out), wall=time.perf_counter() - t_start)
    new = not (out / "store.json").exists()
    # One plain writer per store on this machine, or distinct shards: a second one stops here, naming the first.
    lock = StoreLock(out, shard=writer_name if opts.shard is not None else None).acquire()
    try:
        return _extract_locked(manifest, videos, writer_name, out, cfg, opts, t_start, device, decoder, provenance)
    except BaseException:
        if new and not (out / "store.json").exists():  # stopped before the store was created: leave no folder
            _remove_empty_store(out)
        raise
    finally:
        lock.release()


def _remove_empty_store(out: Path) -> None:
    from pipeline.store import LOCK_NAME

    (out / LOCK_NAME).unlink(missing_ok=True)
    for d in (out / "parts", out):
        try:
            d.rmdir()  # only when empty
        except OSError:
            return


def _extract_locked(manifest, videos, writer_name, out: Path, cfg: ExtractConfig, opts: RunOptions, t_start: float,
                    device: str, decoder: str, provenance: tuple) -> Summary:
    import torch

    from pipeline.isolation import isolated_map
    from pipeline.store import FeatureStore, atomic_write_text, read_errors
    from stages.progress import warm_bar

    finetuned, seen_lists = provenance
    torch.manual_seed(0)
    streams = build_streams(cfg, device)
    config = store_config(cfg, streams, decoder, device)
    if finetuned:  # which videos the CNNs were trained on; absent for ImageNet weights (older stores keep their hash)
        config["finetuned"] = finetuned
    summary = Summary(store=str(out))

    # A shard attempt commits under a name of its own (SHARD.aXXXXXX) and resumes from every attempt's parts: an
    # attempt cut off from the cluster that still writes can never commit under the name of the one that replaced it.
    from stages.distributed import attempt_name

    with FeatureStore.writer(out, config, manifest.classes,
                             name=attempt_name(writer_name) if opts.shard is not None else writer_name,
                             commit_every=opts.commit_every, only_own=writer_name if opts.shard is not None else False,
                             exclusive=opts.shard is None) as writer:
        if finetuned:  # the id lists behind the config's digests, for stage two's leak check
            from pipeline.provenance import PROVENANCE_FILE

            atomic_write_text(Path(out) / PROVENANCE_FILE, json.dumps(seen_lists, sort_keys=True))
        items = videos
        if opts.retry_failed:
            failed = {e["id"] for e in read_errors(out)}
            items = [v for v in items if v.id in failed]
        todo = [v for v in items if v.id not in writer.done]
        summary.skipped = len(items) - len(todo)
        if opts.limit is not None:
            summary.left = max(0, len(todo) - max(0, opts.limit))
            todo = todo[: max(0, opts.limit)]
        summary.total = len(todo)
        flow = None
        if "flow" in cfg.streams:
            flow = {"method": cfg.flow_method, "params": config["flow"]["params"], "bound": cfg.flow_bound,
                    "stack": cfg.flow_stack, "device": device if device.startswith("cuda") else "cpu"}
        tasks = ((v.id, {"path": str(v.path), "sampling": cfg.sampling, "decoder": decoder,
                         "device": device if decoder == "torchcodec" else "cpu", "streams": cfg.streams,
                         "flow": flow}) for v in todo)
        # CUDA work (NVDEC, GPU flow) stays in-process: a CUDA context per worker process is wasteful.
        workers = 0 if device.startswith("cuda") and (decoder == "torchcodec" or flow) else opts.workers
        # On the CPU the workers run the CNNs too (processes x threads = cores); on CUDA the main process does.
        fn, init, init_args = prepare_video, worker_init, ()
        if workers > 0 and device == "cpu":
            fn, init, init_args = extract_video, cnn_worker_init, (cfg, worker_threads(workers), opts.batch_size)
        bar, eta = warm_bar(len(todo), disable=not opts.progress)  # time left measured after the first video

        def step() -> None:
            eta.update(1)
            rate = eta.rate()  # videos/s after the warm-up
            frames_s = "?" if rate is None else f"{rate * summary.frames / max(summary.done, 1):.1f}"
            bar.set_postfix_str(f"left {eta.text()}, frames/s {frames_s}, failed {summary.failed}", refresh=False)
            bar.update(1)

        for res in isolated_map(fn, tasks, workers=workers, timeout=opts.timeout, init=init, init_args=init_args):
            if not res.ok:
                stage = "decode" if res.error in ("timeout",) or res.error.startswith("SIG") else "prepare"
                writer.log_error(res.key, stage, res.error, res.message)
                summary.failed += 1
                summary.failures.append({"id": res.key, "error": res.error, "message": res.message})
                step()
                continue
            video = res.value
            for k, v in video["seconds"].items():
                summary.seconds[k] += v
            feats: dict[str, np.ndarray] = video.get("feats", {})
            cnn_error = video.get("cnn_error")
            if "feats" not in video and cnn_error is None:  # decoded here: the CNNs run in this process
                try:
                    for s in streams:
                        feats.update(embed(s, video[s.name], opts.batch_size, summary.seconds))
                except Exception as e:  # noqa: BLE001 - a video the CNN cannot take is logged, the run goes on
                    cnn_error = (type(e).__name__, str(e))
            if cnn_error is not None:
                writer.log_error(res.key, "cnn", *cnn_error)
                summary.failed += 1
                summary.failures.append({"id": res.key, "error": cnn_error[0], "message": cnn_error[1]})
                step()
                continue
            t0 = time.perf_counter()
            if not writer.add(res.key, feats, video["meta"]):  # non-finite features: logged, not committed
                summary.failed += 1
                summary.failures.append({"id": res.key, "error": "NonFinite",
                                         "message": "features are not finite (NaN or Inf)"})
                step()
                continue
            summary.seconds["write"] += time.perf_counter() - t0
            summary.done += 1
            summary.frames += len(video["meta"]["frame_indices"])
            step()
        bar.close()
        writer.commit()
        writer.prune_errors()  # one line per video (only when this writer holds the store alone)
    summary.wall = time.perf_counter() - t_start
    if opts.shard is not None:  # the shard manifest is the shard's commit (and holds its summary)
        from pipeline.store import config_hash
        from stages.distributed import ids_digest, write_shard_manifest

        i, n = opts.shard
        write_shard_manifest(out, i, n, [v.id for v in videos], len(manifest.videos),
                             ids_digest([v.id for v in manifest.videos]), config_hash(writer.config),
                             summary.as_dict())
        return summary
    try:
        atomic_write_text(out / "last_run.json", json.dumps(summary.as_dict(), indent=2, default=str))
    except OSError:
        pass  # a note for the user, not part of the store: the summary is printed anyway
    return summary
