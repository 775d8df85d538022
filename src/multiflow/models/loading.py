"""Load a checkpoint as a runnable transformers model with its processor (Step 2 needs forward passes).

Two ways: the whole model in memory (Hugging Face layouts through
`from_pretrained`: safetensors only unless the user allows pickles,
`trust_remote_code` only when the user passes it, with a warning naming the code
that will run: `warn_remote_code`), or lazily: the model built
with its parameters on the meta device plus a `WeightSource` saying where each
one lies on disk, so a runner can load one block at a time (`block_runner`).
Original-layout LLaVA is converted to the transformers model either way.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from multiflow.errors import MultiflowError
from multiflow.models.families import rename_key
from multiflow.models.inventory import Inventory
from multiflow.storage.checkpoint import TensorEntry, check_finite, list_tensors, read_tensors

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_CONFIGS_WITH_CODE = ("config.json", "tokenizer_config.json", "preprocessor_config.json", "processor_config.json")
log = logging.getLogger("multiflow")


def remote_code(folder: str | Path) -> list[str]:
    """What trust_remote_code lets transformers run from `folder`: its Python files, and the classes
    that the `auto_map` of its config files names (`repo--module.Class`: code from another repository)."""
    folder = Path(folder)
    found = [path.name for path in sorted(folder.glob("*.py"))]
    for name in _CONFIGS_WITH_CODE:
        try:
            auto_map = json.loads((folder / name).read_text(encoding="utf-8")).get("auto_map") or {}
        except (OSError, ValueError, AttributeError):
            continue
        for key, value in (auto_map.items() if isinstance(auto_map, dict) else ()):
            for target in value if isinstance(value, list) else [value]:
                if isinstance(target, str):
                    found.append(f"{name} auto_map {key} -> {target}")
    return found


@functools.lru_cache(maxsize=None)
def warn_remote_code(folder: Path) -> None:
    """Once per folder: --trust-remote-code was passed; say which code it lets run."""
    found = remote_code(folder)
    if found:
        log.warning("--trust-remote-code: transformers may run the Python code of %s with your privileges: %s",
                    folder, "; ".join(found))
    else:
        log.warning("--trust-remote-code: %s holds no *.py file and no auto_map entry, so no code of its own "
                    "runs; drop the flag", folder)


@dataclass
class WeightSource:
    """Where each parameter of a lazily built model lies: a checkpoint tensor, or one computed at load."""

    entries: dict[str, TensorEntry]  # parameter name in the model -> checkpoint tensor
    computed: dict[str, torch.Tensor] = field(default_factory=dict)  # e.g. embeddings grown by new tokens

    def load(self, model: torch.nn.Module, names: list[str], dtype: torch.dtype, device: torch.device) -> None:
        """Give `model` the real values of parameters `names` (floating ones in `dtype`), on `device`."""
        for name in names:
            if name in self.computed:
                value = _cast(self.computed[name], dtype, device)
                check_finite(value, name, "the converted model")
                set_parameter(model, name, value)
        on_disk = [n for n in names if n not in self.computed]
        owner = {id(self.entries[n]): n for n in on_disk}
        for entry, tensor in read_tensors([self.entries[n] for n in on_disk]):
            name = owner[id(entry)]
            expected = tuple(model.get_parameter(name).shape)
            if tuple(tensor.shape) != expected:
                raise MultiflowError(f"tensor {entry.key!r} of {entry.file} has shape {list(tensor.shape)}, but the "
                                     f"model built from config.json expects {list(expected)} for {name}")
            value = _cast(tensor, dtype, device)  # a copy: the buffer is reused
            _check_cast(tensor, value, entry.key, entry.file)
            set_parameter(model, name, value)

    @staticmethod
    def unload(model: torch.nn.Module, names: list[str]) -> None:
        """Put parameters `names` back on the meta device (their memory is freed)."""
        for name in names:
            p = model.get_parameter(name)
            set_parameter(model, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))


def _check_cast(stored: torch.Tensor, value: torch.Tensor, key: str, file) -> None:
    """NaN/inf in the checkpoint, or finite values that overflow the --dtype they were cast to: an error."""
    try:
        check_finite(value, key, file)
    except MultiflowError:
        check_finite(stored, key, file)  # raises when the checkpoint itself holds them
        raise MultiflowError(f"tensor {key!r} of {file} overflows {value.dtype} (values beyond its range); "
                             f"run with --dtype float32 or bfloat16") from None


def _cast(tensor: torch.Tensor, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype, copy=True)


def set_parameter(model: torch.nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner)
    module._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)


@dataclass
class LoadedModel:
    model: torch.nn.Module
    processor: Any
    device: torch.device
    image_token_id: int | None
    to_inventory_name: dict[str, str]  # module name in the loaded model -> Step 1 layer name
    weights: WeightSource | None = None  # set when parameters are still on disk (meta), for block-by-block runs
    dtype: torch.dtype = torch.float32


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise MultiflowError(f"--device {device}: no CUDA device is available here; use --device cpu")
    try:
        return torch.device(device)
    except RuntimeError as exc:
        raise MultiflowError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, auto)") from exc


def load_model(
    folder: str | Path,
    inventory: Inventory,
    dtype: str = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    vision_tower: str | Path | None = None,
    lazy: bool = False,
    device_map: str | None = None,
) -> LoadedModel:
    """The checkpoint as an eval-mode transformers model on `device`, plus its processor.

    `lazy`: parameters stay on disk (meta device) and `LoadedModel.weights` says where;
    buffers are real. `device_map` ("auto"): whole model spread over the GPUs by accelerate.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText, AutoTokenizer

    from multiflow.models.processors import load_processor

    folder = Path(folder)
    if dtype not in DTYPES:
        raise MultiflowError(f"--dtype {dtype!r}: choose one of {', '.join(DTYPES)}")
    target = resolve_device(device)
    if trust_remote_code:
        warn_remote_code(folder)
    if inventory.family is not None and inventory.family.converted_to is not None:
        if device_map is not None:
            raise MultiflowError("--device-map applies to transformers-layout checkpoints; an original-layout LLaVA "
                                 "is converted in memory: use --device")
        convert = _CONVERTERS[inventory.family.naming]
        loaded = convert(folder, inventory, DTYPES[dtype], target, vision_tower, allow_pickle, lazy)
        use_family_prompt(loaded.processor, inventory.family)
        return loaded
    text_only = inventory.family is not None and inventory.family.text_only  # a plain causal LM: a tokenizer
    auto_model = AutoModelForCausalLM if text_only else AutoModelForImageTextToText
    if inventory.family is not None and inventory.family.retrieval:  # its own class: no Auto class covers them all
        auto_model = retrieval_class(inventory.family, inventory.config, folder)
    try:
        processor = (AutoTokenizer.from_pretrained(folder, trust_remote_code=trust_remote_code) if text_only
                     else load_processor(folder, trust_remote_code))
    except (OSError, ValueError, KeyError) as exc:
        raise MultiflowError(
            f"cannot load a {'tokenizer' if text_only else 'processor (tokenizer + image processor)'} from "
            f"{folder}: {exc}. Calibration and evaluation need the tokenizer{'' if text_only else ' and preprocessor'} "
            "files next to the weights"
        ) from exc
    if not text_only:
        use_family_prompt(processor, inventory.family)
    try:
        if lazy:
            from accelerate import init_empty_weights

            config = AutoConfig.from_pretrained(folder, trust_remote_code=trust_remote_code)
            with init_empty_weights(include_buffers=False):
                model = (auto_model.from_config(config, trust_remote_code=trust_remote_code)
                         if hasattr(auto_model, "from_config") else auto_model(config))  # an Auto class, or a class
        else:
            extra = {"device_map": device_map} if device_map else {}
            model, info = auto_model.from_pretrained(
                folder, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code, use_safetensors=not allow_pickle,
                output_loading_info=True, **extra)
    except (OSError, ValueError) as exc:
        raise MultiflowError(f"cannot load the model from {folder}: {exc}") from exc
    if not lazy and info.get("missing_keys"):  # keys transformers does not know: the rules file's renames
        _load_renamed(model, folder, inventory.renames, sorted(info["missing_keys"]), DTYPES[dtype], allow_pickle)
    weights = None
    if lazy:
        weights = _lazy_source(folder, inventory, model, allow_pickle)
        _move_buffers(model, target)
    elif device_map:
        target = next(p.device for p in model.parameters())
    else:
        model.to(target)
    if not lazy:
        _check_loaded(model, folder, inventory.renames, allow_pickle)
    model.eval()
    names = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    missing = [layer.name for layer in inventory.layers if layer.name not in names]
    if missing:
        raise MultiflowError(
            f"the loaded model has no module named {missing[0]} (and {len(missing) - 1} more): "
            "its layout differs from the checkpoint's"
        )
    return LoadedModel(model, processor, target, image_token_id(inventory.family, model.config, processor),
                       {l.name: l.name for l in inventory.layers}, weights, DTYPES[dtype])


