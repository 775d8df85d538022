"""Train the bundled demo model: a small LLaVA answering questions about real handwritten digits.

Data: the 1,797 real 8x8 handwritten digits of `sklearn.datasets.load_digits()` (values 0..16 = ink),
drawn black on white at 32x32 (nearest-neighbour upscaling, so every source pixel becomes an exact
4x4 block), split by image with a seeded permutation into train / calibration / evaluation, and asked
five kinds of one-word questions (identity, parity, comparison with a number, successor, stroke).

Model: LlavaForConditionalGeneration = CLIP vision tower (32x32 images, 8x8 patches -> 16 image tokens,
`vision_feature_layer=-2` as LLaVA-1.5) + 2-layer projector + Llama language model, with a word-level
tokenizer, a CLIP image processor and LLaVA-1.5's chat template, trained from scratch with teacher
forcing (loss on the answer word and `</s>` only), AdamW, linear warm-up then cosine decay.

Reproducible: the weights depend only on --seed and the step count. Without --steps the count is
decided up front from a short timing on a throw-away copy of the model (so that training fits in
--minutes); the count used is printed and saved in training_report.json, and `--steps N` repeats it.

    python training/train_demo.py                      # writes src/multiflow/demo_model, demo_data, training/demo_train
    python training/train_demo.py --steps 1500         # the same weights as a run that chose 1500
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import os
import platform
import random
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

log = logging.getLogger("train_demo")

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE, PATCH_SIZE = 32, 8
SPLIT_SIZES = {"train": 1200, "calibration": 200}  # evaluation: the rest (397)
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")

# Question kinds: two fixed phrasings each; `{n}` is a number word 0-9 (comparison only).
KINDS = ("identity", "parity", "comparison", "successor", "stroke")
PHRASINGS = {
    "identity": ("What digit is this?", "Which digit is shown?"),
    "parity": ("Is the digit even or odd?", "Is this number odd or even?"),
    "comparison": ("Is the digit greater than {n}?", "Is the digit less than {n}?"),
    "successor": ("What digit comes after this one?", "Which digit follows this one?"),
    "stroke": ("Is the stroke thick or thin?", "Is this written with a thick or thin stroke?"),
}
PROMPT_WORDS = "USER: ASSISTANT:"  # the chat template's own words (besides <image> and </s>)

VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
TEXT = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128)
TRAIN = dict(batch_size=64, lr=1e-3, weight_decay=0.05, warmup_fraction=0.05, grad_clip=1.0, min_lr_ratio=0.02)


# --- data ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Digit:
    index: int          # sklearn index = image file name
    label: int          # 0..9
    ink: int            # sum of the 8x8 values (0..16 each): how much ink was written

    @property
    def path(self) -> str:
        return f"images/{self.index:04d}.png"


def render(values: np.ndarray) -> Image.Image:
    """8x8 ink counts 0..16 -> 32x32 grayscale PIL image, black ink on white, nearest-neighbour."""
    gray = np.rint(255.0 - values * (255.0 / 16.0)).astype(np.uint8)
    return Image.fromarray(gray, "L").resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.NEAREST)


def split_indices(n: int, seed: int) -> dict[str, list[int]]:
    """Seeded permutation of the image indices cut into train / calibration / evaluation (sorted)."""
    order = np.random.default_rng(seed).permutation(n).tolist()
    a, b = SPLIT_SIZES["train"], SPLIT_SIZES["train"] + SPLIT_SIZES["calibration"]
    return {"train": sorted(order[:a]), "calibration": sorted(order[a:b]), "evaluation": sorted(order[b:])}


def ask(kind: str, digit: Digit, phrasing: int, n: int, ink_median: float) -> tuple[str, str]:
    """(question, one-word answer) of `kind` about `digit`; n is the comparison's number."""
    question = PHRASINGS[kind][phrasing].format(n=NUMBER_WORDS[n])
    d = digit.label
    if kind == "identity":
        answer = NUMBER_WORDS[d]
    elif kind == "parity":
        answer = "even" if d % 2 == 0 else "odd"
    elif kind == "comparison":  # phrasing 0: greater than n; 1: less than n; equal -> "no"
        answer = "yes" if (d > n if phrasing == 0 else d < n) else "no"
    elif kind == "successor":  # counting wraps: after nine comes zero
        answer = NUMBER_WORDS[(d + 1) % 10]
    elif kind == "stroke":  # more ink than the training split's median -> thick
        answer = "thick" if digit.ink > ink_median else "thin"
    else:
        raise ValueError(f"unknown question kind {kind!r}")
    return question, answer


