"""The declared environments agree with each other and with what the rules use."""
import re

import yaml
from conftest import REPO

from workflow_scripts.sources import module_sources


def requirement_lines(name):
    lines = (REPO / name).read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def conda_pip(name):
    env = yaml.safe_load((REPO / "envs" / name).read_text())
    return next(item["pip"] for item in env["dependencies"] if isinstance(item, dict))


def test_workflow_conda_env_is_requirements_txt():
    assert conda_pip("workflow.yaml") == requirement_lines("requirements.txt")


def test_vendor_env_pins_the_transformers_the_tests_check():
    vendor = dict(line.split("==") for line in requirement_lines("requirements-vendor.txt"))
    assert f"transformers=={vendor['transformers']}" in conda_pip("vamc.yaml")


def test_every_rule_declares_a_conda_env_that_exists():
    for rules in (REPO / "rules").glob("*.smk"):
        for env in re.findall(r'conda:\s*"\.\./(envs/[^"]+)"', rules.read_text()):
            assert (REPO / env).exists(), f"{rules.name}: {env}"


def test_stage_sources_follow_imports_and_package_data():
    patch = {path.split("workflow_scripts/")[1] for path in module_sources("workflow_scripts.patch")}
    assert {"patch.py", "common.py", "checkpoint.py", "checkpoint_files/modeling_mistral_vacc.py",
            "checkpoint_files/configuration_mistral_vacc.py", "checkpoint_files/quantization_vacc.py"} <= patch
    assert "verify.py" not in patch and "demo.py" not in patch
    download = {path.split("workflow_scripts/")[1] for path in module_sources("workflow_scripts.download")}
    assert "demo.py" not in download and "tokenizer_files.py" not in download
    demo = {path.split("workflow_scripts/")[1] for path in module_sources("workflow_scripts.demo")}
    assert {"demo.py", "download.py", "tokenizer_files.py", "common.py"} <= demo


def test_the_package_never_imports_snakemake():
    for path in (REPO / "workflow_scripts").rglob("*.py"):
        assert not re.search(r"^\s*(import|from)\s+snakemake", path.read_text(), re.MULTILINE), path
