#!/usr/bin/env python
"""Write a LLaVA-1.5-7B-shaped checkpoint with random fp16 weights (benchmark input).

The layout is that of the `llava-hf/llava-1.5-7b-hf` hub repository (key names
of transformers 4.x): sharded safetensors (`model-0000K-of-0000N.safetensors`,
at most ~5 GB each), `model.safetensors.index.json` with `metadata.total_size`
and a `weight_map` naming every key's shard, and a `config.json` with
`model_type: llava`.

    python benchmarks/make_llava7b_checkpoint.py /work/bench/llava-7b-hub-fp16

7,063,427,072 parameters, 14.1 GB. `--size 13b`: LLaVA-1.5-13B's shape (decoder 40 x hidden 5120,
MLP 13824, 40 heads; the same CLIP tower), 13,351,494,656 parameters, 26.7 GB. Weights are N(0, s^2) with s drawn per
tensor, log-uniformly in [0.005, 0.05], so layers differ and so do their
sparsities under a global magnitude threshold. Every tensor has its own
generator, seeded from (--seed, tensor index): the output depends only on the
seed (and torch's CPU normal_ implementation), not on threads or order.

Memory stays at about one shard (the shard's tensors plus safetensors' copy
while it writes: ~10 GB peak for 5 GB shards). A folder that is already
complete (index, config and every shard of the expected size) is left as is
unless --force. Processor files (tokenizer, image processor, chat template; see
`write_processor`) are written next to the weights, so that `multiflow calibrate` and
`run` can use the folder.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from safetensors.torch import save_file

EXPECTED_VISION_LINEAR = 302_211_072
# per --size: (hidden, MLP, decoder layers, heads, name of the LLM), and (total, projector, decoder linear) parameters
SIZES = {
    "7b": ((4096, 11008, 32, 32, "lmsys/vicuna-7b-v1.5"), (7_063_427_072, 20_979_712, 6_476_005_376)),
    "13b": ((5120, 13824, 40, 40, "lmsys/vicuna-13b-v1.5"), (13_351_494_656, 31_467_520, 12_687_769_600)),
}

V_HIDDEN, V_INTER, V_LAYERS, V_HEADS, V_IMAGE, V_PATCH = 1024, 4096, 24, 16, 336, 14
T_HIDDEN, T_INTER, T_LAYERS, T_HEADS, T_NAME = SIZES["7b"][0]  # --size sets them
T_VOCAB = 32064
SCALE_MIN, SCALE_MAX = 0.005, 0.05


def config() -> dict:
    """config.json of llava-hf/llava-1.5-7b-hf, with the defaults it relies on written out."""
    return {
        "architectures": ["LlavaForConditionalGeneration"],
        "model_type": "llava",
        "ignore_index": -100,
        "image_token_index": 32000,
        "pad_token_id": 32001,
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": False,
        "torch_dtype": "float16",
        "vision_feature_layer": -2,
        "vision_feature_select_strategy": "default",
        "image_seq_length": 576,
        "vocab_size": T_VOCAB,
        "text_config": {
            "_name_or_path": T_NAME,
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": T_HIDDEN,
            "intermediate_size": T_INTER,
            "num_hidden_layers": T_LAYERS,
            "num_attention_heads": T_HEADS,
            "num_key_value_heads": T_HEADS,
            "hidden_act": "silu",
            "max_position_embeddings": 4096,
            "rms_norm_eps": 1e-05,
            "attention_bias": False,
            "mlp_bias": False,
            "tie_word_embeddings": False,
            "torch_dtype": "float16",
            "vocab_size": T_VOCAB,
        },
        "vision_config": {
            "model_type": "clip_vision_model",
            "hidden_size": V_HIDDEN,
            "intermediate_size": V_INTER,
            "num_hidden_layers": V_LAYERS,
            "num_attention_heads": V_HEADS,
            "image_size": V_IMAGE,
            "patch_size": V_PATCH,
            "num_channels": 3,
            "hidden_act": "quick_gelu",
            "layer_norm_eps": 1e-05,
            "projection_dim": 768,
            "vocab_size": 32000,
        },
        "_benchmark_note": "random weights written by multiflow benchmarks/make_llava7b_checkpoint.py",
    }


def tensor_specs() -> list[tuple[str, tuple[int, ...]]]:
    """Every (key, shape) of the checkpoint, in the model's state-dict order (hub / 4.x names)."""
    specs: list[tuple[str, tuple[int, ...]]] = []
    v = "vision_tower.vision_model."
    n_pos = (V_IMAGE // V_PATCH) ** 2 + 1  # 577
    specs += [
        (v + "embeddings.class_embedding", (V_HIDDEN,)),
        (v + "embeddings.patch_embedding.weight", (V_HIDDEN, 3, V_PATCH, V_PATCH)),
        (v + "embeddings.position_embedding.weight", (n_pos, V_HIDDEN)),
        (v + "pre_layrnorm.weight", (V_HIDDEN,)),
        (v + "pre_layrnorm.bias", (V_HIDDEN,)),
    ]
    for i in range(V_LAYERS):
        p = f"{v}encoder.layers.{i}."
        for proj in ("k_proj", "v_proj", "q_proj", "out_proj"):
            specs += [(p + f"self_attn.{proj}.weight", (V_HIDDEN, V_HIDDEN)), (p + f"self_attn.{proj}.bias", (V_HIDDEN,))]
        specs += [(p + "layer_norm1.weight", (V_HIDDEN,)), (p + "layer_norm1.bias", (V_HIDDEN,))]
        specs += [(p + "mlp.fc1.weight", (V_INTER, V_HIDDEN)), (p + "mlp.fc1.bias", (V_INTER,))]
        specs += [(p + "mlp.fc2.weight", (V_HIDDEN, V_INTER)), (p + "mlp.fc2.bias", (V_HIDDEN,))]
        specs += [(p + "layer_norm2.weight", (V_HIDDEN,)), (p + "layer_norm2.bias", (V_HIDDEN,))]
    specs += [(v + "post_layernorm.weight", (V_HIDDEN,)), (v + "post_layernorm.bias", (V_HIDDEN,))]
    specs += [
        ("multi_modal_projector.linear_1.weight", (T_HIDDEN, V_HIDDEN)),
        ("multi_modal_projector.linear_1.bias", (T_HIDDEN,)),
        ("multi_modal_projector.linear_2.weight", (T_HIDDEN, T_HIDDEN)),
        ("multi_modal_projector.linear_2.bias", (T_HIDDEN,)),
    ]
    t = "language_model.model."
    specs.append((t + "embed_tokens.weight", (T_VOCAB, T_HIDDEN)))
    for i in range(T_LAYERS):
        p = f"{t}layers.{i}."
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            specs.append((p + f"self_attn.{proj}.weight", (T_HIDDEN, T_HIDDEN)))
        specs += [
            (p + "mlp.gate_proj.weight", (T_INTER, T_HIDDEN)),
            (p + "mlp.up_proj.weight", (T_INTER, T_HIDDEN)),
            (p + "mlp.down_proj.weight", (T_HIDDEN, T_INTER)),
            (p + "input_layernorm.weight", (T_HIDDEN,)),
            (p + "post_attention_layernorm.weight", (T_HIDDEN,)),
        ]
    specs.append((t + "norm.weight", (T_HIDDEN,)))
    specs.append(("language_model.lm_head.weight", (T_VOCAB, T_HIDDEN)))
    return specs


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def check_counts(specs: list[tuple[str, tuple[int, ...]]], expected: tuple[int, int, int]) -> int:
    total = sum(numel(s) for _, s in specs)
    keys = [k for k, _ in specs]
    assert len(keys) == len(set(keys)), "duplicate keys"

    def linear(prefix: str, weights_only: bool = False) -> tuple[int, int]:
        """(number of nn.Linear layers, their params incl. biases) under prefix."""
        shapes = dict(specs)
        names = [k[: -len(".weight")] for k, s in specs if k.startswith(prefix) and k.endswith(".weight") and len(s) == 2
                 and "embed" not in k and "lm_head" not in k]
        params = sum(numel(shapes[n + ".weight"]) + (numel(shapes[n + ".bias"]) if n + ".bias" in shapes else 0) for n in names)
        return len(names), params

    nv, pv = linear("vision_tower.")
    npj, ppj = linear("multi_modal_projector.")
    nd, pd = linear("language_model.model.layers.")
    expected_total, expected_projector, expected_decoder = expected
    assert (nv, pv) == (144, EXPECTED_VISION_LINEAR), (nv, pv)
    assert (npj, ppj) == (2, expected_projector), (npj, ppj)
    assert (nd, pd) == (7 * T_LAYERS, expected_decoder), (nd, pd)
    assert total == expected_total, f"total parameters {total:,} != {expected_total:,}"
    return total


def plan_shards(specs, max_shard_bytes: int, itemsize: int = 2) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Greedy, in order, like transformers' save_pretrained: a new shard when the next tensor would overflow."""
    shards: list[list] = [[]]
    size = 0
    for key, shape in specs:
        nbytes = numel(shape) * itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((key, shape))
        size += nbytes
    return shards


def shard_name(i: int, n: int) -> str:
    return f"model-{i + 1:05d}-of-{n:05d}.safetensors"


def is_complete(out: Path, shards, total_bytes: int) -> bool:
    index = out / "model.safetensors.index.json"
    if not (index.is_file() and (out / "config.json").is_file()):
        return False
    try:
        data = json.loads(index.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    wm = data.get("weight_map", {})
    n = len(shards)
    expected = {k: shard_name(i, n) for i, shard in enumerate(shards) for k, _ in shard}
    if wm != expected or data.get("metadata", {}).get("total_size") != total_bytes:
        return False
    for i, shard in enumerate(shards):
        path = out / shard_name(i, n)
        data_bytes = sum(numel(s) * 2 for _, s in shard)
        if not path.is_file() or path.stat().st_size < data_bytes + 8:
            return False
    return True


def make_tensor(index: int, key: str, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed * 1_000_003 + index)
    u = torch.rand((), generator=g, dtype=torch.float64).item()
    scale = SCALE_MIN * (SCALE_MAX / SCALE_MIN) ** u  # log-uniform
    out = torch.empty(shape, dtype=torch.float16)
    out.normal_(0.0, scale, generator=g)  # drawn in float, stored as fp16, no fp32 copy of the tensor
    return out


def transformers_specs(cfg: dict) -> dict[str, tuple[int, ...]]:
    """{key: shape} of transformers' LlavaForConditionalGeneration for this config.json (built on the meta
    device, nothing allocated), under the hub / 4.x key names this script writes."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    with torch.device("meta"):
        model = LlavaForConditionalGeneration(LlavaConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    theirs = {}
    for k, v in model.state_dict().items():
        # transformers >= 4.52 names -> hub / 4.x names
        for new, old in (("model.vision_tower.", "vision_tower."), ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("model.language_model.", "language_model.model."), ("lm_head.", "language_model.lm_head.")):
            if k.startswith(new):
                k = old + k[len(new):]
                break
        if k.startswith("vision_tower.") and not k.startswith("vision_tower.vision_model."):
            k = "vision_tower.vision_model." + k[len("vision_tower."):]  # newer versions drop the CLIPVisionModel wrapper
        theirs[k] = tuple(v.shape)
    return theirs


def compare_specs(ours: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]]) -> str | None:
    """None when the keys and shapes are the same, else what differs (a few of each kind)."""
    if ours == theirs:
        return None
    only_ours = sorted(set(ours) - set(theirs))[:5]
    only_theirs = sorted(set(theirs) - set(ours))[:5]
    shape_diff = [(k, ours[k], theirs[k]) for k in ours if k in theirs and ours[k] != theirs[k]][:5]
    return f"only in the checkpoint {only_ours}, only in transformers {only_theirs}, shapes {shape_diff}"


def verify_with_transformers(specs) -> None:
    """Compare keys and shapes with transformers' LlavaForConditionalGeneration built on the meta device."""
    diff = compare_specs(dict(specs), transformers_specs(config()))
    if diff:
        raise SystemExit(f"differs from transformers: {diff}")
    print(f"keys and shapes match transformers LlavaForConditionalGeneration ({len(specs)} tensors)")


def write_processor(out: Path) -> None:
    """Processor files for calibration: a character-level tokenizer padded to the 32,064-token vocabulary with
    `<image>` at 32000 and `<pad>` at 32001 (as llava-hf), CLIP's 336 px image processor (576 image tokens),
    the LLaVA-1.5 chat template. The real Llama tokenizer is not reachable offline; token ids only index
    random embeddings here, so what matters is the prompt length (576 image + ~60 text tokens)."""
    import string

    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    from multiflow.models.prompts import LLAVA_15_CHAT_TEMPLATE

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in sorted(set(string.printable) - set("\x0b\x0c\r")):
        vocab.setdefault(ch, len(vocab))
    while len(vocab) < 32000:
        vocab[f"<unused{len(vocab)}>"] = len(vocab)
    vocab["<image>"], vocab["<pad>"] = 32000, 32001
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                        eos_token="</s>", extra_special_tokens={"image_token": "<image>"})
    images = CLIPImageProcessor(size={"shortest_edge": V_IMAGE}, crop_size={"height": V_IMAGE, "width": V_IMAGE})
    LlavaProcessor(image_processor=images, tokenizer=tokenizer, patch_size=V_PATCH,
                   vision_feature_select_strategy="default", chat_template=LLAVA_15_CHAT_TEMPLATE,
                   num_additional_image_tokens=1).save_pretrained(out)


def main(argv: list[str] | None = None) -> int:
    global T_HIDDEN, T_INTER, T_LAYERS, T_HEADS, T_NAME, V_LAYERS, T_VOCAB  # --size, --text-layers etc.
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("out_dir", type=Path)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-shard-gb", type=float, default=5.0, help="largest shard, in 10^9 bytes (default 5)")
    ap.add_argument("--threads", type=int, default=2, help="tensors generated in parallel (default 2)")
    ap.add_argument("--force", action="store_true", help="regenerate even if the folder is complete")
    ap.add_argument("--size", choices=sorted(SIZES), default="7b",
                    help="LLaVA-1.5-7B's shape (default) or 13B's (decoder 40 x 5120, MLP 13824; 26.7 GB)")
    ap.add_argument("--text-layers", type=int, default=None,
                    help="decoder layers (default: the size's, 32 or 40; fewer: a smaller checkpoint for quick runs)")
    ap.add_argument("--vision-layers", type=int, default=V_LAYERS, help=f"CLIP layers (default {V_LAYERS})")
    ap.add_argument("--vocab", type=int, default=T_VOCAB, help=f"vocabulary rows of embed_tokens and lm_head "
                    f"(default {T_VOCAB}; no processor files are written with another value)")
    ap.add_argument("--verify-with-transformers", action="store_true",
                    help="also check keys/shapes against transformers' LlavaForConditionalGeneration (meta device)")
    args = ap.parse_args(argv)
    (T_HIDDEN, T_INTER, T_LAYERS, T_HEADS, T_NAME), expected = SIZES[args.size]
    args.text_layers = T_LAYERS if args.text_layers is None else args.text_layers
    full = (args.text_layers, args.vision_layers, args.vocab) == (T_LAYERS, V_LAYERS, T_VOCAB)
    T_LAYERS, V_LAYERS, T_VOCAB = args.text_layers, args.vision_layers, args.vocab

    specs = tensor_specs()
    total = check_counts(specs, expected) if full else sum(numel(s) for _, s in specs)
    total_bytes = total * 2
    print(f"total parameters: {total:,} ({total_bytes / 1e9:.2f} GB fp16, {len(specs)} tensors)")
    if args.verify_with_transformers:
        verify_with_transformers(specs)

    shards = plan_shards(specs, int(args.max_shard_gb * 1e9))
    n = len(shards)
    out: Path = args.out_dir
    if not args.force and is_complete(out, shards, total_bytes):
        print(f"{out} is already complete ({n} shards); pass --force to regenerate")
        if T_VOCAB == 32064:
            write_processor(out)
        return 0

    out.mkdir(parents=True, exist_ok=True)
    index_path = out / "model.safetensors.index.json"
    index_path.unlink(missing_ok=True)  # the index is written last: its presence marks a complete folder
    for stale in out.glob("model-*-of-*.safetensors"):
        stale.unlink()
    (out / "config.json").write_text(json.dumps(config(), indent=2) + "\n")

    torch.set_num_threads(1)  # parallelism comes from generating `--threads` tensors at once
    order = {k: i for i, (k, _) in enumerate(specs)}
    weight_map: dict[str, str] = {}
    t_all = time.perf_counter()
    t_gen = t_write = 0.0
    with ThreadPoolExecutor(max(1, args.threads)) as pool:
        for i, shard in enumerate(shards):
            name = shard_name(i, n)
            t0 = time.perf_counter()
            tensors = dict(zip([k for k, _ in shard],
                               pool.map(lambda ks: make_tensor(order[ks[0]], ks[0], ks[1], args.seed), shard)))
            t1 = time.perf_counter()
            tmp = out / (name + ".tmp")
            save_file(tensors, str(tmp), metadata={"format": "pt"})
            os.chmod(tmp, 0o644)  # safetensors creates the file 0600
            os.replace(tmp, out / name)
            t2 = time.perf_counter()
            nbytes = sum(t.numel() * 2 for t in tensors.values())
            del tensors
            t_gen += t1 - t0
            t_write += t2 - t1
            weight_map.update({k: name for k, _ in shard})
            print(f"  {name}: {len(shard)} tensors, {nbytes / 1e9:.2f} GB, generate {t1 - t0:.1f} s, write {t2 - t1:.1f} s",
                  flush=True)
    index = {"metadata": {"total_size": total_bytes, "total_parameters": total}, "weight_map": weight_map}
    tmp = index_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    os.replace(tmp, index_path)
    print(f"wrote {out}: {n} shards, {total:,} parameters, {total_bytes / 1e9:.2f} GB "
          f"in {time.perf_counter() - t_all:.1f} s (generate {t_gen:.1f} s, write {t_write:.1f} s)")
    if T_VOCAB == 32064:  # the processor's tokenizer is padded to this vocabulary
        write_processor(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
