"""Step 3's output: the pruned copy, streamed from the input shards.

The output keeps the input's files, keys, dtypes and sharding: each safetensors
file is copied header first, then tensor by tensor, prunable weights zeroed by
their mask. One tensor is held at a time, so a 7B model never needs two copies
in memory, and the folder loads with `from_pretrained` exactly as the input did
(original-layout LLaVA stays in its own layout). The zeros written are counted.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from multiflow.errors import MultiflowError
from multiflow.pruning.masking import checked_mask
from multiflow.storage.checkpoint import check_finite, list_tensors, read_tensors

if TYPE_CHECKING:
    from multiflow.pruning.config import PruneConfig
    from multiflow.pruning.plan import LayerPlan

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def output_inputs(config: PruneConfig) -> dict[str, Path | None]:
    """The inputs a prune output must keep clear of (never inside, over or around them)."""
    return {"the input model folder": config.model, "the --stats file": config.stats,
            "the --distribution file": config.distribution, "the --rules file": config.rules}


def write_pruned(src: Path, dst: Path, by_key: dict, config: PruneConfig, stats, progress: bool,
                  updated=None) -> str:
    """Copy every file of src into dst, zeroing pruned weights; returns sha256 of the input weight files."""
    entries = list_tensors(src)
    files = list(dict.fromkeys(e.file for e in entries))
    digest = hashlib.sha256()
    for path in sorted(src.iterdir()):
        if path.is_file() and path not in files and path.suffix not in WEIGHT_SUFFIXES:
            shutil.copyfile(path, dst / path.name)  # a new file: its mode follows the umask
    bar = tqdm(total=sum(e.end - e.begin for e in entries), unit="B", unit_scale=True,
               desc="Step 3: pruning", disable=not progress)
    with bar:
        for path in files:
            in_file = sorted((e for e in entries if e.file == path), key=lambda e: e.begin)
            with open(path, "rb") as f:
                head = f.read(in_file[0].begin if in_file else path.stat().st_size)
            digest.update(head)
            with open(dst / path.name, "wb") as out:
                out.write(head)
                position = len(head)
                for entry, tensor in read_tensors(in_file):
                    if entry.begin != position:
                        raise MultiflowError(f"{path}: tensor {entry.key!r} does not follow the previous one; "
                                             "re-save the checkpoint with safetensors")
                    raw = tensor.reshape(-1).view(torch.uint8)
                    digest.update(memoryview(raw.numpy()))
                    check_finite(tensor, entry.key, entry.file)
                    p = by_key.get((entry.file, entry.key))
                    if p is not None and updated is not None:  # sparsegpt: its updated weights and mask
                        keep = updated(p.layer.name, tensor)
                    elif p is not None:
                        keep = checked_mask(tensor, p, config, stats[p.layer.name].sq_mean if stats else None,
                                            entry.file)
                    if p is not None:
                        tensor.masked_fill_(~keep, 0)
                        p.pruned = keep.numel() - int(torch.count_nonzero(keep))
                        check_zeros(raw, tensor, entry, p, config, sparsegpt=updated is not None)
                        p.written = True
                    out.write(memoryview(raw.numpy()))
                    position = entry.end
                    bar.update(entry.end - entry.begin)
    return digest.hexdigest()


def check_zeros(raw: torch.Tensor, tensor: torch.Tensor, entry, p: LayerPlan, config: PruneConfig,
                 sparsegpt: bool) -> None:
    """The zeros in the bytes about to be written, counted: at least the pruned count, and exactly it where
    no kept weight can be zero (a kept score is above a threshold >= 0, so its |W| > 0: layer or row group with
    k > 0; dead layers). N:M, k = 0 and SparseGPT can keep a weight that is zero."""
    written = raw.view(entry.dtype)
    if written.data_ptr() != tensor.data_ptr() or written.numel() != tensor.numel():
        raise MultiflowError(f"layer {p.layer.name}: the data written for {entry.key!r} is not the pruned tensor; "
                             "nothing was written")
    zeros = written.numel() - int(torch.count_nonzero(written))
    exact = p.dead or (not sparsegpt and not config.structure.is_n_m and p.k > 0)
    if zeros < p.pruned or (exact and zeros != p.pruned):
        raise MultiflowError(f"layer {p.layer.name}: {zeros} zeros in the data written for {entry.key!r}, but "
                             f"{p.pruned} weights pruned; nothing was written")
