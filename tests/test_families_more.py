"""More VLM families end to end: Qwen3-VL, Idefics3, SmolVLM, Mllama (Llama 3.2 Vision) and BLIP-2 (OPT).

Each is a tiny model built from its transformers config (2 layers, hidden 32) saved with a processor built
offline (a character-level tokenizer holding the family's special tokens, the PIL image processor, no chat
template: the family's prompt is used), then: Step 1 on the folder and on the module, calibration block by
block and whole-model, pruning, reloading with AutoModelForImageTextToText, eval against the dense model.
Also: processors without torchvision (their video processor left out) and a missing optional package as one
line, and the key layouts of real checkpoints (tests/fixtures/layouts) grouped by the presets.
"""

from __future__ import annotations

import json
import re
import string
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import multiflow
from multiflow.errors import MultiflowError
from multiflow.models import inventory as layers
from multiflow.models.families import family_by_name, family_for
from multiflow.models.prompts import build_prompt

FIXTURES = Path(__file__).parent / "fixtures" / "layouts"
FAMILIES = ["qwen3_vl", "idefics3", "smolvlm", "mllama", "blip-2", "blip-2-t5"]  # BLIP-2 with OPT, Flan-T5


def char_tokenizer(specials: list[str]):
    """Printable ASCII, one token per character, plus `specials` as whole tokens (ids in that order)."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for ch in sorted(set(string.printable) - set("\x0b\x0c\r")):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>",
                                        bos_token="<s>", eos_token="</s>")
    tokenizer.add_special_tokens({"additional_special_tokens": specials})
    return tokenizer


VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=2)


def _qwen3_vl():
    import transformers as tf
    from multiflow.models.processors import without_videos

    tok = char_tokenizer(["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|im_start|>",
                          "<|im_end|>"])
    ids = {t: tok.convert_tokens_to_ids(t) for t in ("<|image_pad|>", "<|video_pad|>", "<|vision_start|>",
                                                     "<|vision_end|>")}
    config = tf.Qwen3VLConfig(
        vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=32,
                           num_position_embeddings=16, deepstack_visual_indexes=[0]),
        text_config=dict(TEXT, vocab_size=len(tok), head_dim=16, pad_token_id=0,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                          "mrope_interleaved": True}),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"])
    images = tf.Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2,
                                         size={"shortest_edge": 16 * 16, "longest_edge": 16 * 16})
    processor = without_videos(tf.Qwen3VLProcessor)(image_processor=images, tokenizer=tok, video_processor=None)
    return tf.Qwen3VLForConditionalGeneration(config), processor


def _idefics3(kind: str):
    import transformers as tf
    from multiflow.models.processors import without_videos

    tok = char_tokenizer(["<image>", "<fake_token_around_image>", "<global-img>", "<end_of_utterance>",
                          "<|im_start|>"])
    config_class, model_class, processor_class = (
        (tf.Idefics3Config, tf.Idefics3ForConditionalGeneration, tf.Idefics3Processor) if kind == "idefics3" else
        (tf.SmolVLMConfig, tf.SmolVLMForConditionalGeneration, without_videos(tf.SmolVLMProcessor)))
    config = config_class(vision_config=dict(VISION, image_size=16, patch_size=4),
                          text_config=dict(TEXT, model_type="llama", vocab_size=len(tok), pad_token_id=0),
                          image_token_id=tok.convert_tokens_to_ids("<image>"), scale_factor=2)
    image_class = tf.Idefics3ImageProcessorPil if kind == "idefics3" else tf.SmolVLMImageProcessorPil
    images = image_class(do_image_splitting=False, size={"longest_edge": 16}, max_image_size={"longest_edge": 16})
    videos = {} if kind == "idefics3" else {"video_processor": None}  # SmolVLM's needs torchvision
    processor = processor_class(image_processor=images, tokenizer=tok, image_seq_len=4, **videos)  # (16/4)^2/2^2
    return model_class(config), processor


def _mllama():
    import transformers as tf

    tok = char_tokenizer(["<|image|>", "<|python_tag|>"])
    config = tf.MllamaConfig(
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                           attention_heads=2, vision_output_dim=64, image_size=16, patch_size=4, max_num_tiles=2,
                           intermediate_layers_indices=[0], supported_aspect_ratios=[[1, 1], [1, 2], [2, 1]]),
        text_config=dict(TEXT, vocab_size=len(tok), cross_attention_layers=[1], bos_token_id=2, eos_token_id=3,
                         pad_token_id=0),
        image_token_index=tok.convert_tokens_to_ids("<|image|>"))
    images = tf.MllamaImageProcessorPil(size={"height": 16, "width": 16}, max_image_tiles=2)
    return tf.MllamaForConditionalGeneration(config), tf.MllamaProcessor(image_processor=images, tokenizer=tok)


def _blip2(lm: str = "opt"):
    import transformers as tf

    tok = char_tokenizer(["<image>"])
    text = (dict(model_type="opt", hidden_size=32, num_hidden_layers=2, num_attention_heads=2, ffn_dim=64,
                 word_embed_proj_dim=32, bos_token_id=2) if lm == "opt" else
            dict(model_type="t5", d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, decoder_start_token_id=0))
    config = tf.Blip2Config(
        vision_config=dict(VISION, image_size=16, patch_size=4),
        qformer_config=dict(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                            intermediate_size=64, encoder_hidden_size=32, cross_attention_frequency=1),
        text_config=dict(text, vocab_size=len(tok), pad_token_id=0, eos_token_id=3),
        num_query_tokens=4, image_token_index=tok.convert_tokens_to_ids("<image>"))
    images = tf.BlipImageProcessorPil(size={"height": 16, "width": 16})
    return tf.Blip2ForConditionalGeneration(config), tf.Blip2Processor(image_processor=images, tokenizer=tok,
                                                                        num_query_tokens=4)


BUILDERS = {"qwen3_vl": _qwen3_vl, "idefics3": lambda: _idefics3("idefics3"), "smolvlm": lambda: _idefics3("smolvlm"),
            "mllama": _mllama, "blip-2": _blip2, "blip-2-t5": lambda: _blip2("t5")}
FAMILY = {name: name for name in BUILDERS} | {"blip-2-t5": "blip-2"}  # test model -> its family


def tiny(name: str, seed: int = 0):
    torch.manual_seed(seed)
    model, processor = BUILDERS[name]()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # per-tensor scales so layer sparsities differ
        for p in model.parameters():
            p.mul_(float(torch.empty(1).uniform_(0.3, 3.0, generator=g)))
    return model.eval(), processor


VIDEO_PROCESSORS = {"qwen3_vl": "Qwen3VLVideoProcessor", "smolvlm": "SmolVLMVideoProcessor"}


def save(name: str, model, processor, folder: Path) -> Path:
    """The model and its processor files; with the video processor's config the hub folders have (a processor
    built here without torchvision cannot write it)."""
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    if name in VIDEO_PROCESSORS:
        (folder / "video_preprocessor_config.json").write_text(json.dumps({
            "video_processor_type": VIDEO_PROCESSORS[name], "processor_class": type(processor).__name__}))
    return folder


@pytest.fixture(scope="module", params=FAMILIES)
def saved(request, tmp_path_factory):
    """(family name, folder, model, processor): a tiny model of the family saved by transformers 5 with its
    processor files (and a video processor config, as hub folders have, that multiflow does not need)."""
    model, processor = tiny(request.param)
    folder = save(request.param, model, processor, tmp_path_factory.mktemp(request.param) / "model")
    return request.param, folder, model, processor


def keys_of(folder: Path) -> list[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return list(f.keys())


# --- Step 1: presets and layouts ------------------------------------------------------------------

EXPECTED = {  # a module of each kind -> its group
    "qwen3_vl": {"model.visual.blocks.0.attn.qkv": "vision", "model.visual.blocks.1.mlp.linear_fc2": "vision",
                 "model.visual.merger.linear_fc1": "fusion", "model.visual.deepstack_merger_list.0.linear_fc2": "fusion",
                 "model.language_model.layers.0.self_attn.q_proj": "fusion",
                 "model.language_model.layers.1.mlp.down_proj": "fusion"},
    "idefics3": {"model.vision_model.encoder.layers.0.self_attn.q_proj": "vision",
                 "model.vision_model.encoder.layers.1.mlp.fc2": "vision",
                 "model.connector.modality_projection.proj": "fusion",
                 "model.text_model.layers.1.self_attn.o_proj": "fusion"},
    "mllama": {"model.vision_model.transformer.layers.0.self_attn.q_proj": "vision",
               "model.vision_model.global_transformer.layers.0.mlp.fc1": "vision",
               "model.multi_modal_projector": "fusion",
               "model.language_model.layers.1.cross_attn.k_proj": "fusion",
               "model.language_model.layers.0.mlp.gate_proj": "fusion"},
    "blip-2": {"vision_model.encoder.layers.0.self_attn.qkv": "vision",
               "qformer.encoder.layer.0.crossattention.attention.key": "fusion",
               "qformer.encoder.layer.1.output_query.dense": "fusion", "language_projection": "fusion",
               "language_model.model.decoder.layers.0.fc1": "fusion"},
}
EXPECTED["smolvlm"] = EXPECTED["idefics3"]
EXPECTED["blip-2-t5"] = {"qformer.encoder.layer.0.attention.attention.query": "fusion",
                         "language_model.encoder.block.0.layer.0.SelfAttention.q": "fusion",
                         "language_model.decoder.block.1.layer.1.EncDecAttention.k": "fusion",
                         "language_model.decoder.block.1.layer.2.DenseReluDense.wo": "fusion"}


def test_step1_on_the_folder_equals_the_module(saved):
    name, folder, model, _ = saved
    inv = layers.from_checkpoint(folder)
    assert inv.family.name == FAMILY[name] and inv.rules.modalities == ("vision", "text", "fusion")
    groups = {layer.name: layer.modality for layer in inv.layers}
    for module, group in EXPECTED[name].items():
        assert groups[module] == group, module
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    assert set(groups) == {n for n in linears if not n.endswith("lm_head")}  # every linear but the head
    if name == "blip-2":  # OPT's head is tied to its embeddings: not in the checkpoint (block loading reads it)
        assert "language_model.lm_head.weight" not in keys_of(folder)
    assert inv.dead_layers() == []  # the last vision layer feeds the model in all five
    in_memory = multiflow.compute_distribution(model, 0.5)
    assert multiflow.compute_distribution(folder, 0.5).layers == in_memory.layers
    assert {s.modality for s in in_memory.layers.values()} == {"vision", "fusion"}


def test_every_layout_gives_the_same_module_names(saved, tmp_path):
    """5.x save_pretrained names, in-memory names and (mllama) the 4.x hub names all land on the same modules."""
    from conftest import write_checkpoint

    name, folder, model, _ = saved
    reference = [(l.name, l.modality) for l in layers.from_checkpoint(folder).layers]
    sd = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    layouts = {"inmemory": sd}
    if name == "mllama":  # 4.x hub names == 5.24 save names; the in-memory ones differ
        assert any(k.startswith("language_model.model.layers.") for k in keys_of(folder))
    if name in ("idefics3", "smolvlm"):  # a bare Idefics3Model / SmolVLMModel saved on its own
        layouts["base"] = {k.removeprefix("model."): v for k, v in sd.items() if k.startswith("model.")}
    for layout, tensors in layouts.items():
        other = write_checkpoint(tmp_path / layout, tensors, model.config.to_dict())
        assert [(l.name, l.modality) for l in layers.from_checkpoint(other).layers] == reference, layout


# --- Steps 2 and 3, reload, eval ----------------------------------------------------------------------

# 2x2 merged 4x4 patches (Qwen3-VL), 4x4 patches pixel-shuffled by 2 (Idefics3, SmolVLM), one <|image|> per image
# (Mllama: cross-attention), the query tokens (BLIP-2)
IMAGE_TOKENS = {"qwen3_vl": 4, "idefics3": 4, "smolvlm": 4, "mllama": 1, "blip-2": 4, "blip-2-t5": 4}


def test_prompt_without_chat_template_is_the_familys(saved):
    from multiflow.models.loading import load_model

    name, folder, _, processor = saved
    loaded = load_model(folder, layers.from_checkpoint(folder))
    prompt = build_prompt(loaded.processor, "What?", None)
    assert prompt == family_by_name(FAMILY[name]).prompt.format(question="What?")
    assert build_prompt(loaded.processor, "What?", "a cat") == prompt + " a cat"
    # the image tokens the model replaces by image features: as many as the features of one 16x16 image
    from PIL import Image

    inputs = loaded.processor(images=[[Image.new("RGB", (16, 16), (9, 99, 199))]], text=[prompt], return_tensors="pt")
    image_tokens = int((inputs["input_ids"] == loaded.image_token_id).sum())
    assert image_tokens == IMAGE_TOKENS[name]


def test_family_prompt_as_chat_template_places_the_answer():
    """`chat_template`: the answer after a space, or after the join of a prompt ending `{question}<join>{answer}`
    (PaliGemma's: the prompt ends at the question); a prompt without one `{question}`, or with `{answer}`
    elsewhere than at its end, is refused."""
    from multiflow.models.prompts import chat_template

    tokenizer = char_tokenizer([])

    def render(prompt: str, answer: str | None) -> str:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Why?"}]}]
        if answer is not None:
            conversation.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        return tokenizer.apply_chat_template(conversation, chat_template=chat_template(prompt), tokenize=False,
                                             add_generation_prompt=answer is None)

    assert render("Q:\n{question}\nA:", None) == "Q:\nWhy?\nA:"
    assert render("Q:\n{question}\nA:", "blue") == "Q:\nWhy?\nA: blue"
    assert render("{question}\n{answer}", None) == "Why?"
    assert render("<{question}>\n{answer}", "blue") == "<Why?>\nblue"
    for wrong in ("no question", "{question} {question}", "{answer} {question}", "{question} {answer} A:"):
        with pytest.raises(ValueError, match="needs one"):
            chat_template(wrong)


def test_end_to_end(saved, jsonl, tmp_path):
    from transformers import AutoModelForImageTextToText

    from multiflow.evaluation.evaluate import EvalConfig, evaluate
    from multiflow.storage.stats_file import load_stats

    name, folder, model, _ = saved
    blocks, whole = tmp_path / "blocks.safetensors", tmp_path / "whole.safetensors"
    multiflow.calibrate(folder, blocks, data=jsonl, nsamples=3, batch_size=2, split_token_types=True)
    multiflow.calibrate(folder, whole, data=jsonl, nsamples=3, batch_size=2, split_token_types=True,
                        whole_model=True)
    by_block, meta = load_stats(blocks)[:2]
    by_model = load_stats(whole)[0]
    assert meta["execution"].startswith("block by block") and set(by_block) == set(by_model)
    inv = layers.from_checkpoint(folder)
    assert set(by_block) == {layer.name for layer in inv.layers}
    family = family_by_name(FAMILY[name])
    for layer, st in by_block.items():
        other = by_model[layer]
        assert st.tokens == other.tokens and st.tokens > 0, layer
        torch.testing.assert_close(st.sq_mean, other.sq_mean, rtol=1e-4, atol=1e-6)
        if re.search(family.aligned_layers, layer):  # prompt-aligned: image and text tokens told apart
            image, text = st.by_type["image"][1], st.by_type["text"][1]
            assert image > 0 and text > 0 and image + text == st.tokens, layer

    report = multiflow.prune(folder, tmp_path / "pruned", 0.5, stats=blocks)
    pruned = AutoModelForImageTextToText.from_pretrained(tmp_path / "pruned").eval()
    assert type(pruned) is type(model)
    dense, sparse = model.state_dict(), pruned.state_dict()
    for layer, info in report["layers"].items():
        weight = sparse[layer + ".weight"]
        assert int((weight == 0).sum()) == info["pruned"] > 0, layer
        kept = weight != 0
        assert torch.equal(weight[kept], dense[layer + ".weight"][kept]), layer
    untouched = [k for k in dense if k.removesuffix(".weight") not in report["layers"]]
    assert all(torch.equal(dense[k], sparse[k]) for k in untouched)

    result = evaluate(EvalConfig(model=tmp_path / "pruned", data=jsonl, nsamples=2, batch_size=2, max_new_tokens=2,
                                 reference=folder), progress=False)
    assert result["count"] == 2 and all(isinstance(x["prediction"], str) for x in result["items"])
    assert all(x["answer_tokens"] > 0 for x in result["items"]) and result["kl"] > 0
    assert all(x["prediction"] for x in result["items"])  # generated tokens, not the prompt's tail


# --- processors without optional packages ---------------------------------------------------------------

@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Saved tiny models of two families whose processors want optional packages (Qwen3-VL: torchvision for
    its video processor; SmolVLM: torchvision and num2words)."""
    out = {}
    for name in ("qwen3_vl", "smolvlm"):
        out[name] = save(name, *tiny(name), tmp_path_factory.mktemp(name) / "model")
    return out


def test_processor_without_torchvision_leaves_out_its_video_processor(folders, monkeypatch):
    import importlib.util

    import transformers.utils
    from transformers import AutoProcessor

    from multiflow.models.processors import NoVideoProcessor, load_processor

    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: False)  # as here, wherever run
    if importlib.util.find_spec("torchvision") is None:  # what users without torchvision met before
        with pytest.raises(ImportError, match="Torchvision"):
            AutoProcessor.from_pretrained(folders["qwen3_vl"])
    for name, folder in folders.items():
        processor = load_processor(folder)
        assert type(processor).__name__ == {"qwen3_vl": "Qwen3VLProcessor", "smolvlm": "SmolVLMProcessor"}[name]
        assert isinstance(processor.video_processor, NoVideoProcessor)
        with pytest.raises(MultiflowError, match="torchvision.*pip install torchvision"):
            processor.video_processor(videos=[])
        if importlib.util.find_spec("torchvision") is None:
            assert type(processor.image_processor).__name__.endswith("Pil")  # transformers' PIL/numpy one
    assert load_processor(folders["smolvlm"]).image_seq_len == 4  # the folder's settings are kept


