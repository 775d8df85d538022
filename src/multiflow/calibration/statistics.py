"""Step 2: streaming activation statistics of every prunable linear layer.

Per layer and input feature j: the running mean of x_j^2 over the calibration
tokens it saw (padding excluded with the attention mask), kept as a float64
sum and an exact token count. Activations are never stored: the extra memory
is one vector per layer. The hooks are owned by a context manager and removed
even on error.

Layers whose inputs line up with the prompt's token positions (a language
model's) use the attention mask, and can also be split by token type (image
vs text positions). Other layers (a vision tower, a projector) see no padding:
every row of their input counts.

Non-finite sums (a NaN or inf activation, or a square beyond float32) stop the
run at the first layer, in forward order, whose batch sum shows them: the
statistic of every later layer would be wrong too.
"""

from __future__ import annotations

import re
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch
from torch import nn

from multiflow.errors import MultiflowError

TOKEN_TYPES = ("image", "text")


def square_sums(x: torch.Tensor, keep: torch.Tensor | None) -> tuple[torch.Tensor, int]:
    """Per-feature sum of x^2 over the rows (all leading dims) where `keep` is true.

    x: [..., in_features]; keep: bool mask over x's leading dims, or None for all.
    Returns (float64 [in_features], rows counted).
    """
    return masked_square_sums(x, [keep])[0]


def masked_square_sums(x: torch.Tensor, keeps: list[torch.Tensor | None]) -> list[tuple[torch.Tensor, int]]:
    """square_sums(x, keep) for each keep, with x read and squared once.

    float32 (and every dtype but bfloat16 on the CPU): x in float32, squared once, one float32 reduction per
    mask, as a plain `(keep @ x^2)`: the float32 results never depend on how many masks are asked.
    bfloat16 on the CPU (with numba): one pass over x's bits that squares in float32, sums chunks of
    `_CHUNK_ROWS` rows per mask in float32 and the chunks in float64, in row order for every column (so the
    result does not depend on the batch's split into threads), with no float32 copy of x: within 1e-5 relative of a
    float64 sum of the same bfloat16 values (float32 rounding of the chunk sums; tested).
    """
    rows = x.reshape(-1, x.shape[-1])
    masks = []
    for keep in keeps:
        if keep is not None:
            keep = keep.reshape(-1).to(device=rows.device)
            if keep.shape[0] != rows.shape[0]:
                raise ValueError(f"mask covers {keep.shape[0]} positions, input has {rows.shape[0]}")
        masks.append(keep)
    if rows.dtype == torch.bfloat16 and rows.device.type == "cpu" and _bf16_kernel is not None:
        return _bf16_square_sums(rows, masks)
    squares = rows.float().square()
    return [(squares.sum(0).double(), rows.shape[0]) if keep is None else
            ((keep.float() @ squares).double(), int(keep.sum())) for keep in masks]


_CHUNK_ROWS = 256  # bfloat16 kernel: rows summed in float32 before their sum goes into the float64 total

try:  # numba: the bfloat16 pass without a float32 copy of the activations; optional (torch path otherwise)
    import numba

    @numba.njit(nogil=True, cache=True)
    def _bf16_kernel(bits, masks, chunk, out):  # pragma: no cover - compiled
        """out[m] += sum over rows r with masks[m, r] of float32(bits[r])^2 (bits: bfloat16's uint16 [n, d])."""
        n, k, width = bits.shape[0], masks.shape[0], bits.shape[1]
        wide = np.empty(width, np.uint32)
        value = wide.view(np.float32)
        acc = np.zeros((k, width), np.float32)
        for start in range(0, n, chunk):
            for r in range(start, min(n, start + chunk)):
                row = bits[r]
                for c in range(width):
                    wide[c] = np.uint32(row[c]) << 16
                for m in range(k):
                    if masks[m, r]:
                        total = acc[m]
                        for c in range(width):
                            total[c] += value[c] * value[c]
            for m in range(k):
                for c in range(width):
                    out[m, c] += acc[m, c]
                    acc[m, c] = 0.0

