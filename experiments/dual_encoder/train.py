"""Train the dual-encoder benchmark model: contrastive image-caption training on real digits.

Trained: the vision tower (from scratch), `visual_projection`, `text_projection`, `logit_scale`.
Frozen: all of MiniLM (embeddings, 6 layers, pooler), in eval mode, so the text tower stays the
pretrained network. Because it is frozen, its pooled output for each training caption is computed
once up front; training applies `text_projection` to those cached features, which is the same
computation as `get_text_features` (checked by the self-check).

Loss: CLIP's symmetric InfoNCE with a learnable temperature (`logit_scale`, clamped at log 100 as
CLIP does). A batch holds several images of one class, so the targets of a row are spread evenly
over the items of the same class (UniCL's multi-positive form); with all labels distinct this is
exactly CLIP's loss. Each item is a training image with one training template drawn for it.

    python -m experiments.dual_encoder.train --out experiments/dual_encoder/trained   # the full run
    python -m experiments.dual_encoder.train --steps 5 --out /tmp/de                 # a smoke run
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from tqdm import tqdm

from . import data, judges
from .model import (
    IMAGE_SIZE,
    build_model,
    build_processor,
    file_sha256,
    freeze_text_tower,
    minilm_folder,
    save_parts,
)

log = logging.getLogger("dual_encoder.train")

TRAIN = {"batch_size": 64, "lr": 1e-3, "weight_decay": 0.05, "warmup_fraction": 0.05, "min_lr_ratio": 0.02,
         "grad_clip": 1.0, "max_logit_scale": math.log(100.0)}
DEFAULT_STEPS = 1400  # measured 0.556 s/step (batch 64, 1 thread, 2-core machine under load): ~13 min
PARTS_FILE = "trained_parts.safetensors"


# --- pure pieces ------------------------------------------------------------------------------------

def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, labels: torch.Tensor,
                     logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE over a batch of (image, caption) pairs with labels; inputs normalised.
    Targets: uniform over the batch items of the same label (one-hot when labels are distinct)."""
    logits_per_text = logit_scale.exp() * text_emb @ image_emb.T
    same = (labels[:, None] == labels[None, :]).to(logits_per_text.dtype)
    targets = same / same.sum(dim=1, keepdim=True)
    t2i = -(targets * torch.log_softmax(logits_per_text, dim=1)).sum(dim=1).mean()
    i2t = -(targets * torch.log_softmax(logits_per_text.T, dim=1)).sum(dim=1).mean()
    return (t2i + i2t) / 2


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


class Sampler:
    """Seeded stream of batches: training images in shuffled passes, a training template per item."""

    def __init__(self, n_images: int, n_templates: int, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.n_images, self.n_templates = n_images, n_templates
        self.order = torch.empty(0, dtype=torch.long)

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(image positions, template numbers), each (size,)."""
        while len(self.order) < size:
            self.order = torch.cat([self.order, torch.randperm(self.n_images, generator=self.generator)])
        images, self.order = self.order[:size], self.order[size:]
        templates = torch.randint(self.n_templates, (size,), generator=self.generator)
        return images, templates


# --- training -------------------------------------------------------------------------------------

def text_pooled_features(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """The frozen text tower's `pooler_output` (before `text_projection`) for each text."""
    with torch.inference_mode():
        enc = tokenizer(texts, padding=True, return_tensors="pt")
        return model.text_model(**enc).pooler_output.float().clone()


def make_optimizer(model) -> torch.optim.Optimizer:
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 and "embeddings" not in name else no_decay).append(p)
    return torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                              {"params": no_decay, "weight_decay": 0.0}],
                             lr=TRAIN["lr"], betas=(0.9, 0.98), eps=1e-6)


class Trainer:
    """Owns the model, optimizer, schedule and batch stream of one training run."""

    def __init__(self, model, pixels: torch.Tensor, labels: torch.Tensor, text_features: torch.Tensor,
                 n_templates: int, steps: int, seed: int, batch_size: int):
        self.model, self.pixels, self.labels = model, pixels, labels
        self.text_features, self.n_templates = text_features, n_templates  # class-major captions
        self.steps, self.batch_size = steps, batch_size
        self.sampler = Sampler(len(pixels), n_templates, seed)
        self.optimizer = make_optimizer(model)
        self.warmup = max(1, round(TRAIN["warmup_fraction"] * steps))
        self.step_no = 0

    def step(self) -> float:
        model = self.model
        model.train()
        freeze_text_tower(model)
        for group in self.optimizer.param_groups:
            group["lr"] = TRAIN["lr"] * lr_factor(self.step_no, self.steps, self.warmup, TRAIN["min_lr_ratio"])
        images, templates = self.sampler.batch(self.batch_size)
        labels = self.labels[images]
        image_feats = model.visual_projection(model.vision_model(pixel_values=self.pixels[images]).pooler_output)
        text_feats = model.text_projection(self.text_features[labels * self.n_templates + templates])
        loss = contrastive_loss(judges.normalise(image_feats), judges.normalise(text_feats), labels,
                                model.logit_scale)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], TRAIN["grad_clip"])
        self.optimizer.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, TRAIN["max_logit_scale"])
        self.step_no += 1
        return loss.detach().item()


