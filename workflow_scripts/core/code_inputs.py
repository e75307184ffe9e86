"""Which source files a stage's code depends on, so rules can declare them as inputs.

Snakemake checksums small input files, so listing an entry point's module and
every module it imports (transitively, within this package) makes reruns
follow code content: a touched file reruns nothing, an edited one reruns exactly
the rules whose code it is. A module that reads package data names the folders
in a module-level ``PACKAGE_DATA`` tuple; their files count as its sources too.
A module that runs another as a child process (``python -m ...``) names it in a
module-level ``CHILD_MODULES`` tuple, and that module's sources count too.
"""

import ast
from pathlib import Path

PACKAGE = "workflow_scripts"
ROOT = Path(__file__).resolve().parents[1]


def _module_path(module):
    parts = module.split(".")[1:]
    candidate = ROOT.joinpath(*parts)
    return candidate / "__init__.py" if candidate.is_dir() else candidate.with_suffix(".py")


def _imports_and_data(path, module):
    """Package-internal modules imported by ``path`` and files of its ``PACKAGE_DATA`` folders."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    imported, data = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            if base == PACKAGE or base.startswith(PACKAGE + "."):
                imported.add(base)
                imported.update(f"{base}.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names if alias.name.startswith(PACKAGE + "."))
        elif module_constant(node, tree, "PACKAGE_DATA"):
            for folder in ast.literal_eval(node.value):
                data.update(
                    p for p in (path.parent / folder).rglob("*") if p.is_file() and "__pycache__" not in p.parts
                )
        elif module_constant(node, tree, "CHILD_MODULES"):
            imported.update(ast.literal_eval(node.value))
    return {name for name in imported if _module_path(name).exists()}, data


def module_constant(node, tree, name):
    return (
        isinstance(node, ast.Assign)
        and node in tree.body
        and any(isinstance(target, ast.Name) and target.id == name for target in node.targets)
    )


def module_sources(module):
    """Sorted absolute paths of ``module``'s file and everything it depends on in this package."""
    if not module.startswith(f"{PACKAGE}."):
        raise ValueError(f"{module!r} is no module of {PACKAGE}: pass a stage's dotted name (its __spec__.name)")
    seen, files, pending = set(), set(), [module]
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        path = _module_path(name)
        files.add(path)
        imported, data = _imports_and_data(path, name)
        files.update(data)
        pending.extend(imported - seen)
    return sorted(str(p) for p in files)


def sources_digest(module):
    """sha256 over the contents of ``module_sources(module)``: the code version of a stage."""
    import hashlib

    digest = hashlib.sha256()
    for path in module_sources(module):
        digest.update(Path(path).relative_to(ROOT).as_posix().encode() + b"\0")
        digest.update(Path(path).read_bytes())
    return digest.hexdigest()
