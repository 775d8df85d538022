"""What pruning cost a retrieval model (CLIP, SigLIP, BLIP retrieval, dual encoders): recall@k both ways,
zero-shot classification, and agreement with the dense model.

Data: image-caption records (`{"image", "caption"[, "label"]}`, calibration/data.py). Images are told
apart by their pixels (two records with identical pictures are one image with two captions).

- Recall@k, text to image: each caption is a query over all images; it is a hit when its own image
  is among the k most similar. Image to text: each image is a query over all captions; a hit when any
  of its captions is among the k most similar. Ranking: similarity descending, ties by candidate order
  (a stable sort), so a model that cannot tell candidates apart ranks them in data order.
- Zero-shot accuracy (records with labels): each class's text embedding is the mean of its
  normalised prompt embeddings (`--class-template`, one or more; CLIP's prompt ensembling),
  normalised again; an image's prediction is the class of highest cosine (ties: the first class in
  sorted order). Over the distinct images that carry a label.
- Against the dense model (`--reference`): the share of queries whose top-1 candidate is the same
  (text to image, image to text, zero-shot prediction); mean over rows of 1 - cos(dense, pruned)
  embedding per tower; and, when the model has a learned `logit_scale`, the mean over captions of
  KL(P_dense || P_pruned) of the softmax over images of scale x cosine.

Metric functions are pure (tensors in, floats out); the model work is in `evaluate_retrieval`. The
functions shared with experiments/dual_encoder/judges.py live here.
"""

from __future__ import annotations

import hashlib
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from multiflow.errors import MultiflowError
from multiflow.models.retrieval import normalise

RECALL_AT = (1, 5)
DEFAULT_CLASS_TEMPLATE = "a photo of a {label}."  # CLIP's prompt for zero-shot classification


# --- metrics on tensors ---------------------------------------------------------------------------------

def ranking(similarity: torch.Tensor) -> torch.Tensor:
    """[queries, candidates] -> candidate indices per query, most similar first (ties: candidate order)."""
    return torch.sort(similarity.double(), dim=1, descending=True, stable=True).indices


def first_hit_ranks(similarity: torch.Tensor, relevant: torch.Tensor) -> torch.Tensor:
    """1-based rank of each query's best-ranked relevant candidate ([queries] long).

    similarity: [queries, candidates]; relevant: bool of the same shape. A query without any relevant
    candidate is an error."""
    if similarity.shape != relevant.shape:
        raise ValueError(f"similarity {list(similarity.shape)} and relevance {list(relevant.shape)} differ in shape")
    if not bool(relevant.any(dim=1).all()):
        raise ValueError("a query has no relevant candidate")
    ranked = torch.gather(relevant.bool(), 1, ranking(similarity))
    return ranked.int().argmax(dim=1) + 1  # argmax: the first True


def recall_at_k(similarity: torch.Tensor, relevant: torch.Tensor, ks: Sequence[int] = RECALL_AT) -> dict[int, float]:
    """{k: share of queries with a relevant candidate among their k most similar}."""
    ranks = first_hit_ranks(similarity, relevant)
    return {k: float((ranks <= k).double().mean()) for k in ks}


