"""Step 3 by reconstruction: SparseGPT inside sequential calibration, one block's Hessians at a time.

`multiflow run --method sparsegpt` plans every layer's count first (Step 1, as
`--sequential`), then calibrates block by block: while the batches run a block,
pre-hooks add each prunable layer's inputs to a float64 `HessianAccumulator`
(non-padding tokens only, as the statistics; layers fed the same input tensor,
q/k/v and gate/up, share one). Once every batch has run the block,
`SparseGPTStep.on_block` prunes and updates its layers in memory with
`sparsegpt.sparsegpt_prune`, frees its Hessians, and writes the updated weights
(in the checkpoint's dtype) and their keep-masks to one scratch safetensors file
per block; the batches then re-run the block, so later blocks are calibrated on
the outputs of the pruned and updated ones. Step 3's writer (`pruning.prune`,
`updated=`) takes each layer's weights from those files instead of masking the
original tensor. Memory: one block's Hessians; disk: one copy of the prunable
weights in the scratch folder.

`run --method M --update obs` (M a score of `scores.SCORES`) is the same pass with
M's scores as the selection criterion in place of SparseGPT's w^2 / d^2
(`scores.tile_scorer`: |W_ij| from the current tile, row and column aggregates
from the layer's weights before its update, a_j from sq_mean_j = H_jj / 2 on the
Hessian's own inputs). With `--allocation scores` or `owl`, `api.run` first makes
one dense statistics pass to plan every layer's count, then this pass.
"""

from __future__ import annotations

import threading
import weakref
from collections import Counter
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from multiflow.errors import MultiflowError
from multiflow.pruning import scores
from multiflow.pruning.methods import METHODS
from multiflow.pruning.sparsegpt import Factor, HessianAccumulator, sparsegpt_prune, update_dtype


