"""``twostream demo-data``, ``twostream extract`` and ``twostream info``: parsing and printing only."""

from __future__ import annotations

import json

import click


@click.command("demo-data")
@click.argument("out_dir", type=click.Path(file_okay=False))
@click.option("--seed", default=0, show_default=True, help="Same seed, same bytes.")
def demo_data(out_dir, seed):
    """Write the demo dataset (UCF101 layout, real AVI files) to OUT_DIR."""
    from pipeline.demo_data import write_demo_dataset

    root = write_demo_dataset(out_dir, seed=seed)
    from pipeline.datasets import load_manifest

    m = load_manifest(root)
    click.echo(f"wrote {len(m.videos)} videos of {len(m.classes)} classes to {root}")


def _sampling(frames, fps, all_frames, max_frames):
    from pipeline.sampling import Sampling

    if all_frames and fps is not None:
        raise click.UsageError("--all-frames and --fps exclude each other")
    try:
        if all_frames:
            return Sampling(mode="all", frames=None)
        if fps is not None:
            return Sampling(mode="fps", fps=fps, frames=frames, max_frames=max_frames)
        return Sampling(mode="frames", frames=25 if frames is None else frames)
    except ValueError as e:
        from pipeline.errors import UserError

        raise UserError(str(e)) from None


def _flow_params(items):
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise click.UsageError(f"--flow-param expects key=value, got {item!r}")
        try:
            out.append((key, json.loads(value)))
        except json.JSONDecodeError:
            out.append((key, value))
    return tuple(sorted(out))


@click.command("extract")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Feature store directory.")
@click.option("--streams", default="rgb,flow", show_default=True,
              help="Comma list of rgb (spatial stream), flow (temporal stream: stacks of --flow-stack flow fields).")
@click.option("--split-dir", type=click.Path(exists=True, file_okay=False), help="Folder of split files.")
@click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False), help="CSV manifest path,label[,split].")
@click.option("--frames", type=int, default=None, help="Equally spaced samples per video [25] (Ma et al.).")
@click.option("--fps", type=float, default=None, help="Sample at this rate instead (Ng et al.: 1).")
@click.option("--max-frames", type=int, default=120, show_default=True, help="Cap for --fps sampling.")
@click.option("--all-frames", is_flag=True, help="Every decoded frame.")
@click.option("--backbone", default="efficientnet_lite0", show_default=True,
              help="efficientnet_lite0 (embedded weights), resnet50, resnet101, timm:NAME.")
@click.option("--weights", default=None, help="Weights file for the backbone ('random' for tests).")
@click.option("--flow-weights", "--flow-checkpoint", "flow_weights", default=None,
              help="Weights of the temporal-stream CNN (default: cross-modality init from --weights).")
@click.option("--rgb-checkpoint", default=None, help="Alias of --weights for a fine-tuned spatial stream.")
@click.option("--flow", "flow_method", default="tvl1", show_default=True,
              help="tvl1 | brox | tvl1-opencv | dis | farneback. TV-L1 is the papers' flow; on a CPU it takes about "
                   "1 s per 320x240 frame pair, where dis (OpenCV DIS) runs some 80 pairs/s: --flow dis for a quick "
                   "look on a CPU (a store holds one flow method).")
@click.option("--flow-param", multiple=True, help="Flow parameter override key=value (repeatable).")
@click.option("--flow-bound", type=float, default=20.0, show_default=True, help="Clip flow at +-bound (Ng: 40).")
@click.option("--flow-stack", type=int, default=10, show_default=True, help="L flow fields per stack (2L channels).")
@click.option("--tta", type=click.Choice(["center", "flip", "10crop"]), default="center", show_default=True)
@click.option("--keep-views", is_flag=True, help="Also store each --tta view's features (stream <name>_views).")
@click.option("--spatial-grid", type=int, default=None, help="Also store the last conv map pooled to GxG.")
@click.option("--foveated", is_flag=True, help="Context + fovea streams (Karpathy et al. 3.2).")
@click.option("--precision", type=click.Choice(["auto", "fp32", "bf16"]), default="auto", show_default=True)
@click.option("--runtime", type=click.Choice(["torch", "onnx"]), default="torch", show_default=True,
              help="onnx: the stream CNNs run by ONNX Runtime on the CPU (fp32; pip install -e '.[onnx]').")
