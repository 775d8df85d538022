"""No silent wrong result (issue 11, part 2): what multiflow refuses instead of writing a wrong model.

One test per guarantee, each with its fixture built here: non-finite statistics, activations and
weights; the pruned counts checked against the plan before the output is moved into place;
misshapen linears and overlapping safetensors; distribution file names; an unrelated eval reference.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from multiflow.cli import main
from multiflow.errors import MultiflowError
from multiflow.pruning import masks
from multiflow.storage.stats_file import LayerStats, load_stats, save_stats

Q0 = "model.language_model.layers.0.self_attn.q_proj"
Q0_HUB = "language_model.model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A tiny LLaVA checkpoint in the llava-hf hub layout (no processor: distribute and prune only)."""
    from conftest import hub_key, state, tiny_llava, write_checkpoint

    model = tiny_llava(seed=2)
    root = tmp_path_factory.mktemp("wrong")
    tensors = {hub_key(k): v for k, v in state(model).items()}
    return write_checkpoint(root / "tiny", tensors, model.config.to_dict()), tensors


def edited(src: Path, dst: Path, change) -> Path:
    """A copy of the checkpoint folder src whose single model.safetensors went through change(tensors)."""
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


def fails(capsys, argv: list[str], *expected: str) -> str:
    """Run the CLI; it must exit 2 with a one-line message containing every expected piece."""
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("multiflow: error:") and "Traceback" not in err
    for piece in expected:
        assert piece in err, (piece, err)
    return err


# --- statistics files -------------------------------------------------------------------------------------

@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_stats_with_nan_inf_or_negative_sq_mean_are_refused_naming_layer_and_file(tmp_path, value):
    good = torch.tensor([1.0, 2.0, 3.0])
    bad = good.clone()
    bad[1] = value
    path = save_stats(tmp_path / "s.safetensors", {"a.fc": LayerStats(good, 4), "b.fc": LayerStats(bad, 4)}, {})
    with pytest.raises(MultiflowError, match=r"b\.fc\.sq_mean holds 1 NaN, inf or negative values \(feature 1"):
        load_stats(path)
    with pytest.raises(MultiflowError, match=str(path)):
        load_stats(path)
    split = save_stats(tmp_path / "t.safetensors",
                       {"a.fc": LayerStats(good, 4, {"image": (bad, 2), "text": (good.clone(), 2)})}, {})
    with pytest.raises(MultiflowError, match=r"a\.fc\.sq_mean\.image"):
        load_stats(split)


def test_stats_with_negative_or_inconsistent_token_counts_are_refused(tmp_path):
    mean = torch.ones(3)
    for stats, expected in (({"a.fc": LayerStats(mean, -5)}, r"a\.fc\.tokens must be one non-negative integer"),
                            ({"a.fc": LayerStats(mean, 0)}, r"layer a\.fc has 0 tokens but a sq_mean"),
                            ({"a.fc": LayerStats(None, 3)}, r"layer a\.fc has 3 tokens but no sq_mean")):
        path = save_stats(tmp_path / "s.safetensors", stats, {})
        with pytest.raises(MultiflowError, match=expected):
            load_stats(path)
    fine = save_stats(tmp_path / "ok.safetensors", {"a.fc": LayerStats(mean, 3), "b.fc": LayerStats(None, 0)}, {})
    stats, _ = load_stats(fine)
    assert stats["a.fc"].tokens == 3 and torch.equal(stats["a.fc"].sq_mean, mean) and stats["b.fc"].sq_mean is None


# --- non-finite activations during calibration --------------------------------------------------------------

def test_collector_names_the_first_layer_in_forward_order_that_sees_non_finite_sums():
    from multiflow.calibration.statistics import collect_statistics

    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 4), torch.nn.Linear(4, 4))
    with torch.no_grad():
        model[0].weight.fill_(1e30)  # finite weights; the next layer's x^2 overflows float32
    x = torch.ones(2, 4)
    with pytest.raises(MultiflowError, match=r"^layer 1 is the first to see non-finite"):
        with collect_statistics(model, ["0", "1", "2"], None) as collector:
            model(x)
    assert collector.layers["0"].all.tokens == 2 and collector.layers["1"].all.tokens == 0
    assert not model[1]._forward_pre_hooks  # hooks removed on the error
    with pytest.raises(MultiflowError, match="^layer 0 is the first"):
        with collect_statistics(model, ["0"], None):
            model(torch.full((1, 4), float("nan")))