def draw_question(rng: random.Random, kind: str) -> tuple[int, int]:
    """(phrasing, comparison number) for one question, from `rng`."""
    return rng.randrange(len(PHRASINGS[kind])), rng.randrange(10)


def fixed_records(digits: list[Digit], ink_median: float, seed: int) -> list[dict]:
    """One record per (image, kind), phrasing and number drawn from a seeded generator."""
    rng = random.Random(seed)
    records = []
    for digit in digits:
        for kind in KINDS:
            phrasing, n = draw_question(rng, kind)
            question, answer = ask(kind, digit, phrasing, n, ink_median)
            records.append({"image": digit.path, "question": question, "answer": answer, "kind": kind})
    return records


def write_data(out: Path, images: list[Image.Image], digits: list[Digit], splits: dict[str, list[int]],
               ink_median: float, seed: int, train_out: Path | None = None) -> dict[str, list[dict]]:
    """Each split's JSONL and images: calibration and evaluation in `out` (shipped with the package), the
    training split in `train_out` (default `out`; kept in the source tree only, never in the wheel)."""
    folders = {name: (train_out or out) if name == "train" else out for name in splits}
    for folder in set(folders.values()):
        (folder / "images").mkdir(parents=True, exist_ok=True)
    for name, indices in splits.items():
        for i in indices:
            images[i].save(folders[name] / digits[i].path, optimize=True)
    records = {}
    for offset, (name, indices) in enumerate(splits.items()):
        records[name] = fixed_records([digits[i] for i in indices], ink_median, seed * 1000 + offset)
        with open(folders[name] / f"{name}.jsonl", "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records[name])
    meta = {
        "source": "sklearn.datasets.load_digits() (UCI Optical Recognition of Handwritten Digits, test set; "
                  "E. Alpaydin, C. Kaynak, 1998)",
        "licence": "UCI Machine Learning Repository: CC BY 4.0 (https://archive.ics.uci.edu/dataset/80); "
                   "redistributed inside scikit-learn (BSD-3-Clause)",
        "rendering": "8x8 ink counts 0..16 -> gray = round(255 - 255*v/16) (black ink on white), "
                     "32x32 by nearest-neighbour upscaling, 8-bit grayscale PNG",
        "seed": seed,
        "kinds": {k: list(v) for k, v in PHRASINGS.items()},
        "stroke_ink_median": ink_median,
        "splits": splits,
    }
    (out / "splits.json").write_text(json.dumps(meta, indent=1) + "\n")
    return records


# --- processor and model ---------------------------------------------------------------------------

def build_processor(texts: list[str]):
    """Word-level tokenizer over the words of `texts`, CLIP image processor, LLaVA-1.5 chat template."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from multiflow.models.prompts import LLAVA_15_CHAT_TEMPLATE

    specials = ["<pad>", "<unk>", "<s>", "</s>", "<image>"]
    normalizer, pre_tokenizer = normalizers.Lowercase(), pre_tokenizers.Whitespace()  # "USER:" -> user, :
    words = sorted({w for t in texts for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(t))})
    vocab = {tok: i for i, tok in enumerate(specials + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.normalizer, core.pre_tokenizer = normalizer, pre_tokenizer
    core.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>", padding_side="left",
                                        extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", chat_template=LLAVA_15_CHAT_TEMPLATE,
                          num_additional_image_tokens=1)


def build_model(processor, seed: int):
    from transformers import (CLIPVisionConfig, GenerationConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration)

    tok = processor.tokenizer
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION)
    text = LlamaConfig(vocab_size=len(tok), pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                       eos_token_id=tok.eos_token_id, tie_word_embeddings=False, **TEXT)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, max_new_tokens=3, do_sample=False)
    return model


def prompt(processor, question: str, answer: str | None = None) -> str:
    """The chat template's text, ending at `ASSISTANT:` or, with an answer, at `</s>` (as multiflow)."""
    from multiflow.models.prompts import build_prompt

    return build_prompt(processor, question, answer)


def encode_for_training(processor, images: list[Image.Image], questions: list[str], answers: list[str]):
    """Right-padded inputs with labels on the answer tokens and `</s>` only (-100 elsewhere)."""
    texts = [prompt(processor, q, a) for q, a in zip(questions, answers)]
    inputs = processor(images=images, text=texts, return_tensors="pt", padding=True, padding_side="right")
    labels = torch.full_like(inputs["input_ids"], -100)
    lengths = inputs["attention_mask"].sum(1).tolist()
    for row, (answer, length) in enumerate(zip(answers, lengths)):
        n = len(processor.tokenizer(answer + processor.tokenizer.eos_token, add_special_tokens=False)["input_ids"])
        labels[row, length - n : length] = inputs["input_ids"][row, length - n : length]
    inputs["labels"] = labels
    return inputs


# --- training --------------------------------------------------------------------------------------

class Sampler:
    """Seeded stream of training batches: random train image, kind, phrasing and number per item."""

    def __init__(self, digits: list[Digit], images: dict[int, Image.Image], ink_median: float, seed: int):
        self.digits, self.images, self.ink_median = digits, images, ink_median
        self.rng = random.Random(seed)

    def batch(self, size: int) -> tuple[list[Image.Image], list[str], list[str]]:
        images, questions, answers = [], [], []
        for _ in range(size):
            digit = self.digits[self.rng.randrange(len(self.digits))]
            kind = KINDS[self.rng.randrange(len(KINDS))]
            question, answer = ask(kind, digit, *draw_question(self.rng, kind), self.ink_median)
            images.append(self.images[digit.index])
            questions.append(question)
            answers.append(answer)
        return images, questions, answers


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up to 1 over `warmup` steps, then cosine decay to `min_ratio` at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def make_optimizer(model):
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
    other = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": TRAIN["weight_decay"]},
                              {"params": other, "weight_decay": 0.0}], lr=TRAIN["lr"], betas=(0.9, 0.98))


