"""`multiflow eval` for a plain language model: perplexity on text, and drift from the dense model.

The standard protocol (SparseGPT, Wanda): the text cut into non-overlapping windows of `seq_len`
tokens (`text_data`), each window one forward pass without a cache; every token of a window but
the first is predicted from the ones before it. Perplexity = exp(mean negative log-likelihood
over all predicted tokens), `tokens` = windows x (seq_len - 1). With a reference (the dense
model), over the same predicted positions: mean KL(dense || model) of the next-token
distributions and the share of positions whose top-1 tokens agree
(`evaluation.kl_and_agreement`). Sums are float64; windows run in batches, in text order.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from multiflow.errors import MultiflowError


def nll_sum(logits: torch.Tensor, input_ids: torch.Tensor) -> tuple[float, int]:
    """Sum of -log p(token t | tokens < t) over t = 1..L-1 of one window (float64), and L-1.

    logits: [L, vocab] (position t predicts token t+1); input_ids: [L]."""
    losses = F.cross_entropy(logits[:-1].float(), input_ids[1:].to(logits.device), reduction="none")
    return float(losses.double().sum()), int(losses.numel())


def evaluate_perplexity(config, progress: bool = True) -> dict[str, Any]:
    """Perplexity of `config.model` on the windows of `config.data`; KL and top-1 agreement against
    `config.reference` when given. `config` is an `evaluation.EvalConfig`."""
    from multiflow.calibration.text_data import check_seq_len, encode_windows, load_windows, require_data
    from multiflow.evaluation.reference import check_reference, kl_and_agreement, reference_warnings
    from multiflow.models import inventory as layers
    from multiflow.models.loading import load_model

    inventory = layers.from_checkpoint(config.model, config.rules)
    require_data(config.data, "evaluation")  # before loading anything
    check_seq_len(config.seq_len, inventory.config)
    loaded = load_model(config.model, inventory, config.dtype, config.device, config.trust_remote_code)
    windows, report = load_windows(config.data, loaded.processor, config.seq_len, config.nsamples, config.seed,
                                   purpose="evaluation", model_config=inventory.config)
    reference = None
    if config.reference is not None:
        reference = load_model(config.reference, layers.from_checkpoint(config.reference, config.rules), config.dtype,
                               config.device, config.trust_remote_code)
        check_reference(loaded, reference, config.model, config.reference)
    sums = {"nll": 0.0, "tokens": 0, "kl": 0.0, "agree": 0}
    bar = tqdm(total=len(windows), unit="window", desc="eval: perplexity", disable=not progress)
    with bar:
        for start in range(0, len(windows), config.batch_size):
            batch = windows[start:start + config.batch_size]
            inputs = encode_windows(batch)
            logits = _logits(loaded, inputs)
            dense = _logits(reference, inputs) if reference is not None else None
            if dense is not None and dense.shape != logits.shape:
                raise MultiflowError(f"--reference {config.reference} predicts {dense.shape[-1]} tokens, "
                                     f"{config.model} {logits.shape[-1]}: give the dense model it was pruned from")
            for i, window in enumerate(batch):
                nll, count = nll_sum(logits[i], window.input_ids)
                if not math.isfinite(nll):
                    raise MultiflowError(f"the log-likelihood of {config.model} is not finite on {window.source}: "
                                         "its logits overflowed (try --dtype float32)")
                sums["nll"] += nll
                sums["tokens"] += count
                if dense is not None:
                    kl, agree = kl_and_agreement(dense[i, :-1], logits[i, :-1])
                    if not math.isfinite(float(kl.sum())):
                        raise MultiflowError(f"KL is not finite on {window.source}: a model's logits overflowed")
                    sums["kl"] += float(kl.sum())
                    sums["agree"] += int(agree.sum())
            bar.update(len(batch))
    mean_nll = sums["nll"] / sums["tokens"]
    results: dict[str, Any] = {
        "model": str(config.model), "reference_model": None if reference is None else str(config.reference),
        "data": report.source, "data_kind": report.kind, "seq_len": config.seq_len, "windows": len(windows),
        "windows_available": report.available, "seed": config.seed if config.nsamples is not None else None,
        "tokens": sums["tokens"], "nll": mean_nll, "perplexity": math.exp(mean_nll),
        "dtype": config.dtype, "device": str(loaded.device),
    }
    if reference is not None:
        results["kl"] = sums["kl"] / sums["tokens"]
        results["top1_agreement"] = sums["agree"] / sums["tokens"]
        results["warnings"] = reference_warnings(results, config.reference)
    return results


def _logits(loaded, inputs) -> torch.Tensor:
    """[batch, seq_len, vocab] float32 logits on the CPU, one forward without a cache."""
    with torch.inference_mode():
        return loaded.model(**inputs.to(loaded.device), use_cache=False).logits.float().cpu()
