"""What Step 3 is asked to do, validated at the edge: `PruneConfig` (a checkpoint folder to a pruned copy) and
`ModuleConfig` (an nn.Module pruned in place), sharing their choices and their checks (`PruningChoices`)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from multiflow.distribution.choices import DistributionChoices
from multiflow.distribution.distribute import check_target
from multiflow.errors import MultiflowError
from multiflow.options import check_choices, option
from multiflow.pruning.masking import COMPARISON_GROUPS
from multiflow.pruning.methods import METHODS, SPARSEGPT_NEEDS_RUN
from multiflow.pruning.plan import ALLOCATIONS, SCORE_ALLOCATIONS

UPDATES = ("none", "obs")  # obs: SparseGPT's weight update after each tile's mask (reconstruction.py, `run` only)
# `multiflow run` without --method: the configuration measured best on the pretrained judges (README, "Which
# configuration should I use"). With --method, the others default as the paper: `--method multiflow` alone is the
# paper's exact method (allocation modality, one threshold per layer, no weight update).
RUN_RECOMMENDED = {"method": "sparsegpt", "update": "none", "allocation": "uniform", "group": "row"}
PAPER_DEFAULTS = {"allocation": "modality", "group": "layer", "update": "none"}


def run_choices(method: str | None = None, allocation: str | None = None, group: str | None = None,
                update: str | None = None) -> dict[str, str]:
    """What `run` uses: each choice the caller gave, the others from RUN_RECOMMENDED when no method is given,
    else from PAPER_DEFAULTS."""
    base = RUN_RECOMMENDED if method is None else {**PAPER_DEFAULTS, "method": method}
    given = {"method": method, "allocation": allocation, "group": group, "update": update}
    return {k: base[k] if v is None else v for k, v in given.items()}


CAPPED = ("modality", "global")  # the allocations Step 1's distribution makes: --max-layer-sparsity applies to them
DEAD_LAYERS = ("keep", "prune")  # keep: prune as any layer (the paper); prune: zero the layers whose output is never used


@dataclass(frozen=True)
class Structure:
    """unstructured, or N:M = at most N non-zero weights in every M consecutive inputs of a row."""

    n: int | None = None
    m: int | None = None

    @classmethod
    def parse(cls, text: str) -> "Structure":
        if text == "unstructured":
            return cls()
        match = re.fullmatch(r"(\d+):(\d+)", text)
        if not match or not 0 < int(match.group(1)) < int(match.group(2)):
            raise MultiflowError(f"--structure {text!r}: give 'unstructured' or N:M with 0 < N < M (e.g. 2:4)")
        return cls(int(match.group(1)), int(match.group(2)))

    @property
    def is_n_m(self) -> bool:
        return self.n is not None

    def __str__(self) -> str:
        return f"{self.n}:{self.m}" if self.is_n_m else "unstructured"


@dataclass(frozen=True)
class PruningChoices(DistributionChoices):
    """The choices both configs share: what is pruned and how (Step 1's `DistributionChoices` among them). Checked
    against the registries by the configs' `__post_init__`; `update` (PruneConfig's field) is "none" for
    ModuleConfig."""

    target_sparsity: float | None = None
    method: str = option(
        "multiflow", choices=lambda: METHODS,
        help=lambda: "the score that chooses the pruned weights (a_j = sqrt(mean x_j^2) over calibration tokens). "
                     + "; ".join(m.help for m in METHODS.values()))
    allocation: str = option(
        "modality", choices=lambda: ALLOCATIONS,
        help=lambda: "per-layer sparsity: " + ", ".join(f"{n} = {a.help}" for n, a in ALLOCATIONS.items())
                     + f"; {' and '.join(SCORE_ALLOCATIONS)} use wanda's scores with --method sparsegpt")
    group: str = option(
        "layer", choices=lambda: COMPARISON_GROUPS,
        help="comparison group for the threshold: the whole matrix (default, as the paper) or each output row "
             "(Wanda's choice; `run` without --method uses row); with --method sparsegpt or --update obs, within "
             "each block of --blocksize columns")
    structure: Structure = option(
        default_factory=Structure, cli_default="unstructured",
        help="unstructured (default) or N:M = keep N of every M consecutive inputs of a row (2:4 keeps 2 of 4); "
             "with N:M the allocation does not apply")
    dead_layers: str = option(
        "keep", choices=DEAD_LAYERS,
        help="layers whose output never reaches the model's output (LLaVA-1.5: the last CLIP layer): keep = "
             "treat as any layer (default, as the paper); prune = zero them and count them toward their "
             "modality's target")

    def _check_choices(self) -> None:
        check_choices(self)  # method, allocation, group, dead_layers (and PruneConfig's update), from the fields
        if self.target_sparsity is not None:
            check_target(self.target_sparsity)
        self._check_distribution_choices()
        if self.max_layer_sparsity is not None and (self.structure.is_n_m or self.allocation not in CAPPED):
            raise MultiflowError(f"--max-layer-sparsity caps Step 1's magnitude distribution: it applies to "
                                 f"--allocation {' and '.join(CAPPED)} (unstructured), not "
                                 f"{'--structure ' + str(self.structure) if self.structure.is_n_m else '--allocation ' + self.allocation}")

    def _check_dead_layers(self) -> None:
        if self.allocation in SCORE_ALLOCATIONS and self.dead_layers == "prune":
            raise MultiflowError(f"--allocation {self.allocation} allocates from the scores of every layer; "
                                 "--dead-layers prune applies to the modality and global allocations")

    @property
    def reconstructs(self) -> bool:
        """The kept weights get SparseGPT's OBS update: --method sparsegpt, or a score with --update obs."""
        return METHODS[self.method].reconstructs or self.update == "obs"

    @property
    def allocation_score(self) -> str:
        """The score --allocation scores / owl plans from: the --method's; wanda's for sparsegpt (OWL+SparseGPT in
        the OWL paper takes its outlier ratios from Wanda's |W| * ||x|| on the dense model)."""
        return METHODS[self.method].planning_score


