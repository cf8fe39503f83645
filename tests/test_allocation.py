"""Rank allocation: uniform (one ratio per matrix) and global (one budget over all matrices)."""

import math

import pytest
import torch

from recsys_compress.compression.allocation import (
    DENSE,
    align_ranks,
    allocate_ranks,
    break_even_rank,
    check_budget,
    kept_parameters,
    uniform_budget,
)
from recsys_compress.compression.apply import compress_low_rank
from recsys_compress.compression.methods import METHODS
from recsys_compress.compression.calibration import InputStats
from recsys_compress.compression.low_rank import LowRankLinear


def test_identical_spectra_give_the_uniform_ranks():
    shapes = {f"l{i}": (48, 32) for i in range(4)}
    sigma = torch.linspace(3.0, 0.1, 32)
    ranks = allocate_ranks(shapes, {n: sigma for n in shapes}, 0.5, "global")
    assert ranks == allocate_ranks(shapes, None, 0.5, "uniform") == {n: 9 for n in shapes}


def test_a_concentrated_spectrum_gets_a_lower_rank_than_a_flat_one():
    shapes = {"flat": (40, 40), "peaked": (40, 40)}
    flat = torch.ones(40)
    peaked = torch.cat([torch.tensor([6.0]), torch.full((39,), 0.05)])
    ranks = allocate_ranks(shapes, {"flat": flat, "peaked": peaked}, 0.3, "global")
    assert ranks["peaked"] == 1 and ranks["flat"] > 2 * allocate_ranks(shapes, None, 0.3)["flat"] - 2
    # normalised spectra: the peaked matrix's first direction already holds 94% of its energy
    relative = allocate_ranks(shapes, {"flat": flat, "peaked": peaked}, 0.3, "global_relative")
    assert relative["peaked"] < relative["flat"]


def test_global_budget_equals_the_uniform_budget_within_one_direction():
    torch.manual_seed(0)
    shapes = {"q": (64, 64), "k": (16, 64), "up": (96, 64), "down": (64, 96), "o": (64, 64)}
    spectra = {n: torch.rand(min(s)).sort(descending=True).values ** 3 * 10 ** torch.rand(1) for n, s in shapes.items()}
    for ratio in (0.2, 0.5, 0.8):
        budget = uniform_budget(shapes, ratio)
        for rule in ("global", "global_relative"):
            ranks = allocate_ranks(shapes, spectra, ratio, rule)
            kept = kept_parameters(shapes, ranks)
            assert budget - max(m + n for m, n in shapes.values()) < kept <= budget, (ratio, rule)


def test_no_matrix_goes_past_break_even_and_a_dense_one_is_counted_whole():
    shapes = {"big": (60, 60), "small": (60, 60)}
    spectra = {"big": torch.full((60,), 10.0), "small": torch.full((60,), 1e-3)}
    ranks = allocate_ranks(shapes, spectra, 0.6, "global")
    assert ranks["big"] == DENSE and 1 <= ranks["small"] <= break_even_rank(60, 60)
    assert kept_parameters(shapes, ranks) == 60 * 60 + ranks["small"] * 120 <= uniform_budget(shapes, 0.6)


def test_budget_too_small_for_min_rank_fails_with_the_numbers():
    shapes = {f"l{i}": (32, 32) for i in range(3)}
    with pytest.raises(ValueError, match=r"budget of 576 parameters over 3 matrices, but compression.min_rank=4 "
                                         r"alone costs 768"):
        check_budget(shapes, 0.2, 4)
    with pytest.raises(ValueError, match="min_rank=0 is out of range"):
        check_budget(shapes, 0.5, 0)
    with pytest.raises(ValueError, match="allocation='best'; allowed: uniform, global, global_relative"):
        allocate_ranks(shapes, None, 0.5, "best")
    ranks = allocate_ranks(shapes, {n: torch.ones(32) for n in shapes}, 0.5, "global", min_rank=3)
    assert all(r == DENSE or r >= 3 for r in ranks.values()) and sorted(ranks.values()) == [DENSE, 3, 5]


SMOLLM2_SHAPES = {**{f"{i}.q": (576, 576) for i in range(30)}, **{f"{i}.k": (192, 576) for i in range(30)},
                  **{f"{i}.up": (1536, 576) for i in range(30)}, **{f"{i}.down": (576, 1536) for i in range(30)}}


