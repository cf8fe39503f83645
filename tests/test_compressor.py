"""The Compressor, as the train task runs it, on a tiny model trained briefly on real MovieLens sequences."""

import lightning as L
import pytest
import torch

from conftest import SMALL
from recsys_compress.compression.compressor import Compressor
from recsys_compress.compression.config import CompressionConfig
from recsys_compress.models.config import OptimConfig
from recsys_compress.schema import ConfigError
from recsys_compress.compression.calibration import select_linear_layers
from recsys_compress.compression.low_rank import LowRankLinear, rank_for_ratio
from recsys_compress.data.datamodule import NextItemDataModule
from recsys_compress.models.item_llm import build_llama, count_parameters
from recsys_compress.models.lit_seqrec import SeqRecLitModule
from recsys_compress.tasks.train_seqrec import compress_on

HIDDEN, INTER, LAYERS = 32, 64, 2


@pytest.fixture(scope="module")
def trained():
    L.seed_everything(0)
    dm = NextItemDataModule("grouplens_csv", SMALL, max_len=20, batch_size=64)
    dm.setup()
    lit = SeqRecLitModule(build_llama(dm.n_items, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=2,
                                      num_kv_heads=1, intermediate_size=INTER, max_len=20), OptimConfig(lr=3e-3))
    L.Trainer(max_epochs=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(lit, datamodule=dm)
    return dm, lit.state_dict()


def compressed(trained, method, ratio, precision="32-true", **kw):
    """The trained model compressed as the train task does it, under ``precision``, then tested:
    (module, compressor, parameters before, test metrics)."""
    dm, state = trained
    lit = SeqRecLitModule(build_llama(dm.n_items, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=2,
                                      num_kv_heads=1, intermediate_size=INTER, max_len=20))
    lit.load_state_dict(state)
    cb = Compressor(CompressionConfig(method=method, calib_batches=4, **kw), ratio)
    before = count_parameters(lit.model)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, precision=precision)
    compress_on(trainer, cb, lit, dm)
    test = trainer.test(lit, datamodule=dm, verbose=False)[0]
    return lit, cb, before, test


