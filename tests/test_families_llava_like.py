"""LLaVA-like families of transformers 5.x end to end: Gemma 3, PaliGemma, Mistral 3, Aya Vision,
LLaVA-OneVision and InternVL (families.py `_LLAVA_LIKE`).

Each tiny model is built from its family's config (2 vision and 2 decoder layers, hidden 32, the family's
own projector: Gemma 3's bare parameter, Pixtral's patch merger, pixel shuffles), with a byte-level tokenizer
carrying the family's special tokens, and goes through distribute, calibrate (block by block and whole model,
bit for bit the same), prune, reload with AutoModelForImageTextToText and eval. SigLIP towers keep their pooling
head (`vision_use_head=True`, SigLIP's default), which these models never read.

Processors: Gemma 3, PaliGemma and Aya Vision use transformers' own processor with the PIL image processor.
Three need torchvision, which is not installed here: LLaVA-OneVision's and InternVL's (their video processors)
are saved without a video processor and loaded by models/processors.py's `load_processor` without it, and
Mistral 3's PixtralProcessor is replaced by `PixtralLike` below (its prompt expansion on the PIL image
processor), which `load_processor` returns for its folder (the `processors` fixture).

The real layouts of Gemma-3-4B, InternVL3-1B-hf and LLaVA-OneVision-0.5B (tests/fixtures/layouts/*.json, with
the sources each was derived from) are checked key by key against the presets and against the model that
transformers builds from their configs.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import multiflow
from multiflow.calibration.calibrate import CalibrationConfig, calibrate
from multiflow.evaluation.evaluate import EvalConfig, evaluate
from multiflow.models import inventory as layers
from multiflow.models.families import family_for, rename_key

FAMILIES = ["gemma3", "paligemma", "mistral3", "aya_vision", "llava_onevision", "internvl"]
LAYOUTS = Path(__file__).parent / "fixtures" / "layouts"
# this file's layouts (every tensor with its group by hand); test_families_more.py reads the others there
LAYOUT_FIXTURES = ["gemma-3-4b-it", "internvl3-1b-hf", "llava-onevision-qwen2-0.5b-ov-hf"]
SPECIAL = ["<image>", "<video>", "<start_of_image>", "<end_of_image>", "[IMG]", "[IMG_BREAK]", "[IMG_END]",
           "<|START_OF_IMG|>", "<|END_OF_IMG|>", "<|IMG_PATCH|>", "<|IMG_LINE_BREAK|>", "<img>", "</img>",
           "<IMG_CONTEXT>"]
CHAT = ("{% for m in messages %}{{ m['role'] }}: {% for c in m['content'] %}{% if c['type'] == 'image' %}IMAGE"
        "{% endif %}{% endfor %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}"
        "{% endfor %}\n{% endfor %}{% if add_generation_prompt %}assistant:{% endif %}")
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=16,
              patch_size=4)
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, vocab_size=288, pad_token_id=2, bos_token_id=0, eos_token_id=1)
IDS = dict(pad_token_id=2, bos_token_id=0, eos_token_id=1)
SIZE = {"height": 16, "width": 16}


def byte_tokenizer(extra: dict[str, str]):
    """Byte-level BPE (<bos> <eos> <pad>, 256 bytes) plus SPECIAL; `extra` names some of them as attributes."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    backend.add_special_tokens(SPECIAL)  # ids 259.. in this order, whatever `extra` names
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>",
                                        pad_token="<pad>", extra_special_tokens=extra)
    assert [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL] == list(range(259, 259 + len(SPECIAL)))
    assert len(tokenizer) <= TEXT["vocab_size"]
    return tokenizer


