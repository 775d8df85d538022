"""How an image-text retrieval model embeds images and captions, and what its calibration forward runs.

A family with `task="retrieval"` names a head here (`Family.retrieval_head`); the registry
`RETRIEVAL_HEADS` maps that name to a `RetrievalHead`, so calibration (Step 2) and evaluation
never look at class names.

- `dual-encoder`: two towers with `get_image_features` / `get_text_features` whose `pooler_output`
  is the embedding (CLIPModel, VisionTextDualEncoderModel). Calibration runs the image tower on the
  images and the text tower on the captions.
- `siglip`: the same for SiglipModel and Siglip2Model, with captions padded to the tokenizer's
  maximum length (64 for the released checkpoints), as SigLIP was trained and is used.
- `blip-itc`: BlipForImageTextRetrieval. Embeddings are its image-text contrastive (ITC) features:
  `vision_proj` / `text_proj` of the [CLS] states (what its forward compares with
  `use_itm_head=False`). Calibration runs the image tower once, then the text encoder twice, as
  BLIP is trained and used: alone (ITC) and with cross-attention on the image tokens (ITM), so that
  the cross-attention layers get statistics too. Each text block is visited twice: block by block,
  `--sequential` (and SparseGPT) cannot apply (`revisits_blocks`).

Embeddings are L2-normalised float32 rows; similarities are their dot products (cosines).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from torch import nn

from multiflow.errors import MultiflowError

# The text inputs a tower reads (a tokenizer also gives token_type_ids for BERT-like text towers).
_TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


def normalise(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm."""
    return x / x.norm(dim=-1, keepdim=True)


def split_inputs(batch: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(image inputs, text inputs) of a processor's output for images and captions."""
    text = {k: v for k, v in batch.items() if k in _TEXT_KEYS}
    return {k: v for k, v in batch.items() if k not in _TEXT_KEYS}, text


def _pooled(output: Any) -> torch.Tensor:
    return output.pooler_output if hasattr(output, "pooler_output") else output


def _dual_images(model: nn.Module, images: dict[str, torch.Tensor]) -> torch.Tensor:
    return _pooled(model.get_image_features(**images))


def _dual_texts(model: nn.Module, texts: dict[str, torch.Tensor]) -> torch.Tensor:
    return _pooled(model.get_text_features(**texts))


def _dual_calibration(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    images, texts = split_inputs(batch)
    _dual_images(model, images)
    _dual_texts(model, texts)


def _blip_images(model: nn.Module, images: dict[str, torch.Tensor]) -> torch.Tensor:
    states = model.vision_model(**images).last_hidden_state
    return model.vision_proj(states[:, 0, :])


def _blip_texts(model: nn.Module, texts: dict[str, torch.Tensor]) -> torch.Tensor:
    states = model.text_encoder(**texts).last_hidden_state
    return model.text_proj(states[:, 0, :])


def _blip_calibration(model: nn.Module, batch: dict[str, torch.Tensor]) -> None:
    images, texts = split_inputs(batch)
    image_states = model.vision_model(**images).last_hidden_state
    model.text_encoder(**texts)  # ITC: the caption alone
    image_mask = torch.ones(image_states.shape[:-1], dtype=torch.long, device=image_states.device)
    model.text_encoder(**texts, encoder_hidden_states=image_states, encoder_attention_mask=image_mask)  # ITM


def _learned_scale(model: nn.Module) -> float | None:
    scale = getattr(model, "logit_scale", None)
    return None if scale is None else float(scale.detach().float().exp())


@dataclass(frozen=True)
class RetrievalHead:
    """One way of embedding: pure functions of (model, inputs), plus what the processor needs."""

    name: str
    embed_images: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]  # unnormalised rows
    embed_texts: Callable[[nn.Module, dict[str, torch.Tensor]], torch.Tensor]
    calibration_forward: Callable[[nn.Module, dict[str, torch.Tensor]], None]
    logit_scale: Callable[[nn.Module], float | None] = _learned_scale  # exp(logit_scale), None if the model has none
    revisits_blocks: bool = False  # the calibration forward runs a block more than once
    text_kwargs: dict[str, Any] = field(default_factory=dict)  # for the processor's text call

    def images(self, model: nn.Module, images: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, D) normalised float32 image embeddings."""
        return normalise(self.embed_images(model, images).float())

    def texts(self, model: nn.Module, texts: dict[str, torch.Tensor]) -> torch.Tensor:
        """(N, D) normalised float32 text embeddings."""
        return normalise(self.embed_texts(model, texts).float())


RETRIEVAL_HEADS: dict[str, RetrievalHead] = {
    "dual-encoder": RetrievalHead("dual-encoder", _dual_images, _dual_texts, _dual_calibration),
    # SigLIP is trained on captions padded to the tokenizer's length (64), its pooled state the last token's
    "siglip": RetrievalHead("siglip", _dual_images, _dual_texts, _dual_calibration,
                            text_kwargs={"padding": "max_length", "truncation": True}),
    "blip-itc": RetrievalHead("blip-itc", _blip_images, _blip_texts, _blip_calibration,
                              logit_scale=lambda model: None, revisits_blocks=True),
}


def retrieval_head(family) -> RetrievalHead:
    """The head a retrieval family names; an error for a family that is not one or names an unknown head."""
    if family is None or not family.retrieval:
        raise MultiflowError(f"family {getattr(family, 'name', None)!r} is not a retrieval model")
    try:
        return RETRIEVAL_HEADS[family.retrieval_head]
    except KeyError:
        raise MultiflowError(f"family {family.name!r} names retrieval head {family.retrieval_head!r}; known: "
                             f"{', '.join(RETRIEVAL_HEADS)}") from None


def encode_pairs(processor: Any, head: RetrievalHead, images: list | None, texts: list[str] | None
                 ) -> dict[str, torch.Tensor]:
    """The processor's tensors for `images` and/or `texts`, with an all-ones attention_mask when the
    tokenizer gives none (SigLIP's: the model then reads every token, padding included)."""
    out: dict[str, torch.Tensor] = {}
    if images is not None:
        out.update(processor(images=images, return_tensors="pt"))
    if texts is not None:
        kwargs = {"padding": True, **head.text_kwargs}
        encoded = processor(text=texts, return_tensors="pt", **kwargs)
        out.update(encoded)
        if "attention_mask" not in out:
            out["attention_mask"] = torch.ones_like(out["input_ids"])
    return dict(out)
