"""A serving benchmark of any OpenAI-compatible endpoint, from the command line: the sweep VastAI runs on its VACC
servers (:mod:`workflow_scripts.serving.sweep`), run by :mod:`workflow_scripts.serving.bench_client`, and its
record written as JSON. The sweep's options, their defaults and bounds are those of ``models.<id>.bench`` in
config/schema.yaml.

Usage: python -m workflow_scripts.serving.benchmark --url URL --model NAME --tokenizer FOLDER --output PATH
           [--variant LABEL] [--max-prompt-tokens N] [--max-output-tokens N] [--inputs N [N ...]]
           [--outputs N [N ...]] [--concurrency N [N ...]] [--reference-length N|none] [--requests N]
           [--timeout-s S] [--seed N] [--warmup-requests N] [--api-key KEY]
"""

import argparse
import dataclasses
import json
import os
from pathlib import Path

from workflow_scripts.core.cli import run_cli
from workflow_scripts.core.errors import InputError
from workflow_scripts.core.files import atomic_write_json
from workflow_scripts.data.tokenizers import TOKENIZER_FILE, read_tokenizer
from workflow_scripts.serving.bench_client import run_benchmark
from workflow_scripts.serving.sweep import BenchSettings, Limits, bench_schema

OPTION_TYPES = {"integer": int, "number": float}


def optional_length(text):
    return None if text.lower() in ("none", "null") else int(text)


def option_kind(spec):
    """argparse's ``type`` (and ``nargs`` for a list) for a setting the schema describes by ``spec``."""
    if spec["type"] == "array":
        return {"type": OPTION_TYPES[spec["items"]["type"]], "nargs": "+"}
    if spec["type"] == ["integer", "null"]:
        return {"type": optional_length, "metavar": "N|none"}
    return {"type": OPTION_TYPES[spec["type"]]}


def add_settings_options(parser):
    """An option per sweep setting, helped by the schema's description and default; absent unless given."""
    properties = bench_schema()["properties"]
    sweep = parser.add_argument_group("the sweep (models.<id>.bench in config/schema.yaml)")
    for field in dataclasses.fields(BenchSettings):
        spec = properties[field.name]
        sweep.add_argument(
            f"--{field.name.replace('_', '-')}",
            default=argparse.SUPPRESS,
            help=f"{spec['description']} Default: {json.dumps(spec['default'])}.".replace("%", "%%"),
            **option_kind(spec),
        )


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="the OpenAI-compatible base URL, e.g. http://host:9000/v1")
    parser.add_argument("--model", required=True, help="the model id the endpoint serves")
    parser.add_argument("--tokenizer", required=True, type=Path, help="a folder with the served model's tokenizer.json")
    parser.add_argument("--output", required=True, type=Path)
    parser.add_argument("--variant", help="a label for the record")
    parser.add_argument("--api-key", help="default: $OPENAI_API_KEY, else none")
    parser.add_argument("--max-prompt-tokens", type=int)
    parser.add_argument("--max-output-tokens", type=int)
    add_settings_options(parser)
    args = vars(parser.parse_args(argv))
    settings = BenchSettings.with_defaults(
        {field.name: args[field.name] for field in dataclasses.fields(BenchSettings) if field.name in args}
    )
    limits = Limits(args["max_prompt_tokens"], args["max_output_tokens"])
    if not (args["tokenizer"] / TOKENIZER_FILE).is_file():
        raise InputError(f"{args['tokenizer'] / TOKENIZER_FILE} does not exist (--tokenizer names the folder)")
    tokenizer = read_tokenizer(args["tokenizer"])
    api_key = args["api_key"] or os.environ.get("OPENAI_API_KEY")
    record = run_benchmark(
        args["url"], args["model"], tokenizer, limits, settings, variant=args["variant"], api_key=api_key
    )
    atomic_write_json(args["output"], record)


if __name__ == "__main__":
    run_cli(main)
