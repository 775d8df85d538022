"""The Step 2 statistics file: `stats.safetensors`.

For each prunable layer L (Step 1's names):
  `L.sq_mean`  float32 [in_features]  mean of x_j^2 over the tokens it saw
  `L.tokens`   int64 [1]              how many tokens that is
and, with token types split (language-model layers only), `L.sq_mean.image`,
`L.tokens.image`, `L.sq_mean.text`, `L.tokens.text`. A layer that saw no token
has `L.tokens` = 0 and no `L.sq_mean`; it is listed in the metadata.
File metadata key "multiflow" holds a JSON block (model, naming, data source,
nsamples, seed, prompt mode, dtype, tool version, layers without tokens).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load, save

from multiflow.calibration.statistics import Collector
from multiflow.errors import MultiflowError
from multiflow.storage.outputs import write_atomic


@dataclass
class LayerStats:
    """One layer's statistic: mean of x_j^2 and its token count (per token type optionally)."""

    sq_mean: torch.Tensor | None
    tokens: int
    by_type: dict[str, tuple[torch.Tensor | None, int]] = field(default_factory=dict)


def from_collector(collector: Collector) -> dict[str, LayerStats]:
    out = {}
    for name, st in collector.layers.items():
        by_type = {kind: (rm.mean(), rm.tokens) for kind, rm in st.by_type.items()}
        out[name] = LayerStats(st.all.mean(), st.all.tokens, by_type)
    return out


def save_stats(path: str | Path, stats: dict[str, LayerStats], meta: dict[str, Any]) -> Path:
    tensors: dict[str, torch.Tensor] = {}
    for name, st in stats.items():
        for suffix, (mean, tokens) in {"": (st.sq_mean, st.tokens), **{f".{k}": v for k, v in st.by_type.items()}}.items():
            tensors[f"{name}.tokens{suffix}"] = torch.tensor([tokens], dtype=torch.int64)
            if mean is not None:
                tensors[f"{name}.sq_mean{suffix}"] = mean.float().contiguous()
    meta = dict(meta, layers_without_tokens=[n for n, st in stats.items() if not st.tokens])
    return write_atomic(Path(path), save(tensors, metadata={"multiflow": json.dumps(meta)}))


def load_stats(path: str | Path) -> tuple[dict[str, LayerStats], dict[str, Any]]:
    path = Path(path)
    try:
        raw = path.read_bytes()
        tensors = load(raw)
        from safetensors import safe_open  # metadata is read from the header

        with safe_open(str(path), "pt") as f:
            meta = json.loads((f.metadata() or {}).get("multiflow", "{}"))
    except (OSError, SafetensorError, json.JSONDecodeError, ValueError) as exc:
        raise MultiflowError(f"cannot read statistics file {path}: {exc}") from exc
    stats: dict[str, LayerStats] = {}
    for key in tensors:
        if key.endswith(".tokens"):
            name = key[: -len(".tokens")]
            by_type = {}
            for kind in ("image", "text"):
                if f"{name}.tokens.{kind}" in tensors:
                    by_type[kind] = (_sq_mean(tensors, f"{name}.sq_mean.{kind}", path),
                                     _tokens(tensors, f"{name}.tokens.{kind}", path))
            stats[name] = LayerStats(_sq_mean(tensors, f"{name}.sq_mean", path), _tokens(tensors, key, path), by_type)
            for kind, (mean, tokens) in {"": (stats[name].sq_mean, stats[name].tokens), **by_type}.items():
                if (mean is None) != (tokens == 0):
                    raise MultiflowError(f"{path}: layer {name}{' (' + kind + ' tokens)' if kind else ''} has "
                                         f"{tokens} tokens but {'no' if mean is None else 'a'} sq_mean; the file is "
                                         "corrupt: recalibrate")
    if not stats:
        raise MultiflowError(f"{path} holds no multiflow statistics (no '<layer>.tokens' tensors)")
    return stats, meta


def _tokens(tensors: dict[str, torch.Tensor], key: str, path: Path) -> int:
    """A token count: one non-negative integer."""
    t = tensors[key]
    if t.dtype.is_floating_point or t.dtype == torch.bool or t.numel() != 1 or int(t.reshape(-1)[0]) < 0:
        raise MultiflowError(f"{path}: {key} must be one non-negative integer (got {t.dtype} "
                             f"{t.reshape(-1)[:3].tolist()}); the file is corrupt: recalibrate")
    return int(t.reshape(-1)[0])


def _sq_mean(tensors: dict[str, torch.Tensor], key: str, path: Path) -> torch.Tensor | None:
    """A mean of squares: a 1-D float vector of finite, non-negative values (or absent)."""
    t = tensors.get(key)
    if t is None:
        return None
    if not t.dtype.is_floating_point or t.dim() != 1:
        raise MultiflowError(f"{path}: {key} must be a 1-D float vector, not {t.dtype} of shape {list(t.shape)}; "
                             "the file is corrupt: recalibrate")
    bad = ~torch.isfinite(t) | (t < 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        raise MultiflowError(f"{path}: {key} holds {int(bad.sum())} NaN, inf or negative values (feature {i}: "
                             f"{float(t[i])}); a mean of squares is finite and >= 0: recalibrate (with --dtype "
                             "float32 if the model overflows)")
    return t