@dataclass(frozen=True, kw_only=True)
class PruneConfig(PruningChoices):
    """What `multiflow prune` needs, validated at the edge: the choices plus the files (keyword arguments)."""

    model: Path
    output: Path
    distribution: Path | None = None
    stats: Path | None = None
    rules: Path | None = None
    overwrite: bool = False
    update: str = option(  # obs: SparseGPT's OBS update of the kept weights (--method sparsegpt always has it)
        "none", choices=UPDATES,
        help="reconstruction of the kept weights: none = masks only (default); obs = SparseGPT's "
             "optimal-brain-surgeon update from each layer's input Hessian, the --method score choosing each column "
             "block's mask from the already updated weights (always sequential; --method sparsegpt = obs with "
             "SparseGPT's own criterion). With --allocation scores/owl a dense statistics pass plans the per-layer "
             "sparsity first")
    blocksize: int = 128  # the OBS update's column block (SparseGPT's default)
    percdamp: float = 0.01  # the OBS update's dampening, a fraction of the Hessian's mean diagonal
    deterministic_report: bool = False  # leave out VOLATILE_REPORT_FIELDS: same inputs, same report bytes

    def __post_init__(self) -> None:
        self._check_choices()
        if self.blocksize < 1:
            raise MultiflowError(f"--blocksize {self.blocksize}: give at least 1")
        if not 0 <= self.percdamp < float("inf"):
            raise MultiflowError(f"--percdamp {self.percdamp}: give a number >= 0 (SparseGPT uses 0.01)")
        if METHODS[self.method].needs_statistics and not METHODS[self.method].reconstructs and self.stats is None:
            raise MultiflowError(f"--method {self.method} needs activation statistics: pass --stats stats.safetensors "
                                 "(from multiflow calibrate), or use --method magnitude")
        if self.structure.is_n_m:
            if self.distribution is not None:
                raise MultiflowError("--structure N:M fixes the sparsity of every layer; drop --distribution")
        elif self.target_sparsity is None and self.distribution is None:
            raise MultiflowError("give --target-sparsity (or --distribution for --allocation modality)")
        if self.distribution is not None and self.allocation != "modality":
            raise MultiflowError(f"--distribution is Step 1's per-layer map: it applies to --allocation modality, "
                                 f"not {self.allocation}")
        self._check_dead_layers()
        if self.distribution is not None and self.dead_layers == "prune":
            raise MultiflowError("--dead-layers prune recomputes Step 1 with the dead layers counted; drop --distribution")
        for name, value, default in (("max-layer-sparsity", self.max_layer_sparsity, None),
                                     ("prune-only", self.prune_only, "all")):
            if self.distribution is not None and value != default:
                raise MultiflowError(f"--{name}: the --distribution file already fixes every layer's count (give "
                                     f"--{name} to multiflow distribute); drop one of them")


@dataclass(frozen=True)
class ModuleConfig(PruningChoices):
    """What `prune_module` needs: the choices alone (an nn.Module in memory has no files; its statistics, if the
    method reads any, are passed as a dict and checked against the module)."""

    update = "none"  # no OBS update in memory (it needs the block-by-block Hessians of `run`)
    distribution = None  # Step 1 runs on the module's own weights

    def __post_init__(self) -> None:
        self._check_choices()
        if self.method in METHODS and METHODS[self.method].reconstructs:
            raise MultiflowError(SPARSEGPT_NEEDS_RUN)
        if not self.structure.is_n_m and self.target_sparsity is None:
            raise MultiflowError("give --target-sparsity (or --distribution for --allocation modality)")
        self._check_dead_layers()

    @property
    def needs_statistics(self) -> bool:
        return METHODS[self.method].needs_statistics

