"""``vamc compile`` of a build config into ``<workspace>/<name>/`` (stage 5, VACC compile).

vamc is VastAI's closed compiler: this stage calls the real one, from the
vendor environment (``envs/vamc.yaml`` under ``--use-conda``) or from PATH, and
fails with what to install where there is none. Its output streams into the
rule's log. Any earlier artifact folder of the same name is removed first and
a failed compile removes what it wrote, so only a finished compile leaves a
folder, and only a folder that holds files gets a manifest (the rule's
output). The folder also gets the ``tokenizer/`` subfolder that
``vastgenx serve --model <folder>`` reads.
"""

import logging
import os
import shutil
import subprocess
from pathlib import Path

import yaml

from workflow_scripts.checkpoint.folder import copy_tokenizer_files, read_mistral_config
from workflow_scripts.compilation.vamc import build_environment
from workflow_scripts.core.errors import StageError
from workflow_scripts.core.files import atomic_write_json, sha256_file
from workflow_scripts.core.manifest import describe_files

LOG = logging.getLogger(__name__)

MISSING_VAMC = (
    "vamc, VastAI's model compiler, is not on PATH. It is a closed wheel (vamc 3.4.x, with torch 2.1 "
    "and transformers 4.45): put it in VAMC_WHEEL_DIR and run with --use-conda (envs/vamc.yaml), or "
    "install it into this environment; or set compile.vacc: off"
)


def find_vamc():
    vamc = shutil.which("vamc")
    if vamc is None:
        raise StageError(MISSING_VAMC)
    return vamc


def compile_config(model, config_path, patched, manifest_path):
    vamc = find_vamc()
    document = yaml.safe_load(config_path.read_text(encoding="utf-8"))
    artifact = Path(document["workspace"]["path"]) / document["name"]
    environment = build_environment(read_mistral_config(patched, model))
    shutil.rmtree(artifact, ignore_errors=True)
    manifest_path.unlink(missing_ok=True)
    LOG.info(
        "model %s: %s compile %s%s",
        model,
        vamc,
        config_path,
        "".join(f" with {key}={value}" for key, value in environment.items()),
    )
    try:
        result = subprocess.run([vamc, "compile", str(config_path)], env={**os.environ, **environment})
        if result.returncode != 0:
            raise StageError(
                f"model {model}: vamc compile {config_path} exited with status {result.returncode} "
                "(its output is above in this log)"
            )
        files = [p for p in artifact.rglob("*") if p.is_file()] if artifact.is_dir() else []
        if not files:
            raise StageError(f"model {model}: vamc compile {config_path} succeeded but wrote nothing to {artifact}")
        (artifact / "tokenizer").mkdir()
        copy_tokenizer_files(patched, artifact / "tokenizer")
    except BaseException:
        shutil.rmtree(artifact, ignore_errors=True)
        raise
    names = [p.relative_to(artifact).as_posix() for p in artifact.rglob("*") if p.is_file()]
    atomic_write_json(
        manifest_path,
        {
            "model": model,
            "artifact": str(artifact),
            "name": document["name"],
            "dtype": document["backend"]["dtype"],
            "vamc": vamc,
            "environment": environment,
            "config_sha256": sha256_file(config_path),
            "files": describe_files(artifact, names),
        },
    )
