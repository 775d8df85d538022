"""The score registry, RIA, `--update obs` (any score + SparseGPT's OBS update) and score allocations with it."""

import json

import pytest
import torch

import multiflow
from reference import reference_sequential_obs
from multiflow.cli import build_parser, main
from multiflow.errors import MultiflowError
from multiflow.models.inventory import from_checkpoint
from multiflow.pruning import masks, scores
from multiflow.pruning.config import PruneConfig, Structure
from multiflow.pruning.masking import COMPARISON_GROUPS
from multiflow.pruning.methods import METHODS
from multiflow.pruning.methods import layer_score
from multiflow.pruning.plan import ALLOCATIONS, plan
from multiflow.storage.stats_file import load_stats


# --- RIA -------------------------------------------------------------------------------------------------------

def test_ria_on_a_hand_computed_3x4_example():
    """|W| row sums 4, 4, 8 and column sums 2, 2, 4, 8; a_j^0.5 = sq_mean_j^(1/4) = 1, 2, 3, 4: every value is a
    dyadic fraction, exact in float32. E.g. W[2, 2] = -3: (3/8 + 3/4) * 3 = 27/8."""
    w = torch.tensor([[1.0, -1.0, 0.0, 2.0], [-1.0, 0.0, 1.0, -2.0], [0.0, 1.0, -3.0, 4.0]])
    sq_mean = torch.tensor([1.0, 16.0, 81.0, 256.0])
    want = torch.tensor([[0.75, 1.5, 0.0, 3.0], [0.75, 0.0, 1.5, 3.0], [0.0, 1.25, 3.375, 4.0]])
    assert torch.equal(scores.ria_score(w, sq_mean), want)
    assert torch.equal(scores.SCORES["ria"](w, sq_mean), want)


def test_ria_matches_the_authors_formula_and_their_activation_scale_does_not_change_the_mask():
    """The RIA code (lib/prune.py): (|W|/sum(|W|, dim=0) + |W|/sum(|W|, dim=1)) * sqrt(scaler_row)**0.5, with
    scaler_row = sum over tokens of x^2 / nsamples = sq_mean * (tokens / nsamples): a factor common to the layer."""
    g = torch.Generator().manual_seed(3)
    w = torch.randn(7, 12, generator=g)
    sq_mean = torch.rand(12, generator=g) * 4
    a = w.double().abs()
    authors = (a / a.sum(dim=0) + a / a.sum(dim=1).reshape(-1, 1)) * torch.sqrt(sq_mean.double()) ** 0.5
    assert torch.allclose(scores.ria_score(w, sq_mean).double(), authors, rtol=1e-6, atol=0)
    scaled = (a / a.sum(dim=0) + a / a.sum(dim=1).reshape(-1, 1)) * torch.sqrt(sq_mean.double() * 37.5) ** 0.5
    for k in (0, 20, 42, 84):
        assert torch.equal(masks.layer_mask(scores.ria_score(w, sq_mean), k), masks.layer_mask(scaled, k))


def test_ria_zero_rows_and_columns_score_zero():
    w = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, -3.0]])  # row 0 and column 1 all zero
    s = scores.ria_score(w, torch.ones(3))
    assert torch.equal(s, torch.tensor([[0.0, 0.0, 0.0], [1 / 4 + 1, 0.0, 3 / 4 + 1]]))


# --- the registry ----------------------------------------------------------------------------------------------

def test_the_registry_is_the_single_list_of_scores():
    assert list(METHODS) == [*scores.SCORES, "sparsegpt"] and "ria" in scores.SCORES
    assert list(scores.TILE_SCORERS) == list(scores.SCORES)  # every score also works under --update obs
    parser = build_parser()
    subparsers = next(a for a in parser._actions if a.dest == "command").choices
    for command in ("run", "prune"):
        actions = {a.dest: a for a in subparsers[command]._actions}
        assert list(actions["method"].choices) == list(METHODS)
        assert all(scores.describe(n) in " ".join(actions["method"].help.split()) for n in scores.SCORES)
        assert list(actions["allocation"].choices) == list(ALLOCATIONS)
        assert all(a.help in " ".join(actions["allocation"].help.split()) for a in ALLOCATIONS.values())
        assert list(actions["group"].choices) == list(COMPARISON_GROUPS)


