"""Snakemake end to end on the reference config: a full run, then what each kind of change reruns."""

import contextlib
import json
import os
import re
import shutil
import time

import pytest

from conftest import reference_config
from workflow_copy import REPORTED, SERVED, Workflow, downloaded_tokenizer, rules_by_model

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def workflow(reference_run, tmp_path_factory):
    """A copy of the session's reference run, which these tests may add to."""
    assert "Using workflow specific profile" in reference_run.output
    return Workflow.copy_of(reference_run, tmp_path_factory.mktemp("flow"))


def test_full_run_builds_verified_checkpoints(workflow):
    for model in ("tiny-a", "tiny-b", "tiny-c"):
        assert (workflow.work / "results" / model / "patched" / "verify.json").exists()
        for scheme in ("rtn-int8", "gptq-int8"):
            assert (workflow.work / "results" / model / "quantized" / scheme / "MANIFEST.json").exists()
        for dtype in ("fp16", "int8"):
            assert (workflow.work / "results" / model / "vamc" / f"{dtype}.yaml").exists()
        for stage in (
            "download",
            "patch",
            "verify",
            "quantize-rtn-int8",
            "quantize-gptq-int8",
            "vamc-config-fp16",
            "vamc-config-int8",
        ):
            assert (workflow.work / "logs" / model / f"{stage}.log").exists()
            assert (workflow.work / "benchmarks" / model / f"{stage}.tsv").exists()
    assert (workflow.work / "results" / "tiny-a" / "aoti" / "rtn-int8" / "head.pt2").exists()
    evaluations = sorted(p.name for p in (workflow.work / "results" / "tiny-a" / "eval").iterdir())
    assert evaluations == ["aoti-rtn-int8.json", "float.json", "gptq-int8.json", "rtn-int8.json"]
    summary = (workflow.work / "results" / "summary.md").read_text()
    assert summary.count("| pass |") == 7 and "| tiny-c | gptq-int8 | eager |" in summary
    assert not (workflow.work / "results" / "tiny-b" / "aoti").exists()
    assert not (workflow.work / "results" / "tiny-a" / "vacc").exists()  # no vamc here
    assert sorted(
        p.parent.name for p in (workflow.work / "results" / "tiny-a" / "quantized").glob("*-ct/MANIFEST.json")
    ) == [
        "gptq-int8-ct",
        "rtn-int8-ct",
    ]
    assert not list((workflow.work / "results" / "tiny-b" / "quantized").glob("*-ct"))
    for folder in ("patched", "quantized/rtn-int8", "quantized/gptq-int8"):
        index = json.loads((workflow.work / "results" / "tiny-a" / folder / "model.safetensors.index.json").read_text())
        assert "lm_head.weight" not in index["weight_map"], folder


def test_job_logs_hold_no_progress_bars(workflow):
    """Progress bars redraw with carriage returns, one line of noise per redraw in a file; the stages log their
    own progress instead."""
    logs = sorted((workflow.work / "logs").rglob("*.log"))
    assert len(logs) > 20
    assert [log for log in logs if "it/s]" in log.read_text() or "\r" in log.read_text()] == []


def test_dry_run_after_a_full_run_schedules_nothing(workflow):
    assert workflow.planned() == []


def test_changing_one_models_settings_reruns_that_model_only(workflow):
    config = reference_config()
    config["models"]["tiny-b"]["verify"]["greedy_tokens"] = 9
    workflow.write_config(config, "changed.yaml")
    # the stage-timing plot shows every job of the model, so it follows them
    assert workflow.planned(config="changed.yaml") == [("plots", "model=tiny-b"), ("verify", "model=tiny-b")]
    config["models"]["tiny-a"]["source"]["seed"] = 5
    workflow.write_config(config, "changed.yaml")
    assert rules_by_model(workflow.planned(config="changed.yaml")) == {
        "tiny-a": {"aoti_compile", "download", "patch", "quantize", "quantize_gptq", "vamc_config", "verify"}
        | {"export_compressed_tensors"}
        | SERVED
        | REPORTED,
        "tiny-b": {"plots", "verify"},
    }


def test_changing_one_models_scheme_settings_reruns_its_quantize_only(workflow):
    config = reference_config()
    config["models"]["tiny-c"]["quantize"]["rtn-int8"] = {"modules": ["q_proj", "k_proj", "v_proj", "o_proj"]}
    workflow.write_config(config, "scheme.yaml")
    reported = [("evaluate", "model=tiny-c, evaluation=rtn-int8"), ("gate", "model=tiny-c"), ("plots", "model=tiny-c")]
    assert workflow.planned(config="scheme.yaml") == reported + [("quantize", "model=tiny-c, scheme=rtn-int8")]
    config["models"]["tiny-c"]["quantize"]["gptq-int8"]["damp"] = 0.02
    workflow.write_config(config, "scheme.yaml")
    assert workflow.planned(config="scheme.yaml") == sorted(
        reported
        + [
            ("evaluate", "model=tiny-c, evaluation=gptq-int8"),
            ("quantize", "model=tiny-c, scheme=rtn-int8"),
            ("quantize_gptq", "model=tiny-c"),
        ]
    )


