"""The prunable layers of a model, by modality, from a checkpoint folder or an nn.Module.

Both roads end in the same `Inventory`: module names (a checkpoint's keys
renamed by its family's `renames`, models/families.py: transformers' in-memory
names for most families, the original LLaVA repository's own names for that
layout, the keys themselves for a rules file without renames), their modality,
shape and dtype, and a way to read their weights in order. Step 1 and later
steps see only the inventory.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import nn

from multiflow.errors import MultiflowError
from multiflow.models.families import Family, ModalityRules, Rule, family_for, load_rules_file, rename_key
from multiflow.storage.checkpoint import TensorEntry, list_tensors, read_config, read_tensors
from multiflow.storage import pieces

R = TypeVar("R")

PRUNABLE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


@dataclass(frozen=True)
class Layer:
    name: str
    modality: str
    shape: tuple[int, ...]
    dtype: torch.dtype | str  # str: a safetensors dtype torch cannot hold
    handle: Any  # TensorEntry for a checkpoint, the weight Parameter for a module

    @property
    def numel(self) -> int:
        return self.shape[0] * self.shape[1]


@dataclass
class Inventory:
    """Prunable layers (in model order) and everything else, classified."""

    rules: ModalityRules
    naming: str
    layers: list[Layer]
    skipped: list[tuple[str, int, Rule]] = field(default_factory=list)  # (name, numel, rule)
    other_params: int = 0  # biases, norms, convolutions, buffers: never candidates
    notes: list[str] = field(default_factory=list)
    model_path: str | None = None
    family: Family | None = None
    reader: Callable[[list[Layer]], Iterator[tuple[Layer, torch.Tensor]]] | None = None
    config: dict[str, Any] = field(default_factory=dict)
    renames: tuple[tuple[str, str], ...] = ()  # checkpoint key -> module name (as applied to the layers)

    def dead_layers(self) -> list[str]:
        """Prunable layers whose output cannot reach the model's output (family data)."""
        if self.family is None:
            return []
        return self.family.dead_layers(self.config, [layer.name for layer in self.layers])

    def read(self, layers: list[Layer] | None = None) -> Iterator[tuple[Layer, torch.Tensor]]:
        """Yield (layer, weight) for `layers` (default all), in the given order.

        A checkpoint's weight is valid only until the next one is requested
        (buffers are reused); clone it to keep it.
        """
        assert self.reader is not None
        return self.reader(self.layers if layers is None else layers)

    def with_reader(self, reader: Callable[[list[Layer]], Iterator[tuple[Layer, torch.Tensor]]],
                    dtype: torch.dtype) -> "Inventory":
        """A copy whose layers' tensors (of `dtype`) come from `reader` (e.g. scores computed from the weights).
        It has no model_path, so `map_pieces` cuts what `reader` yields and never reads the checkpoint's files."""
        return replace(self, layers=[replace(l, dtype=dtype) for l in self.layers], reader=reader, model_path=None)

    def map_pieces(self, layers: list[Layer], fn: Callable[[Layer, torch.Tensor], R]
                   ) -> Iterator[tuple[Layer, list[R]]]:
        """Yield (layer, [fn(layer, piece) for each piece of its weight]) for `layers`, in order: the flattened
        weight cut into contiguous pieces, `fn` run on them on torch.get_num_threads() threads (so it should
        release the GIL: numba's nogil kernels, torch operations), results in piece order. A piece is valid only
        during its call. From a safetensors checkpoint the pieces are read by storage/pieces.py (in place from
        the page cache, around it otherwise); else each weight is read whole and cut in memory."""
        if self.model_path is not None and all(isinstance(l.handle, TensorEntry) and l.handle.begin is not None
                                               and isinstance(l.dtype, torch.dtype) for l in layers):
            by_entry = {id(layer.handle): layer for layer in layers}
            for entry, results in pieces.map_pieces([l.handle for l in layers], lambda e, p: fn(by_entry[id(e)], p)):
                yield by_entry[id(entry)], results
            return
        with ThreadPoolExecutor(torch.get_num_threads(), thread_name_prefix="multiflow-piece") as pool:
            for layer, weight in self.read(layers):
                flat = weight.contiguous().reshape(-1)
                step = max(1, pieces.PIECE_BYTES // flat.element_size())
                yield layer, list(pool.map(lambda piece: fn(layer, piece), flat.split(step)))

    def by_modality(self) -> dict[str, list[Layer]]:
        groups: dict[str, list[Layer]] = {m: [] for m in self.rules.modalities}
        for layer in self.layers:
            groups.setdefault(layer.modality, []).append(layer)
        return groups


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _classify(
    rules: ModalityRules, candidates: list[tuple[str, tuple[int, ...], torch.dtype, Any]]
) -> tuple[list[Layer], list[tuple[str, int, Rule]]]:
    """Apply the rules; order layers by (rule position, natural name order)."""
    layers, skipped, unmatched = [], [], []
    order = {rule: i for i, rule in enumerate(rules.rules)}
    keyed = []
    for name, shape, dtype, handle in candidates:
        rule = rules.classify(name)
        numel = shape[0] * shape[1]
        if numel == 0 and rule is not None and rule.group != "skip":
            where = f"{handle.file}: tensor {handle.key!r}" if isinstance(handle, TensorEntry) else f"layer {name}"
            raise MultiflowError(f"{where} is a linear layer with no weights (shape {list(shape)}); fix the "
                                 "checkpoint, or skip it with a rule of group skip in --rules FILE")
        if rule is None:
            unmatched.append(name)
        elif rule.group == "skip":
            skipped.append((name, numel, rule))
        else:
            keyed.append(((order[rule], _natural(name)), Layer(name, rule.group, shape, dtype, handle)))
    if unmatched:
        shown = ", ".join(unmatched[:8]) + (f" and {len(unmatched) - 8} more" if len(unmatched) > 8 else "")
        raise MultiflowError(
            f"{len(unmatched)} linear weight(s) match no modality rule of {rules.name!r}: {shown}. "
            "Add rules for them with --rules FILE (group vision, text, fusion or skip)"
        )
    for _, layer in sorted(keyed, key=lambda item: item[0]):
        if layer.dtype not in PRUNABLE_DTYPES:
            raise MultiflowError(
                f"layer {layer.name} has dtype {layer.dtype}; multiflow prunes float16, bfloat16 and float32 weights"
            )
        layers.append(layer)
    return layers, skipped


def _bare_parameters(rules: ModalityRules, bare: list[tuple[str, int]]) -> tuple[list[tuple[str, int, Rule]], int]:
    """2-D parameters that are not a linear layer's `.weight` (Gemma 3's `mm_input_projection_weight`,
    nn.MultiheadAttention's `in_proj_weight`): those a family rule of group skip names are listed as skipped with
    its reason (never pruned, and said so); the others stay uncounted parameters. Returns (listed, other numel)."""
    listed, other = [], 0
    for name, numel in bare:
        rule = rules.classify(name)
        if rule is not None and rule.group == "skip" and rule in rules.rules:
            listed.append((name, numel, rule))
        else:
            other += numel
    return listed, other


def _role(name: str) -> str:
    """A module's role: its name with layer indices replaced (`layers.3.mlp.fc1` -> `layers.#.mlp.fc1`)."""
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


def _refuse_misshapen(rules: ModalityRules, weighted: list[tuple[str, TensorEntry]],
                      candidates: list[tuple[str, tuple[int, ...], Any, Any]]) -> None:
    """A `.weight` that a rule puts in a modality but is not 2-D is refused when it stands where a linear
    layer does: its role is a 2-D layer's elsewhere (`layers.0.q_proj` 1-D, `layers.1.q_proj` 2-D), or, 1-D,
    its length is no dimension of any linear (a norm's or scale's length is the width of some linear; a
    flattened matrix's is not). Convolutions and norms keep their shapes and pass."""
    linear_roles = {_role(name) for name, *_ in candidates if (r := rules.classify(name)) and r.group != "skip"}
    widths = {d for _, shape, *_ in candidates for d in shape}
    for name, entry in weighted:
        if not entry.key.endswith(".weight") or len(entry.shape) == 2:
            continue
        rule = rules.classify(name)
        if rule is None or rule.group == "skip":
            continue
        if _role(name) in linear_roles or (len(entry.shape) == 1 and entry.shape[0] not in widths):
            raise MultiflowError(
                f"{entry.file}: tensor {entry.key!r} stands where a prunable linear layer does (rule "
                f"{rule.pattern!r} -> {rule.group}) but has shape {list(entry.shape)}, not [out, in]; fix the "
                "checkpoint, or skip it with a rule of group skip in --rules FILE"
            )


def _resolve_rules(config: dict[str, Any], rules: Any, where: str) -> tuple[ModalityRules, Family | None, tuple]:
    """Rules from the argument (a rules file, a Family, a ModalityRules) or the family preset of `config`. A rules
    file gives a Family of its own (`load_rules_file`: the preset it names or the detected one, its fields
    replaced), so every later step (renames, aligned layers, image token, prompt, dead layers) reads the file."""
    family = family_for(config)
    if isinstance(rules, Family):
        return rules.rules, rules, rules.renames
    if isinstance(rules, ModalityRules):
        return rules, family, family.renames if family else ()
    if rules is not None:
        family = load_rules_file(rules, family)
        return family.rules, family, family.renames
    if family is None:
        raise MultiflowError(
            f"{where}: unknown architecture (model_type {config.get('model_type')!r}, "
            f"architectures {config.get('architectures')}); pass --rules FILE to group its layers by modality"
        )
    return family.rules, family, family.renames


def from_checkpoint(
    folder: str | Path,
    rules: str | Path | ModalityRules | None = None,
    vision_tower: str | Path | None = None,
    allow_pickle: bool = False,
    prefetch: int = 2,
) -> Inventory:
    """Inventory of a checkpoint folder, read from its headers only."""
    folder = Path(folder)
    config = read_config(folder)
    ruleset, family, renames = _resolve_rules(config, rules, str(folder))
    naming = family.naming if family else "checkpoint"
    weighted: list[tuple[str, TensorEntry]] = []  # (module name, entry)
    for entry in list_tensors(folder, allow_pickle):
        weighted.append((rename_key(entry.key, renames).removesuffix(".weight"), entry))  # the one rename (families.py)
    notes = []
    if family is not None and family.vision_tower_prefix:
        has_vision = any((rule := ruleset.classify(name)) is not None and rule.group == "vision"
                         for name, e in weighted if e.key.endswith(".weight") and len(e.shape) == 2)
        if vision_tower is not None:
            if has_vision:
                raise MultiflowError(f"{folder} already contains vision tower weights; drop --vision-tower")
            vt = Path(vision_tower)
            read_config(vt)
            for entry in list_tensors(vt, allow_pickle):
                name = family.vision_tower_name(entry.key.removesuffix(".weight"))
                if name is not None:
                    weighted.append((name, entry))
            notes.append(f"vision tower weights read from {vt}")
        elif not has_vision:
            named = config.get(family.vision_tower_config_key or "", "a CLIP checkpoint")
            notes.append(
                f"VISION TOWER MISSING: {folder} does not contain the vision tower weights (config names "
                f"{named}); the vision modality has no layers. Pass --vision-tower PATH to a local copy of it "
                "to include the vision tower"
            )
    elif vision_tower is not None:
        raise MultiflowError(
            "--vision-tower applies to original-layout LLaVA checkpoints (config with mm_vision_tower); "
            f"{folder} is a {naming} layout that carries its own vision tower"
        )
    candidates, bare, other = [], [], 0
    for name, entry in weighted:
        if entry.key.endswith(".weight") and len(entry.shape) == 2:
            candidates.append((name, entry.shape, entry.dtype, entry))
        elif len(entry.shape) == 2:
            bare.append((name, entry.numel))
        else:
            other += entry.numel
    _refuse_misshapen(ruleset, weighted, candidates)
    layers, skipped = _classify(ruleset, candidates)
    listed, rest = _bare_parameters(ruleset, bare)
    skipped += listed
    other += rest

    def reader(wanted: list[Layer]) -> Iterator[tuple[Layer, torch.Tensor]]:
        by_entry = {id(layer.handle): layer for layer in wanted}
        for entry, tensor in read_tensors([layer.handle for layer in wanted], prefetch=prefetch):
            yield by_entry[id(entry)], tensor

    return Inventory(ruleset, naming, layers, skipped, other, notes, str(folder), family, reader, config,
                     renames)


def from_module(model: nn.Module, rules: str | Path | ModalityRules | None = None) -> Inventory:
    """Inventory of an in-memory model: its nn.Linear layers by module name."""
    config_obj = getattr(model, "config", None)
    config = config_obj.to_dict() if hasattr(config_obj, "to_dict") else {}
    config.setdefault("architectures", None)
    config["architectures"] = list(config.get("architectures") or ()) + [type(model).__name__]
    ruleset, family, _ = _resolve_rules(config, rules, type(model).__name__)
    linear_params = set()
    candidates = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            weight = module.weight
            candidates.append((name, tuple(weight.shape), weight.dtype, weight))
            linear_params.add(id(weight))
    bare = [(name, p.numel()) for name, p in model.named_parameters()
            if p.ndim == 2 and id(p) not in linear_params and not name.endswith(".weight")]
    other = sum(p.numel() for p in model.parameters() if id(p) not in linear_params)
    layers, skipped = _classify(ruleset, candidates)
    listed, _ = _bare_parameters(ruleset, bare)
    skipped += listed
    other -= sum(numel for _, numel, _ in listed)

    def reader(wanted: list[Layer]) -> Iterator[tuple[Layer, torch.Tensor]]:
        for layer in wanted:
            yield layer, layer.handle.detach().cpu()

    naming = family.naming if family and family.naming != "checkpoint" else "module"
    return Inventory(ruleset, naming, layers, skipped, other, [], None, family, reader, config)
