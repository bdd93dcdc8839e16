"""``twostream doctor``: parsing and printing only (stages/doctor.py)."""

from __future__ import annotations

import json

import click


@click.command("doctor")
@click.option("--store", default=".", show_default=True, type=click.Path(file_okay=False),
              help="Where a feature store would go (--out of extract): its disk's free space is reported.")
@click.option("--skip-weights", is_flag=True, help="Do not build the default backbone (saves a few seconds).")
@click.option("--json", "as_json", is_flag=True, help="The facts and the advice as one JSON object.")
def doctor(store, skip_weights, as_json):
    """What this machine gives the project (decoders, CUDA and NVDEC, cores and torch threads, free disk at
    --store, whether the default weights load offline) and what to change; exit 1 when something extraction needs
    is missing."""
    from stages.doctor import advice, inspect, report_lines

    facts = inspect(store, weights=not skip_weights)
    todo = advice(facts)
    if as_json:
        click.echo(json.dumps({"facts": facts, "advice": todo}, indent=2, default=str))
    else:
        for line in report_lines(facts):
            click.echo(line)
        click.echo("would change:" if todo else "would change: nothing; the defaults fit this machine")
        for line in todo:
            click.echo(f"  - {line}")
    broken = not (facts["decoders"].get("decord") or facts["decoders"].get("pyav")) or (
        facts["weights"] is not None and not facts["weights"]["ok"])
    if broken:
        raise SystemExit(1)
