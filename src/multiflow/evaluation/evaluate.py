"""What pruning cost: generation-based VQA metrics, and agreement with the dense model.

- Exact match: the greedy answer equals a reference after normalising case,
  punctuation and whitespace.
- ROUGE-L: F-measure of the greedy answer against the reference (the seed's
  OCR-VQA metric), with `rouge_score`, the maintained reference implementation.
- Against a dense reference model, on the reference answers fed in
  (teacher forcing): mean token-level KL(dense || pruned) and top-1 agreement.

Per question kind when the data names kinds. Metric functions are pure; the
model work is in `evaluate`.
"""

from __future__ import annotations

import functools
import math
import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from multiflow.calibration.data import Sample, load_samples
from multiflow.calibration.text_data import DEFAULT_SEQ_LEN
from multiflow.errors import MultiflowError
from multiflow.evaluation.reference import check_reference, kl_and_agreement, reference_warnings
from multiflow.evaluation.retrieval import DEFAULT_CLASS_TEMPLATE
from multiflow.models.loading import is_encoder_decoder
from multiflow.models.prompts import encode_prompts


_PUNCTUATION = re.compile(f"[{re.escape(string.punctuation)}]")


def normalize(text: str) -> str:
    """Lower case, punctuation removed, whitespace collapsed."""
    return " ".join(_PUNCTUATION.sub(" ", text.lower()).split())


def exact_match(prediction: str, references: list[str]) -> float:
    return float(any(normalize(prediction) == normalize(r) for r in references))


@functools.lru_cache(maxsize=1)
def _rouge_scorer():
    from rouge_score import rouge_scorer

    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)


def rouge_l(prediction: str, references: list[str]) -> float:
    """Best ROUGE-L F-measure of the prediction against any reference."""
    return max(_rouge_scorer().score(r, prediction)["rougeL"].fmeasure for r in references)


@dataclass(frozen=True)
class EvalConfig:
    model: Path
    data: Path | None = None
    reference: Path | None = None
    nsamples: int | None = None  # None: all
    seed: int = 0
    batch_size: int = 8
    max_new_tokens: int = 16
    dtype: str = "float32"
    device: str = "cpu"
    trust_remote_code: bool = False
    seq_len: int = DEFAULT_SEQ_LEN  # a plain language model: tokens per perplexity window
    class_templates: tuple[str, ...] = (DEFAULT_CLASS_TEMPLATE,)  # a retrieval model: zero-shot class prompts
    rules: Path | None = None  # a rules file (as for pruning): renames, image token, prompt; also for --reference

    def __post_init__(self) -> None:
        for flag, value in (("--nsamples", self.nsamples), ("--batch-size", self.batch_size),
                            ("--max-new-tokens", self.max_new_tokens)):
            if value is not None and value < 1:
                raise MultiflowError(f"{flag} {value}: give at least 1")


def evaluate(config: EvalConfig, progress: bool = True) -> dict[str, Any]:
    """Generate answers for every sample; score them; compare with the reference model if given.
    A plain language model gets perplexity on text windows instead (`perplexity.evaluate_perplexity`),
    a retrieval model recall@k and zero-shot accuracy (`retrieval.evaluate_retrieval`)."""
    from multiflow.models import inventory as layers
    from multiflow.models.loading import load_model

    inventory = layers.from_checkpoint(config.model, config.rules)
    family = inventory.family
    if family is not None and family.text_only:
        from multiflow.evaluation.perplexity import evaluate_perplexity

        return evaluate_perplexity(config, progress)
    if family is not None and family.retrieval:
        from multiflow.evaluation.retrieval import evaluate_retrieval

        return evaluate_retrieval(config, progress)
    samples, report = load_samples(config.data, config.nsamples if config.nsamples else 10**9, config.seed)
    samples = [s for s in samples if s.answer]
    if not samples:
        raise MultiflowError(f"no sample in {report.source} has a reference answer to evaluate against")
    loaded = load_model(config.model, inventory, config.dtype, config.device, config.trust_remote_code)
    reference = None
    if config.reference is not None:
        reference = load_model(config.reference, layers.from_checkpoint(config.reference, config.rules), config.dtype,
                               config.device, config.trust_remote_code)
        check_reference(loaded, reference, config.model, config.reference)
    items = []
    bar = tqdm(total=len(samples), unit="sample", desc="eval", disable=not progress)
    with bar:
        for i in range(0, len(samples), config.batch_size):
            batch = samples[i : i + config.batch_size]
            answers = _generate(loaded, batch, config.max_new_tokens)
            drift = _teacher_forced(loaded, reference, batch) if reference else [None] * len(batch)
            for sample, answer, d in zip(batch, answers, drift):
                items.append({"source": sample.source, "kind": sample.kind, "question": sample.question,
                              "reference": sample.answer, "prediction": answer,
                              "exact_match": exact_match(answer, [sample.answer]),
                              "rouge_l": rouge_l(answer, [sample.answer]), **(d or {})})
            bar.update(len(batch))
    summary = _summary(items)
    return {
        "model": str(config.model), "reference_model": None if reference is None else str(config.reference),
        "data": report.source, "nsamples": len(items), "seed": config.seed,
        **summary, "per_kind": {k: _summary([x for x in items if x["kind"] == k])
                                for k in sorted({x["kind"] for x in items if x["kind"]})},
        **({"warnings": reference_warnings(summary, config.reference)} if reference is not None else {}),
        "items": items,
    }


