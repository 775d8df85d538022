"""Bounded memory on hostile images (issue 11): a calibration image is reduced as soon as it is decoded."""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

import multiflow.calibration.data as cd
from multiflow.calibration.data import MAX_SIDE, load_samples, reduced_rgb, to_rgb


def test_a_large_png_is_kept_reduced(tmp_path):
    Image.new("RGB", (5000, 3000), (200, 30, 40)).save(tmp_path / "big.png")  # 15 MP, a 50 KB file
    image = cd._decode(tmp_path / "big.png")
    assert image.mode == "RGB" and image.size == (1667, 1000)  # 5000 / 3 (the smallest factor that fits 2048)
    assert max(image.size) <= MAX_SIDE and image.getextrema() == ((200, 200), (30, 30), (40, 40))


def test_a_large_jpeg_is_decoded_at_reduced_scale(tmp_path):
    Image.new("RGB", (6000, 4000), (10, 200, 40)).save(tmp_path / "big.jpg", quality=90)
    image = cd._decode(tmp_path / "big.jpg")
    # draft decodes at 1/2 (3000x2000, still >= 2048 x 1366 that fitting needs), then a reduce by 2;
    # without draft it would be 6000 / 3 = 2000 px wide
    assert image.size == (1500, 1000)


@pytest.mark.parametrize("mode", ["RGB", "RGBA", "LA", "P", "1", "L", "CMYK", "I;16", "I", "F"])
def test_reduced_rgb_equals_converting_whole_then_reducing(monkeypatch, mode):
    monkeypatch.setattr(cd, "_STRIP_PIXELS", 301 * 7)  # many strips, one not a multiple of the factor
    rng = np.random.default_rng(0)
    if mode in ("I", "F"):  # values outside 0..255: stretched by the min and max of the whole image
        pixels = rng.uniform(-1000, 5000, size=(157, 301))
        image = Image.fromarray(pixels.astype(np.int32 if mode == "I" else np.float32), mode)
    elif mode == "I;16":
        image = Image.fromarray(rng.integers(0, 65536, size=(157, 301), dtype=np.uint16))
        assert image.mode == "I;16"
    else:
        rgba = Image.fromarray(rng.integers(0, 256, size=(157, 301, 4), dtype=np.uint8), "RGBA")
        image = rgba.convert(mode) if mode != "P" else rgba.convert("RGB").convert("P")
        if mode == "P":
            image.info["transparency"] = 3
    reduced = reduced_rgb(image, max_side=64)
    assert reduced.size == (61, 32)  # ceil(301 / 5), ceil(157 / 5)
    assert np.array_equal(np.asarray(reduced), np.asarray(to_rgb(image).reduce(5)))


def test_an_image_within_the_bound_is_not_resampled():
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, size=(40, 50, 3), dtype=np.uint8))
    assert np.array_equal(np.asarray(reduced_rgb(image, max_side=50)), np.asarray(image))


def test_an_extreme_aspect_ratio_is_skipped_as_degenerate(tmp_path, caplog):
    Image.new("L", (5000, 3), 128).save(tmp_path / "strip.png")
    Image.new("L", (30, 20), 128).save(tmp_path / "ok.png")
    (tmp_path / "d.json").write_text(json.dumps([{"image": "strip.png", "question": "q?"},
                                                 {"image": "ok.png", "question": "q?"}]))
    samples, report = load_samples(tmp_path / "d.json", 2)
    assert [s.source for s in samples] == ["d.json[1]"]
    assert report.skipped == [("d.json[0]", "degenerate image: 5000x3 px (a side under 2 px once the longest is "
                                            "reduced to 2048 px)")]


def test_decompression_bomb_limits_stay(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    Image.new("L", (40, 30), 9).save(tmp_path / "warned.png")   # 1200 px: over the limit, under twice it
    Image.new("L", (50, 50), 9).save(tmp_path / "bomb.png")     # 2500 px: over twice the limit
    (tmp_path / "d.json").write_text(json.dumps([{"image": "warned.png", "question": "q?"},
                                                 {"image": "bomb.png", "question": "q?"}]))
    with caplog.at_level(logging.WARNING, logger="multiflow"):
        samples, report = load_samples(tmp_path / "d.json", 2)
    assert [s.source for s in samples] == ["d.json[0]"] and samples[0].image.size == (40, 30)
    assert report.skipped[0][0] == "d.json[1]" and report.skipped[0][1].startswith("unreadable image: too large")
    bomb_warnings = [r.getMessage() for r in caplog.records if "DecompressionBombWarning" in r.getMessage()]
    assert bomb_warnings == ["d.json[0]: DecompressionBombWarning: Image size (1200 pixels) exceeds limit of 1000 "
                             "pixels, could be decompression bomb DOS attack."]


@pytest.mark.slow
def test_six_records_of_a_large_png_cost_one_decoded_image(tmp_path):
    """Peak RSS in a fresh process: before, each of the 6 samples kept the image at full resolution."""
    Image.new("RGB", (4500, 4500), (1, 2, 3)).save(tmp_path / "big.png")  # 20 MP: 81 MB decoded by PIL
    (tmp_path / "d.json").write_text(json.dumps([{"image": "big.png", "question": f"q{i}?"} for i in range(6)]))
    script = textwrap.dedent(f"""
        import resource, warnings
        from multiflow.calibration.data import load_samples
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        samples, _ = load_samples({str(tmp_path / "d.json")!r}, 6)
        grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
        print(len(samples), max(max(s.image.size) for s in samples), grown // 1024)
    """)
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout.split()
    used, side, grown_mib = map(int, out)
    assert used == 6 and side <= MAX_SIDE
    # measured: 176 MiB (one decode, 81 MB, plus allocator slack); keeping 6 full-size copies: over 480
    assert grown_mib < 300, f"peak RSS grew by {grown_mib} MiB"