def use_family_prompt(processor: Any, family) -> None:
    """The family's prompt format (`Family.prompt`) as the processor's chat template (models/prompts.py), when the
    processor has none, or always for a rules file's `prompt`."""
    from multiflow.models.prompts import chat_template

    if family is None or not family.prompt:
        return
    if family.prompt_replaces_chat_template or not getattr(processor, "chat_template", None):
        processor.chat_template = chat_template(family.prompt)


def image_token_id(family, config: Any, processor: Any) -> int | None:
    """The image placeholder's token id: the family's (a rules file's `image_token_id`, or its `image_token` looked
    up in the tokenizer), else config.json's image_token_id / image_token_index; None for a model without one."""
    if family is not None and family.image_token_id is not None:
        return family.image_token_id
    if family is not None and family.image_token is not None:
        tokenizer = getattr(processor, "tokenizer", processor)
        found = tokenizer.convert_tokens_to_ids(family.image_token)
        if found is None or (found == tokenizer.unk_token_id and family.image_token != tokenizer.unk_token):
            raise MultiflowError(f"image_token {family.image_token!r} of {family.name} is not a token of the "
                                 "model's tokenizer; give the placeholder the processor inserts (e.g. '<image>'), "
                                 "or image_token_id")
        return int(found)
    token_id = getattr(config, "image_token_id", None)
    return getattr(config, "image_token_index", None) if token_id is None else token_id