def train_step(model, optimizer, processor, batch) -> float:
    inputs = encode_for_training(processor, *batch)
    loss = model(**inputs).loss
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), TRAIN["grad_clip"])
    optimizer.step()
    return loss.item()


def seconds_per_step(model, processor, sampler: Sampler, steps: int = 8, warmup: int = 2) -> float:
    """Time `steps` training steps on a throw-away copy (the real model and its data stream untouched)."""
    scratch = copy.deepcopy(model)
    optimizer = make_optimizer(scratch)
    for _ in range(warmup):
        train_step(scratch, optimizer, processor, sampler.batch(TRAIN["batch_size"]))
    start = time.perf_counter()
    for _ in range(steps):
        train_step(scratch, optimizer, processor, sampler.batch(TRAIN["batch_size"]))
    return (time.perf_counter() - start) / steps


def train(model, processor, sampler: Sampler, steps: int) -> list[float]:
    optimizer = make_optimizer(model)
    warmup = max(1, round(TRAIN["warmup_fraction"] * steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, steps, warmup, TRAIN["min_lr_ratio"]))
    model.train()
    losses = []
    with tqdm(range(steps), desc="training", unit="step", mininterval=5) as bar:
        for _ in bar:
            losses.append(train_step(model, optimizer, processor, sampler.batch(TRAIN["batch_size"])))
            scheduler.step()
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}", refresh=False)
    model.eval()
    return losses


# --- evaluation ------------------------------------------------------------------------------------

def normalise(text: str) -> str:
    """Lowercase, punctuation -> space, whitespace collapsed."""
    return " ".join(re.sub(f"[{re.escape(string.punctuation)}]", " ", text.lower()).split())


