"""Work on a checkpoint's tensors in pieces, on several threads, reading each piece in place when it is cached.

A pass that only looks at each weight once (Step 1's histograms) is bound by getting the bytes to the CPU. Reading
whole tensors into buffers (`checkpoint.read_tensors`, one reader thread) copies every byte out of the page cache
before the caller reads it again. Here each tensor is cut into pieces (64 MiB), and each worker thread takes the
next piece, gets its bytes and calls `fn` on them:
- a piece whose pages are all in the page cache (`mincore`) is memory-mapped read-only and used in place, no copy
  (the mapping is populated in one call and unmapped right after `fn`, so resident memory stays at a few pieces);
- any other piece is read around the page cache with O_DIRECT into the worker's aligned buffer
  (`checkpoint._read_direct`), so a cold pass does not fill the page cache, and the workers' reads overlap.
Without mincore (not Linux) every piece is read into the buffer.

The pieces of a tensor are contiguous runs of its elements in storage order; `fn` sees each as a 1-D tensor of the
entry's dtype, valid only during the call and read-only (a write to a mapped piece crashes the process).
Results come back per tensor, in piece order, whatever the number of threads.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import threading
from typing import Callable, Iterator, TypeVar

import numpy as np
import torch

from multiflow.errors import MultiflowError
from multiflow.storage.checkpoint import _ALIGN, TensorEntry, _read_direct, aligned_buffer

R = TypeVar("R")

PIECE_BYTES = 64 << 20  # large enough for full-speed O_DIRECT reads here; measured in BENCHMARKS.md (Step 1)
_MADV_POPULATE_READ = 22  # Linux 5.14+: fill the page tables of a mapping from the page cache in one call


class _Libc:
    """mmap, munmap, mincore and madvise through ctypes (Python's mmap module has no mincore)."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        self.mmap = libc.mmap
        self.mmap.restype = ctypes.c_void_p
        self.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        self.munmap = libc.munmap
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.mincore = libc.mincore
        self.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_char_p]
        self.madvise = libc.madvise
        self.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]


def _libc() -> _Libc | None:
    try:
        return _Libc()
    except (OSError, AttributeError, TypeError):
        return None


_FAILED = ctypes.c_void_p(-1).value


def _resident(libc: _Libc, addr: int, length: int) -> tuple[int, int] | None:
    """(pages of a mapping that are in the page cache, pages in all), or None if mincore fails."""
    pages = -(-length // mmap.PAGESIZE)
    vec = ctypes.create_string_buffer(pages)
    if libc.mincore(ctypes.c_void_p(addr), length, vec) != 0:
        return None
    return int((np.frombuffer(vec.raw, np.uint8) & 1).sum()), pages


def _map(libc: _Libc, fd: int, offset: int, length: int) -> int | None:
    """Address of a read-only shared mapping of bytes [offset, offset + length) of an open file, or None."""
    addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
    return None if addr in (None, _FAILED) else addr


def cached_pages(fd: int, offset: int, length: int) -> tuple[int, int] | None:
    """(pages of bytes [offset, offset + length) of an open file in the page cache, pages in all), or None when
    this system cannot tell. `offset` must be a multiple of the page size."""
    libc = _libc()
    if libc is None or length <= 0:
        return None if libc is None else (0, 0)
    addr = _map(libc, fd, offset, length)
    if addr is None:
        return None
    try:
        return _resident(libc, addr, length)
    finally:
        libc.munmap(ctypes.c_void_p(addr), length)


class _Worker:
    """One thread's open files, mapping functions and (lazily) its aligned read buffer."""

    def __init__(self, piece_bytes: int, libc: _Libc | None) -> None:
        self.piece_bytes = piece_bytes
        self.libc = libc
        self.fds: dict[str, int] = {}
        self.buffer: torch.Tensor | None = None

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)

    def run(self, entry: TensorEntry, begin: int, end: int, fn: Callable[[TensorEntry, torch.Tensor], R]) -> R:
        """fn(entry, the elements stored in bytes [begin, end) of entry.file)."""
        a0 = begin - begin % mmap.PAGESIZE
        length = end - a0
        addr = self._map_if_cached(str(entry.file), a0, length)
        if addr is not None:
            try:
                raw = torch.from_numpy(np.ctypeslib.as_array((ctypes.c_uint8 * length).from_address(addr)))
                return fn(entry, _elements(raw[begin - a0 :], entry))
            finally:
                self.libc.munmap(ctypes.c_void_p(addr), length)
        if self.buffer is None:
            self.buffer = aligned_buffer(self.piece_bytes + 2 * _ALIGN)
        raw, got = _read_direct(entry.file, begin, end, self.buffer, cached_first=self.libc is None)
        if got < end - begin:
            raise MultiflowError(f"{entry.file} is truncated while reading {entry.key!r}")
        return fn(entry, _elements(raw[: end - begin], entry))

    def _map_if_cached(self, path: str, offset: int, length: int) -> int | None:
        """Address of a populated read-only mapping of the bytes when the page cache holds all of them, else None."""
        if self.libc is None:
            return None
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = os.open(path, os.O_RDONLY)
        addr = _map(self.libc, fd, offset, length)
        if addr is None:
            return None
        resident = _resident(self.libc, addr, length)
        if resident is None or resident[0] < resident[1]:
            self.libc.munmap(ctypes.c_void_p(addr), length)
            return None
        self.libc.madvise(ctypes.c_void_p(addr), length, _MADV_POPULATE_READ)  # refused on old kernels: faults then
        return addr


