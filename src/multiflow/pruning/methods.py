"""The --method registry: each scoring method of scores.SCORES, plus SparseGPT (sparsegpt.py, wired by
reconstruction.py). A new method is its own file plus one line here (or in scores.SCORES for a plain score)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from multiflow.errors import MultiflowError
from multiflow.pruning import scores


@dataclass(frozen=True)
class Method:
    """What the pipeline needs to know about a --method."""

    help: str  # one line for --help
    score: str | None  # the scores.SCORES entry that chooses the masks; None: the method's own criterion
    needs_statistics: bool  # reads Step 2's activation statistics
    reconstructs: bool = False  # updates the kept weights (SparseGPT's OBS update): `run` only, always sequential
    allocation_score: str | None = None  # the score --allocation scores / owl plans from (default: `score`)

    @property
    def planning_score(self) -> str:
        return self.allocation_score or self.score


METHODS: dict[str, Method] = {
    **{name: Method(scores.describe(name), name, name not in scores.NO_STATISTICS) for name in scores.SCORES},
    # OWL+SparseGPT in the OWL paper takes its outlier ratios from Wanda's |W| * ||x|| on the dense model
    "sparsegpt": Method("sparsegpt: SparseGPT (Frantar & Alistarh 2023), its own w^2/[H^-1]_jj^2 and the OBS update "
                        "of the kept weights from each layer's input Hessian (run only, always sequential)",
                        None, True, reconstructs=True, allocation_score="wanda"),
}


def method(name: str, flag: str = "--method") -> Method:
    """METHODS[name]; an unknown name is an error that lists the choices."""
    if name not in METHODS:
        raise MultiflowError(f"{flag} {name!r}: choose one of {', '.join(METHODS)}")
    return METHODS[name]


SPARSEGPT_NEEDS_RUN = ("--method sparsegpt updates the weights from each layer's Hessian, collected while "
                       "calibrating block by block: use `multiflow run --method sparsegpt` (multiflow.run(..., "
                       "method='sparsegpt')); prune from a stats file and prune_module cannot")


UPDATE_NEEDS_RUN = ("--update obs updates the weights from each layer's Hessian, collected while calibrating block "
                    "by block: use `multiflow run --update obs` (multiflow.run(..., update='obs')); prune from a "
                    "stats file and prune_module cannot")


def layer_score(method: str, weight: torch.Tensor, sq_mean: torch.Tensor | None,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """A layer's float32 importance scores by --method (`scores.SCORES`; an unknown name is an error), in `out`'s
    memory when given (`scores`' docstring)."""
    if method in METHODS and METHODS[method].score is None:
        raise MultiflowError(SPARSEGPT_NEEDS_RUN)
    return scores.score(method, weight, sq_mean, out)