def top1_agreement(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Share of queries (rows) whose most similar candidate is the same under both similarity matrices."""
    return float((ranking(reference)[:, 0] == ranking(other)[:, 0]).double().mean())


def similarity_kl(ref_text: torch.Tensor, ref_images: torch.Tensor, text: torch.Tensor, images: torch.Tensor,
                  logit_scale: float) -> float:
    """Mean over captions of KL(P_ref || P) of the softmax over images of `logit_scale * cosine`
    (`logit_scale` = exp of the model's `logit_scale` parameter). Inputs: normalised embeddings."""
    log_p = torch.log_softmax(logit_scale * (ref_text.double() @ ref_images.double().T), dim=1)
    log_q = torch.log_softmax(logit_scale * (text.double() @ images.double().T), dim=1)
    return float((log_p.exp() * (log_p - log_q)).sum(dim=1).mean())


def cosine_drift(reference: torch.Tensor, other: torch.Tensor) -> float:
    """Mean over rows of 1 - cos(reference_i, other_i)."""
    cos = torch.nn.functional.cosine_similarity(reference.double(), other.double(), dim=1)
    return float((1.0 - cos).mean())


def class_embeddings(text_emb: torch.Tensor, text_labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(num_classes, D): per class the mean of its normalised text embeddings, normalised."""
    text_emb = normalise(text_emb.double())
    out = torch.zeros(num_classes, text_emb.shape[1], dtype=torch.float64)
    out.index_add_(0, text_labels, text_emb)
    counts = torch.bincount(text_labels, minlength=num_classes)
    if bool((counts == 0).any()):
        raise ValueError(f"no text for classes {torch.nonzero(counts == 0).flatten().tolist()}")
    return normalise(out)


def zero_shot_predictions(image_emb: torch.Tensor, class_emb: torch.Tensor) -> torch.Tensor:
    """Each image's class of highest cosine (ties: the lowest class index)."""
    return (image_emb.double() @ class_emb.double().T).argmax(dim=1)


def zero_shot_accuracy(image_emb: torch.Tensor, image_labels: torch.Tensor, class_emb: torch.Tensor) -> float:
    """Share of images whose most similar class embedding is their class (ties: lowest class)."""
    return float((zero_shot_predictions(image_emb, class_emb) == image_labels).double().mean())


def mean_average_precision(image_emb: torch.Tensor, caption_emb: torch.Tensor, image_labels: torch.Tensor,
                           caption_labels: torch.Tensor) -> dict[str, float]:
    """Text-to-image retrieval by class: each caption's relevant images are those of its class.
    {"map": mean over captions of average precision, "r1": share whose top image is of their class}."""
    sims = caption_emb.double() @ image_emb.double().T  # (captions, images)
    relevant = (image_labels[ranking(sims)] == caption_labels[:, None]).double()  # ranked relevance
    n_relevant = relevant.sum(dim=1)
    if bool((n_relevant == 0).any()):
        raise ValueError("a caption has no relevant image (its class has no image)")
    ranks = torch.arange(1, relevant.shape[1] + 1, dtype=torch.float64)
    ap = (relevant.cumsum(dim=1) / ranks * relevant).sum(dim=1) / n_relevant
    return {"map": float(ap.mean()), "r1": float(relevant[:, 0].mean())}


# --- pairs -> queries and candidates --------------------------------------------------------------------

def image_groups(images: Sequence[Any]) -> tuple[list[int], list[int]]:
    """(for each record, the index of its distinct image; for each distinct image, its first record).
    Images are equal when their size, mode and pixels are."""
    seen: dict[tuple, int] = {}
    of_record, first = [], []
    for i, image in enumerate(images):
        key = (image.size, image.mode, hashlib.sha256(image.tobytes()).hexdigest())
        if key not in seen:
            seen[key] = len(first)
            first.append(i)
        of_record.append(seen[key])
    return of_record, first


def retrieval_scores(image_emb: torch.Tensor, text_emb: torch.Tensor, image_of_text: Sequence[int],
                     ks: Sequence[int] = RECALL_AT) -> dict[str, Any]:
    """Recall@k both ways for normalised embeddings; `image_of_text[t]` = the image index of caption t."""
    image_of_text = torch.as_tensor(list(image_of_text))
    similarity = text_emb.double() @ image_emb.double().T  # [captions, images]
    relevant = image_of_text[:, None] == torch.arange(image_emb.shape[0])[None, :]
    t2i_ranks = first_hit_ranks(similarity, relevant)
    return {"text_to_image": {f"recall@{k}": float((t2i_ranks <= k).double().mean()) for k in ks},
            "image_to_text": {f"recall@{k}": v for k, v in recall_at_k(similarity.T, relevant.T, ks).items()},
            "t2i_ranks": t2i_ranks}


# --- the model work -------------------------------------------------------------------------------------

def _embed(loaded, head, samples, image_records: list[int], texts: list[str], batch_size: int
           ) -> tuple[torch.Tensor, torch.Tensor]:
    from multiflow.models.retrieval import encode_pairs, split_inputs

    model, device = loaded.model, loaded.device
    images, captions = [], []
    with torch.inference_mode():
        for i in range(0, len(image_records), batch_size):
            batch = encode_pairs(loaded.processor, head, [samples[r].image for r in image_records[i:i + batch_size]],
                                 None)
            images.append(head.images(model, {k: v.to(device) for k, v in split_inputs(batch)[0].items()}).cpu())
        for i in range(0, len(texts), batch_size):
            batch = encode_pairs(loaded.processor, head, None, texts[i:i + batch_size])
            captions.append(head.texts(model, {k: v.to(device) for k, v in split_inputs(batch)[1].items()}).cpu())
    return torch.cat(images), torch.cat(captions)


def _class_prompts(labels: list[str], templates: Sequence[str]) -> tuple[list[str], torch.Tensor]:
    prompts, owners = [], []
    for c, label in enumerate(labels):
        for template in templates:
            prompts.append(template.format(label=label))
            owners.append(c)
    return prompts, torch.tensor(owners)


def evaluate_retrieval(config, progress: bool = True) -> dict[str, Any]:
    """Recall@k (both ways) on the image-caption records of `config.data`, zero-shot accuracy when they carry
    labels, and agreement with `config.reference` when given. `config` is an `evaluation.EvalConfig`."""
    from multiflow.calibration.data import load_samples
    from multiflow.evaluation.reference import check_reference
    from multiflow.models import inventory as layers
    from multiflow.models.loading import load_model
    from multiflow.models.retrieval import retrieval_head

    templates = tuple(config.class_templates)
    for template in templates:
        try:
            template.format(label="x")
        except (KeyError, IndexError, ValueError) as exc:
            raise MultiflowError(f"--class-template {template!r}: write the class name as {{label}} ({exc})") from None
    inventory = layers.from_checkpoint(config.model, config.rules)
    head = retrieval_head(inventory.family)
    samples, report = load_samples(config.data, config.nsamples if config.nsamples else 10**9, config.seed)
    samples = [s for s in samples if s.caption is not None]
    if not samples:
        raise MultiflowError(f"no record of {report.source} is an image-caption pair: a retrieval model is "
                             "evaluated on {image, caption[, label]} records (--data)")
    image_of, image_records = image_groups([s.image for s in samples])
    texts = [s.caption for s in samples]
    labels_of_image: dict[int, str] = {}
    for s, g in zip(samples, image_of):
        if s.label is not None and labels_of_image.setdefault(g, s.label) != s.label:
            raise MultiflowError(f"{s.source}: its image has labels {labels_of_image[g]!r} and {s.label!r} in "
                                 f"{report.source}; zero-shot classification needs one label per image")
    classes = sorted(set(labels_of_image.values()))
    prompts, owners = _class_prompts(classes, templates)

    models = {"model": load_model(config.model, inventory, config.dtype, config.device, config.trust_remote_code)}
    if config.reference is not None:
        models["reference"] = load_model(config.reference, layers.from_checkpoint(config.reference, config.rules),
                                         config.dtype, config.device, config.trust_remote_code)
        check_reference(models["model"], models["reference"], config.model, config.reference)
    embedded = {}
    bar = tqdm(total=len(models), unit="model", desc="eval: retrieval", disable=not progress)
    with bar:
        for role, loaded in models.items():
            images, captions = _embed(loaded, head, samples, image_records, texts + prompts, config.batch_size)
            embedded[role] = (images, captions[:len(texts)], captions[len(texts):], head.logit_scale(loaded.model))
            bar.update(1)
    images, captions, class_texts, _ = embedded["model"]
    scores = retrieval_scores(images, captions, image_of)
    ranks = scores.pop("t2i_ranks")
    out: dict[str, Any] = {
        "model": str(config.model), "reference_model": None if config.reference is None else str(config.reference),
        "task": "retrieval", "retrieval_head": head.name, "data": report.source, "nsamples": len(samples),
        "seed": config.seed, "images": len(image_records), "captions": len(texts), **scores,
    }
    labelled = sorted(labels_of_image)
    if labelled:
        truth = torch.tensor([classes.index(labels_of_image[g]) for g in labelled])
        class_emb = class_embeddings(class_texts, owners, len(classes))
        predicted = zero_shot_predictions(images[labelled], class_emb)
        out["zero_shot"] = {"accuracy": float((predicted == truth).double().mean()), "images": len(labelled),
                            "classes": classes, "templates": list(templates)}
    if "reference" in embedded:
        out["agreement"] = _agreement(embedded["reference"], embedded["model"], labelled, len(classes), owners)
    out["items"] = [{"source": s.source, "caption": s.caption, "label": s.label, "image": image_of[i],
                     "image_source": samples[image_records[image_of[i]]].source, "t2i_rank": int(ranks[i])}
                    for i, s in enumerate(samples)]
    return out


def _agreement(dense, pruned, labelled: list[int], num_classes: int, owners: torch.Tensor) -> dict[str, float]:
    (ref_images, ref_captions, ref_classes, scale), (images, captions, classes, _) = dense, pruned
    if ref_images.shape[1] != images.shape[1]:
        raise MultiflowError(f"--reference embeds in {ref_images.shape[1]} dimensions but the model in "
                             f"{images.shape[1]}; compare a pruned model with the dense checkpoint it was pruned from")
    out = {"text_to_image_top1": top1_agreement(ref_captions @ ref_images.T, captions @ images.T),
           "image_to_text_top1": top1_agreement(ref_images @ ref_captions.T, images @ captions.T),
           "image_embedding_drift": cosine_drift(ref_images, images),
           "text_embedding_drift": cosine_drift(ref_captions, captions)}
    if labelled:
        out["zero_shot_prediction"] = float((
            zero_shot_predictions(ref_images[labelled], class_embeddings(ref_classes, owners, num_classes)) ==
            zero_shot_predictions(images[labelled], class_embeddings(classes, owners, num_classes))).double().mean())
    if scale is not None:
        out["kl"] = similarity_kl(ref_captions, ref_images, captions, images, scale)
    return out