@torch.no_grad()
def predict(model, processor, images: list[Image.Image], questions: list[str], batch_size: int = 64) -> list[str]:
    """Greedy answers (max 3 new tokens), batches left-padded as the saved tokenizer pads."""
    answers = []
    for start in range(0, len(questions), batch_size):
        texts = [prompt(processor, q) for q in questions[start : start + batch_size]]
        inputs = processor(images=images[start : start + batch_size], text=texts, return_tensors="pt",
                           padding=True, padding_side="left")
        out = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        answers += processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    return answers


def evaluate(model, processor, records: list[dict], folder: Path) -> tuple[dict, list[str]]:
    """Exact match (lowercased, punctuation stripped) per kind and overall."""
    images = [load_rgb(folder / r["image"]) for r in records]
    predictions = predict(model, processor, images, [r["question"] for r in records])
    right, total = Counter(), Counter()
    for r, p in zip(records, predictions):
        total[r["kind"]] += 1
        right[r["kind"]] += normalise(p) == normalise(r["answer"])
    accuracy = {k: right[k] / total[k] for k in KINDS}
    accuracy["overall"] = sum(right.values()) / sum(total.values())
    return accuracy, predictions


def load_rgb(path: Path) -> Image.Image:
    with Image.open(path) as image:
        return image.convert("RGB")


# --- main ------------------------------------------------------------------------------------------