except ImportError:  # pragma: no cover - exercised only without numba
    _bf16_kernel = None


def _bf16_square_sums(rows: torch.Tensor, masks: list[torch.Tensor | None]) -> list[tuple[torch.Tensor, int]]:
    n, d = rows.shape
    bits = rows.contiguous().view(torch.int16).numpy().view(np.uint16)
    table = np.ones((len(masks), n), np.uint8)
    for m, keep in enumerate(masks):
        if keep is not None:
            table[m] = keep.numpy()
    out = np.zeros((len(masks), d), np.float64)
    # One thread: ~0.5 ms for 1,084 x 2,816 (7x the float32 copy, square and product it replaces); a thread
    # pool per call cost more than it saved.
    _bf16_kernel(bits, table, _CHUNK_ROWS, out)
    counts = table.sum(1, dtype=np.int64).tolist()
    return [(torch.from_numpy(out[m]), counts[m]) for m in range(len(masks))]


def _fits(x: torch.Tensor, keep: torch.Tensor) -> bool:
    """x's rows are the batch's positions: [batch, seq, features], or flattened to [batch * seq, features]
    (OPT's decoder layers flatten the tokens before their MLP)."""
    return tuple(x.shape[:-1]) == tuple(keep.shape) or (x.dim() == 2 and x.shape[0] == keep.numel())


@dataclass
class RunningMean:
    """sum x_j^2 (float64) and the number of tokens it covers."""

    sq_sum: torch.Tensor | None = None
    tokens: int = 0

    def add(self, sq_sum: torch.Tensor, tokens: int) -> None:
        self.sq_sum = sq_sum.clone() if self.sq_sum is None else self.sq_sum + sq_sum.to(self.sq_sum.device)
        self.tokens += tokens

    def mean(self) -> torch.Tensor | None:
        """float32 mean of x_j^2 on the CPU, or None if no token was seen."""
        if not self.tokens:
            return None
        return (self.sq_sum.cpu() / self.tokens).float()


@dataclass
class LayerAccumulator:
    """One layer's running sums while calibrating (what they become: storage/stats_file.py's LayerStats)."""

    in_features: int
    all: RunningMean = field(default_factory=RunningMean)
    by_type: dict[str, RunningMean] = field(default_factory=dict)


class _Batch(threading.local):
    """The current forward pass's positions, per thread (block_runner runs one forward per worker thread)."""

    keep: torch.Tensor | None = None
    image: torch.Tensor | None = None
    last: tuple[weakref.ref, bool, dict] | None = None
    paused: bool = False