def test_touching_sources_without_changing_them_reruns_nothing(workflow):
    later = time.time() + 5
    for path in (workflow.code / "workflow_scripts").rglob("*.py"):
        os.utime(path, (later, later))
    assert workflow.planned() == []


@contextlib.contextmanager
def edited(path, edit=lambda text: text + "\n# an edit\n"):
    """``path`` of the workflow's code changed by ``edit`` for the block, then restored."""
    original = path.read_text()
    changed = edit(original)
    assert changed != original
    path.write_text(changed)
    try:
        yield
    finally:
        path.write_text(original)


def test_editing_the_patch_module_reruns_patch_jobs_and_nothing_upstream(workflow):
    with edited(workflow.code / "workflow_scripts" / "checkpoint" / "patch.py"):
        downstream = {"patch", "quantize", "quantize_gptq", "vamc_config", "verify"} | REPORTED
        assert rules_by_model(workflow.planned()) == {
            "tiny-a": downstream | {"aoti_compile", "export_compressed_tensors"} | SERVED,
            "tiny-b": downstream,
            "tiny-c": downstream,
        }
    assert workflow.planned() == []


def test_editing_a_shipped_checkpoint_file_reruns_patch_jobs(workflow):
    with edited(workflow.code / "workflow_scripts" / "checkpoint" / "vacc_files" / "modeling_mistral_vacc.py"):
        assert {rule for rule, _ in workflow.planned()} == {
            "patch",
            "quantize",
            "quantize_gptq",
            "verify",
            "vamc_config",
            "aoti_compile",
            "export_compressed_tensors",
        } | SERVED | REPORTED


def test_retuning_a_job_size_reruns_nothing(workflow):
    """Job sizes (planning/job_resources.py) change what a job asks the scheduler for, never what it builds."""
    sizing = workflow.code / "workflow_scripts" / "planning" / "job_resources.py"
    with edited(sizing, lambda text: text.replace("RETRY_GROWTH = 1.5", "RETRY_GROWTH = 2.0")):
        assert workflow.planned() == []


def test_editing_a_library_module_reruns_only_the_stages_that_import_it(workflow):
    """evaluation/gates.py is the code of the gate and report stages only (the plots, the serving plot and the
    summary): the rest of the run stays."""
    with edited(workflow.code / "workflow_scripts" / "evaluation" / "gates.py"):
        # (planned() lists the jobs with wildcards: the run-wide summary, also a report job, is not among them)
        assert {rule for rule, _ in workflow.planned()} == {"gate", "plots", "serving_plot"}


def test_unknown_model_in_a_file_target_fails_fast(workflow):
    output = workflow.run("--dry-run", "results/tiny-z/patched/verify.json", check=False)
    assert "MissingRuleException" in output or "No rule to produce" in output


def test_snakemake_lint_is_clean(workflow):
    assert "Congratulations, your workflow is in a good condition!" in workflow.run("--lint")


def test_models_with_one_tokenizer_share_one_set_of_shards(workflow):
    assert (
        downloaded_tokenizer(workflow, "tiny-a")
        == downloaded_tokenizer(workflow, "tiny-c")
        != downloaded_tokenizer(workflow, "tiny-b")
    )
    assert workflow.tokenizers() == sorted(
        {downloaded_tokenizer(workflow, "tiny-a"), downloaded_tokenizer(workflow, "tiny-b")}
    )
    for tokenizer in workflow.tokenizers():
        names = sorted(p.name for p in (workflow.work / "results" / "calibration" / tokenizer).iterdir())
        # only the datasets the models use: GPTQ's c4 (alpaca and ceval are configured, but unused)
        assert names == ["c4.json", "c4.safetensors"]
        evaluation = workflow.work / "results" / "evaluation-sets" / tokenizer
        assert sorted(p.name for p in evaluation.iterdir()) == [
            "c4-validation.json",
            "c4-validation.safetensors",
            "ceval.json",
        ]


def test_a_shard_and_an_evaluation_set_asked_for_by_path_build_on_a_clean_checkout(workflow, tmp_path):
    """Every rule declares what it reads: a tokenizer's files, asked for by path in an empty working folder, build
    the download of a model with that tokenizer, the dataset and the tokenizer store first, and nothing else."""
    tokenizer = downloaded_tokenizer(workflow, "tiny-b")  # a target after tiny-a, whose tokenizer differs
    clean = Workflow(tmp_path, reference_config())
    wanted = [
        f"results/calibration/{tokenizer}/c4.safetensors",
        f"results/evaluation-sets/{tokenizer}/c4-validation.safetensors",
    ]
    output = clean.run(*wanted)
    for path in wanted:
        built = clean.work / path
        assert built.read_bytes() == (workflow.work / path).read_bytes(), path
    ran = set(re.findall(r"^(?:local)?(?:rule|checkpoint) (\w+):$", output, re.MULTILINE))
    assert ran == {"download", "fetch_dataset", "tokenizer_store", "calibration_shard", "c4_evaluation_windows"}
    assert sorted(p.name for p in (clean.work / "resources" / "models").iterdir()) == ["tiny-a", "tiny-b"]


