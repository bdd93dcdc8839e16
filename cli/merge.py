"""``twostream merge STORE``: verify every shard of a sharded store and write its index."""

from __future__ import annotations

import click


@click.command("merge")
@click.argument("store", type=click.Path(exists=True, file_okay=False))
@click.option("--checksums", is_flag=True, help="Also compare every part's sha256 with its shard manifest (reads all).")
def merge(store, checksums):
    """Verify the shards of STORE against their manifests and the parts present; write STORE/index.json."""
    from stages.distributed import merge as run_merge

    r = run_merge(store, checksums=checksums)
    click.echo(f"verified {r['shards']} shards of a {r['manifest_videos']}-video manifest: {r['videos']} videos "
               f"in {r['parts']} parts, {r['failed']} failed (see errors.jsonl); wrote {r['index']}")
    for vid, parts in list(r["duplicates"].items())[:10]:
        click.echo(f"  duplicate {vid}: in {', '.join(parts)} (read from the first)", err=True)
    if r["duplicates"]:
        click.echo(f"  {len(r['duplicates'])} video(s) committed more than once", err=True)
    for line in r["superseded"][:10]:
        click.echo(f"  superseded {line}: written by an attempt the shard's commit does not name; moved to "
                   f"{store}/superseded/", err=True)
    if r["superseded"]:
        click.echo(f"  {len(r['superseded'])} part(s) of superseded shard attempts set aside", err=True)
