"""The documentation against what it documents: config/README.md against config/schema.yaml, README.md's length
and test command, and every relative link in README.md, config/README.md and docs/*.md.

config/README.md documents each key in a table row whose first cell is the key's dotted path in backticks
(``models.<id>.quantize.gptq-int8.nsamples``): ``<id>`` stands for any key of a map whose keys are ids (model ids
under ``models``, dataset ids under ``datasets``), and ``[]`` for the items of an array of objects. Its third cell
is the default: one backticked YAML value where the schema has a default (a map by format where the default
depends on the dataset's format), and text without backticks where it has none.
"""

import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "config" / "schema.yaml"
CONFIG_README = REPO / "config" / "README.md"
README = REPO / "README.md"
README_MAX_LINES = 160
PLACEHOLDER = "<id>"
NO_DEFAULT = object()


def resolve(node, schema):
    """``node`` with its ``$ref`` (``#/$defs/...``) merged in; the node's own keys win (a local default)."""
    while isinstance(node, dict) and "$ref" in node:
        target = schema
        for part in node["$ref"].removeprefix("#/").split("/"):
            target = target[part]
        node = {**target, **{key: value for key, value in node.items() if key != "$ref"}}
    return node


def conditional_defaults(node, schema):
    """``{property: {condition value: default}}`` from ``allOf`` entries ``if: {properties: {p: {const: v}}}`` /
    ``then: {properties: {property: {default: ...}}}`` (a dataset's defaults by its format)."""
    found = {}
    for entry in node.get("allOf", []):
        conditions = [
            resolve(value, schema).get("const") for value in entry.get("if", {}).get("properties", {}).values()
        ]
        if len(conditions) != 1 or conditions[0] is None:
            continue
        for name, sub in entry.get("then", {}).get("properties", {}).items():
            if "default" in sub:
                found.setdefault(name, {})[conditions[0]] = sub["default"]
    return found


def schema_keys(schema):
    """``{dotted path: default or NO_DEFAULT}`` for every property of config/schema.yaml at every level."""
    keys = {}

    def walk(node, path):
        node = resolve(node, schema)
        if not isinstance(node, dict):
            return
        by_condition = conditional_defaults(node, schema)
        for name, sub in node.get("properties", {}).items():
            child = f"{path}.{name}" if path else name
            sub = resolve(sub, schema)
            default = sub.get("default", by_condition.get(name, NO_DEFAULT))
            if keys.get(child, NO_DEFAULT) is NO_DEFAULT:
                keys[child] = default
            walk(sub, child)
        for maps in ("additionalProperties", "patternProperties"):
            subs = node.get(maps)
            subs = subs.values() if maps == "patternProperties" and subs else [subs]
            for sub in subs:
                if isinstance(sub, dict):
                    child = f"{path}.{PLACEHOLDER}"
                    keys.setdefault(child, NO_DEFAULT)
                    walk(sub, child)
        if isinstance(node.get("items"), dict):
            items = resolve(node["items"], schema)
            if items.get("properties") or items.get("additionalProperties") or items.get("patternProperties"):
                walk(items, f"{path}[]")
        for combined in ("allOf", "anyOf", "oneOf"):
            for sub in node.get(combined, []):
                walk(sub, path)
                for branch in ("then", "else"):
                    if branch in sub:
                        walk(sub[branch], path)

    walk(schema, "")
    return keys


def split_row(line):
    """A Markdown table row's cells; ``\\|`` and pipes inside code spans do not split."""
    cells, cell, in_code = [], "", False
    index = 0
    while index < len(line):
        char = line[index]
        if char == "\\" and line[index + 1 : index + 2] == "|":
            cell += "|"
            index += 2
            continue
        if char == "`":
            in_code = not in_code
        if char == "|" and not in_code:
            cells.append(cell.strip())
            cell = ""
        else:
            cell += char
        index += 1
    return cells[1:]  # the text before the first pipe


def documented_keys(text):
    """``{dotted path: row cells}`` of the rows of config/README.md whose first cell is one backticked key."""
    rows = {}
    for line in text.splitlines():
        if not line.startswith("|"):
            continue
        cells = split_row(line)
        match = re.fullmatch(r"`([^`]+)`", cells[0]) if cells else None
        if match:
            assert match.group(1) not in rows, f"config/README.md documents {match.group(1)} twice"
            rows[match.group(1)] = cells
    return rows


