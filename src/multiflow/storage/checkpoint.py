"""Read a checkpoint folder tensor by tensor, without building the model.

safetensors files are opened by their header (an 8-byte length, then JSON with
each tensor's dtype, shape and byte range, per the format's specification) and
each wanted tensor is read without a memory map: `read_tensors` reads into a
ring of reused, page-aligned buffers with `preadv` (the page-cached part with
RWF_NOWAIT, the rest with O_DIRECT, so a cold read does not fill the page
cache), and a background thread reads the next tensors while the caller works
on the current one; without O_DIRECT, a plain read into fresh memory. This
keeps resident memory at a few tensors whatever the model size (a memory map
would count every touched page).

Pickled weights (`.bin`, `.pt`) are refused unless the caller allows them; then
they are loaded with `torch.load(weights_only=True)`.
"""

from __future__ import annotations

import functools
import hashlib
import json
import mmap
import os
import pickle
import queue
import re
import struct
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from multiflow.errors import MultiflowError

_SAFETENSORS_DTYPES = {
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 * 1024 * 1024
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a checkpoint: its key, dtype, shape and how to read it."""

    key: str
    dtype: torch.dtype | str  # a str names a dtype torch cannot hold here
    shape: tuple[int, ...]
    file: Path
    begin: int | None = None  # byte range for safetensors; None for pickled
    end: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def read_config(folder: Path) -> dict[str, Any]:
    folder = Path(folder)
    if folder.is_file() and folder.suffix.lower() == ".gguf":
        raise MultiflowError(f"{folder} is a GGUF file: convert it once with 'multiflow convert-gguf {folder} "
                             "--output DIR' and pass --model DIR")
    if not folder.is_dir():
        raise MultiflowError(f"model folder {folder} does not exist or is not a folder")
    path = folder / "config.json"
    if not path.is_file():
        raise MultiflowError(f"{folder} has no config.json: point --model at a checkpoint folder")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MultiflowError(f"{path} is not valid JSON: {exc}") from exc
    if not isinstance(config, dict):
        raise MultiflowError(f"{path} does not hold a JSON object")
    return config


def safetensors_header(path: Path) -> list[TensorEntry]:
    """Parse and check a safetensors header; every error names the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise MultiflowError(f"{path} is truncated (no safetensors header)")
            (length,) = struct.unpack("<Q", raw)
            if length > min(_MAX_HEADER, size - 8):
                raise MultiflowError(f"{path} is truncated or not a safetensors file (header length {length})")
            header = json.loads(f.read(length))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise MultiflowError(f"{path} is corrupt: its safetensors header is not valid JSON") from exc
    except OSError as exc:
        raise MultiflowError(f"cannot read {path}: {exc.strerror}") from exc
    data_start = 8 + length
    if not isinstance(header, dict):
        raise MultiflowError(f"{path} is corrupt: its safetensors header is not a JSON object")
    entries = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype_name, shape = info["dtype"], tuple(int(d) for d in info["shape"])
            begin, end = (int(x) for x in info["data_offsets"])
            if any(d < 0 for d in shape):
                raise ValueError
        except (KeyError, TypeError, ValueError) as exc:
            raise MultiflowError(f"{path} is corrupt: bad header entry for {key!r}") from exc
        dtype = _SAFETENSORS_DTYPES.get(dtype_name, dtype_name)
        entry = TensorEntry(key, dtype, shape, path, data_start + begin, data_start + end)
        itemsize = dtype.itemsize if isinstance(dtype, torch.dtype) else None
        if itemsize is not None and end - begin != entry.numel * itemsize:
            raise MultiflowError(f"{path} is corrupt: {key!r} has {end - begin} bytes for shape {list(shape)}")
        if entry.end > size:
            raise MultiflowError(
                f"{path} is truncated: {key!r} ends at byte {entry.end} but the file has {size} bytes"
            )
        entries.append(entry)
    _check_layout(path, entries, data_start, size)
    return entries


def _check_layout(path: Path, entries: list[TensorEntry], data_start: int, size: int) -> None:
    """The tensors tile the data section exactly, as the safetensors library requires: no overlap
    (two tensors sharing bytes), no hole, nothing outside it or after the last tensor."""
    position, previous = data_start, None
    for entry in sorted(entries, key=lambda e: (e.begin, e.end)):
        if entry.begin < data_start or entry.end < entry.begin:
            raise MultiflowError(f"{path} is corrupt: tensor {entry.key!r} has byte range "
                                 f"{entry.begin - data_start}..{entry.end - data_start}, outside its data section")
        if entry.begin < position:
            raise MultiflowError(f"{path} is corrupt: tensor {entry.key!r} overlaps {previous!r} in the file "
                                 "(they share bytes); re-save the checkpoint with safetensors")
        if entry.begin > position:
            raise MultiflowError(f"{path} is corrupt: {entry.begin - position} unused bytes before tensor "
                                 f"{entry.key!r}; re-save the checkpoint with safetensors")
        position, previous = entry.end, entry.key
    if position != size:
        raise MultiflowError(f"{path} is corrupt: {size - position} bytes after its last tensor; re-save the "
                             "checkpoint with safetensors")


def check_finite(tensor: torch.Tensor, key: str, file: Path | str) -> None:
    """Refuse a floating-point tensor holding NaN or inf (other dtypes pass), naming it and its file.

    One min/max reduction (NaN propagates through it): no temporary the size of the tensor."""
    if not tensor.is_floating_point() or tensor.device.type == "meta" or not tensor.numel():
        return
    low, high = torch.aminmax(tensor.reshape(-1))
    if not (bool(torch.isfinite(low)) and bool(torch.isfinite(high))):
        raise MultiflowError(f"tensor {key!r} of {file} holds NaN or inf values; fix or re-download the "
                             "checkpoint (a pruned copy or statistics from it would be wrong)")


class PickledWeights(MultiflowError):
    """A checkpoint folder with only pickled weights, refused because loading was not allowed."""

    def __init__(self, folder: Path, file: Path):
        self.folder, self.file = folder, file
        super().__init__(f"{folder} holds only pickled weights ({file.name}); pickles can run code when loaded. "
                         "Convert them to safetensors, or pass --allow-pickle to load them with "
                         "torch.load(weights_only=True)")

    def without_flag(self, command: str) -> MultiflowError:
        """The refusal for a command that has no --allow-pickle."""
        return MultiflowError(f"{self.folder} holds only pickled weights ({self.file.name}); multiflow {command} "
                              "reads safetensors only: convert them first (transformers: save_pretrained(..., "
                              "safe_serialization=True))")


def list_tensors(folder: Path, allow_pickle: bool = False) -> list[TensorEntry]:
    """Every tensor of the checkpoint in `folder`, in file order."""
    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        except (OSError, json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as exc:
            raise MultiflowError(f"{index} is not a valid safetensors index (needs 'weight_map')") from exc
        files = list(dict.fromkeys(weight_map.values()))
        missing = [name for name in files if not (folder / name).is_file()]
        if missing:
            raise MultiflowError(f"{index} names shard files that are missing: {', '.join(missing)}")
        entries = [e for name in files for e in safetensors_header(folder / name)]
        absent = sorted(set(weight_map) - {e.key for e in entries})
        if absent:
            raise MultiflowError(f"{index} lists {len(absent)} tensors not found in the shards, e.g. {absent[0]}")
        return entries
    files = sorted(folder.glob("*.safetensors"))
    if files:
        return [e for path in files for e in safetensors_header(path)]
    pickled = sorted(p for p in folder.iterdir() if p.suffix in _PICKLE_SUFFIXES and p.is_file())
    if pickled:
        if not allow_pickle:
            raise PickledWeights(folder, pickled[0])
        return [e for path in pickled for e in _pickle_entries(path)]
    raise MultiflowError(f"{folder} has no weights (*.safetensors, or pickled *.bin with --allow-pickle)")


def _refusal(message: str) -> str:
    """torch's reason for refusing a pickle, without its multi-line advice to drop weights_only."""
    found = re.search(r"GLOBAL ([\w.]+)", message)
    if found:
        return f"it references {found.group(1)}"
    advice = ("Weights only load failed", "Please file an issue", "Check the documentation", "(1)", "(2)")
    lines = [line.strip() for line in message.splitlines()]
    reason = next((line for line in lines if line and not line.startswith(advice)), "unsupported content")
    return reason.removeprefix("WeightsUnpickler error:").strip().rstrip(".")


@functools.lru_cache(maxsize=1)
def _load_pickle(path: Path) -> dict[str, torch.Tensor]:
    try:
        with warnings.catch_warnings():  # torch's multi-line notes on pickle protocols; failures are reported below
            warnings.simplefilter("ignore")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError:  # legacy (non-zip) pickles cannot be memory-mapped
                state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:  # weights_only met something other than tensors: it could run code
        why = _refusal(str(exc))
        raise MultiflowError(f"{path}: refused by weights_only loading ({why}): not a plain tensor pickle, it could "
                             "run code when unpickled; do not load it, get these weights as safetensors from a "
                             "trusted source") from None
    except Exception as exc:  # torch raises many types for a bad pickle
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise MultiflowError(f"cannot load {path} with torch.load(weights_only=True): {reason}") from None
    if not isinstance(state, dict):
        raise MultiflowError(f"{path} does not hold a state dict")
    return {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}


def _pickle_entries(path: Path) -> list[TensorEntry]:
    return [TensorEntry(k, v.dtype, tuple(v.shape), path) for k, v in _load_pickle(path).items()]


_ALIGN = 4096  # O_DIRECT needs block-aligned offsets, lengths and addresses
_O_DIRECT = getattr(os, "O_DIRECT", 0)
_RWF_NOWAIT = getattr(os, "RWF_NOWAIT", None)


def aligned_buffer(size: int) -> torch.Tensor:
    """Page-aligned uint8 memory (anonymous mmap), usable for O_DIRECT reads."""
    return torch.frombuffer(mmap.mmap(-1, max(size, 1)), dtype=torch.uint8)


def _read_into(fd: int, view: memoryview, offset: int, flags: int = 0) -> int:
    """preadv until view is full or EOF; returns bytes read."""
    got = 0
    while got < len(view):
        n = os.preadv(fd, [view[got:]], offset + got, flags) if flags else os.preadv(fd, [view[got:]], offset + got)
        if n <= 0:
            break
        got += n
    return got


def _read_direct(path: Path, begin: int, end: int, buffer: torch.Tensor, cached_first: bool = True,
                 ) -> tuple[torch.Tensor, int]:
    """Read bytes [begin, end) into an aligned buffer: the page-cached part with
    RWF_NOWAIT (unless `cached_first` is False: the caller knows it is not all
    cached), the rest with O_DIRECT (no page-cache fill: on a cold cache this
    costs a fraction of the CPU of buffered reads). Returns (span, bytes valid)."""
    a0 = begin - begin % _ALIGN
    a1 = -(-end // _ALIGN) * _ALIGN
    span = buffer[: a1 - a0]
    view = memoryview(span.numpy())
    need = end - a0
    got = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        try:
            got = os.preadv(fd, [view], a0, _RWF_NOWAIT) if cached_first else 0
        except OSError:  # nothing cached (EAGAIN), or the flag is unsupported here
            got = 0
        if got < need:
            start = got - got % _ALIGN
            try:
                direct = os.open(path, os.O_RDONLY | _O_DIRECT)
            except OSError:  # file system without O_DIRECT (e.g. tmpfs)
                got = start + _read_into(fd, view[start:need], a0 + start)
            else:
                try:
                    got = start + _read_into(direct, view[start:], a0 + start)
                except OSError:  # O_DIRECT refused at read time
                    got = start + _read_into(fd, view[start:need], a0 + start)
                finally:
                    os.close(direct)
    finally:
        os.close(fd)
    return span[begin - a0 :], got - (begin - a0)


def read_tensor(entry: TensorEntry, buffer: torch.Tensor | None = None) -> torch.Tensor:
    """Read one tensor without a memory map.

    With `buffer` (from `aligned_buffer`, at least span_size(entry) bytes) the
    read bypasses the page cache for what is not cached yet; without it, a plain
    read into fresh memory.
    """
    if not isinstance(entry.dtype, torch.dtype):
        raise MultiflowError(f"{entry.file}: tensor {entry.key!r} has dtype {entry.dtype}, which torch cannot read")
    if entry.begin is None:
        return _load_pickle(entry.file)[entry.key].clone()
    size = entry.end - entry.begin
    if buffer is not None and _O_DIRECT and _RWF_NOWAIT is not None:
        raw, got = _read_direct(entry.file, entry.begin, entry.end, buffer)
        raw = raw[:size]
        if entry.begin % entry.dtype.itemsize:  # unaligned element start: torch cannot view it in place
            raw = raw.clone()
    else:
        raw = torch.empty(size, dtype=torch.uint8)
        with open(entry.file, "rb", buffering=0) as f:
            got = _read_into(f.fileno(), memoryview(raw.numpy()), entry.begin)
    if got < size:
        raise MultiflowError(f"{entry.file} is truncated while reading {entry.key!r}")
    return raw.view(entry.dtype).reshape(entry.shape)


def span_size(entry: TensorEntry) -> int:
    """Bytes an aligned read of this tensor needs."""
    return 0 if entry.begin is None else entry.end - entry.begin + 2 * _ALIGN


def read_tensors(entries: list[TensorEntry], prefetch: int = 2) -> Iterator[tuple[TensorEntry, torch.Tensor]]:
    """Yield (entry, tensor) in order while a thread reads up to `prefetch` ahead.

    Reading releases the GIL, so disk I/O overlaps with the caller's work.
    Tensors live in a ring of prefetch + 2 reused, page-aligned buffers (fresh
    memory for every tensor costs more in page faults than the read itself),
    read around the page cache where it does not hold them (see
    `_read_direct`), so a yielded tensor is valid only until the next one is
    requested: clone it to keep it. (`read_tensors_held`, each tensor released
    when the next is requested.)
    An error in the reader is raised here, in order.
    """
    release = None
    for entry, tensor, release_next in read_tensors_held(entries, held=2, prefetch=prefetch):
        if release is not None:
            release()
        release = release_next
        yield entry, tensor


def read_tensors_held(entries: list[TensorEntry], held: int = 4, prefetch: int = 2,
                      on_read: Callable[[TensorEntry, torch.Tensor], None] | None = None,
                      ) -> Iterator[tuple[TensorEntry, torch.Tensor, Callable[[], None]]]:
    """`read_tensors` for a pipeline: yield (entry, tensor, release) in order; the tensor stays valid until
    `release()` is called (from any thread, once), so a writer thread can still be writing it while later
    tensors are read and worked on.

    A thread reads ahead into `held + prefetch` page-aligned buffers (as `read_tensors`), each reused once
    released; when all are out it waits. `on_read(entry, tensor)` runs in that thread right after each read, in
    order (hashing the bytes, checking them): its error is raised here, in order, as a read error is.
    Release every tensor taken, or memory stays at the buffers' size until the generator is closed."""
    count = max(2, held + max(1, prefetch))
    largest = max((span_size(e) for e in entries), default=0)
    ring = [aligned_buffer(largest) for _ in range(count)] if largest else []
    free: queue.Queue = queue.Queue()
    for i in range(count):
        free.put(i)
    slots: queue.Queue = queue.Queue(maxsize=max(1, prefetch))
    stop = threading.Event()

    def wait(get):
        while not stop.is_set():
            try:
                return get()
            except (queue.Empty, queue.Full):
                continue
        return None

    def work() -> None:
        for entry in entries:
            slot = wait(lambda: free.get(timeout=0.1))
            if slot is None:
                return
            try:
                tensor = read_tensor(entry, ring[slot] if ring else None)
                if on_read is not None:
                    on_read(entry, tensor)
                item = (entry, tensor, functools.partial(free.put, slot), None)
            except BaseException as exc:  # handed to the consumer, raised there
                item = (entry, None, None, exc)
            wait(lambda: slots.put(item, timeout=0.1))
            if item[3] is not None:
                return

    thread = threading.Thread(target=work, name="multiflow-reader", daemon=True)
    thread.start()
    try:
        for _ in entries:
            entry, tensor, release, exc = slots.get()
            if exc is not None:
                raise exc
            yield entry, tensor, release
    finally:
        stop.set()
        thread.join()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
