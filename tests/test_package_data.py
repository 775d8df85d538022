"""What the wheel ships of the demo data: the calibration and evaluation splits and exactly their images (the
package-data globs in pyproject.toml take every file of src/multiflow/demo_data); the training split lives in
training/demo_train, and the two never share an image."""

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "src" / "multiflow" / "demo_data"
TRAIN = ROOT / "training" / "demo_train"


def images_of(jsonl: Path) -> set[str]:
    return {json.loads(line)["image"] for line in jsonl.read_text().splitlines() if line.strip()}


def test_the_package_ships_the_run_time_splits_and_only_their_images():
    assert sorted(p.name for p in SHIPPED.glob("*.jsonl")) == ["calibration.jsonl", "evaluation.jsonl"]
    used = images_of(SHIPPED / "calibration.jsonl") | images_of(SHIPPED / "evaluation.jsonl")
    shipped = {p.relative_to(SHIPPED).as_posix() for p in (SHIPPED / "images").iterdir()}
    assert shipped == used


def test_the_training_split_stays_in_the_source_tree():
    train = images_of(TRAIN / "train.jsonl")
    assert train and train == {p.relative_to(TRAIN).as_posix() for p in (TRAIN / "images").iterdir()}
    assert not train & {p.relative_to(SHIPPED).as_posix() for p in (SHIPPED / "images").iterdir()}