@pytest.mark.parametrize("mode", [[], ["--whole-model"]], ids=["block-by-block", "whole-model"])
def test_calibration_overflow_stops_at_the_first_layer(demo, jsonl, tmp_path, capsys, mode):
    """A finite but huge norm weight: layer 1's q_proj is the first whose input squares overflow; no stats file."""
    folder = edited(demo[0], tmp_path / "m",
                    lambda t: t["language_model.model.layers.1.input_layernorm.weight"].fill_(1e30))
    out = tmp_path / "stats.safetensors"
    fails(capsys, ["calibrate", "--model", str(folder), "--data", str(jsonl), "--nsamples", "3", "--batch-size", "2",
                   "--output", str(out), "--quiet", *mode],
          "layer model.language_model.layers.1.self_attn.q_proj is the first to see non-finite")
    assert not out.exists()


@pytest.mark.parametrize("mode", [[], ["--whole-model"]], ids=["block-by-block", "whole-model"])
def test_nan_in_a_norm_weight_stops_calibrate_and_run(demo, jsonl, tmp_path, capsys, mode):
    """Today's 81.7%-for-0.5 case: a NaN in a norm weight. Named with its file before any statistic is kept."""
    key = "language_model.model.layers.1.input_layernorm.weight"
    folder = edited(demo[0], tmp_path / "m", lambda t: t[key].__setitem__(3, float("nan")))
    out = tmp_path / "stats.safetensors"
    fails(capsys, ["calibrate", "--model", str(folder), "--data", str(jsonl), "--nsamples", "2", "--output", str(out),
                   "--quiet", *mode], repr(key), "model.safetensors", "NaN or inf")
    assert not out.exists()
    fails(capsys, ["run", "--method", "multiflow", "--model", str(folder), "--data", str(jsonl), "--nsamples", "2", "--target-sparsity", "0.5",
                   "--output", str(tmp_path / "pruned"), "--quiet", *mode], repr(key), "NaN or inf")
    assert not (tmp_path / "pruned").exists()


def test_weights_that_overflow_the_calibration_dtype_are_named(demo, jsonl, tmp_path, capsys):
    key = "language_model.model.layers.0.post_attention_layernorm.weight"
    folder = edited(demo[0], tmp_path / "m", lambda t: t[key].__setitem__(0, 1e6))  # finite in float32
    fails(capsys, ["calibrate", "--model", str(folder), "--data", str(jsonl), "--nsamples", "1", "--dtype", "float16",
                   "--output", str(tmp_path / "s.safetensors"), "--quiet"], repr(key), "overflows torch.float16")


# --- non-finite weights in Step 1 and Step 3 -----------------------------------------------------------------

