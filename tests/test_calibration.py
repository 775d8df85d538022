"""Step 2 end to end on a tiny LLaVA with a processor, against an independent reference."""

import json

import pytest
import torch

from multiflow.calibration.calibrate import CalibrationConfig, calibrate
from multiflow.cli import main
from multiflow.errors import MultiflowError
from multiflow.models.prompts import build_prompt
from multiflow.storage.stats_file import load_stats


def reference_stats(model, processor, samples, include_answers):
    """Capture every prunable layer's full input, one sample at a time, and average in float64."""
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    sums = {n: 0 for n in names}
    counts = {n: 0 for n in names}
    captured = {}
    handles = [model.get_submodule(n).register_forward_pre_hook(
        lambda mod, args, n=n: captured.__setitem__(n, args[0].detach().double())) for n in names]
    try:
        for s in samples:
            prompt = build_prompt(processor, s.question, s.answer if include_answers else None)
            inputs = processor(images=[s.image], text=[prompt], return_tensors="pt")
            with torch.no_grad():
                model(**inputs, use_cache=False)
            for n in names:
                rows = captured[n].reshape(-1, captured[n].shape[-1])
                sums[n] = sums[n] + rows.square().sum(0)
                counts[n] += rows.shape[0]
    finally:
        for h in handles:
            h.remove()
    return {n: (sums[n] / counts[n], counts[n]) for n in names}


@pytest.mark.parametrize("include_answers", [False, True])
def test_stats_match_reference(demo, jsonl, tmp_path, include_answers):
    from multiflow.calibration.data import load_samples

    folder, model, processor = demo
    config = CalibrationConfig(model=folder, output=tmp_path / "stats.safetensors", data=jsonl, nsamples=5,
                               batch_size=2, include_answers=include_answers)
    calibrate(config, progress=False)
    stats, meta = load_stats(tmp_path / "stats.safetensors")
    samples, _ = load_samples(jsonl, 5, 0)
    expected = reference_stats(model.eval(), processor, samples, include_answers)
    assert set(stats) == set(expected)
    for name, (mean, count) in expected.items():
        assert stats[name].tokens == count, name
        rel = ((stats[name].sq_mean.double() - mean).abs() / mean.abs().clamp_min(1e-30)).max()
        assert rel <= 1e-5, (name, float(rel))
    assert meta["nsamples"] == 5 and meta["naming"] == "transformers"
    assert meta["prompt"] == ("with answers" if include_answers else "ends at the answer slot")


def test_batch_size_does_not_change_result(demo, jsonl, tmp_path):
    folder, _, _ = demo
    results = []
    for bs in (1, 3, 5):
        out = tmp_path / f"s{bs}.safetensors"
        calibrate(CalibrationConfig(model=folder, output=out, data=jsonl, nsamples=5, batch_size=bs,
                                    split_token_types=True), progress=False)
        results.append(load_stats(out)[0])
    for other in results[1:]:
        for name, st in results[0].items():
            assert other[name].tokens == st.tokens
            assert torch.allclose(other[name].sq_mean, st.sq_mean, rtol=1e-5, atol=0)
            for kind, (mean, tokens) in st.by_type.items():
                assert other[name].by_type[kind][1] == tokens


def test_split_token_types_partition_the_language_model_tokens(demo, jsonl, tmp_path):
    folder, _, processor = demo
    out = tmp_path / "s.safetensors"
    calibrate(CalibrationConfig(model=folder, output=out, data=jsonl, nsamples=5, split_token_types=True),
              progress=False)
    stats, _ = load_stats(out)
    lm = stats["model.language_model.layers.0.self_attn.q_proj"]
    image, text = lm.by_type["image"], lm.by_type["text"]
    assert image[1] == 5 * 16 and image[1] + text[1] == lm.tokens
    merged = (image[0].double() * image[1] + text[0].double() * text[1]) / lm.tokens
    assert torch.allclose(merged.float(), lm.sq_mean, rtol=1e-5)
    assert not stats["model.vision_tower.encoder.layers.0.mlp.fc1"].by_type