def _load_renamed(model: torch.nn.Module, folder: Path, renames, missing: list[str], dtype: torch.dtype,
                  allow_pickle: bool) -> None:
    """Parameters transformers found no key for, loaded from the checkpoint keys that `renames` (a rules file's)
    give their names (`rename_key`, as Step 1 and block-by-block loading do); others are left as transformers
    left them (it warns)."""
    params = dict(model.named_parameters())
    wanted = {name for name in missing if name in params}
    entries = [(e, n) for e in list_tensors(folder, allow_pickle) if (n := rename_key(e.key, renames)) in wanted]
    for entry, tensor in read_tensors([e for e, _ in entries]):
        name = rename_key(entry.key, renames)
        if tuple(tensor.shape) != tuple(params[name].shape):
            raise MultiflowError(f"tensor {entry.key!r} of {entry.file} has shape {list(tensor.shape)}, but the "
                                 f"model built from config.json expects {list(params[name].shape)} for {name}")
        value = _cast(tensor, dtype, params[name].device)
        _check_cast(tensor, value, entry.key, entry.file)
        set_parameter(model, name, value)


def retrieval_class(family, config: dict, folder: Path):
    """The transformers class a retrieval checkpoint names in `architectures`, if the family lists it
    (BLIP's model_type also covers captioning and VQA: AutoModel would pick another class)."""
    import transformers

    named = [a for a in config.get("architectures") or () if a in family.architectures]
    if not named:
        raise MultiflowError(f"{folder}/config.json: architectures {config.get('architectures')} name none of the "
                             f"{family.name} retrieval classes ({', '.join(family.architectures)})")
    return getattr(transformers, named[0])


