"""Step 3 end to end on tiny LLaVA checkpoints: masks against naive references, files that load."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

import multiflow
from multiflow.errors import MultiflowError
from multiflow.pruning import scores
from multiflow.pruning.config import PruneConfig, Structure
from multiflow.pruning.prune import prune
from multiflow.storage.stats_file import LayerStats, save_stats
from reference import llava_modality
from test_masks import ref_layer_mask, ref_n_m_mask, ref_row_mask

S = 0.6


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from conftest import layouts, tiny_llava

    model = tiny_llava(seed=3, dtype=torch.float16)
    root = tmp_path_factory.mktemp("prune")
    folders = layouts(model, root)
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    g = torch.Generator().manual_seed(5)
    stats = {n: LayerStats(torch.rand(model.get_submodule(n).in_features, generator=g) + 0.01, 7) for n in names}
    save_stats(root / "stats.safetensors", stats, {"data": "synthetic", "nsamples": 7, "seed": 0})
    original = {}
    for key, n in ((k, k) for k in names):
        orig = key
        for a, b in (("model.language_model.", "model."), ("model.multi_modal_projector.linear_1", "model.mm_projector.0"),
                     ("model.multi_modal_projector.linear_2", "model.mm_projector.2")):
            if orig.startswith(a):
                orig = b + orig[len(a):]
        original[orig] = stats[n]
    save_stats(root / "stats-original.safetensors", {k: v for k, v in original.items() if "vision" not in k}, {})
    return model, folders, stats, root


def weights_by_name(folder):
    """Module name -> 2-D weight, from whatever safetensors files the folder holds."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        for key, value in load_file(str(path)).items():
            out[key] = value
    return out


def hub_name(module_name):
    from conftest import hub_key

    return hub_key(module_name) + ".weight"


def allocation_k(weights, allocation, s, dead=()):
    """Reference pruned count per layer: kthvalue over the concatenation (per modality or global)."""
    layers = {n: w for n, w in weights.items()}
    group = {n: ("all" if allocation == "global" else llava_modality(n)) for n in layers}
    ks = {}
    for g in set(group.values()):
        names = [n for n in layers if group[n] == g]
        live = [n for n in names if n not in dead]
        d = sum(layers[n].numel() for n in names if n in dead)
        k = math.floor(sum(layers[n].numel() for n in names) * s) - d
        flat = torch.cat([layers[n].abs().reshape(-1) for n in live])
        tau = torch.kthvalue(flat, k).values if k > 0 else None
        for n in live:
            ks[n] = 0 if tau is None else int((layers[n].abs() <= tau).sum())
        for n in names:
            if n in dead:
                ks[n] = layers[n].numel()
    return ks


def expected_mask(w, sq_mean, method, allocation, group, structure, k, s_layer):
    score = {"magnitude": lambda: scores.magnitude_score(w), "wanda": lambda: scores.wanda_score(w, sq_mean),
             "multiflow": lambda: scores.multiflow_score(w, sq_mean)}[method]()
    if structure is not None:
        return ref_n_m_mask(score, *structure)
    if group == "row":
        return ref_row_mask(score, math.floor(s_layer * w.shape[1]))
    return ref_layer_mask(score, k)


@pytest.mark.parametrize("method", ["multiflow", "wanda", "magnitude"])
@pytest.mark.parametrize("allocation", ["modality", "uniform", "global"])
@pytest.mark.parametrize("group", ["layer", "row"])
def test_masks_match_reference(ckpt, tmp_path, method, allocation, group):
    model, folders, stats, root = ckpt
    out = tmp_path / "out"
    report = prune(PruneConfig(model=folders["hub4"], output=out, target_sparsity=S, stats=root / "stats.safetensors",
                               method=method, allocation=allocation, group=group), progress=False)
    before, after = weights_by_name(folders["hub4"]), weights_by_name(out)
    dense = {n: before[hub_name(n)] for n in stats}
    ks = allocation_k(dense, allocation, S) if allocation != "uniform" else {n: math.floor(S * w.numel()) for n, w in dense.items()}
    for name, w in dense.items():
        s_layer = ks[name] / w.numel()
        keep = expected_mask(w, stats[name].sq_mean, method, allocation, group, None, ks[name], s_layer)
        assert torch.equal(after[hub_name(name)], w * keep), name
        assert report["layers"][name]["pruned"] == int((~keep).sum())
    for key, value in before.items():  # everything else untouched, byte for byte
        if not any(key == hub_name(n) for n in stats):
            assert torch.equal(after[key].view(torch.uint8), value.view(torch.uint8)), key


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (3, 4)])
def test_n_m_structure(ckpt, tmp_path, n, m):
    model, folders, stats, root = ckpt
    out = tmp_path / "out"
    report = prune(PruneConfig(model=folders["hub4"], output=out, stats=root / "stats.safetensors",
                               structure=Structure(n, m)), progress=False)
    before, after = weights_by_name(folders["hub4"]), weights_by_name(out)
    for name in stats:
        w = before[hub_name(name)]
        keep = expected_mask(w, stats[name].sq_mean, "multiflow", None, None, (n, m), 0, 0)
        assert torch.equal(after[hub_name(name)], w * keep)
        assert ((after[hub_name(name)] != 0).reshape(w.shape[0], -1, m).sum(-1) <= n).all()
    assert report["allocation"] is None and "does not apply" in " ".join(report["notes"])


