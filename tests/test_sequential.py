"""Sequential (block-by-block) compression against the whole-model path, on real MovieLens batches."""

import os
import weakref

import pytest
import torch

from conftest import SMALL
from recsys_compress.compression import compressor as compressor_module
from recsys_compress.compression import sequential as sequential_module
from recsys_compress.compression.apply import relative_output_error
from recsys_compress.compression.calibration import (
    collect_input_stats,
    select_linear_layers,
    split_calibration,
    statistics_bytes,
)
from recsys_compress.compression.compressor import Compressor
from recsys_compress.compression.sensitivity import loss_gradients
from recsys_compress.compression.sequential import compress_sequential
from recsys_compress.compression.config import CompressionConfig
from recsys_compress.data.datamodule import NextItemDataModule
from recsys_compress.models.item_llm import build_llama
from recsys_compress.models.lit_seqrec import SeqRecLitModule

LAYERS, PER_BLOCK = 3, 7


@pytest.fixture(scope="module")
def data():
    dm = NextItemDataModule("grouplens_csv", SMALL, max_len=20, batch_size=64)
    dm.setup()
    return dm


def fresh(dm) -> SeqRecLitModule:
    torch.manual_seed(0)
    lit = SeqRecLitModule(build_llama(dm.n_items, hidden_size=32, num_layers=LAYERS, num_heads=2,
                                      num_kv_heads=1, intermediate_size=64, max_len=20))
    return lit.eval()


def whole_model(dm, method, allocation="uniform", rank_align=1):
    lit = fresh(dm)
    cb = Compressor(CompressionConfig(method=method, calib_batches=4, allocation=allocation,
                                               rank_align=rank_align), 0.5)
    cb.compress(lit, dm.train_dataloader())
    return lit, cb


def sequential(dm, method, propagate, allocation="uniform", rank_align=1):
    lit = fresh(dm)
    calibration, heldout = split_calibration(dm.train_dataloader(), 4, 4)
    names = select_linear_layers(lit.model)
    gradients = loss_gradients(lit.model, names, calibration, lit.loss) if allocation == "zero_sum" else None
    result = compress_sequential(lit.model, names, method, 0.5, calibration, heldout,
                                 lit.hidden_states,
                                 allocation=allocation, propagate=propagate, rank_align=rank_align,
                                 gradients=gradients)
    return lit, result


def block_of(key: str) -> int | None:
    return int(key.split(".layers.")[1].split(".")[0]) if ".layers." in key else None


@pytest.mark.parametrize("method,allocation,rank_align", [
    ("odllm", "uniform", 1), ("odllm", "global", 1), ("odllm", "zero_sum", 1), ("asvd", "uniform", 1),
    ("wanda", "uniform", 1),
    ("odllm", "uniform", 4),  # aligned ranks: one budget over every block in both paths
])
def test_original_propagation_gives_the_whole_model_factors(data, method, allocation, rank_align):
    reference, cb = whole_model(data, method, allocation, rank_align)
    lit, result = sequential(data, method, "original", allocation, rank_align)
    expected, got = reference.model.state_dict(), lit.model.state_dict()
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=0, atol=1e-10, msg=key)
    for a, b in zip(cb.reports, result.reports):
        assert (a.name, a.rank, a.dense) == (b.name, b.rank, b.dense)
        assert b.rel_output_error == pytest.approx(a.rel_output_error, rel=1e-9)
        assert b.heldout_rel_output_error == pytest.approx(a.heldout_rel_output_error, rel=1e-9)
    assert result.spectra_pass == (allocation != "uniform")
    if rank_align > 1:
        assert {r.rank % rank_align for r in result.reports} == {0}
        # unaligned, the MLP matrices keep rank 10 and k/v rank 5: all go down to 8 and 4, and the
        # 2,016 parameters freed over all blocks raise five MLP matrices (384 each) to 12
        assert sorted(r.rank for r in result.reports if r.in_features + r.out_features == 96) == [8] * 4 + [12] * 5
        assert sorted(r.rank for r in result.reports if r.out_features == 16) == [4] * 6