class SparseGPTStep:
    """The sequential pruner of `calibration.calibrate(..., pruner=)` and the weights it leaves for Step 3."""

    def __init__(self, config, plans, scratch: Path, blocksize: int | None = None, percdamp: float | None = None):
        s = config.structure
        self.structure = (s.n, s.m) if s.is_n_m else None
        self.group = config.group
        self.score = METHODS[config.method].score  # None: SparseGPT's own w^2/d^2
        self.flag = "--method sparsegpt" if self.score is None else f"--method {self.score} --update obs"
        self.plans = {p.layer.name: p for p in plans}
        self.scratch = Path(scratch)
        self.blocksize = config.blocksize if blocksize is None else blocksize
        self.percdamp = config.percdamp if percdamp is None else percdamp
        self.files: dict[str, Path] = {}  # layer (inventory name) -> scratch file holding its weights
        self._hessians: dict[str, HessianAccumulator] = {}  # by the model name of the layer that owns it
        self._owner: dict[str, str] = {}  # model name -> model name of the layer whose Hessian it shares
        self._local = threading.local()
        self._blocks = 0

    @contextmanager
    def attach(self, loaded, collector, names: list[str]) -> Iterator:
        """Hessian hooks on the planned layers among `names` (model names); yields the runner's on_block."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        to_inventory = loaded.to_inventory_name
        mine = [n for n in names if to_inventory[n] in self.plans]
        handles = [loaded.model.get_submodule(n).register_forward_pre_hook(self._hook(n, collector)) for n in mine]

        def on_block(block) -> None:
            here = [n for n in mine if n == block.name or n.startswith(block.name + ".")]
            with torch.no_grad():
                self._prune_block(loaded, here)

        try:
            yield on_block
        finally:
            for h in handles:
                h.remove()
            self._hessians.clear()

    def _hook(self, name: str, collector):
        def hook(module, args) -> None:
            x = args[0]
            rows = collector.counted_rows(name, x)
            if rows is False:  # a pruned block's re-run
                return
            last = getattr(self._local, "last", None)
            with torch.no_grad():
                if last is not None and last[0]() is x:  # the same input as the previous layer: share its H
                    if self._owner.setdefault(name, last[1]) != last[1]:
                        raise MultiflowError(f"layer {name}: its input is shared with another layer than before")
                    return
                if self._owner.setdefault(name, name) != name:
                    raise MultiflowError(f"layer {name}: its input is no longer shared with {self._owner[name]}")
                acc = self._hessians.get(name)
                if acc is None:
                    acc = self._hessians[name] = HessianAccumulator(module.in_features)
                acc.add_batch(x, rows)
                self._local.last = (weakref.ref(x), name)

        return hook

    def _prune_block(self, loaded, here: list[str]) -> None:
        out: dict[str, torch.Tensor] = {}
        plans = {n: self.plans[loaded.to_inventory_name[n]] for n in here}
        # layers still to prune with each (shared) Hessian
        users = Counter(self._owner.get(n, n) for n, p in plans.items() if not (p.dense or p.dead))
        taken: dict[str, tuple[Factor, torch.Tensor]] = {}  # (factor, diag H) of the owners in use
        for name in here:
            layer_name, p = loaded.to_inventory_name[name], plans[name]
            if p.dense:  # --prune-only keeps it: no mask, no update
                continue
            module = loaded.model.get_submodule(name)
            if p.dead:
                new = torch.zeros(module.weight.shape, dtype=p.layer.dtype)
                keep = torch.zeros(module.weight.shape, dtype=torch.bool)
            else:
                owner = self._owner.get(name, name)
                try:
                    if owner not in taken:  # once per shared Hessian, which is factored in place and freed
                        acc = self._hessians.pop(owner, None)
                        if acc is None or not acc.tokens:
                            raise MultiflowError(f"{self.flag}: layer {layer_name} saw no calibration token before "
                                                 "it was to be pruned; calibrate with more (or other) samples")
                        hessian = acc.take_hessian()
                        diagonal = torch.diagonal(hessian).clone()
                        taken[owner] = Factor.of(hessian, self.percdamp, update_dtype(module.weight),
                                                 in_place=True), diagonal
                        del hessian
                    factor, diagonal = taken[owner]
                    score = None if self.score is None else \
                        scores.tile_scorer(self.score, module.weight, diagonal / 2)
                    new, keep = sparsegpt_prune(module.weight, factor, p.k, group=self.group,
                                                structure=self.structure, blocksize=self.blocksize, score=score)
                except ValueError as exc:
                    raise MultiflowError(f"{self.flag}: layer {layer_name}: {exc}") from None
                users[owner] -= 1
                if not users[owner]:  # its last user: free it before the next layer's (7B: up to 484 MB each)
                    del taken[owner]
                del factor, diagonal, score
                new = new.to(p.layer.dtype)
            module.weight.copy_(new)  # later blocks see exactly what Step 3 writes (in the calibration dtype)
            out[layer_name] = new.cpu().contiguous()
            out[f"{layer_name}.keep"] = keep.cpu().contiguous()
        for name in here:
            self._hessians.pop(self._owner.get(name, name), None)
        if out:
            path = self.scratch / f"block-{self._blocks:05d}.safetensors"
            self._blocks += 1
            save_file(out, str(path))
            self.files.update({k: path for k in out if not k.endswith(".keep")})

    def updated(self, layer_name: str, tensor: torch.Tensor) -> torch.Tensor:
        """Step 3: write the layer's updated weights into `tensor` (its checkpoint tensor); returns its keep mask."""
        if self.plans[layer_name].dense:
            return torch.ones(tensor.shape, dtype=torch.bool)
        path = self.files.get(layer_name)
        if path is None:
            raise MultiflowError(f"{self.flag}: layer {layer_name} was never pruned (no calibration batch "
                                 "reached it); calibrate with samples that reach every layer")
        with safe_open(str(path), framework="pt") as f:
            new, keep = f.get_tensor(layer_name), f.get_tensor(f"{layer_name}.keep")
        if new.shape != tensor.shape or new.dtype != tensor.dtype:
            raise MultiflowError(f"{self.flag}: layer {layer_name}: updated weights are {new.dtype} "
                                 f"{tuple(new.shape)}, the checkpoint holds {tensor.dtype} {tuple(tensor.shape)}")
        tensor.copy_(new)
        return keep
