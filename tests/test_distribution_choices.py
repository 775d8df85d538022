"""Step 1's --max-layer-sparsity (water-filled cap, each modality's target exact) and --prune-only (parts kept
dense, the target on the rest, the overall sparsity reported over everything): pure math against a reference,
then Step 1, the CLI and the Python API on a tiny LLaVA."""

import json
import math
import random
import re
from fractions import Fraction

import pytest
import torch
from safetensors.torch import load_file

import multiflow
from multiflow.cli import main
from multiflow.distribution.choices import DistributionChoices, cap_counts
from multiflow.errors import MultiflowError
from multiflow.models import inventory as layers


def reference_shares(pruned, numel, cap):
    """The continuous water level, found another way: scan the breakpoints c_l / p_l of
    f(lam) = sum min(c_l, lam * p_l) for the segment where f reaches the total, and solve it linearly."""
    limit = [math.floor(cap * n) for n in numel]
    total = sum(pruned)
    f = lambda lam: sum(min(Fraction(c), lam * p) for p, c in zip(pruned, limit))  # noqa: E731
    points = sorted({Fraction(c, p) for p, c in zip(pruned, limit) if p} | {Fraction(1)})
    lo = Fraction(0)
    for hi in points:
        if f(hi) >= total:
            break
        lo = hi
    # f is linear on [lo, hi]
    lam = lo + (total - f(lo)) * (hi - lo) / (f(hi) - f(lo)) if f(hi) != f(lo) else hi
    return [min(Fraction(c), lam * p) for p, c in zip(pruned, limit)], limit


def test_cap_by_hand():
    # 90 > 50: capped; its 40 spread over the others in proportion 10:20 (x 7/3 -> 23.3, 46.7; 46.7 rounds up)
    assert cap_counts([90, 10, 20], [100, 100, 100], 0.5, "m") == [50, 23, 47]
    # the scaling takes the second layer over the cap too: it joins, the third takes the rest
    assert cap_counts([90, 40, 10], [100, 100, 100], 0.5, "m") == [50, 50, 40]
    assert cap_counts([30, 40], [100, 100], 0.5, "m") == [30, 40]  # nothing over the cap: unchanged


def test_cap_against_the_reference_on_random_small_inputs():
    rng = random.Random(0)
    for _ in range(300):
        n = rng.randint(2, 7)
        numel = [rng.randint(1, 60) for _ in range(n)]
        pruned = [rng.randint(0, m) for m in numel]
        cap = rng.choice([0.3, 0.5, 0.61, 0.8, 0.95])
        if sum(pruned) > sum(math.floor(cap * m) for p, m in zip(pruned, numel) if p):
            continue  # infeasible, or more than scaling can place (the size fallback: tested below)
        counts = cap_counts(pruned, numel, cap, "m")
        shares, limit = reference_shares(pruned, numel, cap)
        assert sum(counts) == sum(pruned)  # the modality's parameter-weighted target, exactly
        assert all(c <= lim for c, lim in zip(counts, limit))  # no layer above the cap
        assert all(abs(c - s) < 1 for c, s in zip(counts, shares)), (pruned, numel, cap, counts, shares)


def test_cap_errors_and_the_size_fallback():
    with pytest.raises(MultiflowError, match="modality vision: its target needs 150 .* allows at most 100"):
        cap_counts([100, 50], [100, 100], 0.5, "modality vision")
    # the other layers prune nothing: the excess is spread by size (10 and 30 weights: 5 and 15)
    assert cap_counts([40, 0, 0], [50, 10, 30], 0.5, "m") == [25, 4, 11]
    with pytest.raises(MultiflowError, match="--max-layer-sparsity"):
        DistributionChoices(max_layer_sparsity=1.5)
    for bad in ("", "vision,", "all,vision"):
        with pytest.raises(MultiflowError, match="--prune-only"):
            DistributionChoices(prune_only=bad)


@pytest.fixture(scope="module")
def tiny():
    from conftest import tiny_llava

    return tiny_llava(seed=3)


def _pruned_in(dist, names):
    return sum(dist.layers[n].pruned for n in names)


