"""Allocation variants from the scores: `scores` (normalised-score threshold) and `owl`, against references."""

import copy
import math

import pytest
import torch

import multiflow
from multiflow.errors import MultiflowError
from multiflow.models.inventory import from_module
from multiflow.pruning import allocation, scores
from multiflow.storage.stats_file import LayerStats


@pytest.fixture(scope="module")
def model_and_stats():
    from conftest import tiny_llava

    model = tiny_llava(seed=4)
    g = torch.Generator().manual_seed(9)
    names = [layer.name for layer in from_module(model).layers]
    # outlier features: a few input channels with large activations, as pretrained networks have
    stats = {}
    for n in names:
        sq = torch.rand(model.get_submodule(n).in_features, generator=g) + 0.01
        sq[torch.randint(0, sq.numel(), (2,), generator=g)] *= 400
        stats[n] = LayerStats(sq, 11)
    return model, stats


@pytest.mark.parametrize("method", ["multiflow", "wanda", "magnitude"])
@pytest.mark.parametrize("target", [0.3, 0.75])
def test_score_counts_equal_kthvalue_over_the_normalised_concatenation(model_and_stats, method, target):
    model, stats = model_and_stats
    inventory = from_module(model)

    def score(layer, weight):
        sq = stats[layer.name].sq_mean
        return {"multiflow": lambda: scores.multiflow_score(weight, sq), "wanda": lambda: scores.wanda_score(weight, sq),
                "magnitude": lambda: scores.magnitude_score(weight)}[method]()

    got = allocation.score_counts(inventory, score, target)
    assert got == kthvalue_counts(inventory, lambda l: l.handle.detach(), score, target)
    for layers in inventory.by_modality().values():
        assert not layers or len({got[l.name] / l.numel for l in layers}) > 1  # not uniform


def kthvalue_counts(inventory, weight_of, score, target: float) -> dict[str, int]:
    """The reference: per modality, the k-th lowest of the concatenated normalised scores (k = floor(target x
    their number)) and, per layer, how many of its normalised scores are at or below it."""
    counts = {}
    for layers in inventory.by_modality().values():
        if not layers:
            continue
        normed = {}
        for l in layers:
            s = score(l, weight_of(l))
            normed[l.name] = s / s.mean()
        flat = torch.cat([v.reshape(-1) for v in normed.values()])
        tau = torch.kthvalue(flat, math.floor(flat.numel() * target)).values
        counts.update({name: int((v <= tau).sum()) for name, v in normed.items()})
    return counts


@pytest.mark.parametrize("method", ["wanda", "magnitude"])
def test_score_counts_of_a_checkpoint_folder_come_from_the_scores(model_and_stats, method, tmp_path):
    """On a checkpoint folder Step 1 reads weights in pieces from the files: the scores allocation must still
    threshold the normalised scores (it once planned the magnitude map there, the same counts as `modality`)."""
    from multiflow.models.inventory import from_checkpoint

    model, stats = model_and_stats
    model.save_pretrained(tmp_path)
    inventory = from_checkpoint(tmp_path)
    assert inventory.model_path is not None

    def score(layer, weight):
        return scores.score(method, weight, stats[layer.name].sq_mean)

    def weight_of(layer):
        return model.get_submodule(layer.name).weight.detach()

    assert allocation.score_counts(inventory, score, 0.75) == kthvalue_counts(inventory, weight_of, score, 0.75)


def test_owl_keep_ratios_by_hand():
    # shares 0, .1, .2 -> rescaled to [0, 2 x 0.08] = 0, .08, .16; size-weighted mean (0 + .08 + 2 x .16) / 4 = .1;
    # keep = x - .1 + (1 - .5) = .4, .48, .56 (kept weights: .4 + .48 + 2 x .56 = 2.0 = half of 4)
    keep = allocation.owl_keep_ratios([0.0, 0.1, 0.2], [1, 1, 2], 0.5)
    assert keep == pytest.approx([0.4, 0.48, 0.56], abs=1e-12)
    assert allocation.owl_keep_ratios([0.3, 0.3], [5, 7], 0.6) == pytest.approx([0.4, 0.4])  # no spread: uniform


def test_block_of_names():
    assert allocation.block_of("model.language_model.layers.12.self_attn.q_proj") == "model.language_model.layers.12"
    assert allocation.block_of("vision_tower.vision_model.encoder.layers.0.mlp.fc1") == \
        "vision_tower.vision_model.encoder.layers.0"
    assert allocation.block_of("multi_modal_projector.linear_2") == "multi_modal_projector"
    assert allocation.block_of("fc") == "fc"


def test_owl_sparsities_are_per_block_from_the_concatenated_scores(model_and_stats):
    """Reference: per block (a decoder or encoder layer, or the projector), OWL's D over the concatenation of all
    its linears' Wanda scores, then the keep ratios; every linear of a block at the block's sparsity."""
    model, stats = model_and_stats
    inventory = from_module(model)

    def score(layer, weight):
        return scores.wanda_score(weight, stats[layer.name].sq_mean)

    got = allocation.owl_sparsities(inventory, score, 0.6)
    for modality, layers in inventory.by_modality().items():
        if not layers:
            continue
        blocks: dict[str, list] = {}
        for l in layers:
            blocks.setdefault(l.name.rsplit(".", 2)[0] if ".layers." in l.name else l.name.split(".")[0], []).append(l)
        assert len(blocks) < len(layers)
        cats = {b: torch.cat([score(l, l.handle.detach()).reshape(-1) for l in ls]) for b, ls in blocks.items()}
        shares = [float((c > 5 * c.double().mean()).double().mean()) for c in cats.values()]
        keep = allocation.owl_keep_ratios(shares, [c.numel() for c in cats.values()], 0.6)
        for k, (b, ls) in zip(keep, blocks.items()):
            for l in ls:
                assert got[l.name] == 1 - k, l.name
        if len(set(shares)) > 1:
            assert len({got[l.name] for l in layers}) > 1


@pytest.mark.parametrize("alloc", ["scores", "owl"])
def test_prune_module_with_score_allocations(model_and_stats, alloc):
    model, stats = model_and_stats
    pruned = copy.deepcopy(model)
    report = multiflow.prune_module(pruned, 0.6, stats=stats, method="wanda", allocation=alloc)
    targets = {info["target_sparsity"] for info in report["layers"].values()}
    assert len(targets) > 1 and report["allocation"] == alloc
    for modality, total in report["modalities"].items():
        if total["params"]:
            # scores: exactly floor(n x s) per modality (one threshold); owl: per-layer floors, within a layer count
            slack = 0 if alloc == "scores" else len(report["layers"])
            assert math.floor(total["params"] * 0.6) - slack <= total["pruned"] <= math.floor(total["params"] * 0.6)
    for name, info in report["layers"].items():
        assert int((pruned.get_submodule(name).weight == 0).sum()) >= info["pruned"]


def test_score_allocations_need_statistics_and_refuse_sequential(model_and_stats, demo, jsonl, tmp_path):
    model, _ = model_and_stats
    with pytest.raises(MultiflowError, match="statistics"):
        multiflow.prune_module(copy.deepcopy(model), 0.5, method="wanda", allocation="owl")
    folder, _, _ = demo
    with pytest.raises(MultiflowError, match="--sequential"):
        multiflow.run(folder, tmp_path / "o", 0.5, data=jsonl, nsamples=2, allocation="scores", sequential=True, method="multiflow")
    assert not (tmp_path / "o").exists()