def test_prune_refuses_nan_in_any_floating_tensor_naming_it_and_its_file(tiny, tmp_path, capsys):
    folder, _ = tiny
    for key in ("language_model.model.norm.weight", "vision_tower.vision_model.embeddings.patch_embedding.weight",
                Q0_HUB):
        bad = edited(folder, tmp_path / key, lambda t: t[key].view(-1).__setitem__(-1, float("inf")))
        out = tmp_path / f"{key}-out"
        fails(capsys, ["prune", "--model", str(bad), "--method", "magnitude", "--target-sparsity", "0.5",
                       "--output", str(out), "--quiet"], repr(key) if key != Q0_HUB else Q0, "model.safetensors")
        assert not out.exists() and [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []
    fails(capsys, ["distribute", "--model", str(tmp_path / Q0_HUB), "--target-sparsity", "0.5",
                   "--output", str(tmp_path / "d"), "--quiet"], Q0, repr(Q0_HUB), "NaN or inf")


# --- achieved counts checked against the plan --------------------------------------------------------------

def test_mask_check_accepts_exactly_the_documented_masks():
    score = torch.tensor([[0.1, 0.2, 0.2, 0.3], [0.5, 0.2, 0.9, 0.0]])
    ok = masks.layer_mask(score, 3)  # the 3rd smallest is 0.2, tied thrice: 0.0, 0.1 and three 0.2 pruned
    assert int((~ok).sum()) == 5
    assert all(masks.mask_violation(score, ok, k) is None for k in (3, 4, 5))  # k = 3..5 hit the same tie
    assert "fewer than k = 6" in masks.mask_violation(score, ok, 6)
    assert "k-th smallest score (k = 2)" in masks.mask_violation(score, ok, 2)  # 0.1 is the 2nd: 0.2s too many
    one_tie_kept = ok.clone()
    one_tie_kept[0, 2] = True
    assert "k-th smallest" in masks.mask_violation(score, one_tie_kept, 3)
    too_many = score <= 0.3  # prunes 0.3 as well: beyond the ties of the 3rd smallest
    assert masks.mask_violation(score, ~too_many, 3) is not None
    assert masks.mask_violation(score, torch.ones_like(ok), 0) is None
    assert "k = 0" in masks.mask_violation(score, ok, 0)
    rows = masks.row_mask(score, 1)
    assert masks.mask_violation(score, rows, 1, row=True) is None
    assert "ties" in masks.mask_violation(score, masks.row_mask(score, 2), 1, row=True)
    for n, m in ((1, 4), (3, 4), (1, 2)):
        keep = masks.n_m_mask(score, n, m)
        assert masks.mask_violation(score, keep, 0, n_m=(n, m)) is None
    swapped = masks.n_m_mask(score, 3, 4)
    swapped[0, 0], swapped[0, 3] = True, False  # keeps 0.1, prunes 0.3
    assert "not score at or below every kept one" in masks.mask_violation(score, swapped, 0, n_m=(3, 4))
    assert masks.mask_violation(score, masks.n_m_mask(score, 1, 4), 0, n_m=(3, 4)).startswith("a group of 4 keeps 1")
    nan = score.clone()
    nan[0, 0] = float("nan")
    assert "NaN" in masks.mask_violation(nan, masks.layer_mask(score, 3), 3)


@pytest.mark.parametrize("group", ["layer", "row"])
def test_a_mask_that_breaks_the_plan_is_an_error_and_nothing_is_written(tiny, tmp_path, monkeypatch, group):
    """layer: the one-pass zeroing at a threshold one score too high (the (k+1)-th smallest); row: a mask
    that prunes one weight more (checked_mask's path)."""
    from multiflow.pruning.config import PruneConfig
    from multiflow.pruning.prune import prune

    folder, _ = tiny
    real_kth, real_rows = masks.kth_smallest, masks.row_mask

    def one_more(score, k):  # prunes one weight above the k-th smallest of a row
        keep = real_rows(score, k)
        keep.view(-1)[int(torch.nonzero(keep.view(-1))[0])] = False
        return keep

    if group == "layer":
        monkeypatch.setattr(masks, "kth_smallest", lambda score, k: real_kth(score, k + 1))
    else:
        monkeypatch.setattr(masks, "row_mask", one_more)
    with pytest.raises(MultiflowError, match=r"the mask does not match the plan"):
        prune(PruneConfig(model=folder, output=tmp_path / "out", target_sparsity=0.5, method="magnitude",
                          group=group), progress=False)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


def test_report_counts_are_checked_against_the_written_counts(tiny, tmp_path, monkeypatch):
    from multiflow.pruning import report as reporting
    from multiflow.pruning.config import PruneConfig
    from multiflow.pruning.prune import prune

    folder, _ = tiny
    real = reporting.build_report

    def off_by_one(*args):
        report = real(*args)
        report["modalities"]["vision"]["pruned"] += 1
        return report

    monkeypatch.setattr(reporting, "build_report", off_by_one)
    with pytest.raises(MultiflowError, match=r"modality vision: \d+ weights pruned, the report says"):
        prune(PruneConfig(model=folder, output=tmp_path / "out", target_sparsity=0.5, method="magnitude"),
              progress=False)
    assert not (tmp_path / "out").exists()


def test_written_zeros_are_counted_from_the_bytes_and_dead_layers_are_all_zero(tiny, tmp_path):
    """Magnitude + Step 1's counts are exact (no tie beyond k): every layer prunes exactly its planned count,
    and the zeros in the file are exactly the pruned weights; a dead layer is entirely zero."""
    from conftest import hub_key

    import multiflow

    folder, tensors = tiny
    report = multiflow.prune(folder, tmp_path / "out", 0.5, method="magnitude", dead_layers="prune")
    written = load_file(str(tmp_path / "out" / "model.safetensors"))
    dist = json.loads((tmp_path / "out" / "sparsity_distribution_0.5.json").read_text())
    assert report["dead_layer_names"]
    for name, row in report["layers"].items():
        weight = written[hub_key(name) + ".weight"]
        assert int((weight == 0).sum()) == row["pruned"] == dist["meta"]["layers"][name]["pruned"]
        if name in report["dead_layer_names"]:
            assert row["pruned"] == weight.numel() and not weight.any()
    for m, totals in report["modalities"].items():
        if totals["params"]:
            assert totals["pruned"] == dist["modality_stats"][m]["pruned_params"]


def test_zero_check_catches_data_that_is_not_the_pruned_tensor():
    from multiflow.models.inventory import Layer
    from multiflow.pruning.config import PruneConfig
    from multiflow.pruning.plan import LayerPlan
    from multiflow.pruning.writer import check_zeros

    tensor = torch.tensor([[1.0, 0.0], [2.0, 3.0]])
    keep = tensor != 0
    entry = type("E", (), {"dtype": torch.float32, "key": "w"})()
    plan = LayerPlan(Layer("w", "vision", (2, 2), torch.float32, None), k=1, target=0.25, pruned=1)
    config = PruneConfig(model=Path("m"), output=Path("o"), target_sparsity=0.25, method="magnitude")
    check_zeros(tensor.view(-1).view(torch.uint8), tensor, entry, plan, config, sparsegpt=False)
    with pytest.raises(MultiflowError, match="is not the pruned tensor"):
        check_zeros(tensor.clone().view(-1).view(torch.uint8), tensor, entry, plan, config, False)
    tensor[1, 1] = 0  # a kept weight that is zero: impossible for a layer group with k > 0
    with pytest.raises(MultiflowError, match="2 zeros in the data written"):
        check_zeros(tensor.view(-1).view(torch.uint8), tensor, entry, plan, config, sparsegpt=False)
    assert keep.sum() == 3


# --- misshapen linears and overlapping tensors -----------------------------------------------------------

@pytest.mark.parametrize("shape", [[-1], [4, 8, -1]], ids=["1-D", "3-D"])
def test_a_linear_that_is_not_2d_is_refused_by_every_command(tiny, tmp_path, capsys, shape):
    folder, _ = tiny
    bad = edited(folder, tmp_path / "m", lambda t: t.__setitem__(Q0_HUB, t[Q0_HUB].reshape(shape).contiguous()))
    for argv in (["distribute", "--target-sparsity", "0.5", "--output", str(tmp_path / "d")],
                 ["modalities"],
                 ["prune", "--method", "magnitude", "--target-sparsity", "0.5", "--output", str(tmp_path / "p")],
                 ["calibrate", "--output", str(tmp_path / "s.safetensors")]):
        fails(capsys, [argv[0], "--model", str(bad), *argv[1:]], repr(Q0_HUB), "model.safetensors", "not [out, in]")
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_a_flattened_projector_is_refused_but_a_norm_like_vector_passes(tiny, tmp_path, capsys):
    from multiflow.models import inventory as layers

    folder, _ = tiny
    key = "multi_modal_projector.linear_2.weight"  # no other layer has its role: caught by its length
    bad = edited(folder, tmp_path / "m", lambda t: t.__setitem__(key, t[key].reshape(-1).contiguous()))
    fails(capsys, ["modalities", "--model", str(bad)], repr(key), "not [out, in]")
    vector = "language_model.model.layers.0.mlp.scale.weight"  # width-long, like a norm's: not a linear
    fine = edited(folder, tmp_path / "n", lambda t: t.__setitem__(vector, torch.ones(32)))
    assert len(layers.from_checkpoint(fine).layers) == len(layers.from_checkpoint(folder).layers)


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_a_zero_size_linear_is_refused(tiny, tmp_path, capsys):
    folder, _ = tiny
    bad = edited(folder, tmp_path / "m", lambda t: t.__setitem__(Q0_HUB, torch.zeros(32, 0)))
    fails(capsys, ["distribute", "--model", str(bad), "--target-sparsity", "0.5", "--output", str(tmp_path / "d")],
          repr(Q0_HUB), "no weights (shape [32, 0])")
    assert not (tmp_path / "d").exists()
    from multiflow.models import inventory as layers
    from multiflow.models.families import ModalityRules, Rule

    rules = ModalityRules("test", ("vision",), (Rule(r"^fc$", "vision"),))
    with pytest.raises(MultiflowError, match=r"layer fc is a linear layer with no weights"):
        layers.from_module(torch.nn.ModuleDict({"fc": torch.nn.Linear(0, 4)}), rules)


def rewrite_offsets(path: Path, change) -> None:
    """Rewrite a safetensors file's header: change(header) edits the data_offsets in place; data kept."""
    raw = path.read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + length])
    data = raw[8 + length :]
    change(header)
    head = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(head)) + head + data)


