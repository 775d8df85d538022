"""The benchmark and experiment scripts import library internals: a guard so that a rename in src/ breaks here,
not silently in a script nobody ran. Every `from multiflow... import name` in them (module-level or inside a
function) resolves, and every script answers `--help`.

The dual encoder's selfcheck (`python -m experiments.dual_encoder.selfcheck`) is not run here: it needs
scikit-learn (the digits), which the test extra does not install."""

import ast
import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
HELP = {  # script -> how it is run (a file path, or `-m module` for the packages under experiments/)
    **{p.relative_to(ROOT).as_posix(): [str(p)] for p in sorted((ROOT / "benchmarks").glob("*.py"))
       if not p.name.startswith("_")},
    **{p.relative_to(ROOT).as_posix(): ["-m", ".".join(p.relative_to(ROOT).with_suffix("").parts)]
       for p in sorted((ROOT / "experiments").glob("*/*.py"))
       if p.stem in ("bench", "train", "model", "prepare", "rebuild") and '__name__ == "__main__"' in p.read_text()},
}
SCRIPTS = sorted(p for folder in ("benchmarks", "experiments") for p in (ROOT / folder).rglob("*.py"))


def test_the_scripts_are_found():
    assert "benchmarks/bench_calibrate.py" in HELP and "experiments/smollm2/bench.py" in HELP
    assert "experiments/dual_encoder/bench.py" in HELP and "experiments/llava_smollm2/rebuild.py" in HELP


@pytest.mark.unit
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_multiflow_import_of_a_script_resolves(script):
    tree = ast.parse(script.read_text(), str(script))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "multiflow":
                    importlib.import_module(alias.name)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "multiflow":
            module = importlib.import_module(node.module)
            for alias in node.names:
                if not hasattr(module, alias.name):  # a submodule not imported yet
                    importlib.import_module(f"{node.module}.{alias.name}")


@pytest.mark.e2e
@pytest.mark.parametrize("script", [pytest.param(s, marks=[pytest.mark.slow] if "dual_encoder" in s else [])
                                    for s in sorted(HELP)], ids=str)  # the dual encoder's import transformers' CLIP
def test_every_script_answers_help(script):
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, *HELP[script], "--help"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and "usage:" in done.stdout, done.stderr[-2000:]
