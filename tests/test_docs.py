"""Docs that cannot drift: the README's layout names every module of src/multiflow (and nothing that is gone),
and no docstring names a .py or .md file that does not exist."""

import ast
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "multiflow"
# Files of other projects that docstrings cite by name (the reference code a function follows).
EXTERNAL = {
    "convert_llava_weights_to_hf.py",  # transformers' LLaVA conversion script
    "lib/prune.py",  # the RIA authors' code
}
FILE_NAME = re.compile(r"(?<![\w/.-])([\w/.-]+\.(?:py|md))\b")


def layout_paths() -> set[str]:
    """The paths the README's Layout block lists under src/multiflow/, relative to it (folders end in /)."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Layout\n", 1)[1].split("\n## ", 1)[0]
    block = section.split("```", 2)[1]
    paths, stack, inside = set(), [], False
    for line in block.splitlines():
        if not line.startswith("  "):  # a top-level entry: src/multiflow/ starts the package's listing, others end it
            inside, stack = line.strip() == "src/multiflow/", []
            continue
        if not inside:
            continue
        depth = (len(line) - len(line.lstrip(" "))) // 2 - 1
        names = re.split(r"\s{2,}", line.strip(), maxsplit=1)[0]
        stack = stack[:depth]
        for name in names.split(", "):
            paths.add("".join(stack) + name)
        if names.endswith("/"):
            stack.append(names)
    return paths


def test_the_layout_parser_reads_nesting():
    paths = layout_paths()
    assert {"api.py", "pruning/", "pruning/scores.py", "models/families.py"} <= paths


def test_every_module_is_in_the_readme_layout_and_every_entry_exists():
    listed = layout_paths()
    modules = {str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
               if "__pycache__" not in p.parts and p.name != "__init__.py"}
    modules.add("__init__.py")
    missing = sorted(modules - listed)
    assert not missing, f"README.md's Layout section does not list: {', '.join(missing)}"
    gone = sorted(p for p in listed if not (PACKAGE / p).exists())
    assert not gone, f"README.md's Layout section lists what src/multiflow does not have: {', '.join(gone)}"


def docstrings(path: Path):
    tree = ast.parse(path.read_text(), str(path))
    for node in [tree, *ast.walk(tree)]:
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            text = ast.get_docstring(node)
            if text:
                yield text


def test_docstrings_name_only_files_that_exist():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for text in docstrings(path):
            for name in FILE_NAME.findall(text):
                if name in EXTERNAL:
                    continue
                if not any((base / name).exists() for base in (path.parent, PACKAGE, ROOT)):
                    wrong.append(f"{path.relative_to(ROOT)}: {name}")
    assert not wrong, "docstrings name files that do not exist: " + "; ".join(sorted(set(wrong)))