def _overlap(header):
    """The second tensor (by offset) of the same size as the first is pointed at the first's bytes."""
    ordered = sorted((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][0])
    first = ordered[0]
    size = header[first]["data_offsets"][1] - header[first]["data_offsets"][0]
    twin = next(k for k in ordered[1:] if header[k]["data_offsets"][1] - header[k]["data_offsets"][0] == size
                and header[k]["dtype"] == header[first]["dtype"])
    header[twin]["data_offsets"] = list(header[first]["data_offsets"])


def _hole(header):
    for info in (v for k, v in header.items() if k != "__metadata__"):
        info["data_offsets"] = [info["data_offsets"][0] + 4, info["data_offsets"][1] + 4]


@pytest.mark.parametrize("change, expected", [(_overlap, "overlaps"), (_hole, "unused bytes before")],
                         ids=["overlap", "hole"])
def test_safetensors_whose_tensors_overlap_or_leave_holes_are_refused(tiny, tmp_path, capsys, change, expected):
    from safetensors import safe_open

    folder, _ = tiny
    bad = shutil.copytree(folder, tmp_path / "m")
    rewrite_offsets(bad / "model.safetensors", change)
    if change is _hole:  # the data moves 4 bytes on: pad the file so that only the hole is wrong
        with open(bad / "model.safetensors", "ab") as f:
            f.write(b"\0" * 4)
    with pytest.raises(Exception):  # the safetensors library refuses the file too
        safe_open(str(bad / "model.safetensors"), "pt")
    for argv in (["distribute", "--target-sparsity", "0.5", "--output", str(tmp_path / "d")],
                 ["modalities"],
                 ["prune", "--method", "magnitude", "--target-sparsity", "0.5", "--output", str(tmp_path / "p")],
                 ["calibrate", "--output", str(tmp_path / "s.safetensors")]):
        fails(capsys, [argv[0], "--model", str(bad), *argv[1:]], "model.safetensors is corrupt", expected)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