def test_saved_folder_loads_and_reproduces_report(ckpt, tmp_path):
    from transformers import LlavaForConditionalGeneration

    model, folders, stats, root = ckpt
    out = tmp_path / "out"
    report = prune(PruneConfig(model=folders["hf5"], output=out, target_sparsity=S, stats=root / "stats.safetensors"),
                   progress=False)
    loaded = LlavaForConditionalGeneration.from_pretrained(out)
    assert loaded.dtype == torch.float16
    for name, info in report["layers"].items():
        w = loaded.get_submodule(name).weight
        assert int((w == 0).sum()) == info["pruned"] and info["kept"] == w.numel() - info["pruned"]
    dist = json.loads((out / f"sparsity_distribution_{S:g}.json").read_text())
    assert {n: v["pruned"] for n, v in dist["meta"]["layers"].items()} == {n: i["pruned"] for n, i in report["layers"].items()}
    assert (out / "multiflow_report.json").is_file() and (out / f"sparsity_distribution_{S:g}.png").is_file()
    with torch.no_grad():  # runs
        loaded(input_ids=torch.tensor([[1, 2, 3]]))


def test_same_inputs_same_bytes_and_sharding_kept(ckpt, tmp_path):
    model, folders, stats, root = ckpt
    outs = []
    for i in range(2):
        out = tmp_path / f"o{i}"
        prune(PruneConfig(model=folders["hub4-sharded"], output=out, target_sparsity=S,
                          stats=root / "stats.safetensors"), progress=False)
        outs.append(out)
    files = sorted(p.name for p in folders["hub4-sharded"].glob("*.safetensors"))
    assert sorted(p.name for p in outs[0].glob("*.safetensors")) == files and len(files) == 3
    for name in files:
        assert (outs[0] / name).read_bytes() == (outs[1] / name).read_bytes()
    assert (outs[0] / "model.safetensors.index.json").read_text() == (folders["hub4-sharded"] / "model.safetensors.index.json").read_text()


def test_dead_layers_pruned_and_counted(ckpt, tmp_path):
    model, folders, stats, root = ckpt
    out = tmp_path / "out"
    report = prune(PruneConfig(model=folders["hub4"], output=out, target_sparsity=S, method="magnitude",
                               dead_layers="prune"), progress=False)
    dead = [n for n in stats if n.startswith("model.vision_tower.encoder.layers.1.")]
    assert report["dead_layer_names"] == sorted(dead, key=list(report["layers"]).index)
    before, after = weights_by_name(folders["hub4"]), weights_by_name(out)
    dense = {n: before[hub_name(n)] for n in stats}
    ks = allocation_k(dense, "modality", S, dead=set(dead))
    for name, w in dense.items():
        expected = torch.zeros_like(w) if name in dead else w * ref_layer_mask(w.float().abs(), ks[name])
        assert torch.equal(after[hub_name(name)], expected), name
    vision = report["modalities"]["vision"]
    assert vision["pruned"] >= math.floor(vision["params"] * S)


def test_original_layout_written_back_in_its_layout(ckpt, tmp_path):
    model, folders, stats, root = ckpt
    out = tmp_path / "out"
    prune(PruneConfig(model=folders["original-with-clip"], output=out, target_sparsity=S, method="magnitude"),
          progress=False)
    keys = set(weights_by_name(out))
    assert "model.mm_projector.0.weight" in keys and keys == set(weights_by_name(folders["original-with-clip"]))
    assert json.loads((out / "config.json").read_text())["mm_vision_tower"]


