"""The on-device benchmark's statistics on synthetic timings, and the profiler's attribution on
real (tiny) artefacts."""

from pathlib import Path

import pytest

from recsys_compress.evaluation.bootstrap import paired_median_ratio

REPO = Path(__file__).resolve().parents[1]


def test_paired_median_ratio_on_synthetic_timings():
    # every round the variant takes half the base's time, whatever the round's load
    exact = paired_median_ratio([10.0, 11.0, 9.0, 10.0, 12.0], [5.0, 5.5, 4.5, 5.0, 6.0])
    assert exact == {"median": 0.5, "q1": 0.5, "q3": 0.5, "low": 0.5, "high": 0.5, "rounds": 5}
    spread = paired_median_ratio([1.0] * 5, [0.4, 0.45, 0.5, 0.55, 0.6])
    assert (spread["median"], spread["q1"], spread["q3"]) == pytest.approx((0.5, 0.45, 0.55))
    assert 0.4 <= spread["low"] < 0.5 < spread["high"] <= 0.6  # the median of 5 resampled rounds
    assert paired_median_ratio([1.0] * 5, [0.4, 0.45, 0.5, 0.55, 0.6], seed=0) == spread  # deterministic
    nine = paired_median_ratio([1.0] * 9, [0.4, 0.45, 0.47, 0.49, 0.5, 0.51, 0.53, 0.55, 0.6])
    assert spread["low"] < nine["low"] and nine["high"] < spread["high"]  # more rounds, a narrower interval
    with pytest.raises(ValueError, match="paired per-round values needed, got 2 and 3"):
        paired_median_ratio([1.0, 2.0], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="base values must be positive"):
        paired_median_ratio([0.0], [1.0])


def test_benchmark_rows_pair_the_rounds():
    from bench_ondevice import pairwise, summarize

    def rounds(latencies, throughputs, file_mb):
        return [{"latency_ms": lat, "throughput_seq_s": thr, "peak_rss_mb": 100.0, "file_mb": file_mb,
                 "compress_s": 0.0, "params": 10} for lat, thr in zip(latencies, throughputs)]

    # rounds 2, 4 and 5 ran under load (3x slower for both variants while each was timed) except
    # round 5 of the variant: paired by round the variant is 0.5x (one round 1/6x); the ratio of
    # the two medians would say 1/6x
    results = {
        "base": rounds([10, 30, 10, 30, 30], [8, 8 / 3, 8, 8 / 3, 8 / 3], 4.0),
        "odllm@0.5": rounds([5, 15, 5, 15, 5], [16, 16 / 3, 16, 16 / 3, 16], 2.0),
    }
    base, odllm = summarize(results, "base")
    assert base["latency_x_base"]["median"] == 1.0 and base["latency_x_base"]["high"] == 1.0
    assert odllm["latency_x_base"]["median"] == pytest.approx(0.5)
    assert odllm["latency_x_base"]["q1"] == pytest.approx(0.5) and odllm["latency_x_base"]["low"] == pytest.approx(1 / 6)
    assert odllm["throughput_x_base"]["median"] == pytest.approx(2.0)
    assert odllm["latency_ms"] == 5 and odllm["file_x_base"] == 0.5 and odllm["params"] == 10
    results["odllm+int8@0.5"] = rounds([4, 12, 4, 12, 4], [1] * 5, 1.0)
    results["base+int8"] = rounds([5, 15, 5, 15, 5], [1] * 5, 1.0)
    results["odllm@0.5/a32"] = rounds([4, 12, 4, 12, 4], [1] * 5, 2.0)
    results["odllm@0.5:global_relative"] = rounds([6, 18, 6, 18, 6], [1] * 5, 2.0)
    results["odllm+int8@0.5/a32:global_relative"] = rounds([2, 6, 2, 6, 2], [1] * 5, 1.0)
    results["odllm+int8@0.5/a32"] = rounds([3, 9, 3, 9, 3], [1] * 5, 1.0)
    results["base+int8static"] = rounds([4, 12, 4, 12, 4], [1] * 5, 1.0)
    results["odllm+int8static@0.5"] = rounds([3, 9, 3, 9, 3], [1] * 5, 1.0)
    results["odllm+int8pt@0.5"] = rounds([5, 15, 5, 15, 5], [1] * 5, 1.0)
    results["odllm+int8staticpt@0.5"] = rounds([3, 9, 3, 9, 3], [1] * 5, 1.0)
    results["odllm+int8s0.75@0.5"] = rounds([4, 12, 4, 12, 4], [1] * 5, 1.0)
    by_pair = {(p["variant"], p["reference"]): p["latency"]["median"] for p in pairwise(results)}
    assert by_pair == pytest.approx({
        ("odllm+int8@0.5", "base+int8"): 0.8, ("odllm@0.5/a32", "odllm@0.5"): 0.8,
        ("odllm@0.5:global_relative", "odllm@0.5"): 1.2,  # an allocation against its uniform twin
        ("odllm+int8@0.5/a32:global_relative", "base+int8"): 0.4,  # its unaligned twin is not in the run
        ("odllm+int8@0.5/a32:global_relative", "odllm+int8@0.5/a32"): 2 / 3,
        ("odllm+int8@0.5/a32", "base+int8"): 0.6, ("odllm+int8@0.5/a32", "odllm+int8@0.5"): 0.75,
        # static int8 against static int8 alone and against its dynamic twin
        ("base+int8static", "base+int8"): 0.8, ("odllm+int8static@0.5", "base+int8static"): 0.75,
        ("odllm+int8static@0.5", "odllm+int8@0.5"): 0.75,
        # one weight scale per matrix against int8 alone (its base+int8pt twin is not in the run) and
        # against the per-channel twin; static per matrix against both of its twins
        ("odllm+int8pt@0.5", "odllm+int8@0.5"): 1.25,
        ("odllm+int8staticpt@0.5", "odllm+int8pt@0.5"): 0.6, ("odllm+int8staticpt@0.5", "odllm+int8static@0.5"): 1.0,
        # smoothed against its unsmoothed twin (its int8 alone, base+int8s0.75, is not in the run)
        ("odllm+int8s0.75@0.5", "odllm+int8@0.5"): 1.0,
    })