@pytest.fixture(scope="module")
def schema():
    return yaml.safe_load(SCHEMA.read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def documented():
    return documented_keys(CONFIG_README.read_text(encoding="utf-8"))


def test_the_schema_walk_finds_every_level(schema):
    keys = schema_keys(schema)
    # a top-level key, a fixed dataset's key, another dataset's key, a model key four levels down and a
    # model source's nested key: the walk follows properties, additionalProperties, $ref and nesting
    for key in (
        "targets",
        "datasets.c4.nsamples",
        "datasets.<id>.evaluation.seqlen",
        "models.<id>.quantize.gptq-int8.nsamples",
        "models.<id>.source.shape.tie_word_embeddings",
    ):
        assert key in keys
    assert keys["datasets.<id>.nsamples"] == {"c4": 144, "alpaca": 128, "ceval": 128}
    assert len(keys) > 100


def test_config_readme_documents_every_schema_key(schema, documented):
    missing = sorted(set(schema_keys(schema)) - set(documented))
    assert missing == [], f"config/README.md lacks a row for: {missing}"


def test_config_readme_documents_no_key_the_schema_lacks(schema, documented):
    unknown = sorted(set(documented) - set(schema_keys(schema)))
    assert unknown == [], f"config/README.md documents keys config/schema.yaml does not have: {unknown}"


def test_config_readme_defaults_are_the_schema_defaults(schema, documented):
    wrong = []
    for key, default in schema_keys(schema).items():
        if key not in documented:
            continue  # reported by test_config_readme_documents_every_schema_key
        cells = documented[key]
        assert len(cells) >= 4, f"{key}: expected | key | type | default | meaning |, got {cells}"
        written = re.fullmatch(r"`([^`]*)`", cells[2])
        if default is NO_DEFAULT:
            if written:
                wrong.append(f"{key}: the schema has no default, config/README.md writes {cells[2]}")
        elif not written:
            wrong.append(f"{key}: the schema's default is {default!r}, config/README.md writes {cells[2]!r}")
        elif yaml.safe_load(written.group(1)) != default:
            wrong.append(f"{key}: the schema's default is {default!r}, config/README.md writes {written.group(1)}")
    assert wrong == []


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, f"README.md has {len(lines)} lines; move detail into docs/"


def test_readme_keeps_the_test_command_where_ci_reads_it():
    # .ci/run: awk '/<!-- test-command -->/{getline; getline; print; exit}' README.md
    lines = README.read_text(encoding="utf-8").splitlines()
    marker = lines.index("<!-- test-command -->")
    assert lines[marker + 1] == "```bash"
    assert lines[marker + 2].startswith("python3 -m pip install ") and "python3 -m pytest" in lines[marker + 2]


def documents():
    return [README, CONFIG_README, *sorted((REPO / "docs").glob("*.md"))]


def anchors(path):
    """GitHub's heading anchors of a Markdown file."""
    found, seen = set(), {}
    in_fence = False
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        match = None if in_fence else re.match(r"#{1,6} (.+)", line)
        if match:
            slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
    return found


def links(path):
    """The link targets of a Markdown file, outside code blocks and code spans."""
    text = re.sub(r"```.*?```", "", path.read_text(encoding="utf-8"), flags=re.DOTALL)
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("document", documents(), ids=lambda path: str(path.relative_to(REPO)))
def test_relative_links_point_to_files_that_exist(document):
    broken = []
    for target in links(document):
        if re.match(r"[a-z]+:", target):
            continue  # https:, mailto:
        file, _, anchor = target.partition("#")
        linked = (document.parent / file).resolve() if file else document
        if not linked.exists():
            broken.append(f"{target}: no file {linked}")
        elif anchor and linked.suffix == ".md" and anchor not in anchors(linked):
            broken.append(f"{target}: {linked.relative_to(REPO)} has no heading with anchor #{anchor}")
    assert broken == []


def test_the_docs_are_linked_from_the_readme():
    linked = {(README.parent / target.partition("#")[0]).resolve() for target in links(README)}
    assert sorted(str(path.relative_to(REPO)) for path in documents()[1:] if path not in linked) == []