def _check_loaded(model: torch.nn.Module, folder: Path, renames, allow_pickle: bool) -> None:
    """Every floating-point parameter of a whole loaded model is finite; else an error naming its tensor and file."""
    for name, param in model.named_parameters():
        try:
            check_finite(param.detach(), name, folder)
        except MultiflowError:
            entry = next((e for e in list_tensors(folder, allow_pickle) if rename_key(e.key, renames) == name), None)
            key, file = (entry.key, entry.file) if entry else (name, folder)
            raise MultiflowError(f"tensor {key!r} of {file} holds NaN or inf values as loaded in {param.dtype}; "
                                 "fix or re-download the checkpoint (or choose another --dtype if it overflows)"
                                 ) from None


def _lazy_source(folder: Path, inventory: Inventory, model: torch.nn.Module, allow_pickle: bool = False
                 ) -> WeightSource:
    """Every parameter of the model's base (what a forward for statistics runs) found in the checkpoint."""
    entries = {}
    for entry in list_tensors(folder, allow_pickle):
        if entry.begin is None:
            raise MultiflowError(f"{entry.file}: block-by-block loading reads safetensors only; convert the "
                                 "checkpoint to safetensors or pass --whole-model")
        entries[rename_key(entry.key, inventory.renames)] = entry
    # Tied weights (an output head tied to the embeddings) are not in the checkpoint, and a model built on the
    # meta device is not tied yet: read each from its source's tensor (a copy of the entry: one per parameter).
    for target, source in (getattr(model, "all_tied_weights_keys", None) or {}).items():
        if target not in entries and source in entries:
            entries[target] = dataclasses.replace(entries[source])
    needed = base_parameters(model)
    missing = [n for n in needed if n not in entries]
    if missing:
        raise MultiflowError(f"{folder}: no checkpoint tensor for parameter {missing[0]} of the model "
                             f"({len(missing)} missing); its key names are not known to multiflow: pass --whole-model")
    return WeightSource({n: entries[n] for n in needed})


def is_encoder_decoder(model: torch.nn.Module) -> bool:
    """Is the model's language model an encoder-decoder (BLIP-2's Flan-T5)? It reads the prompt with its
    encoder and produces the answer with its decoder."""
    return bool(getattr(model.config.get_text_config(), "is_encoder_decoder", False))


def base_parameters(model: torch.nn.Module) -> list[str]:
    """Full names of the parameters of the model's base (without its output head)."""
    base = model.base_model
    prefix = next(n for n, m in model.named_modules() if m is base)
    return [f"{prefix}.{n}" if prefix else n for n, _ in base.named_parameters()]


def _move_buffers(model: torch.nn.Module, device: torch.device) -> None:
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.device != device:
                module._buffers[key] = buffer.to(device)