def _elements(raw: torch.Tensor, entry: TensorEntry) -> torch.Tensor:
    if raw.data_ptr() % entry.dtype.itemsize:  # an unaligned element start: torch cannot view it in place
        raw = raw.clone()
    return raw.view(entry.dtype)


def map_pieces(entries: list[TensorEntry], fn: Callable[[TensorEntry, torch.Tensor], R],
               piece_bytes: int | None = None, workers: int | None = None,
               ) -> Iterator[tuple[TensorEntry, list[R]]]:
    """Yield (entry, [fn(entry, piece) for each piece of its tensor, in order]) for each entry, in order.

    Safetensors entries only (a byte range in a file). Pieces are `piece_bytes` long (default PIECE_BYTES),
    the last of each tensor shorter. `workers` threads (default torch.get_num_threads()) take
    the pieces in order; `fn` runs in them, so it should release the GIL for its heavy part (numba's nogil
    kernels, torch operations). An error in `fn` or in a read is raised here, at its entry; the other workers stop.
    """
    for entry in entries:
        if entry.begin is None or not isinstance(entry.dtype, torch.dtype):
            raise MultiflowError(f"{entry.file}: tensor {entry.key!r} cannot be read in pieces (not a safetensors "
                                 "tensor of a dtype torch holds)")
    workers = max(1, workers or torch.get_num_threads())
    piece_bytes = piece_bytes or PIECE_BYTES
    jobs = []  # (entry index, piece index, begin, end)
    counts = []
    for i, entry in enumerate(entries):
        step = max(entry.dtype.itemsize, piece_bytes - piece_bytes % entry.dtype.itemsize)
        starts = range(entry.begin, entry.end, step)
        counts.append(len(starts))
        jobs += [(i, j, b, min(entry.end, b + step)) for j, b in enumerate(starts)]
    results: list[list | None] = [[None] * n for n in counts]
    left = list(counts)
    errors: dict[int, BaseException] = {}
    state = threading.Condition()
    position = [0]
    libc = _libc()

    def work() -> None:
        worker = _Worker(piece_bytes, libc)
        try:
            while True:
                with state:
                    if errors or position[0] >= len(jobs):
                        return
                    i, j, begin, end = jobs[position[0]]
                    position[0] += 1
                try:
                    result = worker.run(entries[i], begin, end, fn)
                except BaseException as exc:  # handed to the consumer, raised there
                    with state:
                        errors.setdefault(i, exc)
                        state.notify_all()
                    return
                with state:
                    results[i][j] = result
                    left[i] -= 1
                    state.notify_all()
        finally:
            worker.close()

    threads = [threading.Thread(target=work, name=f"multiflow-piece-{k}", daemon=True) for k in range(workers)]
    for thread in threads:
        thread.start()
    try:
        for i, entry in enumerate(entries):
            with state:
                state.wait_for(lambda: left[i] == 0 or any(k <= i for k in errors))
                if left[i]:
                    raise errors[min(errors)]
                done, results[i] = results[i], None
            yield entry, done
    finally:
        with state:
            errors.setdefault(len(entries), StopIteration())  # tells the workers to stop taking pieces
            state.notify_all()
        for thread in threads:
            thread.join()
