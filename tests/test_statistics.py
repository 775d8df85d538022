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


@pytest.mark.parametrize("rows", [1, 255, 256, 257, 700])
def test_bf16_square_sums_within_1e5_of_a_float64_sum(rows):
    """bfloat16 inputs: one pass over the bits, float32 chunk sums, float64 total; every mask, chunk edges."""
    import multiflow.calibration.statistics as st

    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 37, generator=g) * torch.logspace(-3, 3, 37)).bfloat16()
    x[0, 0] = 0
    keep = torch.rand(rows, generator=g) > 0.3
    image = keep & (torch.rand(rows, generator=g) > 0.5)
    got = st.masked_square_sums(x, [keep, image, keep & ~image, None])
    for (sums, n), mask in zip(got, [keep, image, keep & ~image, torch.ones(rows, dtype=torch.bool)]):
        exact = (x.double().square() * mask.double()[:, None]).sum(0)
        assert n == int(mask.sum()) and sums.dtype == torch.float64
        assert torch.all((sums - exact).abs() <= 1e-5 * exact)


def test_float32_square_sums_are_the_plain_product_bit_for_bit():
    """Asking for several masks at once squares once and changes no float32 bit."""
    import multiflow.calibration.statistics as st

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 50, 64, generator=g)
    keep = torch.rand(3, 50, generator=g) > 0.2
    image = keep & (torch.rand(3, 50, generator=g) > 0.5)
    got = st.masked_square_sums(x, [keep, image, None])
    rows = x.reshape(-1, 64)
    assert torch.equal(got[0][0], (keep.reshape(-1).float() @ rows.square()).double())
    assert torch.equal(got[1][0], (image.reshape(-1).float() @ rows.square()).double())
    assert torch.equal(got[2][0], rows.square().sum(0).double())


def test_bf16_square_sums_flag_non_finite_inputs():
    import multiflow.calibration.statistics as st

    x = torch.ones(300, 8, dtype=torch.bfloat16)
    x[299, 3] = float("inf")
    x[5, 1] = 1e20  # its square is beyond float32
    sums, _ = st.square_sums(x, None)
    assert torch.isinf(sums[3]) and torch.isinf(sums[1]) and torch.isfinite(sums[[0, 2, 4]]).all()


def test_split_statistics_square_each_input_once(monkeypatch):
    """With image/text statistics, all three sums of an input come from one masked_square_sums call."""
    import multiflow.calibration.statistics as st

    calls = []
    real = st.masked_square_sums
    monkeypatch.setattr(st, "masked_square_sums", lambda x, keeps: calls.append(len(keeps)) or real(x, keeps))
    toy = Toy()
    with collect_statistics(toy, ["lm.q", "lm.k", "lm.o"], r"^lm\.", split_token_types=True) as collector:
        with collector.batch(torch.ones(1, 4, dtype=torch.long), torch.tensor([[1, 1, 0, 0]])):
            toy(torch.randn(1, 2, 3), torch.randn(1, 4, 2))
    assert calls == [3, 3]  # q/k's shared input, then o's: three masks each, one call


def test_bf16_calibration_statistics_within_bf16_rounding_of_float32(tmp_path):
    """The stated tolerance of `--dtype bfloat16`: on the bundled model (16 samples, split by token type), each
    layer's statistics are within 2^-6 of the float32 run's in relative L2 norm, and their median per-feature
    relative difference within 2^-7 (bfloat16 keeps 8 bits: the forward's rounding, not the statistics' sums)."""
    from multiflow import api
    from multiflow.demo import TRAINED as DEMO_MODEL
    from multiflow.storage.stats_file import load_stats

    runs = {}
    for dtype in ("float32", "bfloat16"):
        api.calibrate(DEMO_MODEL, tmp_path / f"{dtype}.safetensors", nsamples=16, dtype=dtype, split_token_types=True)
        runs[dtype], _ = load_stats(tmp_path / f"{dtype}.safetensors")
    assert runs["float32"].keys() == runs["bfloat16"].keys()
    for name, exact in runs["float32"].items():
        for kind, (ref, got) in {"all": (exact.sq_mean, runs["bfloat16"][name].sq_mean),
                                 **{t: (exact.by_type[t][0], runs["bfloat16"][name].by_type[t][0])
                                    for t in exact.by_type if exact.by_type[t][0] is not None}}.items():
            ref, got = ref.double(), got.double()
            assert (got - ref).norm() <= 2**-6 * ref.norm(), (name, kind)
            assert ((got - ref).abs() / ref.clamp_min(1e-30)).median() <= 2**-7, (name, kind)
