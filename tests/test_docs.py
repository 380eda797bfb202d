"""The documentation names the tests that exist: every test file a page, the
README or CONTRIBUTING names is in tests/, and the Tests page's table of what
each file proves has a row for every tests/test_*.py.

Pure file reading, no backend: it runs the same in every backend's pass.
"""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
TESTS_PAGE = ROOT / "docs" / "testing.md"
# A test file's name as the docs write it, with or without "tests/" in front;
# "\b" keeps e.g. Keras's "adamw_test.py" or a "test_x.py::test_y" node id's
# function out.
TEST_FILE = re.compile(r"\btest_[A-Za-z0-9_]+\.py\b")


def _pages():
    pages = sorted((ROOT / "docs").glob("**/*.md"))
    pages += [ROOT / "README.md", ROOT / "CONTRIBUTING.md"]
    return [p for p in pages if p.exists()]


def _test_files():
    return {p.name for p in (ROOT / "tests").glob("test_*.py")}


def _named(text):
    return set(TEST_FILE.findall(text))


def _table_rows(text, heading):
    """The first column of the table under `heading` (a '## ' line)."""
    section = text.split(heading, 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return "\n".join(row.split(" | ", 1)[0] for row in rows)


def test_the_pattern_finds_test_file_names_and_nothing_else():
    text = (
        "`tests/test_a.py`, `test_b_2.py`, and `test_c.py::test_d`; "
        "not adamw_test.py, test_e.pyc nor mytest_f.py"
    )
    assert _named(text) == {"test_a.py", "test_b_2.py", "test_c.py"}


@pytest.mark.parametrize("page", _pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_test_file_a_page_names_exists(page):
    missing = sorted(_named(page.read_text(encoding="utf-8")) - _test_files())
    assert not missing, f"{page.relative_to(ROOT)} names missing test files {missing}"


def test_every_test_file_has_a_row_on_the_tests_page():
    text = TESTS_PAGE.read_text(encoding="utf-8")
    listed = _named(_table_rows(text, "## What each file proves"))
    missing = sorted(_test_files() - listed)
    assert not missing, (
        f"docs/testing.md, 'What each file proves', has no row for {missing}: "
        "add one saying what each proves"
    )
