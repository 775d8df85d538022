"""Retrieval models (CLIP, SigLIP, SigLIP 2, BLIP retrieval, dual encoders): recall@k and zero-shot on hand-made
embeddings, the family table, image-caption records, and tiny models built from configs through calibrate (whole
model and block by block), run / prune, reload with their class, and eval (CLI and API)."""

from __future__ import annotations

import json
import string

import pytest
import torch
from PIL import Image

import multiflow
from multiflow.calibration.data import load_samples
from multiflow.cli import main
from multiflow.errors import MultiflowError
from multiflow.evaluation.evaluate import EvalConfig, evaluate
from multiflow.evaluation.retrieval import (class_embeddings, first_hit_ranks, image_groups, recall_at_k,
                                            retrieval_scores, top1_agreement, zero_shot_accuracy)
from multiflow.models.families import FAMILIES, family_for
from multiflow.models.retrieval import RETRIEVAL_HEADS
from multiflow.storage.stats_file import load_stats


# --- recall@k on hand-made similarities ------------------------------------------------------------------

def _recall_by_loops(similarity: list[list[float]], relevant: list[list[bool]], k: int) -> float:
    """The obvious reference: per query, candidates sorted by (-score, index), the first k checked one by one."""
    hits = 0
    for scores, rel in zip(similarity, relevant):
        order = sorted(range(len(scores)), key=lambda c: (-scores[c], c))
        hits += any(rel[c] for c in order[:k])
    return hits / len(similarity)


def test_recall_at_k_by_hand():
    # 3 queries over 4 candidates. Query 0: its candidate 2 ranks 1st. Query 1: candidate 0 ranks 3rd
    # (0.5 after 0.9 and 0.7). Query 2: candidates 1 and 3 tie with the top score 0.8; its relevant one
    # is 3, ranked after 1 (ties in candidate order): rank 2.
    sim = torch.tensor([[0.1, 0.2, 0.9, 0.3], [0.5, 0.9, 0.1, 0.7], [0.0, 0.8, 0.2, 0.8]])
    rel = torch.tensor([[0, 0, 1, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=torch.bool)
    assert first_hit_ranks(sim, rel).tolist() == [1, 3, 2]
    assert recall_at_k(sim, rel, (1, 2, 3, 5)) == {1: 1 / 3, 2: 2 / 3, 3: 1.0, 5: 1.0}


def test_recall_at_k_matches_loops_on_random_matrices_with_ties():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        q, c = int(torch.randint(1, 9, (1,), generator=g)), int(torch.randint(1, 9, (1,), generator=g))
        sim = torch.randint(0, 4, (q, c), generator=g).double() / 4  # few distinct values: many ties
        rel = torch.rand(q, c, generator=g) < 0.3
        rel[torch.arange(q), torch.randint(0, c, (q,), generator=g)] = True  # each query has a relevant one
        got = recall_at_k(sim, rel, (1, 2, 5))
        for k in (1, 2, 5):
            assert got[k] == _recall_by_loops(sim.tolist(), rel.tolist(), k)


def test_query_without_relevant_candidate_is_an_error():
    with pytest.raises(ValueError, match="no relevant candidate"):
        recall_at_k(torch.zeros(2, 2), torch.tensor([[True, False], [False, False]]))


def test_perfect_model_gets_recall_one_both_ways():
    # identical embeddings per pair (distinct one-hot rows); image 2 has two captions (records 2 and 3)
    images = torch.eye(4)[:3]
    texts = torch.eye(4)[[0, 1, 2, 2]]
    scores = retrieval_scores(images, texts, [0, 1, 2, 2])
    assert scores["text_to_image"] == {"recall@1": 1.0, "recall@5": 1.0}
    assert scores["image_to_text"] == {"recall@1": 1.0, "recall@5": 1.0}
    assert scores["t2i_ranks"].tolist() == [1, 1, 1, 1]


def test_constant_model_ranks_in_data_order():
    # every similarity ties: each caption's ranking is the image order, so only caption 0 finds its image first
    scores = retrieval_scores(torch.ones(4, 2) / 2 ** 0.5, torch.ones(4, 2) / 2 ** 0.5, [0, 1, 2, 3])
    assert scores["t2i_ranks"].tolist() == [1, 2, 3, 4]
    assert scores["text_to_image"]["recall@1"] == 0.25


def test_zero_shot_and_top1_agreement_by_hand():
    prompts = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])  # class 0: prompt 0; class 1: prompts 1 and 2
    classes = class_embeddings(prompts, torch.tensor([0, 1, 1]), 2)
    mean = torch.tensor([0.3, 0.9]) / torch.tensor([0.3, 0.9]).norm()
    assert torch.allclose(classes[1].float(), mean)
    images = torch.tensor([[1.0, 0.1], [0.1, 1.0], [0.9, 0.5]])  # cosines with class 1 (0.316, 0.949): 0, 1, 0
    assert zero_shot_accuracy(images, torch.tensor([0, 1, 1]), classes) == 2 / 3
    a = torch.tensor([[0.9, 0.1], [0.2, 0.3]])
    assert top1_agreement(a, torch.tensor([[0.5, 0.4], [0.3, 0.2]])) == 0.5