def test_compression_reaches_the_expected_parameter_count(trained):
    lit, cb, before, _ = compressed(trained, "odllm", 0.5)
    # grouped-query attention: k/v are HIDDEN x HIDDEN/2, sized from weight.shape
    shapes = [(HIDDEN, HIDDEN), (HIDDEN // 2, HIDDEN), (HIDDEN // 2, HIDDEN), (HIDDEN, HIDDEN),
              (INTER, HIDDEN), (INTER, HIDDEN), (HIDDEN, INTER)] * LAYERS
    removed = sum(m * n - rank_for_ratio(m, n, 0.5) * (m + n) for m, n in shapes)
    assert count_parameters(lit.model) == before - removed
    assert len(cb.reports) == 7 * LAYERS
    assert all(isinstance(lit.model.get_submodule(r.name), LowRankLinear) for r in cb.reports)
    summary = cb.summary()
    assert summary["compression/kept_ratio"] <= 0.5
    assert 0 < summary["time/calibrate_s"] < summary["time/compress_s"]
    assert summary["time/calibrate_s"] + summary["time/factorize_s"] == pytest.approx(summary["time/compress_s"])
    with pytest.raises(ConfigError, match="compression.gram_dtype='float16' is not allowed; allowed: float32, float64"):
        CompressionConfig(gram_dtype="float16")
    assert summary["compression/layers"] == 14


def test_compression_sees_the_weights_the_run_holds(trained, monkeypatch):
    """Under trainer.precision=bf16-true the factorised weights are bf16 (half the memory, as a
    24 GB GPU needs for a 7B model), on the trainer's device: Lightning casts and moves the module
    only inside trainer.test, after compression."""
    import recsys_compress.compression.methods as methods

    seen = []
    factorize = methods.factorize  # what every low-rank method's factorisation calls

    def recording(W, *args, **kwargs):
        seen.append((W.dtype, W.device))
        return factorize(W, *args, **kwargs)

    monkeypatch.setattr(methods, "factorize", recording)
    lit, cb, _, bf16 = compressed(trained, "odllm", 0.5, precision="bf16-true", heldout_batches=2)
    device = L.Trainer(logger=False, enable_progress_bar=False).strategy.root_device  # where `compressed` ran
    assert len(seen) == 7 * LAYERS and set(seen) == {(torch.bfloat16, device)}
    assert lit.model.get_submodule(cb.reports[0].name).down.weight.dtype == torch.bfloat16
    # bf16 weights cost little accuracy: the held-out error stays near the float32 run's
    float32 = compressed(trained, "odllm", 0.5, heldout_batches=2)[1].summary()
    assert bf16["test/ndcg@10"] > 0
    assert cb.summary()["compression/heldout_rel_output_error"] == pytest.approx(
        float32["compression/heldout_rel_output_error"], abs=0.02)


def test_whitened_beats_plain_svd_on_real_activations(trained):
    _, plain, _, plain_test = compressed(trained, "svd", 0.3)
    _, whitened, _, white_test = compressed(trained, "odllm", 0.3)
    for p, w in zip(plain.reports, whitened.reports):
        assert p.name == w.name and p.rank == w.rank
        assert w.rel_output_error <= p.rel_output_error + 1e-9, p.name
    mean_plain = sum(r.rel_output_error for r in plain.reports) / len(plain.reports)
    mean_white = sum(r.rel_output_error for r in whitened.reports) / len(whitened.reports)
    assert mean_white < 0.8 * mean_plain


def test_pattern_matching_nothing_lists_candidates(trained):
    dm, _ = trained
    model = build_llama(dm.n_items, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    with pytest.raises(ValueError, match=r"'\*.attn.qkv' matches no linear layer; candidates: model.layers.0.self_attn.q_proj"):
        select_linear_layers(model, ["*.attn.qkv"])
    assert select_linear_layers(model, ["*.mlp.*"], ["*.down_proj"]) == [
        "model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]


def test_rank_zero_names_the_layer(trained):
    with pytest.raises(ValueError, match=r"gives rank 0 for layer model.layers.0.self_attn.q_proj \(32 x 32\)"):
        compressed(trained, "svd", 0.01)


def test_calibration_statistics_match_a_direct_computation(trained):
    from recsys_compress.compression.calibration import collect_input_stats

    dm, state = trained
    lit = SeqRecLitModule(build_llama(dm.n_items, hidden_size=HIDDEN, num_layers=LAYERS, num_heads=2,
                                      num_kv_heads=1, intermediate_size=INTER, max_len=20)).eval()
    lit.load_state_dict(state)
    names = select_linear_layers(lit.model, ["*.layers.1.self_attn.*_proj", "*.layers.1.mlp.*"])
    batches = list(dm.train_dataloader())[:2]
    forward = lit.hidden_states
    stats = collect_input_stats(lit.model, names, batches, forward, max_batches=2)  # float64 products
    fast = collect_input_stats(lit.model, names, batches, forward, max_batches=2, gram_dtype=torch.float32)

    captured = {}
    handles = [lit.model.get_submodule(n).register_forward_pre_hook(
        lambda m, inp, n=n: captured.setdefault(n, []).append(inp[0])) for n in names]
    with torch.no_grad():
        for b in batches:
            forward(b)
    for h in handles:
        h.remove()
    for n in names:
        x = torch.cat([c[b["attention_mask"].bool()] for c, b in zip(captured[n], batches)]).double()
        assert stats[n].tokens == x.shape[0] == sum(int(b["attention_mask"].sum()) for b in batches)
        torch.testing.assert_close(stats[n].gram, x.T @ x)
        torch.testing.assert_close(stats[n].abs_sum, x.abs().sum(0))
        torch.testing.assert_close(stats[n].abs_max, x.abs().amax(0))  # real tokens only, like the sums
        # float32 products summed in float64: float32 accuracy relative to the Gram's scale
        assert fast[n].gram.dtype == torch.float64 and fast[n].tokens == stats[n].tokens
        scale = float(stats[n].gram.abs().max())
        torch.testing.assert_close(fast[n].gram, stats[n].gram, rtol=1e-5, atol=1e-5 * scale)
    # layers that read one input tensor get the same statistics (computed once)
    q, k, v = (stats[f"model.layers.1.self_attn.{p}_proj"] for p in "qkv")
    assert torch.equal(q.gram, k.gram) and torch.equal(k.gram, v.gram)
    assert not torch.equal(q.gram, stats["model.layers.1.self_attn.o_proj"].gram)
