"""``twostream split``: parsing and printing only (stages/split.py)."""

from __future__ import annotations

import click


@click.command("split")
@click.argument("dataset", type=click.Path(exists=True, file_okay=False))
@click.option("--test-fraction", type=float, default=0.3, show_default=True,
              help="Share of each class's groups sent to test.")
@click.option("--seed", type=int, default=0, show_default=True, help="Same seed, same split.")
@click.option("--force", is_flag=True, help="Replace a DATASET/manifest.csv that has no split column.")
def split(dataset, test_fraction, seed, force):
    """Write DATASET/manifest.csv (path,label,split) with a train/test split by group, for a dataset that has none
    (a folder per class); extract, train and sweep then read it as split 1."""
    from stages.split import write_split

    r = write_split(dataset, test_fraction=test_fraction, seed=seed, force=force)
    click.echo(f"wrote {r['path']}: {r['videos']} videos of {r['classes']} classes, {r['train']} train / "
               f"{r['test']} test (whole groups per class, {r['groups']} groups, seed {seed}); split 1 from now on")
