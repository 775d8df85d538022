"""The benchmark and experiment scripts import library internals: a guard so that a rename in src/ breaks here,
not silently in a script nobody ran. Every `from multiflow... import name` in them (module-level or inside a
function) resolves, and every script answers `--help`.

The dual encoder's selfcheck (`python -m experiments.dual_encoder.selfcheck`) is not run here: it needs
scikit-learn (the digits), which the test extra does not install."""

import argparse
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


@pytest.mark.unit
def test_the_benchmark_grid_keys_rows_by_their_extra_flags(tmp_path, monkeypatch):
    """A re-run with `--extra` flags runs its configurations again (they are other rows, not "already there"),
    a re-run of the same command runs nothing, and the table shows the two apart."""
    monkeypatch.syspath_prepend(str(ROOT))
    bench = importlib.import_module("experiments.smollm2.bench")
    parser = argparse.ArgumentParser()
    bench.add_grid_arguments(parser, seeds=[0])
    bench.add_extra_argument(parser)
    ran = []

    def fake_run(c):
        ran.append(bench.method_flags(c))
        return {**c, "perplexity": 10.0 + len(c.get("extra", [])), "kl": 0.5}

    base = ["--out", str(tmp_path), "--configs", "multiflow+obs/modality/row", "--sparsities", "0.5"]
    for argv in (base, base + ["--extra", "--max-layer-sparsity", "0.9"], base + ["--extra", "--max-layer-sparsity",
                                                                                    "0.9"], base):
        args = parser.parse_args(argv)
        args.sparsities = [float(s) for s in args.sparsities]
        rows = bench.run_grid(args, fake_run, {})
    assert ran == [["--seed", "0", "--method", "multiflow", "--update", "obs", "--target-sparsity", "0.5",
                    "--allocation", "modality", "--group", "row"],
                   ["--seed", "0", "--method", "multiflow", "--update", "obs", "--target-sparsity", "0.5",
                    "--allocation", "modality", "--group", "row", "--max-layer-sparsity", "0.9"]]
    assert len(rows) == 2
    table = bench.table(rows, "header", bench.PERPLEXITY)
    assert "| multiflow+obs | modality | row | 10.00 (0.500) |" in table
    assert "| multiflow+obs --max-layer-sparsity 0.9 | modality | row | 12.00 (0.500) |" in table