def test_variant_names_round_trip():
    from bench_ondevice import Int8, artefact_dir, parse_variant, variant_name

    assert parse_variant("base") == ("base", None, 1.0, 1, "uniform")
    assert parse_variant("odllm+int8@0.3/a32:global_relative") == (
        "odllm", ("dynamic", "per_channel", None), 0.3, 32, "global_relative")
    assert parse_variant("odllm+int8static@0.5") == ("odllm", ("static", "per_channel", None), 0.5, 1, "uniform")
    assert parse_variant("base+int8pt") == ("base", ("dynamic", "per_tensor", None), 1.0, 1, "uniform")
    assert parse_variant("odllm+int8s0.75@0.5") == ("odllm", Int8(smooth=0.75), 0.5, 1, "uniform")
    assert parse_variant("base+int8staticpts0.5")[1] == Int8("static", "per_tensor", 0.5)
    for bad in ("odllm+int4@0.5", "base+int8s", "base+int8ptstatic"):
        with pytest.raises(ValueError, match=r"unknown suffix .*; allowed: \+int8\[static\]\[pt\]\[sALPHA\]"):
            parse_variant(bad)
    for name in ("base", "base+int8", "base+int8static", "odllm@0.5", "odllm+int8@0.5/a16", "svd@0.7:global",
                 "odllm+int8static@0.5/a32:global", "base+int8pt", "odllm+int8staticpt@0.3/a8",
                 "odllm+int8s0.75@0.5/a32", "base+int8staticpts1"):
        method, int8, ratio, align, allocation = parse_variant(name)
        assert variant_name(method, int8, ratio, align, allocation) == name
    assert artefact_dir("x", "odllm@0.5/a32:global").name == "odllm@0.5_a32_global"


def test_the_benchmarks_allocation_reaches_the_compressed_variants_only():
    """A variant named ``:global_relative`` gets the ranks of that allocation, at uniform's budget;
    base+int8 (no ranks to set) builds as before."""
    import argparse

    from bench_ondevice import build_variant

    from recsys_compress.compression.low_rank import LowRankLinear
    from recsys_compress.models.item_llm import count_parameters

    def variant(name):
        args = argparse.Namespace(model="llama_tiny", base_run=None, overrides=["dataset=ml_latest_small"], threads=1, device="cpu",
                                  calib_batches=2, runtime="torch")
        lit = build_variant(args, name)[0]
        ranks = {n: m.rank for n, m in lit.model.named_modules() if isinstance(m, LowRankLinear)}
        return ranks, count_parameters(lit.model)

    uniform, uniform_params = variant("odllm@0.5")
    relative, relative_params = variant("odllm@0.5:global_relative")
    assert len(set(uniform.values())) < len(set(relative.values()))  # uniform: one rank per matrix shape
    assert uniform != relative and abs(relative_params - uniform_params) <= 64 + 256  # one direction of the widest matrix
    assert variant("base+int8")[1] == variant("base")[1]


