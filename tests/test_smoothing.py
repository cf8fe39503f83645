"""SmoothQuant-style equalisation of the inputs int8 rounds (deploy/smoothing.py): q/k/v's and
gate/up's (folded into the RMSNorm before them) and the MLP down projection's (folded into
up_proj). The float function is unchanged, the ranges move as the formula says, and the int8
artefact of a model with outlier channels gets closer to the eager model."""

import json

import numpy as np
import pytest
import torch
from conftest import left_padded_batches, odllm_on_random_statistics
from torch import nn

from recsys_compress.compression.calibration import collect_input_stats
from recsys_compress.deploy.export import export_onnx
from recsys_compress.deploy.recommend import Recommender
from recsys_compress.deploy.smoothing import SMOOTH_TARGETS, smooth_activations, smoothing_groups, smoothing_scales
from recsys_compress.models.item_llm import build_llama
from recsys_compress.models.lit_seqrec import SeqRecLitModule

N_ITEMS, MAX_LEN = 60, 12
RAW_IDS = [str(i) for i in range(N_ITEMS)]
OUTLIER_CHANNEL, OUTLIER_GAIN = 5, 1000.0


def model_with_an_outlier_channel(low_rank: bool) -> nn.Module:
    """A tiny LLaMA each of whose projections reads one channel ``OUTLIER_GAIN`` times larger
    than the rest, as trained LLMs' do: the down projections (up_proj's row scaled up,
    down_proj's column down), q/k/v and gate/up (the norm's weight scaled up, their columns
    down); the same function."""
    torch.manual_seed(0)
    model = build_llama(N_ITEMS, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                        intermediate_size=64, max_len=MAX_LEN).eval()
    with torch.no_grad():
        for layer in model.model.layers:
            mlp, attn = layer.mlp, layer.self_attn
            mlp.up_proj.weight[OUTLIER_CHANNEL] *= OUTLIER_GAIN
            mlp.down_proj.weight[:, OUTLIER_CHANNEL] /= OUTLIER_GAIN
            for norm, readers in ((layer.input_layernorm, (attn.q_proj, attn.k_proj, attn.v_proj)),
                                  (layer.post_attention_layernorm, (mlp.gate_proj, mlp.up_proj))):
                norm.weight[OUTLIER_CHANNEL] *= OUTLIER_GAIN
                for r in readers:
                    r.weight[:, OUTLIER_CHANNEL] /= OUTLIER_GAIN
    return odllm_on_random_statistics(model) if low_rank else model


def batches(n: int, seed: int) -> list[dict[str, torch.Tensor]]:
    return left_padded_batches(n, seed, N_ITEMS, MAX_LEN)


