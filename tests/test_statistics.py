"""Step 2 statistics and scores against hand computations on tiny tensors and modules."""

import pytest
import torch
from torch import nn

from multiflow.calibration.statistics import collect_statistics, square_sums
from multiflow.errors import MultiflowError
from multiflow.pruning import scores
from multiflow.storage.stats_file import from_collector, load_stats, save_stats


def test_square_sums_by_hand():
    x = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[5.0, 6.0], [7.0, 8.0]]])
    s, n = square_sums(x, None)
    assert n == 4 and s.tolist() == [1 + 9 + 25 + 49, 4 + 16 + 36 + 64]
    s, n = square_sums(x, torch.tensor([[True, False], [False, True]]))
    assert n == 2 and s.tolist() == [1 + 49, 4 + 64]


class Toy(nn.Module):
    """A 'vision' linear (no padding) and a 'language' block whose q and k share an input."""

    def __init__(self):
        super().__init__()
        self.vision = nn.Linear(3, 2)
        self.lm = nn.ModuleDict({"q": nn.Linear(2, 2), "k": nn.Linear(2, 2), "o": nn.Linear(2, 2)})

    def forward(self, pixels, tokens):
        v = self.vision(pixels)
        q, k = self.lm["q"](tokens), self.lm["k"](tokens)
        return v, self.lm["o"](q * k)


def test_collector_matches_hand_computation_and_excludes_padding():
    torch.manual_seed(0)
    toy = Toy()
    pixels = torch.randn(2, 5, 3)
    tokens = torch.randn(2, 4, 2)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    image = torch.tensor([[1, 1, 0, 0], [0, 0, 1, 0]])
    names = ["vision", "lm.q", "lm.k", "lm.o"]
    with collect_statistics(toy, names, r"^lm\.", split_token_types=True) as collector:
        with collector.batch(mask, image):
            _, _ = toy(pixels, tokens)
    stats = from_collector(collector)
    keep = mask.bool()
    assert stats["vision"].tokens == 10
    assert torch.allclose(stats["vision"].sq_mean, pixels.reshape(-1, 3).square().mean(0), rtol=1e-6)
    assert stats["lm.q"].tokens == 6
    expected_q = tokens[keep].square().mean(0)
    assert torch.allclose(stats["lm.q"].sq_mean, expected_q, rtol=1e-6)
    assert torch.equal(stats["lm.q"].sq_mean, stats["lm.k"].sq_mean)
    with torch.no_grad():
        qk = toy.lm["q"](tokens) * toy.lm["k"](tokens)
    assert torch.allclose(stats["lm.o"].sq_mean, qk[keep].square().mean(0), rtol=1e-6)
    img, txt = stats["lm.q"].by_type["image"], stats["lm.q"].by_type["text"]
    assert img[1] == 3 and txt[1] == 3
    assert torch.allclose(img[0], tokens[(image.bool() & keep)].square().mean(0), rtol=1e-6)
    assert torch.allclose(txt[0], tokens[(~image.bool() & keep)].square().mean(0), rtol=1e-6)


def test_running_mean_over_batches_equals_one_batch():
    torch.manual_seed(1)
    toy = Toy()
    pixels, tokens = torch.randn(4, 5, 3), torch.randn(4, 4, 2)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 1, 1], [1, 0, 0, 0]])
    names = ["vision", "lm.q", "lm.o"]
    results = []
    for size in (4, 1, 3):
        with collect_statistics(toy, names, r"^lm\.") as collector:
            for i in range(0, 4, size):
                with collector.batch(mask[i:i + size]):
                    toy(pixels[i:i + size], tokens[i:i + size])
        results.append(from_collector(collector))
    for other in results[1:]:
        for name in names:
            assert other[name].tokens == results[0][name].tokens
            assert torch.allclose(other[name].sq_mean, results[0][name].sq_mean, rtol=1e-6)


def test_hooks_removed_even_on_error():
    toy = Toy()
    with pytest.raises(RuntimeError):
        with collect_statistics(toy, ["vision", "lm.q"], r"^lm\."):
            raise RuntimeError("boom")
    assert not toy.vision._forward_pre_hooks and not toy.lm["q"]._forward_pre_hooks


