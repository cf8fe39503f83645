"""SmoothQuant-style equalisation of the MLP down projection's input (deploy/smoothing.py):
the float function is unchanged, the ranges move as the formula says, and the int8 artefact of
a model with an outlier channel gets closer to the eager model."""

import json

import numpy as np
import pytest
import torch
from conftest import left_padded_batches, odllm_on_random_statistics
from torch import nn

from recsys_compress.compression.calibration import collect_input_stats
from recsys_compress.deploy.export import export_onnx
from recsys_compress.deploy.recommend import Recommender
from recsys_compress.deploy.smoothing import mlp_down_projections, smooth_mlp_activations, smoothing_scales
from recsys_compress.models.item_llm import build_llama
from recsys_compress.models.lit_seqrec import SeqRecLitModule

N_ITEMS, MAX_LEN = 60, 12
RAW_IDS = [str(i) for i in range(N_ITEMS)]
OUTLIER_CHANNEL, OUTLIER_GAIN = 5, 1000.0


def model_with_an_outlier_channel(low_rank: bool) -> nn.Module:
    """A tiny LLaMA whose down projections read one channel ``OUTLIER_GAIN`` times larger than
    the rest (up_proj's row scaled up, down_proj's column down: the same function), as
    trained LLMs' MLPs do."""
    torch.manual_seed(0)
    model = build_llama(N_ITEMS, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, max_len=MAX_LEN).eval()
    with torch.no_grad():
        for mlp in (layer.mlp for layer in model.model.layers):
            mlp.up_proj.weight[OUTLIER_CHANNEL] *= OUTLIER_GAIN
            mlp.down_proj.weight[:, OUTLIER_CHANNEL] /= OUTLIER_GAIN
    return odllm_on_random_statistics(model) if low_rank else model


def batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    return left_padded_batches(n, seed, N_ITEMS, MAX_LEN)


def scores(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return SeqRecLitModule(model).eval()(batch["input_ids"], batch["attention_mask"])


def down_input_max(model) -> dict[str, torch.Tensor]:
    lit = SeqRecLitModule(model).eval()
    names = list(mlp_down_projections(model))
    stats = collect_input_stats(model, names, batches(3, seed=1), lambda b: lit.hidden_states(
        b["input_ids"], b["attention_mask"]), max_batches=3, gram=False)
    return {n: s.abs_max for n, s in stats.items()}


@pytest.mark.parametrize("low_rank", [False, True], ids=["dense", "low_rank"])
def test_smoothing_keeps_the_function_and_equalises_ranges_as_the_formula_says(low_rank):
    model = model_with_an_outlier_channel(low_rank)
    held_out = batches(2, seed=7)
    before = [scores(model, b) for b in held_out]
    h_before = down_input_max(model)
    weight_max_before = {n: (d.down.weight if low_rank else d.weight).abs().amax(0).double()
                         for n, (_, d) in mlp_down_projections(model).items()}
    lit = SeqRecLitModule(model).eval()
    report = smooth_mlp_activations(model, batches(3, seed=1), lambda b: lit.hidden_states(
        b["input_ids"], b["attention_mask"]), alpha=0.5)
    assert report.layers == 2 and report.tokens > 0
    for b, expected in zip(held_out, before):
        torch.testing.assert_close(scores(model, b), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    h_after = down_input_max(model)
    for n, (_, down) in mlp_down_projections(model).items():
        s = smoothing_scales(h_before[n], weight_max_before[n], 0.5)
        # the input of channel j is divided by s_j (on the same calibration batches)
        torch.testing.assert_close(h_after[n], h_before[n] / s, rtol=1e-4, atol=1e-6)
        # alpha 0.5 leaves every channel's input range equal to its weight column's
        weight_max = (down.down.weight if low_rank else down.weight).abs().amax(0).double()
        torch.testing.assert_close(h_after[n], weight_max, rtol=1e-4, atol=1e-6)
        assert float(h_before[n].max() / h_before[n].median()) > 50  # the outlier stood out
    assert report.outlier_ratio_before > 50 > 10 > report.outlier_ratio_after


def test_smoothing_scales_follow_the_formula_and_leave_dead_channels_alone():
    a = torch.tensor([4.0, 9.0, 0.0, 1.0])
    w = torch.tensor([1.0, 4.0, 2.0, 0.0])
    torch.testing.assert_close(smoothing_scales(a, w, 0.5), torch.tensor([2.0, 1.5, 1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(smoothing_scales(a, w, 1.0)[:2], torch.tensor([4.0, 9.0], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"int8_smooth=1.5 .*0 to 1"):
        smoothing_scales(a, w, 1.5)


def int8_error(folder, model) -> float:
    """Mean over held-out histories of |s_int8 - s_eager| / |s_eager - mean(s_eager)| (the
    benchmark's score error: a constant offset ranks nothing)."""
    rec = Recommender(folder)
    errors = []
    for b in batches(3, seed=11):
        got = rec.score_indices(b["input_ids"].numpy(), b["attention_mask"].numpy())
        expected = scores(model, b).numpy()
        errors += list(np.linalg.norm(got - expected, axis=1)
                       / np.linalg.norm(expected - expected.mean(1, keepdims=True), axis=1))
    return float(np.mean(errors))


@pytest.mark.parametrize("low_rank", [False, True], ids=["dense", "low_rank"])
def test_a_smoothed_int8_artefact_is_closer_to_the_eager_model(low_rank, tmp_path):
    model = model_with_an_outlier_channel(low_rank)
    reference = {k: v.clone() for k, v in model.state_dict().items()}
    export_onnx(model, tmp_path / "plain", MAX_LEN, RAW_IDS, quantize="int8")
    export_onnx(model, tmp_path / "smooth", MAX_LEN, RAW_IDS, quantize="int8", int8_smooth=0.5,
                calibration=batches(4, seed=2))
    for k, v in model.state_dict().items():  # the caller's model is not touched
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
    plain, smooth = int8_error(tmp_path / "plain", model), int8_error(tmp_path / "smooth", model)
    assert smooth < 0.5 * plain, (smooth, plain)
    meta = json.loads((tmp_path / "smooth" / "deploy.json").read_text())
    assert meta["int8_smooth"] == 0.5 and meta["smoothing"]["layers"] == 2
    assert meta["smoothing"]["outlier_ratio_before"] > 50 > meta["smoothing"]["outlier_ratio_after"]
    assert json.loads((tmp_path / "plain" / "deploy.json").read_text())["int8_smooth"] is None


def test_smoothing_refuses_what_it_cannot_do(tmp_path):
    model = model_with_an_outlier_channel(False)
    calibration = batches(1, seed=2)
    with pytest.raises(ValueError, match="needs quantize='int8'"):
        export_onnx(model, tmp_path / "a", MAX_LEN, RAW_IDS, int8_smooth=0.5, calibration=calibration)
    with pytest.raises(ValueError, match="pass calibration batches"):
        export_onnx(model, tmp_path / "b", MAX_LEN, RAW_IDS, quantize="int8", int8_smooth=0.5)
    with pytest.raises(ValueError, match=r"int8_smooth=2 is out of range; allowed: None \(off\) or 0 to 1"):
        export_onnx(model, tmp_path / "c", MAX_LEN, RAW_IDS, quantize="int8", int8_smooth=2, calibration=calibration)
    with pytest.raises(ValueError, match="has none"):
        smooth_mlp_activations(nn.Sequential(nn.Linear(4, 4)), calibration, lambda b: None, 0.5)
