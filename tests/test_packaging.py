"""The declared environments agree with each other and with what the rules use."""

import re

import yaml

from conftest import REPO


def requirement_lines(name):
    lines = (REPO / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def conda_pip(name):
    env = yaml.safe_load((REPO / "envs" / name).read_text())
    return next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))


def test_workflow_conda_env_is_requirements_txt():
    assert conda_pip("workflow.yaml") == requirement_lines("requirements.txt")


def test_the_slurm_driver_runs_the_workflows_snakemake():
    """Local and SLURM runs of one working folder keep the same records (requirements-slurm.txt: why two
    environments)."""
    pins = [
        dict(line.split("==") for line in requirement_lines(name))
        for name in ("requirements.txt", "requirements-slurm.txt")
    ]
    assert pins[0]["snakemake"] == pins[1]["snakemake"]
    assert "snakemake-executor-plugin-slurm" in pins[1] and "snakemake-executor-plugin-slurm" not in pins[0]


def test_vendor_env_pins_the_transformers_the_tests_check():
    vendor = dict(line.split("==") for line in requirement_lines("requirements-vendor.txt"))
    assert f"transformers=={vendor['transformers']}" in conda_pip("vamc.yaml")


def test_every_rule_declares_a_conda_env_that_exists():
    for rules in (REPO / "rules").glob("*.smk"):
        for env in re.findall(r'conda:\s*"\.\./(envs/[^"]+)"', rules.read_text()):
            assert (REPO / env).exists(), f"{rules.name}: {env}"


def test_the_package_never_imports_snakemake():
    for path in (REPO / "workflow_scripts").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+snakemake", path.read_text(), re.MULTILINE), path