def test_an_unknown_allocation_or_group_is_an_error(tmp_path):
    for field, flag in (("allocation", "--allocation"), ("group", "--group")):
        with pytest.raises(MultiflowError, match=f"{flag} 'nope': choose one of"):
            PruneConfig(model=tmp_path, output=tmp_path / "o", target_sparsity=0.5, method="magnitude",
                        **{field: "nope"})


def test_an_unknown_score_is_an_error_never_a_fallback(tmp_path, capsys):
    w, sq = torch.randn(3, 4), torch.rand(4)
    for call in (lambda: scores.score("wandda", w, sq), lambda: layer_score("wandda", w, sq),
                 lambda: scores.tile_scorer("wandda", w, sq), lambda: scores.describe("wandda")):
        with pytest.raises(MultiflowError, match="'wandda'.*multiflow, wanda, magnitude, ria"):
            call()
    with pytest.raises(MultiflowError, match="--method 'wandda': choose one of multiflow, wanda, magnitude, ria"):
        PruneConfig(model=tmp_path, output=tmp_path / "o", target_sparsity=0.5, stats=tmp_path, method="wandda")
    with pytest.raises(MultiflowError, match="--method ria needs activation statistics"):
        scores.score("ria", w, None)
    with pytest.raises(SystemExit) as exit_:
        main(["run", "--output", str(tmp_path / "o"), "--target-sparsity", "0.5", "--method", "wandda"])
    assert exit_.value.code == 2 and "invalid choice: 'wandda'" in capsys.readouterr().err
    for name in scores.SCORES:  # every registered score scores like its function
        assert torch.equal(layer_score(name, w, sq), scores.SCORES[name](w, sq))


@pytest.mark.parametrize("name", list(scores.SCORES))
def test_tile_scores_on_the_start_weights_equal_the_score_bit_for_bit(name):
    g = torch.Generator().manual_seed(5)
    w = torch.randn(6, 20, generator=g)
    sq = torch.rand(20, generator=g)
    sq[3] = 0  # a dead input
    scorer = scores.tile_scorer(name, w, sq)
    full = scores.SCORES[name](w, sq)
    d = torch.ones(20)
    for columns in (slice(0, 20), slice(0, 8), slice(8, 16), slice(16, 20), slice(5, 9)):
        assert torch.equal(scorer(w[:, columns], d[columns], columns), full[:, columns]), columns


def test_tile_scores_take_w_from_the_tile_and_aggregates_from_the_start():
    """A tile changed by the update: its |W| is the tile's, the row / column factors stay those of the start."""
    w = torch.tensor([[1.0, -1.0, 0.0, 2.0], [-1.0, 0.0, 1.0, -2.0], [0.0, 1.0, -3.0, 4.0]])
    sq = torch.tensor([1.0, 16.0, 81.0, 256.0])
    tile = torch.tensor([[2.0, 0.5], [-0.25, 1.0], [0.0, -4.0]])  # "current" columns 2:4
    got = scores.tile_scorer("ria", w, sq)(tile, torch.ones(2), slice(2, 4))
    rows, cols, act = torch.tensor([4.0, 4.0, 8.0]), torch.tensor([4.0, 8.0]), torch.tensor([3.0, 4.0])
    assert torch.equal(got, (tile.abs() / rows[:, None] + tile.abs() / cols[None, :]) * act)
    a = sq.sqrt()
    imp_out, imp_in = (w.abs() @ a) / 4, a * w.abs().sum(0) / 3
    got = scores.tile_scorer("multiflow", w, sq)(tile, torch.ones(2), slice(2, 4))
    assert torch.equal(got, tile.abs() * imp_out[:, None] * imp_in[None, 2:4])
    assert torch.equal(scores.tile_scorer("wanda", w, sq)(tile, torch.ones(2), slice(2, 4)), tile.abs() * a[2:4])