@pytest.mark.parametrize("multiple", [8, 16, 32])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_aligned_ranks_keep_the_budget_and_stay_below_break_even(multiple, ratio):
    shapes = {**SMOLLM2_SHAPES, "odd": (1000, 333)}
    ranks = allocate_ranks(shapes, None, ratio)
    aligned = align_ranks(shapes, ranks, multiple)
    assert aligned == allocate_ranks(shapes, None, ratio, rank_align=multiple)
    budget, kept = kept_parameters(shapes, ranks), kept_parameters(shapes, aligned)
    slack = budget - kept
    assert slack >= 0  # never more parameters than the unaligned allocation
    for name, (m, n) in shapes.items():
        k, a = ranks[name], aligned[name]
        assert a % multiple == 0 and abs(a - k) < multiple and a <= max(k, break_even_rank(m, n))
        if a < k and a + multiple <= break_even_rank(m, n):
            assert slack < multiple * (m + n), name  # a raise was skipped only for the budget
    # the stated tolerance: less than one raise of the widest matrix, here 0.4% of the budget
    assert slack < multiple * max(m + n for m, n in shapes.values())


def test_alignment_above_a_rank_fails_naming_the_option_and_a_dense_matrix_stays_dense():
    shapes = {"a": (32, 32), "b": (64, 64), "c": (8, 8)}
    with pytest.raises(ValueError, match=r"compression.rank_align=16 is larger than the rank 8 of a \(1 matrices "
                                         r"below it\); allowed: 1 to 8"):
        align_ranks(shapes, {"a": 8, "b": 16, "c": DENSE}, 16)
    with pytest.raises(ValueError, match="rank_align=0 is out of range; allowed: >= 1"):
        align_ranks(shapes, {"a": 8, "b": 16, "c": DENSE}, 0)
    assert align_ranks(shapes, {"a": 9, "b": 17, "c": DENSE}, 8) == {"a": 8, "b": 16, "c": DENSE}
    # 15 -> 12 and 17 -> 16 free 3 * 64 + 1 * 128 = 320; raising a (which lost most) back to 16
    # costs 256; raising b to 20 would cost 512 more than the 64 left
    assert align_ranks(shapes, {"a": 15, "b": 17, "c": DENSE}, 4) == {"a": 16, "b": 16, "c": DENSE}
    # 13 -> 12 and 99 -> 96 free 64 + 1,200 parameters, enough to raise a to 24 (768), but 24
    # passes a's break-even rank 16 (and 108 passes c's 100): both stay down, the budget unspent
    wide = {"a": (32, 32), "c": (200, 200)}
    assert align_ranks(wide, {"a": 13, "c": 99}, 12) == {"a": 12, "c": 96}


def _layers_and_stats(seed=0, tokens=400):
    """A few linears of different shapes and scales with whitened-SVD statistics of real tokens."""
    torch.manual_seed(seed)
    model = torch.nn.Module()
    shapes = {"a": (48, 32), "b": (32, 32), "c": (64, 32), "d": (32, 64)}
    stats, inputs = {}, {}
    for i, (name, (m, n)) in enumerate(shapes.items()):
        layer = torch.nn.Linear(n, m, bias=False)
        with torch.no_grad():  # different spectra: a decaying one, scaled per layer
            u, _, v = torch.linalg.svd(torch.randn(m, n), full_matrices=False)
            layer.weight.copy_(u @ torch.diag(torch.logspace(0, -2 + i * 0.5, min(m, n)) * (i + 1)) @ v)
        model.add_module(name, layer)
        x = torch.randn(tokens, n) * torch.linspace(0.2, 2.0, n)
        inputs[name] = x
        x64 = x.double()
        stats[name] = InputStats(x64.T @ x64, x64.abs().sum(0), tokens)
    return model, list(shapes), stats, inputs


def _total_whitened_error(original, model, names, inputs):
    total = 0.0
    for n in names:
        W = original[n].double()
        layer = model.get_submodule(n)
        W_hat = (layer.dense_weight() if isinstance(layer, LowRankLinear) else layer.weight).double()
        total += float(((inputs[n].double() @ (W - W_hat).T) ** 2).sum())
    return total


