"""Step 1 on tiny LLaVA checkpoints in every layout and dtype, against the kthvalue reference."""

import json

import pytest
import torch
from torch import nn

import multiflow
from multiflow.distribution.distribute import Distribution
from multiflow.models.families import ModalityRules, Rule
from reference import llava_modality, load_linear_weights, reference_pruned

TARGETS = [0.0, 0.3, 0.5, 0.7, 0.9]


def _reference_for(folders, layout, s):
    """Reference counts from weights loaded by safetensors itself, names as multiflow reports them."""
    if layout == "original":  # vision tower comes from the CLIP folder
        weights = load_linear_weights(folders["original"], lambda k: k)
        clip = load_linear_weights(folders["clip"], lambda k: "model.vision_tower.vision_tower." + k)
        weights.update({k: v for k, v in clip.items() if ".vision_model." in k})
    elif layout.startswith("original"):
        weights = load_linear_weights(folders[layout], lambda k: k)
    else:
        def to_name(k):
            if k == "language_model.lm_head":
                return "lm_head"
            for a, b in (("language_model.model.", "model.language_model."),
                         ("vision_tower.vision_model.", "model.vision_tower."),
                         ("vision_tower.", "model.vision_tower."),
                         ("multi_modal_projector.", "model.multi_modal_projector.")):
                if k.startswith(a):
                    return b + k[len(a):]
            return k
        weights = load_linear_weights(folders[layout], to_name)
    modality = {n: llava_modality(n) for n in weights}
    weights = {n: w for n, w in weights.items() if modality[n]}
    modality = {n: m for n, m in modality.items() if m}
    return reference_pruned(weights, modality, s)


@pytest.mark.parametrize("layout", ["hf5", "hub4", "hub4-sharded", "inmemory", "original-with-clip", "original"])
def test_checkpoint_layouts_equal_reference_exactly(llava, layout):
    model, folders = llava
    kwargs = {"vision_tower": folders["clip"]} if layout == "original" else {}
    dists = multiflow.compute_distributions(folders[layout], TARGETS, **kwargs)
    for s, dist in zip(TARGETS, dists):
        expected = _reference_for(folders, layout, s)
        assert {n: sh.pruned for n, sh in dist.layers.items()} == expected
        assert dist.layer_sparsity == {n: c / dist.layers[n].numel for n, c in expected.items()}
        for m, st in dist.modality_stats().items():
            assert st["pruned_params"] >= int(st["total_params"] * s)
    assert dists[0].meta["naming"] == ("llava-original" if layout.startswith("original") else "transformers")


def test_hf_names_are_the_installed_module_names(llava):
    model, folders = llava
    linear = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"]
    for layout in ("hf5", "hub4", "inmemory"):
        dist = multiflow.compute_distribution(folders[layout], 0.5)
        assert sorted(dist.layers) == sorted(linear)


def test_in_memory_api_equals_checkpoint(llava):
    model, folders = llava
    in_memory = multiflow.compute_distributions(model, TARGETS)
    for layout in ("hf5", "hub4", "hub4-sharded", "inmemory"):
        on_disk = multiflow.compute_distributions(folders[layout], TARGETS)
        for a, b in zip(in_memory, on_disk):
            assert a.layers == b.layers and list(a.layers) == list(b.layers)
            assert a.modality_stats() == b.modality_stats() and a.thresholds == b.thresholds


def test_original_layout_without_vision_tower_says_so(llava):
    _, folders = llava
    dist = multiflow.compute_distribution(folders["original"], 0.5)
    assert not dist.modality_layers("vision")
    assert any("VISION TOWER MISSING" in n for n in dist.meta["notes"])
    assert "openai/clip-vit-large-patch14-336" in dist.meta["notes"][0]
    assert dist.modality_layers("fusion")


def test_original_layout_names(llava):
    _, folders = llava
    names = list(multiflow.compute_distribution(folders["original-with-clip"], 0.5).layers)
    assert "model.mm_projector.0" in names and "model.layers.0.mlp.down_proj" in names
    assert "model.vision_tower.vision_tower.vision_model.encoder.layers.0.self_attn.q_proj" in names