def test_tensors_outside_the_data_or_trailing_bytes_are_refused(tiny, tmp_path, capsys):
    from multiflow.storage.checkpoint import safetensors_header

    folder, _ = tiny
    trailing = shutil.copytree(folder, tmp_path / "t")
    with open(trailing / "model.safetensors", "ab") as f:
        f.write(b"junk")
    with pytest.raises(MultiflowError, match="4 bytes after its last tensor"):
        safetensors_header(trailing / "model.safetensors")
    outside = shutil.copytree(folder, tmp_path / "o")

    def negative(header):
        key = next(k for k in header if k != "__metadata__")
        header[key]["data_offsets"] = [-8, header[key]["data_offsets"][1] - header[key]["data_offsets"][0] - 8]

    rewrite_offsets(outside / "model.safetensors", negative)
    with pytest.raises(MultiflowError, match="outside its data section"):
        safetensors_header(outside / "model.safetensors")
    assert len(safetensors_header(folder / "model.safetensors")) == len(tiny[1])


# --- distribution file names ---------------------------------------------------------------------------------

def test_distribute_names_every_target_exactly(tiny, tmp_path, capsys):
    folder, _ = tiny
    out = tmp_path / "d"
    assert main(["distribute", "--model", str(folder), "--target-sparsity", "0.5", "0.5000001", "0.9999999",
                 "--output", str(out), "--no-plot", "--quiet"]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["sparsity_distribution_0.5.json", "sparsity_distribution_0.5000001.json",
                     "sparsity_distribution_0.9999999.json"]
    for name, target in zip(names, (0.5, 0.5000001, 0.9999999)):
        assert json.loads((out / name).read_text())["target_sparsity"] == target
    capsys.readouterr()
    fails(capsys, ["distribute", "--model", str(folder), "--target-sparsity", "0.5", "0.50", "--output",
                   str(tmp_path / "e"), "--quiet"], "given twice")
    assert not (tmp_path / "e").exists()


# --- eval --reference --------------------------------------------------------------------------------------

def _stub(cls: str, model_type: str, vocab: int, tokens: dict):
    from types import SimpleNamespace

    head = SimpleNamespace(weight=torch.empty(vocab, 1))
    model = type(cls, (), {"config": SimpleNamespace(model_type=model_type), "get_output_embeddings": lambda s: head})()
    tokenizer = SimpleNamespace(get_vocab=lambda: dict(tokens))
    return SimpleNamespace(model=model, processor=SimpleNamespace(tokenizer=tokenizer))


def test_reference_of_another_architecture_vocabulary_or_tokenizer_is_refused():
    from multiflow.evaluation.reference import check_reference

    mine = _stub("LlavaForConditionalGeneration", "llava", 10, {"a": 0})
    check_reference(mine, _stub("LlavaForConditionalGeneration", "llava", 10, {"a": 0}), Path("m"), Path("r"))
    for other, expected in ((_stub("Qwen2VLForConditionalGeneration", "qwen2_vl", 10, {"a": 0}), "is a Qwen2VL"),
                            (_stub("LlavaForConditionalGeneration", "llava", 12, {"a": 0}), "predicts 12 tokens"),
                            (_stub("LlavaForConditionalGeneration", "llava", 10, {"b": 0}), "another tokenizer")):
        with pytest.raises(MultiflowError, match=expected):
            check_reference(mine, other, Path("m"), Path("r"))


def test_reference_sharing_nothing_gets_a_warning():
    from multiflow.evaluation.reference import reference_warnings

    assert reference_warnings({"kl": 0.3, "top1_agreement": 0.9}, Path("r")) == []
    assert reference_warnings({"accuracy": 1.0}, Path("r")) == []
    assert "KL 15.00" in reference_warnings({"kl": 15.0, "top1_agreement": 0.5}, Path("r"))[0]
    assert "agreement 0.0%" in reference_warnings({"kl": 1.0, "top1_agreement": 0.0}, Path("r"))[0]


@pytest.fixture(scope="module")
def eval_pair(demo, tmp_path_factory):
    """The demo model, a copy with a larger vocabulary, and a copy whose output head is reversed."""
    from PIL import Image

    folder, model, processor = demo
    root = tmp_path_factory.mktemp("eval-ref")
    Image.new("RGB", (20, 20), (10, 200, 10)).save(root / "img.png")
    (root / "data.jsonl").write_text("\n".join(json.dumps({"image": "img.png", "question": f"What is {i}?",
                                                           "answer": "a b"}) for i in range(2)) + "\n")
    from transformers import LlavaForConditionalGeneration

    config = model.config.to_dict()
    config["text_config"]["vocab_size"] += 8
    bigger = LlavaForConditionalGeneration(type(model.config).from_dict(config))
    bigger.save_pretrained(root / "bigger")
    processor.save_pretrained(root / "bigger")
    edited(folder, root / "reversed", lambda t: t["language_model.lm_head.weight"].mul_(-1000))
    return folder, root


def test_eval_refuses_another_vocabulary_before_generating(eval_pair, capsys, monkeypatch):
    import multiflow.evaluation.evaluate as evaluation

    folder, root = eval_pair
    monkeypatch.setattr(evaluation, "_generate", lambda *a: pytest.fail("generated before the check"))
    fails(capsys, ["eval", "--model", str(folder), "--reference", str(root / "bigger"), "--data",
                   str(root / "data.jsonl"), "--output", str(root / "e.json"), "--quiet"],
          "predicts", "another vocabulary")
    assert not (root / "e.json").exists()


def test_eval_warns_when_the_reference_shares_nothing(eval_pair, caplog):
    from multiflow.evaluation.evaluate import EvalConfig, evaluate

    folder, root = eval_pair
    same = evaluate(EvalConfig(model=folder, reference=folder, data=root / "data.jsonl", max_new_tokens=2),
                    progress=False)
    assert same["warnings"] == []
    unrelated = evaluate(EvalConfig(model=folder, reference=root / "reversed", data=root / "data.jsonl",
                                    max_new_tokens=2), progress=False)
    assert unrelated["top1_agreement"] < 0.05 or unrelated["kl"] > 5
    assert len(unrelated["warnings"]) == 1 and "shares almost nothing" in caplog.text