def test_cli_calibrate_and_bad_inputs(demo, jsonl, tmp_path, capsys):
    folder, _, _ = demo
    out = tmp_path / "stats.safetensors"
    assert main(["calibrate", "--model", str(folder), "--data", str(jsonl), "--nsamples", "2",
                 "--output", str(out)]) == 0
    text = capsys.readouterr().out
    assert "MULTIFLOW Step 2" in text and str(out) in text and out.is_file()
    assert main(["calibrate", "--model", str(folder), "--data", str(tmp_path / "missing.jsonl"),
                 "--output", str(tmp_path / "x.safetensors")]) == 2
    assert "missing.jsonl" in capsys.readouterr().err and not (tmp_path / "x.safetensors").exists()
    assert main(["calibrate", "--model", str(folder), "--nsamples", "0", "--output", str(tmp_path / "y")]) == 2
    assert "--nsamples" in capsys.readouterr().err


def test_model_without_processor_is_a_clear_error(llava, tmp_path):
    _, folders = llava
    with pytest.raises(MultiflowError, match="processor"):
        calibrate(CalibrationConfig(model=folders["hf5"], output=tmp_path / "s.safetensors", nsamples=1),
                  progress=False)
    assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.slow
def test_run_equals_calibrate_then_prune(demo, jsonl, tmp_path, capsys):
    import multiflow

    folder, _, _ = demo
    report = multiflow.run(folder, tmp_path / "run", 0.5, data=jsonl, nsamples=3, batch_size=2, method="multiflow")
    multiflow.calibrate(folder, tmp_path / "s.safetensors", data=jsonl, nsamples=3, batch_size=2)
    step_by_step = multiflow.prune(folder, tmp_path / "steps", 0.5, stats=tmp_path / "s.safetensors")
    assert report["layers"] == step_by_step["layers"] and report["calibration"]["nsamples"] == 3
    assert (tmp_path / "run" / "model.safetensors").read_bytes() == (tmp_path / "steps" / "model.safetensors").read_bytes()
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    LlavaForConditionalGeneration.from_pretrained(tmp_path / "run")
    AutoProcessor.from_pretrained(tmp_path / "run")
    assert main(["run", "--model", str(folder), "--data", str(jsonl), "--nsamples", "2", "--target-sparsity", "0.3",
                 "--method", "wanda", "--allocation", "uniform", "--output", str(tmp_path / "cli")]) == 0
    assert json.loads((tmp_path / "cli" / "multiflow_report.json").read_text())["allocation"] == "uniform"
    assert main(["run", "--method", "multiflow", "--model", str(folder), "--output", str(tmp_path / "x")]) == 2
    assert "--target-sparsity" in capsys.readouterr().err and not (tmp_path / "x").exists()


def test_original_layout_converted_on_the_fly_equals_hf(demo, jsonl, tmp_path):
    """The demo model written in the original LLaVA layout (+ a separate CLIP folder) calibrates identically."""
    from conftest import original_key, original_with_clip_folder

    folder, model, processor = demo
    original, clip = original_with_clip_folder(model, processor, tmp_path)

    with pytest.raises(MultiflowError, match="--vision-tower"):
        calibrate(CalibrationConfig(model=original, output=tmp_path / "x.safetensors", data=jsonl, nsamples=2),
                  progress=False)
    calibrate(CalibrationConfig(model=original, output=tmp_path / "o.safetensors", data=jsonl, nsamples=4,
                                vision_tower=clip), progress=False)
    calibrate(CalibrationConfig(model=folder, output=tmp_path / "h.safetensors", data=jsonl, nsamples=4),
              progress=False)
    got, meta = load_stats(tmp_path / "o.safetensors")
    want, _ = load_stats(tmp_path / "h.safetensors")
    assert meta["naming"] == "llava-original"
    assert "model.mm_projector.0" in got and "model.vision_tower.vision_tower.vision_model.encoder.layers.0.mlp.fc1" in got
    renamed = {original_key(k + ".weight").removesuffix(".weight"): v for k, v in want.items()}
    assert set(got) == set(renamed)
    for name, st in got.items():
        assert st.tokens == renamed[name].tokens, name
        assert torch.allclose(st.sq_mean, renamed[name].sq_mean, rtol=1e-5), name
