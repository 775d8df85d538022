"""Block-by-block calibration: the same statistics as the whole model, one block in memory, sequential mode."""

import threading

import pytest
import torch

import multiflow
from multiflow.calibration.block_runner import find_blocks, input_embeddings_block, run_blocks
from multiflow.calibration.calibrate import CalibrationConfig, calibrate
from multiflow.calibration.data import load_samples
from multiflow.calibration.statistics import collect_statistics
from multiflow.errors import MultiflowError
from multiflow.models.inventory import from_checkpoint
from multiflow.models.loading import load_model
from multiflow.models.prompts import build_prompt
from multiflow.pruning.config import PruneConfig
from multiflow.pruning.masking import masker_for
from multiflow.storage.stats_file import load_stats


def assert_same_stats(got, want):
    assert set(got) == set(want)
    for name, st in want.items():
        assert got[name].tokens == st.tokens, name
        assert torch.equal(got[name].sq_mean, st.sq_mean), name
        assert set(got[name].by_type) == set(st.by_type), name
        for kind, (mean, tokens) in st.by_type.items():
            assert got[name].by_type[kind][1] == tokens and torch.equal(got[name].by_type[kind][0], mean), name


@pytest.mark.parametrize("batch_size,per_pass", [(1, 64), (2, 3), (3, 1)])
def test_block_by_block_equals_whole_model_bit_for_bit(demo, jsonl, tmp_path, batch_size, per_pass):
    folder, _, _ = demo
    common = dict(model=folder, data=jsonl, nsamples=5, batch_size=batch_size, split_token_types=True)
    whole, _ = calibrate(CalibrationConfig(output=tmp_path / "w.safetensors", whole_model=True, **common), False)
    blocks, meta = calibrate(CalibrationConfig(output=tmp_path / "b.safetensors", samples_per_pass=per_pass, **common),
                             False)
    assert_same_stats(blocks, whole)
    batches, per_pass_batches = -(-5 // batch_size), max(1, per_pass // batch_size)
    passes = -(-batches // per_pass_batches)
    assert meta["execution"].startswith("block by block (10 blocks") and f"{passes} pass" in meta["execution"]


def test_layouts_and_original_with_clip_folder_load_lazily_and_match(demo, jsonl, tmp_path):
    """hub4 (sharded) and original + --vision-tower: block by block equals the whole-model path."""
    from conftest import hub_key, original_with_clip_folder, write_checkpoint

    folder, model, processor = demo
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    hub = write_checkpoint(tmp_path / "hub4", {hub_key(k): v for k, v in sd.items()}, model.config.to_dict(), shards=3)
    processor.save_pretrained(hub)
    original, clip = original_with_clip_folder(model, processor, tmp_path)
    for path, extra in ((hub, {}), (original, {"vision_tower": clip})):
        common = dict(model=path, data=jsonl, nsamples=3, overwrite=True, **extra)  # the loop rewrites the files
        whole, _ = calibrate(CalibrationConfig(output=tmp_path / "w.safetensors", whole_model=True, **common), False)
        blocks, _ = calibrate(CalibrationConfig(output=tmp_path / "b.safetensors", **common), False)
        assert_same_stats(blocks, whole)


def test_one_block_in_memory_at_a_time(demo, jsonl):
    """Whenever any prunable layer runs, the parameters in memory are the residents plus one block's."""
    folder, _, processor = demo
    inventory = from_checkpoint(folder)
    loaded = load_model(folder, inventory, lazy=True)
    model = loaded.model
    assert all(p.device.type == "meta" for p in model.parameters())
    names = [layer.name for layer in inventory.layers]
    blocks = find_blocks(model, names)
    assert [b.name for b in blocks][:5] == [f"model.vision_tower.encoder.layers.{i}" for i in range(4)] + [
        "model.multi_modal_projector.linear_1"]
    assert len(blocks) == 4 + 2 + 4
    block_of = {p: b.name for b in blocks for p in b.parameters}
    embeddings = input_embeddings_block(model, blocks)
    assert embeddings.name == "model.language_model.embed_tokens" and not embeddings.calibrated
    seen, embedded = [], []

    def probe(module, args):
        real = {n for n, p in model.named_parameters() if p.device.type != "meta"}
        seen.append({block_of[n] for n in real if n in block_of})
        embedded.append(set(embeddings.parameters) & real)

    handles = [model.get_submodule(n).register_forward_pre_hook(probe) for n in names]
    samples, _ = load_samples(jsonl, 3, 0)
    batches = [dict(processor(images=[s.image], text=[build_prompt(processor, s.question, None)], return_tensors="pt"))
               for s in samples]
    try:
        with collect_statistics(model, names, r"^model\.language_model\.") as collector:
            run_blocks(loaded, batches, collector, names, progress=False)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == 3 * len(names) and all(len(s) == 1 for s in seen)
    assert not any(embedded)  # the input embeddings are used first, then freed: never beside a prunable layer
    assert all(p.device.type == "meta" for p in model.parameters())  # everything freed afterwards


def reference_sequential(folder, jsonl, nsamples, masker):
    """Obviously right: the whole model in memory; for each block in order, run every sample through the whole
    model counting that block's layers only, then prune the block's layers."""
    inventory = from_checkpoint(folder)
    loaded = load_model(folder, inventory)
    model, processor = loaded.model, loaded.processor
    names = [layer.name for layer in inventory.layers]
    samples, _ = load_samples(jsonl, nsamples, 0)
    inputs = [processor(images=[s.image], text=[build_prompt(processor, s.question, None)], return_tensors="pt")
              for s in samples]
    stats = {}
    for block in find_blocks(model, names):
        mine = [n for n in names if n == block.name or n.startswith(block.name + ".")]
        with collect_statistics(model, mine, r"^model\.language_model\.") as collector:
            for x in inputs:
                with collector.batch(x["attention_mask"], x["input_ids"] == loaded.image_token_id), torch.no_grad():
                    model(**x, use_cache=False)
        for n in mine:
            stats[n] = (collector.layers[n].all.mean(), collector.layers[n].all.tokens)
            with torch.no_grad():
                weight = model.get_submodule(n).weight
                weight.masked_fill_(~masker(n, weight, stats[n][0]), 0)
    return stats


@pytest.mark.parametrize("method", ["wanda", "multiflow"])
def test_sequential_equals_reference_and_differs_from_one_pass(demo, jsonl, tmp_path, method):
    folder, _, _ = demo
    config = PruneConfig(model=folder, output=tmp_path / "out", target_sparsity=0.6, stats=tmp_path / "s.safetensors",
                         method=method)
    masker = masker_for(config, from_checkpoint(folder))
    got, meta = calibrate(CalibrationConfig(model=folder, output=tmp_path / "s.safetensors", data=jsonl, nsamples=3),
                          False, masker)
    one_pass, _ = calibrate(CalibrationConfig(model=folder, output=tmp_path / "d.safetensors", data=jsonl,
                                              nsamples=3), False)
    want = reference_sequential(folder, jsonl, 3, masker)
    assert meta["sequential"] and "sequential" in meta["execution"]
    for name, (mean, tokens) in want.items():
        assert got[name].tokens == tokens and torch.equal(got[name].sq_mean, mean), name
    first = "model.vision_tower.encoder.layers.0.self_attn.q_proj"
    assert torch.equal(got[first].sq_mean, one_pass[first].sq_mean)  # nothing pruned before the first block
    later = [n for n in got if n.startswith("model.language_model.")]
    assert all(not torch.equal(got[n].sq_mean, one_pass[n].sq_mean) for n in later)


def test_run_sequential_writes_what_prune_writes_from_its_stats(demo, jsonl, tmp_path):
    folder, _, _ = demo
    report = multiflow.run(folder, tmp_path / "seq", 0.5, data=jsonl, nsamples=3, method="wanda", sequential=True)
    assert report["calibration"]["sequential"] and report["timings"]["calibrate_seconds"] > 0
    masker = masker_for(PruneConfig(model=folder, output=tmp_path / "x", target_sparsity=0.5,
                                    stats=tmp_path / "s.safetensors", method="wanda"), from_checkpoint(folder))
    calibrate(CalibrationConfig(model=folder, output=tmp_path / "s.safetensors", data=jsonl, nsamples=3), False, masker)
    steps = multiflow.prune(folder, tmp_path / "steps", 0.5, stats=tmp_path / "s.safetensors", method="wanda")
    assert report["layers"] == steps["layers"]
    assert (tmp_path / "seq" / "model.safetensors").read_bytes() == (tmp_path / "steps" / "model.safetensors").read_bytes()


def test_bad_combinations_are_clear_errors(demo, jsonl, tmp_path):
    folder, _, _ = demo
    with pytest.raises(MultiflowError, match="--sequential"):
        multiflow.run(folder, tmp_path / "a", 0.5, data=jsonl, nsamples=2, method="magnitude", sequential=True)
    with pytest.raises(MultiflowError, match="--whole-model"):
        multiflow.run(folder, tmp_path / "b", 0.5, data=jsonl, nsamples=2, sequential=True, whole_model=True, method="multiflow")
    with pytest.raises(MultiflowError, match="--device-map"):
        CalibrationConfig(model=folder, output=tmp_path / "s", device_map="auto")
    with pytest.raises(MultiflowError, match="--samples-per-pass"):
        multiflow.run(folder, tmp_path / "c", 0.5, data=jsonl, nsamples=3, sequential=True, samples_per_pass=2, method="multiflow")
    assert not any((tmp_path / n).exists() for n in "abc")


def test_an_error_in_a_batch_stops_every_worker(demo, jsonl, tmp_path, monkeypatch):
    folder, _, _ = demo
    from transformers.models.llama.modeling_llama import LlamaMLP

    def broken(self, x):
        raise RuntimeError("boom in the MLP")

    before = threading.active_count()
    monkeypatch.setattr(LlamaMLP, "forward", broken)
    with pytest.raises(RuntimeError, match="boom in the MLP"):
        calibrate(CalibrationConfig(model=folder, output=tmp_path / "s.safetensors", data=jsonl, nsamples=4), False)
    assert threading.active_count() == before and not (tmp_path / "s.safetensors").exists()


def test_whole_model_with_device_map_auto_equals_block_by_block(demo, jsonl, tmp_path):
    """accelerate's device map (all on the CPU here) runs the same pass."""
    folder, _, _ = demo
    common = dict(model=folder, data=jsonl, nsamples=2)
    mapped, meta = calibrate(CalibrationConfig(output=tmp_path / "m.safetensors", whole_model=True, device_map="auto",
                                               **common), False)
    blocks, _ = calibrate(CalibrationConfig(output=tmp_path / "b.safetensors", **common), False)
    assert_same_stats(mapped, blocks)
    assert meta["execution"] == "whole model"


def test_cli_flags_reach_the_run(demo, jsonl, tmp_path, capsys):
    from multiflow.cli import main

    folder, _, _ = demo
    assert main(["run", "--model", str(folder), "--data", str(jsonl), "--nsamples", "3", "--target-sparsity", "0.4",
                 "--method", "wanda", "--sequential", "--samples-per-pass", "3", "--output", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "Calibration: block by block (10 blocks, 1 pass, sequential)" in out and "calibrate" in out.split("Time: ")[1]
    assert main(["calibrate", "--model", str(folder), "--data", str(jsonl), "--nsamples", "2", "--whole-model",
                 "--output", str(tmp_path / "s.safetensors")]) == 0
    assert load_stats(tmp_path / "s.safetensors")[1]["execution"] == "whole model"
    assert main(["calibrate", "--model", str(folder), "--samples-per-pass", "0", "--output", str(tmp_path / "x")]) == 2
    assert "--samples-per-pass" in capsys.readouterr().err
