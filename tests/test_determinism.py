"""Determinism that can be checked (issue 11): with --deterministic-report two identical runs give the same bytes."""

from __future__ import annotations

import json

import pytest

from safetensors import safe_open

from multiflow.calibration.calibrate import VOLATILE_META_FIELDS
from multiflow.cli import main
from multiflow.pruning.report import VOLATILE_REPORT_FIELDS, drop_volatile


def files(folder) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_drop_volatile_removes_exactly_the_documented_fields():
    report = {"timings": {"prune_seconds": 1.5}, "calibration": {"nsamples": 2, "peak_device_memory_gib": 3.1},
              "global": {"pruned": 7}}
    assert drop_volatile(report) == {"calibration": {"nsamples": 2}, "global": {"pruned": 7}}
    assert drop_volatile({"calibration": None}) == {"calibration": None}
    assert VOLATILE_REPORT_FIELDS == ("timings", "calibration.peak_device_memory_gib")
    assert VOLATILE_META_FIELDS == ("seconds", "peak_device_memory_gib")


@pytest.mark.slow
def test_two_identical_runs_give_byte_identical_folders(demo, jsonl, tmp_path, capsys):
    common = ["run", "--method", "multiflow", "--model", str(demo[0]), "--data", str(jsonl), "--nsamples", "3", "--target-sparsity", "0.4",
              "--quiet"]
    for name in ("a", "b"):
        assert main([*common, "--output", str(tmp_path / name), "--deterministic-report"]) == 0
    first, second = files(tmp_path / "a"), files(tmp_path / "b")
    assert first.keys() == second.keys() and "multiflow_report.json" in first
    assert [name for name in first if first[name] != second[name]] == []
    report = json.loads(first["multiflow_report.json"])
    assert "timings" not in report and "peak_device_memory_gib" not in report["calibration"]
    assert report["calibration"]["nsamples"] == 3
    assert main([*common, "--output", str(tmp_path / "timed")]) == 0  # without the flag: the timings are there
    timed = json.loads((tmp_path / "timed" / "multiflow_report.json").read_text())
    assert set(timed["timings"]) == {"calibrate_seconds", "distribute_seconds", "prune_seconds"}
    assert drop_volatile(timed) == report
    assert files(tmp_path / "timed")["model.safetensors"] == first["model.safetensors"]


def test_two_identical_calibrations_give_byte_identical_statistics(demo, jsonl, tmp_path, capsys):
    common = ["calibrate", "--model", str(demo[0]), "--data", str(jsonl), "--nsamples", "2", "--quiet"]
    for name in ("a", "b"):
        assert main([*common, "--output", str(tmp_path / f"{name}.safetensors"), "--deterministic-report"]) == 0
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert main([*common, "--output", str(tmp_path / "timed.safetensors")]) == 0
    metas = []
    for name in ("a", "timed"):
        with safe_open(str(tmp_path / f"{name}.safetensors"), "pt") as f:
            metas.append(json.loads(f.metadata()["multiflow"]))
    assert "seconds" not in metas[0] and metas[1]["seconds"] > 0
    assert {k: v for k, v in metas[1].items() if k not in VOLATILE_META_FIELDS} == metas[0]