def test_compressed_propagation_keeps_block_0_and_refits_the_blocks_above(data):
    reference, _ = whole_model(data, "odllm")
    lit, result = sequential(data, "odllm", "compressed")
    expected, got = reference.model.state_dict(), lit.model.state_dict()
    differs = {}
    for key in expected:
        block = block_of(key)
        if block is not None:
            differs[block] = differs.get(block, False) or not torch.equal(expected[key], got[key])
    assert differs == {0: False, 1: True, 2: True}
    # the same ranks and budget: only the factors' fit differs
    assert [r.rank for r in result.reports] == [r.rank for r in _.reports]
    # Each block was fitted on the activations the *compressed* model feeds it: the q/k/v inputs
    # of the finished model (the first thing a block computes) give the reported errors exactly.
    original = fresh(data).model
    calibration, _ = split_calibration(data.train_dataloader(), 4, 0)
    qkv = [r for r in result.reports if r.name.endswith(("q_proj", "k_proj", "v_proj"))]
    deployed = collect_input_stats(lit.model, [r.name for r in qkv], calibration,
                                   lit.hidden_states, len(calibration))
    for r in qkv:
        W_hat = lit.model.get_submodule(r.name)
        with torch.no_grad():
            error = relative_output_error(original.get_submodule(r.name).weight, W_hat.A @ W_hat.B,
                                          deployed[r.name].gram)
        assert error == pytest.approx(r.rel_output_error, rel=1e-6), r.name


def test_only_one_blocks_statistics_are_alive_at_once(data, monkeypatch):
    """Every Gram matrix is counted as the statistics hooks create it, and as it is freed."""
    live: weakref.WeakSet = weakref.WeakSet()
    peak = {"grams": 0}

    def counting(real):
        def collect(*args, **kwargs):
            stats = real(*args, **kwargs)
            live.update(s.gram for s in stats.values())
            peak["grams"] = max(peak["grams"], len(live))
            return stats
        return collect

    monkeypatch.setattr(sequential_module, "collect_input_stats", counting(sequential_module.collect_input_stats))
    monkeypatch.setattr(compressor_module, "collect_input_stats", counting(compressor_module.collect_input_stats))
    sequential(data, "odllm", "compressed", allocation="global")
    assert peak["grams"] == 2 * PER_BLOCK  # one block: calibration + held-out
    peak["grams"] = 0
    live.clear()
    whole_model(data, "odllm")
    assert peak["grams"] == 2 * PER_BLOCK * LAYERS


def test_each_blocks_statistics_are_freed_and_their_pages_handed_back_before_the_next_block(data, monkeypatch):
    """The trim runs once per block and pass, each time with no Gram matrix left alive."""
    live: weakref.WeakSet = weakref.WeakSet()
    alive_at_trim: list[int] = []

    def collect(*args, **kwargs):
        stats = collect_input_stats(*args, **kwargs)
        live.update(s.gram for s in stats.values())
        return stats

    monkeypatch.setattr(sequential_module, "collect_input_stats", collect)
    monkeypatch.setattr(sequential_module, "release_freed_memory", lambda: alive_at_trim.append(len(live)))
    sequential(data, "odllm", "compressed")
    assert alive_at_trim == [0] * LAYERS
    alive_at_trim.clear()
    sequential(data, "odllm", "compressed", allocation="global")  # the spectra pass trims too
    assert alive_at_trim == [0] * (2 * LAYERS)


def test_releasing_freed_memory_returns_the_heaps_free_pages_to_the_system():
    """Tensors below glibc's mmap threshold live in the heap; freed under a live one, their pages
    stay resident until the trim (this machine, like CI's, runs glibc)."""
    from recsys_compress.utils.memory import release_freed_memory, resident_mib

    chunks = [torch.ones(16_000) for _ in range(3_000)]  # 64 kB each, 183 MiB, written
    pin = torch.ones(16_000)  # above them in the heap: free() alone cannot shrink it
    del chunks
    before = resident_mib()
    assert release_freed_memory() is True
    assert before - resident_mib() > 100
    del pin


BOUNDED_STEP = """
import os, torch
from recsys_compress.utils.memory import large_allocations_mapped, resident_mib

def freed_but_resident_mib():  # 3,000 tensors of 128 kB written, one kept above them, the rest freed
    before = resident_mib()
    chunks = [torch.ones(32_000) for _ in range(3_000)]
    pin = torch.ones(32_000)
    del chunks
    return resident_mib() - before

with large_allocations_mapped() as applied:
    inside = freed_but_resident_mib()
after = freed_but_resident_mib()
print(applied, round(inside), round(after))
"""