def test_capped_distribution_keeps_each_modality_exact(tiny):
    plain = multiflow.compute_distribution(tiny, 0.6)
    top = max(s.sparsity for s in plain.layers.values())
    cap = round(top - 0.1, 2)
    capped = multiflow.compute_distribution(tiny, 0.6, max_layer_sparsity=cap)
    for m, stats in plain.modality_stats().items():
        assert capped.modality_stats()[m]["pruned_params"] == stats["pruned_params"]
    assert all(s.pruned <= math.floor(cap * s.numel) for s in capped.layers.values())
    assert capped.meta["capped_layers"] and capped.meta["max_layer_sparsity"] == cap
    for name in capped.meta["capped_layers"]:
        assert capped.layers[name].pruned == math.floor(cap * capped.layers[name].numel)
    assert multiflow.compute_distribution(tiny, 0.6, max_layer_sparsity=1.0).layers == plain.layers  # off = paper
    with pytest.raises(MultiflowError, match="modality (vision|fusion): its target needs"):
        multiflow.compute_distribution(tiny, 0.6, max_layer_sparsity=0.5)


def test_prune_only_keeps_the_rest_dense_and_the_target_on_the_pruned_part(tiny):
    lm = multiflow.compute_distribution(tiny, 0.5, prune_only="language-model")
    decoder = [n for n in lm.layers if n.startswith("model.language_model.")]
    others = [n for n in lm.layers if n not in decoder]
    assert others and all(lm.layers[n].pruned == 0 for n in others)  # vision tower and projector
    assert lm.meta["dense_layers"] == others and lm.meta["prune_only"] == "language-model"
    assert _pruned_in(lm, decoder) == math.floor(sum(lm.layers[n].numel for n in decoder) * 0.5)
    fusion = multiflow.compute_distribution(tiny, 0.5, prune_only="fusion")
    assert any(fusion.layers[n].pruned for n in others if "projector" in n)  # fusion = projector + decoder
    assert fusion.modality_stats()["fusion"]["pruned_params"] == math.floor(
        fusion.modality_stats()["fusion"]["total_params"] * 0.5)
    assert fusion.modality_stats()["vision"]["pruned_params"] == 0
    with pytest.raises(MultiflowError, match="'audio' is not a modality of the rules 'llava'"):
        multiflow.compute_distribution(tiny, 0.5, prune_only="audio")
    with pytest.raises(MultiflowError, match="--prune-only text selects no prunable layer"):
        multiflow.compute_distribution(tiny, 0.5, prune_only="text")


def test_prune_module_api_keeps_dense_layers_untouched(tiny):
    import copy

    model = copy.deepcopy(tiny)
    report = multiflow.prune_module(model, 0.5, method="magnitude", prune_only="vision", max_layer_sparsity=0.9)
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.language_model.layers."):
            assert torch.equal(module.weight, tiny.get_submodule(name).weight), name
            assert report["layers"][name]["dense"] and report["layers"][name]["pruned"] == 0
    assert report["modalities"]["vision"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)
    part, glob = report["pruned_part"], report["global"]
    assert part["pruned"] == glob["pruned"] and glob["achieved_sparsity"] < part["achieved_sparsity"]
    assert report["kept_dense"]["modalities"] == ["fusion"] and report["prune_only"] == "vision"


