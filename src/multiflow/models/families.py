"""Every model family's knowledge, as data: how to recognise it, name its weights, group its layers.

A rule is a regular expression over a module name (the weight's name without
`.weight`) and a group: `vision`, `text`, `fusion` or `skip`. The first rule
whose pattern is found in the name decides. Families (`FAMILIES`) are plain
data looked up from a checkpoint's `config.json` (`model_type`,
`architectures`, keys): modality rules, key renames, where a separate vision
tower's weights go, dead-layer markers, which layers see prompt tokens, and
the family a checkpoint is converted to in memory (the one converter lives in
models/loading.py), the prompt format of checkpoints without a chat template. A
family like another is derived from it by `dataclasses.replace` (llava_next from
llava); the LLaVA-like families of transformers 5.x share `_llava_like`. Adding a
family is an entry here.

Before any family rule, the never-prunable rules of docs/algorithm.md apply:
embeddings and the output head are skipped whatever the family says (biases
and norms are never candidates: only 2-D `.weight` tensors are).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Mapping

from multiflow.errors import MultiflowError
from multiflow.models.prompts import chat_template

RULE_GROUPS = ("vision", "text", "fusion", "skip")  # a rule's group: a modality, or skip (never pruned)


@dataclass(frozen=True)
class Rule:
    pattern: str
    group: str
    why: str = ""

    def __post_init__(self) -> None:
        if self.group not in RULE_GROUPS:
            raise MultiflowError(
                f"rule {self.pattern!r}: group {self.group!r} is not one of {', '.join(RULE_GROUPS)}"
            )
        try:
            re.compile(self.pattern)
        except re.error as exc:
            raise MultiflowError(f"rule {self.pattern!r} is not a valid regular expression: {exc}") from exc

    def to_dict(self) -> dict[str, str]:
        out = {"pattern": self.pattern, "group": self.group}
        if self.why:
            out["why"] = self.why
        return out


NEVER_PRUNED = (
    Rule(r"(^|\.)lm_head$", "skip", "output head"),
    Rule(r"(^|\.)[^.]*embed[^.]*$", "skip", "embedding"),
    Rule(r"(^|\.)[^.]*norm[^.]*$", "skip", "normalisation"),
)


@dataclass(frozen=True)
class ModalityRules:
    """Ordered rules plus the modalities they define (in report order)."""

    name: str
    modalities: tuple[str, ...]
    rules: tuple[Rule, ...]

    def classify(self, module_name: str) -> Rule | None:
        for rule in NEVER_PRUNED + self.rules:
            if re.search(rule.pattern, module_name):
                return rule
        return None

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modalities": list(self.modalities),
            "rules": [r.to_dict() for r in self.rules],
        }


@dataclass(frozen=True)
class Family:
    """A model family: how to recognise it, name its weights and group its layers.

    `renames` turn checkpoint keys of every layout the family has into module
    names; the first pattern that matches wins (`re.sub`, once).
    `vision_tower_prefix`, when set, is where the weights of a separate CLIP
    folder (`--vision-tower`) are placed (`vision_tower_name`). `aligned_layers` selects the layers
    whose inputs line up with the prompt's token positions (padding and image
    tokens are told apart there in Step 2); `language_layers`, where it differs, selects the language model's
    layers for `--prune-only language-model` (default: the aligned ones). `task` says which transformers Auto class runs the model
    and what its inputs are: "image-text-to-text" (images and prompts, a processor),
    "text-generation" (a plain causal LM: text only, a tokenizer) or "retrieval" (an image-text
    embedding model, CLIP-like: image-caption pairs through both towers, the class named in the config's
    `architectures` among the family's; `retrieval_head` names how it embeds, an entry of
    models/retrieval.py's RETRIEVAL_HEADS). `architecture_pattern` matches
    any `config.architectures` entry by regular expression (a catch-all family). `converted_to` names
    the family whose transformers model a checkpoint of this family becomes in memory to run (Step 2,
    eval), `conversion_renames` mapping this family's module names to that model's. `prompt` is the
    family's prompt for a processor without a chat template (models/prompts.py; default LLaVA-1.5's):
    `{question}` marks the question, and the answer follows after a space, or
    after `<join>` in a prompt that ends `{question}<join>{answer}` (PaliGemma's). A rules file's `prompt`
    (`prompt_replaces_chat_template`) is used even when the processor has a chat template. `image_token` /
    `image_token_id` name the image placeholder when config.json does not (a rules file's; presets leave it to
    config.json).
    """

    rules: ModalityRules
    naming: str = "transformers"  # how the layer names read: transformers' in-memory names, or the layout's own
    model_types: tuple[str, ...] = ()
    architectures: tuple[str, ...] = ()
    config_keys: tuple[str, ...] = ()
    renames: tuple[tuple[str, str], ...] = ()
    vision_tower_prefix: str | None = None
    vision_tower_config_key: str | None = None
    vision_tower_strip: str = "vision_model."  # prefix of the separate folder's own keys, replaced by the prefix
    vision_tower_skip: str = r"^(text_model\.|text_projection|visual_projection|logit_scale)"  # not vision weights
    aligned_layers: str | None = None  # layers whose inputs line up with the prompt's tokens (Step 2)
    # --prune-only language-model: the language model's layers, where they are not all aligned (default: aligned)
    language_layers: str | None = None
    # Dead layers: vision layers past the one whose output the model reads (config key), by index.
    feature_layer_key: str | None = None
    vision_layer_pattern: str | None = None  # regex whose group 1 is the vision layer index
    task: str = "image-text-to-text"  # or "text-generation": a plain causal LM (tokenizer, text only), or "retrieval"
    retrieval_head: str | None = None  # task "retrieval": how images and texts are embedded (models/retrieval.py)
    architecture_pattern: str | None = None
    converted_to: str | None = None  # run as this family's transformers model (a converter in models/loading.py)
    conversion_renames: tuple[tuple[str, str], ...] = ()  # this family's names -> the converted model's
    prompt: str | None = None  # the prompt when the processor has no chat template (models/prompts.py)
    prompt_replaces_chat_template: bool = False  # a rules file's `prompt`: used even when the processor has one
    # Step 2 and eval: the image placeholder's token, by name or id (when neither is set: config.json's
    # image_token_id / image_token_index; models/loading.py's `image_token_id`).
    image_token: str | None = None
    image_token_id: int | None = None

    def vision_tower_name(self, key: str) -> str | None:
        """A separate vision tower folder's key (`--vision-tower`, a CLIP folder) as this family names it, or
        None for the folder's weights that are not the vision tower (CLIP's text model and heads)."""
        if self.vision_tower_prefix is None or re.match(self.vision_tower_skip, key):
            return None
        return self.vision_tower_prefix + key.removeprefix(self.vision_tower_strip)

    @property
    def text_only(self) -> bool:
        """A plain language model: calibrated and evaluated on text, without images."""
        return self.task == "text-generation"

    @property
    def language_model(self) -> str | None:
        """Regex of the language model's layers (--prune-only language-model): `language_layers`, else the
        aligned layers (those that read the prompt's tokens)."""
        return self.language_layers or self.aligned_layers

    @property
    def retrieval(self) -> bool:
        """An image-text retrieval model (two towers or an ITC head): calibrated on image-caption pairs,
        evaluated by recall@k (evaluation/retrieval.py)."""
        return self.task == "retrieval"

    def dead_layers(self, config: Mapping[str, Any], names: Iterable[str]) -> list[str]:
        """Vision layers whose output cannot reach the model's output.

        With feature layer f (hidden_states[f]; hidden_states[0] is the
        embeddings) of L layers, layers f..L-1 (0-based) are never used:
        LLaVA-1.5's f = -2 leaves the last CLIP layer dead.
        """
        if not self.feature_layer_key or not self.vision_layer_pattern or self.feature_layer_key not in config:
            return []
        names = list(names)
        index = {n: int(m.group(1)) for n in names if (m := re.search(self.vision_layer_pattern, n))}
        if not index:
            return []
        count = max(index.values()) + 1
        chosen = config[self.feature_layer_key]
        chosen = chosen if isinstance(chosen, list) else [chosen]
        used = max(int(f) if int(f) >= 0 else count + 1 + int(f) for f in chosen)
        return [n for n in names if n in index and index[n] >= used]

    @property
    def name(self) -> str:
        return self.rules.name

    def matches(self, config: Mapping[str, Any]) -> bool:
        if any(key in config for key in self.config_keys):
            return True
        if set(config.get("architectures") or ()) & set(self.architectures):
            return True
        if config.get("model_type") in self.model_types:
            return True
        return self.architecture_pattern is not None and any(
            isinstance(a, str) and re.search(self.architecture_pattern, a) for a in config.get("architectures") or ())


def family(name: str, modalities: tuple[str, ...], rules: Iterable[tuple[str, ...]], **fields: Any) -> Family:
    """A table entry: the family's modality rules as (pattern, group, why) tuples, and its other fields."""
    return Family(rules=ModalityRules(name, modalities, tuple(Rule(*rule) for rule in rules)), **fields)


VTF = ("vision", "text", "fusion")  # the modalities of LLaVA-like models, in report order
VT = ("vision", "text")

# transformers 4.x hub names, 5.x save_pretrained names and in-memory names.
_LLAVA_RENAMES = (
    (r"^language_model\.lm_head$", "lm_head"),
    (r"^language_model\.model\.", "model.language_model."),
    (r"^language_model\.", "model.language_model."),
    (r"^vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^vision_tower\.", "model.vision_tower."),
    (r"^model\.vision_tower\.vision_model\.", "model.vision_tower."),
    (r"^multi_modal_projector\.", "model.multi_modal_projector."),
    (r"^image_newline$", "model.image_newline"),
)

_LLAVA = family(
    "llava", VTF, [
        (r"^model\.vision_tower\.", "vision", "CLIP vision tower"),
        (r"^model\.multi_modal_projector\.", "fusion", "projector maps image features into the LLM"),
        (r"^model\.language_model\.layers\.", "fusion", "decoder layers see image and text tokens"),
    ],
    model_types=("llava",),
    architectures=("LlavaForConditionalGeneration",),
    renames=_LLAVA_RENAMES,
    aligned_layers=r"^model\.language_model\.",
    feature_layer_key="vision_feature_layer",
    vision_layer_pattern=r"^model\.vision_tower\.encoder\.layers\.(\d+)\.",
)

_QWEN_PROMPT = "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>{question}<|im_end|>\n<|im_start|>assistant\n"

# Idefics3 (and SmolVLM): a SigLIP-like vision transformer; the connector's pixel shuffle folds each square of
# scale_factor x scale_factor patches (2 in Idefics3, 3 or 4 in SmolVLM) into one token and its
# modality_projection maps it into the LLM (Llama 3 / SmolLM2).
# The vision tower's last layer feeds the connector (no feature-layer key: no dead layers).
_IDEFICS3 = family(
    "idefics3", VTF, [
        (r"^model\.connector\.", "fusion", "connector: pixel shuffle + modality_projection into the LLM"),
        (r"^model\.vision_model\.", "vision", "SigLIP-like vision transformer"),
        (r"^model\.text_model\.layers\.", "fusion", "decoder layers see image and text tokens"),
    ],
    model_types=("idefics3",),
    architectures=("Idefics3ForConditionalGeneration",),
    # hub and 5.x names are the in-memory ones; a saved bare Idefics3Model lacks the `model.` prefix
    renames=((r"^(vision_model|connector|text_model)\.", r"model.\1."),),
    aligned_layers=r"^model\.text_model\.",
    prompt="User:<image>{question}<end_of_utterance>\nAssistant:",
)


def _llava_like(name: str, model_types: tuple[str, ...], architectures: tuple[str, ...], tower: str,
                extra_rules: Iterable[tuple[str, ...]] = (), **fields: Any) -> Family:
    """A LLaVA-like family of transformers 5.x: `model.vision_tower` -> vision, `model.multi_modal_projector`
    and the decoder layers -> fusion, LLaVA's renames (4.x hub keys and 5.x saves), prompt-aligned decoder."""
    return family(
        name, VTF, [
            *extra_rules,
            (r"^model\.vision_tower\.head\.", "skip", "SigLIP pooling head: its output is never read"),
            (r"^model\.vision_tower\.", "vision", tower),
            (r"^model\.multi_modal_projector\.", "fusion", "projector maps image features into the LLM"),
            (r"^model\.language_model\.layers\.", "fusion", "decoder layers see image and text tokens"),
        ],
        model_types=model_types,
        architectures=architectures,
        renames=_LLAVA_RENAMES,
        aligned_layers=r"^model\.language_model\.",
        **fields,
    )


_SIGLIP_LAYERS = r"^model\.vision_tower\.encoder\.layers\.(\d+)\."

# transformers 5.x LLaVA-like families: one entry each (processors, image tokens and projectors differ; the
# module names and every saved layout are LLaVA's). Hub checkpoints hold 4.x keys (`language_model.model.`,
# `vision_tower.vision_model.` for SigLIP / `vision_tower.` for Pixtral and InternViT); 5.x save_pretrained
# writes `language_model.model.`, `vision_tower.`, `multi_modal_projector.` again.
_LLAVA_LIKE = (
    # Gemma 3: SigLIP, average pooling, then a bare [vision, text] parameter (x @ W, no nn.Linear).
    _llava_like(
        "gemma3", ("gemma3",), ("Gemma3ForConditionalGeneration",), "SigLIP vision tower",
        extra_rules=[(r"^model\.multi_modal_projector\.mm_input_projection_weight$", "skip",
                      "bare projection parameter (x @ W), not an nn.Linear: kept dense")],
    ),
    # PaliGemma's checkpoints have no chat template: its processor puts the image tokens and BOS in front of
    # the prompt and ends it with "\n"; the answer follows that "\n" (big_vision's prefix / suffix format).
    _llava_like("paligemma", ("paligemma",), ("PaliGemmaForConditionalGeneration",), "SigLIP vision tower",
                prompt="{question}\n{answer}"),
    _llava_like("mistral3", ("mistral3",), ("Mistral3ForConditionalGeneration",),
                "Pixtral vision tower (the patch merger is in the projector)",
                feature_layer_key="vision_feature_layer",
                vision_layer_pattern=r"^model\.vision_tower\.transformer\.layers\.(\d+)\."),
    _llava_like("aya_vision", ("aya_vision",), ("AyaVisionForConditionalGeneration",), "SigLIP vision tower",
                feature_layer_key="vision_feature_layer", vision_layer_pattern=_SIGLIP_LAYERS),
    _llava_like("llava_onevision", ("llava_onevision",), ("LlavaOnevisionForConditionalGeneration",),
                "SigLIP vision tower", feature_layer_key="vision_feature_layer", vision_layer_pattern=_SIGLIP_LAYERS),
    _llava_like("internvl", ("internvl",), ("InternVLForConditionalGeneration",), "InternViT vision tower",
                feature_layer_key="vision_feature_layer",
                vision_layer_pattern=r"^model\.vision_tower\.encoder\.layer\.(\d+)\."),
)

FAMILIES: tuple[Family, ...] = (
    # The original LLaVA repository (haotian-liu/LLaVA): its own module names.
    family(
        "llava-original", VTF, [
            (r"^model\.vision_tower\.", "vision", "CLIP vision tower"),
            (r"^model\.mm_projector\.", "fusion", "projector maps image features into the LLM"),
            (r"^model\.layers\.", "fusion", "decoder layers see image and text tokens"),
        ],
        naming="llava-original",
        model_types=("llava_llama", "llava_mistral", "llava_mpt"),
        architectures=("LlavaLlamaForCausalLM", "LlavaMistralForCausalLM", "LlavaMptForCausalLM"),
        config_keys=("mm_vision_tower", "mm_projector_type"),
        vision_tower_prefix="model.vision_tower.vision_tower.vision_model.",
        vision_tower_config_key="mm_vision_tower",
        aligned_layers=r"^model\.layers\.",
        feature_layer_key="mm_vision_select_layer",
        vision_layer_pattern=r"^model\.vision_tower\.vision_tower\.vision_model\.encoder\.layers\.(\d+)\.",
        # run as transformers' LlavaForConditionalGeneration (as its convert_llava_weights_to_hf.py does)
        converted_to="llava",
        conversion_renames=(
            (r"^model\.mm_projector\.0\.", "model.multi_modal_projector.linear_1."),
            (r"^model\.mm_projector\.2\.", "model.multi_modal_projector.linear_2."),
            (r"^model\.vision_tower\.vision_tower\.vision_model\.", "model.vision_tower."),
            (r"^model\.(embed_tokens|layers|norm)\.", r"model.language_model.\1."),
        ),
    ),
    _LLAVA,
    # LLaVA-NeXT: LLaVA's names and rules (its image_newline is a 1-D parameter, never a candidate)
    replace(_LLAVA, rules=replace(_LLAVA.rules, name="llava_next"), model_types=("llava_next",),
            architectures=("LlavaNextForConditionalGeneration",)),
    family(
        "qwen2_vl", VTF, [
            (r"^model\.visual\.merger\.", "fusion", "merger maps image features into the LLM"),
            (r"^model\.visual\.", "vision", "vision transformer"),
            (r"^model\.language_model\.layers\.", "fusion", "decoder layers see image and text tokens"),
        ],
        model_types=("qwen2_vl", "qwen2_5_vl"),
        architectures=("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration"),
        renames=((r"^visual\.", "model.visual."), (r"^model\.(?!language_model\.|visual\.)", "model.language_model.")),
        aligned_layers=r"^model\.language_model\.",
        prompt=_QWEN_PROMPT,
    ),
    # Qwen3-VL: Qwen2-VL's layout (hub checkpoints already use the in-memory names); its vision tower adds
    # DeepStack mergers that feed intermediate vision features into the first decoder layers.
    family(
        "qwen3_vl", VTF, [
            (r"^model\.visual\.(merger|deepstack_merger_list)\.", "fusion",
             "merger and DeepStack mergers map image features into the LLM"),
            (r"^model\.visual\.", "vision", "vision transformer"),
            (r"^model\.language_model\.layers\.", "fusion", "decoder layers see image and text tokens"),
        ],
        model_types=("qwen3_vl",),
        architectures=("Qwen3VLForConditionalGeneration",),
        renames=((r"^visual\.", "model.visual."), (r"^model\.(?!language_model\.|visual\.)", "model.language_model.")),
        aligned_layers=r"^model\.language_model\.",
        prompt=_QWEN_PROMPT,
    ),
    _IDEFICS3,
    # SmolVLM: Idefics3's layout and rules
    replace(_IDEFICS3, rules=replace(_IDEFICS3.rules, name="smolvlm"), model_types=("smolvlm",),
            architectures=("SmolVLMForConditionalGeneration",),
            prompt="<|im_start|>User:<image>{question}<end_of_utterance>\nAssistant:"),
    # Llama 3.2 Vision: a vision encoder (local transformer, then a global one over the tiles) whose features
    # reach the text model only through cross-attention layers interleaved with the self-attention ones.
    family(
        "mllama", VTF, [
            (r"^model\.vision_model\.", "vision", "vision encoder: local transformer and global transformer"),
            (r"^model\.multi_modal_projector$", "fusion", "projector maps image features into the LLM"),
            (r"^model\.language_model\.layers\.\d+\.cross_attn\.", "fusion",
             "cross-attention layers: text queries read image features"),
            (r"^model\.language_model\.layers\.", "fusion",
             "decoder layers see text tokens that carry the image (from the cross-attention layers)"),
        ],
        model_types=("mllama",),
        architectures=("MllamaForConditionalGeneration",),
        renames=(
            (r"^language_model\.lm_head(?=\.|$)", "lm_head"),  # 4.x hub and 5.x save_pretrained names
            (r"^language_model\.model\.", "model.language_model."),
            (r"^language_model\.", "model.language_model."),
            (r"^(vision_model|multi_modal_projector)(?=\.|$)", r"model.\1"),
        ),
        # the cross-attention keys and values read the image features, not the prompt's positions
        aligned_layers=r"^model\.language_model\.layers\.\d+\.(?!cross_attn\.[kv]_proj$)",
        language_layers=r"^model\.language_model\.",  # the cross-attention layers too
        prompt="<|image|>{question}",
    ),
    # BLIP-2: ViT, then a Q-Former whose learned queries cross-attend the image features; their outputs,
    # projected, are the image tokens in front of the prompt of an OPT (decoder-only) or Flan-T5 language model.
    # Hub and 5.x names are the in-memory ones; OPT's lm_head is tied to its embeddings (not in the checkpoint).
    family(
        "blip-2", VTF, [
            (r"^vision_model\.", "vision", "ViT image encoder"),
            (r"^qformer\.", "fusion", "Q-Former: learned queries cross-attend the image features"),
            (r"^language_projection$", "fusion", "projection maps the Q-Former outputs into the LLM"),
            (r"relative_attention_bias$", "skip", "T5 relative position bias (an embedding table)"),
            (r"^language_model\.shared$", "skip", "T5 token embedding"),
            (r"^language_model\.model\.decoder\.project_(in|out)$", "skip", "OPT embedding projection"),
            (r"^language_model\.(model\.decoder\.layers|encoder\.block|decoder\.block)\.", "fusion",
             "language model layers see the image query tokens and text"),
        ],
        model_types=("blip-2",),
        architectures=("Blip2ForConditionalGeneration",),
        aligned_layers=r"^language_model\.(model\.decoder|encoder)\.",  # T5's decoder runs on the answer only
        language_layers=r"^language_model\.",  # T5's decoder too
        prompt="Question: {question} Answer:",  # the processor puts the query tokens in front
    ),
    *_LLAVA_LIKE,
    # BLIP's image-text retrieval model (the MULTIFLOW authors' BLIP grouping): before "blip", whose model_type it
    # shares. Cross-attention keys and values read the image tokens, not the caption's: not prompt-aligned.
    family(
        "blip-retrieval", VT, [
            (r"^vision_model\.", "vision", "ViT image encoder"),
            (r"(^|\.)(vision_proj|text_proj|itm_head)$", "skip", "head (skipped by the authors)"),
            (r"^text_encoder\.", "text", "text encoder (its cross-attention too, as the authors group it)"),
        ],
        architectures=("BlipForImageTextRetrieval",),
        aligned_layers=r"^text_encoder\.(?!.*\.crossattention\.self\.(key|value)$)",
        language_layers=r"^text_encoder\.",  # its cross-attention too
        task="retrieval",
        retrieval_head="blip-itc",
    ),
    family(
        "blip", VT, [
            (r"^vision_model\.", "vision", "ViT image encoder"),
            (r"(^|\.)(vision_proj|text_proj|itm_head)$", "skip", "head (skipped by the authors)"),
            (r"(^|\.)cls\.predictions\.decoder$", "skip", "output head"),
            (r"^text_", "text", "text encoder / decoder"),
        ],
        model_types=("blip",),
        architectures=("BlipForConditionalGeneration", "BlipForQuestionAnswering"),
        aligned_layers=r"^text_",
    ),
    family(
        "clip", VT, [
            (r"^(vision_model\.)?(embeddings|encoder|pre_layrnorm|post_layernorm)\.", "vision", "ViT"),
            (r"^vision_model\.", "vision", "ViT image encoder"),
            (r"^text_model\.", "text", "text transformer"),
            (r"^(visual|text)_projection$", "skip", "projection head"),
        ],
        model_types=("clip",),
        architectures=("CLIPModel",),
        aligned_layers=r"^text_model\.",
        task="retrieval",
        retrieval_head="dual-encoder",
    ),
    # a CLIP vision tower alone: CLIP's rules, not a retrieval model
    family(
        "clip-vision", ("vision",), [
            (r"^(vision_model\.)?(embeddings|encoder|pre_layrnorm|post_layernorm)\.", "vision", "ViT"),
            (r"^vision_model\.", "vision", "ViT image encoder"),
            (r"^visual_projection$", "skip", "projection head"),
        ],
        model_types=("clip_vision_model",),
        architectures=("CLIPVisionModel",),
    ),
    # SigLIP and SigLIP 2: two towers, a sigmoid loss; the text tower's `head` is its projection. The vision
    # pooling head's nn.MultiheadAttention reads its out_proj weight without calling the module (no statistics
    # can be recorded): skipped with the projections.
    family(
        "siglip", VT, [
            (r"^vision_model\.head\.attention\.", "skip", "attention-pooling head's MultiheadAttention"),
            (r"^vision_model\.", "vision", "ViT image encoder"),
            (r"^text_model\.head$", "skip", "projection head (skipped, as CLIP's)"),
            (r"^text_model\.", "text", "text transformer"),
        ],
        model_types=("siglip", "siglip2"),
        architectures=("SiglipModel", "Siglip2Model"),
        aligned_layers=r"^text_model\.",
        task="retrieval",
        retrieval_head="siglip",
    ),
    # transformers' VisionTextDualEncoderModel (any vision tower + any text encoder, CLIP-style heads):
    # the pretrained-weights judge of experiments/dual_encoder (CLIP vision tower + pretrained MiniLM).
    family(
        "vision-text-dual-encoder", VT, [
            (r"^vision_model\.", "vision", "vision tower"),
            (r"^text_model\.", "text", "text encoder"),
            (r"^(visual|text)_projection$", "skip", "projection head (skipped, as CLIP's)"),
        ],
        model_types=("vision-text-dual-encoder",),
        architectures=("VisionTextDualEncoderModel",),
        aligned_layers=r"^text_model\.encoder\.",  # the pooler reads the [CLS] state only: no token positions
        language_layers=r"^text_model\.",  # the pooler too
        task="retrieval",
        retrieval_head="dual-encoder",
    ),
    # Plain decoder-only language models (LlamaForCausalLM and its kin): one modality, text. Checkpoint keys
    # are the in-memory names (`model.layers.N.self_attn.q_proj`, phi3's fused `qkv_proj` / `gate_up_proj`);
    # embeddings, norms and `lm_head` are never pruned (the gemma families and many small models tie
    # `lm_head` to the embeddings and leave it out of the checkpoint). Last in the table: the catch-all
    # pattern must not take LLaVA's `LlavaLlamaForCausalLM`; a *ForCausalLM laid out differently fails
    # with the names of its unmatched layers (pass --rules).
    family(
        "causal-lm", ("text",), [(r"^model\.layers\.", "text", "decoder layers")],
        model_types=("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"),
        architecture_pattern=r"ForCausalLM$",
        aligned_layers=r"^model\.layers\.",
        task="text-generation",
    ),
)


def family_for(config: Mapping[str, Any]) -> Family | None:
    """The first family whose markers the config carries, or None."""
    for family in FAMILIES:
        if family.matches(config):
            return family
    return None


def rename_key(key: str, renames: tuple[tuple[str, str], ...]) -> str:
    """A checkpoint key as the model names it; the one place renames are applied (Step 1's module names, the
    weights loaded for Step 2 and eval, the in-memory conversion), so that they agree everywhere.

    The first (pattern, replacement) whose pattern is found in the key's module path is applied once (`re.sub`):
    the module path is the key without its last `.part` (the parameter's own name: `weight`, `bias`, kept as
    is), or the whole key when it has no dot (a parameter of the model itself, e.g. `image_newline`). So
    `^vision\\.proj$` renames `vision.proj.weight` and `vision.proj.bias` alike. A prefix written with its dot
    (`^model\\.norm\\.`) also names the module itself: the path is tried as `model.norm` and as `model.norm.`.
    Unchanged when no pattern is found.
    """
    module, dot, leaf = key.rpartition(".")
    if not dot:
        module, leaf = key, ""
    for pattern, replacement in renames:
        for subject in (module, module + "."):
            renamed, n = re.subn(pattern, replacement, subject, count=1)
            if n:
                if subject is not module:
                    renamed = renamed.removesuffix(".")
                return f"{renamed}.{leaf}" if leaf else renamed
    return key


def family_by_name(name: str) -> Family:
    for family in FAMILIES:
        if family.name == name:
            return family
    raise MultiflowError(f"unknown family {name!r}; known: {', '.join(f.name for f in FAMILIES)}")


TASKS = ("image-text-to-text", "text-generation", "retrieval")  # Family.task: what runs the model, on what data
# Rules-file fields: the Family fields a user may set (README, "Modality rules"), plus `base`.
RULES_FILE_FIELDS = ("base", "modalities", "rules", "renames", "aligned_layers", "language_layers", "image_token",
                     "image_token_id",
                     "prompt", "task", "retrieval_head", "feature_layer_key", "vision_layer_pattern")


def load_rules_file(path: str | Path, detected: Family | None = None) -> Family:
    """Read a user rules file (YAML or JSON) into a Family: the preset named by `base`, else `detected` (the
    checkpoint's own preset, None for an unknown architecture), with the file's fields replacing the preset's.
    Every field is checked here; an error is one line naming the file and the field.

    Format::

        base: llava                             # optional: start from this preset
        modalities: [vision, text, fusion]      # optional; report order
        rules:                                  # ordered, first match wins (optional with a base)
          - {pattern: '^model\\.vision_tower\\.', group: vision}
          - {pattern: 'mm_projector', group: skip, why: keep the projector dense}
        renames:                                # optional: checkpoint module path -> module name (rename_key)
          - ['^visual\\.', 'model.visual.']
        aligned_layers: '^model\\.language_model\\.'   # layers that read the prompt's tokens (padding excluded)
        language_layers: '^model\\.language_model\\.'  # --prune-only language-model (default: aligned_layers)
        image_token: '<image>'                  # or image_token_id: 32000
        prompt: "USER: <image>\n{question} ASSISTANT:"   # replaces the processor's chat template (Family.prompt)
        task: image-text-to-text                # or text-generation (a plain causal LM), or retrieval
        retrieval_head: dual-encoder            # task retrieval: how it embeds (models/retrieval.py)
        feature_layer_key: vision_feature_layer # dead layers: config key of the vision layer the model reads
        vision_layer_pattern: '^model\\.vision_tower\\.encoder\\.layers\\.(\\d+)\\.'
    """
    path = Path(path)
    data = _read_rules_data(path)

    def bad(name: str, what: str) -> MultiflowError:
        return MultiflowError(f"rules file {path}: '{name}' {what}")

    if not isinstance(data, dict):
        raise MultiflowError(f"rules file {path} needs a non-empty list under 'rules' (or a 'base' preset)")
    unknown = [k for k in data if k not in RULES_FILE_FIELDS]
    if unknown:
        raise bad(str(unknown[0]), f"is not a rules-file field; known: {', '.join(RULES_FILE_FIELDS)}")
    start = detected
    if "base" in data:
        names = [f.name for f in FAMILIES]
        if data["base"] not in names:
            raise bad("base", f"{data['base']!r} is not a preset; known: {', '.join(names)}")
        start = family_by_name(data["base"])
    if "rules" in data or start is None:
        if not isinstance(data.get("rules"), list) or not data["rules"]:
            raise MultiflowError(f"rules file {path} needs a non-empty list under 'rules'")
        rules = []
        for i, item in enumerate(data["rules"]):
            if not isinstance(item, dict) or "pattern" not in item or "group" not in item:
                raise MultiflowError(f"rules file {path}: rule {i} needs 'pattern' and 'group'")
            try:
                rules.append(Rule(str(item["pattern"]), str(item["group"]), str(item.get("why", ""))))
            except MultiflowError as exc:
                raise MultiflowError(f"rules file {path}: {exc}") from None
        used = _unique(r.group for r in rules if r.group != "skip")
    else:
        rules, used = list(start.rules.rules), start.rules.modalities
    modalities = data.get("modalities") or used
    if not isinstance(modalities, list | tuple) or not all(isinstance(m, str) for m in modalities):
        raise bad("modalities", "must be a list of modality names")
    modalities = tuple(modalities)
    unknown = [m for m in modalities if m not in RULE_GROUPS or m == "skip"]
    if unknown or not set(used) <= set(modalities):
        raise MultiflowError(
            f"rules file {path}: 'modalities' must list every group the rules use ({', '.join(used)})"
        )
    fields: dict[str, Any] = {}
    if "renames" in data:
        pairs = data["renames"] or []
        if not isinstance(pairs, list) or not all(isinstance(p, list | tuple) and len(p) == 2
                                                  and all(isinstance(x, str) for x in p) for p in pairs):
            raise bad("renames", "must be a list of [pattern, replacement] pairs of strings")
        for pattern, _ in pairs:
            _check_regex(bad, "renames", pattern)
        fields["renames"] = tuple((a, b) for a, b in pairs)
    for name in ("aligned_layers", "language_layers", "vision_layer_pattern"):
        if name in data:
            if data[name] is not None:
                _check_regex(bad, name, data[name])
            fields[name] = data[name]
    if data.get("vision_layer_pattern") is not None and re.compile(data["vision_layer_pattern"]).groups < 1:
        raise bad("vision_layer_pattern", "needs a group, (\\d+), that captures the vision layer's index")
    for name in ("feature_layer_key", "image_token"):
        if name in data:
            if data[name] is not None and (not isinstance(data[name], str) or not data[name]):
                raise bad(name, "must be a non-empty string")
            fields[name] = data[name]
    if "image_token_id" in data:
        value = data["image_token_id"]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
            raise bad("image_token_id", f"{value!r} must be a token id (a whole number >= 0)")
        fields["image_token_id"] = value
    if data.get("image_token") is not None and data.get("image_token_id") is not None:
        raise bad("image_token_id", "and 'image_token' both name the image token: give one")
    if "image_token" in data:  # the file's choice replaces the preset's, whichever way it names the token
        fields.setdefault("image_token_id", None)
    elif "image_token_id" in data:
        fields["image_token"] = None
    if "prompt" in data:
        prompt = data["prompt"]
        if prompt is not None:
            try:
                ok = isinstance(prompt, str) and bool(chat_template(prompt))
            except ValueError:
                ok = False
            if not ok:
                raise bad("prompt", "must be a string with one {question}, and {answer} only at its end "
                                    "(README, 'Modality rules')")
        fields["prompt"] = prompt
        fields["prompt_replaces_chat_template"] = prompt is not None
    if "task" in data:
        if data["task"] not in TASKS:
            raise bad("task", f"{data['task']!r} is not one of {', '.join(TASKS)}")
        fields["task"] = data["task"]
    if "retrieval_head" in data:
        from multiflow.models.retrieval import RETRIEVAL_HEADS

        if data["retrieval_head"] is not None and data["retrieval_head"] not in RETRIEVAL_HEADS:
            raise bad("retrieval_head", f"{data['retrieval_head']!r} is not one of {', '.join(RETRIEVAL_HEADS)}")
        fields["retrieval_head"] = data["retrieval_head"]
    family = replace(start, **fields) if start is not None else Family(rules=ModalityRules("", (), ()), naming="checkpoint",
                                                                       **fields)
    if family.task == "retrieval" and family.retrieval_head is None:
        raise bad("retrieval_head", "is needed with task retrieval: how the model embeds images and texts "
                                    "(models/retrieval.py's RETRIEVAL_HEADS)")
    if family.converted_to is not None:
        for name in ("renames", "aligned_layers"):
            if name in data:
                raise bad(name, f"does not apply to a {family.naming} checkpoint: it is converted in memory to "
                                f"{family.converted_to}'s layout, whose names are fixed; drop it")
    return replace(family, rules=ModalityRules(f"file:{path.name}", modalities, tuple(rules)))


def _check_regex(bad, name: str, pattern: Any) -> None:
    if not isinstance(pattern, str):
        raise bad(name, f"{pattern!r} must be a regular expression (a string)")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise bad(name, f"{pattern!r} is not a valid regular expression: {exc}") from None


def _read_rules_data(path: Path) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise MultiflowError(f"cannot read rules file {path}: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise MultiflowError(f"rules file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as exc:  # json and yaml raise different types
        mark, problem = getattr(exc, "problem_mark", None), getattr(exc, "problem", None)  # yaml's, in one line
        reason = (f"{problem} at line {mark.line + 1}, column {mark.column + 1}" if mark and problem
                  else " ".join(str(exc).split()))
        raise MultiflowError(f"rules file {path} is not valid {path.suffix.lstrip('.') or 'YAML'}: {reason}") from None


def _unique(items: Iterable[str]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))
