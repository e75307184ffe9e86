"""A stage's code inputs are exactly the code it runs: its entry point and the libraries it imports.

Rules declare ``module_sources`` of their stage as inputs, so an edit reruns
exactly the stages whose code it is. These tests pin every stage's set, and
the import graph that keeps the sets narrow: stages import libraries, never
other stages; nothing a stage runs imports the Snakefile's planning code.
"""

import ast
import re
import subprocess
import sys

import pytest

from workflow_scripts.core.code_inputs import PACKAGE, ROOT, module_sources

CLI = {"core/cli.py", "core/errors.py", "core/files.py"}
MANIFEST = CLI | {"core/manifest.py", "core/progress.py"}
SETTINGS = CLI | {"core/settings.py"}
FETCH = MANIFEST | {"core/fetch.py"}
# the VACC files are package data of vacc_code: copied into patched checkpoints, and loaded from there
VACC = {
    "checkpoint/vacc_code.py",
    "checkpoint/vacc_files/__init__.py",
    "checkpoint/vacc_files/configuration_mistral_vacc.py",
    "checkpoint/vacc_files/modeling_mistral_vacc.py",
    "checkpoint/vacc_files/quantization_vacc.py",
}
INT8_WRITER = (
    MANIFEST
    | SETTINGS
    | VACC
    | {
        "checkpoint/folder.py",
        "checkpoint/layout.py",
        "checkpoint/safetensors_stream.py",
        "core/code_inputs.py",
        "quantization/int8_checkpoint.py",
    }
)
DATASET_FOLDER = FETCH | {"data/assemble.py", "data/datasets.py"}
TOKEN_WINDOWS = MANIFEST | {
    "data/datasets.py",
    "data/provenance.py",
    "data/readers.py",
    "data/tokenizers.py",
    "data/windows.py",
}

EXPECTED = {
    "download": FETCH | {"checkpoint/assemble.py", "checkpoint/fetch.py", "checkpoint/folder.py", "core/hub.py"},
    "download_demo": FETCH
    | {
        "checkpoint/assemble.py",
        "checkpoint/demo_checkpoint.py",
        "checkpoint/demo_presets.py",
        "checkpoint/folder.py",
        "checkpoint/layout.py",
        "checkpoint/safetensors_stream.py",
        "data/tokenizer_files.py",
    },
    "download_gguf": FETCH
    | {
        "checkpoint/assemble.py",
        "checkpoint/folder.py",
        "checkpoint/gguf.py",
        "checkpoint/gguf_import.py",
        "checkpoint/layout.py",
        "checkpoint/safetensors_stream.py",
    },
    "patch": MANIFEST | SETTINGS | VACC | {"checkpoint/folder.py", "checkpoint/patch.py", "data/tokenizers.py"},
    "verify": MANIFEST
    | SETTINGS
    | VACC
    | {"core/devices.py", "data/tokenizers.py", "evaluation/verify.py", "runtime/decode.py"},
    "fetch_dataset": DATASET_FOLDER | {"core/hub.py", "data/fetch.py"},
    "fetch_dataset_demo": DATASET_FOLDER | {"data/demo_datasets.py"},
    "fetch_dataset_python_docs": DATASET_FOLDER | {"data/python_docs.py"},
    "tokenizer_store": CLI | {"data/tokenizers.py"},
    "calibration_shard": TOKEN_WINDOWS | SETTINGS | {"data/calibration.py"},
    "c4_evaluation_windows": TOKEN_WINDOWS | SETTINGS | {"data/evaluation_sets.py"},
    "ceval_evaluation_set": TOKEN_WINDOWS | SETTINGS | {"data/evaluation_sets.py"},
    "quantize": INT8_WRITER | {"quantization/rtn.py"},
    "export_compressed_tensors": INT8_WRITER | {"quantization/compressed_tensors_export.py"},
    "quantize_gptq": INT8_WRITER
    | {
        "core/devices.py",
        "data/provenance.py",
        "data/tokenizers.py",
        "quantization/__init__.py",
        "quantization/gptq.py",
        "quantization/gptq_checkpoint.py",
        "quantization/gptq_kernels.py",
    },
    "vamc_config": CLI
    | {
        "checkpoint/folder.py",
        "checkpoint/layout.py",
        "compilation/vamc.py",
        "compilation/vamc_config.py",
        "core/settings.py",
        "core/variants.py",
    },
    "vacc_compile": MANIFEST
    | {"checkpoint/folder.py", "checkpoint/layout.py", "compilation/vamc.py", "compilation/vacc_compile.py"},
    "aoti_compile": MANIFEST
    | SETTINGS
    | VACC
    | {
        "checkpoint/folder.py",
        "checkpoint/layout.py",
        "checkpoint/safetensors_stream.py",
        "compilation/aoti_build.py",
        "core/code_inputs.py",
        "core/devices.py",
        "core/variants.py",
        "data/tokenizers.py",
        "runtime/decode.py",
        "runtime/graphs.py",
        "runtime/package.py",
    },
    "evaluate": MANIFEST
    | SETTINGS
    | VACC
    | {
        "checkpoint/folder.py",
        "checkpoint/safetensors_stream.py",
        "core/devices.py",
        "core/variants.py",
        "evaluation/__init__.py",
        "data/provenance.py",
        "data/tokenizers.py",
        "evaluation/evaluate.py",
        "evaluation/metrics.py",
        "checkpoint/layout.py",
        "runtime/decode.py",
        "runtime/graphs.py",
        "runtime/package.py",
    },
    # the server runs as a child process (CHILD_MODULES): its code, down to the model's, is the benchmark's too
    "serve_benchmark": SETTINGS
    | VACC
    | {
        "checkpoint/folder.py",
        "checkpoint/layout.py",
        "checkpoint/safetensors_stream.py",
        "core/devices.py",
        "data/tokenizers.py",
        "runtime/graphs.py",
        "runtime/package.py",
        "serve.py",
        "serving/api.py",
        "serving/bench_client.py",
        "serving/engine.py",
        "serving/local_server.py",
        "serving/prompts.py",
        "serving/sweep.py",
        "serving/text.py",
        "serving/timings.py",
        "serving/variant.py",
    },
    "gate": SETTINGS | {"evaluation/gates.py"},
    "plots": SETTINGS | {"evaluation/gates.py", "evaluation/report.py"},
    "summary": SETTINGS | {"evaluation/gates.py", "evaluation/report.py"},
    "serving_plot": SETTINGS | {"evaluation/gates.py", "evaluation/report.py"},
}
STAGES = sorted(path.stem for path in (ROOT / "stages").glob("*.py") if path.stem != "__init__")


