"""``twostream train`` and ``twostream heads``: argument parsing and printing; the work is in ``stages.train``.

Heavy imports (torch, h5py, matplotlib) happen inside the commands, so ``--help`` stays instant.
"""

from __future__ import annotations

import re

import click

_KEY_VALUE = re.compile(r"[A-Za-z_][\w.]*=")  # what a setting looks like: key=..., head.key=..., train.key=...


class KeyValueOption(click.Option):
    """A repeatable option whose occurrence takes every following ``key=value`` argument: ``--set a=1 b=2`` is
    ``--set a=1 --set b=2`` (the README's form; the order of settings is kept, later ones win)."""

    def add_to_parser(self, parser, ctx) -> None:
        super().add_to_parser(parser, ctx)
        for name in self.opts:
            opt = parser._long_opt.get(name) or parser._short_opt.get(name)  # click's parser has no public hook
            opt.process = self._greedy(opt.process)

    @staticmethod
    def _greedy(process):
        def take(value, state) -> None:
            process(value, state)
            while state.rargs and _KEY_VALUE.match(state.rargs[0]):
                process(state.rargs.pop(0), state)

        return take


def set_option(help_text: str):
    """``--set KEY=VALUE [KEY=VALUE ...]``, repeatable; shared by train and sweep."""
    return click.option("--set", "sets", cls=KeyValueOption, multiple=True, metavar="KEY=VALUE...", help=help_text)


def _parse_sets(values: tuple[str, ...]) -> tuple[tuple[str, str], ...]:
    from pipeline.errors import UserError

    out = []
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise UserError(f"--set takes key=value, got {item!r}")
        out.append((key.strip(), value.strip()))
    return tuple(out)


def _parse_list(text: str | None, what: str, cast=str) -> list | None:
    from pipeline.errors import UserError

    if text is None:
        return None
    try:
        items = [cast(p.strip()) for p in text.split(",") if p.strip()]
    except ValueError:
        raise UserError(f"{what}: cannot read {text!r} as a comma-separated list") from None
    if not items:
        raise UserError(f"{what} is empty")
    return items


@click.command(context_settings={"show_default": True})
@click.argument("store", type=click.Path(file_okay=False))
@click.option("--dataset", required=True, type=click.Path(), help="Dataset root (videos and list files) or a CSV.")
@click.option("--split-dir", type=click.Path(), default=None, help="Folder of split files, if not under the root.")
@click.option("--split", type=int, default=1, help="Train/test split to run.")
@click.option("--splits", default=None, help="Several splits, e.g. 1,2,3: one run each plus a mean +- std summary. "
              "STORE may contain {split} for one store per split (CNNs fine-tuned per split).")
@click.option("--head", default="ts-lstm", help="Registered head (see `twostream heads`).")
@click.option("--streams", default=None, help="rgb, flow or rgb,flow (concatenated per frame: early fusion, unless "
              "--late-fusion). [default: rgb,flow where the store has them]")
@click.option("--late-fusion", is_flag=True, help="The papers' two-stream route: one run per stream, scores fused "
              "on the fusion fold (twostream fuse).")
@click.option("--fusion-fold", type=float, default=0.1, help="Share of each class's training videos every run holds "
              "out for score fusion (same videos for every head and seed; 0: none, and the run cannot be fused).")
@set_option("Override head-config or train keys: --set a=1 b=2 (repeatable); head.KEY / train.KEY to be explicit.")
@click.option("--out", default="runs", type=click.Path(file_okay=False), help="Folder of run directories.")
@click.option("--seed", type=int, default=0, help="Seed of initial weights, batch order and validation carving.")
@click.option("--device", default="auto", help="auto, cpu, cuda or cuda:N.")
@click.option("--allow-missing", is_flag=True, help="Skip split videos that are not in the store (with a warning).")
@click.option("--init-from", type=click.Path(exists=True, file_okay=False), default=None,
              help="Finished run whose weights initialise this head (network expansion, Ng et al. 3.3).")