@pytest.mark.parametrize("ratio", [0.3, 0.5])
def test_global_whitened_error_is_at_most_uniform_on_the_calibration_tokens(ratio):
    errors, kept = {}, {}
    for rule in ("uniform", "global"):
        model, names, stats, inputs = _layers_and_stats()
        original = {n: model.get_submodule(n).weight.detach().clone() for n in names}
        reports = compress_low_rank(model, names, "odllm", ratio, stats, allocation=rule)
        errors[rule] = _total_whitened_error(original, model, names, inputs)
        kept[rule] = sum(r.params_after for r in reports)
        # the squared singular values of W S a direction drops are exactly its output error
        if rule == "global":
            dropped = sum(float((METHODS["odllm"].spectrum(original[r.name], stats[r.name], 0.5)[r.rank:] ** 2).sum())
                          for r in reports if not r.dense)
            assert math.isclose(errors[rule], dropped, rel_tol=1e-6)
    assert errors["global"] < errors["uniform"]
    widest = max(m + n for m, n in ((48, 32), (32, 32), (64, 32), (32, 64)))
    assert kept["uniform"] - widest < kept["global"] <= kept["uniform"]
    assert len({r.rank for r in reports}) > 1  # the budget moved between matrices


def test_a_mixed_rank_model_with_a_dense_layer_saves_loads_and_exports(tmp_path):
    from recsys_compress.compression.calibration import select_linear_layers
    from recsys_compress.compression.serialization import load_compressed, save_compressed
    from recsys_compress.deploy.export import export_onnx
    from recsys_compress.models.item_llm import build_llama
    from recsys_compress.models.lit_seqrec import SeqRecLitModule

    torch.manual_seed(0)
    model = build_llama(40, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64).eval()
    names = select_linear_layers(model)
    with torch.no_grad():  # one layer with far more output energy than the rest: worth keeping whole
        model.get_submodule(names[0]).weight.mul_(30.0)
    stats = {}
    for n in names:
        x = torch.randn(300, model.get_submodule(n).in_features, dtype=torch.float64)
        stats[n] = InputStats(x.T @ x, x.abs().sum(0), 300)
    reports = compress_low_rank(model, names, "odllm", 0.5, stats, allocation="global")
    dense = [r.name for r in reports if r.dense]
    assert dense == [names[0]] and len({r.rank for r in reports if not r.dense}) > 1
    assert isinstance(model.get_submodule(names[0]), torch.nn.Linear)
    save_compressed(model, tmp_path / "m")
    loaded = load_compressed(tmp_path / "m")
    ids = torch.randint(1, 41, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    for r in reports:
        layer = loaded.get_submodule(r.name)
        assert isinstance(layer, torch.nn.Linear) if r.dense else layer.rank == r.rank
    folder = export_onnx(SeqRecLitModule(model), tmp_path / "onnx", 12, [str(i) for i in range(1, 41)], [""] * 41)
    import json

    assert json.loads((folder / "deploy.json").read_text())["max_abs_deviation_from_eager"] < 1e-4
    # int8 stacked on top: the dense layer is quantised whole, a low-rank one factor by factor
    from torch.ao.nn.quantized.dynamic import Linear as DynamicInt8Linear

    from recsys_compress.compression.compressor import Compressor
    from recsys_compress.compression.config import CompressionConfig

    with torch.no_grad():
        reference = model(input_ids=ids).logits
    cb = Compressor(CompressionConfig(method="odllm", allocation="global", quantize="int8"), 0.5)
    cb.names, cb.reports = names, reports
    cb.apply_quantization(model)
    assert isinstance(model.get_submodule(names[0]), DynamicInt8Linear)
    low = next(r.name for r in reports if not r.dense)
    assert isinstance(model.get_submodule(low).down, DynamicInt8Linear)
    assert isinstance(model.get_submodule(low).up, DynamicInt8Linear)
    with torch.no_grad():
        quantised = model(input_ids=ids).logits
    assert 0 < float((quantised - reference).norm() / reference.norm()) < 0.05


def test_global_allocation_composes_with_alignment_int8_and_export(tmp_path):
    import csv
    import json

    from recsys_compress.tasks.runner import run_task
    from recsys_compress.tasks.compose import compose_config

    overrides = ["compression=odllm", "compression.allocation=global", "compression.quantize=int8", "ratio=0.3",
                 "alignment=progressive_lstsq", "alignment.batches=2", "model.hidden_size=16",
                 "model.intermediate_size=32", "dataset.max_len=20", "compression.calib_batches=4",
                 "compression.heldout_batches=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                 "logger=none", "export.onnx=true", "evaluation.popularity_baseline=false",
                 f"paths.cache_dir={tmp_path / 'cache'}"]
    metrics = run_task(compose_config(overrides, tmp_path))
    with open(tmp_path / "compression_layers.csv") as f:
        rows = list(csv.DictReader(f))
    shapes = {r["name"]: (int(r["out_features"]), int(r["in_features"])) for r in rows}
    assert metrics["compression/allocation"] == "global"
    assert uniform_budget(shapes, 0.3) - max(m + n for m, n in shapes.values()) \
        < metrics["compression/targeted_params_after"] <= uniform_budget(shapes, 0.3)
    assert len({r["rank"] for r in rows}) > 1
    saved = json.loads((tmp_path / "model" / "compression.json").read_text())
    assert saved["low_rank"] == {r["name"]: int(r["rank"]) for r in rows if r["dense"] == "False"}
    # the ONNX graph is int8 here (float export equality: the mixed-rank test above)
    assert metrics["export/max_abs_deviation"] < 0.05 and "time/quantize_s" in metrics
    # The same base (cached) with uniform ranks; the report draws both allocations' ranks.
    uniform = [o for o in overrides if not o.startswith(("compression.allocation", "alignment", "compression.quantize"))]
    assert run_task(compose_config(uniform, tmp_path / "uniform"))["base/cache_hit"] == 1
    from recsys_compress.reporting import report

    assert report.main([str(tmp_path), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "ranks.csv") as f:
        drawn = list(csv.DictReader(f))
    by_allocation = {a: {(int(p["block"]), p["matrix"]): int(p["rank"]) for p in drawn if p["allocation"] == a}
                     for a in ("uniform", "global")}
    assert len(by_allocation["uniform"]) == len(by_allocation["global"]) == len(rows)
    assert by_allocation["global"] == {(int(r["name"].split(".")[2]), r["name"].split(".")[-1]): int(r["rank"])
                                       for r in rows}
    assert (tmp_path / "report" / "ranks.png").stat().st_size > 10_000
    assert "odllm (global) + progressive_lstsq" in (tmp_path / "report" / "report.md").read_text()


def test_a_budget_below_min_rank_fails_before_training(tmp_path):
    from conftest import SMALL, run_train

    result = run_train(["compression=odllm", "compression.allocation=global", "compression.min_rank=40",
                        "ratio=0.3", f"dataset.path={SMALL}", "logger=none", f"hydra.run.dir={tmp_path}"])
    output = result.stdout + result.stderr
    assert result.returncode == 1
    assert "compression.min_rank=40 alone costs" in output and "Epoch" not in output


def test_an_alignment_above_the_uniform_ranks_fails_before_training(tmp_path):
    from recsys_compress.schema import ConfigError
    from recsys_compress.tasks.config import validate
    from recsys_compress.models.item_llm import build_llama
    from recsys_compress.compression.compressor import check_allocation
    from recsys_compress.tasks.compose import compose_config

    model = build_llama(50, hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64,
                        max_len=8)
    # at ratio 0.5 k/v (16 x 32) keep rank 5, the smallest
    run = validate(compose_config(["compression=odllm", "compression.rank_align=8"], tmp_path))
    with pytest.raises(ConfigError, match=r"rank_align=8 is larger than the rank 5 of model.layers.0.self_attn.k_proj"):
        check_allocation(run.compression, run.ratio, model)
    aligned = validate(compose_config(["compression=odllm", "compression.rank_align=4"], tmp_path))
    check_allocation(aligned.compression, aligned.ratio, model)


def test_zero_sum_follows_the_two_heap_rule_by_hand():
    """Two 8 x 8 matrices (break-even rank 4, dense 64 each), budget 64 (uniform: rank 2 each).
    Each matrix gives up its directions from the last; of the two candidates, the smallest |dL|
    among dL >= 0 while the running sum is <= 0, among dL < 0 otherwise (either sign when that
    side is empty; the name breaks ties). Removed (running sum; kept parameters once they fall):
    a7 .37 (.37), a6 -.23 (.14), a5 -.11 (.03), b7 -.42 (-.39), b6 .79 (.40), a4 -.94 (-.54),
    a3 .11 (-.43; 112, a tie with b5 .11), b5 .11 (-.32), a2 .23 (-.09; 96), no dL >= 0 left:
    b4 -.58 (-.67), b3 .37 (-.30; 80), b2 .58 (.28; 64). Ignoring the sign gives (3, 1),
    preferring the other sign (1, 3)."""
    shapes = {"a": (8, 8), "b": (8, 8)}
    changes = {"a": torch.tensor([5.0, -0.94, 0.23, 0.11, -0.94, -0.11, -0.23, 0.37], dtype=torch.float64),
               "b": torch.tensor([5.0, 0.66, 0.58, 0.37, -0.58, 0.11, 0.79, -0.42], dtype=torch.float64)}
    ranks = allocate_ranks(shapes, changes, 0.5, "zero_sum")
    assert ranks == {"a": 2, "b": 2}
    assert kept_parameters(shapes, ranks) == uniform_budget(shapes, 0.5) == 64


def test_zero_sum_budget_equals_the_uniform_budget_within_one_direction_and_keeps_break_even():
    torch.manual_seed(0)
    shapes = {"q": (64, 64), "k": (16, 64), "up": (96, 64), "down": (64, 96), "o": (64, 64)}
    changes = {n: torch.randn(min(s)) * 10 ** torch.rand(1) for n, s in shapes.items()}
    for ratio in (0.2, 0.5, 0.8):
        ranks = allocate_ranks(shapes, changes, ratio, "zero_sum")
        budget = uniform_budget(shapes, ratio)
        assert budget - max(m + n for m, n in shapes.values()) < kept_parameters(shapes, ranks) <= budget, ratio
        assert all(k == DENSE or 1 <= k <= break_even_rank(*shapes[n]) for n, k in ranks.items())
    with pytest.raises(ValueError, match="zero_sum needs the first-order loss changes"):
        allocate_ranks(shapes, None, 0.5, "zero_sum")


@pytest.mark.parametrize("method", ["svd", "asvd", "odllm"])
def test_each_directions_loss_change_is_exact_for_a_loss_linear_in_the_weight(method):
    """For L(W) = <G, W> the first-order change is the change: removing direction i of the matrix
    the method truncates (A = W S) changes L by exactly -sigma_i u_i^T G S^-T v_i."""
    torch.manual_seed(1)
    m, n, tokens = 12, 9, 40
    W, G = torch.randn(m, n, dtype=torch.float64), torch.randn(m, n, dtype=torch.float64)
    x = torch.randn(tokens, n, dtype=torch.float64) * torch.linspace(0.3, 3.0, n, dtype=torch.float64)
    stats = InputStats(x.T @ x, x.abs().sum(0), tokens)
    if method == "svd":
        S = torch.eye(n, dtype=torch.float64)
    elif method == "asvd":
        S = torch.diag((x.abs().mean(0)) ** 0.5)
    else:
        S = torch.linalg.cholesky(x.T @ x)
    U, sigma, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    changes = METHODS[method].loss_changes(W, G, stats, 0.5)
    assert changes.shape == (min(m, n),)
    for i in range(min(m, n)):
        W_without = (W @ S - sigma[i] * torch.outer(U[:, i], Vh[i])) @ torch.linalg.inv(S)
        assert float(changes[i]) == pytest.approx(float((G * (W_without - W)).sum()), rel=1e-9, abs=1e-12)


def test_loss_gradients_average_the_batches_and_restore_the_flags():
    from recsys_compress.compression.sensitivity import loss_gradients

    torch.manual_seed(2)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4, bias=False), torch.nn.Linear(4, 3, bias=False)).double()
    model[0].weight.requires_grad_(False)  # as in a merged or frozen model
    R = torch.randn(3, dtype=torch.float64)
    batches = [{"x": torch.randn(7, 5, dtype=torch.float64)} for _ in range(2)]
    grads = loss_gradients(model, ["1"], batches, lambda b: (model(b["x"]) * R).sum())
    # L = sum_t R^T W1 h_t, so dL/dW1 = R (sum_t h_t)^T per batch; the mean of the two batches
    with torch.no_grad():
        expected = sum(torch.outer(R, model[0](b["x"]).sum(0)) for b in batches) / 2
    torch.testing.assert_close(grads["1"], expected, rtol=1e-12, atol=0)
    both = loss_gradients(model, ["0", "1"], batches, lambda b: (model(b["x"]) * R).sum())
    assert both["0"].abs().sum() > 0 and not model[0].weight.requires_grad and model[1].weight.requires_grad