# --- --update obs end to end -----------------------------------------------------------------------------------

def reference_scores(method, start, sq_mean):
    """Hand-written tile scores: |W| of the current tile; aggregates of the layer's weights before its update;
    a_j = sqrt(H_jj / 2)."""
    a = sq_mean.float().sqrt()
    big = start.float().abs()
    if method == "magnitude":
        return lambda t, d, c: t.abs()
    if method == "wanda":
        return lambda t, d, c: t.abs() * a[c]
    if method == "multiflow":
        imp_out, imp_in = (big @ a) / big.shape[1], a * big.sum(dim=0) / big.shape[0]
        return lambda t, d, c: t.abs() * imp_out[:, None] * imp_in[None, c]
    rows, cols = big.sum(dim=1), big.sum(dim=0)
    return lambda t, d, c: (t.abs() / rows[:, None] + t.abs() / cols[None, c]) * a[c].sqrt()


@pytest.mark.parametrize("method,target,structure,group", [
    ("multiflow", 0.5, "unstructured", "layer"), ("wanda", 0.6, "unstructured", "row"),
    ("ria", None, "2:4", "layer"), ("magnitude", 0.5, "unstructured", "layer"),
])
@pytest.mark.slow
def test_update_obs_equals_the_reference_bit_for_bit(demo, jsonl, tmp_path, method, target, structure, group):
    from transformers import LlavaForConditionalGeneration

    folder = demo[0]
    report = multiflow.run(folder, tmp_path / "out", target, data=jsonl, nsamples=3, method=method, update="obs",
                           structure=structure, group=group)
    assert (report["method"], report["update"], report["obs"]) == (method, "obs", {"blocksize": 128, "percdamp": 0.01})
    assert report["calibration"]["sequential"]
    config = PruneConfig(model=folder, output=tmp_path / "x", target_sparsity=target, method=method, stats=tmp_path,
                         group=group, structure=Structure.parse(structure), update="obs")
    want, differ = reference_sequential_obs(folder, jsonl, 3, config,
                                          score=lambda w, sq: reference_scores(method, w, sq))
    assert differ > 0  # the score, not SparseGPT's saliency, chose the masks
    original = {layer.name: w.clone() for layer, w in from_checkpoint(folder).read()}
    written = {layer.name: w.clone() for layer, w in from_checkpoint(tmp_path / "out").read()}
    assert set(written) == set(want) == set(report["layers"])
    for name, (new, keep, p) in want.items():
        got = written[name]
        assert torch.equal(got, new), name  # same masks, same updated weights
        assert torch.equal(got != 0, keep), name
        planned = p.layer.numel // 2 if structure == "2:4" else p.k * (p.layer.shape[0] if group == "row" else 1)
        assert report["layers"][name]["pruned"] == int((got == 0).sum()) == planned, name
        assert not torch.equal(got[keep], original[name][keep]), name  # the kept weights were updated
    LlavaForConditionalGeneration.from_pretrained(tmp_path / "out")


@pytest.mark.slow
def test_blocksize_and_percdamp_reach_the_update(demo, jsonl, tmp_path):
    folder = demo[0]
    report = multiflow.run(folder, tmp_path / "a", 0.5, data=jsonl, nsamples=2, method="wanda", update="obs",
                           blocksize=8, percdamp=0.1)
    assert report["obs"] == {"blocksize": 8, "percdamp": 0.1}
    multiflow.run(folder, tmp_path / "b", 0.5, data=jsonl, nsamples=2, method="wanda", update="obs")
    a = {layer.name: w.clone() for layer, w in from_checkpoint(tmp_path / "a").read()}
    b = {layer.name: w.clone() for layer, w in from_checkpoint(tmp_path / "b").read()}
    assert any(not torch.equal(a[n], b[n]) for n in a)


