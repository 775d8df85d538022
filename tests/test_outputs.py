"""Outputs never touch what multiflow did not create: inputs, foreign folders, existing files; temporary
folders are cleaned after interruptions (also a SIGKILL); write failures are one line and leave nothing."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import multiflow
from multiflow.cli import main
from multiflow.errors import MultiflowError
from multiflow.storage import outputs

PRUNE = ["--method", "magnitude", "--target-sparsity", "0.5", "--quiet"]


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    from conftest import hub_key, state, tiny_llava, write_checkpoint

    model = tiny_llava(dtype=torch.float16)
    root = tmp_path_factory.mktemp("outputs")
    return write_checkpoint(root / "hub", {hub_key(k): v for k, v in state(model).items()}, model.config.to_dict())


@pytest.fixture
def model(hub, tmp_path):
    """A private copy of the checkpoint in tmp_path/parent/model, for tests that try to damage it."""
    import shutil

    return Path(shutil.copytree(hub, tmp_path / "parent" / "model"))


def fingerprint(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def one_error_line(capsys, *needles):
    err = capsys.readouterr().err
    lines = [l for l in err.splitlines() if "error:" in l]
    assert len(lines) == 1 and lines[0].startswith("multiflow: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def siblings(path: Path) -> list[str]:
    """Hidden temporary names multiflow may have left beside `path`."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}."))


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# ------------------------------------------------------------------------------------ inputs are never touched

def test_output_holding_the_model_is_refused_even_as_a_previous_output(model, capsys):
    parent = model.parent
    (parent / outputs.REPORT_NAME).write_text(json.dumps({"tool": "multiflow"}))  # looks like a previous output
    before = fingerprint(model)
    assert main(["prune", "--model", str(model), *PRUNE, "--output", str(parent), "--overwrite"]) == 2
    one_error_line(capsys, f"--output {parent} contains the input model folder")
    assert fingerprint(model) == before and (parent / outputs.REPORT_NAME).is_file()


@pytest.mark.parametrize("where", ["itself", "inside", "symlink"])
def test_output_that_is_or_is_inside_the_model_is_refused(model, tmp_path, capsys, where):
    output = {"itself": model, "inside": model / "pruned", "symlink": tmp_path / "link"}[where]
    if where == "symlink":
        output.symlink_to(model, target_is_directory=True)
    before = fingerprint(model)
    assert main(["prune", "--model", str(model), *PRUNE, "--output", str(output), "--overwrite"]) == 2
    one_error_line(capsys, "the input model folder")
    assert fingerprint(model) == before


def test_model_reached_through_a_symlink_is_protected(model, tmp_path, capsys):
    link = tmp_path / "model-link"
    link.symlink_to(model, target_is_directory=True)
    assert main(["prune", "--model", str(link), *PRUNE, "--output", str(model.parent), "--overwrite"]) == 2
    one_error_line(capsys, "contains the input model folder")
    assert (model / "model.safetensors").is_file()


def test_run_refuses_before_calibrating(model, capsys):
    assert main(["run", "--method", "multiflow", "--model", str(model), "--target-sparsity", "0.5", "--output", str(model / "out"),
                 "--quiet"]) == 2
    one_error_line(capsys, "inside the input model folder")
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]


def test_empty_output_is_an_error_never_the_current_folder(model, tmp_path, capsys, monkeypatch):
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    (cwd / "precious.txt").write_text("mine")
    monkeypatch.chdir(cwd)
    commands = [["prune", "--model", str(model), *PRUNE, "--overwrite"],
                ["run", "--method", "multiflow", "--model", str(model), *PRUNE, "--overwrite"],
                ["calibrate", "--model", str(model), "--overwrite"],
                ["distribute", "--model", str(model), "--target-sparsity", "0.5", "--overwrite"],
                ["eval", "--model", str(model), "--overwrite"]]
    for args in commands:
        assert main([*args, "--output", ""]) == 2, args
        one_error_line(capsys, "--output is empty")
    assert sorted(p.name for p in cwd.iterdir()) == ["precious.txt"]
    for call in (lambda: multiflow.prune(model, "", 0.5, method="magnitude", overwrite=True),
                 lambda: multiflow.run(model, "", 0.5, method="magnitude", overwrite=True),
                 lambda: multiflow.calibrate(model, "", overwrite=True)):
        with pytest.raises(MultiflowError, match="--output is empty"):
            call()
    assert sorted(p.name for p in cwd.iterdir()) == ["precious.txt"]
    for name in (".", "..", "sub/..", "/"):
        assert main(["prune", "--model", str(model), *PRUNE, "--overwrite", "--output", name]) == 2, name
        one_error_line(capsys, "give the folder by its name")
    assert sorted(p.name for p in cwd.iterdir()) == ["precious.txt"] and (model / "model.safetensors").is_file()


