"""Evaluation metrics on hand-made predictions, and `eval` end to end on a pruned copy."""

import json

import pytest
import torch

from multiflow.evaluation.evaluate import EvalConfig, evaluate, exact_match, normalize, rouge_l
from multiflow.evaluation.reference import kl_and_agreement


def test_normalize_and_exact_match():
    assert normalize("  The Cat, sat!  ") == "the cat sat"
    assert exact_match("Seven.", ["seven"]) == 1.0
    assert exact_match("seven", ["Seven!", "7"]) == 1.0
    assert exact_match("seventy", ["seven"]) == 0.0
    assert exact_match("a cat", ["cat"]) == 0.0  # only case and punctuation are normalised


def test_rouge_l_by_hand():
    # LCS("the cat sat", "the cat") = 2 tokens: P = 2/2, R = 2/3, F = 0.8
    assert rouge_l("the cat", ["the cat sat"]) == pytest.approx(0.8)
    assert rouge_l("dog", ["the cat sat"]) == 0.0
    assert rouge_l("the cat sat", ["dog", "the cat sat"]) == 1.0


def test_kl_and_agreement_by_hand():
    p = torch.tensor([[0.0, 0.0], [2.0, 0.0]])
    q = torch.tensor([[0.0, 0.0], [0.0, 2.0]])
    kl, agree = kl_and_agreement(p, q)
    assert kl[0].item() == pytest.approx(0.0)
    a, b = torch.softmax(torch.tensor([2.0, 0.0], dtype=torch.float64), 0).tolist()
    assert kl[1].item() == pytest.approx(a * (torch.log(torch.tensor(a / b))).item() + b * torch.log(torch.tensor(b / a)).item())
    assert agree.tolist() == [True, False]


@pytest.fixture(scope="module")
def pruned_demo(tmp_path_factory):
    import multiflow
    from multiflow.demo import build_demo_model

    root = tmp_path_factory.mktemp("eval")
    model, processor = build_demo_model(seed=4)
    model.save_pretrained(root / "dense")
    processor.save_pretrained(root / "dense")
    multiflow.prune(root / "dense", root / "pruned", 0.7, method="magnitude")
    records = [{"image": "img.png", "question": f"What is {i}?", "answer": "x y", "kind": "k" + str(i % 2)}
               for i in range(4)]
    from PIL import Image

    Image.new("RGB", (20, 20), (200, 10, 10)).save(root / "img.png")
    (root / "data.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


def test_eval_end_to_end_with_reference(pruned_demo):
    root = pruned_demo
    same = evaluate(EvalConfig(model=root / "dense", reference=root / "dense", data=root / "data.jsonl",
                               batch_size=3, max_new_tokens=4), progress=False)
    assert same["kl"] == pytest.approx(0.0, abs=1e-9) and same["top1_agreement"] == 1.0
    pruned = evaluate(EvalConfig(model=root / "pruned", reference=root / "dense", data=root / "data.jsonl",
                                 batch_size=3, max_new_tokens=4), progress=False)
    assert pruned["kl"] > 0 and pruned["nsamples"] == 4 and set(pruned["per_kind"]) == {"k0", "k1"}
    assert pruned["per_kind"]["k0"]["count"] == 2
    for item in pruned["items"]:  # the reported metrics are those of the recorded predictions
        assert item["exact_match"] == exact_match(item["prediction"], [item["reference"]])
    assert pruned["accuracy"] == sum(i["exact_match"] for i in pruned["items"]) / 4


def test_batched_generation_equals_one_by_one(pruned_demo):
    root = pruned_demo
    a = evaluate(EvalConfig(model=root / "dense", data=root / "data.jsonl", batch_size=4, max_new_tokens=4), False)
    b = evaluate(EvalConfig(model=root / "dense", data=root / "data.jsonl", batch_size=1, max_new_tokens=4), False)
    assert [i["prediction"] for i in a["items"]] == [i["prediction"] for i in b["items"]]


def test_cli_eval_writes_json(pruned_demo, tmp_path, capsys):
    from multiflow.cli import main

    root = pruned_demo
    out = tmp_path / "r.json"
    assert main(["eval", "--model", str(root / "pruned"), "--reference", str(root / "dense"), "--data",
                 str(root / "data.jsonl"), "--output", str(out), "--max-new-tokens", "3"]) == 0
    data = json.loads(out.read_text())
    assert "accuracy" in data and "kl" in data and "Top-1 agree" in capsys.readouterr().out