def test_bad_inputs_fail_before_writing(ckpt, tmp_path):
    model, folders, stats, root = ckpt
    out = tmp_path / "out"
    other = multiflow.compute_distribution(folders["original-with-clip"], 0.5).save(tmp_path / "other.json")
    cases = [
        (dict(distribution=other, stats=root / "stats.safetensors"), "another model"),
        (dict(target_sparsity=S, stats=root / "stats-original.safetensors"), "no statistics for layer"),
        (dict(structure=Structure(2, 4), distribution=other, method="magnitude"), "drop --distribution"),
        (dict(target_sparsity=S, method="wanda"), "--stats"),
        (dict(target_sparsity=S, allocation="uniform", distribution=other, method="magnitude"), "applies to --allocation modality"),
        (dict(structure=Structure(3, 5), stats=root / "stats.safetensors"), "not a multiple of M=5"),
    ]
    for kwargs, message in cases:
        with pytest.raises(MultiflowError, match=message):
            prune(PruneConfig(model=folders["hub4"], output=out, **kwargs), progress=False)
        assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out")]
    with pytest.raises(MultiflowError, match="N:M"):
        Structure.parse("4:4")
    with pytest.raises(MultiflowError, match="input model folder"):
        prune(PruneConfig(model=folders["hub4"], output=folders["hub4"], target_sparsity=S, method="magnitude",
                          overwrite=True), progress=False)
    assert (folders["hub4"] / "model.safetensors").is_file()
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(MultiflowError, match="--overwrite"):
        prune(PruneConfig(model=folders["hub4"], output=out, target_sparsity=S, method="magnitude"), progress=False)
    assert (out / "keep.txt").read_text() == "x"


def test_cli_prune_and_run(ckpt, tmp_path, capsys):
    from multiflow.cli import main

    model, folders, stats, root = ckpt
    out = tmp_path / "p"
    assert main(["prune", "--model", str(folders["hub4"]), "--stats", str(root / "stats.safetensors"),
                 "--target-sparsity", "0.5", "--output", str(out), "--method", "wanda", "--group", "row"]) == 0
    text = capsys.readouterr().out
    assert "MULTIFLOW Step 3" in text and "GLOBAL" in text
    report = json.loads((out / "multiflow_report.json").read_text())
    assert report["method"] == "wanda" and report["group"] == "row" and report["calibration"]["data"] == "synthetic"
    assert main(["prune", "--model", str(folders["hub4"]), "--target-sparsity", "0.5", "--output", str(out),
                 "--method", "magnitude"]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert main(["prune", "--model", str(folders["hub4"]), "--structure", "2:2", "--output", str(tmp_path / "q"),
                 "--method", "magnitude"]) == 2
    assert "0 < N < M" in capsys.readouterr().err


@pytest.mark.parametrize("method,allocation,group,structure", [
    ("multiflow", "modality", "layer", "unstructured"), ("wanda", "uniform", "row", "unstructured"),
    ("magnitude", "global", "layer", "unstructured"), ("multiflow", "modality", "layer", "1:4"),
])
def test_prune_module_in_memory_equals_the_checkpoint_path(ckpt, tmp_path, method, allocation, group, structure):
    import copy

    model, folders, stats, root = ckpt
    target = None if structure != "unstructured" else S
    stats_arg = None if method == "magnitude" else root / "stats.safetensors"
    report = prune(PruneConfig(model=folders["inmemory"], output=tmp_path / "out", target_sparsity=target,
                               stats=stats_arg, method=method, allocation=allocation, group=group,
                               structure=Structure.parse(structure)), progress=False)
    written = weights_by_name(tmp_path / "out")
    pruned = copy.deepcopy(model)
    in_memory = multiflow.prune_module(pruned, target, stats=None if method == "magnitude" else stats, method=method,
                                       allocation=allocation, group=group, structure=structure)
    assert in_memory["layers"] == report["layers"] and in_memory["global"] == report["global"]
    for name in report["layers"]:
        assert torch.equal(pruned.get_submodule(name).weight, written[name + ".weight"]), name
    assert in_memory["global"]["pruned"] > 0
    untouched = copy.deepcopy(model)
    with pytest.raises(MultiflowError, match="statistics"):
        multiflow.prune_module(untouched, 0.5, method="wanda")
    assert all(torch.equal(a, b) for a, b in zip(untouched.state_dict().values(), model.state_dict().values()))