def test_images_are_told_apart_by_pixels():
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    assert image_groups([red, blue, red.copy(), Image.new("RGB", (4, 5), (255, 0, 0))]) == ([0, 1, 0, 2], [0, 1, 3])


# --- families are data -----------------------------------------------------------------------------------

@pytest.mark.parametrize("config,name", [
    ({"model_type": "clip", "architectures": ["CLIPModel"]}, "clip"),
    ({"model_type": "siglip", "architectures": ["SiglipModel"]}, "siglip"),
    ({"model_type": "siglip2", "architectures": ["Siglip2Model"]}, "siglip"),
    ({"model_type": "blip", "architectures": ["BlipForImageTextRetrieval"]}, "blip-retrieval"),
    ({"model_type": "vision-text-dual-encoder", "architectures": ["VisionTextDualEncoderModel"]},
     "vision-text-dual-encoder"),
])
def test_retrieval_families(config, name):
    family = family_for(config)
    assert family.name == name and family.task == "retrieval" and family.retrieval
    assert family.retrieval_head in RETRIEVAL_HEADS


def test_other_blip_and_clip_tower_are_not_retrieval():
    assert family_for({"model_type": "blip", "architectures": ["BlipForQuestionAnswering"]}).task == \
        "image-text-to-text"
    assert not family_for({"model_type": "clip_vision_model", "architectures": ["CLIPVisionModel"]}).retrieval
    for family in FAMILIES:  # a head exactly where the task is retrieval
        assert (family.retrieval_head in RETRIEVAL_HEADS) == family.retrieval, family.name


# --- image-caption records -------------------------------------------------------------------------------

def _caption_records(n: int) -> list[dict]:
    """Image-caption pairs from the bundled demo digits: each evaluation image with 'a handwritten digit <name>'."""
    from multiflow.demo import demo_split

    split = demo_split("evaluation")
    out = []
    for line in split.read_text().splitlines():
        record = json.loads(line)
        if record["kind"] == "identity":
            out.append({"image": str(split.parent / record["image"]), "caption": f"a handwritten digit {record['answer']}",
                        "label": record["answer"]})
    return out[:n]


def test_caption_records_load_with_labels(tmp_path):
    records = _caption_records(3)
    records[1] = {"image": records[1]["image"], "text": "  another caption ", "label": 7}
    records.append({"image": records[0]["image"], "question": "What digit?", "answer": "zero"})
    (tmp_path / "caps.json").write_text(json.dumps(records))
    samples, report = load_samples(tmp_path / "caps.json", 10)
    by_text = {s.question: s for s in samples}
    assert report.used == 4
    assert by_text["another caption"].caption == "another caption" and by_text["another caption"].label == "7"
    assert by_text[records[0]["caption"]].label == records[0]["label"]
    assert by_text["What digit?"].caption is None  # a question is not a caption
    (tmp_path / "bad.jsonl").write_text(json.dumps({"image": records[0]["image"], "caption": "x", "label": 1.5}))
    with pytest.raises(MultiflowError, match="'label' must be a string or a whole number"):
        load_samples(tmp_path / "bad.jsonl")


