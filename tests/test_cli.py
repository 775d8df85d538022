"""The command line end to end: outputs, reports, and bad input that fails cleanly and writes nothing."""

import json
import shutil
import struct

import pytest
import torch
from safetensors.torch import load_file, save_file

import multiflow
from multiflow.cli import main


def run(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from conftest import hub_key, state, tiny_llava, write_checkpoint

    model = tiny_llava(dtype=torch.float16)
    root = tmp_path_factory.mktemp("cli")
    return write_checkpoint(root / "hub", {hub_key(k): v for k, v in state(model).items()}, model.config.to_dict())


def test_distribute_writes_json_png_and_report(hub, tmp_path, capsys):
    code, out, _ = run(["distribute", "--model_path", str(hub), "--target_sparsity", "0.3", "0.5", "--output", str(tmp_path)], capsys)
    assert code == 0
    for s in ("0.3", "0.5"):
        data = json.loads((tmp_path / f"sparsity_distribution_{s}.json").read_text())
        assert data["layer_distribution"] == multiflow.compute_distribution(hub, float(s)).layer_sparsity
        assert (tmp_path / f"sparsity_distribution_{s}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for heading in ("Prunable parameters by modality", "VISION: threshold", "FUSION: threshold", "Global summary", "Key insights"):
        assert heading in out
    assert "TEXT" in out and "more layers (--all-layers lists them)" in out


def test_quiet_prints_only_paths_and_output_file(hub, tmp_path, capsys):
    target = tmp_path / "mine.json"
    code, out, _ = run(["distribute", "--model", str(hub), "--target-sparsity", "0.5", "--output", str(target),
                        "--quiet", "--no-plot"], capsys)
    assert code == 0 and out.split() == [str(target)] and target.is_file()
    assert not (tmp_path / "mine.png").exists()


def test_all_layers_lists_every_layer(hub, tmp_path, capsys):
    _, out, _ = run(["distribute", "--model", str(hub), "--target-sparsity", "0.5", "--output", str(tmp_path),
                     "--all-layers", "--no-plot"], capsys)
    for name in multiflow.compute_distribution(hub, 0.5).layers:
        assert name in out


def test_modalities_command(hub, capsys):
    code, out, _ = run(["modalities", "--model", str(hub)], capsys)
    assert code == 0
    assert "output head" in out and "embedding" in out
    inventory = multiflow.inventory(hub)
    rows = {line.split()[0]: line.split()[1:3] for line in out.splitlines() if line.split()[:1] and
            line.split()[0] in ("VISION", "TEXT", "FUSION")}
    for modality, layers in inventory.by_modality().items():  # each modality's layer and weight counts, exactly
        assert rows[modality.upper()] == [str(len(layers)), f"{sum(l.numel for l in layers):,}"], modality
    assert int(rows["VISION"][0]) > 0 and int(rows["FUSION"][0]) > 0 and rows["TEXT"][0] == "0"  # LLaVA's grouping


def _corrupt(src, dst, how):
    shutil.copytree(src, dst)
    path = dst / "model.safetensors"
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "garbage-header":
        path.write_bytes(struct.pack("<Q", 20) + b"{not json at all!!!}" + data[28:])
    elif how == "empty":
        path.write_bytes(b"")
    return dst


def _with_weight(src, dst, value):
    shutil.copytree(src, dst)
    tensors = load_file(str(dst / "model.safetensors"))
    key = "language_model.model.layers.1.mlp.up_proj.weight"
    tensors[key][3, 2] = value
    save_file(tensors, str(dst / "model.safetensors"))
    return dst


BAD = {
    "not a number": (lambda hub, tmp: ["--model", str(hub), "--target-sparsity", "half"], "not a number"),
    "one": (lambda hub, tmp: ["--model", str(hub), "--target-sparsity", "1"], "outside [0, 1)"),
    "negative": (lambda hub, tmp: ["--model", str(hub), "--target-sparsity", "-0.1"], "outside [0, 1)"),
    "nan": (lambda hub, tmp: ["--model", str(hub), "--target-sparsity", "nan"], "outside [0, 1)"),
    "missing folder": (lambda hub, tmp: ["--model", str(tmp / "nope"), "--target-sparsity", "0.5"], "does not exist"),
    "no config": (lambda hub, tmp: ["--model", str(tmp), "--target-sparsity", "0.5"], "no config.json"),
    "no weights": (lambda hub, tmp: ["--model", str(_only_config(hub, tmp)), "--target-sparsity", "0.5"], "has no weights"),
    "truncated": (lambda hub, tmp: ["--model", str(_corrupt(hub, tmp / "c", "truncated")), "--target-sparsity", "0.5"], "truncated"),
    "garbage header": (lambda hub, tmp: ["--model", str(_corrupt(hub, tmp / "c", "garbage-header")), "--target-sparsity", "0.5"], "corrupt"),
    "empty file": (lambda hub, tmp: ["--model", str(_corrupt(hub, tmp / "c", "empty")), "--target-sparsity", "0.5"], "truncated"),
    "nan weight": (lambda hub, tmp: ["--model", str(_with_weight(hub, tmp / "c", float("nan"))), "--target-sparsity", "0.5"],
                   "model.language_model.layers.1.mlp.up_proj contains NaN or inf"),
    "inf weight": (lambda hub, tmp: ["--model", str(_with_weight(hub, tmp / "c", float("inf"))), "--target-sparsity", "0.5"],
                   "model.language_model.layers.1.mlp.up_proj contains NaN or inf"),
    "unknown architecture": (lambda hub, tmp: ["--model", str(_unknown_arch(hub, tmp)), "--target-sparsity", "0.5"], "--rules"),
    "pickle": (lambda hub, tmp: ["--model", str(_pickled(hub, tmp)), "--target-sparsity", "0.5"], "--allow-pickle"),
    "two targets, one file": (lambda hub, tmp: ["--model", str(hub), "--target-sparsity", "0.3", "0.5", "--output", str(tmp / "x.json")], "one file"),
    "vision tower on hf layout": (lambda hub, tmp: ["--model", str(hub), "--target-sparsity", "0.5", "--vision-tower", str(hub)], "original-layout"),
}


def _only_config(hub, tmp):
    (tmp / "m").mkdir()
    shutil.copy(hub / "config.json", tmp / "m" / "config.json")
    return tmp / "m"


def _unknown_arch(hub, tmp):
    shutil.copytree(hub, tmp / "u")
    (tmp / "u" / "config.json").write_text(json.dumps({"model_type": "mystery", "architectures": ["MysteryModel"]}))
    return tmp / "u"


def _pickled(hub, tmp):
    (tmp / "p").mkdir()
    shutil.copy(hub / "config.json", tmp / "p" / "config.json")
    torch.save(load_file(str(hub / "model.safetensors")), tmp / "p" / "pytorch_model.bin")
    return tmp / "p"


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_one_line_error_nothing_written(case, hub, tmp_path, capsys):
    make_args, message = BAD[case]
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    args = make_args(hub, tmp_path)
    if "--output" not in args:
        args += ["--output", str(out_dir)]
    with pytest.raises(SystemExit) if case in ("not a number", "one", "negative", "nan") else _no_raise() as exc:
        code, _, err = run(["distribute", *args], capsys)
    if exc is not None and isinstance(getattr(exc, "value", None), SystemExit):
        code, err = exc.value.code, capsys.readouterr().err
    assert code == 2
    lines = [l for l in err.splitlines() if "error:" in l]  # progress bars may precede it
    assert len(lines) == 1 and lines[0].startswith("multiflow") and message in lines[0], err
    assert list(out_dir.iterdir()) == []


class _no_raise:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def test_allow_pickle_loads_with_weights_only(hub, tmp_path, capsys):
    folder = _pickled(hub, tmp_path)
    code, _, _ = run(["distribute", "--model", str(folder), "--target-sparsity", "0.5", "--allow-pickle",
                      "--output", str(tmp_path / "o"), "--quiet"], capsys)
    assert code == 0
    got = json.loads((tmp_path / "o" / "sparsity_distribution_0.5.json").read_text())["layer_distribution"]
    assert got == multiflow.compute_distribution(hub, 0.5).layer_sparsity


def test_original_layout_vision_tower_flag(llava, tmp_path, capsys, caplog):
    _, folders = llava
    code, out, _ = run(["distribute", "--model", str(folders["original"]), "--target-sparsity", "0.5",
                        "--output", str(tmp_path), "--no-plot"], capsys)
    assert code == 0 and "VISION TOWER MISSING" in caplog.text and "VISION TOWER MISSING" in out
    code, out, _ = run(["distribute", "--model", str(folders["original"]), "--vision-tower", str(folders["clip"]),
                        "--target-sparsity", "0.5", "--output", str(tmp_path), "--no-plot", "--overwrite"], capsys)
    assert code == 0
    data = json.loads((tmp_path / "sparsity_distribution_0.5.json").read_text())
    assert data["meta"]["naming"] == "llava-original" and data["modality_stats"]["vision"]["num_layers"] == 12


def test_help_explains_every_flag(capsys):
    import argparse

    from multiflow.cli import build_parser

    commands = next(a for a in build_parser()._actions if a.dest == "command").choices
    assert {"distribute", "modalities", "calibrate", "prune", "run", "eval", "convert-gguf"} <= set(commands)
    for command, parser in commands.items():
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for action in parser._actions:
            if not action.option_strings or action.dest == "help":
                continue
            assert action.help and action.help != argparse.SUPPRESS, (command, action.option_strings)
            assert action.option_strings[0] in out, (command, action.option_strings)
            assert " ".join(action.help.split()).replace("%%", "%")[:40] in out, (command, action.option_strings)


@pytest.mark.slow
def test_every_command_runs_on_the_default_model(tmp_path, capsys, monkeypatch):
    """No --model: the bundled demo model (what `make demo` runs)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert main(["distribute", "--target-sparsity", "0.5", "--output", str(tmp_path / "d"), "--quiet"]) == 0
    assert main(["modalities"]) == 0
    assert main(["run", "--method", "multiflow", "--target-sparsity", "0.5", "--nsamples", "4", "--output", str(tmp_path / "r"), "--quiet"]) == 0
    assert main(["eval", "--model", str(tmp_path / "r"), "--nsamples", "4", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert (tmp_path / "d" / "sparsity_distribution_0.5.json").is_file() and (tmp_path / "r" / "model.safetensors").is_file()
    assert 0.0 <= float(out.strip().splitlines()[-1]) <= 1.0
