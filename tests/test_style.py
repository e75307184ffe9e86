"""The code's style is checked, not hoped for: ruff (lint, import order, format; pyproject.toml) on the Python,
snakefmt on the Snakefile and rules (``snakemake --lint`` runs in test_workflow.py)."""

import subprocess
import sys

import pytest

from conftest import REPO


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
