"""Data of the dual-encoder benchmark: real handwritten digits and captions about them.

Images: the 1,797 8x8 digits of `sklearn.datasets.load_digits()` (UCI "Optical Recognition of
Handwritten Digits", values 0..16 = ink count of a 4x4 block of a 32x32 bitmap), drawn black on
white, RGB, at the vision tower's size by nearest-neighbour upscaling (each source pixel an exact
block). Splits are by image, from a seeded permutation, and never overlap: train 1,200,
calibration 200, evaluation 397 (the same sizes as the demo model's).

Captions: templates with `{word}` (three) or `{digit}` (3). TRAIN_TEMPLATES are the only ones
training sees; HELD_OUT_TEMPLATES are for zero-shot evaluation only.

Everything here is a pure, deterministic function of its arguments.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np

NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
NUM_CLASSES = 10
SPLIT_SIZES = {"train": 1200, "calibration": 200}  # evaluation: the rest (397)
SPLIT_SEED = 0

TRAIN_TEMPLATES = (
    "a handwritten digit {word}",
    "the number {digit} written by hand",
    "a photo of the digit {word}",
    "a scanned image of a handwritten {word}",
    "the digit {digit}",
    "a drawing of the number {word}",
    "someone wrote the number {word}",
    "an image of a {digit}",
)
HELD_OUT_TEMPLATES = (
    "a hand-drawn {word}",
    "a picture of the numeral {digit}",
    "this is the digit {word}, written with a pen",
    "a black and white image of the number {word}",
)


def caption(template: str, label: int) -> str:
    return template.format(word=NUMBER_WORDS[label], digit=label)


def captions(templates: tuple[str, ...] | list[str], labels=range(NUM_CLASSES)) -> tuple[list[str], list[int]]:
    """Every (template, class) caption, class-major: ([texts], [labels])."""
    texts, out = [], []
    for label in labels:
        for template in templates:
            texts.append(caption(template, label))
            out.append(label)
    return texts, out


@lru_cache(maxsize=1)
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits  # only here: scikit-learn ships the images

    digits = load_digits()
    values = np.asarray(digits.images, dtype=np.uint8)  # (1797, 8, 8), 0..16
    values.setflags(write=False)
    labels = np.asarray(digits.target, dtype=np.int64)
    labels.setflags(write=False)
    return values, labels


def load_digit_arrays() -> tuple[np.ndarray, np.ndarray]:
    """(values (1797, 8, 8) uint8 in 0..16, labels (1797,) int64), read-only."""
    return _digits()


def render(values: np.ndarray, size: int) -> np.ndarray:
    """8x8 ink counts 0..16 -> (size, size, 3) uint8 RGB, black ink on white, nearest-neighbour."""
    if values.shape != (8, 8) or size % 8:
        raise ValueError(f"expected 8x8 values and a size divisible by 8, got {values.shape} and {size}")
    gray = np.rint(255.0 - values.astype(np.float64) * (255.0 / 16.0)).astype(np.uint8)
    big = np.kron(gray, np.ones((size // 8, size // 8), dtype=np.uint8))
    return np.repeat(big[:, :, None], 3, axis=2)


def split_indices(n: int = 1797, seed: int = SPLIT_SEED) -> dict[str, list[int]]:
    """Seeded permutation of the image indices cut into train / calibration / evaluation (sorted)."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    a, b = SPLIT_SIZES["train"], SPLIT_SIZES["train"] + SPLIT_SIZES["calibration"]
    return {"train": sorted(order[:a]), "calibration": sorted(order[a:b]), "evaluation": sorted(order[b:])}


def images(indices: list[int], size: int) -> tuple[list[np.ndarray], list[int]]:
    """RGB images (size x size) and labels of the given sklearn indices."""
    values, labels = load_digit_arrays()
    return [render(values[i], size) for i in indices], [int(labels[i]) for i in indices]


def pixel_values(processor, indices: list[int], size: int):
    """(pixel_values tensor (N, 3, size, size), labels tensor (N,)) through the model's image processor."""
    import torch

    imgs, labels = images(indices, size)
    pixels = processor.image_processor(images=imgs, return_tensors="pt")["pixel_values"]
    return pixels, torch.tensor(labels, dtype=torch.long)
