"""Run a model block by block: one block's weights resident, every calibration batch moved through it.

The model comes with its parameters on the meta device and a `WeightSource`
(`model_loading.load_model(lazy=True)`). Blocks are found from the model itself:
the entries of its outermost `nn.ModuleList`s (vision encoder layers, decoder
layers) plus every prunable linear outside them (the projector); the input
embeddings are a block too (used once per forward, freed after). Everything
else (norms, the patch convolution, position embeddings) is loaded once.

Each batch runs the model's own forward, in a worker thread of its own. A
pre-hook on every block parks the worker until the runner has that block's
weights on the device; the runner then lets the parked workers through the
block one at a time (the workers take turns: never two forwards at once),
frees the block, and loads the next one. So the code between blocks (image
features -> projector -> merged into the text embeddings, rotary embeddings,
masks) is the model's own, for any family, and each block is read from disk
once per pass while only one block's weights and the batches' activations are
in memory. Memory of the activations grows with the samples in flight:
`samples_per_pass` bounds it, at the price of one more read of the weights per
pass.

Sequential mode (`on_block`): after every worker has run block b on the
outputs of the blocks before it, `on_block(b)` is called (it prunes b from the
statistics gathered so far), then each worker runs b again, its statistics
paused, and carries the pruned block's output on: each block is calibrated on
the outputs of the already-pruned blocks before it, as Wanda and SparseGPT do.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading
from dataclasses import dataclass
from typing import Any, Callable, Iterable

import torch
from torch import nn
from tqdm.auto import tqdm

from multiflow.calibration.statistics import Collector
from multiflow.errors import MultiflowError
from multiflow.models.loading import LoadedModel, base_parameters

_START, _DONE = (-1, 0), None  # a worker's position before its first turn / after its forward


def _malloc_trim():
    """glibc's malloc_trim, or a no-op. Each worker thread allocates from its own malloc arena, and an
    arena keeps what its thread freed: without a trim after each turn, every worker's share of a
    block's temporaries stays resident (at 7B: gigabytes)."""
    try:
        trim = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return lambda: None
    trim.argtypes = [ctypes.c_size_t]
    return lambda: trim(0)


_trim = _malloc_trim()


@dataclass
class Block:
    name: str
    module: nn.Module
    parameters: list[str]  # full parameter names, loaded and freed together
    calibrated: bool = True  # False: only loaded when reached and freed after (the input embeddings)


def find_blocks(model: nn.Module, prunable: Iterable[str]) -> list[Block]:
    """The model's blocks in registration order: entries of outermost ModuleLists, and prunable linears outside them."""
    base = set(base_parameters(model))
    blocks, inside = [], set()

    def visit(prefix: str, module: nn.Module) -> None:
        for name, child in module.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, nn.ModuleList):
                for i, entry in enumerate(child):
                    params = [f"{full}.{i}.{n}" for n, _ in entry.named_parameters()]
                    if any(p in base for p in params):
                        blocks.append(Block(f"{full}.{i}", entry, [p for p in params if p in base]))
                        inside.add(f"{full}.{i}")
            else:
                visit(full, child)

    visit("", model)
    for name in prunable:
        if not any(name.startswith(b + ".") for b in inside):
            module = model.get_submodule(name)
            blocks.append(Block(name, module, [p for p in (f"{name}.{n}" for n, _ in module.named_parameters())
                                               if p in base]))
    return _in_model_order(model, blocks)


def _in_model_order(model: nn.Module, blocks: list[Block]) -> list[Block]:
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    return sorted(blocks, key=lambda b: order[b.name])


def input_embeddings_block(model: nn.Module, blocks: list[Block]) -> Block | None:
    """The model's input embeddings (`get_input_embeddings()`) as a block of their own, when they are outside
    `blocks`: a forward uses them once, at its start, so they need not stay in memory for the whole run (at 13B in
    float32 they are 0.61 GiB, half a decoder block). None when the model has none or a block holds them."""
    try:
        embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    name = next((n for n, m in model.named_modules() if m is embeddings), None)
    if name is None or any(name == b.name or name.startswith(b.name + ".") for b in blocks):
        return None
    base = set(base_parameters(model))
    params = [p for p in (f"{name}.{n}" for n, _ in embeddings.named_parameters()) if p in base]
    return Block(name, embeddings, params, calibrated=False) if params else None


def image_positions(loaded: LoadedModel, batch: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """Where the image tokens are in a batch's prompts (None for a model without an image token)."""
    if loaded.image_token_id is None:
        return None
    return batch["input_ids"] == loaded.image_token_id


class _Aborted(Exception):
    """Raised in parked workers when the run stops (an error elsewhere, or an interrupt)."""


class _Turns:
    """Which worker may run now; workers park at (block index, phase) and wait for their turn."""

    def __init__(self, workers: int):
        self.cond = threading.Condition()
        self.at: list[tuple[int, int] | None] = [_START] * workers
        self.arrived = [False] * workers
        self.running: int | None = None
        self.abort = False
        self.errors: list[BaseException] = []
        self.local = threading.local()

    def park(self, where: tuple[int, int]) -> None:
        w = getattr(self.local, "worker", None)
        if w is None:
            raise MultiflowError("a block was called outside the block runner's workers")
        with self.cond:
            self.at[w], self.running = where, None
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.running == w or self.abort)
            if self.abort:
                raise _Aborted

    def work(self, w: int, forward: Callable[[], Any]) -> None:
        self.local.worker = w
        try:
            self.park(_START)
            forward()
            error = None
        except _Aborted:
            error = None
        except BaseException as exc:  # handed to the runner, raised there
            error = exc
        with self.cond:
            self.at[w], self.running = _DONE, None
            if error is not None:
                self.errors.append(error)
            self.cond.notify_all()

    def release(self, w: int) -> None:
        """Let worker w run until it parks again or finishes."""
        with self.cond:
            self.running = w
            self.cond.notify_all()
            self.cond.wait_for(lambda: self.running is None)

    def stop(self) -> None:
        with self.cond:
            self.abort = True
            self.cond.notify_all()


