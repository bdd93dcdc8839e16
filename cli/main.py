"""``twostream``: one subcommand per stage.

Subcommand modules are imported only when their command runs, so ``twostream --help`` is instant and a
command never pays for another's heavy imports (torch, h5py, cv2).
"""

from __future__ import annotations

import importlib
import sys

import click

# command name -> (module under cli/, attribute, one-line help)
COMMANDS: dict[str, tuple[str, str, str]] = {
    "demo-data": ("cli.extract", "demo_data", "Write the demo dataset (UCF101 layout) to DIR."),
    "extract": ("cli.extract", "extract", "Stage one: videos -> HDF5 feature store (resumable)."),
    "info": ("cli.extract", "info", "What a feature store holds."),
    "verify": ("cli.extract", "verify", "Check every part of a feature store; --repair moves damaged ones aside."),
    "merge": ("cli.merge", "merge", "Verify the shards of a sharded store and write its index."),
    "train": ("cli.train", "train", "Stage two: train a head on cached features."),
    "heads": ("cli.train", "heads", "List registered heads and their config keys."),
    "finetune": ("cli.finetune", "finetune", "Fine-tune the rgb or flow stream CNN before extraction (resumable)."),
    "flow": ("cli.finetune", "flow", "Cache uint8 optical flow images per video for fine-tuning (resumable)."),
    "sweep": ("cli.sweep", "sweep", "Stage two, many runs: a sweep file of heads and grids (resumable)."),
    "report": ("cli.sweep", "report", "Leaderboard and HTML report over finished runs."),
    "fuse": ("cli.sweep", "fuse", "Fuse the per-video scores of finished runs (weights by cross-validation)."),
    "predict": ("cli.predict", "predict", "Classify new videos with a run, a fused run or an exported model."),
    "export": ("cli.predict", "export", "Write a self-contained model folder from a run or a fused run."),
    "split": ("cli.split", "split", "Write a train/test split (DATASET/manifest.csv) for videos in class folders."),
    "doctor": ("cli.doctor", "doctor", "What this machine gives the project: decoders, CUDA, threads, disk, weights."),
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attr, _ = COMMANDS[name]
        return getattr(importlib.import_module(module), attr)

    def format_commands(self, ctx, formatter):
        rows = [(name, COMMANDS[name][2]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="twostream")
def cli():
    """twostream: two-stream video classification, from videos to cached features to temporal heads."""


def main(argv: list[str] | None = None) -> None:
    """Entry point: user errors end in one line on stderr and exit code 2, never a traceback.

    Exit codes: 0 done, 1 some work failed (e.g. a sweep's failed runs), 2 a user error (bad setting, missing or
    damaged input, unwritable output), 130 interrupted (Ctrl-C).
    """
    from pipeline.errors import UserError

    try:
        cli.main(args=argv, prog_name="twostream", standalone_mode=False)
    except click.exceptions.Abort as e:
        if isinstance(e.__cause__, EOFError):  # click turns any EOFError into Abort: a truncated file, not Ctrl-C
            click.echo(f"error: unexpected end of a file ({e.__cause__ or 'EOFError'})", err=True)
            sys.exit(1)
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.exceptions.NoArgsIsHelpError as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.UsageError as e:  # one line, as every user error; the usage is one --help away
        command = e.ctx.command_path if e.ctx is not None else "twostream"
        click.echo(f"error: {e.format_message()} (see `{command} --help`)", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except UserError as e:
        click.echo(f"error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