class PixtralLike:
    """PixtralProcessor's prompt (`[IMG]` per merged patch, `[IMG_BREAK]` after each row but the last, then
    `[IMG_END]`) on the PIL image processor; transformers' PixtralProcessor needs torchvision."""

    def __init__(self, tokenizer, image_processor, cell: int):
        self.tokenizer, self.image_processor, self.cell = tokenizer, image_processor, cell
        self.chat_template = CHAT.replace("IMAGE", "[IMG]")

    def apply_chat_template(self, conversation, add_generation_prompt=False, tokenize=False):
        return self.tokenizer.apply_chat_template(conversation, chat_template=self.chat_template, tokenize=tokenize,
                                                  add_generation_prompt=add_generation_prompt)

    def __call__(self, images, text, return_tensors="pt", padding=True):
        from transformers import BatchFeature

        pixels = self.image_processor([image for group in images for image in group], return_tensors="pt")
        expanded = []
        for prompt, (height, width) in zip(text, pixels["image_sizes"].tolist()):
            rows = [["[IMG]"] * (width // self.cell) + ["[IMG_BREAK]"] for _ in range(height // self.cell)]
            rows[-1][-1] = "[IMG_END]"
            expanded.append(prompt.replace("[IMG]", "".join(t for row in rows for t in row), 1))
        encoded = self.tokenizer(expanded, return_tensors="pt", padding=padding)
        return BatchFeature({**encoded, "pixel_values": pixels["pixel_values"], "image_sizes": pixels["image_sizes"]})


def tiny(name: str, seed: int = 0):
    """(model, processor, saved: whether the processor saves and loads as transformers' own) of one family."""
    from transformers import AutoConfig, AutoModelForImageTextToText
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    from multiflow.models.processors import without_videos

    ids = {t: 259 + i for i, t in enumerate(SPECIAL)}
    siglip = dict(model_type="siglip_vision_model", **VISION)  # vision_use_head: SigLIP's default, True
    saved = True
    if name == "gemma3":
        from transformers import Gemma3Processor
        from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

        config = AutoConfig.for_model(
            "gemma3", vision_config=siglip, text_config=dict(model_type="gemma3_text", **TEXT), mm_tokens_per_image=4,
            image_token_index=ids["<image>"], boi_token_index=ids["<start_of_image>"],
            eoi_token_index=ids["<end_of_image>"], **IDS)
        tokenizer = byte_tokenizer({"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>",
                                    "image_token": "<image>"})
        processor = Gemma3Processor(Gemma3ImageProcessorPil(size=SIZE), tokenizer, image_seq_length=4,
                                    chat_template=CHAT.replace("IMAGE", "<start_of_image>"))
    elif name == "paligemma":
        from transformers import PaliGemmaProcessor
        from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

        config = AutoConfig.for_model(
            "paligemma", vision_config=dict(siglip, projection_dim=32), text_config=dict(model_type="gemma", **TEXT),
            image_token_index=ids["<image>"], projection_dim=32, hidden_size=32, vocab_size=TEXT["vocab_size"], **IDS)
        images = SiglipImageProcessorPil(size=SIZE)
        images.image_seq_length = 16  # (16 / 4)^2 patches
        processor = PaliGemmaProcessor(images, byte_tokenizer({"image_token": "<image>"}))  # no chat template
    elif name == "mistral3":
        from transformers.models.pixtral.image_processing_pil_pixtral import PixtralImageProcessorPil

        config = AutoConfig.for_model(
            "mistral3", vision_config=dict(model_type="pixtral", head_dim=16, **VISION),
            text_config=dict(model_type="mistral", **TEXT), image_token_index=ids["[IMG]"], spatial_merge_size=2,
            **IDS)
        processor, saved = PixtralLike(byte_tokenizer({}), PixtralImageProcessorPil(
            size={"longest_edge": 16}, patch_size=8), cell=8), False
    elif name == "aya_vision":
        from transformers import AyaVisionProcessor

        config = AutoConfig.for_model(
            "aya_vision", vision_config=siglip, text_config=dict(model_type="cohere2", **TEXT),
            image_token_index=ids["<|IMG_PATCH|>"], downsample_factor=2, **IDS)
        processor = AyaVisionProcessor(GotOcr2ImageProcessorPil(size=SIZE, max_patches=1), byte_tokenizer({}),
                                       patch_size=4, img_size=16, downsample_factor=2,
                                       chat_template=CHAT.replace("IMAGE", "<image>"))
    elif name == "llava_onevision":
        from transformers import LlavaOnevisionProcessor
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil)

        config = AutoConfig.for_model(
            "llava_onevision", vision_config=siglip, text_config=dict(model_type="qwen2", **TEXT),
            image_token_index=ids["<image>"], video_token_index=ids["<video>"], image_grid_pinpoints=[[16, 16]],
            vision_feature_layer=-2, **IDS)
        processor = without_videos(LlavaOnevisionProcessor)(
            LlavaOnevisionImageProcessorPil(size=SIZE, image_grid_pinpoints=[[16, 16]]), byte_tokenizer({}), None,
            num_image_tokens=16, vision_feature_select_strategy="full", chat_template=CHAT.replace("IMAGE", "<image>"))
    elif name == "internvl":
        from transformers import InternVLProcessor

        config = AutoConfig.for_model(
            "internvl", vision_config=dict(model_type="internvl_vision", **VISION),
            text_config=dict(model_type="qwen2", **TEXT), image_token_id=ids["<IMG_CONTEXT>"], image_seq_length=4,
            **IDS)
        tokenizer = byte_tokenizer({"start_image_token": "<img>", "end_image_token": "</img>",
                                    "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"})
        processor = without_videos(InternVLProcessor)(GotOcr2ImageProcessorPil(size=SIZE, max_patches=1), tokenizer,
                                                      None, image_seq_length=4,
                                                      chat_template=CHAT.replace("IMAGE", "<IMG_CONTEXT>\n"))
    else:
        raise ValueError(name)
    torch.manual_seed(seed)
    model = AutoModelForImageTextToText.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # per-tensor scales so layer sparsities differ
        for p in model.parameters():
            p.mul_(float(torch.empty(1).uniform_(0.5, 2.0, generator=g)))
    return model.eval(), processor, saved


IN_MEMORY_PROCESSORS: dict[str, object] = {}  # model_type -> processor that cannot be saved and loaded here
# the video processor configs the hub folders have (a processor built here without torchvision cannot write them)
VIDEO_PROCESSORS = {"llava_onevision": "LlavaOnevisionVideoProcessor", "internvl": "InternVLVideoProcessor"}


@pytest.fixture(scope="module", autouse=True)
def processors():
    """models/processors.py's load_processor gives the in-memory processor of Mistral 3 (PixtralProcessor needs
    torchvision)."""
    from multiflow.models import processors

    real = processors.load_processor

    def load_processor(folder, *args, **kwargs):
        model_type = json.loads((Path(folder) / "config.json").read_text()).get("model_type")
        if model_type in IN_MEMORY_PROCESSORS:
            return IN_MEMORY_PROCESSORS[model_type]
        return real(folder, *args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(processors, "load_processor", load_processor)
        yield


@pytest.fixture(scope="module", params=FAMILIES)
def vlm(request, tmp_path_factory):
    """(folder, model, processor) of a tiny model of each family, saved by transformers 5.x."""
    model, processor, saved = tiny(request.param)
    folder = tmp_path_factory.mktemp(request.param) / "model"
    model.save_pretrained(folder)
    if saved:
        processor.save_pretrained(folder)
        if request.param in VIDEO_PROCESSORS:
            (folder / "video_preprocessor_config.json").write_text(json.dumps({
                "video_processor_type": VIDEO_PROCESSORS[request.param], "processor_class": type(processor).__name__}))
    else:
        IN_MEMORY_PROCESSORS[model.config.model_type] = processor
    return folder, model, processor


def keys_of(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}


def linears(model, prefix: str) -> set[str]:
    return {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith(prefix)}


SIGLIP_FAMILIES = {"gemma3", "paligemma", "aya_vision", "llava_onevision"}  # hub keys: vision_tower.vision_model.


def hub_key(name: str, family: str) -> str:
    """In-memory (transformers 5.x) name -> the family's 4.x hub key (the `_checkpoint_conversion_mapping` of 4.5x,
    reversed; SigLIP towers were saved with their `vision_model.` level)."""
    tower = "vision_tower.vision_model." if family in SIGLIP_FAMILIES else "vision_tower."
    for new, old in (("lm_head.", "language_model.lm_head."), ("model.language_model.", "language_model.model."),
                     ("model.vision_tower.", tower), ("model.multi_modal_projector.", "multi_modal_projector."),
                     ("model.image_newline", "image_newline")):
        if name.startswith(new):
            return old + name[len(new):]
    raise AssertionError(name)


def write(folder: Path, tensors: dict[str, torch.Tensor], config: dict) -> Path:
    folder.mkdir(parents=True)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def hub_copy(folder: Path, dest: Path) -> Path:
    """`folder` (a 5.x save) rewritten with the 4.x hub keys, its other files copied."""
    import shutil

    from safetensors.torch import load_file

    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    to_memory = layers.from_checkpoint(folder).renames
    write(dest, {hub_key(rename_key(k, to_memory),
                         config["model_type"]): v for k, v in tensors.items()}, config)
    for file in folder.iterdir():
        if file.name not in ("model.safetensors", "config.json"):
            shutil.copyfile(file, dest / file.name)
    return dest


def expected_groups(model) -> tuple[dict[str, str], set[str]]:
    """{linear: modality} and the skipped 2-D tensors, from the model's own modules (not from the rules)."""
    groups = {n: "vision" for n in linears(model, "model.vision_tower.") if ".head." not in n}
    groups.update({n: "fusion" for n in linears(model, "model.multi_modal_projector.")})
    groups.update({n: "fusion" for n in linears(model, "model.language_model.layers.")})
    skipped = {n for n in linears(model, "model.vision_tower.head.")}
    skipped |= {n for n, p in model.named_parameters() if p.ndim == 2 and not n.endswith(".weight")}
    skipped |= {n.removesuffix(".weight") for n, p in model.named_parameters() if "embed" in n and p.ndim == 2}
    return groups, skipped


def test_preset_groups_every_layout(vlm, tmp_path, capsys):
    from multiflow.cli import main

    folder, model, _ = vlm
    name = model.config.model_type
    saved = keys_of(folder)
    assert any(k.startswith("language_model.model.layers.") for k in saved)  # 5.x saves the old-style keys
    groups, skipped = expected_groups(model)
    head = {n for n in skipped if ".head." in n}
    assert bool(head) == (name in SIGLIP_FAMILIES)  # SigLIP keeps its pooling head (vision_use_head=True)
    if name == "gemma3":
        assert "model.multi_modal_projector.mm_input_projection_weight" in skipped
        assert not linears(model, "model.multi_modal_projector.")  # its only projection is the bare parameter
    tied = "language_model.lm_head.weight" not in saved
    assert tied == (model.lm_head.weight is model.model.language_model.embed_tokens.weight)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()
             if not (tied and k == "lm_head.weight")}
    config = model.config.to_dict()
    hub = write(tmp_path / "hub", {hub_key(k, name): v for k, v in state.items()}, config)
    in_memory = write(tmp_path / "in-memory", state, config)
    reference = None
    for where in (folder, hub, in_memory):
        inv = layers.from_checkpoint(where)
        assert inv.family.name == name and inv.rules.modalities == ("vision", "text", "fusion")
        got = {l.name: l.modality for l in inv.layers}
        assert got == groups, where
        assert {n for n, _, _ in inv.skipped} == skipped | (set() if tied else {"lm_head"}), where
        for n, numel, rule in inv.skipped:
            assert rule.why and numel == model.get_parameter(n if n in dict(model.named_parameters())
                                                             else n + ".weight").numel()
        listed = [(l.name, l.modality, l.shape) for l in inv.layers]
        assert reference is None or listed == reference
        reference = listed
    assert main(["modalities", "--model", str(folder)]) == 0
    shown = capsys.readouterr().out
    assert f"rules: {name}" in shown and all(rule.why in shown for _, _, rule in inv.skipped)
    module = layers.from_module(model)
    assert [(l.name, l.modality, l.shape) for l in module.layers] == reference
    linear_only = {n for n in skipped if "embed" not in n}  # an nn.Module's candidates are its nn.Linear modules
    assert {n for n, _, _ in module.skipped} == linear_only | {"lm_head"}


def test_dead_vision_layers_follow_the_feature_layer(vlm):
    folder, model, _ = vlm
    inv = layers.from_checkpoint(folder)
    layer = getattr(model.config, "vision_feature_layer", None)
    if inv.family.feature_layer_key is None:  # Gemma 3 and PaliGemma read the last layer (post-layernormed)
        assert layer is None and inv.dead_layers() == []
        return
    last = {l.name for l in inv.layers if l.modality == "vision" and ".1." in l.name and "projector" not in l.name}
    assert last and inv.dead_layers() == ([l.name for l in inv.layers if l.name in last] if layer == -2 else [])
    assert (layer == -2) == (model.config.model_type == "llava_onevision")  # the one built with -2


def encoded(processor, samples, image_token: int) -> tuple[int, int]:
    """(prompt tokens, image tokens) of `samples` as Step 2 encodes them, in batches of 2."""
    from multiflow.models.prompts import build_prompt

    tokens = images = 0
    for i in range(0, len(samples), 2):
        batch = samples[i:i + 2]
        out = processor(images=[[s.image] for s in batch], text=[build_prompt(processor, s.question, None)
                                                                 for s in batch], return_tensors="pt", padding=True)
        tokens += int(out["attention_mask"].sum())
        images += int((out["input_ids"] == image_token).sum())
    return tokens, images


def test_calibrate_prune_load_eval(vlm, jsonl, tmp_path):
    from transformers import AutoModelForImageTextToText

    from multiflow.calibration.data import load_samples
    from multiflow.models.loading import load_model

    folder, model, processor = vlm
    name = model.config.model_type
    inv = layers.from_checkpoint(folder)
    loaded = load_model(folder, inv)
    image_token = model.config.image_token_id
    assert loaded.image_token_id == image_token
    if name == "paligemma":  # no chat template: the family's (the question, then "\n" from the processor)
        from multiflow.models.prompts import build_prompt, chat_template

        assert loaded.processor.chat_template == chat_template(inv.family.prompt)

        assert build_prompt(loaded.processor, "Why?", None) == "Why?"
        assert build_prompt(loaded.processor, "Why?", "blue") == "Why?\nblue"
    dist = multiflow.compute_distribution(folder, 0.5)  # Step 1: the checkpoint and the module agree
    assert dist.layer_sparsity == multiflow.compute_distribution(model, 0.5).layer_sparsity
    assert set(dist.layers) == {l.name for l in inv.layers} and dist.modalities == ("vision", "text", "fusion")
    assert sum(s.pruned for s in dist.layers.values()) == pytest.approx(0.5 * sum(s.numel for s in dist.layers.values()),
                                                                        abs=len(dist.layers))
    common = dict(model=folder, data=jsonl, nsamples=3, batch_size=2, split_token_types=True)
    blocks, meta = calibrate(CalibrationConfig(output=tmp_path / "b.safetensors", **common), False)
    whole, _ = calibrate(CalibrationConfig(output=tmp_path / "w.safetensors", whole_model=True, **common), False)
    assert meta["execution"].startswith("block by block") and set(blocks) == {l.name for l in inv.layers}
    for layer, st in whole.items():
        assert blocks[layer].tokens == st.tokens > 0, layer
        assert torch.equal(blocks[layer].sq_mean, st.sq_mean), layer  # bit for bit
    hub = hub_copy(folder, tmp_path / "hub")  # the 4.x hub layout, block by block: the same statistics
    from_hub, _ = calibrate(CalibrationConfig(output=tmp_path / "h.safetensors", **{**common, "model": hub}), False)
    assert all(torch.equal(from_hub[layer].sq_mean, st.sq_mean) for layer, st in blocks.items())
    samples, _ = load_samples(jsonl, 3, 0)
    tokens, images = encoded(loaded.processor, samples, image_token)
    assert images > 0
    for layer in (l.name for l in inv.layers if l.name.startswith("model.language_model.")):
        st = blocks[layer]
        assert st.tokens == tokens and st.by_type["image"][1] == images and st.by_type["text"][1] == tokens - images

    out = tmp_path / "pruned"
    report = multiflow.prune(folder, out, 0.5, stats=tmp_path / "b.safetensors")
    assert keys_of(out) == keys_of(folder)  # same keys and shapes: a tied lm_head stays absent
    why = {s["name"]: s["why"] for s in report["skipped"]}
    assert set(why) == {n for n, _, _ in inv.skipped}
    if name in SIGLIP_FAMILIES:
        assert why["model.vision_tower.head.mlp.fc1"] == "SigLIP pooling head: its output is never read"
    if name == "gemma3":
        assert "bare projection" in why["model.multi_modal_projector.mm_input_projection_weight"]
    pruned = AutoModelForImageTextToText.from_pretrained(out).eval()
    dense = dict(model.named_parameters())
    for layer, entry in report["layers"].items():
        weight = pruned.get_parameter(layer + ".weight")
        assert int((weight == 0).sum()) == entry["pruned"] > 0, layer
        kept = weight != 0
        assert torch.equal(weight[kept], dense[layer + ".weight"][kept]), layer
    for n, _, _ in inv.skipped:  # never touched
        key = n if n in dense else n + ".weight"
        assert torch.equal(pruned.get_parameter(key), dense[key]), n
    assert report["global"]["achieved_sparsity"] == pytest.approx(0.5, abs=0.01)

    results = evaluate(EvalConfig(model=out, reference=folder, data=jsonl, nsamples=2, max_new_tokens=2),
                       progress=False)
    assert results["nsamples"] == 2 and results["kl"] > 0 and 0 <= results["top1_agreement"] <= 1
    assert all(isinstance(item["prediction"], str) for item in results["items"])


def sparse_checkpoint(folder: Path, tensors: dict[str, list], dtype: str, config: dict) -> Path:
    """A safetensors file with these keys and shapes whose data is a hole (a sparse file: headers are all that
    Step 1 reads), and the config."""
    import struct

    folder.mkdir()
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, (shape, _) in tensors.items():
        size = 2 * int(torch.tensor(shape).prod())  # 2 bytes: BF16
        header[key] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(folder / "model.safetensors", "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        f.truncate(8 + len(raw) + offset)
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("fixture", [LAYOUTS / f"{name}.json" for name in LAYOUT_FIXTURES], ids=lambda p: p.stem)
def test_real_layouts_get_their_groups(fixture, tmp_path):
    """Public checkpoints' key names and shapes (tests/fixtures/layouts: where each came from is in the file):
    every key gets its group through the preset and renames, and names a parameter of the model transformers
    builds from the checkpoint's config, with that shape."""
    from transformers import AutoConfig, AutoModelForImageTextToText

    doc = json.loads(fixture.read_text())
    config, tensors = doc["config"], doc["tensors"]
    assert doc["dtype"] == "BF16" and {group for _, group in tensors.values()} >= {"vision", "fusion", "skip", "other"}
    inv = layers.from_checkpoint(sparse_checkpoint(tmp_path / "ckpt", tensors, doc["dtype"], config))
    assert inv.family is family_for(config) and inv.family.name == config["model_type"]
    found = {l.name: (l.modality, list(l.shape)) for l in inv.layers}
    skipped = {name for name, _, _ in inv.skipped}
    with torch.device("meta"):
        model = AutoModelForImageTextToText.from_config(AutoConfig.for_model(**config))
    params = {n: list(p.shape) for n, p in model.named_parameters(remove_duplicate=False)}
    other = 0
    for key, (shape, group) in tensors.items():
        full = rename_key(key, inv.renames)  # the one rename of Step 1, loading and conversion
        name = full.removesuffix(".weight")
        assert params.get(full) == shape, key
        if group in ("vision", "fusion"):
            assert found.get(name) == (group, shape), key
        elif group == "skip":
            assert name in skipped and name not in found, key
        else:
            assert name not in found and name not in skipped, key
            other += int(torch.tensor(shape).prod())
    assert len(found) + len(skipped) == sum(group != "other" for _, group in tensors.values())
    assert inv.other_params == other


def test_a_pooling_head_made_prunable_is_refused_by_calibration_not_crashed(jsonl, tmp_path):
    """nn.MultiheadAttention reads out_proj.weight itself (no hook fires, and block by block its weight would
    still be on the meta device): a rules file that makes SigLIP's head prunable gets an error naming the layer
    in both calibration modes, and the head can still be pruned by magnitude."""
    from multiflow.errors import MultiflowError

    model, processor, _ = tiny("paligemma")
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    rules = tmp_path / "rules.yaml"
    rules.write_text("rules:\n  - {pattern: '^model\\.vision_tower\\.', group: vision}\n"
                     "  - {pattern: '^model\\.(multi_modal_projector|language_model\\.layers)\\.', group: fusion}\n")
    assert "model.vision_tower.head.attention.out_proj" in {l.name for l in layers.from_checkpoint(folder, rules).layers}
    for whole in (False, True):
        with pytest.raises(MultiflowError, match=r"layer model\.vision_tower\.head\.attention\.out_proj is the output "
                                                 r"projection of an nn\.MultiheadAttention.*--method magnitude"):
            calibrate(CalibrationConfig(model=folder, data=jsonl, nsamples=1, rules=rules, whole_model=whole,
                                        output=tmp_path / f"s{whole}.safetensors"), False)
    report = multiflow.prune(folder, tmp_path / "mag", 0.5, method="magnitude", rules=rules)
    assert report["layers"]["model.vision_tower.head.attention.out_proj"]["achieved_sparsity"] > 0
