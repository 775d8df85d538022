"""Plain causal LMs as inputs: the family preset, text windows, calibration, run, perplexity, GGUF.

Tiny llama / qwen2 (q/k/v biases) / gemma2 (tied embeddings, logit soft-capping) / phi3 (fused qkv_proj and
gate_up_proj) models built from configs, with a byte-level tokenizer built offline (every text is tokens; it
adds a BOS token).
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open

import multiflow
from multiflow.calibration.calibrate import CalibrationConfig, calibrate
from multiflow.calibration.text_data import SEPARATOR, load_windows, read_documents, tokenize
from multiflow.cli import main
from multiflow.errors import MultiflowError
from multiflow.evaluation.evaluate import EvalConfig, evaluate
from multiflow.models import inventory as layers
from multiflow.models.families import family_for
from multiflow.storage.stats_file import load_stats

SIZES = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=8, pad_token_id=2, bos_token_id=0, eos_token_id=1, max_position_embeddings=256)
FAMILIES = ["llama", "qwen2", "gemma2", "phi3"]
SEQ_LEN = 32
WORDS = ("the a cat dog sat on mat ran fast slow red blue house tree river over under and but why "
         "when there is was not very small large green old new light dark near far").split()


def byte_tokenizer():
    """Byte-level BPE without merges: 256 byte tokens plus <bos> <eos> <pad>; adds <bos> in front."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<bos>": 0, "<eos>": 1, "<pad>": 2, **{c: i + 3 for i, c in enumerate(alphabet)}}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def tiny_lm(model_type: str, seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(model_type, vocab_size=259, **{**SIZES, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # per-tensor scales: layers differ, logits are far from uniform
        for p in model.parameters():
            p.mul_(float(torch.empty(1).uniform_(0.5, 4.0, generator=g)))
    return model.eval()


def english(n: int, seed: int) -> str:
    r = random.Random(seed)
    return "\n".join(" ".join(r.choice(WORDS) for _ in range(r.randint(4, 14))).capitalize() + "." for _ in range(n))


@pytest.fixture(scope="session")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("text") / "corpus.txt"
    path.write_text(english(120, 0))
    return path


@pytest.fixture(scope="session", params=FAMILIES)
def lm(request, tmp_path_factory):
    """(folder, model, tokenizer) of a tiny causal LM of each family."""
    model, tokenizer = tiny_lm(request.param), byte_tokenizer()
    folder = tmp_path_factory.mktemp(request.param) / "lm"
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder, model, tokenizer


def checkpoint_keys(folder) -> set[str]:
    with safe_open(str(folder / "model.safetensors"), "pt") as f:
        return set(f.keys())


def windows_of(tokenizer, text: str, seq_len: int) -> torch.Tensor:
    ids = torch.tensor(tokenizer(text)["input_ids"])
    n = ids.numel() // seq_len
    return ids[: n * seq_len].reshape(n, seq_len)


# --- the family preset ----------------------------------------------------------------------------

@pytest.mark.parametrize("model_type", ["llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text",
                                        "phi3"])
def test_preset_groups_every_decoder_linear_as_text(model_type, tmp_path):
    model = tiny_lm(model_type)
    model.save_pretrained(tmp_path)
    inv = layers.from_checkpoint(tmp_path)
    assert inv.family.name == "causal-lm" and inv.rules.modalities == ("text",) and inv.family.text_only
    linears = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")}
    assert {l.name for l in inv.layers} == linears and {l.modality for l in inv.layers} == {"text"}
    tied = model.config.tie_word_embeddings
    assert tied == ("lm_head.weight" not in checkpoint_keys(tmp_path))  # gemma*: no lm_head tensor
    assert {name for name, _, _ in inv.skipped} == {"model.embed_tokens"} | (set() if tied else {"lm_head"})
    in_memory = layers.from_module(model)
    assert [l.name for l in in_memory.layers] == [l.name for l in inv.layers]
    if model_type == "phi3":  # fused projections are one layer each
        assert "model.layers.0.self_attn.qkv_proj" in linears and "model.layers.0.mlp.gate_up_proj" in linears


def test_family_lookup():
    assert family_for({"model_type": "olmo2", "architectures": ["Olmo2ForCausalLM"]}).name == "causal-lm"
    assert family_for({"model_type": "gemma3_text"}).name == "causal-lm"
    assert family_for({"model_type": "llama", "architectures": ["LlavaLlamaForCausalLM"]}).name == "llava-original"
    assert family_for({"model_type": "llava", "architectures": ["LlavaForConditionalGeneration"]}).name == "llava"
    assert family_for({"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}).name == "gemma3"
    assert family_for({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}) is None


def test_a_causal_lm_laid_out_otherwise_names_its_layers(tmp_path):
    from conftest import write_checkpoint

    write_checkpoint(tmp_path, {"transformer.h.0.mlp.c_fc.weight": torch.ones(4, 4)},
                     {"model_type": "mystery", "architectures": ["MysteryForCausalLM"]})
    with pytest.raises(MultiflowError, match=r"transformer\.h\.0\.mlp\.c_fc.*--rules"):
        layers.from_checkpoint(tmp_path)


# --- text windows ---------------------------------------------------------------------------------

def test_windows_are_the_tokenized_text_cut_in_order(text_file):
    tokenizer = byte_tokenizer()
    expected = windows_of(tokenizer, text_file.read_text(), SEQ_LEN)
    every, report = load_windows(text_file, tokenizer, SEQ_LEN, purpose="evaluation")
    assert torch.equal(torch.stack([w.input_ids for w in every]), expected)
    assert every[0].input_ids[0] == 0 and not (expected[1:, 0] == 0).any()  # one BOS, at the very start
    assert report.available == len(expected) == report.used and report.documents == 1
    assert [w.source for w in every[:2]] == [f"{text_file}@0", f"{text_file}@{SEQ_LEN}"]

    five, _ = load_windows(text_file, tokenizer, SEQ_LEN, nsamples=5, seed=3)
    again, _ = load_windows(text_file, tokenizer, SEQ_LEN, nsamples=5, seed=3)
    three, _ = load_windows(text_file, tokenizer, SEQ_LEN, nsamples=3, seed=3)
    other, _ = load_windows(text_file, tokenizer, SEQ_LEN, nsamples=5, seed=4)
    starts = [int(w.source.rsplit("@", 1)[1]) for w in five]
    assert starts == [int(w.source.rsplit("@", 1)[1]) for w in again] and starts[:3] == [
        int(w.source.rsplit("@", 1)[1]) for w in three]
    assert starts != sorted(starts) and starts != [int(w.source.rsplit("@", 1)[1]) for w in other]
    for w, start in zip(five, starts):
        assert torch.equal(w.input_ids, expected[start // SEQ_LEN])
    ev, _ = load_windows(text_file, tokenizer, SEQ_LEN, nsamples=5, seed=3, purpose="evaluation")
    assert [int(w.source.rsplit("@", 1)[1]) for w in ev] == sorted(starts)  # the same windows, in text order
    many, report = load_windows(text_file, tokenizer, SEQ_LEN, nsamples=10**6)
    assert len(many) == report.available == len(expected)


def test_every_text_format_gives_the_same_documents(tmp_path):
    import datasets

    docs = [english(5, i) for i in range(4)]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs[:2]) + "\n{\"title\": 1}\n"
                                      + "\n".join(json.dumps({"text": d}) for d in docs[2:]) + "\n")
    (tmp_path / "a.json").write_text(json.dumps([{"text": d} for d in docs]))
    folder = tmp_path / "txt"
    (folder / "sub").mkdir(parents=True)
    for i, d in enumerate(docs):  # sorted path order: 0.txt 1.txt sub/2.txt sub/3.txt
        (folder / ("sub" if i >= 2 else "") / f"{i}.txt").write_text(d)
    (folder / "notes.md").write_text("not read")
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"id": [0, 1, 2, 3], "text": docs}),
                                   "test": datasets.Dataset.from_dict({"id": [0], "text": ["held out"]})})
    splits.save_to_disk(str(tmp_path / "hf"))
    datasets.Dataset.from_dict({"body": docs, "n": [1, 2, 3, 4]}).to_parquet(str(tmp_path / "a.parquet"))
    (tmp_path / "pq").mkdir()
    datasets.Dataset.from_dict({"text": docs[:2]}).to_parquet(str(tmp_path / "pq" / "train-00000.parquet"))
    datasets.Dataset.from_dict({"text": ["held out"]}).to_parquet(str(tmp_path / "pq" / "test-00000.parquet"))
    for path, kind in [("a.jsonl", "jsonl"), ("a.json", "json"), ("txt", "text-folder"), ("hf", "hf-disk"),
                       ("a.parquet", "parquet")]:
        source, got_kind, got, skipped = read_documents(tmp_path / path)
        assert got == docs and got_kind == kind, path
        assert skipped == ([("a.jsonl:3", "no string 'text'")] if path == "a.jsonl" else []), path
    assert read_documents(tmp_path / "hf", ("test", "train"))[2] == ["held out"]
    assert read_documents(tmp_path / "pq")[2] == docs[:2]
    assert read_documents(tmp_path / "pq", ("test",))[2] == ["held out"]
    tokenizer = byte_tokenizer()
    windows, report = load_windows(tmp_path / "a.jsonl", tokenizer, 16)
    assert report.documents == 4 and len(report.skipped) == 1
    joined = tokenize(tokenizer, docs)
    assert torch.equal(joined, torch.tensor(tokenizer(SEPARATOR.join(docs))["input_ids"]))
    assert {w.input_ids.tolist().__repr__() for w in windows} == {
        joined[i * 16:(i + 1) * 16].tolist().__repr__() for i in range(joined.numel() // 16)}


def test_text_data_errors(tmp_path, text_file):
    tokenizer = byte_tokenizer()
    with pytest.raises(MultiflowError, match="pass --data"):
        load_windows(None, tokenizer)
    (tmp_path / "short.txt").write_text("Hi.")
    with pytest.raises(MultiflowError, match=r"4 tokens, fewer than one window of --seq-len 32"):
        load_windows(tmp_path / "short.txt", tokenizer, 32)
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    with pytest.raises(MultiflowError, match="bad.jsonl: line 2"):
        load_windows(tmp_path / "bad.jsonl", tokenizer, 2)
    (tmp_path / "none.jsonl").write_text('{"title": "x"}\n')
    with pytest.raises(MultiflowError, match="no text in .*none.jsonl.*none.jsonl:1"):
        load_windows(tmp_path / "none.jsonl", tokenizer, 2)
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(MultiflowError, match="not UTF-8"):
        load_windows(tmp_path / "latin1.txt", tokenizer, 2)
    with pytest.raises(MultiflowError, match="--seq-len 1"):
        load_windows(text_file, tokenizer, 1)
    with pytest.raises(MultiflowError, match="max_position_embeddings"):
        load_windows(text_file, tokenizer, 300, model_config={"max_position_embeddings": 256})
    (tmp_path / "cols").mkdir()
    import datasets

    datasets.Dataset.from_dict({"a": ["x"], "b": ["y"]}).to_parquet(str(tmp_path / "cols" / "x.parquet"))
    with pytest.raises(MultiflowError, match="no 'text' column.*a, b"):
        load_windows(tmp_path / "cols", tokenizer, 2)


# --- calibration ----------------------------------------------------------------------------------

def reference_stats(model, windows: torch.Tensor) -> dict[str, tuple[torch.Tensor, int]]:
    """Every decoder linear's full input, one window at a time, averaged in float64."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.startswith("model.layers.")]
    sums, counts, captured = dict.fromkeys(names, 0), dict.fromkeys(names, 0), {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: captured.__setitem__(n, args[0].detach().double())) for n in names]
    try:
        for ids in windows:
            with torch.no_grad():
                model(input_ids=ids[None], use_cache=False)
            for n in names:
                rows = captured[n].reshape(-1, captured[n].shape[-1])
                sums[n] = sums[n] + rows.square().sum(0)
                counts[n] += rows.shape[0]
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n], counts[n]) for n in names}


def test_calibrate_block_by_block_equals_whole_model_and_the_reference(lm, text_file, tmp_path):
    folder, model, tokenizer = lm
    common = dict(model=folder, data=text_file, nsamples=5, seed=1, batch_size=2, seq_len=SEQ_LEN)
    whole, meta_whole = calibrate(CalibrationConfig(output=tmp_path / "w.safetensors", whole_model=True, **common),
                                  False)
    blocks, meta = calibrate(CalibrationConfig(output=tmp_path / "b.safetensors", samples_per_pass=2, **common), False)
    assert set(blocks) == set(whole)
    for name, st in whole.items():
        assert blocks[name].tokens == st.tokens == 5 * SEQ_LEN, name
        assert torch.equal(blocks[name].sq_mean, st.sq_mean), name  # bit for bit
    assert meta["execution"] == "block by block (2 blocks, 3 passes)" and meta_whole["execution"] == "whole model"
    assert meta["seq_len"] == SEQ_LEN and meta["prompt"] == f"text windows of {SEQ_LEN} tokens"
    assert meta["data"] == str(text_file) and meta["data_kind"] == "text" and meta["nsamples"] == 5
    windows, _ = load_windows(text_file, tokenizer, SEQ_LEN, nsamples=5, seed=1)
    expected = reference_stats(model, torch.stack([w.input_ids for w in windows]))
    assert set(expected) == set(whole)
    for name, (mean, count) in expected.items():
        assert whole[name].tokens == count
        rel = ((whole[name].sq_mean.double() - mean).abs() / mean.abs().clamp_min(1e-30)).max()
        assert rel <= 1e-5, (name, float(rel))
    assert load_stats(tmp_path / "b.safetensors")[1]["seq_len"] == SEQ_LEN


def test_calibrate_refuses_what_a_text_model_cannot_use(lm, text_file, tmp_path, capsys):
    folder, _, _ = lm
    out = tmp_path / "s.safetensors"
    assert main(["calibrate", "--model", str(folder), "--output", str(out)]) == 2
    assert "pass --data" in capsys.readouterr().err and not out.exists()
    assert main(["calibrate", "--model", str(folder), "--data", str(text_file), "--include-answers",
                 "--output", str(out)]) == 2
    assert "--include-answers" in capsys.readouterr().err
    assert main(["calibrate", "--model", str(folder), "--data", str(text_file), "--seq-len", "257",
                 "--output", str(out)]) == 2
    assert "max_position_embeddings (256)" in capsys.readouterr().err and not out.exists()


# --- run / prune: a folder that loads with AutoModelForCausalLM ------------------------------------

def test_run_writes_a_causal_lm_that_loads(lm, text_file, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, model, tokenizer = lm
    report = multiflow.run(folder, tmp_path / "run", 0.5, data=text_file, nsamples=4, seq_len=SEQ_LEN,
                           method="wanda", allocation="uniform", group="row")
    multiflow.calibrate(folder, tmp_path / "s.safetensors", data=text_file, nsamples=4, seq_len=SEQ_LEN)
    multiflow.prune(folder, tmp_path / "steps", 0.5, stats=tmp_path / "s.safetensors", method="wanda",
                    allocation="uniform", group="row")
    weights = [(tmp_path / name / "model.safetensors").read_bytes() for name in ("run", "steps")]
    assert weights[0] == weights[1]
    assert checkpoint_keys(tmp_path / "run") == checkpoint_keys(folder)  # a tied lm_head stays absent
    assert report["modalities"]["text"]["achieved_sparsity"] == 0.5 and report["calibration"]["nsamples"] == 4
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "run").eval()
    assert AutoTokenizer.from_pretrained(tmp_path / "run")("a cat")["input_ids"] == tokenizer("a cat")["input_ids"]
    for name, module in pruned.named_modules():
        if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
            rows_kept = (module.weight != 0).sum(1)
            assert (rows_kept == module.in_features // 2).all(), name  # --group row: half of every row
    dense = dict(model.named_parameters())
    assert torch.equal(pruned.model.embed_tokens.weight, dense["model.embed_tokens.weight"])
    assert torch.equal(pruned.lm_head.weight, model.lm_head.weight)
    if model.config.tie_word_embeddings:
        assert pruned.lm_head.weight.data_ptr() == pruned.model.embed_tokens.weight.data_ptr()


def test_cli_run_sequential_and_magnitude(lm, text_file, tmp_path):
    folder, _, _ = lm
    assert main(["run", "--method", "multiflow", "--model", str(folder), "--data", str(text_file), "--nsamples", "3", "--seq-len", "16",
                 "--target-sparsity", "0.6", "--sequential", "--quiet", "--output", str(tmp_path / "seq")]) == 0
    report = json.loads((tmp_path / "seq" / "multiflow_report.json").read_text())
    assert report["calibration"]["sequential"] and report["calibration"]["prompt"] == "text windows of 16 tokens"
    assert main(["run", "--model", str(folder), "--method", "magnitude", "--structure", "1:4", "--quiet",
                 "--output", str(tmp_path / "mag")]) == 0  # no statistics: no --data needed
    assert json.loads((tmp_path / "mag" / "multiflow_report.json").read_text())["global"]["achieved_sparsity"] == 0.75


# --- eval: perplexity -----------------------------------------------------------------------------

def manual_eval(model, windows: torch.Tensor, reference=None) -> dict[str, float]:
    """One window at a time: mean cross-entropy per window, KL and top-1 written out."""
    nll, kl, agree, tokens = [], 0.0, 0, 0
    for ids in windows:
        with torch.no_grad():
            logits = model(input_ids=ids[None]).logits[0, :-1].double()
            nll.append(float(F.cross_entropy(logits, ids[1:])))
            if reference is not None:
                dense = reference(input_ids=ids[None]).logits[0, :-1].double()
                p, log_p, log_q = dense.softmax(-1), dense.log_softmax(-1), logits.log_softmax(-1)
                kl += float((p * (log_p - log_q)).sum())
                agree += int((dense.argmax(-1) == logits.argmax(-1)).sum())
        tokens += ids.numel() - 1
    mean = sum(nll) / len(nll)  # equal windows: the mean of the means is the mean over tokens
    return {"nll": mean, "perplexity": math.exp(mean), "tokens": tokens, "kl": kl / tokens, "agree": agree / tokens}


def test_perplexity_matches_a_manual_loop(lm, text_file, tmp_path):
    from transformers import AutoModelForCausalLM

    folder, model, tokenizer = lm
    results = evaluate(EvalConfig(model=folder, data=text_file, seq_len=SEQ_LEN, batch_size=3), progress=False)
    windows = windows_of(tokenizer, text_file.read_text(), SEQ_LEN)
    want = manual_eval(model, windows)
    assert results["windows"] == len(windows) and results["tokens"] == want["tokens"] == len(windows) * (SEQ_LEN - 1)
    assert results["nll"] == pytest.approx(want["nll"], rel=1e-6)
    assert results["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert "kl" not in results and results["seq_len"] == SEQ_LEN
    again = evaluate(EvalConfig(model=folder, data=text_file, seq_len=SEQ_LEN, batch_size=3), progress=False)
    assert again == results  # deterministic

    multiflow.prune(folder, tmp_path / "mag", 0.6, method="magnitude")
    drift = multiflow.evaluate(tmp_path / "mag", text_file, reference=folder, seq_len=SEQ_LEN, nsamples=4, seed=2,
                               batch_size=4)  # the public entry point: the same EvalConfig
    chosen, _ = load_windows(text_file, tokenizer, SEQ_LEN, nsamples=4, seed=2, purpose="evaluation")
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "mag").eval()
    want = manual_eval(pruned, torch.stack([w.input_ids for w in chosen]), model)
    assert drift["windows"] == 4 and drift["tokens"] == want["tokens"]
    assert drift["perplexity"] == pytest.approx(want["perplexity"], rel=1e-5)
    assert drift["kl"] == pytest.approx(want["kl"], rel=1e-4) and drift["kl"] > 0
    assert drift["top1_agreement"] == pytest.approx(want["agree"], abs=1.5 / want["tokens"])
    same = evaluate(EvalConfig(model=folder, reference=folder, data=text_file, seq_len=SEQ_LEN, nsamples=2),
                    progress=False)
    assert same["kl"] == 0.0 and same["top1_agreement"] == 1.0


def test_cli_eval_perplexity(lm, text_file, tmp_path, capsys):
    folder, _, _ = lm
    out = tmp_path / "eval.json"
    assert main(["eval", "--model", str(folder), "--reference", str(folder), "--data", str(text_file),
                 "--seq-len", str(SEQ_LEN), "--nsamples", "3", "--output", str(out)]) == 0
    text = capsys.readouterr().out
    results = json.loads(out.read_text())
    assert {"perplexity", "tokens", "kl", "top1_agreement"} <= set(results) and results["tokens"] == 3 * (SEQ_LEN - 1)
    api = multiflow.evaluate(str(folder), str(text_file), reference=str(folder), seq_len=SEQ_LEN, nsamples=3)
    assert json.loads(json.dumps(api)) == results  # the CLI writes what the Python entry point returns
    assert "Perplexity" in text and f"{results['perplexity']:.4f}" in text
    assert main(["eval", "--model", str(folder), "--data", str(text_file), "--seq-len", str(SEQ_LEN), "--nsamples",
                 "3", "--quiet"]) == 0
    assert capsys.readouterr().out.strip() == f"{results['perplexity']:.4f}"
    assert main(["eval", "--model", str(folder)]) == 2
    assert "pass --data" in capsys.readouterr().err


# --- GGUF -----------------------------------------------------------------------------------------

def _permute(w, n_head: int):
    """llama.cpp's q/k row order (convert_hf_to_gguf.py's LlamaModel.permute)."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_gguf(model, tokenizer, path) -> None:
    """A float32 llama GGUF as llama.cpp writes it: its tensor names, q/k rows permuted, no output.weight when tied."""
    import gguf
    import numpy as np

    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_vocab_size(cfg.vocab_size)
    tokens = [t for t, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_merges([])
    writer.add_token_scores([0.0] * len(tokens))
    writer.add_token_types([gguf.TokenType.CONTROL if i < 3 else gguf.TokenType.NORMAL for i in range(len(tokens))])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_pad_token_id(2)
    writer.add_add_bos_token(True)
    outside = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
               "lm_head.weight": "output.weight"}
    inside = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    for key, tensor in model.state_dict().items():
        value = tensor.detach().float().numpy()
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if key in outside:
            writer.add_tensor(outside[key], np.ascontiguousarray(value))
            continue
        _, _, index, *rest = key.removesuffix(".weight").split(".")
        rest = ".".join(rest)
        if rest == "self_attn.q_proj":
            value = _permute(value, cfg.num_attention_heads)
        elif rest == "self_attn.k_proj":
            value = _permute(value, cfg.num_key_value_heads)
        writer.add_tensor(f"blk.{index}.{inside[rest]}.weight", np.ascontiguousarray(value))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_convert_gguf_gives_back_the_weights_and_tokenizer(tmp_path, tied, capsys):
    pytest.importorskip("gguf")
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    model, tokenizer = tiny_lm("llama", seed=3, tie_word_embeddings=tied), byte_tokenizer()
    original = tmp_path / "hf"
    model.save_pretrained(original)
    write_gguf(model, tokenizer, tmp_path / "tiny.gguf")
    out = tmp_path / "converted"
    assert main(["convert-gguf", str(tmp_path / "tiny.gguf"), "--output", str(out)]) == 0
    assert "LlamaForCausalLM" in capsys.readouterr().out
    want, got = load_file(str(original / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(got) == set(want) and ("lm_head.weight" in got) == (not tied)
    for key in want:
        assert torch.equal(got[key], want[key]), key  # q/k rows un-permuted: bit for bit
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] == tied
    text = "The cat sat on the mat, ünïcode and all."
    assert AutoTokenizer.from_pretrained(out)(text)["input_ids"] == tokenizer(text)["input_ids"]
    report = json.loads((out / "multiflow_report.json").read_text())
    assert report["command"] == "convert-gguf" and report["parameters"] == sum(p.numel() for p in model.parameters())
    assert main(["distribute", "--model", str(out), "--target-sparsity", "0.5", "--quiet", "--no-plot",
                 "--output", str(tmp_path / "dist")]) == 0
    assert main(["convert-gguf", str(tmp_path / "tiny.gguf"), "--output", str(out)]) == 2  # no --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert main(["convert-gguf", str(tmp_path / "tiny.gguf"), "--output", str(out), "--overwrite", "--quiet"]) == 0


def test_gguf_errors(tmp_path, monkeypatch, capsys):
    import importlib.util

    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(60))
    assert main(["modalities", "--model", str(tmp_path / "m.gguf")]) == 2
    assert "multiflow convert-gguf" in capsys.readouterr().err
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all")
    assert main(["convert-gguf", str(tmp_path / "fake.gguf"), "--output", str(tmp_path / "o")]) == 2
    assert "is not a GGUF file" in capsys.readouterr().err
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "gguf" else find_spec(name, *a))
    assert main(["convert-gguf", str(tmp_path / "m.gguf"), "--output", str(tmp_path / "o")]) == 2
    assert capsys.readouterr().err.strip().endswith("pip install gguf") and not (tmp_path / "o").exists()