def test_caption_table_loads_with_labels(tmp_path):
    import datasets

    images = [Image.new("RGB", (8, 6), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    table = datasets.Dataset.from_dict({"image": images, "caption": ["red", " ", "blue"], "label": [3, 4, 5]},
                                       features=datasets.Features({"image": datasets.Image(),
                                                                   "caption": datasets.Value("string"),
                                                                   "label": datasets.Value("int64")}))
    table.to_parquet(str(tmp_path / "pairs.parquet"))
    samples, report = load_samples(tmp_path / "pairs.parquet", 10)
    assert sorted((s.caption, s.label, s.image.getpixel((0, 0))) for s in samples) == [
        ("blue", "5", (0, 0, 255)), ("red", "3", (255, 0, 0))]
    assert report.skipped == [("pairs.parquet[1]", "no question: empty or missing caption text")]


# --- tiny models end to end ------------------------------------------------------------------------------

def _tokenizer(max_length: int = 32):
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3}
    for ch in sorted(set(string.printable) - set("\x0b\x0c\r")):
        vocab.setdefault(ch, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.post_processor = processors.TemplateProcessing(single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)])
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", bos_token="<s>",
                                   eos_token="</s>", model_max_length=max_length)


_VISION = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=16,
               patch_size=8)
_TEXT = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, vocab_size=110,
             max_position_embeddings=64, pad_token_id=0, bos_token_id=2, eos_token_id=3)


def _tiny(kind: str):
    """A tiny retrieval model with random weights (std 0.3: embeddings that differ between inputs) and its processor."""
    import transformers as tf

    tokenizer = _tokenizer()
    if kind == "clip":
        model = tf.CLIPModel(tf.CLIPConfig(vision_config=_VISION, text_config=_TEXT, projection_dim=8))
        images = tf.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        processor = tf.CLIPProcessor(image_processor=images, tokenizer=tokenizer)
    elif kind == "siglip":
        model = tf.SiglipModel(tf.SiglipConfig(vision_config=_VISION, text_config=dict(_TEXT, projection_size=16)))
        processor = tf.SiglipProcessor(image_processor=tf.SiglipImageProcessor(size={"height": 16, "width": 16}),
                                       tokenizer=tokenizer)
    elif kind == "siglip2":  # the processor's defaults: 16-pixel patches, up to 256 of them
        vision = {k: v for k, v in _VISION.items() if k != "image_size"} | {"patch_size": 16, "num_patches": 256}
        model = tf.Siglip2Model(tf.Siglip2Config(vision_config=vision, text_config=dict(_TEXT, projection_size=16)))
        processor = tf.Siglip2Processor(image_processor=tf.Siglip2ImageProcessorPil(), tokenizer=tokenizer)
    elif kind == "dual":  # VisionTextDualEncoderModel: a CLIP vision tower and a BERT text encoder
        config = tf.VisionTextDualEncoderConfig.from_vision_text_configs(
            tf.CLIPVisionConfig(**_VISION), tf.BertConfig(**_TEXT), projection_dim=8)
        model = tf.VisionTextDualEncoderModel(config)
        images = tf.CLIPImageProcessor(size={"shortest_edge": 16}, crop_size={"height": 16, "width": 16})
        processor = tf.VisionTextDualEncoderProcessor(image_processor=images, tokenizer=tokenizer)
    else:
        model = tf.BlipForImageTextRetrieval(tf.BlipConfig(vision_config=_VISION, image_text_hidden_size=8,
                                                           text_config=dict(_TEXT, encoder_hidden_size=16)))
        processor = tf.BlipProcessor(image_processor=tf.BlipImageProcessor(size={"height": 16, "width": 16}),
                                     tokenizer=tokenizer)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model.eval(), processor


KINDS = ("clip", "siglip", "siglip2", "blip", "dual")
CLASSES = {"clip": "CLIPModel", "siglip": "SiglipModel", "siglip2": "Siglip2Model",
           "blip": "BlipForImageTextRetrieval", "dual": "VisionTextDualEncoderModel"}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    (root / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _caption_records(12)))
    for kind in KINDS:
        model, processor = _tiny(kind)
        model.save_pretrained(root / kind)
        processor.save_pretrained(root / kind)
    return root