@pytest.mark.parametrize("how", ["direct", "symlink", "hardlink"])
def test_calibrate_never_writes_over_the_weights(model, tmp_path, capsys, how):
    weights = model / "model.safetensors"
    before = weights.read_bytes()
    output = {"direct": weights, "symlink": tmp_path / "stats.safetensors", "hardlink": tmp_path / "hard.safetensors"}[how]
    if how == "symlink":
        output.symlink_to(weights)
    elif how == "hardlink":
        os.link(weights, output)
    assert main(["calibrate", "--model", str(model), "--nsamples", "1", "--output", str(output), "--overwrite"]) == 2
    one_error_line(capsys, str(output), "input model folder")
    assert weights.read_bytes() == before
    with pytest.raises(MultiflowError, match="input model folder"):  # the Python API too
        multiflow.calibrate(model, output, nsamples=1, overwrite=True)
    assert weights.read_bytes() == before


def test_file_outputs_inside_the_model_are_refused(model, capsys):
    assert main(["distribute", "--model", str(model), "--target-sparsity", "0.5", "--output", str(model)]) == 2
    one_error_line(capsys, "inside the input model folder")
    assert main(["distribute", "--model", str(model), "--target-sparsity", "0.5",
                 "--output", str(model / "d.json")]) == 2
    one_error_line(capsys, "inside the input model folder")
    assert main(["eval", "--model", str(model), "--output", str(model / "eval.json")]) == 2
    one_error_line(capsys, "inside the --model folder")
    assert sorted(p.name for p in model.iterdir()) == ["config.json", "model.safetensors"]


# ------------------------------------------------------------------------------------ what --overwrite replaces

def test_foreign_folder_never_replaced_even_with_overwrite(hub, tmp_path, capsys):
    output = tmp_path / "mine"
    output.mkdir()
    (output / "thesis.tex").write_text("years of work")
    assert main(["prune", "--model", str(hub), *PRUNE, "--output", str(output), "--overwrite"]) == 2
    one_error_line(capsys, "holds no multiflow_report.json", "not even with --overwrite")
    assert sorted(p.name for p in output.iterdir()) == ["thesis.tex"] and siblings(output) == []
    (output / outputs.REPORT_NAME).write_text("not json")  # a report that multiflow did not write
    assert main(["prune", "--model", str(hub), *PRUNE, "--output", str(output), "--overwrite"]) == 2
    assert (output / "thesis.tex").read_text() == "years of work"


def test_previous_output_replaced_only_with_overwrite(hub, tmp_path, capsys):
    output = tmp_path / "out"
    output.mkdir()  # an empty folder is fine without --overwrite
    assert main(["prune", "--model", str(hub), *PRUNE, "--output", str(output)]) == 0
    first = json.loads((output / outputs.REPORT_NAME).read_text())
    assert first["target_sparsity"] == 0.5
    assert main(["prune", "--model", str(hub), "--method", "magnitude", "--target-sparsity", "0.3", "--quiet",
                 "--output", str(output)]) == 2
    one_error_line(capsys, "previous multiflow output", "--overwrite")
    assert json.loads((output / outputs.REPORT_NAME).read_text()) == first
    assert main(["prune", "--model", str(hub), "--method", "magnitude", "--target-sparsity", "0.3", "--quiet",
                 "--output", str(output), "--overwrite"]) == 0
    assert json.loads((output / outputs.REPORT_NAME).read_text())["target_sparsity"] == 0.3
    assert not (output / "sparsity_distribution_0.5.json").exists()  # the old output is gone, whole
    assert siblings(output) == []