def run_blocks(
    loaded: LoadedModel,
    batches: list[dict[str, torch.Tensor]],
    collector: Collector,
    prunable: list[str],
    on_block: Callable[[Block], None] | None = None,
    batches_per_pass: int | None = None,
    progress: bool = True,
    forward: Callable[[nn.Module, dict[str, torch.Tensor]], Any] | None = None,
) -> dict[str, int]:
    """Run `loaded.model.base_model(**batch)` for every batch, block by block, with `collector`'s hooks
    counting (each batch inside `collector.batch(...)`); returns how many blocks and passes it took.

    `prunable`: the model's names of the prunable linears (those outside ModuleLists become blocks).
    `on_block` makes the run sequential (see the module docstring); it needs every batch in one pass.
    `forward(model, batch)` replaces the base model's forward (a retrieval model's two towers: models/retrieval.py).
    """
    model, source = loaded.model, loaded.weights
    if source is None:
        raise MultiflowError("run_blocks needs a lazily loaded model (load_model(..., lazy=True))")
    blocks = find_blocks(model, prunable)
    embeddings = input_embeddings_block(model, blocks)
    if embeddings is not None:
        blocks = _in_model_order(model, [*blocks, embeddings])
    in_blocks = {p for b in blocks for p in b.parameters}
    resident = [p for p in base_parameters(model) if p not in in_blocks]
    per_pass = len(batches) if not batches_per_pass else max(1, batches_per_pass)
    passes = [batches[i : i + per_pass] for i in range(0, len(batches), per_pass)]
    if on_block is not None and len(passes) > 1:
        raise MultiflowError(f"sequential calibration needs all {len(batches)} batches in one pass; raise "
                             f"--samples-per-pass to at least {len(batches)} batches' worth")
    source.load(model, resident, loaded.dtype, loaded.device)
    hooks = []
    bar = tqdm(total=len(blocks) * len(passes), unit="block", desc="Step 2: calibration, block by block",
               disable=not progress)
    try:
        with bar:
            for group in passes:
                turns = _Turns(len(group))
                hooks = _install_gates(blocks, turns, on_block is not None, collector)
                _one_pass(loaded, blocks, group, turns, collector, on_block, bar, forward)
                for h in hooks:
                    h.remove()
                hooks = []
    finally:
        for h in hooks:
            h.remove()
        source.unload(model, [p for p in base_parameters(model) if model.get_parameter(p).device.type != "meta"])
    return {"blocks": sum(b.calibrated for b in blocks), "passes": len(passes)}


def _install_gates(blocks: list[Block], turns: _Turns, sequential: bool, collector: Collector) -> list:
    hooks = []
    for i, block in enumerate(blocks):
        hooks.append(block.module.register_forward_pre_hook(lambda m, a, i=i: turns.park((i, 0))))
        if sequential and block.calibrated:
            def rerun(module, args, kwargs, output, i=i):
                turns.park((i, 1))
                with collector.paused():
                    return module.forward(*args, **kwargs)

            hooks.append(block.module.register_forward_hook(rerun, with_kwargs=True, prepend=True))
    return hooks


def _one_pass(loaded: LoadedModel, blocks: list[Block], batches, turns: _Turns, collector: Collector, on_block,
              bar, run_model=None) -> None:
    model, source = loaded.model, loaded.weights

    def forward(batch):
        with torch.inference_mode(), collector.batch(batch["attention_mask"], image_positions(loaded, batch)):
            if run_model is None:
                model.base_model(**batch, use_cache=False)
            else:
                run_model(model, batch)

    threads = [threading.Thread(target=turns.work, args=(w, lambda b=b: forward(b)), name=f"multiflow-batch-{w}",
                                daemon=True) for w, b in enumerate(batches)]
    for t in threads:
        t.start()
    current: int | None = None
    pruned: set[int] = set()
    seen: set[int] = set()
    try:
        while True:
            with turns.cond:
                turns.cond.wait_for(lambda: turns.running is None)
                if turns.errors:
                    raise turns.errors[0]
                waiting = sorted({a for a in turns.at if a is not _DONE})
            if not waiting:
                break
            where = waiting[0]
            block = where[0]
            if block >= 0 and block != current:
                if current is not None:
                    source.unload(model, blocks[current].parameters)
                source.load(model, blocks[block].parameters, loaded.dtype, loaded.device)
                current = block
            if where[1] == 1 and block not in pruned:  # sequential: all workers ran the dense block
                on_block(blocks[block])
                pruned.add(block)
            for w, at in enumerate(list(turns.at)):
                if at == where:
                    turns.release(w)
                    _trim()
                    with turns.cond:
                        if turns.errors:
                            raise turns.errors[0]
            if block >= 0 and block not in seen:
                seen.add(block)
                bar.update(1)
        bar.update(len(blocks) - len(seen))  # blocks no batch reached (e.g. no image in any batch)
    finally:
        turns.stop()
        for t in threads:
            t.join()
        if current is not None:
            source.unload(model, blocks[current].parameters)