def code_inputs(stage):
    return {path.removeprefix(f"{ROOT}/") for path in module_sources(f"{PACKAGE}.stages.{stage}")}


def test_every_stage_has_its_expected_code_inputs():
    assert sorted(EXPECTED) == STAGES, "a stage was added or removed: list its code inputs here"


@pytest.mark.parametrize("stage", STAGES)
def test_a_stages_code_inputs_are_the_code_it_runs(stage):
    assert code_inputs(stage) == EXPECTED[stage] | {f"stages/{stage}.py"}


def imports_of(path):
    """The package modules ``path`` imports, by dotted name."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom) and not node.level and (node.module or "").startswith(PACKAGE):
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith(PACKAGE))
    return found


def package_modules():
    return [path for path in ROOT.rglob("*.py") if "__pycache__" not in path.parts]


def test_no_module_imports_a_stage():
    """Stages import libraries; a library or another stage importing a stage would make it a code input."""
    for path in package_modules():
        stages = {name for name in imports_of(path) if name.startswith(f"{PACKAGE}.stages.")}
        assert not stages, f"{path.relative_to(ROOT)} imports {sorted(stages)}"


# The sibling packages (and top-level modules) of workflow_scripts each one may import. Compilation, evaluation
# and serving share the runtime (graphs, compiled packages, greedy decoding) and import none of one another;
# planning reads the constants the Snakefile sizes jobs and checks config with; a stage calls any library.
ALLOWED_IMPORTS = {
    "__init__": set(),
    "core": set(),
    "data": {"core"},
    "checkpoint": {"core", "data"},
    "quantization": {"core", "checkpoint", "data"},
    "runtime": {"core", "checkpoint", "data"},
    "compilation": {"core", "checkpoint", "data", "runtime"},
    "evaluation": {"core", "checkpoint", "data", "runtime"},
    "serving": {"core", "checkpoint", "data", "runtime"},
    "planning": {"core", "checkpoint", "compilation", "data", "evaluation", "quantization"},
    "stages": {"core", "checkpoint", "data", "quantization", "runtime", "compilation", "evaluation", "serving"},
    "serve": {"core", "runtime", "serving"},
    "run_compiled": {"core", "runtime"},
}


def domain_of(path):
    """The sibling package of workflow_scripts that ``path`` is in, or the top-level module it is."""
    relative = path.relative_to(ROOT)
    return relative.parts[0] if len(relative.parts) > 1 else relative.stem


def test_packages_import_only_the_packages_they_build_on():
    modules = package_modules()
    assert {domain_of(path) for path in modules} == set(ALLOWED_IMPORTS), "a package was added: list its imports"
    for path in modules:
        own = domain_of(path)
        imported = {name.split(".")[1] for name in imports_of(path) if "." in name} - {own}
        forbidden = imported - ALLOWED_IMPORTS[own]
        assert not forbidden, f"{path.relative_to(ROOT)} imports {sorted(forbidden)}, outside {own}'s allowed list"


def test_planning_code_is_no_stages_code_input():
    """Retuning job sizes or config checks (planning/) must rerun nothing."""
    for stage in STAGES:
        assert not {path for path in code_inputs(stage) if path.startswith("planning/")}, stage
    for path in package_modules():
        if "planning" not in path.relative_to(ROOT).parts:
            planning = {name for name in imports_of(path) if name.startswith(f"{PACKAGE}.planning")}
            assert not planning, f"{path.relative_to(ROOT)} imports {sorted(planning)}"


def test_the_snakefile_plans_without_importing_torch():
    """Snakemake parses the workflow for every run, dry-run and cluster job step: the modules it imports keep
    torch, transformers and the tokenizers out (importing them costs seconds each time)."""
    workflow_files = [ROOT.parent / "Snakefile", *sorted((ROOT.parent / "rules").glob("*.smk"))]
    imports = [
        match.group(0)
        for path in workflow_files
        for match in re.finditer(rf"^from {PACKAGE}[\w.]* import (?:\([^)]*\)|.*)$", path.read_text(), re.MULTILINE)
    ]
    assert f"from {PACKAGE}.planning import job_resources" in imports, imports
    probe = "\n".join(["import sys", *imports, "print(' '.join(sorted(sys.modules)))"])
    loaded = set(
        subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout.split()
    )
    assert not loaded & {"torch", "transformers", "mistral_common", "safetensors"}
