"""`run --method sparsegpt` end to end against a whole-model-in-memory reference, block by block."""

import copy

import pytest
import torch

import multiflow
from reference import reference_sequential_obs
from multiflow.calibration.data import load_samples
from multiflow.cli import main
from multiflow.errors import MultiflowError
from multiflow.models.inventory import from_checkpoint
from multiflow.models.loading import load_model
from multiflow.models.prompts import build_prompt
from multiflow.pruning.config import PruneConfig, Structure
from multiflow.pruning.plan import plan


@pytest.fixture(scope="module")
def bf16_demo(demo, tmp_path_factory):
    folder, model, processor = demo
    path = tmp_path_factory.mktemp("demo-bf16") / "llava"
    copy.deepcopy(model).to(torch.bfloat16).save_pretrained(path)
    processor.save_pretrained(path)
    return path


@pytest.mark.parametrize("target,structure,group,dtype", [
    (0.5, "unstructured", "layer", "fp32"), (0.6, "unstructured", "row", "fp32"), (None, "2:4", "layer", "fp32"),
    (0.5, "unstructured", "layer", "bf16"),
])
@pytest.mark.slow
def test_run_sparsegpt_equals_the_reference_bit_for_bit(demo, bf16_demo, jsonl, tmp_path, target, structure, group,
                                                        dtype):
    from transformers import LlavaForConditionalGeneration

    folder = demo[0] if dtype == "fp32" else bf16_demo
    report = multiflow.run(folder, tmp_path / "out", target, data=jsonl, nsamples=3, method="sparsegpt",
                           structure=structure, group=group)
    assert report["method"] == "sparsegpt" and report["calibration"]["sequential"]
    config = PruneConfig(model=folder, output=tmp_path / "x", target_sparsity=target, method="sparsegpt",
                         group=group, structure=Structure.parse(structure))
    want, _ = reference_sequential_obs(folder, jsonl, 3, config)
    original = {layer.name: w.clone() for layer, w in from_checkpoint(folder).read()}
    written = {layer.name: w.clone() for layer, w in from_checkpoint(tmp_path / "out").read()}
    assert set(written) == set(want) == set(report["layers"])
    for name, (new, keep, p) in want.items():
        got = written[name]
        assert torch.equal(got, new), name  # same mask, same updated weights, bit for bit
        assert torch.equal(got != 0, keep), name  # zeros exactly where pruned
        planned = p.k * (p.layer.shape[0] if group == "row" else 1) if not Structure.parse(structure).is_n_m else \
            p.layer.numel // 2
        assert report["layers"][name]["pruned"] == int((got == 0).sum()) == planned, name
        assert not torch.equal(got[keep], original[name][keep]), name  # the kept weights were updated
    if structure == "2:4":
        assert all(torch.equal((w != 0).reshape(w.shape[0], -1, 4).sum(-1),
                               torch.full((w.shape[0], w.shape[1] // 4), 2)) for w in written.values())
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")  # loads


def test_the_update_brings_the_logits_closer_to_dense_than_the_mask_alone(demo, jsonl, tmp_path):
    """The update lowers the error: at the same per-layer counts, the pruned model's logits stay closer to the
    dense model's than with the mask alone (zeros where sparsegpt pruned, original values elsewhere)."""
    folder, _, _ = demo
    multiflow.run(folder, tmp_path / "sg", 0.5, data=jsonl, nsamples=3, method="sparsegpt")
    original = dict((layer.name, w.clone()) for layer, w in from_checkpoint(folder).read())
    written = dict((layer.name, w.clone()) for layer, w in from_checkpoint(tmp_path / "sg").read())
    inventory = from_checkpoint(folder)
    dense = load_model(folder, inventory).model
    updated, masked = load_model(folder, inventory).model, load_model(folder, inventory).model
    with torch.no_grad():
        for name, w in written.items():
            updated.get_submodule(name).weight.copy_(w)
            masked.get_submodule(name).weight.copy_(original[name] * (w != 0))
    processor = load_model(folder, inventory).processor
    samples, _ = load_samples(jsonl, 5, 0)
    error = {"updated": 0.0, "masked": 0.0}
    for s in samples:
        x = processor(images=[s.image], text=[build_prompt(processor, s.question, None)], return_tensors="pt")
        with torch.no_grad():
            ref = dense(**x).logits
            for key, m in (("updated", updated), ("masked", masked)):
                error[key] += float((m(**x).logits - ref).square().sum())
    assert error["updated"] < error["masked"]


def test_one_block_of_hessians_at_a_time_and_shared_inputs_share_one(demo, jsonl, tmp_path):
    """When a block is pruned, the Hessians alive are that block's: 4 per decoder or encoder layer (q/k/v share
    one, gate/up share one), 1 per projector linear."""
    from multiflow.calibration.calibrate import CalibrationConfig, calibrate
    from multiflow.pruning.reconstruction import SparseGPTStep

    folder, _, _ = demo
    config = PruneConfig(model=folder, output=tmp_path / "x", target_sparsity=0.5, method="sparsegpt")
    step = SparseGPTStep(config, plan(config, from_checkpoint(folder), progress=False)[0], tmp_path / "scratch")
    alive = []
    prune_block = step._prune_block
    step._prune_block = lambda loaded, here: (alive.append((len(here), len(step._hessians))),
                                              prune_block(loaded, here))
    calibrate(CalibrationConfig(model=folder, output=tmp_path / "s.safetensors", data=jsonl, nsamples=2), False,
              pruner=step)
    assert alive == [(6, 4)] * 4 + [(1, 1)] * 2 + [(7, 4)] * 4
    assert not step._hessians and len(step.files) == 54


def test_refusals_are_clear(demo, jsonl, tmp_path, capsys):
    folder, _, _ = demo
    with pytest.raises(MultiflowError, match="multiflow run --method sparsegpt"):
        multiflow.prune(folder, tmp_path / "p", 0.5, stats=tmp_path / "s.safetensors", method="sparsegpt")
    assert main(["prune", "--model", str(folder), "--output", str(tmp_path / "q"), "--target-sparsity", "0.5",
                 "--method", "sparsegpt"]) == 2
    assert "multiflow run --method sparsegpt" in capsys.readouterr().err
    with pytest.raises(MultiflowError, match="--whole-model"):
        multiflow.run(folder, tmp_path / "w", 0.5, data=jsonl, nsamples=2, method="sparsegpt", whole_model=True)
    with pytest.raises(MultiflowError, match="one pass"):
        multiflow.run(folder, tmp_path / "s", 0.5, data=jsonl, nsamples=3, method="sparsegpt", samples_per_pass=2)
    with pytest.raises(MultiflowError, match="multiflow run --method sparsegpt"):
        multiflow.prune_module(demo[1], 0.5, method="sparsegpt")


def test_cli_run_sparsegpt(demo, jsonl, tmp_path, capsys):
    folder, _, _ = demo
    code = main(["run", "--model", str(folder), "--output", str(tmp_path / "o"), "--data", str(jsonl), "--nsamples",
                 "2", "--method", "sparsegpt", "--target-sparsity", "0.4", "--quiet"])
    assert code == 0
    import json

    report = json.loads((tmp_path / "o" / "multiflow_report.json").read_text())
    assert report["method"] == "sparsegpt" and report["global"]["pruned"] > 0
