"""Reading safetensors by byte range: direct and buffered reads give the same tensors."""

import json
import struct

import torch
from safetensors.torch import load_file, save_file

from multiflow.storage.checkpoint import aligned_buffer, list_tensors, read_tensor, read_tensors, span_size


def _write_unaligned(path):
    """A valid safetensors file whose tensors start at odd byte offsets."""
    tensors = {
        "a": torch.arange(3, dtype=torch.uint8),
        "b": torch.randn(5, 7).half(),
        "c": torch.randn(9, 4),
        "d": torch.randn(3, 3).to(torch.bfloat16),
    }
    names = {torch.uint8: "U8", torch.float16: "F16", torch.float32: "F32", torch.bfloat16: "BF16"}
    header, blobs, offset = {}, [], 0
    for key, t in tensors.items():
        raw = t.contiguous().view(torch.uint8).numpy().tobytes()
        header[key] = {"dtype": names[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + b"".join(blobs))
    return tensors


def test_direct_and_plain_reads_agree_at_any_offset(tmp_path):
    path = tmp_path / "odd.safetensors"
    expected = _write_unaligned(path)
    assert {k: v.shape for k, v in load_file(str(path)).items()} == {k: v.shape for k, v in expected.items()}
    for entry in list_tensors(tmp_path):
        plain = read_tensor(entry)
        direct = read_tensor(entry, aligned_buffer(span_size(entry)))
        assert torch.equal(plain.view(torch.uint8), expected[entry.key].view(torch.uint8))
        assert torch.equal(direct.view(torch.uint8), plain.view(torch.uint8))


def test_ring_reads_in_order_with_reuse(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(64 + i, 33, generator=g).half() for i in range(9)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    entries = list_tensors(tmp_path)
    seen = [(e.key, t.clone()) for e, t in read_tensors(entries, prefetch=1)]
    assert [k for k, _ in seen] == [e.key for e in entries]
    for key, t in seen:
        assert torch.equal(t, tensors[key])
