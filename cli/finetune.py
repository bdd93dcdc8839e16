"""``twostream finetune`` and ``twostream flow``: parsing and printing only (stages/finetune.py, stages/flow_cache.py)."""

from __future__ import annotations

import click

from cli.extract import _flow_params


@click.command("finetune")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False),
              help="Checkpoint folder: writes STREAM.safetensors, STREAM.json and STREAM.epochs/.")
@click.option("--stream", type=click.Choice(["rgb", "flow"]), required=True, help="Spatial (rgb) or temporal (flow).")
@click.option("--split", type=int, default=1, show_default=True, help="Train on this split's training videos.")
@click.option("--split-dir", type=click.Path(exists=True, file_okay=False), help="Folder of split files.")
@click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False), help="CSV manifest path,label[,split].")
@click.option("--backbone", default="efficientnet_lite0", show_default=True,
              help="efficientnet_lite0 (embedded weights), resnet50, resnet101, timm:NAME.")
@click.option("--weights", default=None, help="Start weights (default: the backbone's ImageNet weights).")
@click.option("--epochs", type=int, default=None, help="Epochs [rgb 30, flow 80]; raise it on a rerun to continue.")
@click.option("--lr", type=float, default=None, help="Initial learning rate [Ma et al.: rgb 5e-6, flow 5e-3].")
@click.option("--batch-size", type=int, default=64, show_default=True, help="Videos per step (Ma et al.: 64).")
@click.option("--segments", type=int, default=3, show_default=True, help="Snippets per video per step (TSN).")
@click.option("--partial-bn/--no-partial-bn", default=True, show_default=True,
              help="Freeze BN statistics and affine parameters except the first layer (TSN).")
@click.option("--dropout", type=float, default=None, help="Before the classifier [TSN: rgb 0.8, flow 0.7].")
@click.option("--input-size", type=int, default=None, help="Crop side in px [the backbone's, 224].")
@click.option("--no-flip", is_flag=True, help="No horizontal flips (for direction-sensitive classes).")
@click.option("--jitter", type=float, default=0.4, show_default=True, help="Colour jitter strength (rgb only).")
@click.option("--val-fraction", type=float, default=0.2, show_default=True,
              help="Share of the training groups held out for validation.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--flow-cache", type=click.Path(exists=True, file_okay=False), default=None,
              help="A `twostream flow` cache (default: flow computed on the fly).")
@click.option("--flow", "flow_method", default=None,
              help="tvl1 | brox | tvl1-opencv | dis | farneback [the cache's, else tvl1].")
@click.option("--flow-param", multiple=True, help="Flow parameter override key=value (repeatable).")
@click.option("--flow-bound", type=float, default=None, help="Clip flow at +-bound [the cache's, else 20].")
@click.option("--flow-stack", type=int, default=10, show_default=True, help="L flow fields per stack (2L channels).")
@click.option("--decoder", type=click.Choice(["auto", "decord", "pyav"]), default="auto", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--workers", type=int, default=0, show_default=True, help="Data-loading processes.")
@click.option("--keep-last", type=int, default=2, show_default=True, help="Epoch checkpoints kept for resuming.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def finetune(dataset, out, stream, split, split_dir, csv_path, backbone, weights, epochs, lr, batch_size, segments,
             partial_bn, dropout, input_size, no_flip, jitter, val_fraction, seed, flow_cache, flow_method,
             flow_param, flow_bound, flow_stack, decoder, device, workers, keep_last, quiet):
    """Fine-tune the rgb or flow stream CNN on DATASET's split (TSN-style), before extraction (resumable)."""
    from stages.finetune import FinetuneConfig, FinetuneOptions
    from stages.finetune import finetune as run_finetune

    cfg = FinetuneConfig(stream=stream, split=split, backbone=backbone, weights=weights, epochs=epochs, lr=lr,
                         batch_size=batch_size, segments=segments, partial_bn=partial_bn, dropout=dropout,
                         input_size=input_size, flip=not no_flip, jitter=jitter, val_fraction=val_fraction,
                         seed=seed, flow_method=flow_method, flow_params=_flow_params(flow_param),
                         flow_bound=flow_bound, flow_stack=flow_stack, decoder=decoder)
    opts = FinetuneOptions(device=device, workers=workers, flow_cache=flow_cache, keep_last=keep_last,
                           progress=not quiet)
    r = run_finetune(dataset, out, cfg, opts, split_dir=split_dir, csv=csv_path, log=click.echo)
    best = "n/a" if r.best_val_accuracy is None else f"{r.best_val_accuracy:.3f}"
    click.echo(f"done: {r.checkpoint} (epoch {r.best_epoch}, val accuracy {best}"
               + (f", {r.images_per_s:.1f} images/s" if r.images_per_s else "") + ")")


@click.command("flow")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out", required=True, type=click.Path(file_okay=False), help="Flow cache directory.")
@click.option("--split-dir", type=click.Path(exists=True, file_okay=False), help="Folder of split files.")
@click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False), help="CSV manifest path,label[,split].")
@click.option("--flow", "flow_method", default="tvl1", show_default=True,
              help="tvl1 | brox | tvl1-opencv | dis | farneback.")
@click.option("--flow-param", multiple=True, help="Flow parameter override key=value (repeatable).")
@click.option("--flow-bound", type=float, default=20.0, show_default=True, help="Clip flow at +-bound (Ng: 40).")
@click.option("--decoder", type=click.Choice(["auto", "decord", "pyav", "torchcodec"]), default="auto",
              show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto | cpu | cuda[:N].")
@click.option("--workers", type=int, default=1, show_default=True, help="Decode/flow processes (0: in-process).")
@click.option("--timeout", type=float, default=1800.0, show_default=True, help="Seconds per video before it is failed.")
@click.option("--limit", type=int, default=None, help="Cache at most this many videos (this run).")
@click.option("--retry-failed", is_flag=True, help="Try only the videos in the errors file again.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def flow(dataset, out, split_dir, csv_path, flow_method, flow_param, flow_bound, decoder, device, workers, timeout,
         limit, retry_failed, quiet):
    """Cache uint8 flow images of every consecutive frame pair of DATASET's videos in --out (resumable)."""
    from stages.extract import RunOptions
    from stages.flow_cache import FlowCacheConfig, flow_cache

    cfg = FlowCacheConfig(method=flow_method, params=_flow_params(flow_param), bound=flow_bound, decoder=decoder)
    opts = RunOptions(device=device, workers=workers, timeout=timeout, limit=limit, retry_failed=retry_failed,
                      progress=not quiet)
    from cli.extract import print_summary

    print_summary(flow_cache(dataset, out, cfg, opts, split_dir=split_dir, csv=csv_path), "cached", "cache")
