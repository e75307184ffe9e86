"""The code's style is checked, not hoped for: ruff (lint, import order, format; pyproject.toml) on the Python,
snakefmt on the Snakefile and rules (``snakemake --lint`` runs in test_workflow.py); and the test suite's split
over its workers."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, SHARED_FIXTURE_FILES


@pytest.mark.parametrize(
    "command",
    [
        ["ruff", "check", "--no-cache", "."],
        ["ruff", "format", "--check", "--no-cache", "."],
        ["snakefmt", "--check", "Snakefile", "rules"],
    ],
    ids=["ruff-check", "ruff-format", "snakefmt"],
)
def test_the_code_is_clean(command):
    result = subprocess.run([sys.executable, "-m", *command], check=False, cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def test_tests_that_share_an_expensive_fixture_share_a_worker():
    """A file with a module-scoped fixture not listed in conftest.SHARED_FIXTURE_FILES would build it once per
    worker; the files that run copies of the reference run share its code folder, so they share a group."""
    for path in sorted((REPO / "tests").glob("test_*.py")):
        if path.name == Path(__file__).name:
            continue
        text = path.read_text()
        if re.search(r'@pytest\.fixture\(scope="module"', text):
            assert path.name in SHARED_FIXTURE_FILES, path.name
        if "Workflow.copy_of(reference_run" in text:
            assert SHARED_FIXTURE_FILES.get(path.name) == "reference run's code", path.name