def test_inside_a_bounded_step_freed_tensors_leave_at_once_and_the_heap_serves_them_after():
    """In a fresh process (a heap with free room would serve the tensors from its holes)."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "MALLOC_MMAP_THRESHOLD_"}
    out = subprocess.run([sys.executable, "-c", BOUNDED_STEP], capture_output=True, text=True, check=True, env=env)
    applied, inside, after = out.stdout.split()
    assert applied == "True" and int(inside) < 20  # 366 MiB freed: each its own mapping, gone at once
    assert int(after) > 200  # glibc's 32 MiB threshold again: the heap keeps them
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"  # the user's own setting wins
    out = subprocess.run([sys.executable, "-c", BOUNDED_STEP], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split()[0] == "False"


def test_the_sequential_path_runs_as_a_bounded_step(data, monkeypatch):
    """The threshold is lowered before the first block's statistics and restored after the last."""
    from recsys_compress.utils import memory

    events = []

    def libc(name):
        return {"mallopt": lambda option, value: events.append(("mallopt", option, value)),
                "malloc_trim": lambda pad: events.append(("trim",))}[name]

    def stats(*args, **kwargs):
        events.append(("stats",))
        return block_stats(*args, **kwargs)

    block_stats = sequential_module._block_stats
    monkeypatch.setattr(memory, "_libc_function", libc)
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    monkeypatch.setattr(sequential_module, "_block_stats", stats)
    sequential(data, "odllm", "compressed")
    per_block = [("stats",), ("stats",), ("trim",)]  # calibration, held-out, then the trim
    assert events == [("mallopt", memory.M_MMAP_THRESHOLD, 64 * 2**10), *per_block * LAYERS,
                      ("mallopt", memory.M_MMAP_THRESHOLD, 32 * 2**20)]


def test_the_config_switch_reaches_the_sequential_path_and_a_layer_outside_the_blocks_fails(data):
    lit = fresh(data)
    cb = Compressor(CompressionConfig(method="odllm", calib_batches=4, sequential=True), 0.5)
    cb.compress(lit, data.train_dataloader())
    direct, _ = sequential(data, "odllm", "compressed")
    for key, value in direct.model.state_dict().items():
        assert torch.equal(lit.model.state_dict()[key], value), key
    summary = cb.summary()
    assert summary["compression/calib_tokens"] > 0 and summary["compression/heldout_tokens"] > 0
    assert 0 < summary["time/calibrate_s"] < summary["time/compress_s"]

    outside = Compressor(CompressionConfig(method="odllm", calib_batches=2, sequential=True,
                                                    include=["*.mlp.up_proj", "lm_head"]), 0.5)
    with pytest.raises(ValueError, match="layer lm_head lies outside them: exclude it .* compression.sequential=false"):
        outside.compress(fresh(data), data.train_dataloader())


def test_statistics_that_would_not_fit_are_refused_with_the_numbers(data, monkeypatch):
    in_features = [[32] * 6 + [64]] * LAYERS  # q/k/v/o/gate/up read the hidden state, down the MLP's
    one_block = 2 * 8 * (6 * (32 * 32 + 32) + 64 * 64 + 64)
    assert statistics_bytes(in_features, 32, 0, heldout=True, sequential=False) == LAYERS * one_block
    assert statistics_bytes(in_features, 32, 1000, heldout=True, sequential=True) == one_block + 4 * 32 * 1000
    monkeypatch.setattr(compressor_module, "available_memory_bytes", lambda: 100_000)
    whole, one = LAYERS * one_block / 2**20, (one_block + 4 * 32 * 10_752) / 2**20
    for sequential, expected, mode, hint in (
            (False, f"{whole:.1f}", "every layer at once", "set compression.sequential=true"),
            (True, f"{one:.1f}", "one block at a time", "lower compression.calib_batches or compression.heldout_batches")):
        cb = Compressor(CompressionConfig(method="odllm", calib_batches=4, sequential=sequential), 0.5)
        with pytest.raises(MemoryError, match=rf"calibration statistics need {expected} MiB \(21 layers, {mode}, "
                                              rf"10,752 padded tokens\), and 0.1 MiB are available: {hint}"):
            cb.compress(fresh(data), data.train_dataloader())
    # zero_sum also keeps a float64 loss gradient of every targeted weight (both paths)
    module = fresh(data)
    weights = sum(m.weight.numel() for m in module.model.modules()
                  if isinstance(m, torch.nn.Linear) and m is not module.model.get_output_embeddings())
    assert statistics_bytes(in_features, 32, 0, True, False, gradient_weights=weights) == LAYERS * one_block + 8 * weights
    cb = Compressor(CompressionConfig(method="odllm", calib_batches=4, allocation="zero_sum"), 0.5)
    with pytest.raises(MemoryError, match=rf"need {(LAYERS * one_block + 8 * weights) / 2**20:.1f} MiB \(21 layers, "
                                          rf"every layer at once, 10,752 padded tokens, loss gradients of {weights:,} weights\)"):
        cb.compress(module, data.train_dataloader())
