"""multiflow: modality-aware information-flow pruning (MULTIFLOW, CVPR 2024) for vision-language models."""

from __future__ import annotations

from multiflow._version import __version__
from multiflow.api import (calibrate, compute_distribution, compute_distributions, evaluate, inventory, prune,
                           prune_module, run)
from multiflow.distribution.distribute import Distribution, LayerShare
from multiflow.errors import MultiflowError

__all__ = ["Distribution", "LayerShare", "MultiflowError", "calibrate", "compute_distribution",
           "compute_distributions", "evaluate", "inventory", "prune", "prune_module", "run", "__version__"]