def test_output_that_is_a_file(hub, tmp_path, capsys):
    file = tmp_path / "out"
    file.write_text("x")
    assert main(["prune", "--model", str(hub), *PRUNE, "--output", str(file), "--overwrite"]) == 2
    one_error_line(capsys, f"--output {file} is a file")
    assert main(["distribute", "--model", str(hub), "--target-sparsity", "0.5", "--output", str(file)]) == 2
    one_error_line(capsys, f"--output {file} is a file")
    assert main(["calibrate", "--model", str(hub), "--output", str(tmp_path)]) == 2
    one_error_line(capsys, "is a folder", "stats.safetensors")
    assert file.read_text() == "x"


def test_existing_files_replaced_only_when_asked(hub, tmp_path, capsys):
    out = tmp_path / "d"
    args = ["distribute", "--model", str(hub), "--target-sparsity", "0.5", "--output", str(out), "--quiet"]
    assert main(args) == 0
    json_path = out / "sparsity_distribution_0.5.json"
    json_path.write_text("edited")
    assert main(args) == 2
    one_error_line(capsys, str(json_path), "--overwrite")
    assert json_path.read_text() == "edited"
    assert main([*args, "--overwrite"]) == 0
    assert json.loads(json_path.read_text())["target_sparsity"] == 0.5
    existing = tmp_path / "eval.json"
    existing.write_text("earlier results")
    assert main(["eval", "--model", str(hub), "--output", str(existing)]) == 2  # refused before evaluating
    one_error_line(capsys, str(existing), "--overwrite")
    stats = tmp_path / "stats.safetensors"
    stats.write_text("earlier statistics")
    assert main(["calibrate", "--model", str(hub), "--output", str(stats)]) == 2
    one_error_line(capsys, str(stats), "--overwrite")
    with pytest.raises(MultiflowError, match="--overwrite"):
        multiflow.calibrate(hub, stats)
    assert existing.read_text() == "earlier results" and stats.read_text() == "earlier statistics"


def test_write_atomic_without_overwrite_never_replaces(tmp_path):
    path = tmp_path / "f.json"
    outputs.write_atomic(path, "one", overwrite=False)
    with pytest.raises(MultiflowError, match="exists"):
        outputs.write_atomic(path, "two", overwrite=False)
    assert path.read_text() == "one" and sorted(p.name for p in tmp_path.iterdir()) == ["f.json"]
    outputs.write_atomic(path, "three")
    assert path.read_text() == "three"


def test_targets_with_the_same_file_name(hub, tmp_path, capsys):
    assert main(["distribute", "--model", str(hub), "--target-sparsity", "0.5", "0.5", "--output", str(tmp_path)]) == 2
    one_error_line(capsys, "given twice")
    assert main(["distribute", "--model", str(hub), "--target-sparsity", "0.5", "0.5000001", "--no-plot", "--quiet",
                 "--output", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "sparsity_distribution_0.5000001.json").read_text())["target_sparsity"] == 0.5000001
    assert json.loads((tmp_path / "sparsity_distribution_0.5.json").read_text())["target_sparsity"] == 0.5


# ------------------------------------------------------------------------------------ temporary folders

def test_folder_created_at_output_during_the_run_is_kept(hub, tmp_path, capsys, monkeypatch):
    import multiflow.pruning.writer as writer

    output = tmp_path / "out"
    original = writer.write_pruned

    def meanwhile(*args, **kwargs):
        output.mkdir()
        (output / "someone-else.txt").write_text("theirs")
        return original(*args, **kwargs)

    monkeypatch.setattr(writer, "write_pruned", meanwhile)
    assert main(["prune", "--model", str(hub), *PRUNE, "--output", str(output), "--overwrite"]) == 2
    line = one_error_line(capsys, "changed while multiflow was writing", "the finished result is in")
    assert sorted(p.name for p in output.iterdir()) == ["someone-else.txt"]
    kept = Path(line.rsplit("the finished result is in ", 1)[1])
    assert kept.parent == output.parent and kept.name in siblings(output)
    assert (kept / "model.safetensors").is_file() and (kept / outputs.REPORT_NAME).is_file()
    assert not (kept / outputs.MARKER_NAME).exists()  # a kept result is not a leftover: never cleaned up


