"""The bundled demo model: the default `--model` of every command.

`demo_model/` is a small LLaVA-1.5-style model (CLIP vision tower + Llama,
`vision_feature_layer=-2`) trained from scratch on visual questions about
scikit-learn's handwritten digits (`training/train_demo.py`; see
training/README.md), with its calibration and evaluation splits in
`demo_data/` (`demo_split`). Should a package lack the trained weights,
`ensure_demo_model` builds a random-weight stand-in of the same shape once
under the cache folder (`build_demo_model`: for trying the tool, not for
judging quality).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import torch

DEMO_NAME = "random-tiny-llava-v2"
DEMO_LABEL = "bundled demo: tiny LLaVA with RANDOM seeded weights (untrained; for trying the tool only)"
TRAINED_LABEL = "bundled demo model: a small LLaVA trained on handwritten digits (see training/README.md)"
IMAGE_SIZE, PATCH_SIZE = 32, 8


def build_demo_model(seed: int = 0):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    vision = CLIPVisionConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=PATCH_SIZE)
    processor = build_demo_processor()
    text = LlamaConfig(hidden_size=128, intermediate_size=352, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=4, vocab_size=len(processor.tokenizer), max_position_embeddings=512,
                       pad_token_id=processor.tokenizer.pad_token_id)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=processor.image_token_id,
                         vision_feature_layer=-2, image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2)
    generator = torch.Generator().manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            scale = float(torch.empty(1).uniform_(-4.6, -3.2, generator=generator).exp())  # 0.01 .. 0.04
            param.copy_(torch.randn(param.shape, generator=generator) * scale)
    return model, processor


def build_demo_processor():
    """Character-level tokenizer (printable ASCII), CLIP image processor, LLaVA-1.5 chat template."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from multiflow.models.prompts import LLAVA_15_CHAT_TEMPLATE

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for ch in sorted(set(string.printable) - set("\x0b\x0c\r")):
        vocab.setdefault(ch, len(vocab))
    vocab["<image>"] = len(vocab)
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>",
                                        extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", chat_template=LLAVA_15_CHAT_TEMPLATE,
                          num_additional_image_tokens=1)


TRAINED = Path(__file__).parent / "demo_model"


def demo_label(folder: Path) -> str:
    return TRAINED_LABEL if Path(folder) == TRAINED else DEMO_LABEL


def is_demo(folder: Path) -> bool:
    """Is this folder the bundled demo model (trained, or the random stand-in)?"""
    try:
        folder = Path(folder).resolve()
    except OSError:
        return False
    return folder == TRAINED.resolve() or folder.name == DEMO_NAME


def ensure_demo_model(cache_root: Path) -> Path:
    """The bundled trained demo model; without it, a random stand-in built once under cache_root."""
    if (TRAINED / "config.json").is_file() and (TRAINED / "model.safetensors").is_file():
        return TRAINED
    folder = Path(cache_root) / DEMO_NAME
    if (folder / "config.json").is_file():
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{DEMO_NAME}.", dir=folder.parent))
    try:
        model, processor = build_demo_model()
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "README.txt").write_text(DEMO_LABEL + "\n")
        tmp.rename(folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (folder / "config.json").is_file():  # not a lost race with another process
            raise
    return folder


def demo_split(name: str) -> Path | None:
    """The bundled demo model's data split (`calibration` or `evaluation`), if the package ships it."""
    path = Path(__file__).parent / "demo_data" / f"{name}.jsonl"
    return path if path.is_file() else None