def run_cli(args, capsys):
    code = main(args)
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("kind", KINDS)
def test_calibrate_whole_model_and_block_by_block_agree(kind, tiny):
    stats = {}
    for whole in (True, False):
        stats[whole], meta = multiflow.calibrate(tiny / kind, tiny / f"{kind}-{whole}.safetensors",
                                                 data=tiny / "caps.jsonl", nsamples=6, batch_size=3, whole_model=whole)
        assert meta["prompt"].startswith("image-caption pairs")
    inventory = multiflow.inventory(tiny / kind)
    assert set(stats[True]) == {layer.name for layer in inventory.layers}  # every prunable layer of both towers
    assert {layer.modality for layer in inventory.layers} == {"vision", "text"}
    assert all(st.tokens > 0 for st in stats[True].values())
    for name, st in stats[True].items():
        assert stats[False][name].tokens == st.tokens
        assert torch.allclose(stats[False][name].sq_mean, st.sq_mean, rtol=1e-5, atol=0)
    if kind == "blip":  # the text encoder runs twice (ITC alone, ITM with cross-attention on the 5 image tokens)
        ffn = stats[True]["text_encoder.encoder.layer.0.intermediate.dense"].tokens
        assert stats[True]["text_encoder.encoder.layer.0.crossattention.self.query"].tokens * 2 == ffn
        assert stats[True]["text_encoder.encoder.layer.0.crossattention.self.key"].tokens == 6 * 5


def test_blip_retrieval_refuses_sequential(tiny):
    with pytest.raises(MultiflowError, match="runs its text blocks twice"):
        multiflow.run(tiny / "blip", tiny / "never", 0.5, data=tiny / "caps.jsonl", nsamples=2, sequential=True, method="multiflow")
    assert not (tiny / "never").exists()


@pytest.mark.parametrize("kind", ("clip", "blip", "dual"))
def test_run_prune_load_eval_via_cli(kind, tiny, capsys):
    import transformers

    out = tiny / f"{kind}-pruned"
    code, printed, err = run_cli(["run", "--method", "multiflow", "--model", str(tiny / kind), "--data", str(tiny / "caps.jsonl"),
                                  "--nsamples", "6", "--batch-size", "3", "--target-sparsity", "0.5",
                                  "--output", str(out), "--quiet"], capsys)
    assert code == 0, err
    report = json.loads((out / "multiflow_report.json").read_text())
    assert set(report["modalities"]) == {"vision", "text"}
    model = getattr(transformers, CLASSES[kind]).from_pretrained(out)
    assert type(model).__name__ == CLASSES[kind]
    for name, layer in report["layers"].items():  # the zeros the report promises are in the loaded weights
        assert int((model.get_submodule(name).weight == 0).sum()) >= layer["pruned"]
    code, printed, err = run_cli(["eval", "--model", str(out), "--reference", str(tiny / kind), "--data",
                                  str(tiny / "caps.jsonl"), "--class-template", "a handwritten digit {label}",
                                  "--output", str(tiny / f"{kind}-eval.json")], capsys)
    assert code == 0, err
    assert "image -> text" in printed and "Zero-shot accuracy" in printed
    results = json.loads((tiny / f"{kind}-eval.json").read_text())
    assert results["task"] == "retrieval" and results["images"] == 12 and results["captions"] == 12
    for direction in ("image_to_text", "text_to_image"):
        assert set(results[direction]) == {"recall@1", "recall@5"}
        assert 0 <= results[direction]["recall@1"] <= results[direction]["recall@5"] <= 1
    assert results["zero_shot"]["templates"] == ["a handwritten digit {label}"]
    assert results["text_to_image"]["recall@1"] == sum(i["t2i_rank"] == 1 for i in results["items"]) / 12
    assert {"text_to_image_top1", "image_to_text_top1", "image_embedding_drift", "text_embedding_drift",
            "zero_shot_prediction"} <= set(results["agreement"])
    assert results["agreement"]["image_embedding_drift"] > 0  # vision weights were pruned
    assert ("kl" in results["agreement"]) == (kind != "blip")  # BLIP's ITC has no learned logit scale


