"""The README's measured tables are the committed outputs of the bench scripts, not numbers typed by hand.

A table in the README preceded by ``<!-- bench/results/NAME.md -->`` must equal that file's table, which the bench
that measured it wrote (``--out``; ``make readme-numbers`` reruns them). Editing a number in one place only fails.
"""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- (bench/results/[\w.-]+\.md) -->\n((?:\|.*\n?)+)")


def _table(text: str) -> list[str]:
    return [line.rstrip() for line in text.splitlines() if line.startswith("|")]


def test_readme_tables_equal_the_committed_bench_outputs():
    readme = (ROOT / "README.md").read_text()
    found = MARKER.findall(readme)
    assert found, "no README table names the bench output it comes from"
    for path, table in found:
        assert (ROOT / path).is_file(), f"{path} is cited by the README but not committed"
        assert _table(table) == _table((ROOT / path).read_text()), f"the README's table differs from {path}"


def test_every_committed_bench_output_is_shown_in_the_readme():
    cited = {p for p, _ in MARKER.findall((ROOT / "README.md").read_text())}
    for f in sorted((ROOT / "bench" / "results").glob("*.md")):
        assert f"bench/results/{f.name}" in cited, f"{f.name} is not in the README"
