"""Step 2 end to end: calibration samples -> prompts -> forward passes with hooks -> stats.safetensors."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from multiflow import layers
from multiflow.calibration_data import Sample, load_samples
from multiflow.errors import MultiflowError
from multiflow.model_loading import load_model
from multiflow.statistics import collect_statistics
from multiflow.stats_file import LayerStats, from_collector, save_stats

log = logging.getLogger("multiflow")

LLAVA_15_TEMPLATE = "USER: <image>\n{question} ASSISTANT:"
# The same conversation as a chat template (processor-side), for checkpoints converted on the fly.
LLAVA_15_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'user' %}USER: "
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>\n{% endif %}{% endfor %}"
    "{% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %} "
    "{% else %}ASSISTANT: {% for c in message['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}"
    "{% endif %}{% endfor %}</s>{% endif %}{% endfor %}{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


@dataclass(frozen=True)
class CalibrationConfig:
    """Everything `multiflow calibrate` needs, validated at the edge (the CLI)."""

    model: Path
    output: Path
    data: Path | None = None
    nsamples: int = 128
    seed: int = 0
    batch_size: int = 1
    dtype: str = "float32"
    device: str = "cpu"
    include_answers: bool = False
    split_token_types: bool = False
    rules: Path | None = None
    vision_tower: Path | None = None
    allow_pickle: bool = False
    trust_remote_code: bool = False

    def __post_init__(self) -> None:
        if self.nsamples < 1:
            raise MultiflowError(f"--nsamples {self.nsamples}: give at least 1")
        if self.batch_size < 1:
            raise MultiflowError(f"--batch-size {self.batch_size}: give at least 1")


def build_prompt(processor: Any, question: str, answer: str | None) -> str:
    """The processor's chat template when it has one, else LLaVA-1.5's; ends at the answer slot
    unless an answer is given."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        if answer is None:
            return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
        conversation.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return processor.apply_chat_template(conversation, add_generation_prompt=False, tokenize=False)
    prompt = LLAVA_15_TEMPLATE.format(question=question)
    return prompt if answer is None else f"{prompt} {answer}"


def calibrate(config: CalibrationConfig, progress: bool = True) -> tuple[dict[str, LayerStats], dict[str, Any]]:
    """Run the calibration pass; write config.output atomically; return (stats, metadata)."""
    from multiflow import __version__

    inventory = layers.from_checkpoint(config.model, config.rules, config.vision_tower, config.allow_pickle)
    samples, report = load_samples(config.data, config.nsamples, config.seed)
    loaded = load_model(config.model, inventory, config.dtype, config.device, config.trust_remote_code,
                        config.allow_pickle, config.vision_tower)
    family = inventory.family
    # hooks live on the loaded model's modules; the file uses the checkpoint's (Step 1) names
    to_model = {v: k for k, v in loaded.to_inventory_name.items()}
    names = [to_model[layer.name] for layer in inventory.layers]
    aligned = _aligned_pattern(family, loaded)
    batches = [samples[i : i + config.batch_size] for i in range(0, len(samples), config.batch_size)]
    bar = tqdm(total=len(samples), unit="sample", desc="Step 2: calibration", disable=not progress)
    with bar, collect_statistics(loaded.model, names, aligned, config.split_token_types) as collector:
        for batch in batches:
            inputs = _encode(loaded.processor, batch, config.include_answers).to(loaded.device)
            image_positions = None
            if loaded.image_token_id is not None:
                image_positions = inputs["input_ids"] == loaded.image_token_id
            with collector.batch(inputs["attention_mask"], image_positions), torch.inference_mode():
                loaded.model(**inputs, use_cache=False)
            bar.update(len(batch))
    stats = {loaded.to_inventory_name[name]: st for name, st in from_collector(collector).items()}
    silent = [n for n, st in stats.items() if not st.tokens]
    if silent:
        log.warning("%d layer(s) saw no calibration token: %s", len(silent), ", ".join(silent[:5]))
    meta = {
        "tool": "multiflow",
        "version": __version__,
        "model": str(config.model),
        "naming": inventory.naming,
        "data": report.source,
        "data_kind": report.kind,
        "nsamples": len(samples),
        "nsamples_requested": config.nsamples,
        "seed": config.seed,
        "batch_size": config.batch_size,
        "prompt": "with answers" if config.include_answers else "ends at the answer slot",
        "dtype": config.dtype,
        "device": str(loaded.device),
        "split_token_types": config.split_token_types,
        "skipped_samples": len(report.skipped),
    }
    save_stats(config.output, stats, meta)
    return stats, meta


def _aligned_pattern(family, loaded) -> str | None:
    """Which loaded-model layers see prompt-aligned tokens (family data; converted models are transformers LLaVA)."""
    from multiflow.modality_rules import family_by_name

    if family is not None and family.naming == "llava-original":
        return family_by_name("llava").aligned_layers
    return family.aligned_layers if family else None


def _encode(processor: Any, batch: list[Sample], include_answers: bool):
    prompts = [build_prompt(processor, s.question, s.answer if include_answers else None) for s in batch]
    return processor(images=[s.image for s in batch], text=prompts, return_tensors="pt", padding=True)