def scores(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return SeqRecLitModule(model).eval()(batch["input_ids"], batch["attention_mask"])


def input_max(model) -> dict[str, torch.Tensor]:
    """Per smoothed input (named by its first reader), max |x_j| on the calibration batches."""
    lit = SeqRecLitModule(model).eval()
    names = list(smoothing_groups(model))
    stats = collect_input_stats(model, names, batches(3, seed=1), lit.hidden_states, max_batches=3, gram=False)
    return {n: s.abs_max for n, s in stats.items()}


def reader_weight_max(group, low_rank: bool) -> torch.Tensor:
    """max_j over the readers of an input of their weight's column j (the first factor's)."""
    return torch.stack([(r.down.weight if low_rank else r.weight).abs().amax(0) for r in group.readers]).amax(0).double()


@pytest.mark.parametrize("low_rank", [False, True], ids=["dense", "low_rank"])
def test_smoothing_keeps_the_function_and_equalises_ranges_as_the_formula_says(low_rank):
    model = model_with_an_outlier_channel(low_rank)
    held_out = batches(2, seed=7)
    before = [scores(model, b) for b in held_out]
    x_before = input_max(model)
    groups = smoothing_groups(model)
    assert sorted(n.rsplit(".", 1)[1] for n in groups) == ["down_proj"] * 2 + ["gate_proj"] * 2 + ["q_proj"] * 2
    weight_max_before = {n: reader_weight_max(g, low_rank) for n, g in groups.items()}
    weights_before = {k: v.clone() for k, v in model.state_dict().items()}
    lit = SeqRecLitModule(model).eval()
    report = smooth_activations(model, batches(3, seed=1), lit.hidden_states, alpha=0.5)
    assert report.inputs == 6 and report.tokens > 0
    for b, expected in zip(held_out, before):
        torch.testing.assert_close(scores(model, b), expected, rtol=1e-4, atol=1e-4 * float(expected.abs().max()))
    x_after = input_max(model)
    scales = {}
    for n, group in smoothing_groups(model).items():  # in folding order: down_proj's input first
        weight_max = weight_max_before[n]
        if not low_rank and n.endswith("gate_proj"):
            # a dense up_proj reads the gate/up input with the rows the down fold divided
            up_rows = weights_before[n.replace("gate", "up") + ".weight"] / scales[n.replace("gate", "down")][:, None]
            weight_max = torch.maximum(weights_before[n + ".weight"].abs().amax(0), up_rows.abs().amax(0)).double()
        s = scales[n] = smoothing_scales(x_before[n], weight_max, 0.5).float()
        # the input's channel j is divided by s_j (on the same calibration batches)
        torch.testing.assert_close(x_after[n], x_before[n] / s, rtol=1e-4, atol=1e-6)
        # alpha 0.5 leaves every channel's input range equal to its readers' widest weight column
        torch.testing.assert_close(x_after[n], reader_weight_max(group, low_rank), rtol=1e-4, atol=1e-6)
        assert float(x_before[n].max() / x_before[n].median()) > 50, n  # the outlier stood out
    assert set(report.outlier_ratio_before) == set(report.outlier_ratio_after) == set(SMOOTH_TARGETS)
    assert min(report.outlier_ratio_before.values()) > 50 > 10 > max(report.outlier_ratio_after.values())


def test_smoothing_targets_choose_the_inputs():
    """``mlp_down`` alone leaves the norms and q/k/v/gate/up untouched (one input a block);
    ``norm_inputs`` alone leaves up_proj's rows and down_proj (two a block); an unknown target is
    refused naming the allowed ones."""
    for targets, inputs, changed in (
            (("mlp_down",), 2, {"mlp.up_proj.weight", "mlp.down_proj.weight"}),
            (("norm_inputs",), 4, {"input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
                                   "self_attn.k_proj.weight", "self_attn.v_proj.weight", "mlp.gate_proj.weight",
                                   "mlp.up_proj.weight"})):
        model = model_with_an_outlier_channel(False)
        lit = SeqRecLitModule(model).eval()
        reference = {k: v.clone() for k, v in model.state_dict().items()}
        report = smooth_activations(model, batches(2, seed=1), lit.hidden_states, alpha=0.5, targets=targets)
        assert report.inputs == inputs and set(report.outlier_ratio_before) == set(targets)
        moved = {k.split(".", 3)[3] for k, v in model.state_dict().items() if not torch.equal(v, reference[k])}
        assert moved == changed, targets
    with pytest.raises(ValueError, match=r"smoothing targets \['qkv'\]; allowed: mlp_down, norm_inputs"):
        smooth_activations(model, batches(1, seed=1), lambda b: None, 0.5, targets=("qkv",))
    assert set(SMOOTH_TARGETS) == {"mlp_down", "norm_inputs"}


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
    export_onnx(SeqRecLitModule(model), tmp_path / "plain", MAX_LEN, RAW_IDS, quantize="int8")
    export_onnx(SeqRecLitModule(model), tmp_path / "smooth", MAX_LEN, RAW_IDS, quantize="int8", int8_smooth=0.5,
                calibration=batches(4, seed=2))
    for k, v in model.state_dict().items():  # the caller's model is not touched
        torch.testing.assert_close(v, reference[k], rtol=0, atol=0)
    plain, smooth = int8_error(tmp_path / "plain", model), int8_error(tmp_path / "smooth", model)
    assert smooth < 0.5 * plain, (smooth, plain)
    meta = json.loads((tmp_path / "smooth" / "deploy.json").read_text())
    assert meta["int8_smooth"] == 0.5 and meta["smoothing"]["inputs"] == 6
    ratios = meta["smoothing"]["outlier_ratio_before"], meta["smoothing"]["outlier_ratio_after"]
    assert min(ratios[0].values()) > 50 > max(ratios[1].values()) and set(ratios[0]) == set(SMOOTH_TARGETS)
    assert json.loads((tmp_path / "plain" / "deploy.json").read_text())["int8_smooth"] is None


def test_smoothing_statistics_are_taken_without_dropout(tmp_path):
    """A recommender handed over in training mode (the pipeline's, after alignment) with input
    dropout: the channel ranges smoothing reads are those of the model as served, not of a dropped-out
    forward, and the recommender keeps its mode."""
    model = model_with_an_outlier_channel(False)
    training = SeqRecLitModule(model, embedding_dropout=0.5).train()
    for folder, recommender in (("training", training), ("eval", SeqRecLitModule(model).eval())):
        torch.manual_seed(1)
        export_onnx(recommender, tmp_path / folder, MAX_LEN, RAW_IDS, quantize="int8", int8_smooth=0.5,
                    calibration=batches(2, seed=2))
    smoothing = [json.loads((tmp_path / f / "deploy.json").read_text())["smoothing"] for f in ("training", "eval")]
    assert smoothing[0] == smoothing[1]
    assert training.training and training.embedding_dropout.training


def test_smoothing_refuses_what_it_cannot_do(tmp_path):
    model = model_with_an_outlier_channel(False)
    calibration = batches(1, seed=2)
    with pytest.raises(ValueError, match="needs quantize='int8'"):
        export_onnx(SeqRecLitModule(model), tmp_path / "a", MAX_LEN, RAW_IDS, int8_smooth=0.5, calibration=calibration)
    with pytest.raises(ValueError, match="pass calibration batches"):
        export_onnx(SeqRecLitModule(model), tmp_path / "b", MAX_LEN, RAW_IDS, quantize="int8", int8_smooth=0.5)
    with pytest.raises(ValueError, match=r"int8_smooth=2 is out of range; allowed: None \(off\) or 0 to 1"):
        export_onnx(SeqRecLitModule(model), tmp_path / "c", MAX_LEN, RAW_IDS, quantize="int8", int8_smooth=2, calibration=calibration)
    with pytest.raises(ValueError, match="has none"):
        smooth_activations(nn.Sequential(nn.Linear(4, 4)), calibration, lambda b: None, 0.5)
