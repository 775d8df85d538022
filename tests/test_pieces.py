"""Reading a checkpoint in pieces on several threads (storage/pieces.py): every byte once, in order, either road."""

import mmap
import os

import pytest
import torch
from safetensors.torch import save_file

import multiflow
from multiflow.errors import MultiflowError
from multiflow.storage import pieces
from multiflow.storage.checkpoint import list_tensors
from test_checkpoint import _write_unaligned


def _tensors():
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(37, 129, generator=g).half(),  # 9,546 bytes: pieces cross page boundaries
        "b": torch.randn(3, 5, generator=g).to(torch.bfloat16),
        "c": torch.randn(600, 33, generator=g),
        "d": torch.randn(1, 1, generator=g),
    }


def _joined(results):
    return torch.cat([p for p in results])


@pytest.mark.parametrize("workers", [1, 2, 3])
@pytest.mark.parametrize("piece_bytes", [4, 1000, 4096, 1 << 20])
def test_pieces_cover_each_tensor_in_order(tmp_path, workers, piece_bytes):
    expected = _tensors()
    save_file(expected, str(tmp_path / "model.safetensors"))
    entries = list_tensors(tmp_path)
    seen = []
    out = pieces.map_pieces(entries, lambda e, p: p.clone(), piece_bytes=piece_bytes, workers=workers)
    for entry, results in out:
        seen.append(entry.key)
        assert all(p.dtype == expected[entry.key].dtype and p.dim() == 1 for p in results)
        assert all(p.numel() * p.element_size() <= max(piece_bytes, p.element_size()) for p in results)
        assert torch.equal(_joined(results), expected[entry.key].reshape(-1))
    assert seen == [e.key for e in entries]


def test_tensors_at_odd_offsets_in_pieces(tmp_path):
    expected = _write_unaligned(tmp_path / "odd.safetensors")
    for entry, results in pieces.map_pieces(list_tensors(tmp_path), lambda e, p: p.clone(), piece_bytes=6):
        assert torch.equal(_joined(results).view(torch.uint8), expected[entry.key].reshape(-1).view(torch.uint8))


def test_both_roads_cached_mapped_and_read_around_the_cache(tmp_path, monkeypatch):
    """A freshly written file is in the page cache: its pieces are used in place. Without mincore (or for pages
    not cached) they are read into the worker's buffer. Both give the same bytes."""
    expected = _tensors()
    save_file(expected, str(tmp_path / "model.safetensors"))
    entries = list_tensors(tmp_path)
    if _cached(tmp_path / "model.safetensors") is None:
        pytest.skip("this system cannot tell what is in the page cache")
    roads = []
    real = pieces._Worker._map_if_cached

    def spy(self, *args):
        addr = real(self, *args)
        roads.append(addr is not None)
        return addr

    monkeypatch.setattr(pieces._Worker, "_map_if_cached", spy)
    mapped = {e.key: _joined(r) for e, r in pieces.map_pieces(entries, lambda e, p: p.clone(), piece_bytes=512)}
    assert roads and all(roads)
    monkeypatch.setattr(pieces, "_libc", lambda: None)
    roads.clear()
    read = {e.key: _joined(r) for e, r in pieces.map_pieces(entries, lambda e, p: p.clone(), piece_bytes=512)}
    assert roads and not any(roads)
    for key, tensor in expected.items():
        assert torch.equal(mapped[key], tensor.reshape(-1)) and torch.equal(read[key], tensor.reshape(-1))


def _cached(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return pieces.cached_pages(fd, 0, os.path.getsize(path))
    finally:
        os.close(fd)


def test_cached_pages_counts_a_fresh_file_and_an_evicted_one(tmp_path):
    path = tmp_path / "f.bin"
    assert mmap.PAGESIZE == 4096 or pytest.skip("page size is not 4096")
    path.write_bytes(b"x" * 40000)
    counted = _cached(path)
    if counted is None:
        pytest.skip("this system cannot tell what is in the page cache")
    assert counted == (10, 10)  # 40,000 bytes: 10 pages of 4096 (asserted below), all just written
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if _file_system(path) in ("tmpfs", "ramfs"):
        pytest.skip("a memory file system keeps its pages")
    assert _cached(path)[0] < 10


def _file_system(path):
    """The type of the file system holding path, from /proc/mounts (the longest mount point above it)."""
    best, kind = "", None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, point, fs, *_ = line.split()
                if str(path).startswith(point.rstrip("/") + "/") and len(point) > len(best):
                    best, kind = point, fs
    except OSError:
        pass
    return kind


def test_an_error_is_raised_at_its_tensor_after_the_earlier_ones(tmp_path):
    save_file(_tensors(), str(tmp_path / "model.safetensors"))
    entries = list_tensors(tmp_path)
    bad = entries[2].key

    def fn(entry, piece):
        if entry.key == bad:
            raise ValueError("bad piece")
        return piece.numel()

    got = []
    with pytest.raises(ValueError, match="bad piece"):
        for entry, results in pieces.map_pieces(entries, fn, piece_bytes=100, workers=2):
            got.append((entry.key, sum(results)))
    assert got == [(e.key, e.numel) for e in entries[:2]]


def test_pickled_entries_are_refused(tmp_path):
    torch.save({"w": torch.zeros(2, 2)}, tmp_path / "pytorch_model.bin")
    entries = list_tensors(tmp_path, allow_pickle=True)
    with pytest.raises(MultiflowError, match="cannot be read in pieces"):
        list(pieces.map_pieces(entries, lambda e, p: p))


@pytest.mark.parametrize("layout", ["hub4", "inmemory"])
def test_step1_with_tiny_pieces_equals_whole_tensors(llava, layout, monkeypatch):
    """Step 1 sums its histograms over pieces: cutting every weight into 3-element pieces, counted on 3 threads,
    changes no count (the kthvalue reference is checked for the default pieces in test_distribution.py)."""
    _, folders = llava
    targets = [0.3, 0.5, 0.9]
    whole = multiflow.compute_distributions(folders[layout], targets)
    monkeypatch.setattr(pieces, "PIECE_BYTES", 6)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    try:
        cut = multiflow.compute_distributions(folders[layout], targets)
    finally:
        torch.set_num_threads(threads)
    assert [d.to_json() for d in cut] == [d.to_json() for d in whole]