def train(trainer: Trainer, progress: bool = True) -> list[float]:
    losses = []
    with tqdm(range(trainer.steps), desc="training", unit="step", mininterval=5, disable=not progress) as bar:
        for _ in bar:
            losses.append(trainer.step())
            if len(losses) % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / 10:.3f}", scale=f"{trainer.model.logit_scale.exp():.1f}")
    return losses


def evaluate(model, tokenizer, pixels: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
    """Dense quality on a split: zero-shot accuracy (held-out templates), retrieval with train and
    with held-out captions."""
    image_emb = judges.embed_images(model, pixels)
    out = {}
    for name, templates in (("train_templates", data.TRAIN_TEMPLATES), ("held_out_templates", data.HELD_OUT_TEMPLATES)):
        texts, text_labels = data.captions(templates)
        text_labels = torch.tensor(text_labels)
        text_emb = judges.embed_texts(model, tokenizer, texts)
        r = judges.retrieval(image_emb, text_emb, labels, text_labels)
        out[f"retrieval_map_{name}"], out[f"retrieval_r1_{name}"] = r["map"], r["r1"]
        out[f"zero_shot_accuracy_{name}"] = judges.zero_shot_accuracy(
            image_emb, labels, judges.class_embeddings(text_emb, text_labels, data.NUM_CLASSES))
    return out


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="folder for the checkpoint, processor, parts and log")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--batch-size", type=int, default=TRAIN["batch_size"])
    p.add_argument("--threads", type=int, default=1, help="torch threads (the weights depend on it in the last bits)")
    p.add_argument("--no-progress", action="store_true")
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch_size < 2 or args.threads < 1:
        p.error("--steps >= 1, --batch-size >= 2 and --threads >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    start = time.perf_counter()

    folder = minilm_folder()
    model = build_model(args.seed, folder)
    freeze_text_tower(model)
    processor = build_processor(folder)
    splits = data.split_indices()
    pixels, labels = data.pixel_values(processor, splits["train"], IMAGE_SIZE)
    texts, _ = data.captions(data.TRAIN_TEMPLATES)
    text_features = text_pooled_features(model, processor.tokenizer, texts)

    trainer = Trainer(model, pixels, labels, text_features, len(data.TRAIN_TEMPLATES), args.steps, args.seed,
                      args.batch_size)
    t0 = time.perf_counter()
    losses = train(trainer, progress=not args.no_progress)
    train_seconds = time.perf_counter() - t0
    log.info("trained %d steps in %.1f s (%.3f s/step)", args.steps, train_seconds, train_seconds / args.steps)

    model.eval()
    eval_pixels, eval_labels = data.pixel_values(processor, splits["evaluation"], IMAGE_SIZE)
    metrics = evaluate(model, processor.tokenizer, eval_pixels, eval_labels)
    log.info("evaluation split: %s", json.dumps({k: round(v, 4) for k, v in metrics.items()}))

    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out)
    processor.save_pretrained(args.out)
    parts = save_parts(model, args.out / PARTS_FILE)
    chunk = max(1, len(losses) // 50)
    report = {
        "model": "VisionTextDualEncoderModel: CLIPVisionModel (from scratch) + all-MiniLM-L6-v2 BertModel (frozen)",
        "seed": args.seed, "steps": args.steps, "batch_size": args.batch_size, "threads": args.threads,
        "train": {k: v for k, v in TRAIN.items() if k != "batch_size"},
        "seconds_per_step": train_seconds / args.steps, "train_seconds": train_seconds,
        "total_seconds": time.perf_counter() - start,
        "loss_mean_per_chunk": {"chunk_steps": chunk,
                                "values": [sum(losses[i:i + chunk]) / len(losses[i:i + chunk])
                                           for i in range(0, len(losses), chunk)]},
        "final_logit_scale": float(model.logit_scale.detach().exp()),
        "evaluation": metrics,
        "splits": {k: len(v) for k, v in splits.items()} | {"seed": data.SPLIT_SEED},
        "templates": {"train": list(data.TRAIN_TEMPLATES), "held_out": list(data.HELD_OUT_TEMPLATES)},
        "parameters": {"vision_model": sum(p.numel() for p in model.vision_model.parameters()),
                       "text_model": sum(p.numel() for p in model.text_model.parameters()),
                       "projections": model.visual_projection.weight.numel() + model.text_projection.weight.numel()},
        "parts_file": {"name": PARTS_FILE, "bytes": parts.stat().st_size},
        "text_tower_sha256": file_sha256(folder / "model.safetensors"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__,
                     "scikit-learn": __import__("sklearn").__version__},
    }
    (args.out / "training_log.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("wrote %s (parts: %s, %.1f MB)", args.out, parts.name, parts.stat().st_size / 1e6)
    return 0


if __name__ == "__main__":
    sys.exit(main())