# --- score allocations with the update -------------------------------------------------------------------------

@pytest.mark.parametrize("method,update,allocation,planned_by", [
    ("sparsegpt", "none", "owl", "wanda"), ("multiflow", "obs", "scores", "multiflow"),
])
def test_score_allocations_with_the_update_plan_from_a_dense_pass(demo, jsonl, tmp_path, method, update, allocation,
                                                                   planned_by):
    folder = demo[0]
    report = multiflow.run(folder, tmp_path / "out", 0.6, data=jsonl, nsamples=3, method=method, update=update,
                           allocation=allocation)
    assert (report["update"], report["allocation"], report["allocation_score"]) == ("obs", allocation, planned_by)
    assert "allocation_calibrate_seconds" in report["timings"]
    # the plan from a dense statistics pass, computed here: `multiflow calibrate` then the allocation
    multiflow.calibrate(folder, tmp_path / "dense.safetensors", data=jsonl, nsamples=3)
    stats, _ = load_stats(tmp_path / "dense.safetensors")
    config = PruneConfig(model=folder, output=tmp_path / "x", target_sparsity=0.6, stats=tmp_path / "dense.safetensors",
                         method=planned_by, allocation=allocation)
    plans = plan(config, from_checkpoint(folder), progress=False, stats=stats)[0]
    written = {layer.name: w.clone() for layer, w in from_checkpoint(tmp_path / "out").read()}
    assert len({p.k / p.layer.numel for p in plans}) > 3  # the allocation is not uniform
    for p in plans:
        got = report["layers"][p.layer.name]
        assert got["pruned"] == int((written[p.layer.name] == 0).sum()) == p.k, p.layer.name
        assert got["target_sparsity"] == p.target, p.layer.name


def test_report_of_a_plain_run_says_no_update(demo, jsonl, tmp_path):
    report = multiflow.run(demo[0], tmp_path / "o", 0.5, data=jsonl, nsamples=2, method="ria")
    assert (report["method"], report["update"], report["obs"], report["allocation_score"]) == \
        ("ria", "none", None, None)


# --- refusals and the CLI --------------------------------------------------------------------------------------

def test_refusals_are_clear(demo, jsonl, tmp_path, capsys):
    folder = demo[0]
    with pytest.raises(MultiflowError, match="--update 'ob': choose one of none, obs"):
        multiflow.run(folder, tmp_path / "a", 0.5, data=jsonl, nsamples=2, update="ob", method="multiflow")
    with pytest.raises(MultiflowError, match="--update obs prunes block by block.*--whole-model"):
        multiflow.run(folder, tmp_path / "b", 0.5, data=jsonl, nsamples=2, update="obs", whole_model=True, method="multiflow")
    with pytest.raises(MultiflowError, match="--percdamp -1"):
        multiflow.run(folder, tmp_path / "c", 0.5, data=jsonl, nsamples=2, method="magnitude", percdamp=-1)
    config = PruneConfig(model=folder, output=tmp_path / "d", target_sparsity=0.5, stats=tmp_path, method="wanda",
                         update="obs")
    from multiflow.pruning.prune import prune

    with pytest.raises(MultiflowError, match="multiflow run --update obs"):
        prune(config, progress=False)
    assert main(["run", "--method", "multiflow", "--model", str(folder), "--output", str(tmp_path / "e"), "--target-sparsity", "0.5",
                 "--blocksize", "64"]) == 2
    assert "--blocksize sets the OBS weight update: add --update obs" in capsys.readouterr().err


def test_cli_run_update_obs(demo, jsonl, tmp_path):
    folder = demo[0]
    code = main(["run", "--model", str(folder), "--output", str(tmp_path / "o"), "--data", str(jsonl), "--nsamples",
                 "2", "--method", "ria", "--update", "obs", "--blocksize", "16", "--target-sparsity", "0.4",
                 "--quiet"])
    assert code == 0
    report = json.loads((tmp_path / "o" / "multiflow_report.json").read_text())
    assert (report["method"], report["update"], report["obs"]["blocksize"]) == ("ria", "obs", 16)
    assert report["global"]["pruned"] > 0