def test_aligned_layer_outside_a_batch_is_an_error():
    toy = Toy()
    with collect_statistics(toy, ["lm.q"], r"^lm\.") as _:
        with pytest.raises(MultiflowError, match="mask"):
            toy(torch.randn(1, 2, 3), torch.randn(1, 4, 2))
    with pytest.raises(MultiflowError, match="not a module"):
        with collect_statistics(toy, ["nope"], None):
            pass


def test_layer_without_tokens_is_kept_empty_and_round_trips(tmp_path):
    toy = Toy()
    with collect_statistics(toy, ["vision", "lm.q"], r"^lm\.", split_token_types=True) as collector:
        with collector.batch(torch.zeros(1, 4, dtype=torch.long)):
            toy(torch.randn(1, 2, 3), torch.randn(1, 4, 2))
    stats = from_collector(collector)
    assert stats["lm.q"].tokens == 0 and stats["lm.q"].sq_mean is None
    path = save_stats(tmp_path / "s.safetensors", stats, {"nsamples": 1})
    back, meta = load_stats(path)
    assert meta["layers_without_tokens"] == ["lm.q"] and meta["nsamples"] == 1
    assert back["lm.q"].tokens == 0 and back["lm.q"].sq_mean is None
    assert torch.equal(back["vision"].sq_mean, stats["vision"].sq_mean) and back["vision"].tokens == 2


def test_scores_by_hand():
    w = torch.tensor([[1.0, -2.0, 0.5], [0.0, 3.0, -1.0]])
    sq_mean = torch.tensor([4.0, 1.0, 9.0])  # a = [2, 1, 3]
    assert torch.equal(scores.magnitude_score(w), w.abs())
    flow = torch.tensor([[2.0, 2.0, 1.5], [0.0, 3.0, 3.0]])
    assert torch.equal(scores.wanda_score(w, sq_mean), flow)
    imp_out = torch.tensor([5.5 / 3, 6.0 / 3])
    imp_in = torch.tensor([1.0, 2.5, 2.25])
    expected = imp_out[:, None] * w.abs() * imp_in[None, :]
    assert torch.allclose(scores.multiflow_score(w, sq_mean), expected, rtol=0, atol=1e-7)
    assert scores.multiflow_score(w, sq_mean)[0, 1] == pytest.approx(5.5 / 3 * 2 * 2.5)


def test_hooks_work_with_accelerate_offloading():
    """accelerate's cpu_offload keeps weights off the module and wraps forward; the statistics must not change."""
    from accelerate import cpu_offload

    torch.manual_seed(2)
    toy = Toy()
    pixels, tokens = torch.randn(2, 5, 3), torch.randn(2, 4, 2)
    mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1]])
    names = ["vision", "lm.q", "lm.k", "lm.o"]
    results = []
    for offload in (False, True):
        model = Toy()
        model.load_state_dict(toy.state_dict())
        if offload:
            cpu_offload(model, execution_device=torch.device("cpu"))
            assert model.vision.weight.device.type == "meta"
        with collect_statistics(model, names, r"^lm\.") as collector:
            with collector.batch(mask):
                model(pixels, tokens)
        results.append(from_collector(collector))
    for name in names:
        assert results[0][name].tokens == results[1][name].tokens
        assert torch.equal(results[0][name].sq_mean, results[1][name].sq_mean)


def test_shared_input_is_summed_once(monkeypatch):
    """q and k read the same tensor: one square_sums call for both (the cache hits)."""
    import multiflow.calibration.statistics as st

    calls = []
    real = st.square_sums
    monkeypatch.setattr(st, "square_sums", lambda x, keep: calls.append(1) or real(x, keep))
    toy = Toy()
    with collect_statistics(toy, ["lm.q", "lm.k", "lm.o"], r"^lm\.") as collector:
        with collector.batch(torch.ones(1, 4, dtype=torch.long)):
            toy(torch.randn(1, 2, 3), torch.randn(1, 4, 2))
    assert len(calls) == 2  # shared input of q/k once, o's input once
