"""docs/reliability.md stays in sync with the tests: every test it names exists."""

import re

from conftest import REPO_ROOT


def test_every_test_named_in_the_reliability_page_exists():
    names = set(re.findall(r"`(test_\w+)`", (REPO_ROOT / "docs" / "reliability.md").read_text()))
    defined = {
        name
        for path in (REPO_ROOT / "tests").glob("test_*.py")
        for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)
    }
    assert len(names) >= 25
    assert not names - defined, f"named in docs/reliability.md but not defined: {sorted(names - defined)}"