def test_a_new_calibration_seed_rebuilds_only_those_shards(workflow):
    config = reference_config()
    config["datasets"]["c4"]["seed"] = 7
    workflow.write_config(config, "seed.yaml")
    assert workflow.planned(config="seed.yaml") == sorted(
        [("calibration_shard", f"tokenizer={tokenizer}, dataset=c4") for tokenizer in workflow.tokenizers()]
        + [
            (rule, f"model={model}{extra}")
            for model in ("tiny-a", "tiny-b", "tiny-c")
            for rule, extra in (
                ("quantize_gptq", ""),
                ("evaluate", ", evaluation=gptq-int8"),
                ("gate", ""),
                ("plots", ""),
            )
        ]
        + [("export_compressed_tensors", "model=tiny-a, scheme=gptq-int8")]
    )


def test_vacc_compile_joins_the_targets_where_vamc_is_found(workflow, fake_vamc):
    env, calls = fake_vamc
    output = workflow.run("--dry-run")
    assert "VACC compile: off (compile.vacc: auto; vamc not on PATH)" in output
    planned = workflow.planned(env=env)
    assert [job for job in planned if job[0] == "vacc_compile"] == [
        ("vacc_compile", f"model={model}, dtype={dtype}")
        for model in ("tiny-a", "tiny-b", "tiny-c")
        for dtype in ("fp16", "int8")
    ]
    assert "VACC compile: on (compile.vacc: auto; vamc at" in workflow.run("--dry-run", env=env)
    config = reference_config()
    config["compile"] = {"vacc": "off"}
    workflow.write_config(config, "off.yaml")
    assert workflow.planned(config="off.yaml", env=env) == []
    # a vamc config names its workspace by absolute path: this copy's configs still name the reference's folder
    workflow.run("--force", "results/tiny-a/vamc/int8.yaml")
    workflow.run("results/tiny-a/vacc/int8/MANIFEST.json", env=env)
    log = (workflow.work / "logs" / "tiny-a" / "vacc-compile-int8.log").read_text()
    assert "fake vamc: compiling tiny-a-int8-tp4-1024-2048" in log
    assert json.loads(calls.read_text())["argv"] == ["compile", "results/tiny-a/vamc/int8.yaml"]
    artifact = workflow.work / "results" / "tiny-a" / "vacc" / "int8" / "tiny-a-int8-tp4-1024-2048"
    assert (artifact / "tokenizer" / "tokenizer.json").exists()


def test_with_vacc_on_and_no_vamc_the_job_says_what_to_install(workflow, tmp_path):
    config = reference_config()
    config["compile"] = {"vacc": "on"}
    workflow.write_config(config, "on.yaml")
    output = workflow.run("results/tiny-b/vacc/fp16/MANIFEST.json", config="on.yaml", check=False)
    assert "Error in rule vacc_compile" in output
    log = (workflow.work / "logs" / "tiny-b" / "vacc-compile-fp16.log").read_text()
    assert "vamc, VastAI's model compiler, is not on PATH" in log
    assert not (workflow.work / "results" / "tiny-b" / "vacc" / "fp16" / "MANIFEST.json").exists()


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_report_renders_its_table_and_plots_in_a_browser(workflow, tmp_path):
    """`snakemake --report`, opened in headless chromium: the summary table's rows and every plot of a model,
    asserted on the DOM; the screenshots are kept for a person to look at."""
    from playwright.sync_api import sync_playwright

    report = tmp_path / "report.html"
    workflow.run("--report", str(report))
    with sync_playwright() as driver:
        browser = driver.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.goto(report.as_uri())

        def view(category, name, subcategory=None):
            page.locator("nav").get_by_text("Results", exact=True).first.click()
            page.locator("nav").get_by_text(category, exact=True).click()
            if subcategory:
                page.locator("nav").get_by_text(subcategory, exact=True).click()
            page.get_by_text(name).locator("xpath=ancestor::tr[1]").locator("[iconname=eye]").click()
            page.wait_for_timeout(500)

        view("Summary", "results/report/summary.html")
        table = next(frame for frame in page.frames if frame.locator("table#summary").count())
        rows = table.locator("table#summary tbody tr")
        assert rows.count() == 4 + 3 + 3  # tiny-a: float, two schemes, one aoti; tiny-b and tiny-c: float, two schemes
        assert "tiny-a" in rows.first.inner_text() and "reference" in rows.first.inner_text()
        # tiny-a's compiled package, served and swept: its longest prompt, one output length, two concurrencies
        assert table.locator("table#bench tbody tr").count() == 2
        page.screenshot(path=str(tmp_path / "summary.png"))
        for plot in ("metrics", "stages", "quantization-error", "serving"):
            view("tiny-a", f"results/report/tiny-a/{plot}.png", "plots")
            image = page.locator("img[src^='data:image/png']").last
            assert image.evaluate("img => img.complete && img.naturalWidth") > 300, plot
            page.screenshot(path=str(tmp_path / f"{plot}.png"))
        browser.close()
    assert (tmp_path / "summary.png").read_bytes()[:4] == b"\x89PNG"
