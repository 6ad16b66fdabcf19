"""docs/reliability.md stays in sync with the tests: at least 40 catalogued rows, each naming tests that exist, and
every test of the bad-input, fuzzing, resume and non-finite test files named there."""

import re

from conftest import REPO_ROOT

CATALOGUED_TEST_FILES = (
    "test_bad_inputs_*.py",
    "test_fuzz.py",
    "test_resume_training.py",
    "test_nonfinite_training.py",
)


def defined_tests(pattern: str) -> set[str]:
    return {
        name
        for path in (REPO_ROOT / "tests").glob(pattern)
        for name in re.findall(r"^def (test_\w+)", path.read_text(), re.M)
    }


def test_every_catalogued_case_names_existing_tests_and_every_bad_input_test_is_catalogued():
    page = (REPO_ROOT / "docs" / "reliability.md").read_text()
    rows = [line for line in page.splitlines() if line.startswith("| ") and not line.startswith("| input ")]
    assert len(rows) >= 40, f"{len(rows)} catalogued cases"
    for row in rows:
        cells = [cell.strip() for cell in row.strip("|").split("|")]
        assert len(cells) == 4 and all(cells), f"not (input, entry point, outcome, test): {row}"
        assert re.fullmatch(r"`test_\w+`(, `test_\w+`)*", cells[3]), f"no test named in: {row}"
    named = set(re.findall(r"`(test_\w+)`", page))
    missing = named - defined_tests("test_*.py")
    assert not missing, f"named in docs/reliability.md but not defined: {sorted(missing)}"
    uncatalogued = set().union(*map(defined_tests, CATALOGUED_TEST_FILES)) - named
    assert not uncatalogued, f"tests missing from docs/reliability.md: {sorted(uncatalogued)}"