def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-model", type=Path, default=REPO / "src/multiflow/demo_model")
    parser.add_argument("--out-data", type=Path, default=REPO / "src/multiflow/demo_data",
                        help="calibration and evaluation splits (shipped in the wheel)")
    parser.add_argument("--out-train-data", type=Path, default=REPO / "training/demo_train",
                        help="the training split (source tree only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--minutes", type=float, default=25.0, help="training time budget (decides the step count)")
    parser.add_argument("--steps", type=int, default=None, help="fixed step count (overrides --minutes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (part of what fixes the weights)")
    args = parser.parse_args(argv)
    if args.minutes <= 0 or (args.steps is not None and args.steps < 1):
        parser.error("--minutes must be > 0 and --steps >= 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    import sklearn
    import transformers
    from sklearn.datasets import load_digits
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)

    # data: images, splits, fixed calibration / evaluation questions
    raw = load_digits()
    digits = [Digit(i, int(t), int(v.sum())) for i, (t, v) in enumerate(zip(raw.target, raw.images))]
    images = [render(v) for v in raw.images]
    splits = split_indices(len(digits), args.seed)
    assert not (set(splits["train"]) & set(splits["calibration"]) or set(splits["train"]) & set(splits["evaluation"])
                or set(splits["calibration"]) & set(splits["evaluation"]))
    ink_median = float(np.median([digits[i].ink for i in splits["train"]]))
    records = write_data(args.out_data, images, digits, splits, ink_median, args.seed, args.out_train_data)
    log.info("data: %s images, splits %s, stroke median ink %s -> %s",
             len(digits), {k: len(v) for k, v in splits.items()}, ink_median, args.out_data)

    # processor and model
    texts = [PROMPT_WORDS, *NUMBER_WORDS, "even", "odd", "yes", "no", "thick", "thin"]
    texts += [p.format(n=w) for kind in KINDS for p in PHRASINGS[kind] for w in NUMBER_WORDS]
    processor = build_processor(texts)
    model = build_model(processor, args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    log.info("model: %.2fM parameters, vocabulary %d", n_params / 1e6, len(processor.tokenizer))

    # training
    train_images = {i: images[i].convert("RGB") for i in splits["train"]}
    train_digits = [digits[i] for i in splits["train"]]
    step_time = None
    steps = args.steps
    if steps is None:
        step_time = seconds_per_step(model, processor, Sampler(train_digits, train_images, ink_median, args.seed + 1))
        steps = max(1, int(args.minutes * 60 / step_time))
        log.info("timing: %.3f s/step -> %d steps for %.1f minutes (repeat with --steps %d)",
                 step_time, steps, args.minutes, steps)
    start = time.perf_counter()
    losses = train(model, processor, Sampler(train_digits, train_images, ink_median, args.seed), steps)
    train_seconds = time.perf_counter() - start
    log.info("trained %d steps in %.1f min; loss %.4f (first 50) -> %.4f (last 50)",
             steps, train_seconds / 60, np.mean(losses[:50]), np.mean(losses[-50:]))

    # evaluation, saving, reload check
    start = time.perf_counter()
    accuracy, predictions = evaluate(model, processor, records["evaluation"], args.out_data)
    calibration_accuracy, _ = evaluate(model, processor, records["calibration"], args.out_data)
    eval_seconds = time.perf_counter() - start
    log.info("evaluation accuracy: %s", {k: round(v, 4) for k, v in accuracy.items()})
    args.out_model.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out_model)
    processor.save_pretrained(args.out_model)
    for path in args.out_model.iterdir():
        path.chmod(0o644)  # safetensors writes 0600; the folder ships inside the package

    reloaded = LlavaForConditionalGeneration.from_pretrained(args.out_model).eval()
    reprocessor = AutoProcessor.from_pretrained(args.out_model)
    check = records["evaluation"][:64]
    again = predict(reloaded, reprocessor, [load_rgb(args.out_data / r["image"]) for r in check],
                    [r["question"] for r in check])
    assert again == predictions[:64], "the saved folder does not reproduce the model's answers"

    chunk = max(1, steps // 20)
    report = {
        "seed": args.seed,
        "steps": steps,
        "reproduce": f"python training/train_demo.py --seed {args.seed} --steps {steps}",
        "minutes_budget": args.minutes if args.steps is None else None,
        "seconds_per_step_timed": step_time,
        "training_minutes": round(train_seconds / 60, 2),
        "evaluation_minutes": round(eval_seconds / 60, 2),
        "threads": args.threads,
        "training": {**TRAIN, "examples_seen": steps * TRAIN["batch_size"], "loss": "cross-entropy on answer + </s>"},
        "loss_curve": {"every_steps": chunk,
                       "mean_loss": [round(float(np.mean(losses[i : i + chunk])), 4) for i in range(0, steps, chunk)],
                       "first_50": round(float(np.mean(losses[:50])), 4),
                       "last_50": round(float(np.mean(losses[-50:])), 4)},
        "evaluation_accuracy": {k: round(v, 4) for k, v in accuracy.items()},
        "calibration_accuracy": {k: round(v, 4) for k, v in calibration_accuracy.items()},
        "evaluation_items": len(records["evaluation"]),
        "evaluation_protocol": "model.generate(max_new_tokens=3, do_sample=False), batches of 64 left-padded; "
                               "exact match of the whole generated text after lowercasing and stripping punctuation",
        "parameters": n_params,
        "parameters_by_part": {part: sum(p.numel() for n, p in model.named_parameters() if n.startswith(prefix))
                               for part, prefix in (("vision_tower", "model.vision_tower."),
                                                    ("projector", "model.multi_modal_projector."),
                                                    ("language_model", "model.language_model."),
                                                    ("lm_head", "lm_head."))},
        "architecture": {"vision": VISION, "text": TEXT, "image_size": IMAGE_SIZE, "patch_size": PATCH_SIZE,
                         "vision_feature_layer": -2, "image_tokens": (IMAGE_SIZE // PATCH_SIZE) ** 2,
                         "vocabulary": len(processor.tokenizer)},
        "data": {"images": len(digits), **{f"{k}_images": len(v) for k, v in splits.items()},
                 **{f"{k}_records": len(v) for k, v in records.items()}, "stroke_ink_median": ink_median},
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "transformers": transformers.__version__, "sklearn": sklearn.__version__,
                     "numpy": np.__version__},
    }
    (args.out_model / "training_report.json").write_text(json.dumps(report, indent=1) + "\n")
    print(json.dumps({k: report[k] for k in ("seed", "steps", "training_minutes", "evaluation_accuracy",
                                             "calibration_accuracy", "parameters", "data")}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