@pytest.fixture(scope="module")
def hf5(tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("choices") / "hf5"
    tiny.save_pretrained(folder)
    return folder


def test_cli_distribute_matches_the_api(hf5, tmp_path):
    out = tmp_path / "d.json"
    assert main(["distribute", "--model", str(hf5), "--target-sparsity", "0.5", "--max-layer-sparsity", "0.55",
                 "--prune-only", "vision,fusion", "--output", str(out), "--no-plot", "--quiet"]) == 0
    data = json.loads(out.read_text())
    api = multiflow.compute_distribution(hf5, 0.5, max_layer_sparsity=0.55, prune_only="vision,fusion")
    assert data["layer_distribution"] == api.layer_sparsity and data["meta"]["max_layer_sparsity"] == 0.55
    assert max(data["layer_distribution"].values()) <= 0.55


def test_cli_prune_language_model_only(hf5, tmp_path, capsys):
    out = tmp_path / "pruned"
    assert main(["prune", "--model", str(hf5), "--method", "magnitude", "--target-sparsity", "0.5",
                 "--prune-only", "language-model", "--max-layer-sparsity", "0.7", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "--prune-only language-model" in printed and "kept dense" in printed and "(dense)" in printed
    before, after = load_file(hf5 / "model.safetensors"), load_file(out / "model.safetensors")
    report = json.loads((out / "multiflow_report.json").read_text())
    for key, tensor in before.items():
        if key.startswith("language_model.model.layers.") and key.endswith("proj.weight"):
            assert int((after[key] == 0).sum()) > int((tensor == 0).sum()), key
        else:
            assert torch.equal(after[key], tensor), key  # vision tower, projector, embeddings: untouched
    assert report["pruned_part"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert report["global"]["achieved_sparsity"] < 0.5 and report["max_layer_sparsity"] == 0.7
    assert max(v["achieved_sparsity"] for v in report["layers"].values()) <= 0.7
    dist = json.loads((out / "sparsity_distribution_0.5.json").read_text())
    assert dist["meta"]["prune_only"] == "language-model"


@pytest.mark.parametrize("args,message", [
    (["--max-layer-sparsity", "1.5"], "argument --max-layer-sparsity: '1.5' is outside (0, 1]"),
    (["--max-layer-sparsity", "0.7", "--allocation", "uniform"], "--max-layer-sparsity caps Step 1's"),
    (["--max-layer-sparsity", "0.7", "--structure", "2:4"], "not --structure 2:4"),
    (["--prune-only", "audio"], "'audio' is not a modality"),
    (["--prune-only", "vision", "--distribution", "DIST"], "--prune-only: the --distribution file already fixes"),
])
def test_cli_bad_choices_are_one_line_errors(hf5, tmp_path, capsys, args, message):
    dist = tmp_path / "d.json"
    multiflow.compute_distribution(hf5, 0.5).save(dist)
    args = [str(dist) if a == "DIST" else a for a in args]
    target = [] if "--distribution" in args or "--structure" in args else ["--target-sparsity", "0.5"]
    try:
        code = main(["prune", "--model", str(hf5), "--method", "magnitude", *target, *args,
                     "--output", str(tmp_path / "out")])
    except SystemExit as exc:  # a usage error (argparse)
        code = exc.code
    err = capsys.readouterr().err
    assert code == 2 and message in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_run_sparsegpt_language_model_only_leaves_the_rest_byte_identical(demo, jsonl, tmp_path):
    folder, _, _ = demo
    out = tmp_path / "run"
    report = multiflow.run(folder, out, 0.5, data=jsonl, nsamples=2, method="sparsegpt", prune_only="language-model")
    before, after = load_file(folder / "model.safetensors"), load_file(out / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("language_model.model.layers.") for k in changed)
    assert report["pruned_part"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-3)
    assert all(v.get("dense") for k, v in report["layers"].items() if not k.startswith("model.language_model."))


def test_cli_run_with_both_choices(demo, jsonl, tmp_path, capsys):
    folder, _, _ = demo
    out = tmp_path / "run"
    assert main(["run", "--model", str(folder), "--data", str(jsonl), "--nsamples", "2", "--method", "wanda",
                 "--target-sparsity", "0.5", "--prune-only", "vision", "--max-layer-sparsity", "0.8",
                 "--output", str(out), "--quiet"]) == 0
    report = json.loads((out / "multiflow_report.json").read_text())
    assert report["modalities"]["fusion"]["pruned"] == 0 and report["kept_dense"]["modalities"] == ["fusion"]
    assert report["modalities"]["vision"]["achieved_sparsity"] == pytest.approx(0.5, abs=1e-4)
    assert max(v["achieved_sparsity"] for v in report["layers"].values()) <= 0.8


def test_step1_choices_are_defined_once():
    """distribute's flags and compute_distribution(s)' defaults come from DistributionChoices' fields."""
    import inspect
    from dataclasses import fields

    from multiflow.cli import build_parser

    options = fields(DistributionChoices)
    assert {f.name for f in options} == {"max_layer_sparsity", "prune_only"}
    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("distribute", "prune", "run"):
        actions = {a.dest: a for a in subparsers[command]._actions}
        for f in options:
            assert actions[f.name].default == f.default and actions[f.name].help.startswith(f.metadata["help"][:40])
    assert subparsers["distribute"].parse_args(["--target-sparsity", "0.5", "--max-layer-sparsity", "0.9"]
                                                ).max_layer_sparsity == 0.9  # parsed to a number by the field's parse
    parameters = inspect.signature(multiflow.compute_distributions).parameters
    assert all(parameters[f.name].default == f.default for f in options)


def _tree(names: list[str]) -> torch.nn.Module:
    """A module whose nn.Linear layers (4 x 4) have these names."""
    root = torch.nn.Module()
    for name in names:
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, torch.nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, torch.nn.Linear(4, 4))
    return root


@pytest.mark.parametrize("preset,names,dense", [
    ("mllama", ["model.vision_model.layers.0.fc1", "model.multi_modal_projector",
                "model.language_model.layers.0.self_attn.q_proj", "model.language_model.layers.1.cross_attn.q_proj",
                "model.language_model.layers.1.cross_attn.k_proj", "model.language_model.layers.1.cross_attn.v_proj"],
     ["model.vision_model.layers.0.fc1", "model.multi_modal_projector"]),
    ("blip-2", ["vision_model.encoder.layers.0.mlp.fc1", "qformer.encoder.layer.0.attention.attention.query",
                "language_projection", "language_model.encoder.block.0.layer.0.SelfAttention.q",
                "language_model.decoder.block.0.layer.1.EncDecAttention.k"],
     ["vision_model.encoder.layers.0.mlp.fc1", "qformer.encoder.layer.0.attention.attention.query",
      "language_projection"]),
])
def test_prune_only_language_model_takes_every_language_model_layer(preset, names, dense):
    """--prune-only language-model is the language model's layers (`Family.language_layers`), also those whose
    inputs are not the prompt's positions (Mllama's cross-attention keys / values, BLIP-2's T5 decoder), which
    `aligned_layers` leaves out."""
    from multiflow.distribution.choices import dense_layers
    from multiflow.models.families import family_by_name

    family = family_by_name(preset)
    inv = layers.from_module(_tree(names), family)
    assert sorted(l.name for l in inv.layers) == sorted(names)  # every one prunable
    assert any(not re.search(family.aligned_layers, n) for n in names if n not in dense)
    assert sorted(dense_layers(inv, "language-model")) == sorted(dense)


def test_prune_only_language_model_from_a_rules_file(tmp_path):
    from multiflow.distribution.choices import dense_layers
    from multiflow.models.families import load_rules_file

    names = ["vision.fc", "lm.block.0.fc", "lm.head_proj"]
    rules = "rules: [{pattern: '^vision', group: vision}, {pattern: '^lm', group: fusion}]\n"
    (tmp_path / "none.yaml").write_text(rules)
    with pytest.raises(MultiflowError, match="add 'language_layers' \\(or 'aligned_layers'\\) to the rules file"):
        dense_layers(layers.from_module(_tree(names), load_rules_file(tmp_path / "none.yaml")), "language-model")
    (tmp_path / "lm.yaml").write_text(rules + "aligned_layers: '^lm\\.block\\.'\nlanguage_layers: '^lm\\.'\n")
    family = load_rules_file(tmp_path / "lm.yaml")
    assert dense_layers(layers.from_module(_tree(names), family), "language-model") == ["vision.fc"]
    (tmp_path / "aligned.yaml").write_text(rules + "aligned_layers: '^lm\\.block\\.'\n")
    family = load_rules_file(tmp_path / "aligned.yaml")
    assert dense_layers(layers.from_module(_tree(names), family), "language-model") == ["vision.fc", "lm.head_proj"]