@pytest.mark.parametrize("split", ["train", "val"])
def test_zero_sum_composes_through_the_pipeline(tmp_path, monkeypatch, split):
    """compression.allocation=zero_sum on a tiny LLaMA: the loss's gradients are taken (timed) over
    calib_batches batches of the chosen split (val: evaluation batches, each user's held-out
    target), the budget holds, the ranks differ between matrices and reach compression_layers.csv."""
    import csv

    from recsys_compress.compression import compressor as compressor_module
    from recsys_compress.tasks.runner import run_task
    from recsys_compress.tasks.compose import compose_config

    differentiated = []
    original = compressor_module.loss_gradients

    def recording(model, names, batches, loss):
        differentiated.append(batches)
        return original(model, names, batches, loss)

    monkeypatch.setattr(compressor_module, "loss_gradients", recording)
    overrides = ["compression=odllm", "compression.allocation=zero_sum", "ratio=0.3", "model.hidden_size=16",
                 "model.intermediate_size=32", "dataset.max_len=20", "compression.calib_batches=2",
                 "compression.heldout_batches=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                 "logger=none", "evaluation.popularity_baseline=false", f"paths.cache_dir={tmp_path / 'cache'}",
                 f"compression.gradient_split={split}"]
    metrics = run_task(compose_config(overrides, tmp_path))
    assert len(differentiated) == 1 and len(differentiated[0]) == 2
    assert all(("target" in b) == (split == "val") for b in differentiated[0])
    with open(tmp_path / "compression_layers.csv") as f:
        rows = list(csv.DictReader(f))
    shapes = {r["name"]: (int(r["out_features"]), int(r["in_features"])) for r in rows}
    assert metrics["compression/allocation"] == "zero_sum" and metrics["time/loss_gradient_s"] > 0
    assert uniform_budget(shapes, 0.3) - max(m + n for m, n in shapes.values()) \
        < metrics["compression/targeted_params_after"] <= uniform_budget(shapes, 0.3)
    assert len({r["rank"] for r in rows}) > 1


