"""The patched checkpoint loads and computes the same under the vendor's transformers 4.45.

vamc's environment pins transformers 4.45, so the modeling files shipped in the
checkpoint must work there too. This test runs them in an isolated virtual
environment built from requirements-vendor.txt (set VENDOR_PYTHON to reuse an
existing interpreter). Outside CI it is skipped, loudly, when that environment
cannot be built; in CI (CI=true) it must run.
"""

import json
import os
import subprocess
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import REPO, build_venv

pytestmark = pytest.mark.slow  # installs transformers 4.45 in a venv of its own

VENV = REPO / ".cache" / "venv-transformers-4.45"
PROBE = r"""
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM
folder, ids = sys.argv[1], torch.tensor([json.loads(sys.argv[2])])
model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, torch_dtype=torch.float32).eval()
int8 = model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
with torch.no_grad():
    logits = model(ids).logits[0, -1]
    quantized = logits if int8 else model.quantize(8)(ids).logits[0, -1]
print(json.dumps({"version": transformers.__version__, "class": type(model).__module__, "int8": int8,
                  "logits": logits.tolist(), "quantized": quantized.tolist()}))
"""
IDS = [1, 415, 5565, 302, 4843, 349, 5465, 28723, 661, 349, 264, 1628, 2990, 28723]


def vendor_python():
    if os.environ.get("VENDOR_PYTHON"):
        return os.environ["VENDOR_PYTHON"]
    python = VENV / "bin" / "python"
    if python.exists():
        return str(python)
    built, failure = build_venv(VENV, REPO / "requirements-vendor.txt")
    if failure:
        message = f"cannot build the transformers 4.45 environment: {failure}"
        if os.environ.get("CI"):
            pytest.fail(message)
        warnings.warn(message, stacklevel=2)
        pytest.skip("SKIPPED LOUDLY: " + message)
    return built


@pytest.fixture(scope="module")
def python445():
    return vendor_python()


@pytest.mark.parametrize("preset", ["mistral", "ministral"])
def test_patched_checkpoint_under_transformers_445(python445, patched, preset):
    result = subprocess.run(
        [python445, "-c", PROBE, str(patched[preset]), json.dumps(IDS)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    old = json.loads(result.stdout.strip().splitlines()[-1])
    assert old["version"] == "4.45.0"
    assert old["class"].endswith("modeling_mistral_vacc")

    model = AutoModelForCausalLM.from_pretrained(patched[preset], trust_remote_code=True, dtype=torch.float32).eval()
    with torch.no_grad():
        current = model(torch.tensor([IDS])).logits[0, -1]
        quantized = model.quantize(8)(torch.tensor([IDS])).logits[0, -1]
    assert (torch.tensor(old["logits"]) - current).abs().max() < 1e-5
    assert (torch.tensor(old["quantized"]) - quantized).abs().max() < 1e-5


@pytest.mark.parametrize("preset", ["mistral", "ministral"])
def test_int8_checkpoint_loads_as_int8_under_transformers_445(python445, quantized, preset):
    result = subprocess.run(
        [python445, "-c", PROBE, str(quantized[preset]), json.dumps(IDS)],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONPATH": ""},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    old = json.loads(result.stdout.strip().splitlines()[-1])
    assert old["int8"] and old["version"] == "4.45.0"
    model = AutoModelForCausalLM.from_pretrained(quantized[preset], trust_remote_code=True, dtype=torch.float32).eval()
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.int8
    with torch.no_grad():
        current = model(torch.tensor([IDS])).logits[0, -1]
    assert (torch.tensor(old["logits"]) - current).abs().max() < 1e-5
