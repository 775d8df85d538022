"""multiflow: modality-aware information-flow pruning (MULTIFLOW, CVPR 2024) for vision-language models."""

from __future__ import annotations

__version__ = "0.1.0"

from multiflow.api import (calibrate, compute_distribution, compute_distributions, inventory, prune,  # noqa: E402
                           prune_module, run)
from multiflow.distribution.distribute import Distribution, LayerShare  # noqa: E402
from multiflow.errors import MultiflowError  # noqa: E402

__all__ = ["Distribution", "LayerShare", "MultiflowError", "calibrate", "compute_distribution",
           "compute_distributions", "inventory", "prune", "prune_module", "run", "__version__"]