def test_first_order_loss_changes_predict_the_next_item_loss_change_on_real_batches():
    """Through the module's own training loss on MovieLens batches: removing one whitened direction
    of a tiny LLaMA's layer changes the calibration loss by about what zero_sum predicts (first
    order: within 30% here, sign included)."""
    from conftest import SMALL
    from recsys_compress.compression.calibration import collect_input_stats, split_calibration
    from recsys_compress.compression.low_rank import cholesky_with_jitter
    from recsys_compress.compression.sensitivity import loss_gradients
    from recsys_compress.data.datamodule import NextItemDataModule
    from recsys_compress.models.item_llm import build_llama
    from recsys_compress.models.lit_seqrec import SeqRecLitModule

    torch.manual_seed(0)
    dm = NextItemDataModule("grouplens_csv", SMALL, max_len=20, batch_size=64)
    dm.setup()
    lit = SeqRecLitModule(build_llama(dm.n_items, hidden_size=32, num_layers=2, num_heads=2, num_kv_heads=1,
                                      intermediate_size=64, max_len=20)).double().eval()
    calibration, _ = split_calibration(dm.train_dataloader(), 4, 0)
    name = "model.layers.0.mlp.gate_proj"
    gradients = loss_gradients(lit.model, [name], calibration, lit.loss)
    stats = collect_input_stats(lit.model, [name], calibration, lit.hidden_states, len(calibration))

    def loss() -> float:
        with torch.no_grad():
            return sum(float(lit.loss(b)) for b in calibration) / len(calibration)

    layer = lit.model.get_submodule(name)
    W = layer.weight.detach().clone()
    predicted = METHODS["odllm"].loss_changes(W, gradients[name], stats[name], 0.5)
    S, _ = cholesky_with_jitter(stats[name].gram)
    U, sigma, Vh = torch.linalg.svd(W @ S, full_matrices=False)
    before = loss()
    for i in (0, 5, 15, 31):
        with torch.no_grad():
            layer.weight.copy_((W @ S - sigma[i] * torch.outer(U[:, i], Vh[i])) @ torch.linalg.inv(S))
        assert loss() - before == pytest.approx(float(predicted[i]), rel=0.3), i
        with torch.no_grad():
            layer.weight.copy_(W)