def test_a_missing_optional_package_is_one_line(folders, jsonl, tmp_path, monkeypatch, capsys):
    import importlib.util

    import transformers
    import transformers.models.smolvlm.processing_smolvlm as smolvlm
    from transformers.utils.import_utils import TORCHVISION_IMPORT_ERROR

    from multiflow.cli import main
    from multiflow.models.processors import load_processor, missing_package

    monkeypatch.setattr(smolvlm, "num2words", None)  # as if num2words were not installed
    with pytest.raises(MultiflowError, match=r"needs the Python package num2words.*: pip install num2words$") as err:
        load_processor(folders["smolvlm"])
    assert "\n" not in str(err.value) and str(folders["smolvlm"]) in str(err.value)
    assert main(["calibrate", "--model", str(folders["smolvlm"]), "--data", str(jsonl), "--nsamples", "1",
                 "--output", str(tmp_path / "s.safetensors")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "pip install num2words" in lines[0] and "Traceback" not in lines[0]
    assert not (tmp_path / "s.safetensors").exists()

    def needs_torchvision(*args, **kwargs):  # a processor that has no way around torchvision
        raise ImportError(TORCHVISION_IMPORT_ERROR.format("SomeProcessor"))

    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", needs_torchvision)
    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    with pytest.raises(MultiflowError, match=r"needs the Python package torchvision, which is not installed: "
                                             r"pip install torchvision") as err:
        load_processor(folders["qwen3_vl"])
    assert "\n" not in str(err.value)
    monkeypatch.undo()
    if importlib.util.find_spec("torchvision") is None:  # Pixtral's processor has no way around torchvision
        pixtral = tmp_path / "pixtral"
        pixtral.mkdir()
        (pixtral / "processor_config.json").write_text(json.dumps({"processor_class": "PixtralProcessor"}))
        with pytest.raises(MultiflowError, match=r"needs the Python package torchvision, which is not installed"):
            load_processor(pixtral)
    assert missing_package(ModuleNotFoundError("No module named 'timm.layers'", name="timm.layers")) == "timm"
    assert missing_package(ModuleNotFoundError("No module named 'google'", name="google.protobuf")) == "protobuf"
    assert missing_package(ImportError("something else broke")) is None


# --- real checkpoints' key layouts --------------------------------------------------------------------

@pytest.mark.parametrize("fixture,expected_family", [("qwen2_5_vl_7b", "qwen2_vl"), ("smolvlm_256m", "smolvlm")])
def test_real_layout_keys_land_on_the_model_built_from_its_config(fixture, expected_family):
    """Each recorded key of the public checkpoint, renamed by the preset, is a parameter of the transformers 5
    model built from the checkpoint's config (on the meta device) with the recorded shape, and its group is
    the one expected."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForImageTextToText

    from multiflow.models.families import rename_key

    data = json.loads((FIXTURES / f"{fixture}.json").read_text())
    assert data["source"] and data["model"]
    family = family_for(data["config"])
    assert family is not None and family.name == expected_family
    config = dict(data["config"])
    config = AutoConfig.for_model(config.pop("model_type"), **config)
    with init_empty_weights(include_buffers=False):
        model = AutoModelForImageTextToText.from_config(config)
    params = dict(model.named_parameters())
    for key, shape in data["tensors"].items():
        name = rename_key(key, family.renames)  # the one rename of Step 1, loading and conversion
        assert name in params and list(params[name].shape) == shape, (key, name)
        if key.endswith(".weight") and len(shape) == 2:
            rule = family.rules.classify(name.removesuffix(".weight"))
            assert rule is not None, key  # every linear weight has a group
            if key in data["groups"]:
                assert rule.group == data["groups"][key], key
    assert set(data["groups"]) <= set(data["tensors"])
