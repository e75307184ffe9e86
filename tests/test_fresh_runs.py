"""Fresh Snakemake runs of small configs: a model built alone by its target, and a failed verification that
stops only that model's branch."""

import pytest

from conftest import TIED, TINY_SHAPES, reference_config
from workflow_copy import REPORTED, Workflow, downloaded_tokenizer, rules_by_model

pytestmark = pytest.mark.slow


def test_a_failed_verification_stops_that_models_branch_only(tmp_path):
    """A patch that leaves a tied lm_head untied (random) fails verify: nothing downstream of that model is
    built, while the other model builds completely."""
    reference = reference_config()
    config = {
        "targets": ["tied", "untied"],
        "models": {
            "tied": {"source": {"demo": "mistral", "seed": 1, "shape": TIED}, **lean_model()},
            "untied": {"source": {"demo": "mistral", "seed": 2, "shape": TINY_SHAPES["mistral"]}, **lean_model()},
        },
        "datasets": reference["datasets"],
        "evaluation": reference["evaluation"],
    }
    flow = Workflow(tmp_path, config)
    modeling = flow.code / "workflow_scripts" / "checkpoint" / "vacc_files" / "modeling_mistral_vacc.py"
    source = modeling.read_text()
    tying = '    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}\n'
    assert tying in source
    modeling.write_text(source.replace(tying, ""))
    output = flow.run("--keep-going", check=False)
    assert "does not match upstream" in (flow.work / "logs" / "tied" / "verify.log").read_text()
    built = {str(p.relative_to(flow.work / "results")) for p in (flow.work / "results").rglob("*") if p.is_file()}
    assert not any(path.startswith("tied/") and not path.startswith("tied/patched/") for path in built), output[-3000:]
    assert "tied/patched/verify.json" not in built
    for path in (
        "untied/patched/verify.json",
        "untied/quantized/rtn-int8/MANIFEST.json",
        "untied/vamc/int8.yaml",
        "untied/eval/rtn-int8.json",
        "untied/gate.json",
    ):
        assert path in built, path


def lean_model():
    """The fewest jobs that still reach every kind of downstream stage: RTN only, no compiled packages."""
    return {
        "quantize": {"schemes": ["rtn-int8"]},
        "aoti": {"variants": []},
        "verify": {"greedy_tokens": 4},
        "gates": {"min_top1_agreement": None},
    }


def test_a_model_builds_alone_by_its_target_rule(tmp_path):
    fresh = Workflow(tmp_path, reference_config())
    # Calibration jobs appear once the download checkpoint tells the tokenizer.
    assert rules_by_model(fresh.planned("tiny_b")) == {
        "tiny-b": {"download", "patch", "quantize", "quantize_gptq", "vamc_config", "verify"} | REPORTED
    }
    assert fresh.planned("results/tiny-a/patched/MANIFEST.json") == [
        ("download", "model=tiny-a"),
        ("patch", "model=tiny-a"),
    ]
    fresh.run("tiny_b")
    assert fresh.tokenizers() == [downloaded_tokenizer(fresh, "tiny-b")]
    assert not (fresh.work / "results" / "tiny-a").exists()
