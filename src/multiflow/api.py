"""The Python entry points: the same Step 1 for an nn.Module or a checkpoint folder."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from torch import nn

from multiflow import layers
from multiflow.distribution import Distribution, distribute
from multiflow.modality_rules import ModalityRules


def inventory(
    model: nn.Module | str | os.PathLike,
    rules: str | os.PathLike | ModalityRules | None = None,
    vision_tower: str | os.PathLike | None = None,
    allow_pickle: bool = False,
) -> layers.Inventory:
    """The prunable layers of a model object or a checkpoint folder, grouped by modality."""
    if isinstance(model, nn.Module):
        return layers.from_module(model, rules)
    return layers.from_checkpoint(Path(model), rules, vision_tower, allow_pickle)


def compute_distributions(
    model: nn.Module | str | os.PathLike,
    target_sparsities: Iterable[float],
    rules: str | os.PathLike | ModalityRules | None = None,
    *,
    vision_tower: str | os.PathLike | None = None,
    allow_pickle: bool = False,
    progress: bool = False,
) -> list[Distribution]:
    """Step 1 for several targets from one read of the weights."""
    return distribute(inventory(model, rules, vision_tower, allow_pickle), target_sparsities, progress)


def compute_distribution(
    model: nn.Module | str | os.PathLike,
    target_sparsity: float,
    rules: str | os.PathLike | ModalityRules | None = None,
    **kwargs,
) -> Distribution:
    """Step 1: `{layer name: sparsity}` per modality for one target (ALGORITHM.md Eq. 7).

    `model` is an in-memory model (its nn.Linear layers, by module name) or a
    checkpoint folder read tensor by tensor; both give identical results.
    `rules` is None (the preset of the model's family), a rules file, or a
    `ModalityRules`.
    """
    return compute_distributions(model, [target_sparsity], rules, **kwargs)[0]
