"""Train the vision tower and projector of the LLaVA-SmolLM2 judge, with the pretrained LLM frozen.

    HF_HUB_OFFLINE=1 .venv/bin/python -m experiments.llava_smollm2.train --lm /work/bench/smollm2/model

--lm is the SmolLM2-135M-Instruct safetensors folder that `experiments.smollm2.prepare` writes (the wheel's GGUF,
dequantized). Data: the demo's digits VQA (`training/train_demo.py`: the 1,797 real handwritten digits of
scikit-learn, the same seeded train / calibration / evaluation split by image, the same five question kinds), so
the calibration and evaluation splits are the package's `demo_data/`.

Two stages, both seeded and deterministic for a given --threads:
  0. the vision tower alone (training images shifted at random by up to 2 of their 32 pixels, as in stage 1)
     learns to tell the digit and the stroke (a linear head on the mean of its `vision_feature_layer` patch
     features; cheap, no LLM), so that stage 1 starts from useful features;
  1. LLaVA stage-1 style: the whole model on the VQA records (random train image, kind, phrasing per item),
     cross-entropy on the answer tokens after the generation prompt (answer, `<|im_end|>`, newline), gradients
     through the frozen LLM into the projector and the vision tower only.
Writes trained/parts.safetensors (vision tower + projector), trained/training_report.json (accuracy per kind on
the evaluation split, loss curve, the command) and, with `rebuild.py`, trained/manifest.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from tqdm import tqdm

from experiments.llava_smollm2.model import PARTS, TRAINED, TRAINED_PREFIXES, build_model, build_processor, trained_state

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "training"))
import train_demo as demo  # noqa: E402  (the demo's data: digits, split, questions, evaluation)

log = logging.getLogger("llava_smollm2.train")
DEMO_DATA = REPO / "src/multiflow/demo_data"
STAGE0 = dict(steps=1600, batch_size=64, lr=2e-3, max_shift=2)
STAGE1 = dict(batch_size=16, lr_projector=1e-3, lr_vision=2e-4, warmup=20, min_lr_ratio=0.05, grad_clip=1.0,
              max_shift=2)


def pixel_values(processor, images) -> torch.Tensor:
    return processor.image_processor(images=images, return_tensors="pt")["pixel_values"]


def shift(pixels: torch.Tensor, generator: torch.Generator, max_shift: int) -> torch.Tensor:
    """Each image moved by a seeded random (dy, dx) in [-max_shift, max_shift] pixels of the 32x32 rendering (a
    quarter of a digit pixel each), the uncovered border filled with the image's own background (its maximum:
    white paper). Without it the tower memorises the 1,200 training digits (85% of held-out digits told apart
    by stage 0's head); with shifts of up to 2 pixels, 97% (1,600 steps)."""
    out = pixels.amax(dim=(2, 3), keepdim=True).expand_as(pixels).clone()
    size = pixels.shape[-1]
    moves = torch.randint(-max_shift, max_shift + 1, (len(pixels), 2), generator=generator).tolist()
    for i, (dy, dx) in enumerate(moves):
        out[i, :, max(0, dy):size + min(0, dy), max(0, dx):size + min(0, dx)] = \
            pixels[i, :, max(0, -dy):size - max(0, dy), max(0, -dx):size - max(0, dx)]
    return out


def stage0(model, pixels: torch.Tensor, digits: list, ink_median: float, seed: int) -> list[float]:
    """Digit (10-way) and stroke (2-way) from the vision tower's feature layer: a linear head, then dropped."""
    tower = model.model.vision_tower
    layer = model.config.vision_feature_layer
    labels = torch.tensor([d.label for d in digits])
    thick = torch.tensor([int(d.ink > ink_median) for d in digits])
    head = torch.nn.Linear(tower.config.hidden_size, 12)
    params = list(tower.parameters()) + list(head.parameters())
    optimizer = torch.optim.AdamW(params, lr=STAGE0["lr"], weight_decay=0.01)
    generator = torch.Generator().manual_seed(seed)
    losses = []
    tower.train()
    for step in tqdm(range(STAGE0["steps"]), desc="stage 0 (vision tower)", mininterval=5):
        for group in optimizer.param_groups:
            group["lr"] = STAGE0["lr"] * demo.lr_factor(step, STAGE0["steps"], 40, 0.02)
        idx = torch.randint(len(digits), (STAGE0["batch_size"],), generator=generator)
        images = shift(pixels[idx], generator, STAGE0["max_shift"])
        features = tower(images, output_hidden_states=True).hidden_states[layer][:, 1:].mean(1)
        logits = head(features)
        loss = (torch.nn.functional.cross_entropy(logits[:, :10], labels[idx])
                + torch.nn.functional.cross_entropy(logits[:, 10:], thick[idx]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    tower.eval()
    return losses


def encode(processor, images, questions, answers):
    """Right-padded full conversations; labels on the tokens after the generation prompt (-100 elsewhere)."""
    from multiflow.models.prompts import build_prompt

    full = processor(images=images, text=[build_prompt(processor, q, a) for q, a in zip(questions, answers)],
                     return_tensors="pt", padding=True, padding_side="right")
    prompts = [build_prompt(processor, q, None) for q in questions]
    starts = [len(processor(images=[im], text=[p], return_tensors="pt")["input_ids"][0])
              for im, p in zip(images, prompts)]
    labels = torch.full_like(full["input_ids"], -100)
    for row, (start, length) in enumerate(zip(starts, full["attention_mask"].sum(1).tolist())):
        labels[row, start:length] = full["input_ids"][row, start:length]
    return full, labels


def answer_loss(model, inputs, labels) -> torch.Tensor:
    """Cross-entropy of the answer tokens only: the output head runs on the positions that predict them."""
    hidden = model.model(**inputs).last_hidden_state
    rows, cols = (labels[:, 1:] != -100).nonzero(as_tuple=True)
    logits = model.lm_head(hidden[rows, cols])  # position t predicts token t+1
    return torch.nn.functional.cross_entropy(logits.float(), labels[rows, cols + 1])


def stage1(model, processor, sampler, steps: int, seed: int) -> list[float]:
    for name, param in model.named_parameters():
        param.requires_grad_(name.startswith(TRAINED_PREFIXES))
    vision = [p for n, p in model.named_parameters() if n.startswith("model.vision_tower.")]
    projector = [p for n, p in model.named_parameters() if n.startswith("model.multi_modal_projector.")]
    optimizer = torch.optim.AdamW([{"params": vision, "lr": STAGE1["lr_vision"]},
                                   {"params": projector, "lr": STAGE1["lr_projector"]}], weight_decay=0.0)
    base = [g["lr"] for g in optimizer.param_groups]
    model.train()
    generator = torch.Generator().manual_seed(seed + 1)
    losses = []
    with tqdm(range(steps), desc="stage 1 (through the frozen LLM)", mininterval=10) as bar:
        for step in bar:
            factor = demo.lr_factor(step, steps, STAGE1["warmup"], STAGE1["min_lr_ratio"])
            for group, lr in zip(optimizer.param_groups, base):
                group["lr"] = lr * factor
            inputs, labels = encode(processor, *sampler.batch(STAGE1["batch_size"]))
            inputs["pixel_values"] = shift(inputs["pixel_values"], generator, STAGE1["max_shift"])
            loss = answer_loss(model, inputs, labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vision + projector, STAGE1["grad_clip"])
            optimizer.step()
            losses.append(loss.item())
            bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", refresh=False)
    model.eval()
    for param in model.parameters():
        param.requires_grad_(False)
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm", type=Path, required=True, help="SmolLM2-135M-Instruct safetensors folder "
                                                                  "(experiments.smollm2.prepare's model/)")
    parser.add_argument("--steps", type=int, default=2700, help="stage-1 steps (batches of 16)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (part of what fixes the weights)")
    parser.add_argument("--out", type=Path, default=TRAINED, help="where parts.safetensors and the report go")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    from safetensors.torch import save_file
    from sklearn.datasets import load_digits

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    raw = load_digits()
    digits = [demo.Digit(i, int(t), int(v.sum())) for i, (t, v) in enumerate(zip(raw.target, raw.images))]
    images = [demo.render(v).convert("RGB") for v in raw.images]
    splits = demo.split_indices(len(digits), 0)  # the package's demo_data split (seed 0)
    ink_median = float(np.median([digits[i].ink for i in splits["train"]]))
    shipped = json.loads((DEMO_DATA / "splits.json").read_text())
    if shipped["splits"] != splits or shipped["stroke_ink_median"] != ink_median:
        raise SystemExit(f"{DEMO_DATA}/splits.json does not match the split drawn here")
    train_digits = [digits[i] for i in splits["train"]]

    processor = build_processor(args.lm)
    model = build_model(args.lm, processor, args.seed)
    t0 = time.perf_counter()
    losses0 = stage0(model, pixel_values(processor, [images[d.index] for d in train_digits]), train_digits,
                     ink_median, args.seed)
    t1 = time.perf_counter()
    log.info("stage 0: %.1f min, loss %.4f -> %.4f", (t1 - t0) / 60, np.mean(losses0[:50]), np.mean(losses0[-50:]))
    sampler = demo.Sampler(train_digits, {d.index: images[d.index] for d in train_digits}, ink_median, args.seed)
    losses1 = stage1(model, processor, sampler, args.steps, args.seed)
    t2 = time.perf_counter()
    log.info("stage 1: %.1f min, loss %.4f -> %.4f", (t2 - t1) / 60, np.mean(losses1[:20]), np.mean(losses1[-20:]))

    evaluation = [json.loads(line) for line in (DEMO_DATA / "evaluation.jsonl").read_text().splitlines()]
    accuracy, _ = demo.evaluate(model, processor, evaluation, DEMO_DATA)
    log.info("evaluation accuracy: %s", {k: round(v, 4) for k, v in accuracy.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    save_file(trained_state(model), str(args.out / PARTS.name), metadata={"format": "pt"})
    chunk = max(1, args.steps // 20)
    import sklearn
    import transformers

    report = {
        "reproduce": f"python -m experiments.llava_smollm2.train --lm LM --seed {args.seed} --steps {args.steps} "
                     f"--threads {args.threads}",
        "seed": args.seed, "threads": args.threads, "stage0": STAGE0, "stage1": {**STAGE1, "steps": args.steps},
        "minutes": {"stage0": round((t1 - t0) / 60, 2), "stage1": round((t2 - t1) / 60, 2)},
        "loss": {"stage0_first_last_50": [round(float(np.mean(losses0[:50])), 4), round(float(np.mean(losses0[-50:])), 4)],
                 "stage1_every_steps": chunk,
                 "stage1_mean": [round(float(np.mean(losses1[i:i + chunk])), 4) for i in range(0, args.steps, chunk)]},
        "evaluation_accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "evaluation_items": len(evaluation),
        "evaluation_protocol": "training/train_demo.py evaluate(): greedy, max_new_tokens=3, exact match after "
                               "lowercasing and stripping punctuation, on src/multiflow/demo_data/evaluation.jsonl",
        "trained_parameters": sum(v.numel() for v in trained_state(model).values()),
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "sklearn": sklearn.__version__},
    }
    (args.out / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("minutes", "evaluation_accuracy")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