@click.option("--decoder", type=click.Choice(["auto", "decord", "pyav", "torchcodec"]), default="auto",
              show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--batch-size", type=int, default=32, show_default=True, help="CNN batch (views).")
@click.option("--workers", type=int, default=1, show_default=True,
              help="Processes, each running whole videos (decode, flow, CNNs with cores/workers threads; on "
                   "CUDA decode/flow only); 0: in-process. `twostream doctor` suggests a number.")
@click.option("--timeout", type=float, default=600.0, show_default=True, help="Seconds per video before it is failed.")
@click.option("--limit", type=int, default=None, help="Extract at most this many videos (this run).")
@click.option("--retry-failed", is_flag=True, help="Try only the videos in the errors file again.")
@click.option("--commit-every", type=int, default=8, show_default=True, help="Videos per committed part.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
# --- scale-out (stages/distributed.py) ---
@click.option("--shard", default=None, help="Only slice I/N of the manifest, 0-based (0/16 .. 15/16), for job arrays.")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local", show_default=True,
              help="ray: every shard as a Ray task (needs Ray: pip install -e '.[ray]' in the checkout).")
@click.option("--address", default=None, help="Ray cluster address (auto: the one `ray start` made); default local.")
@click.option("--shard-size", type=int, default=64, show_default=True, help="Videos per shard with --engine ray.")
def extract(dataset, out, streams, split_dir, csv_path, frames, fps, max_frames, all_frames, backbone, weights,
            flow_weights, rgb_checkpoint, flow_method, flow_param, flow_bound, flow_stack, tta, keep_views, spatial_grid,
            foveated, precision, runtime, decoder, device, batch_size, workers, timeout, limit, retry_failed, commit_every,
            quiet, shard, engine, address, shard_size):
    """Stage one: extract per-frame features of every video in DATASET into the store --out (resumable).

    With no options: both streams (rgb, and flow as TV-L1), 25 equally spaced frames per video, EfficientNet-Lite0
    with its ImageNet weights, one centre view, on CUDA when there is one, one decode worker.
    """
    from stages.extract import ExtractConfig, RunOptions
    from stages.extract import extract as run_extract

    if rgb_checkpoint and weights:
        raise click.UsageError("give --weights or --rgb-checkpoint, not both")
    cfg = ExtractConfig(
        streams=tuple(s.strip() for s in streams.split(",") if s.strip()),
        sampling=_sampling(frames, fps, all_frames, max_frames), backbone=backbone,
        weights=rgb_checkpoint or weights, flow_weights=flow_weights, tta=tta, keep_views=keep_views, precision=precision,
        spatial_grid=spatial_grid, foveated=foveated, flow_method=flow_method, flow_params=_flow_params(flow_param),
        flow_bound=flow_bound, flow_stack=flow_stack, decoder=decoder, runtime=runtime)
    opts = RunOptions(device=device, batch_size=batch_size, workers=workers, timeout=timeout, limit=limit,
                      retry_failed=retry_failed, commit_every=commit_every, progress=not quiet)
    if "flow" in cfg.streams and flow_method in ("tvl1", "brox") and not quiet:
        from stages.extract import resolve_device

        if resolve_device(device) == "cpu":
            click.echo(f"note: {flow_method} flow on a CPU takes about 1 s per 320x240 frame pair (minutes per "
                       "video); --flow dis is much faster, into another store", err=True)
    if engine == "ray":
        _extract_ray(dataset, out, cfg, opts, shard, address, shard_size, split_dir, csv_path, quiet)
        return
    if address:
        raise click.UsageError("--address is for --engine ray")
    if shard is not None:
        from dataclasses import replace

        from stages.distributed import parse_shard

        opts = replace(opts, shard=parse_shard(shard))
    print_summary(run_extract(dataset, out, cfg, opts, split_dir=split_dir, csv=csv_path), "in the store", "store")


def print_summary(s, skipped_why: str, what: str) -> None:
    """The end-of-run summary of an extraction-like stage: counts, time per part, the first failures."""
    parts = ", ".join(f"{k} {v:.1f}s" for k, v in s.seconds.items() if v)
    left = getattr(s, "left", 0)
    click.echo(f"done {s.done}, skipped {s.skipped} (already {skipped_why}), failed {s.failed} "
               f"of {s.skipped + s.total + left}" + (f", {left} left for the next run (--limit)" if left else "")
               + f" in {s.wall:.1f}s{f' ({parts})' if parts else ''}; {what}: {s.store}")
    for f in s.failures[:10]:
        click.echo(f"  failed {f['id']}: {f['error']}: {f['message']}", err=True)
    if len(s.failures) > 10:
        click.echo(f"  ... and {len(s.failures) - 10} more in {s.store}/errors.jsonl", err=True)


def _extract_ray(dataset, out, cfg, opts, shard, address, shard_size, split_dir, csv_path, quiet):
    from stages.distributed import run_ray

    if shard is not None:
        raise click.UsageError("--shard runs one slice; --engine ray runs them all: give one of them")
    s = run_ray(dataset, out, cfg, opts, shard_size=shard_size, address=address, split_dir=split_dir, csv=csv_path,
                progress=not quiet)
    click.echo(f"shards: done {s.done}, skipped {s.skipped} (already committed), not complete {s.incomplete}, "
               f"failed {len(s.failed)} of {s.shards}; videos done {s.videos_done}, failed {s.videos_failed} "
               f"in {s.wall:.1f}s; store: {s.store}")
    for f in s.failed[:10]:
        click.echo(f"  shard {f['shard']} failed: {f['error']}", err=True)
    if s.failed:
        raise SystemExit(1)
# --- end scale-out ---


@click.command("info")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--json", "as_json", is_flag=True, help="One JSON object.")
def info(store, as_json):
    """What a feature store holds: videos committed, streams and dims, config, errors."""
    from pipeline.store import FeatureStore

    with FeatureStore.open(store) as fs:
        d = fs.info()
        errors = fs.errors()
    if as_json:
        d["error_list"] = errors
        click.echo(json.dumps(d, indent=2, sort_keys=True, default=str))
        return
    click.echo(f"store      {d['path']}  (schema {d['schema']}, twostream {d['package_version']}, {d['created']})")
    click.echo(f"videos     {d['videos']} committed in {d['parts']} parts, {d['frames']} frames")
    click.echo("streams    " + ", ".join(f"{k} [T, {v}]" for k, v in d["streams"].items()))
    click.echo(f"classes    {len(d['classes'])}")
    cfg = d["config"]
    click.echo(f"sampling   {json.dumps(cfg.get('sampling'))}")
    from pipeline.backbones import view_aggregation

    for name, how in view_aggregation(cfg).items():
        click.echo(f"views      {name}: {how}")
    for name, spec in cfg.get("backbones", {}).items():
        click.echo(f"backbone   {name}: {spec.get('name')} weights={spec.get('weights')} "
                   f"input={spec.get('input_size')} precision={spec.get('precision')}")
    if "flow" in cfg:
        f = cfg["flow"]
        click.echo(f"flow       {f['method']} bound={f['bound']} stack={f['stack']}")
    if d["duplicates"]:
        click.echo(f"duplicates {d['duplicates']} videos committed twice (read from the first part; "
                   "`twostream verify` names them)")
    click.echo(f"errors     {d['errors']} videos")
    for e in errors[:10]:
        click.echo(f"  {e.get('id')}: {e.get('stage')} {e.get('error')}: {e.get('message')}")


@click.command("verify")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--repair", is_flag=True, help="Move damaged parts to STORE/quarantine/ (never deleted); the next "
                                              "extract redoes their videos.")
def verify(store, repair):
    """Check every part of STORE (readable, consistent, checksum, finite, unique); exit 1 if any is damaged."""
    from pipeline.store import StoreLock, quarantine, verify_store

    lock = StoreLock(store).acquire() if repair else None  # no writer may commit while parts move
    try:
        findings, counts = verify_store(store)
        damaged = [f for f in findings if f.damage]
        for f in findings:
            click.echo(f"{'damaged' if f.damage else 'note   '} {f.part}: {f.why}", err=f.damage)
        moved = quarantine(store, damaged) if repair else []
    finally:
        if lock is not None:
            lock.release()
    for part in moved:
        click.echo(f"moved   {part} to quarantine/")
    n_videos = len({v for f in damaged for v in f.videos})
    click.echo(f"verified {counts['parts']} parts, {counts['videos']} videos: "
               f"{len(damaged)} damaged part(s)" + (f" holding {n_videos} videos" if n_videos else "")
               + ("; moved aside, the next `twostream extract` redoes their videos" if moved else "")
               + ("; rerun with --repair to move them aside" if damaged and not repair else ""))
    if damaged and not repair:
        raise SystemExit(1)