class _Two(nn.Module):
    def __init__(self, a, b):
        super().__init__()
        self.a, self.b = nn.Linear(a.shape[1], a.shape[0], bias=False), nn.Linear(b.shape[1], b.shape[0], bias=False)
        with torch.no_grad():
            self.a.weight.copy_(a)
            self.b.weight.copy_(b)


RULES = ModalityRules("test", ("vision", "text"), (Rule(r"^a$", "vision"), Rule(r"^b$", "vision")))


def test_ties_with_the_threshold_are_pruned():
    a = torch.tensor([[0.1, 0.2, 0.2, 0.2], [0.2, -0.3, 0.4, 0.5]])
    b = torch.tensor([[-0.2, 0.9], [0.05, 0.2]])
    # 12 weights, s=0.25 -> k=3; sorted |W|: .05 .1 .2 .2 ... -> tau=.2; every 0.2 is pruned.
    dist = multiflow.compute_distribution(_Two(a, b), 0.25, RULES)
    assert dist.thresholds["vision"]["k"] == 3
    assert dist.thresholds["vision"]["threshold"] == pytest.approx(0.2)
    assert dist.layers["a"].pruned == 5 and dist.layers["b"].pruned == 3
    assert dist.modality_stats()["vision"]["pruned_params"] == 8  # > k: ties


def test_zero_target_prunes_nothing_and_tiny_k_is_exact():
    a = torch.arange(1, 9, dtype=torch.float32).reshape(2, 4)
    b = torch.arange(9, 13, dtype=torch.float32).reshape(2, 2)
    model = _Two(a, b)
    zero = multiflow.compute_distribution(model, 0.0, RULES)
    assert all(s.pruned == 0 for s in zero.layers.values()) and zero.thresholds["vision"]["threshold"] is None
    small = multiflow.compute_distribution(model, 0.05, RULES)  # floor(12 * 0.05) = 0
    assert all(s.pruned == 0 for s in small.layers.values())
    one = multiflow.compute_distribution(model, 1 / 12 + 1e-9, RULES)  # k = 1: only |W| = 1 goes
    assert one.layers["a"].pruned == 1 and one.layers["b"].pruned == 0


def test_mixed_dtype_modality_matches_promoted_reference():
    g = torch.Generator().manual_seed(3)
    model = _Two(torch.randn(8, 16, generator=g), torch.randn(4, 8, generator=g))
    model.a.half()
    model.b.to(torch.bfloat16)
    for s in (0.3, 0.5, 0.77):
        dist = multiflow.compute_distribution(model, s, RULES)
        expected = reference_pruned({"a": model.a.weight.detach(), "b": model.b.weight.detach()},
                                    {"a": "vision", "b": "vision"}, s)
        assert {n: x.pruned for n, x in dist.layers.items()} == expected


def test_same_input_same_bytes(llava, tmp_path):
    _, folders = llava
    a = multiflow.compute_distribution(folders["hub4"], 0.5).save(tmp_path / "a.json").read_bytes()
    b = multiflow.compute_distribution(folders["hub4"], 0.5).save(tmp_path / "b.json").read_bytes()
    assert json.loads(a)["layer_distribution"] == json.loads(b)["layer_distribution"] and a.replace(b"a.json", b"") == b.replace(b"b.json", b"")


def test_json_round_trip_and_seed_keys(llava, tmp_path):
    _, folders = llava
    dist = multiflow.compute_distribution(folders["hf5"], 0.5)
    path = dist.save(tmp_path / "d.json")
    data = json.loads(path.read_text())
    assert set(data) == {"target_sparsity", "modality_stats", "layer_distribution", "meta"}
    assert set(data["modality_stats"]) == {"vision", "fusion"}
    for stats in data["modality_stats"].values():
        assert set(stats) == set(multiflow.distribution.distribute.STAT_FIELDS)
    assert data["meta"]["modalities"] == ["vision", "text", "fusion"]
    back = Distribution.load(path)
    assert back.layers == dist.layers and back.thresholds == dist.thresholds
    data["layer_distribution"][next(iter(dist.layers))] += 0.01
    with pytest.raises(multiflow.MultiflowError, match="disagrees"):
        Distribution.from_json(data)
