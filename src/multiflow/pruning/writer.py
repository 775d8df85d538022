"""Step 3's output: the pruned copy, streamed from the input shards.

The output keeps the input's files, keys, dtypes and sharding: each safetensors
file is copied header first, then tensor by tensor, prunable weights zeroed by
their mask. A few tensors are held at a time (read ahead, being masked, being
written), so a 7B model never needs two copies in memory, and the folder loads
with `from_pretrained` exactly as the input did (original-layout LLaVA stays in
its own layout). The zeros written are counted.
"""

from __future__ import annotations

import hashlib
import shutil
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import torch
from tqdm.auto import tqdm

from multiflow.errors import MultiflowError
from multiflow.pruning.masking import checked_mask, zero_in_place
from multiflow.storage.checkpoint import check_finite, list_tensors, read_tensors_held

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
    """Copy every file of src into dst, zeroing pruned weights; returns sha256 of the input weight files.

    A pipeline of three threads, each in file order: a reader (`read_tensors_held`: reads ahead, hashes the
    bytes, refuses NaN/inf), this one (masks the prunable weights in the buffer read, `zero_in_place` in one
    pass where the plan allows, else `checked_mask`), and a writer (writes each buffer, then frees it for the
    reader). At most `_HELD` tensors are read ahead, being masked or waiting to be written."""
    entries = list_tensors(src)
    files = list(dict.fromkeys(e.file for e in entries))
    digest = hashlib.sha256()
    for path in sorted(src.iterdir()):
        if path.is_file() and path not in files and path.suffix not in WEIGHT_SUFFIXES:
            shutil.copyfile(path, dst / path.name)  # a new file: its mode follows the umask
    bar = tqdm(total=sum(e.end - e.begin for e in entries), unit="B", unit_scale=True,
               desc="Step 3: pruning", disable=not progress)

    # the scores of every layer in one float32 buffer: fresh memory per layer costs more in page faults than the
    # scoring itself
    workspace = torch.empty(max((p.layer.numel for p in by_key.values()), default=0), dtype=torch.float32)

    def hash_and_check(entry, tensor: torch.Tensor) -> None:  # in the reader thread, in file order
        digest.update(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))
        check_finite(tensor, entry.key, entry.file)

    with bar, _Writer(_WRITES_QUEUED) as writer:
        for path in files:
            in_file = sorted((e for e in entries if e.file == path), key=lambda e: e.begin)
            with open(path, "rb") as f:
                head = f.read(in_file[0].begin if in_file else path.stat().st_size)
            digest.update(head)
            with open(dst / path.name, "wb") as out, writer.stopped_on_error():  # no write left when out closes
                out.write(head)
                position = len(head)
                for entry, tensor, release in read_tensors_held(in_file, held=_HELD, on_read=hash_and_check):
                    try:
                        if entry.begin != position:
                            raise MultiflowError(f"{path}: tensor {entry.key!r} does not follow the previous one; "
                                                 "re-save the checkpoint with safetensors")
                        raw = tensor.reshape(-1).view(torch.uint8)
                        p = by_key.get((entry.file, entry.key))
                        if p is not None:
                            _prune_tensor(raw, tensor, entry, p, config, stats, updated, workspace)
                    except BaseException:
                        release()
                        raise
                    writer.write(out, raw, release)
                    position = entry.end
                    bar.update(entry.end - entry.begin)
                writer.drain()
    return digest.hexdigest()


_HELD = 3  # tensors out of the reader at once: one being masked, one queued for the writer, one being written
_WRITES_QUEUED = _HELD - 2


def _prune_tensor(raw: torch.Tensor, tensor: torch.Tensor, entry, p: LayerPlan, config: PruneConfig, stats,
                  updated, workspace: torch.Tensor) -> None:
    """Zero the pruned weights of one prunable tensor in place (its bytes `raw`), count and check them."""
    sq_mean = stats[p.layer.name].sq_mean if stats else None
    zeroed = None
    if updated is None:
        zeroed = zero_in_place(tensor, p, config, sq_mean, entry.file, workspace)
    if zeroed is not None:
        p.pruned = zeroed.pruned
    else:
        if updated is not None:  # sparsegpt: its updated weights and mask
            keep = updated(p.layer.name, tensor)
        else:
            keep = checked_mask(tensor, p, config, sq_mean, entry.file)
        tensor.masked_fill_(~keep, 0)
        p.pruned = keep.numel() - int(torch.count_nonzero(keep))
    check_zeros(raw, tensor, entry, p, config, sparsegpt=updated is not None,
                zeros=None if zeroed is None else zeroed.zeros)
    p.written = True


class _Writer:
    """One thread writing buffers to their files in the order given, each buffer released once written; `write`
    returns once at most `queued` writes wait behind the one under way. A write's error is raised by a later
    `write` or `drain` (or on leaving)."""

    def __init__(self, queued: int):
        self.queued = max(0, queued)
        self.pending: deque[Future] = deque()
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="multiflow-writer")

    def write(self, out, raw: torch.Tensor, release) -> None:
        while len(self.pending) > self.queued:
            self.pending.popleft().result()
        try:
            self.pending.append(self.pool.submit(_write_then_release, out, raw, release))
        except BaseException:
            release()
            raise

    def drain(self) -> None:
        while self.pending:
            self.pending.popleft().result()

    @contextmanager
    def stopped_on_error(self) -> Iterator[None]:
        """On an error inside, drop the queued writes and wait for the one under way (its error is dropped)."""
        try:
            yield
        except BaseException:
            for future in self.pending:
                future.cancel()
            for future in self.pending:
                if not future.cancelled():
                    future.exception()
            self.pending.clear()
            raise

    def __enter__(self) -> _Writer:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        try:
            if kind is None:
                self.drain()
        finally:
            self.pool.shutdown(wait=True, cancel_futures=True)


def _write_then_release(out, raw: torch.Tensor, release) -> None:
    try:
        out.write(memoryview(raw.numpy()))
    finally:
        release()


def check_zeros(raw: torch.Tensor, tensor: torch.Tensor, entry, p: LayerPlan, config: PruneConfig,
                sparsegpt: bool, zeros: int | None = None) -> None:
    """The zeros in the bytes about to be written, counted: at least the pruned count, and exactly it where
    no kept weight can be zero (a kept score is above a threshold >= 0, so its |W| > 0: layer or row group with
    k > 0; dead layers). N:M, k = 0 and SparseGPT can keep a weight that is zero. `zeros`: the count already
    taken from these very bytes (`masks.zero_at_or_below` counts them while zeroing)."""
    written = raw.view(entry.dtype)
    if written.data_ptr() != tensor.data_ptr() or written.numel() != tensor.numel():
        raise MultiflowError(f"layer {p.layer.name}: the data written for {entry.key!r} is not the pruned tensor; "
                             "nothing was written")
    if zeros is None:
        zeros = written.numel() - int(torch.count_nonzero(written))
    exact = p.dead or (not sparsegpt and not config.structure.is_n_m and p.k > 0)
    if zeros < p.pruned or (exact and zeros != p.pruned):
        raise MultiflowError(f"layer {p.layer.name}: {zeros} zeros in the data written for {entry.key!r}, but "
                             f"{p.pruned} weights pruned; nothing was written")
