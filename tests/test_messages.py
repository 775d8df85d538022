"""Every failure is one line naming the file or flag and what to do; no traceback for user errors (issue 11).

One test per class of fault: numeric flags out of range, --allow-pickle where a command has no use
for it, pickled checkpoints on commands that read safetensors only, a malicious pickle, a library's
multi-line message, files that are not UTF-8, an unforeseen exception, and --trust-remote-code.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from multiflow.cli import main
from multiflow.errors import MultiflowError

SRC = Path(__file__).resolve().parent.parent / "src" / "multiflow"


def error_line(capsys, argv: list[str], code: int = 2) -> str:
    """Run the CLI, check its exit status and that stderr holds one error line and no traceback."""
    assert main(argv) == code
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("multiflow: error:")]
    assert len(errors) == 1, err
    return errors[0]


def usage_error(capsys, argv: list[str]) -> str:
    """An argparse usage error: exit status 2 and one line."""
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def pickled(demo, tmp_path_factory) -> Path:
    """The demo checkpoint with its weights as a plain tensor pickle (pytorch_model.bin)."""
    folder = tmp_path_factory.mktemp("pickled") / "model"
    shutil.copytree(demo[0], folder)
    torch.save(load_file(str(folder / "model.safetensors")), folder / "pytorch_model.bin")
    (folder / "model.safetensors").unlink()
    return folder


class _RunsCode:
    """Unpickling this calls os.system (what a malicious checkpoint does)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


# --- numeric flags -----------------------------------------------------------------------------

@pytest.mark.parametrize("value", ["0", "-3", "many"])
def test_eval_max_new_tokens_below_one_is_a_usage_error(capsys, value):
    err = usage_error(capsys, ["eval", "--max-new-tokens", value])
    assert "--max-new-tokens" in err and ("at least 1" in err or "whole number" in err)


def test_eval_config_checks_its_counts():
    from multiflow.evaluation.evaluate import EvalConfig

    for field, flag in (("max_new_tokens", "--max-new-tokens"), ("batch_size", "--batch-size"),
                        ("nsamples", "--nsamples")):
        with pytest.raises(MultiflowError, match=f"^{flag} 0: give at least 1$"):
            EvalConfig(model=Path("m"), **{field: 0})


@pytest.mark.parametrize("argv, flag", [
    (["calibrate", "--nsamples", "0"], "--nsamples"),
    (["calibrate", "--batch-size", "0"], "--batch-size"),
    (["calibrate", "--samples-per-pass", "-2"], "--samples-per-pass"),
    (["run", "--method", "multiflow", "--target-sparsity", "0.5", "--nsamples", "-1"], "--nsamples"),
    (["run", "--method", "multiflow", "--target-sparsity", "0.5", "--batch-size", "0"], "--batch-size"),
    (["eval", "--nsamples", "0"], "--nsamples"),
    (["eval", "--batch-size", "-4"], "--batch-size"),
])
def test_nonsense_counts_are_one_line_errors_and_write_nothing(demo, tmp_path, capsys, argv, flag):
    output = tmp_path / ("out.safetensors" if argv[0] == "calibrate" else "out")
    tail = ["--output", str(output)] if argv[0] != "eval" else []
    line = error_line(capsys, [argv[0], "--model", str(demo[0]), *argv[1:], *tail])
    assert line.startswith(f"multiflow: error: {flag} ") and line.endswith("give at least 1")
    assert not output.exists()


# --- pickles -----------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["prune", "run"])
def test_allow_pickle_on_a_command_without_it_says_so(demo, tmp_path, capsys, command):
    line = error_line(capsys, [command, "--model", str(demo[0]), "--allow-pickle", "--target-sparsity", "0.5",
                               "--method", "magnitude", "--output", str(tmp_path / "o")])
    assert f"--allow-pickle: multiflow {command} does not support it" in line
    assert "pass --allow-pickle" not in line and not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", ["prune", "run", "eval"])
def test_pickled_checkpoint_on_a_command_without_the_flag_does_not_advise_it(pickled, tmp_path, capsys, command):
    argv = [command, "--model", str(pickled)]
    if command != "eval":
        argv += ["--target-sparsity", "0.5", "--method", "magnitude", "--output", str(tmp_path / "o")]
    line = error_line(capsys, argv)
    assert f"holds only pickled weights (pytorch_model.bin); multiflow {command} reads safetensors only" in line
    assert "--allow-pickle" not in line


def test_pickled_checkpoint_on_a_command_with_the_flag_advises_it(pickled, capsys):
    line = error_line(capsys, ["modalities", "--model", str(pickled)])
    assert "pass --allow-pickle" in line


def test_allow_pickle_block_by_block_names_what_to_do_instead(pickled, tmp_path, capsys):
    line = error_line(capsys, ["calibrate", "--model", str(pickled), "--allow-pickle", "--nsamples", "1",
                               "--output", str(tmp_path / "s.safetensors")])
    assert "block-by-block loading reads safetensors only" in line and "--whole-model" in line
    assert "pass --allow-pickle" not in line


def test_malicious_pickle_is_refused_by_weights_only_loading_in_one_line(pickled, tmp_path, capsys):
    folder = tmp_path / "evil"
    shutil.copytree(pickled, folder)
    marker = tmp_path / "it-ran"
    torch.save({"weight": torch.zeros(2), "payload": _RunsCode(marker)}, folder / "pytorch_model.bin")
    line = error_line(capsys, ["modalities", "--model", str(folder), "--allow-pickle"])
    assert line.startswith(f"multiflow: error: {folder / 'pytorch_model.bin'}: refused by weights_only loading "
                           f"(it references {os.system.__module__}.system)")
    assert "weights_only=False" not in line and "weights_only` set to `False`" not in line
    assert not marker.exists()