def test_previous_output_changed_during_the_run_is_kept(hub, tmp_path, capsys, monkeypatch):
    import multiflow.pruning.writer as writer

    output = tmp_path / "out"
    assert main(["prune", "--model", str(hub), *PRUNE, "--output", str(output)]) == 0
    original = writer.write_pruned

    def meanwhile(*args, **kwargs):  # another run replaces the output while this one writes
        (output / outputs.REPORT_NAME).write_text(json.dumps({"tool": "multiflow", "other": True}))
        return original(*args, **kwargs)

    monkeypatch.setattr(writer, "write_pruned", meanwhile)
    assert main(["prune", "--model", str(hub), *PRUNE, "--output", str(output), "--overwrite"]) == 2
    one_error_line(capsys, "changed while multiflow was writing")
    assert json.loads((output / outputs.REPORT_NAME).read_text())["other"] is True


@pytest.mark.parametrize("interrupt", [KeyboardInterrupt, MultiflowError, RuntimeError])
def test_failed_or_interrupted_run_removes_its_temporary_folder(hub, tmp_path, monkeypatch, interrupt):
    import multiflow.pruning.writer as writer

    def fail(src, dst, *args):
        assert (dst / outputs.MARKER_NAME).is_file() and dst.parent == tmp_path
        (dst / "model.safetensors").write_bytes(b"partial")
        raise interrupt("stop")

    monkeypatch.setattr(writer, "write_pruned", fail)
    with pytest.raises(interrupt):
        multiflow.prune(hub, tmp_path / "out", 0.5, method="magnitude")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


