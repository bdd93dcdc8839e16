"""The README's first screen, its quick tour and its command table are exactly true.

Every command shown there is checked: a ``make`` target exists in the Makefile; a ``twostream`` command is run when
it is cheap (``--help`` of every command, ``heads``, ``doctor``, ``info`` and ``verify`` on a tiny store built here),
and otherwise parsed by click (``make_context``: the command exists, takes these options, and its arguments pass
their checks) with the placeholders (DATASET, STORE, ~/videos, ...) standing for tiny real ones. A tour command that
works on the reader's own videos must say so ("needs ...").
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from cli.main import COMMANDS, cli
from tests.synthetic import write_ucf_store

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MAKEFILE = (ROOT / "Makefile").read_text()
CHEAP = {"heads", "doctor", "info", "verify"}  # run for real; every other command is parsed only


def _section(title: str) -> str:
    m = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## )", README, re.DOTALL | re.MULTILINE)
    assert m, f"README has no section '## {title}'"
    return m.group(1)


def _first_screen() -> str:
    return README[: README.index("\n## ")]


def _code_blocks(text: str) -> list[str]:
    return re.findall(r"```(?:bash)?\n(.*?)```", text, re.DOTALL)


def _commands(block: str, table: bool = False) -> list[tuple[str, str]]:
    """(command, its comment or description) for every make / twostream command of a code block."""
    out = []
    for line in block.splitlines():
        if table:  # "twostream CMD ARGS      what it does"
            cmd, note = (re.split(r"\s{2,}", line.strip(), maxsplit=1) + [""])[:2]
        else:
            cmd, _, note = line.partition("#")
        for part in cmd.split("&&"):
            part = part.strip()
            if part.startswith(("make ", "twostream ", ".venv/bin/twostream ")) or part in ("make",):
                out.append((part, note.strip()))
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """Stand-ins for the README's placeholders: a dataset with splits, its feature store, a runs folder, a sweep file
    and a folder of class folders (the reader's own videos)."""
    tmp = tmp_path_factory.mktemp("readme")
    root, store = write_ucf_store(tmp, ["Alpha", "Beta"], groups=3, clips=1, T=4, dims=(4, 2))
    runs = tmp / "runs"
    (runs / "run-a").mkdir(parents=True)
    (runs / "run-b").mkdir()
    sweep = tmp / "sweep.yaml"
    sweep.write_text("runs:\n  - head: temporal-pool\n")
    mine = tmp / "videos"
    for c in ("cat", "dog"):
        (mine / c).mkdir(parents=True)
        (mine / c / f"{c}0.avi").touch()
    return {"DATASET": root, "D": root, "STORE": store, "DIR": tmp / "new-dir", "RUNS": runs, "RUN": runs / "run-a",
            "FILE.yaml": sweep, "~/videos": mine, "data/my-store": tmp / "my-store"}


def _args(cmd: str, tiny: dict) -> list[str]:
    """The argument list of a README command, its placeholders replaced by the tiny stand-ins."""
    cmd = cmd.replace("rgb|flow", "rgb")
    cmd = re.sub(r"\[(--[\w-]+(?: [A-Z]+)?)\]", r"\1", cmd)  # optional options: given
    cmd = re.sub(r"\s*\[[A-Z]+\]", "", cmd)  # optional arguments: left out
    args = []
    for tok in shlex.split(cmd)[1:]:
        if tok == "...":
            continue
        if tok == "RUN" and "RUN" in args:  # a second run directory
            tok = str(tiny["RUNS"] / "run-b")
        args.append(str(tiny.get(tok, tok)))
    return args


def _check(cmd: str, tiny: dict, run_cli) -> str:
    """Run or parse one README command; returns how it was checked."""
    if cmd.startswith("make"):
        for target in cmd.split()[1:]:
            if "=" not in target:
                assert re.search(rf"^{re.escape(target)}:", MAKEFILE, re.MULTILINE), f"`{cmd}`: no target {target} in Makefile"
        return "make target"
    args = _args(cmd, tiny)
    sub = args[0]
    assert sub in COMMANDS, f"`{cmd}`: no command {sub!r}"
    code, out = run_cli(sub, "--help")
    assert code == 0 and "Usage:" in out, f"`{sub} --help`: {out}"
    if sub in CHEAP:
        code, out = run_cli(*args)
        assert code == 0, f"`{cmd}` ran as {args}: exit {code}\n{out}"
        return "run"
    import click

    command = cli.get_command(click.Context(cli), sub)
    command.make_context(sub, list(args[1:]))  # raises on an unknown option or a failing argument check
    return "parsed"


def test_first_screen_commands(tiny, run_cli):
    blocks = _code_blocks(_first_screen())
    cmds = [c for b in blocks for c, _ in _commands(b)]
    assert cmds[:3] == ["make extract", "make train", "make test"], cmds
    for cmd in cmds:
        _check(cmd, tiny, run_cli)


def test_quick_tour_has_five_commands_each_true(tiny, run_cli):
    tour = _section("Quick tour")
    (block,) = _code_blocks(tour)
    cmds = _commands(block)
    assert len(cmds) == 5, cmds
    how = []
    for cmd, note in cmds:
        if "~/videos" in cmd or "data/my-store" in cmd:  # the reader's own data: the line says so
            assert "needs" in note, f"`{cmd}` works on the reader's data but is not marked as needing it"
        how.append(_check(cmd.replace(".venv/bin/", ""), tiny, run_cli))
    assert how == ["make target", "make target", "parsed", "parsed", "parsed"]
    named = re.findall(r"`(twostream [^`]+)`", tour)  # commands named in the text after the block
    assert "twostream doctor --store data/my-store" in named
    for cmd in named:  # the cheap ones run as written; the others (named, not spelled out) exist
        if shlex.split(cmd)[1] in CHEAP:
            assert _check(cmd, tiny, run_cli) == "run"
        assert shlex.split(cmd)[1] in COMMANDS


def test_command_table_runs_or_parses_every_command(tiny, run_cli):
    (block,) = _code_blocks(_section("Command line"))[:1]
    cmds = _commands(block, table=True)
    shown = [shlex.split(c)[1] for c, _ in cmds]
    assert sorted(shown) == sorted(COMMANDS), "the table and the CLI list different commands"
    how = {shlex.split(cmd)[1]: _check(cmd, tiny, run_cli) for cmd, _ in cmds}
    assert {k for k, v in how.items() if v == "run"} == CHEAP


def test_install_section_says_what_make_install_does():
    install = _section("Install")
    m = re.search(r"pip install --quiet -e '(\.\[[\w,]+\])'", MAKEFILE)
    assert m, "Makefile installs no editable package"
    assert f"pip install -e '{m.group(1)}'" in install  # the same extras as the Makefile
    assert "GB" in install  # how big the install is
    assert "pip install 'twostream" not in README and "pip install twostream" not in README  # not on a registry
    assert "DESIGN.md" not in README


def test_set_with_several_pairs_parses_as_the_readme_writes_it(tiny):
    import click

    assert "--set lambda2=0 lambda3=0" in README
    command = cli.get_command(click.Context(cli), "train")
    ctx = command.make_context("train", [str(tiny["STORE"]), "--dataset", str(tiny["DATASET"]), "--head",
                                         "fusion-net", "--set", "lambda2=0", "lambda3=0"])
    assert ctx.params["sets"] == ("lambda2=0", "lambda3=0")
