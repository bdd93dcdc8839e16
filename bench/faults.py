"""Fault-injection catalogue: run every test marked ``faults`` and print one line per case.

Each case is a real fault or bad input (two writers at once, a full disk, a damaged part, NaN features, a
killed sweep, a bad setting...) and the behaviour the project promises for it (a clear one-line error, nothing
lost, no result that looks right). A case *survives* when its test passes. The first line of a test's
docstring names the case.

    python bench/faults.py            # the whole catalogue
    python bench/faults.py -k store   # a subset (pytest -k expression)

Exit status: 0 when every case survived, 1 otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python bench/faults.py` from anywhere: the tests import the package and tests/


class Catalogue:
    """A pytest plugin that keeps, per test, its case name and whether it passed."""

    def __init__(self):
        self.cases: dict[str, dict] = {}

    def pytest_collection_finish(self, session):
        for item in session.items:  # after -m / -k deselection: only the cases that will run
            doc = (getattr(item, "obj", None).__doc__ or "").strip().splitlines()
            self.cases[item.nodeid] = {"case": doc[0].rstrip(".") if doc else item.name, "outcome": "not run",
                                       "seconds": 0.0}

    def pytest_runtest_logreport(self, report):
        case = self.cases.get(report.nodeid)
        if case is None:
            return
        case["seconds"] += report.duration
        # a failure in setup/teardown counts, as does a skip (the case was not tried)
        if (report.when == "call" or report.outcome != "passed") and case["outcome"] in ("not run", "passed"):
            case["outcome"] = report.outcome


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-k", default=None, help="pytest -k expression to pick cases")
    ap.add_argument("--out", default=None, help="also write the table to this file (bench/results/faults.md)")
    args = ap.parse_args(argv)
    cat = Catalogue()
    pytest_args = ["-q", "-p", "no:cacheprovider", "-m", "faults", "--no-header", "-rN", "-W", "ignore::UserWarning",
                   str(ROOT / "tests")]
    if args.k:
        pytest_args += ["-k", args.k]
    t0 = time.perf_counter()
    code = pytest.main(pytest_args, plugins=[cat])
    if code not in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        print(f"pytest could not run the catalogue (exit {int(code)}); see above")
        return 2
    tried = [c for c in cat.cases.values() if c["outcome"] != "skipped"]
    survived = [c for c in tried if c["outcome"] == "passed"]
    print()
    by_case: dict[str, list[dict]] = {}  # parametrised variants of one case share a line
    for c in cat.cases.values():
        by_case.setdefault(c["case"], []).append(c)
    lines = ["| case | outcome | seconds |", "|---|---|---:|"]
    for name, cs in by_case.items():
        ok = sum(c["outcome"] == "passed" for c in cs)
        run = sum(c["outcome"] != "skipped" for c in cs)
        mark = "skipped" if not run else "survived" if ok == run else "**FAILED**"
        count = f" {ok}/{run}" if len(cs) > 1 else ""
        lines.append(f"| {name.replace('|', '/')} | {mark + count} | {sum(c['seconds'] for c in cs):.1f} |")
    lines.append("")
    lines.append(f"{len(survived)} survived / {len(tried)} tried"
                 + (f" ({len(cat.cases) - len(tried)} skipped)" if len(tried) < len(cat.cases) else "")
                 + f" in {time.perf_counter() - t0:.0f} s")
    print("\n".join(lines))
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0 if tried and len(survived) == len(tried) else 1


if __name__ == "__main__":
    sys.exit(main())