@pytest.mark.parametrize("kind", ("siglip", "siglip2"))
def test_prune_with_stats_and_eval_via_api(kind, tiny):
    stats_path = tiny / f"{kind}-api.safetensors"
    multiflow.calibrate(tiny / kind, stats_path, data=tiny / "caps.jsonl", nsamples=4, batch_size=2)
    report = multiflow.prune(tiny / kind, tiny / f"{kind}-api-pruned", 0.5, stats=stats_path)
    assert report["method"] == "multiflow" and set(report["modalities"]) == {"vision", "text"}
    assert "vision_model.head.attention.out_proj" not in report["layers"]  # MultiheadAttention: skipped by the rules
    same = evaluate(EvalConfig(model=tiny / kind, reference=tiny / kind, data=tiny / "caps.jsonl", nsamples=8),
                    progress=False)
    assert same["agreement"]["text_to_image_top1"] == 1.0 and same["agreement"]["zero_shot_prediction"] == 1.0
    assert same["agreement"]["kl"] == pytest.approx(0.0, abs=1e-12)
    pruned = evaluate(EvalConfig(model=tiny / f"{kind}-api-pruned", reference=tiny / kind, data=tiny / "caps.jsonl",
                                 nsamples=8, batch_size=3), progress=False)
    assert pruned["images"] == 8 and pruned["agreement"]["text_embedding_drift"] > 0
    assert pruned["zero_shot"]["classes"] == sorted({i["label"] for i in pruned["items"]})


def test_eval_needs_captions(tiny, capsys):
    code, _, err = run_cli(["eval", "--model", str(tiny / "clip")], capsys)  # the bundled photos: questions only
    assert code == 2 and "image-caption pair" in err
    code, _, err = run_cli(["eval", "--model", str(tiny / "clip"), "--data", str(tiny / "caps.jsonl"),
                            "--class-template", "a {kind}"], capsys)
    assert code == 2 and "--class-template" in err


def test_eval_is_deterministic(tiny):
    runs = [evaluate(EvalConfig(model=tiny / "blip", data=tiny / "caps.jsonl"), progress=False) for _ in range(2)]
    assert runs[0] == runs[1]
    assert [i["image"] for i in runs[0]["items"]] == list(range(12))  # 12 distinct digit images, one caption each


def test_rules_file_renames_reach_retrieval_eval_and_split_is_refused(tiny, tmp_path):
    """A retrieval checkpoint whose projections are stored under other keys evaluates as the original with the
    rules file's renames (eval --rules, as for pruning); --split-token-types is refused for a retrieval model."""
    import shutil

    from safetensors.torch import load_file, save_file

    renamed = tmp_path / "clip-renamed"
    shutil.copytree(tiny / "clip", renamed)
    tensors = load_file(renamed / "model.safetensors")
    moved = {"visual_projection.weight": "vis_proj.weight", "text_projection.weight": "txt_proj.weight"}
    assert set(moved) <= set(tensors)
    save_file({moved.get(k, k): v for k, v in tensors.items()}, str(renamed / "model.safetensors"),
              metadata={"format": "pt"})
    rules = tmp_path / "rules.yaml"
    rules.write_text("base: clip\nrenames: [['^vis_proj$', 'visual_projection'], ['^txt_proj$', 'text_projection']]\n")
    config = dict(data=tiny / "caps.jsonl", nsamples=6)
    plain = evaluate(EvalConfig(model=tiny / "clip", **config), progress=False)
    by_rules = evaluate(EvalConfig(model=renamed, rules=rules, **config), progress=False)
    assert by_rules["items"] == plain["items"] and by_rules["text_to_image"] == plain["text_to_image"]
    with pytest.raises(MultiflowError, match="a retrieval model reads images and texts in separate towers"):
        multiflow.calibrate(tiny / "clip", tmp_path / "s.safetensors", data=tiny / "caps.jsonl", nsamples=2,
                            split_token_types=True)
    assert not (tmp_path / "s.safetensors").exists()
