"""Step 3's streamed copy (pruning/writer.py): the pipelined writer (reader thread, one-pass threshold, writer
thread) writes exactly the bytes of the plain path (checked_mask + masked_fill_, written in order), pinned by
sha256s recorded with the code before the pipeline (commit 02daca3), and the held-buffer reader hands out every
tensor intact while later ones are read."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import multiflow
from multiflow.storage.stats_file import LayerStats, save_stats

pytestmark = pytest.mark.e2e

V, T, INTER, VOCAB = 32, 48, 64, 40  # vision width, text width, MLP width, vocabulary


def _shapes() -> dict[str, tuple[int, ...]]:
    v, t = "vision_tower.vision_model.", "language_model.model."
    shapes = {v + "embeddings.class_embedding": (V,), v + "embeddings.patch_embedding.weight": (V, 3, 8, 8),
              v + "embeddings.position_embedding.weight": (5, V), v + "pre_layrnorm.weight": (V,),
              v + "pre_layrnorm.bias": (V,), v + "post_layernorm.weight": (V,), v + "post_layernorm.bias": (V,),
              "multi_modal_projector.linear_1.weight": (T, V), "multi_modal_projector.linear_1.bias": (T,),
              "multi_modal_projector.linear_2.weight": (T, T), "multi_modal_projector.linear_2.bias": (T,),
              t + "embed_tokens.weight": (VOCAB, T), t + "norm.weight": (T,), "language_model.lm_head.weight": (VOCAB, T)}
    for i in range(2):
        p = f"{v}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            shapes[p + f"self_attn.{proj}.weight"], shapes[p + f"self_attn.{proj}.bias"] = (V, V), (V,)
        shapes.update({p + "mlp.fc1.weight": (INTER, V), p + "mlp.fc1.bias": (INTER,), p + "mlp.fc2.weight": (V, INTER),
                       p + "mlp.fc2.bias": (V,), p + "layer_norm1.weight": (V,), p + "layer_norm1.bias": (V,),
                       p + "layer_norm2.weight": (V,), p + "layer_norm2.bias": (V,)})
        p = f"{t}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            shapes[p + f"self_attn.{proj}.weight"] = (T, T)
        shapes.update({p + "mlp.gate_proj.weight": (INTER, T), p + "mlp.up_proj.weight": (INTER, T),
                       p + "mlp.down_proj.weight": (T, INTER), p + "input_layernorm.weight": (T,),
                       p + "post_attention_layernorm.weight": (T,)})
    return shapes


def _config() -> dict:
    return {"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"], "image_token_index": 39,
            "vision_config": {"model_type": "clip_vision_model", "hidden_size": V, "intermediate_size": INTER,
                              "num_hidden_layers": 2, "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
            "text_config": {"model_type": "llama", "hidden_size": T, "intermediate_size": INTER,
                            "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
                            "vocab_size": VOCAB}}


def make_checkpoint(folder: Path, dtype: torch.dtype) -> Path:
    """Two shards of seeded normal weights (not transformers' initialisation), every fifth tensor rounded to
    a coarse grid so that many scores tie with the k-th smallest."""
    g = torch.Generator().manual_seed(7)
    tensors = {}
    for i, (key, shape) in enumerate(sorted(_shapes().items())):
        w = torch.randn(shape, generator=g) * (0.02 + 0.01 * (i % 7))
        tensors[key] = ((w * 50).round() / 50 if i % 5 == 0 else w).to(dtype)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(_config()))
    keys = sorted(tensors)
    weight_map = {}
    for s in range(2):
        name = f"model-{s + 1:05d}-of-00002.safetensors"
        save_file({k: tensors[k] for k in keys[s::2]}, str(folder / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in keys[s::2]})
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return folder


def make_stats(folder: Path, path: Path) -> Path:
    from multiflow.models import inventory

    g = torch.Generator().manual_seed(3)
    layers = inventory.from_checkpoint(folder).layers
    return save_stats(path, {l.name: LayerStats(torch.rand(l.shape[1], generator=g) + 0.01, 100) for l in layers},
                      {"data": "synthetic"})


def shard_sha256(folder: Path) -> list[str]:
    return [hashlib.sha256(p.read_bytes()).hexdigest()[:16] for p in sorted(folder.glob("*.safetensors"))]


# sha256 (first 16 hex digits) of the two output shards, recorded with the code before the pipeline (02daca3)
RECORDED = {
    ("float16", "multiflow", "layer"): ["1e16a5e034d0f8ae", "3d20e2f626578762"],
    ("float16", "multiflow", "row"): ["ea845133bda2ac28", "9fe6f6e142851b64"],
    ("float16", "magnitude", "layer"): ["48d26539ee101b11", "be7362a760507ed9"],
    ("float16", "magnitude", "row"): ["13cb99c65bcd37f6", "4a53723a1e378201"],
    ("float16", "wanda", "layer"): ["a18ba508117ed1ce", "a217ae12e0aa0493"],
    ("float16", "wanda", "row"): ["87fdde34f77f33d5", "bc89232e56a51e90"],
    ("float16", "ria", "layer"): ["0d645a6c1ec31fb0", "4a291dfe6f23f2d9"],
    ("float16", "ria", "row"): ["0af52277b72402cc", "f5a9789fa327b335"],
    ("bfloat16", "multiflow", "layer"): ["b1bf844380a2e4c3", "f14672e19ecdd22d"],
    ("bfloat16", "multiflow", "row"): ["7311b2780e25d560", "3470244005de5b26"],
    ("bfloat16", "magnitude", "layer"): ["f1f949e583455608", "fcaf940bbbae19b8"],
    ("bfloat16", "magnitude", "row"): ["824503b06025bc67", "78f417c32d2389a0"],
    ("bfloat16", "wanda", "layer"): ["5538c24dbf7c9532", "113daca83aa953a7"],
    ("bfloat16", "wanda", "row"): ["72bb3416c4240c2a", "edca4bbb5c04c62c"],
    ("bfloat16", "ria", "layer"): ["d72992aa48d0035d", "d4db8422967c77c1"],
    ("bfloat16", "ria", "row"): ["feea7bb2c2c42911", "9372df2f8041ae67"],
    ("float32", "multiflow", "layer"): ["0f6ef1c01b35e346", "92009139b4f42ece"],
    ("float32", "multiflow", "row"): ["641568a9b13cc9fe", "122c45f469514494"],
    ("float32", "magnitude", "layer"): ["1b352cbe38ce8967", "28d7d4f33489db05"],
    ("float32", "magnitude", "row"): ["83fdb8bebd7d387e", "b112bd5e88f69f90"],
    ("float32", "wanda", "layer"): ["9ccc399ae19bd0f9", "651464e75a1a879c"],
    ("float32", "wanda", "row"): ["29e58b9ccbb35046", "43545ddd89156ceb"],
    ("float32", "ria", "layer"): ["5735a3d544034b71", "6b0c68bba741ba18"],
    ("float32", "ria", "row"): ["c601dd3fa383557a", "53b942b67b402f16"],
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("streamed")
    out = {}
    for dtype in (torch.float16, torch.bfloat16, torch.float32):
        name = str(dtype).removeprefix("torch.")
        folder = make_checkpoint(root / name, dtype)
        out[name] = folder, make_stats(folder, root / f"{name}-stats.safetensors")
    return out


def _prune(folder: Path, stats: Path, out: Path, method: str, group: str) -> dict:
    return multiflow.prune(folder, out, 0.5, method=method, group=group,
                           stats=None if method == "magnitude" else stats, progress=False, deterministic_report=True)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32"])
def test_pruned_bytes_are_those_recorded_before_the_pipeline(checkpoints, tmp_path, dtype):
    """Every method and group, three dtypes: the output shards hash as the pre-pipeline code's did, and the
    report's input_sha256 is the sha256 of the input shards' bytes in index order."""
    folder, stats = checkpoints[dtype]
    whole = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(folder.glob("*.safetensors")))).hexdigest()
    for (d, method, group), want in RECORDED.items():
        if d == dtype:
            report = _prune(folder, stats, tmp_path / f"{method}-{group}", method, group)
            assert shard_sha256(tmp_path / f"{method}-{group}") == want, (method, group)
            assert report["input_sha256"] == whole


def test_one_pass_zeroing_equals_checked_mask_and_masked_fill(checkpoints, tmp_path, monkeypatch):
    """The layer group's one-pass path (used for every layer here) against the plain path forced everywhere:
    the same files bit for bit and the same report."""
    from multiflow.pruning import writer

    calls = []
    real = writer.zero_in_place
    monkeypatch.setattr(writer, "zero_in_place", lambda *a, **k: calls.append(1) or real(*a, **k))
    folder, stats = checkpoints["float16"]
    fast = _prune(folder, stats, tmp_path / "fast", "multiflow", "layer")
    layers = len(fast["layers"])
    assert len(calls) == layers
    monkeypatch.setattr(writer, "zero_in_place", lambda *a, **k: None)
    plain = _prune(folder, stats, tmp_path / "plain", "multiflow", "layer")
    assert shard_sha256(tmp_path / "fast") == shard_sha256(tmp_path / "plain")
    assert fast == plain


@pytest.mark.unit
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_zero_at_or_below_is_masked_fill_of_the_layer_mask(dtype, monkeypatch):
    """Over 2^20 scores (the histogram k-th value), many ties, negative zeros: the same bits as
    masked_fill_(~layer_mask), the counts right; the torch fallback (no numba kernel) agrees."""
    from multiflow.pruning import masks

    g = torch.Generator().manual_seed(0)
    weight = ((torch.randn(1100, 1000, generator=g) * 8).round() / 8).to(dtype)  # ties everywhere
    weight.view(-1)[::97] = -0.0
    score = weight.float().abs()
    for k in (1, 300_000, 550_000, weight.numel() - 1):
        t = masks.kth_smallest(score, k)
        keep = masks.layer_mask(score, k)
        want = weight.clone().masked_fill_(~keep, 0)
        for kernel in (masks._zero_kernel, None):
            monkeypatch.setattr(masks, "_zero_kernel", kernel)
            got = weight.clone()
            zeroed = masks.zero_at_or_below(got, score, t)
            bits = torch.int32 if dtype == torch.float32 else torch.int16
            assert torch.equal(got.view(bits), want.view(bits)), (k, kernel)
            pruned = int((~keep).sum())
            assert zeroed == masks.Zeroed(pruned, int((score < t).sum()), 0, int((want == 0).sum()))
            assert masks.threshold_violation(zeroed, k) is None and pruned >= k


@pytest.mark.unit
def test_threshold_violation_from_hand_counts():
    from multiflow.pruning import masks

    score = torch.tensor([[0.1, 0.2, 0.2, 0.3]])
    for t, k, expected in ((0.2, 2, None), (0.2, 3, None), (0.3, 2, "more than the k = 2 lowest"),
                           (0.1, 2, "1 weights pruned, fewer than k = 2")):
        zeroed = masks.zero_at_or_below(torch.ones(1, 4), score, t)
        why = masks.threshold_violation(zeroed, k)
        assert why is None if expected is None else expected in why, (t, k, why)
    nan = torch.tensor([[0.1, float("nan"), 0.2, float("inf")]])
    zeroed = masks.zero_at_or_below(torch.ones(1, 4), nan, 0.1)
    assert zeroed.nonfinite == 2 and "NaN or inf" in masks.threshold_violation(zeroed, 1)


@pytest.mark.unit
def test_held_tensors_stay_intact_until_released(checkpoints):
    """Three tensors held while the reader reads on into the fourth buffer; on_read sees every tensor in order;
    an error in on_read is raised at that tensor, after the ones before it."""
    from safetensors.torch import load_file

    from multiflow.storage.checkpoint import list_tensors, read_tensors_held

    folder, _ = checkpoints["float16"]
    entries = list_tensors(folder)
    want = {k: v for p in folder.glob("*.safetensors") for k, v in load_file(str(p)).items()}
    seen, held = [], []
    for entry, tensor, release in read_tensors_held(entries, held=3, prefetch=1,
                                                    on_read=lambda e, t: seen.append(e.key)):
        held.append((entry, tensor, release))
        if len(held) == 3:
            for e, t, r in held:
                assert torch.equal(t, want[e.key]), e.key
            held.pop(0)[2]()
    assert seen == [e.key for e in entries]

    def refuse_fifth(entry, tensor):
        if entry is entries[4]:
            raise ValueError("fifth")

    got = []
    with pytest.raises(ValueError, match="fifth"):
        for entry, tensor, release in read_tensors_held(entries, held=2, on_read=refuse_fifth):
            got.append(entry.key)
            release()
    assert got == [e.key for e in entries[:4]]


def test_a_failed_write_leaves_nothing(checkpoints, tmp_path, monkeypatch):
    """The writer thread's error (a full disk on the third tensor) ends the run: one-line error, no output, no
    temporary folder."""
    import errno

    from multiflow.errors import MultiflowError
    from multiflow.pruning import writer

    real, calls = writer._write_then_release, []

    def full(out, raw, release):
        calls.append(1)
        if len(calls) == 3:
            release()
            raise OSError(errno.ENOSPC, "No space left on device")
        real(out, raw, release)

    monkeypatch.setattr(writer, "_write_then_release", full)
    folder, stats = checkpoints["float16"]
    with pytest.raises(MultiflowError, match="No space left on device"):
        _prune(folder, stats, tmp_path / "out", "multiflow", "layer")
    assert list(tmp_path.iterdir()) == []


def test_step_1_runs_once_in_run_and_never_with_a_distribution(checkpoints, tmp_path, monkeypatch, demo, jsonl):
    """prune with --distribution reads Step 1's file (distribute is never called); run computes it once."""
    from multiflow.distribution import distribute as distribute_mod
    from multiflow.pruning import plan as plan_mod

    folder, stats = checkpoints["float16"]
    dist = multiflow.compute_distribution(folder, 0.5, progress=False)
    dist.save(tmp_path / "dist.json")
    calls = []
    real = distribute_mod.distribute
    monkeypatch.setattr(plan_mod, "distribute", lambda *a, **k: calls.append(1) or real(*a, **k))
    multiflow.prune(folder, tmp_path / "given", distribution=tmp_path / "dist.json", stats=stats, progress=False)
    assert calls == []
    multiflow.prune(folder, tmp_path / "computed", 0.5, stats=stats, progress=False)
    assert calls == [1]
    assert shard_sha256(tmp_path / "given") == shard_sha256(tmp_path / "computed")
    demo_folder = demo[0]
    for sequential in (False, True):
        calls.clear()
        multiflow.run(demo_folder, tmp_path / f"run-{sequential}", 0.5, data=jsonl, nsamples=2, sequential=sequential,
                      method="multiflow")
        assert calls == [1], sequential


@pytest.mark.unit
def test_the_numba_passes_give_the_same_on_any_number_of_slices(monkeypatch):
    """kth_smallest, zero_at_or_below and Step 1's histograms cut their passes into one slice per thread: 1, 2 or
    3 slices (odd sizes) give the same k-th value, the same bits, the same counts and the same histograms."""
    from multiflow.distribution import selection
    from multiflow.pruning import masks

    g = torch.Generator().manual_seed(1)
    weight = ((torch.randn(1201, 997, generator=g) * 8).round() / 8).to(torch.bfloat16)
    score = weight.float().abs()
    monkeypatch.setattr(selection, "_SLICE", 1 << 18)
    space = selection.KEY_SPACES[torch.bfloat16]
    unsliced = selection.coarse_histogram(weight, space, use_numba=False)
    results = []
    for threads in (1, 2, 3):
        monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
        assert torch.equal(selection.coarse_histogram(weight, space), unsliced), threads
        got = weight.clone()
        t = masks.kth_smallest(score, 400_000)
        results.append((float(t), masks.zero_at_or_below(got, score, t), got.view(torch.int16)))
    assert results[0][0] == float(torch.kthvalue(score.reshape(-1), 400_000).values)
    for t, zeroed, bits in results[1:]:
        assert t == results[0][0] and zeroed == results[0][1] and torch.equal(bits, results[0][2])
    assert results[0][1].pruned >= 400_000 > results[0][1].below
