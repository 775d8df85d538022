"""Comparing a pruned model with its dense reference: token-level KL and top-1 agreement, and the checks that
refuse (or warn about) a reference that cannot be compared. Shared by evaluate.py and perplexity.py."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from multiflow.errors import MultiflowError

log = logging.getLogger("multiflow")


def kl_and_agreement(dense_logits: torch.Tensor, pruned_logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position KL(dense || pruned) and whether the top-1 tokens agree ([positions, vocab] each)."""
    log_p = torch.log_softmax(dense_logits.double(), dim=-1)
    log_q = torch.log_softmax(pruned_logits.double(), dim=-1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)
    return kl, dense_logits.argmax(-1) == pruned_logits.argmax(-1)


# A reference this far from the model shares nothing with it: KL(dense || pruned) in nats per token, and
# top-1 agreement. On the demo model (BENCHMARKS.md) even 90% sparsity stays below 2.5 nats and above 44%.
UNRELATED_KL, UNRELATED_AGREEMENT = 5.0, 0.05


def check_reference(loaded, reference, model: Path, where: Path) -> None:
    """Refuse, before any generation, a --reference that cannot be compared token by token with the model:
    another architecture, another vocabulary size, or another tokenizer."""
    def describe(m) -> tuple:
        config = m.model.config
        return type(m.model).__name__, getattr(config, "model_type", None)

    def vocab_size(m) -> int | None:
        head = m.model.get_output_embeddings()
        return None if head is None else int(head.weight.shape[0])

    def tokenizer_of(m):
        return getattr(m.processor, "tokenizer", m.processor)

    if describe(loaded) != describe(reference):
        raise MultiflowError(f"--reference {where} is a {describe(reference)[0]} ({describe(reference)[1]}) but "
                             f"--model {model} is a {describe(loaded)[0]} ({describe(loaded)[1]}); compare a pruned "
                             "model with the dense checkpoint it was pruned from")
    if vocab_size(loaded) != vocab_size(reference):
        raise MultiflowError(f"--reference {where} predicts {vocab_size(reference)} tokens but --model {model} "
                             f"{vocab_size(loaded)}: another vocabulary; compare a pruned model with the dense "
                             "checkpoint it was pruned from")
    mine, theirs = tokenizer_of(loaded), tokenizer_of(reference)
    if hasattr(mine, "get_vocab") and hasattr(theirs, "get_vocab") and mine.get_vocab() != theirs.get_vocab():
        raise MultiflowError(f"--reference {where} has another tokenizer than --model {model} (their vocabularies "
                             "differ); compare a pruned model with the dense checkpoint it was pruned from")


def reference_warnings(summary: dict[str, Any], where: Path) -> list[str]:
    """Warnings (also logged) when the reference shares nothing with the model: is it the right checkpoint?"""
    kl, agreement = summary.get("kl"), summary.get("top1_agreement")
    if kl is None or agreement is None or (kl <= UNRELATED_KL and agreement >= UNRELATED_AGREEMENT):
        return []
    text = (f"--reference {where} shares almost nothing with the model (KL {kl:.2f} nats per token, top-1 "
            f"agreement {agreement:.1%}; above {UNRELATED_KL:g} nats or below {UNRELATED_AGREEMENT:.0%} means "
            "unrelated): is it the dense checkpoint this model was pruned from?")
    log.warning(text)
    return [text]
