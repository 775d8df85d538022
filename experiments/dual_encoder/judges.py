"""Judges of pruning quality for the dual encoder: small functions on tensors, plus two embedders.
The functions on tensors (retrieval mAP, similarity KL, cosine drift, zero-shot) live in the package,
src/multiflow/evaluation/retrieval.py, and are re-exported here under the names bench.py uses.

Embeddings are L2-normalised projected features (what `VisionTextDualEncoderModel.forward`
compares); similarities are cosines, logits are cosines times `exp(logit_scale)`.

- `retrieval`: text-to-image retrieval. Each caption is a query over all images; its relevant
  images are those of its class. mAP = mean over captions of average precision; R@1 = share of
  captions whose top image is of their class. Ties are broken by image order (stable sort).
- `similarity_kl`: for each caption, softmax over images of its logits, dense (reference) P
  versus pruned Q; mean over captions of KL(P || Q) in nats.
- `cosine_drift`: mean over rows of 1 - cos(reference embedding, pruned embedding).
- `zero_shot_accuracy`: each class's text embedding is the mean of its (normalised) template
  embeddings, normalised again (CLIP's prompt ensembling); an image's prediction is the class of
  highest cosine. Use HELD_OUT_TEMPLATES (training never saw them).
- `outlier_ratio`: per linear layer, max / median over input channels of the RMS of that input
  channel over every token seen (median: the mean of the two middle values for an even count).
  `record_input_rms` collects the sums with forward pre-hooks, removed on exit.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

# The judges on tensors are the package's (`multiflow eval` on retrieval models uses them too).
from multiflow.evaluation.retrieval import class_embeddings, cosine_drift, similarity_kl, zero_shot_accuracy  # noqa: F401
from multiflow.evaluation.retrieval import mean_average_precision as retrieval  # noqa: F401
from multiflow.models.retrieval import normalise

# --- embedding ----------------------------------------------------------------------------------------


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def embed_images(model, pixel_values: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """(N, D) normalised image embeddings, float32."""
    out = []
    with _eval_mode(model), torch.inference_mode():
        for i in range(0, len(pixel_values), batch):
            feats = model.get_image_features(pixel_values=pixel_values[i:i + batch]).pooler_output
            out.append(normalise(feats.float()))
    return torch.cat(out)


def embed_texts(model, tokenizer, texts: list[str], batch: int = 256) -> torch.Tensor:
    """(N, D) normalised text embeddings, float32 (padding is masked by the text tower)."""
    out = []
    with _eval_mode(model), torch.inference_mode():
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i:i + batch], padding=True, return_tensors="pt")
            feats = model.get_text_features(**enc).pooler_output
            out.append(normalise(feats.float()))
    return torch.cat(out)


def unpadded_text_batches(tokenizer, texts: list[str], batch: int = 256) -> Iterator[dict]:
    """Tokenised batches in which every text has the same length (no padding tokens), for statistics
    hooks that cannot see the attention mask. Texts are grouped by length, in order of first length."""
    groups: dict[int, list[str]] = {}
    for text in texts:
        groups.setdefault(len(tokenizer(text)["input_ids"]), []).append(text)
    for group in groups.values():
        for i in range(0, len(group), batch):
            yield dict(tokenizer(group[i:i + batch], return_tensors="pt"))


# --- activation outliers -----------------------------------------------------------------------------


def outlier_ratio(sum_squares: torch.Tensor, count: int) -> float:
    """max / median over input channels of the per-channel RMS sqrt(sum_squares / count).
    inf when the median is 0 (and the max is not)."""
    rms = (sum_squares.double() / count).sqrt()
    median = torch.quantile(rms, 0.5)
    peak = rms.max()
    if float(median) == 0.0:
        return float("inf") if float(peak) > 0 else 1.0
    return float(peak / median)


@dataclass
class InputRms:
    """Per linear layer: float64 running sum of squares per input channel and the number of tokens."""
    sum_squares: dict[str, torch.Tensor] = field(default_factory=dict)
    count: dict[str, int] = field(default_factory=dict)

    def ratios(self) -> dict[str, float]:
        return {name: outlier_ratio(s, self.count[name]) for name, s in self.sum_squares.items()}


@contextmanager
def record_input_rms(model: nn.Module, names: Iterable[str] | None = None):
    """Collect per-channel input sums of squares of every `nn.Linear` (or of `names`) while the
    block runs; yields an InputRms. Every token of the input counts, padding included (feed
    unpadded batches, e.g. `unpadded_text_batches`, to leave padding out)."""
    wanted = set(names) if names is not None else None
    stats = InputRms()
    handles = []

    def hook(name):
        def pre_hook(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if name not in stats.sum_squares:
                stats.sum_squares[name] = torch.zeros(x.shape[1], dtype=torch.float64)
                stats.count[name] = 0
            stats.sum_squares[name] += (x * x).sum(dim=0)
            stats.count[name] += x.shape[0]
        return pre_hook

    try:
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and (wanted is None or name in wanted):
                handles.append(module.register_forward_pre_hook(hook(name)))
        if wanted is not None and len(handles) != len(wanted):
            found = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
            raise ValueError(f"not linear layers of the model: {sorted(wanted - found)[:5]}")
        yield stats
    finally:
        for handle in handles:
            handle.remove()