def _load_original(folder: Path, inventory: Inventory, dtype: torch.dtype, device: torch.device,
                   vision_tower: str | Path | None, allow_pickle: bool, lazy: bool = False) -> LoadedModel:
    """Convert an original-layout LLaVA checkpoint to the equivalent transformers LlavaForConditionalGeneration
    (as transformers' convert_llava_weights_to_hf.py does: `<image>` and `<pad>` tokens added,
    new embedding rows set to the mean of the others)."""
    from accelerate import init_empty_weights
    from transformers import (AddedToken, AutoTokenizer, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig,
                              LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor)

    from multiflow.models.prompts import LLAVA_15_CHAT_TEMPLATE
    from multiflow.storage.checkpoint import read_config, read_tensor

    family = inventory.family
    config = read_config(folder)
    sources = [(e, rename_key(e.key, family.conversion_renames)) for e in list_tensors(folder, allow_pickle)]
    clip_folder = Path(vision_tower) if vision_tower else None
    if not any(name.startswith("model.vision_tower.") for _, name in sources):
        if clip_folder is None:
            raise MultiflowError(
                f"{folder} is an original-layout LLaVA checkpoint without its vision tower weights (config names "
                f"{config.get('mm_vision_tower')}); pass --vision-tower PATH to a local copy of that CLIP folder"
            )
        sources += [(e, rename_key(name, family.conversion_renames))
                    for e in list_tensors(clip_folder, allow_pickle) if (name := family.vision_tower_name(e.key))]
    if config.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise MultiflowError(f"{folder}: mm_projector_type {config.get('mm_projector_type')!r} has no transformers "
                             "equivalent (LLaVA-1.5 uses mlp2x_gelu)")
    clip_config = read_config(clip_folder) if clip_folder else None
    vision = CLIPVisionConfig(**(clip_config.get("vision_config", clip_config) if clip_config else {}))
    text = LlamaConfig(**{k: v for k, v in config.items() if not k.startswith("mm_") and k not in
                          ("architectures", "model_type", "auto_map")})
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        images = CLIPImageProcessor.from_pretrained(clip_folder or folder)
    except (OSError, ValueError) as exc:
        raise MultiflowError(f"cannot load the tokenizer of {folder} or the image processor of "
                             f"{clip_folder or folder}: {exc}") from exc
    if "<image>" not in tokenizer.get_vocab():
        tokenizer.add_tokens(AddedToken("<image>", special=True, normalized=False), special_tokens=True)
    if tokenizer.pad_token is None:
        tokenizer.add_special_tokens({"pad_token": "<pad>"})
    entries = {name: e for e, name in sources}
    computed = {}
    vocab = entries["model.language_model.embed_tokens.weight"].shape[0]
    if len(tokenizer) > vocab:  # new token rows: the mean of the existing rows
        grow = len(tokenizer) - vocab
        for key in ("model.language_model.embed_tokens.weight", "lm_head.weight"):
            if key in entries:
                old = read_tensor(entries.pop(key)).float()
                computed[key] = torch.cat([old, old.mean(0, keepdim=True).expand(grow, -1)])
        text.vocab_size = len(tokenizer)
    strategy = "full" if config.get("mm_vision_select_feature") == "cls_patch" else "default"
    llava = LlavaConfig(vision_config=vision, text_config=text,
                        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                        vision_feature_layer=config.get("mm_vision_select_layer", -2),
                        vision_feature_select_strategy=strategy,
                        image_seq_length=(vision.image_size // vision.patch_size) ** 2,
                        projector_hidden_act="gelu", multimodal_projector_bias=True)
    with init_empty_weights(include_buffers=False):
        model = LlavaForConditionalGeneration(llava)
    params = [n for n, _ in model.named_parameters()]
    missing = [n for n in params if n not in entries and n not in computed]
    unexpected = [n for n in entries if n not in set(params)]
    if missing or unexpected:
        raise MultiflowError(f"{folder}: converting to transformers LLaVA left {len(missing)} weights missing "
                             f"({missing[:1]}) and {len(unexpected)} unexpected ({unexpected[:1]})")
    source = WeightSource(entries, computed)
    _move_buffers(model, device)
    if not lazy:
        source.load(model, params, dtype, device)
    processor = LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy=strategy,
                               chat_template=getattr(tokenizer, "chat_template", None) or LLAVA_15_CHAT_TEMPLATE,
                               num_additional_image_tokens=1)
    to_original = {}
    for entry, name in sources:
        if entry.key.endswith(".weight"):
            hf = name.removesuffix(".weight")
            original = entry.key.removesuffix(".weight")
            if entry.file.parent != folder:  # from the CLIP folder: named as inside the LLaVA checkpoint
                original = family.vision_tower_name(original)
            to_original[hf] = original
    wanted = {layer.name for layer in inventory.layers}
    mapping = {hf: orig for hf, orig in to_original.items() if orig in wanted}
    if set(mapping.values()) != wanted:
        raise MultiflowError(f"{folder}: converted model lacks layers {sorted(wanted - set(mapping.values()))[:3]}")
    model.eval()
    return LoadedModel(model, processor, device, llava.image_token_id, mapping, source if lazy else None, dtype)


# Layouts run as another family's transformers model (Family.converted_to): Family.naming -> converter.
_CONVERTERS = {"llava-original": _load_original}