@click.option("--find-lr", type=click.Choice(["plot", "apply"]), is_flag=False, flag_value="plot", default=None,
              help="Learning-rate range test (Smith): write lr_find.png/.json to the run directory and print the "
                   "suggested lr; --find-lr=apply then trains with it.")
@click.option("--quiet", is_flag=True, help="No progress bar.")
def train(store, dataset, split_dir, split, splits, head, streams, late_fusion, fusion_fold, sets, out, seed, device,
          allow_missing, init_from, find_lr, quiet):
    """Train HEAD on the features in STORE for a split of DATASET; writes OUT/<head>-<hash>/.

    With several streams one head sees their features concatenated per frame (early fusion); --late-fusion
    trains one run per stream and fuses their scores, as the papers do.
    """
    import warnings

    from stages.train import TrainJob, train_late_fusion, train_splits
    from stages.train import train as run_train

    warnings.formatwarning = lambda message, *args, **kw: f"warning: {message}\n"  # one line, no source path

    job = TrainJob(store=store, dataset=dataset, head=head, split=split,
                   streams=tuple(_parse_list(streams, "--streams")) if streams else None,
                   overrides=_parse_sets(sets), out=out, seed=seed, device=device,
                   allow_missing=allow_missing, split_dir=split_dir, init_from=init_from, fusion_fold=fusion_fold,
                   find_lr=find_lr)
    if splits:
        train_splits(job, _parse_list(splits, "--splits", int), progress=not quiet, echo=click.echo,
                     late_fusion=late_fusion)
    elif late_fusion:
        train_late_fusion(job, progress=not quiet, echo=click.echo)
    else:
        run_train(job, progress=not quiet, echo=click.echo)


def _show(value) -> str:
    """A default as a user would type it: floats to 12 significant digits (``0.0003``, not the float error of a
    product such as ``0.00030000000000000003``), everything else as its repr."""
    if isinstance(value, float):
        return repr(float(f"{value:.12g}"))
    if isinstance(value, (list, tuple)):
        shown = ", ".join(_show(v) for v in value)
        return f"[{shown}]" if isinstance(value, list) else f"({shown}{',' if len(value) == 1 else ''})"
    return repr(value)


@click.command()
@click.argument("pattern", default="*")
def heads(pattern):
    """List registered heads (matching PATTERN) with their config keys, defaults and training defaults."""
    import pipeline.heads  # noqa: F401  (registers every head)
    from pipeline.errors import UserError
    from pipeline.registry import HEADS, config_fields
    from pipeline.training import TRAIN_KEYS, TrainConfig, recipe_values

    names = HEADS.names(pattern)
    if not names:
        raise UserError(f"no head matches {pattern!r}; `twostream heads` lists them all")
    for name in names:
        entry = HEADS.get(name)
        click.echo(f"{name}  [{entry.kind}]  {entry.doc}")
        for key, default in config_fields(entry.config_cls):
            click.echo(f"    {key} = {_show(default)}")
        td = getattr(entry.config_cls, "train_defaults", None)
        if td:
            click.echo("    train (recipe=paper): " + ", ".join(f"{k}={_show(v)}" for k, v in td.items()))
        if entry.kind == "torch":
            conv = recipe_values(entry.config_cls, "converge")
            click.echo("    train (recipe=converge, the default): "
                       + ", ".join(f"{k}={_show(v)}" for k, v in conv.items() if k != "recipe"))
    base = TrainConfig()
    click.echo("\ntrain keys (every head; a recipe sets some, the rest keep these values): "
               + ", ".join(f"{k}={_show(getattr(base, k))}" for k in TRAIN_KEYS if k != "recipe"))
    click.echo("\nstreams: `train --streams rgb,flow` concatenates the streams per frame for one head (early "
               "fusion, the default);\nthe papers' route is one model per stream with their scores fused: "
               "`twostream train STORE --dataset D --head H --streams rgb,flow --late-fusion`.")
