"""Shared test fixtures."""

import pytest

from cli.main import main


@pytest.fixture
def run_cli(capfd):
    """Run the CLI in this process (saves a torch import per call); returns (exit code, stdout + stderr)."""

    def run(*args):
        capfd.readouterr()
        try:
            main([str(a) for a in args])
            code = 0
        except SystemExit as e:
            code = e.code or 0
        out, err = capfd.readouterr()
        return code, out + err

    return run
