"""recsys-compression-table (recsys_compress/tasks/compression_table.py), as BENCHMARKS.md runs it, on a tiny trained run."""

import json
import subprocess
import sys

import pytest

from conftest import REPO

TINY = ["model.hidden_size=16", "model.intermediate_size=32", "dataset.max_len=20", "trainer.max_epochs=1",
        "+trainer.limit_train_batches=3", "logger=none", "evaluation.popularity_baseline=false"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A tiny finished compression run (its base model in the cache) and its cache override."""
    root = tmp_path_factory.mktemp("trained")
    run_dir, cache = root / "run", f"paths.cache_dir={root / 'cache'}"
    subprocess.run([sys.executable, "train.py", "compression=odllm", cache, *TINY, f"hydra.run.dir={run_dir}"],
                   cwd=REPO, check=True, capture_output=True, timeout=600)
    return run_dir, cache


def test_the_table_composes_every_cell_through_hydra_and_pairs_allocations(trained_run, tmp_path):
    run_dir, cache = trained_run
    trained = json.loads((run_dir / "metrics.json").read_text())
    out = tmp_path / "table.json"
    done = subprocess.run(
        [sys.executable, "-m", "recsys_compress.tasks.compression_table", str(run_dir), "--methods", "odllm", "wanda",
         "--ratios", "0.5", "--allocations", "uniform", "global", "zero_sum", "--alignments", "none", "progressive_lstsq",
         "--calib-batches", "2", "--heldout-batches", "1", "--out", str(out), "alignment.batches=2", cache],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())
    # the cached base of the run, tested again: the same figure
    assert table["base"]["test/ndcg@10"] == trained["base/test/ndcg@10"]
    cells = {(r["method"], r["allocation"], r["alignment"]) for r in table["rows"]}
    # pruning runs uniform and unaligned; odllm gets every allocation x alignment
    assert cells == {("wanda", "uniform", "none"), *{("odllm", a, al) for a in ("uniform", "global", "zero_sum")
                                                      for al in ("none", "progressive_lstsq")}}
    # per-user NDCG@10 of the base and of every cell, in the rows' order: cells of two
    # invocations can be paired; each cell's mean over its users is its test figure
    per_user = table["per_user"]
    assert len(per_user["rows"]) == len(table["rows"]) and len(per_user["base"]) > 0
    assert sum(per_user["base"]) / len(per_user["base"]) == pytest.approx(table["base"]["test/ndcg@10"], rel=1e-5)
    for r, users in zip(table["rows"], per_user["rows"]):
        assert len(users) == len(per_user["base"])
        assert sum(users) / len(users) == pytest.approx(r["test/ndcg@10"], rel=1e-5)
    for r in table["rows"]:
        assert r["retention/ndcg@10_ci_low"] <= r["retention/ndcg@10"] <= r["retention/ndcg@10_ci_high"]
        assert ("vs_uniform/ndcg@10" in r) == (r["allocation"] != "uniform")
        # only the loss-driven rule spends time on backward passes, and within compress_s
        assert (r["time/loss_gradient_s"] > 0) == (r["allocation"] == "zero_sum")
        assert r["time/loss_gradient_s"] < r["time/compress_s"]
    # the uniform odllm cell keeps the ranks the run itself kept (ranks depend on shapes and ratio only)
    uniform = next(r for r in table["rows"] if r["method"] == "odllm" and r["allocation"] == "uniform"
                   and r["alignment"] == "none")
    assert uniform["compression/targeted_params_after"] == trained["compression/targeted_params_after"]
    glob = next(r for r in table["rows"] if r["method"] == "odllm" and r["allocation"] == "global"
                and r["alignment"] == "none")
    assert glob["compression/mean_rel_output_error"] != uniform["compression/mean_rel_output_error"]
    assert "| 0.5 |" in done.stdout and "odllm (global) + progressive_lstsq" in done.stdout


def test_the_ondevice_benchmark_tests_each_artefact_of_a_trained_run(trained_run, tmp_path):
    """``bench_ondevice.py --base-run RUN --test``: the run's trained model (not the untrained
    architecture) is what is exported, each artefact ranks the test users as shipped, and a
    float variant and its int8 twin are compressed once. The int8 twins are smoothed as train.py
    would ship them (export.int8_smooth's default, 0.5: ``+int8s0.5``)."""
    run_dir, cache = trained_run
    trained = json.loads((run_dir / "metrics.json").read_text())
    out = tmp_path / "ondevice.json"
    done = subprocess.run(
        [sys.executable, "experiments/bench_ondevice.py", "--runtime", "onnx", "--base-run", str(run_dir), "--test",
         "--ratios", "0.5", "--rounds", "1", "--reps", "2", "--batch", "2", "--calib-batches", "1", "--threads", "1",
         "--out", str(out), "--export-dir", str(tmp_path / "art"), cache],
        cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    quality = {q["variant"]: q for q in result["quality"]}
    # each int8 artefact against its float twin, user by user; an artefact against itself agrees exactly
    for v in ("base+int8s0.5", "odllm+int8s0.5@0.5"):
        assert 0 < quality[v]["score_error"] < 0.5 and 0 < quality[v]["top_k_overlap"] <= 1
    assert "score_error" not in quality["base"] and "score_error" not in quality["odllm@0.5"]
    from bench_ondevice import agreement

    from recsys_compress.tasks.builders import build_datamodule
    from recsys_compress.tasks.config import validate
    from recsys_compress.deploy.evaluate import evaluate_artefact
    from recsys_compress.tasks.trained_run import run_overrides
    from recsys_compress.tasks.compose import compose_config

    run = validate(compose_config(run_overrides(run_dir)))
    dm = build_datamodule(run.dataset, run.seed)
    scores = []
    evaluate_artefact(tmp_path / "art" / "odllm@0.5", dm.test_dataloader(), scores=scores)
    same = agreement(scores, scores)
    assert set(same["score_error"]) == {0.0} and set(same["top_k_overlap"]) == {1.0}
    assert len(same["score_error"]) == len(dm.test_dataloader().dataset)
    assert set(quality) == {"base", "base+int8s0.5", "odllm@0.5", "odllm+int8s0.5@0.5"}
    # the exported trained base ranks the test users as the run's own test did
    assert quality["base"]["ndcg@10"] == pytest.approx(trained["base/test/ndcg@10"], abs=1e-6)
    assert quality["base"]["seen_kept/ndcg@10"] == pytest.approx(trained["base/test/seen_kept/ndcg@10"], abs=1e-6)
    assert (quality["base"]["retention"], quality["base"]["retention_ci_low"], quality["base"]["retention_ci_high"]) == (1, 1, 1)
    for q in quality.values():
        assert q["retention_ci_low"] <= q["retention"] <= q["retention_ci_high"]
    rounds = result["rounds"]
    assert rounds["odllm@0.5"][0]["compress_s"] == rounds["odllm+int8s0.5@0.5"][0]["compress_s"] > 0  # built once
    assert json.loads((tmp_path / "art" / "odllm+int8s0.5@0.5" / "deploy.json").read_text())["int8_smooth"] == 0.5
    assert "each artefact on the test users" in done.stdout