def test_pickle_with_an_unknown_opcode_is_refused_with_torchs_reason(pickled, tmp_path, capsys):
    folder = tmp_path / "garbage"
    shutil.copytree(pickled, folder)
    (folder / "pytorch_model.bin").write_bytes(b"garbage, not a pickle")
    line = error_line(capsys, ["distribute", "--model", str(folder), "--allow-pickle", "--target-sparsity", "0.5",
                               "--output", str(tmp_path / "d")])
    assert re.search(r"refused by weights_only loading \(Unsupported operand \d+\)", line)
    assert not (tmp_path / "d").exists()


# --- files and libraries ------------------------------------------------------------------------

def test_a_librarys_multi_line_message_becomes_one_line(demo, tmp_path, capsys):
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules: [\n")
    line = error_line(capsys, ["modalities", "--model", str(demo[0]), "--rules", str(rules)])
    assert line == (f"multiflow: error: rules file {rules} is not valid yaml: expected the node content, but "
                    "found '<stream end>' at line 2, column 1")


def test_files_that_are_not_utf8_are_one_line_errors(demo, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(demo[0], model)
    (model / "config.json").write_bytes(b"\xff\xfe{}")
    assert "config.json is not valid JSON" in error_line(capsys, ["modalities", "--model", str(model)])
    binary = tmp_path / "rules.yaml"
    binary.write_bytes(b"\xff\xfe")
    assert f"rules file {binary} is not UTF-8 text" in error_line(
        capsys, ["modalities", "--model", str(demo[0]), "--rules", str(binary)])
    distribution = tmp_path / "d.json"
    distribution.write_bytes(b"\xff\xfe")
    assert f"cannot read distribution {distribution}" in error_line(
        capsys, ["prune", "--model", str(demo[0]), "--distribution", str(distribution), "--method", "magnitude",
                 "--output", str(tmp_path / "o")])


def test_a_distribution_that_is_not_an_object_is_named(demo, tmp_path, capsys):
    listed = tmp_path / "list.json"
    listed.write_text("[1, 2]")
    line = error_line(capsys, ["prune", "--model", str(demo[0]), "--distribution", str(listed), "--method",
                               "magnitude", "--output", str(tmp_path / "o")])
    assert f"{listed} holds a JSON list, not a multiflow distribution" in line


def test_an_unreadable_report_in_evals_model_folder_is_no_crash(demo, tmp_path):
    from multiflow.cli import _default_eval_data

    model = tmp_path / "model"
    shutil.copytree(demo[0], model)
    for broken in ("{not json", "[1, 2]", '{"model": 5}'):
        (model / "multiflow_report.json").write_text(broken)
        assert _default_eval_data(str(model), model) is None  # not the demo model: the bundled photos


def test_an_unforeseen_exception_is_one_line_with_a_hint(monkeypatch, capsys):
    import multiflow.cli as cli

    def boom(args):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(cli, "cmd_modalities", boom)
    line = error_line(capsys, ["modalities"], code=1)
    assert line.startswith("multiflow: error: unexpected RuntimeError: something broke (rerun with --log-level DEBUG")

    def full(args):
        raise OSError(28, "No space left on device", "/data/out")

    monkeypatch.setattr(cli, "cmd_modalities", full)
    assert error_line(capsys, ["modalities"]) == "multiflow: error: /data/out: No space left on device"


# --- remote code ---------------------------------------------------------------------------------

def test_remote_code_names_python_files_and_auto_map_entries(demo, tmp_path, caplog):
    from multiflow.models.loading import remote_code, warn_remote_code

    folder = tmp_path / "custom"
    shutil.copytree(demo[0], folder)
    assert remote_code(folder) == []
    (folder / "modeling_custom.py").write_text("raise SystemExit('must not run in this test')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_custom.CustomConfig",
                          "AutoModelForImageTextToText": ["other/repo--modeling_x.X", None]}
    (folder / "config.json").write_text(json.dumps(config))
    assert remote_code(folder) == [
        "modeling_custom.py", "config.json auto_map AutoConfig -> configuration_custom.CustomConfig",
        "config.json auto_map AutoModelForImageTextToText -> other/repo--modeling_x.X"]
    with caplog.at_level(logging.WARNING, logger="multiflow"):
        warn_remote_code(folder)
        warn_remote_code(folder)  # once per folder
    warnings = [r.getMessage() for r in caplog.records if "--trust-remote-code" in r.getMessage()]
    assert len(warnings) == 1 and "modeling_custom.py" in warnings[0] and "other/repo--modeling_x.X" in warnings[0]


def test_trust_remote_code_is_opt_in_everywhere():
    from multiflow.calibration.calibrate import CalibrationConfig
    from multiflow.cli import build_parser
    from multiflow.evaluation.evaluate import EvalConfig

    for path in SRC.rglob("*.py"):
        assert not re.search(r"trust_remote_code\s*=\s*True", path.read_text()), path
    parser = build_parser()
    for command in (["calibrate"], ["run", "--method", "multiflow", "--output", "o"], ["eval"]):
        assert parser.parse_args(command).trust_remote_code is False
    assert CalibrationConfig(model=Path("m"), output=Path("s")).trust_remote_code is False
    assert EvalConfig(model=Path("m")).trust_remote_code is False
    readme = (SRC.parent.parent / "README.md").read_text()
    assert "never used unless you pass `--trust-remote-code`" in readme