def test_each_pruning_option_is_defined_once():
    """The CLI's flags, defaults, choices and help for the pruning choices come from the config's fields
    (multiflow.options), and the Python API's defaults are the same values."""
    import inspect
    from dataclasses import fields

    from multiflow import api
    from multiflow.pruning.config import PAPER_DEFAULTS, RUN_RECOMMENDED, PruneConfig, run_choices

    options = [f for f in fields(PruneConfig) if "help" in f.metadata]
    assert {f.name for f in options} == {"method", "allocation", "group", "structure", "dead_layers", "update",
                                         "max_layer_sparsity", "prune_only"}
    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    by_run = set(RUN_RECOMMENDED)  # `run` leaves these to run_choices: recommended without --method, else the paper's
    for command in ("prune", "run"):
        actions = {a.dest: a for a in subparsers[command]._actions}
        for f in options:
            if f.name == "update" and command == "prune":
                continue
            default = None if command == "run" and f.name in by_run else f.metadata["cli_default"] or f.default
            assert actions[f.name].default == default, (command, f.name)
    for function in (api.prune, api.run, api.prune_module):
        parameters = inspect.signature(function).parameters
        for f in options:
            if f.name in parameters:
                default = None if function is api.run and f.name in by_run else f.metadata["cli_default"] or f.default
                assert parameters[f.name].default == default, (function, f.name)
    # with a method, run's other choices are the fields' defaults (the paper's); without one, the recommended
    paper = {f.name: f.default for f in options if f.name in by_run}
    assert run_choices("multiflow") == paper == {**PAPER_DEFAULTS, "method": "multiflow"}
    assert run_choices() == RUN_RECOMMENDED != paper
    assert run_choices(None, allocation="modality") == {**RUN_RECOMMENDED, "allocation": "modality"}
    assert run_choices("wanda", group="row") == {**PAPER_DEFAULTS, "method": "wanda", "group": "row"}


@pytest.mark.slow
def test_run_without_method_is_the_recommended_configuration(demo, jsonl, tmp_path):
    """`run` without --method = --method sparsegpt --allocation uniform --group row, byte for byte; with
    --method multiflow alone, the paper's method (modality allocation, layer groups, no update)."""
    folder = demo[0]
    common = ["run", "--model", str(folder), "--data", str(jsonl), "--nsamples", "2", "--target-sparsity", "0.5",
              "--quiet", "--deterministic-report"]
    assert main([*common, "--output", str(tmp_path / "default")]) == 0
    assert main([*common, "--output", str(tmp_path / "explicit"), "--method", "sparsegpt", "--allocation", "uniform",
                 "--group", "row"]) == 0
    assert main([*common, "--output", str(tmp_path / "paper"), "--method", "multiflow"]) == 0
    for name in ("model.safetensors", "multiflow_report.json"):
        assert (tmp_path / "default" / name).read_bytes() == (tmp_path / "explicit" / name).read_bytes(), name
    report = json.loads((tmp_path / "default" / "multiflow_report.json").read_text())
    assert (report["method"], report["update"], report["allocation"], report["group"]) == \
        ("sparsegpt", "obs", "uniform", "row")
    paper = json.loads((tmp_path / "paper" / "multiflow_report.json").read_text())
    assert (paper["method"], paper["update"], paper["allocation"], paper["group"]) == \
        ("multiflow", "none", "modality", "layer")
    # the API: the same resolution
    api_report = multiflow.run(folder, tmp_path / "api", 0.5, data=jsonl, nsamples=2, deterministic_report=True)
    assert (tmp_path / "api" / "model.safetensors").read_bytes() == (tmp_path / "default" / "model.safetensors").read_bytes()
    assert api_report["update"] == "obs"