_SLOW_PRUNE = """
import sys, time
import multiflow.pruning.writer as writer
original = writer.write_pruned
def slow(src, dst, *args):
    digest = original(src, dst, *args)
    print("written", flush=True)
    time.sleep(120)
    return digest
writer.write_pruned = slow
from multiflow.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _start_slow_prune(hub: Path, output: Path) -> tuple[subprocess.Popen, Path]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PRUNE, "prune", "--model", str(hub), *PRUNE,
                             "--output", str(output)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "written", proc.stderr.read()  # mid-run: the copy is in its temp folder
    temps = [output.parent / n for n in siblings(output)]
    assert len(temps) == 1 and (temps[0] / "model.safetensors").is_file(), temps
    marker = json.loads((temps[0] / outputs.MARKER_NAME).read_text())
    assert marker["pid"] == proc.pid
    return proc, temps[0]


@pytest.mark.slow
def test_sigkill_leftover_is_cleaned_by_the_next_run(hub, tmp_path, caplog):
    output = tmp_path / "out"
    proc, temp = _start_slow_prune(hub, output)
    proc.kill()
    proc.wait(timeout=30)
    proc.stdout.close(), proc.stderr.close()
    assert temp.is_dir() and not output.exists()  # what SIGKILL leaves
    assert main(["prune", "--model", str(hub), *PRUNE, "--output", str(output)]) == 0
    assert not temp.exists() and siblings(output) == [] and (output / outputs.REPORT_NAME).is_file()
    assert f"removed {temp}: the temporary folder of an interrupted multiflow run (pid {proc.pid})" in caplog.text


@pytest.mark.slow
def test_sigterm_removes_the_temporary_folder(hub, tmp_path):
    output = tmp_path / "out"
    proc, temp = _start_slow_prune(hub, output)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    proc.stdout.close()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert err.strip().splitlines()[-1] == "multiflow: terminated"
    assert not temp.exists() and not output.exists() and siblings(output) == []


def test_leftovers_of_live_or_unmarked_runs_are_left_alone(hub, tmp_path):
    output = tmp_path / "out"
    live = tmp_path / f".out.multiflow-tmp-{os.getpid()}-0a0a0a0a"  # this process: alive
    live.mkdir()
    (live / outputs.MARKER_NAME).write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    unmarked = tmp_path / f".out.multiflow-tmp-{dead_pid()}-0b0b0b0b"  # no marker: not known to be ours
    unmarked.mkdir()
    (unmarked / "data").write_text("x")
    multiflow.prune(hub, output, 0.5, method="magnitude")
    assert live.is_dir() and (unmarked / "data").is_file()


def test_previous_output_set_aside_by_a_killed_run_is_restored(hub, tmp_path, caplog):
    output = tmp_path / "out"
    multiflow.prune(hub, output, 0.5, method="magnitude")
    before = fingerprint(output)
    aside = tmp_path / f".out.multiflow-old-{dead_pid()}-0c0c0c0c"
    output.rename(aside)  # killed between "set the old output aside" and "move the new one in"
    with pytest.raises(MultiflowError, match="previous multiflow output"):  # restored, so --overwrite is needed
        multiflow.prune(hub, output, 0.3, method="magnitude")
    assert fingerprint(output) == before and not aside.exists() and "restored" in caplog.text
    aside.mkdir()  # killed after the new output was moved in: the old one is deleted
    (aside / outputs.REPORT_NAME).write_text("{}")
    multiflow.prune(hub, output, 0.3, method="magnitude", overwrite=True)
    assert not aside.exists() and siblings(output) == []


# ------------------------------------------------------------------------------------ write failures

def _no_space(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device", "somewhere")


def test_full_disk_during_prune_one_line_nothing_partial(hub, tmp_path, capsys, monkeypatch):
    import multiflow.pruning.writer as writer

    def full(src, dst, *args):
        (dst / "model.safetensors").write_bytes(b"half a checkpoint")
        raise OSError(errno.ENOSPC, "No space left on device", str(dst / "model.safetensors"))

    monkeypatch.setattr(writer, "write_pruned", full)
    output = tmp_path / "out"
    assert main(["prune", "--model", str(hub), *PRUNE, "--output", str(output)]) == 2
    one_error_line(capsys, f"cannot write {output}", "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_chart_failure_leaves_no_json(hub, tmp_path, capsys, monkeypatch):
    import multiflow.reporting.plots as plots

    monkeypatch.setattr(plots, "plot_distribution", _no_space)
    assert main(["distribute", "--model", str(hub), "--target-sparsity", "0.3", "0.5", "--output", str(tmp_path)]) == 2
    one_error_line(capsys, "No space left on device")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_read_only_file_system_one_line(hub, tmp_path, capsys, monkeypatch):
    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system", str(tmp_path))

    monkeypatch.setattr(outputs.tempfile, "mkstemp", read_only)
    assert main(["distribute", "--model", str(hub), "--target-sparsity", "0.5", "--output", str(tmp_path)]) == 2
    one_error_line(capsys, "Read-only file system")
    monkeypatch.setattr(outputs.os, "mkdir", read_only)
    assert main(["prune", "--model", str(hub), *PRUNE, "--output", str(tmp_path / "out")]) == 2
    one_error_line(capsys, f"cannot write {tmp_path / 'out'}", "Read-only file system")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_read_only_folder(hub, tmp_path, capsys):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        assert main(["prune", "--model", str(hub), *PRUNE, "--output", str(folder / "out")]) == 2
        one_error_line(capsys, "Permission denied")
        assert main(["distribute", "--model", str(hub), "--target-sparsity", "0.5", "--output", str(folder)]) == 2
        one_error_line(capsys, "Permission denied")
        assert list(folder.iterdir()) == []
    finally:
        folder.chmod(0o755)


# ------------------------------------------------------------------------------------ modes

def test_modes_follow_the_umask(hub, tmp_path):
    old = os.umask(0o027)
    try:
        assert outputs.umask() == 0o027
        out = tmp_path / "out"
        multiflow.prune(hub, out, 0.5, method="magnitude")
        assert main(["distribute", "--model", str(hub), "--target-sparsity", "0.5", "--output", str(tmp_path / "d"),
                     "--quiet"]) == 0
        single = outputs.write_atomic(tmp_path / "single.json", "{}")
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == 0o750
    files = [*out.iterdir(), *(tmp_path / "d").iterdir(), single]
    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", outputs.REPORT_NAME,
                                               "sparsity_distribution_0.5.json", "sparsity_distribution_0.5.png"}
    assert {p.name: p.stat().st_mode & 0o777 for p in files} == {p.name: 0o640 for p in files}