def _summary(items: list[dict]) -> dict[str, Any]:
    out: dict[str, Any] = {"count": len(items),
                           "accuracy": sum(x["exact_match"] for x in items) / len(items),
                           "rouge_l": sum(x["rouge_l"] for x in items) / len(items)}
    tokens = sum(x.get("answer_tokens", 0) for x in items)
    if tokens:
        out["kl"] = sum(x["kl_sum"] for x in items) / tokens
        out["top1_agreement"] = sum(x["agree_sum"] for x in items) / tokens
    return out


def _generate(loaded, batch: list[Sample], max_new_tokens: int) -> list[str]:
    processor = loaded.processor
    tokenizer = processor.tokenizer
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # decoder-only generation pads on the left
    try:
        inputs = encode_prompts(processor, batch)
    finally:
        tokenizer.padding_side = side
    inputs = inputs.to(loaded.device)
    with torch.inference_mode():
        out = loaded.model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False,
                                    pad_token_id=tokenizer.pad_token_id)
    new = out if is_encoder_decoder(loaded.model) else out[:, inputs["input_ids"].shape[1]:]  # T5: answer only
    return [text.strip() for text in tokenizer.batch_decode(new, skip_special_tokens=True)]


def _teacher_forced(pruned, dense, batch: list[Sample]) -> list[dict]:
    """KL and top-1 agreement on the reference answer tokens (right-padded batch, one forward per model)."""
    if is_encoder_decoder(pruned.model):
        return _teacher_forced_seq2seq(pruned, dense, batch)
    processor = pruned.processor
    side = processor.tokenizer.padding_side
    processor.tokenizer.padding_side = "right"
    try:
        prompts = encode_prompts(processor, batch)
        full = encode_prompts(processor, batch, answers=True)
    finally:
        processor.tokenizer.padding_side = side
    logits = []
    for model in (dense, pruned):
        with torch.inference_mode():
            logits.append(model.model(**full.to(model.device)).logits.float().cpu())
    out = []
    for i, sample in enumerate(batch):
        start = int(prompts["attention_mask"][i].sum())
        end = int(full["attention_mask"][i].sum())
        ids = full["input_ids"][i]
        if end <= start or not torch.equal(ids[:start], prompts["input_ids"][i][:start]):
            out.append({"answer_tokens": 0, "kl_sum": 0.0, "agree_sum": 0})  # prompt is not a prefix: skip
            continue
        kl, agree = kl_and_agreement(logits[0][i, start - 1 : end - 1], logits[1][i, start - 1 : end - 1])
        if not math.isfinite(float(kl.sum())):
            raise MultiflowError(f"KL is not finite on {sample.source}: the pruned model's logits overflowed")
        out.append({"answer_tokens": int(kl.numel()), "kl_sum": float(kl.sum()), "agree_sum": int(agree.sum())})
    return out


def _teacher_forced_seq2seq(pruned, dense, batch: list[Sample]) -> list[dict]:
    """`_teacher_forced` for an encoder-decoder language model: the prompt is the encoder's input and the
    reference answer the decoder's labels (fed in shifted by the model), so every label position counts."""
    processor = pruned.processor
    prompts = encode_prompts(processor, batch)
    answers = processor.tokenizer([s.answer for s in batch], return_tensors="pt", padding=True, padding_side="right")
    labels = answers["input_ids"].masked_fill(answers["attention_mask"] == 0, -100)
    logits = []
    for model in (dense, pruned):
        with torch.inference_mode():
            logits.append(model.model(**prompts.to(model.device), labels=labels.to(model.device)).logits.float().cpu())
    out = []
    for i, sample in enumerate(batch):
        n = int(answers["attention_mask"][i].sum())
        kl, agree = kl_and_agreement(logits[0][i, :n], logits[1][i, :n])
        if not math.isfinite(float(kl.sum())):
            raise MultiflowError(f"KL is not finite on {sample.source}: the pruned model's logits overflowed")
        out.append({"answer_tokens": n, "kl_sum": float(kl.sum()), "agree_sum": int(agree.sum())})
    return out