def test_reuse_takes_only_an_artefact_exported_as_the_variant():
    """``--reuse-exports`` measures a kept artefact again only where its deploy.json says it is
    the variant's export: an artefact from before ``int8_weights`` (one scale per matrix, and
    nothing said) is not the +int8 of now (per output channel), nor one from before
    ``int8_weight_bits`` (8-bit weights under onnxruntime >= 1.32)."""
    from bench_ondevice import exported_as

    def meta(**fields):
        return {"format": "x", **fields}

    def int8_meta(**fields):
        return meta(int8_weight_bits=7, **fields)

    assert exported_as(meta(int8=None, int8_weights=None), "odllm@0.5")
    assert exported_as(meta(), "base")  # a float artefact from before the field
    assert not exported_as(int8_meta(int8="dynamic"), "base+int8") and not exported_as(int8_meta(int8="dynamic"), "base+int8pt")
    assert exported_as(int8_meta(int8="dynamic", int8_weights="per_channel"), "base+int8")
    assert not exported_as(int8_meta(int8="dynamic", int8_weights="per_channel"), "base+int8static")
    assert exported_as(int8_meta(int8="static", int8_weights="per_tensor"), "odllm+int8staticpt@0.5/a32")
    # an artefact from before int8_smooth was not smoothed
    assert not exported_as(int8_meta(int8="dynamic", int8_weights="per_channel"), "base+int8s0.75")
    assert exported_as(int8_meta(int8="dynamic", int8_weights="per_channel", int8_smooth=0.75), "base+int8s0.75")
    assert not exported_as(int8_meta(int8="dynamic", int8_weights="per_channel", int8_smooth=0.5), "base+int8s0.75")
    # one from before int8_weight_bits, or with 8-bit weights, is not today's +int8
    assert not exported_as(meta(int8="dynamic", int8_weights="per_channel"), "base+int8")
    assert not exported_as(meta(int8="dynamic", int8_weights="per_channel", int8_weight_bits=8), "base+int8")


def test_int8_twins_one_setting_apart_are_compared_on_the_same_users():
    """Per channel against per matrix, smoothed against not: the ratio of mean score errors, with
    a paired interval that holds it; twins absent from the run, or without a float twin, are skipped."""
    from bench_ondevice import score_error_pairs

    users = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]

    def errors(scale):
        return {"agreement": {"score_error": [scale * u for u in users]}}

    quality = {"base": {}, "base+int8": errors(1.0), "base+int8pt": errors(2.0), "base+int8s0.75": errors(0.25),
               "base+int8static": {}}
    pairs = {(p["variant"], p["reference"]): p for p in score_error_pairs(quality)}
    assert set(pairs) == {("base+int8", "base+int8pt"), ("base+int8s0.75", "base+int8")}
    for key, ratio in (("base+int8", "base+int8pt"), 0.5), (("base+int8s0.75", "base+int8"), 0.25):
        p = pairs[key]
        assert p["score_error_ratio"] == pytest.approx(ratio)
        assert p["low"] == pytest.approx(ratio) and p["high"] == pytest.approx(ratio)  # every user's ratio is the same


def test_fused_sibling_projections_compute_what_the_separate_ones_do():
    """``bench_factor_matmul --siblings`` times one matmul over q/k/v's (or gate/up's)
    concatenated first weights against separate ones: both graphs must compute the same outputs,
    dense and as factor pairs, or the comparison times different work."""
    import numpy as np
    import onnxruntime as ort

    from bench_factor_matmul import sibling_graph

    x = {"x": np.random.default_rng(0).standard_normal((5, 12)).astype(np.float32)}
    for ranks in (None, [3, 2, 2]):
        outs = [ort.InferenceSession(sibling_graph(12, [12, 4, 4], ranks, fused, copies=2, seed=1),
                                     providers=["CPUExecutionProvider"]).run(None, x) for fused in (False, True)]
        assert [o.shape for o in outs[0]] == [(5, 12), (5, 4), (5, 4)] * 2
        for separate, fused in zip(*outs):
            np.testing.assert_allclose(separate, fused, rtol=1e-5, atol=1e-6)
