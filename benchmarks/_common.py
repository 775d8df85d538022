"""Helpers shared by the benchmark scripts: CPU-load probes, the git revision, number formatting, GNU time, and the
zeros of a pruned model's linears (also run inside llm-compressor's venv: standard library and torch only)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


def busy_cpu_seconds() -> float | None:
    """CPU seconds all processes have spent busy since boot (from /proc/stat), to spot concurrent load."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    user, nice, system, _idle, _iowait, irq, softirq = fields[:7]
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def self_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


def git_rev(repo: Path) -> str:
    try:
        rev = subprocess.run(["git", "-C", str(repo), "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return rev + ("+dirty" if dirty else "") if rev else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def fmt(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


def gnu_time() -> str | None:
    """/usr/bin/time if it is GNU time (accepts -f/-o), else None."""
    path = "/usr/bin/time"
    if not os.access(path, os.X_OK):
        return None
    try:
        ok = subprocess.run([path, "-f", "%M", "-o", os.devnull, "true"], capture_output=True, timeout=10,
                            check=False).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return None
    return path if ok else None


def linear_sparsity(model, inside: re.Pattern, name: str) -> dict:
    """Zeros of every `nn.Linear` weight of a loaded model: {name: ..., "other": ...}, the first for the linears
    whose module name matches `inside`, each with zeros, numel, layer count and sparsity."""
    import torch

    counts = {name: [0, 0, 0], "other": [0, 0, 0]}  # zeros, numel, layers
    for module_name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear):
            key = name if inside.match(module_name) else "other"
            w = module.weight.detach()
            counts[key][0] += int((w == 0).sum())
            counts[key][1] += w.numel()
            counts[key][2] += 1
    return {k: {"zeros": z, "numel": n, "layers": count, "sparsity": z / n if n else None}
            for k, (z, n, count) in counts.items()}


def llmc_pruned(model, inside: re.Pattern, name: str, asked: float) -> dict:
    """`linear_sparsity` of a model llm-compressor pruned; exits when the `name` linears hold less than 0.9x the
    `asked` sparsity (a recipe that matched nothing prunes nothing, silently)."""
    counted = linear_sparsity(model, inside, name)
    if asked and not counted[name]["sparsity"] >= 0.9 * asked:
        sys.exit(f"llm-compressor pruned too little: {name} linears at {counted[name]['sparsity']} sparsity, "
                 f"asked {asked}")
    return counted


def llmc_versions() -> dict[str, str]:
    """The library versions of llm-compressor's venv, for its runs' JSON line."""
    import compressed_tensors
    import llmcompressor
    import torch
    import transformers

    return {"llmcompressor": llmcompressor.__version__, "compressed_tensors": compressed_tensors.__version__,
            "transformers": transformers.__version__, "torch": torch.__version__, "python": sys.version.split()[0]}


def memory_mib() -> dict[str, float | None]:
    """This process's resident set now (VmRSS) and its high-water mark so far (VmHWM), MiB."""
    out: dict[str, float | None] = {"rss": None, "hwm": None}
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                out["rss" if key == "VmRSS" else "hwm"] = round(int(value.split()[0]) / 1024, 1)
    except OSError:
        pass
    return out


def sparsegpt_module(path: str | None):
    """multiflow.pruning.sparsegpt, or another version of it loaded from `path` (e.g. from `git show`)."""
    if path is None:
        from multiflow.pruning import sparsegpt

        return sparsegpt
    import importlib.util

    spec = importlib.util.spec_from_file_location("sparsegpt_under_test", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
