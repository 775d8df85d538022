"""Modality rules as data: presets per family, user rules files, unmatched layers."""

import json

import pytest
import torch
from torch import nn

import multiflow
from multiflow.models import inventory as layers
from multiflow.models.families import FAMILIES, family_by_name, family_for, load_rules_file


def test_family_detection_from_config():
    assert family_for({"model_type": "llava"}).name == "llava"
    assert family_for({"model_type": "llava", "mm_vision_tower": "x"}).name == "llava-original"
    assert family_for({"model_type": "llama", "architectures": ["LlavaLlamaForCausalLM"]}).name == "llava-original"
    assert family_for({"model_type": "llava_llama"}).name == "llava-original"
    assert family_for({"model_type": "qwen2_5_vl"}).name == "qwen2_vl"
    assert family_for({"model_type": "gpt2"}) is None
    assert len({f.name for f in FAMILIES}) == len(FAMILIES)


def _tiny(kind):
    import transformers as tf

    if kind == "llava_next":
        cfg = tf.LlavaNextConfig(
            vision_config=tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                              num_attention_heads=2, image_size=16, patch_size=8),
            text_config=tf.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                       num_attention_heads=2, num_key_value_heads=2, vocab_size=40),
            image_token_index=39, image_grid_pinpoints=[[16, 16]])
        return tf.LlavaNextForConditionalGeneration(cfg)
    if kind == "qwen2_vl":
        cfg = tf.Qwen2VLConfig(
            vision_config={"depth": 1, "embed_dim": 16, "hidden_size": 16, "num_heads": 2, "mlp_ratio": 2,
                           "patch_size": 4, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3},
            text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "num_key_value_heads": 2, "vocab_size": 40,
                         "rope_scaling": {"type": "mrope", "mrope_section": [1, 1, 2]}},
        )
        return tf.Qwen2VLForConditionalGeneration(cfg)
    if kind == "blip":
        cfg = tf.BlipConfig(
            vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                           "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
            text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                         "num_attention_heads": 2, "vocab_size": 40, "encoder_hidden_size": 16},
            projection_dim=8)
        return tf.BlipForQuestionAnswering(cfg)
    if kind == "dual_encoder":
        cfg = tf.VisionTextDualEncoderConfig.from_vision_text_configs(
            tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                                image_size=16, patch_size=8),
            tf.BertConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                          vocab_size=40), projection_dim=8)
        return tf.VisionTextDualEncoderModel(cfg)
    cfg = tf.CLIPConfig(
        vision_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                       "num_attention_heads": 2, "image_size": 16, "patch_size": 8},
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 1,
                     "num_attention_heads": 2, "vocab_size": 40},
        projection_dim=8)
    return tf.CLIPModel(cfg)


@pytest.mark.parametrize("kind,modalities", [
    ("llava_next", {"vision", "fusion"}),
    ("qwen2_vl", {"vision", "fusion"}),
    ("blip", {"vision", "text"}),
    ("clip", {"vision", "text"}),
    ("dual_encoder", {"vision", "text"}),
])
def test_other_families_in_memory_and_saved(kind, modalities, tmp_path):
    torch.manual_seed(0)
    model = _tiny(kind)
    in_memory = multiflow.compute_distribution(model, 0.5)
    assert {s.modality for s in in_memory.layers.values()} == modalities
    model.save_pretrained(tmp_path)
    on_disk = multiflow.compute_distribution(tmp_path, 0.5)
    assert on_disk.layers == in_memory.layers


def test_unmatched_linear_is_an_error_naming_it():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.vision = nn.Linear(4, 4)
            self.mystery = nn.Linear(4, 4)

    rules = multiflow.models.families.ModalityRules(
        "t", ("vision",), (multiflow.models.families.Rule(r"^vision$", "vision"),))
    with pytest.raises(multiflow.MultiflowError, match="mystery"):
        multiflow.compute_distribution(Odd(), 0.5, rules)


def test_unknown_architecture_needs_rules():
    with pytest.raises(multiflow.MultiflowError, match="--rules"):
        multiflow.compute_distribution(nn.Sequential(nn.Linear(2, 2)), 0.5)


@pytest.mark.parametrize("suffix", [".yaml", ".json"])
def test_rules_file_overrides_preset(llava, tmp_path, suffix):
    _, folders = llava
    rules = {
        "modalities": ["vision", "text", "fusion"],
        "rules": [
            {"pattern": r"^model\.vision_tower\.", "group": "vision"},
            {"pattern": r"^model\.multi_modal_projector\.", "group": "skip", "why": "keep projector dense"},
            {"pattern": r"^model\.language_model\.", "group": "text"},
        ],
    }
    path = tmp_path / f"rules{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(rules))
    else:
        import yaml

        path.write_text(yaml.safe_dump(rules))
    dist = multiflow.compute_distribution(folders["hub4"], 0.5, path)
    assert not any("projector" in n for n in dist.layers)
    assert {s.modality for s in dist.layers.values()} == {"vision", "text"}
    inv = layers.from_checkpoint(folders["hub4"], path)
    assert any(rule.why == "keep projector dense" for _, _, rule in inv.skipped)


@pytest.mark.parametrize("content,message", [
    ("rules: []", "non-empty"),
    ("rules: [{pattern: 'a'}]", "pattern' and 'group"),
    ("rules: [{pattern: 'a', group: audio}]", "audio"),
    ("rules: [{pattern: '(', group: vision}]", "regular expression"),
    ("rules: [{pattern: 'a', group: vision}]\nmodalities: [text]", "modalities"),
    ("rules: [", "not valid"),
])
def test_bad_rules_files(tmp_path, content, message):
    path = tmp_path / "r.yaml"
    path.write_text(content)
    with pytest.raises(multiflow.MultiflowError, match=message):
        load_rules_file(path)


def test_llava_next_is_llava_with_its_own_markers():
    from dataclasses import replace

    llava, llava_next = family_by_name("llava"), family_by_name("llava_next")
    assert llava_next.model_types == ("llava_next",) and llava_next.rules.rules == llava.rules.rules
    assert replace(llava_next, rules=replace(llava_next.rules, name="llava"), model_types=llava.model_types,
                   architectures=llava.architectures) == llava


def test_family_names_appear_only_in_the_family_table():
    """No `if family == "llava-original"` in an algorithm: family knowledge is data (models/families.py), plus
    the converter registry of models/loading.py."""
    from pathlib import Path

    src = Path(__file__).resolve().parent.parent / "src" / "multiflow"
    for path in src.rglob("*.py"):
        if path.name == "families.py":
            continue
        for line in path.read_text().splitlines():
            if '"llava-original"' in line or "'llava-original'" in line:
                assert path.name == "loading.py" and line.startswith("_CONVERTERS"), f"{path}: {line.strip()}"
