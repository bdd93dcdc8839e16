"""``twostream sweep``, ``twostream report`` and ``twostream fuse``: argument parsing and printing; the work is in
``stages.sweep``, ``stages.report`` and ``stages.fuse``.

Heavy imports (torch, h5py, matplotlib) happen inside the commands, so ``--help`` stays instant.
"""

from __future__ import annotations

import sys

import click

from cli.train import _parse_list, _parse_sets, set_option


@click.command(context_settings={"show_default": True})
@click.argument("store", type=click.Path(file_okay=False))
@click.argument("sweep_file", metavar="SWEEP.yaml", type=click.Path(dir_okay=False))
@click.option("--dataset", required=True, type=click.Path(), help="Dataset root (videos and list files) or a CSV.")
@click.option("--split-dir", type=click.Path(), default=None, help="Folder of split files, if not under the root.")
@click.option("--out", default="runs", type=click.Path(file_okay=False), help="Folder of run directories.")
@click.option("--jobs", "-j", type=int, default=1, help="Worker processes (with CUDA they share the GPUs).")
@set_option("Override keys in every run: --set a=1 b=2 (repeatable; after the file's own settings).")
@click.option("--device", default="auto", help="auto (GPU k mod n for worker k when there is CUDA), cpu or cuda:N.")
@click.option("--cache-gb", type=float, default=4.0, help="Features each worker keeps in memory across its runs.")
@click.option("--allow-missing", is_flag=True, help="Skip split videos that are not in the store (with a warning).")
@click.option("--engine", type=click.Choice(["local", "ray"]), default="local",
              help="local: --jobs worker processes on this machine; ray: one Ray task per run on a cluster.")
@click.option("--address", default=None, help="Ray cluster address (--engine ray), e.g. auto; default: a local Ray.")
@click.option("--dry-run", is_flag=True, help="List the runs and exit.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def sweep(store, sweep_file, dataset, split_dir, out, jobs, sets, device, cache_gb, engine, address, allow_missing,
          dry_run, quiet):
    """Train every run of SWEEP.yaml on the features in STORE; complete runs are skipped, so a rerun resumes."""
    import time

    from pipeline.store import FeatureStore
    from stages.sweep import check_streams, dedupe, describe, expand, load_sweep, run_sweep
    from stages.train import default_streams

    if jobs < 1:
        raise click.BadParameter("must be at least 1", param_hint="--jobs")
    # every run of the file is resolved and checked (head, keys, ranges, streams) before the first one starts
    spec = load_sweep(sweep_file)
    expanded = expand(spec, store, dataset, out, overrides=_parse_sets(sets), device=device, split_dir=split_dir,
                      allow_missing=allow_missing)
    available = FeatureStore.open(store).streams
    runs = dedupe(expanded, default_streams(available))
    check_streams(runs, available)
    dropped = len(expanded) - len(runs)
    click.echo(f"{sweep_file}: {len(runs)} run{'s' * (len(runs) != 1)}" + (f" ({dropped} duplicates dropped)" if dropped else "")
               + (f", on Ray ({address or 'local'})" if engine == "ray" else f", {jobs} worker{'s' if jobs > 1 else ''}")
               + f", out {out}")
    if dry_run:
        from stages.sweep import plan_sweep

        planned = plan_sweep(runs)
        for job, path, finished, problem in planned:
            if problem:
                click.echo(f"  cannot run  {describe(job)}: {problem}")
            else:
                click.echo(f"  {'finished' if finished else 'to train'}  {describe(job)} -> {path}")
        n_done = sum(finished for _, _, finished, _ in planned)
        n_bad = sum(problem is not None for _, _, _, problem in planned)
        click.echo(f"{len(planned) - n_done - n_bad} to train, {n_done} finished (reused as they are)"
                   + (f", {n_bad} cannot run" if n_bad else ""))
        return
    t0 = time.perf_counter()
    outcomes = run_sweep(runs, workers=jobs, progress=not quiet, cache_gb=cache_gb, echo=click.echo, engine=engine,
                         address=address)
    wall = time.perf_counter() - t0
    n = {s: sum(o.status == s for o in outcomes) for s in ("trained", "cached", "failed")}
    summary = (f"sweep: {len(outcomes)} run{'s' * (len(outcomes) != 1)}, {n['trained']} trained, {n['cached']} reused (finished before), "
               f"{n['failed']} failed "
               f"in {wall:.1f} s")
    if n["failed"]:
        first = next(o for o in outcomes if o.failed)
        click.echo(f"{summary}; first failure: {describe(first.job)}: {first.info['error']} "
                   f"(all in {out}/sweep-log.jsonl)", err=True)
        sys.exit(1)
    click.echo(summary)


@click.command(context_settings={"show_default": True})
@click.argument("runs_dir", metavar="RUNS", type=click.Path(file_okay=False))
@click.option("--out", default="report", type=click.Path(file_okay=False), help="Folder for the report files.")
def report(runs_dir, out):
    """Leaderboard (CSV, markdown) and a self-contained HTML report over the complete runs under RUNS; a damaged
    run is skipped with a warning naming it."""
    import warnings

    from stages.report import write_report

    with warnings.catch_warnings(record=True) as caught:  # printed here as one line each, no source path
        warnings.simplefilter("always")
        paths = write_report(runs_dir, out)
    for w in caught:
        click.echo(f"warning: {w.message}", err=True)
    for p in paths.values():
        click.echo(str(p))


@click.command(context_settings={"show_default": True})
@click.argument("runs", metavar="RUN_DIR RUN_DIR...", nargs=-1, required=True, type=click.Path(file_okay=False))
@click.option("--out", default="runs", type=click.Path(file_okay=False), help="Folder of run directories.")
@click.option("--weights", default=None, help="Weights by hand, e.g. 1,2 (normalised to sum 1). "
              "[default: chosen by cross-validation on the fusion fold every run held out]")
@click.option("--metric", type=click.Choice(["accuracy", "map"]), default="accuracy",
              help="What cross-validation maximises.")
@click.option("--normalize", type=click.Choice(["auto", "log-softmax", "temperature", "zscore", "softmax", "none"]),
              default="auto", help="Per-run score normalisation before the weighted sum; auto: log-softmax for "
              "torch heads, temperature fitted on the fusion fold for SVM margins.")
@click.option("--step", type=float, default=0.1, help="Grid step over the weight simplex.")
@click.option("--cv", type=int, default=5, help="Cross-validation folds.")
def fuse(runs, out, weights, metric, normalize, step, cv):
    """Fuse the per-video scores of finished runs into a new run directory under OUT."""
    from stages.fuse import FuseJob
    from stages.fuse import fuse as run_fuse

    w = _parse_list(weights, "--weights", float)
    job = FuseJob(runs=tuple(runs), out=out, weights=tuple(w) if w else None, metric=metric, normalize=normalize,
                  step=step, cv=cv)
    run_fuse(job, echo=click.echo)
