"""Rules files say everything a preset says (fields validated at load, `base:`), renames applied by one function in
every step (a `$`-anchored rename through distribute, calibrate, prune, run and eval), and the fixes named when
--split-token-types or a padded batch has no language-model layers to apply to."""

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file, save_file

from multiflow.cli import main
from multiflow.errors import MultiflowError
from multiflow.models import inventory as layers
from multiflow.models.families import family_by_name, load_rules_file, rename_key
from multiflow.models.prompts import build_prompt


def _rules(tmp_path, text, name="rules.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_rename_key_applies_to_the_module_path_and_keeps_the_parameter_name():
    renames = (("^proj$", "model.projector"), ("^image_newline$", "model.image_newline"), (r"^a\.", "b."))
    assert rename_key("proj.weight", renames) == "model.projector.weight"
    assert rename_key("proj.bias", renames) == "model.projector.bias"
    assert rename_key("image_newline", renames) == "model.image_newline"  # no dot: the key is its own module path
    assert rename_key("a.x.weight", renames) == "b.x.weight"
    assert rename_key("proj.inner.weight", renames) == "proj.inner.weight"  # `$` anchors the module path
    assert rename_key("other.weight", renames) == "other.weight"
    prefix = ((r"^model\.(embed_tokens|norm)\.", r"model.language_model.\1."),)  # a prefix with its dot
    assert rename_key("model.norm.weight", prefix) == "model.language_model.norm.weight"
    assert rename_key("model.embed_tokens.x.weight", prefix) == "model.language_model.embed_tokens.x.weight"


def test_base_preset_with_fields_overridden(tmp_path):
    path = _rules(tmp_path, "base: llava\naligned_layers: '^model\\.language_model\\.layers\\.'\n"
                            "image_token: '<image>'\nprompt: 'Q: {question} A:'\n")
    family, llava = load_rules_file(path), family_by_name("llava")
    assert family.rules.rules == llava.rules.rules and family.rules.modalities == llava.rules.modalities
    assert family.name == "file:rules.yaml" and family.renames == llava.renames
    assert family.aligned_layers == r"^model\.language_model\.layers\."
    assert (family.image_token, family.image_token_id, family.prompt) == ("<image>", None, "Q: {question} A:")
    assert family.prompt_replaces_chat_template and not llava.prompt_replaces_chat_template
    assert family.feature_layer_key == llava.feature_layer_key  # the rest is the preset's


def test_without_base_the_detected_preset_is_the_start(tmp_path):
    path = _rules(tmp_path, "rules: [{pattern: '^model\\.', group: text}]\ntask: text-generation\n")
    assert load_rules_file(path).naming == "checkpoint" and load_rules_file(path).aligned_layers is None
    family = load_rules_file(path, family_by_name("qwen2_vl"))
    assert family.aligned_layers == family_by_name("qwen2_vl").aligned_layers and family.text_only
    assert family.rules.modalities == ("text",)


@pytest.mark.parametrize("content,field", [
    ("rules: [{pattern: a, group: vision}]\nalinged_layers: x", "'alinged_layers' is not a rules-file field"),
    ("base: lava", "'base' 'lava' is not a preset"),
    ("base: llava\naligned_layers: '('", "'aligned_layers' '(' is not a valid regular expression"),
    ("base: llava\nimage_token_id: -1", "'image_token_id' -1 must be a token id"),
    ("base: llava\nimage_token_id: true", "'image_token_id' True must be a token id"),
    ("base: llava\nimage_token_id: 3\nimage_token: '<image>'", "'image_token_id' and 'image_token' both"),
    ("base: llava\nimage_token: ''", "'image_token' must be a non-empty string"),
    ("base: llava\nprompt: 'no question'", "'prompt' must be a string with one {question}"),
    ("base: llava\nprompt: '{question} {question}'", "'prompt' must be a string with one {question}"),
    ("base: llava\nprompt: '{answer} {question}'", "{answer} only at its end"),
    ("base: llava\nprompt: 3", "'prompt' must be a string"),
    ("base: llava\nprompt_template: 'Q {question}'", "'prompt_template' is not a rules-file field"),
    ("base: llava\ntask: vqa", "'task' 'vqa' is not one of"),
    ("base: llava\ntask: retrieval", "'retrieval_head' is needed with task retrieval"),
    ("base: clip\nretrieval_head: itc", "'retrieval_head' 'itc' is not one of"),
    ("base: llava\nvision_layer_pattern: 'layers\\.\\d+'", "'vision_layer_pattern' needs a group"),
    ("base: llava\nrenames: [['a']]", "'renames' must be a list of [pattern, replacement] pairs"),
    ("base: llava\nrenames: [['(', 'b']]", "'renames' '(' is not a valid regular expression"),
    ("base: llava\nmodalities: vision", "'modalities' must be a list"),
    ("base: llava-original\nrenames: [['^a$', 'b']]", "'renames' does not apply to a llava-original checkpoint"),
    ("rules: [{pattern: a, group: audio}]", "group 'audio' is not one of"),
])
def test_bad_fields_are_one_line_errors_naming_file_and_field(tmp_path, content, field):
    path = _rules(tmp_path, content)
    with pytest.raises(MultiflowError) as info:
        load_rules_file(path)
    message = str(info.value)
    assert message.startswith(f"rules file {path}") and field in message and "\n" not in message


def test_prompt_fills_the_family_prompt_and_replaces_the_chat_template(tmp_path):
    """A rules file's prompt is the family's `prompt` (one field, one chat template: `prompts.chat_template`); unlike a
    preset's, it replaces a processor's own chat template."""
    from multiflow.models.loading import use_family_prompt

    class Processor:
        chat_template = "{{ 'own' }}"

        def apply_chat_template(self, conversation, add_generation_prompt, tokenize):
            from transformers.utils.chat_template_utils import render_jinja_template

            return render_jinja_template([conversation], chat_template=self.chat_template)[0][0]

    preset = family_by_name("paligemma")  # a preset's prompt: only without a chat template
    kept = Processor()
    use_family_prompt(kept, preset)
    assert build_prompt(kept, "why?", None) == "own"
    file = load_rules_file(_rules(tmp_path, "base: paligemma\nprompt: 'Q {question} A:'\n"))
    replaced = Processor()
    use_family_prompt(replaced, file)
    assert build_prompt(replaced, "why?", None) == "Q why? A:"
    assert build_prompt(replaced, "why?", "no") == "Q why? A: no"
    joined = Processor()
    use_family_prompt(joined, load_rules_file(_rules(tmp_path, "base: llava\nprompt: \"{question}\\n{answer}\"\n",
                                                     "j.yaml")))
    assert build_prompt(joined, "why?", "no") == "why?\nno"
    inherited = load_rules_file(_rules(tmp_path, "base: paligemma\naligned_layers: null\n", "i.yaml"))
    assert inherited.prompt == preset.prompt and not inherited.prompt_replaces_chat_template


@pytest.mark.parametrize("preset", ["gemma3", "paligemma", "mistral3", "aya_vision", "llava_onevision", "internvl",
                                    "qwen3_vl", "idefics3", "smolvlm", "mllama", "blip-2", "clip", "siglip",
                                    "blip-retrieval", "causal-lm"])
def test_every_preset_is_a_base(tmp_path, preset):
    """`base:` takes every preset of the table (the LLaVA-like, fam-b and retrieval ones included): the file's Family
    is the preset's, with its rules file name."""
    family = load_rules_file(_rules(tmp_path, f"base: {preset}\n"))
    base = family_by_name(preset)
    assert family.name == "file:rules.yaml"
    assert family == replace(base, rules=replace(base.rules, name="file:rules.yaml"))


def _renamed_copy(folder, root):
    """The demo checkpoint with its projector stored under other keys (`proj_in.weight`, `proj_in.bias`, ...)."""
    renamed = root / "renamed"
    shutil.copytree(folder, renamed)
    names = {"multi_modal_projector.linear_1": "proj_in", "multi_modal_projector.linear_2": "proj_out"}

    def key(k):
        module, leaf = k.rsplit(".", 1)
        return f"{names.get(module, module)}.{leaf}"

    tensors = load_file(folder / "model.safetensors")
    assert all(m + ".weight" in tensors for m in names)
    save_file({key(k): v for k, v in tensors.items()}, str(renamed / "model.safetensors"), metadata={"format": "pt"})
    renames = [["^proj_in$", "model.multi_modal_projector.linear_1"],  # before the preset's (a file's replace them)
               ["^proj_out$", "model.multi_modal_projector.linear_2"], *map(list, family_by_name("llava").renames)]
    rules = _rules(root, json.dumps({"base": "llava", "renames": renames}), "rules.json")
    return renamed, rules, key


@pytest.mark.slow
def test_dollar_anchored_renames_agree_in_distribute_calibrate_prune_run_and_eval(demo, jsonl, tmp_path):
    folder, _, _ = demo
    renamed, rules, key = _renamed_copy(folder, tmp_path)
    out = {}
    for label, model, extra in (("out-plain", folder, []), ("out-renamed", renamed, ["--rules", str(rules)])):
        d = tmp_path / label
        d.mkdir()
        common = ["--model", str(model), *extra]
        calib = ["--data", str(jsonl), "--nsamples", "3", "--batch-size", "2", "--quiet"]
        assert main(["distribute", *common, "--target-sparsity", "0.5", "--output", str(d / "dist.json"),
                     "--no-plot", "--quiet"]) == 0
        assert main(["calibrate", *common, *calib, "--output", str(d / "stats.safetensors"),
                     "--deterministic-report"]) == 0
        assert main(["prune", *common, "--distribution", str(d / "dist.json"), "--stats", str(d / "stats.safetensors"),
                     "--output", str(d / "pruned"), "--quiet"]) == 0
        assert main(["run", "--method", "multiflow", *common, *calib, "--target-sparsity", "0.5", "--output", str(d / "run")]) == 0
        assert main(["eval", "--model", str(d / "run"), *extra, "--data", str(jsonl), "--nsamples", "2",
                     "--max-new-tokens", "3", "--output", str(d / "eval.json"), "--quiet"]) == 0
        out[label] = d
    plain, ren = out["out-plain"], out["out-renamed"]
    assert json.loads((plain / "dist.json").read_text())["layer_distribution"] == \
        json.loads((ren / "dist.json").read_text())["layer_distribution"]
    a, b = load_file(plain / "stats.safetensors"), load_file(ren / "stats.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for step in ("pruned", "run"):
        a, b = load_file(plain / step / "model.safetensors"), load_file(ren / step / "model.safetensors")
        assert {key(k) for k in a} == set(b) and all(torch.equal(v, b[key(k)]) for k, v in a.items())
        assert int((b["proj_in.weight"] == 0).sum()) > 0  # the renamed layers were pruned, not skipped
    a, b = json.loads((plain / "eval.json").read_text()), json.loads((ren / "eval.json").read_text())
    assert [x["prediction"] for x in a["items"]] == [x["prediction"] for x in b["items"]]


def test_whole_model_load_uses_the_rules_file_renames(demo, tmp_path):
    from multiflow.models.loading import load_model

    folder, model, _ = demo
    renamed, rules, _ = _renamed_copy(folder, tmp_path)
    loaded = load_model(renamed, layers.from_checkpoint(renamed, rules))
    for name in ("model.multi_modal_projector.linear_1.weight", "model.multi_modal_projector.linear_2.weight"):
        assert torch.equal(loaded.model.get_parameter(name), model.get_parameter(name))


def test_image_token_and_prompt_reach_the_loaded_model(demo, tmp_path):
    from multiflow.models.loading import load_model

    folder, model, processor = demo
    by_token = _rules(tmp_path, "base: llava\nimage_token: '<image>'\nprompt: 'Q {question} A:'\n", "a.yaml")
    loaded = load_model(folder, layers.from_checkpoint(folder, by_token))
    assert loaded.image_token_id == model.config.image_token_id
    assert build_prompt(loaded.processor, "why?", None) == "Q why? A:"  # over the demo processor's chat template
    assert build_prompt(load_model(folder, layers.from_checkpoint(folder)).processor, "why?", None) != "Q why? A:"
    by_id = _rules(tmp_path, "base: llava\nimage_token_id: 5\n", "b.yaml")
    assert load_model(folder, layers.from_checkpoint(folder, by_id)).image_token_id == 5
    unknown = _rules(tmp_path, "base: llava\nimage_token: '<img>'\n", "c.yaml")
    with pytest.raises(MultiflowError, match="image_token '<img>' of file:c.yaml is not a token"):
        load_model(folder, layers.from_checkpoint(folder, unknown))


def test_split_token_types_without_aligned_layers_names_the_fix(demo, jsonl, tmp_path, capsys):
    folder, _, _ = demo
    rules = _rules(tmp_path, "base: llava\naligned_layers: null\n")
    code = main(["calibrate", "--model", str(folder), "--rules", str(rules), "--data", str(jsonl), "--nsamples", "2",
                 "--split-token-types", "--output", str(tmp_path / "s.safetensors"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "--split-token-types" in err and "add 'aligned_layers' to the rules file rules.yaml" in err
    assert not (tmp_path / "s.safetensors").exists()


def test_padding_without_aligned_layers_is_refused_not_counted(demo, jsonl, tmp_path, capsys):
    folder, _, _ = demo
    rules = _rules(tmp_path, "base: llava\naligned_layers: null\n")
    args = ["calibrate", "--model", str(folder), "--rules", str(rules), "--data", str(jsonl), "--nsamples", "2",
            "--quiet"]
    code = main([*args, "--batch-size", "2", "--output", str(tmp_path / "s2.safetensors")])
    err = capsys.readouterr().err
    assert code == 2 and "padding positions would be counted" in err and "or use --batch-size 1" in err
    assert main([*args, "--output", str(tmp_path / "s1.safetensors")]) == 0  # one sample a batch: no padding


def test_dead_layer_fields(demo, tmp_path):
    folder, model, _ = demo
    last = model.config.vision_config.num_hidden_layers - 1
    preset = layers.from_checkpoint(folder).dead_layers()
    assert preset and all(f".layers.{last}." in n for n in preset)  # vision_feature_layer -2: the last CLIP layer
    off = _rules(tmp_path, "base: llava\nfeature_layer_key: null\n", "off.yaml")
    assert layers.from_checkpoint(folder, off).dead_layers() == []
    mlp_only = _rules(tmp_path, "base: llava\nvision_layer_pattern: '^model\\.vision_tower\\.encoder\\.layers\\.(\\d+)\\.mlp\\.'\n",
                      "mlp.yaml")
    assert layers.from_checkpoint(folder, mlp_only).dead_layers() == [n for n in preset if ".mlp." in n]