class Collector:
    """Accumulates statistics for named layers while the model runs batches."""

    def __init__(self, in_features: dict[str, int], aligned: set[str], split_token_types: bool):
        self.layers = {name: LayerAccumulator(n) for name, n in in_features.items()}
        self.aligned = aligned
        self.split = split_token_types
        self._batch = _Batch()

    @contextmanager
    def batch(self, attention_mask: torch.Tensor, image_positions: torch.Tensor | None = None) -> Iterator[None]:
        """Positions of the next forward pass: non-padding tokens and image tokens ([batch, seq] each)."""
        b = self._batch
        b.keep = attention_mask.bool()
        b.image = None if image_positions is None else image_positions.bool() & b.keep
        b.last = None
        try:
            yield
        finally:
            b.keep = b.image = b.last = None

    @contextmanager
    def paused(self) -> Iterator[None]:
        """Layers run in this thread meanwhile are not counted (a block re-run after pruning it)."""
        self._batch.paused = True
        try:
            yield
        finally:
            self._batch.paused = False

    def counted_rows(self, name: str, x: torch.Tensor) -> torch.Tensor | None | bool:
        """For other per-layer accumulators (SparseGPT's Hessians): False while paused, else the bool mask of
        x's leading dims that count for layer `name` (non-padding tokens) or None when every row counts."""
        b = self._batch
        if b.paused:
            return False
        if name not in self.aligned:
            return None
        if b.keep is None or not _fits(x, b.keep):
            raise MultiflowError(f"layer {name} got input of shape {list(x.shape)} but the batch mask is "
                                 f"{None if b.keep is None else list(b.keep.shape)}")
        return b.keep.reshape(x.shape[:-1]).to(x.device)

    def _sums(self, x: torch.Tensor, aligned: bool) -> dict[str, tuple[torch.Tensor, int]]:
        # q/k/v (and gate/up) read the same input tensor object: compute its sums once (keyed on that
        # object itself; a detached copy would be a new object every call and never hit).
        b = self._batch
        if b.last is not None and b.last[0]() is x and b.last[1] == aligned:
            return b.last[2]
        if aligned:
            if b.keep is None or not _fits(x, b.keep):
                raise MultiflowError(
                    f"a language-model layer got input of shape {list(x.shape)} but the batch mask is "
                    f"{None if b.keep is None else list(b.keep.shape)}; run one full forward per batch "
                    "inside Collector.batch(...) without a KV cache"
                )
            keep = b.keep.to(x.device)
            if self.split:
                image = (b.image if b.image is not None else torch.zeros_like(b.keep)).to(x.device)
                out = dict(zip(("all", "image", "text"), masked_square_sums(x, [keep, image, keep & ~image])))
            else:
                out = {"all": square_sums(x, keep)}
        else:
            out = {"all": square_sums(x, None)}
        b.last = (weakref.ref(x), aligned, out)
        return out

    def hook_for(self, name: str):
        stats = self.layers[name]
        aligned = name in self.aligned

        def hook(module: nn.Module, args: tuple) -> None:
            if self._batch.paused:
                return
            x = args[0] if args else None
            if not isinstance(x, torch.Tensor) or x.shape[-1] != stats.in_features:
                raise MultiflowError(f"layer {name}: expected an input with {stats.in_features} features")
            with torch.no_grad():
                sums = self._sums(x, aligned)
                if not bool(torch.isfinite(sums["all"][0]).all()):  # one check per layer and batch, not per element
                    raise MultiflowError(
                        f"layer {name} is the first to see non-finite calibration activations (NaN or inf, or "
                        f"squares beyond float32) in its {x.dtype} input: the model overflows on this data; "
                        "calibrate with --dtype float32, or check the checkpoint's weights")
                for kind, (sq_sum, tokens) in sums.items():
                    target = stats.all if kind == "all" else stats.by_type.setdefault(kind, RunningMean())
                    target.add(sq_sum, tokens)

        return hook


@contextmanager
def collect_statistics(
    model: nn.Module,
    layer_names: list[str],
    aligned_pattern: str | None,
    split_token_types: bool = False,
) -> Iterator[Collector]:
    """Hook every named nn.Linear of `model`; hooks are removed on exit, even on error.

    `aligned_pattern` (a regular expression, from the model family's data)
    selects the layers whose inputs line up with the prompt's token positions.
    """
    modules = {}
    direct = {n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)}
    for name in layer_names:
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise MultiflowError(f"layer {name} is not a module of the loaded model") from None
        if not isinstance(module, nn.Linear):
            raise MultiflowError(f"layer {name} is a {type(module).__name__}, not nn.Linear")
        if name.rpartition(".")[0] in direct:  # F.multi_head_attention_forward reads out_proj.weight itself
            raise MultiflowError(
                f"layer {name} is the output projection of an nn.MultiheadAttention, which reads its weight "
                "directly: no hook sees its inputs, so they cannot be measured. Skip it with a rule of group "
                "skip in --rules FILE, or prune without statistics (--method magnitude)")
        modules[name] = module
    aligned = {n for n in layer_names if aligned_pattern and re.search(aligned_pattern, n)}
    collector = Collector({n: m.in_features for n, m in modules.items()}, aligned, split_token_types)
    handles = []
    try:
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(collector.hook_for(name)))
        yield collector
    finally:
        for handle in handles:
            handle.remove()
