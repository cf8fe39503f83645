"""recsys_compress/reporting/report.py's retention table: only comparable runs share a cell."""

import csv
import json
import os
import statistics

from omegaconf import OmegaConf

from recsys_compress.reporting import report
from recsys_compress.tasks.compose import compose_config


def fake_run(folder, overrides, retention, mtime, interval=None):
    """A finished compression run as the train task leaves it: ``run_config.yaml`` (the composed
    config) and ``metrics.json``; ``mtime`` orders reruns."""
    folder.mkdir(parents=True)
    cfg = compose_config(overrides, folder)
    (folder / "run_config.yaml").write_text(OmegaConf.to_yaml(cfg))
    metrics = {"retention/ndcg@10": retention, "compression/method": cfg.compression.method,
               "compression/allocation": cfg.compression.allocation, "compression/ratio": cfg.ratio,
               "alignment/method": cfg.alignment.method, "seed": cfg.seed, "data/name": cfg.dataset.name,
               "base/cache_hit": 1, "time/compress_s": 1.0}
    if interval:
        metrics["retention/ndcg@10_ci_low"], metrics["retention/ndcg@10_ci_high"] = interval
    path = folder / "metrics.json"
    path.write_text(json.dumps(metrics))
    os.utime(path, (mtime, mtime))
    return folder


def test_incomparable_runs_never_share_a_cell_and_seeds_pool(tmp_path):
    runs = tmp_path / "runs"
    plain = ["compression=odllm", "ratio=0.5"]
    fake_run(runs / "a_seed42", plain, 0.80, 100, (0.7, 0.9))
    rerun = fake_run(runs / "a_seed42_rerun", plain, 0.90, 200, (0.85, 0.95))
    fake_run(runs / "a_seed43", plain + ["seed=43"], 1.00, 150)
    int8 = fake_run(runs / "int8", plain + ["compression.quantize=int8", "export.onnx=true"], 0.905, 300)
    short = fake_run(runs / "svd_1epoch", ["compression=svd", "ratio=0.5", "trainer.max_epochs=1"], 0.976, 400)
    # where the outputs go is not what a run measured: same cell as the plain runs, another seed
    fake_run(runs / "elsewhere", plain + ["seed=44", "logger=csv", f"paths.cache_dir={tmp_path}/c"], 0.95, 50)

    out = tmp_path / "report"
    assert report.main([str(runs), "--out", str(out)]) == 0
    with open(out / "retention.csv") as f:
        cells = {(r["setting"], r["method"], r["ratio"]): r for r in csv.DictReader(f)}
    # three settings, named by what sets them apart
    assert set(cells) == {
        ("ml_latest_small, llama_tiny", "odllm", "0.5"),
        ("ml_latest_small, llama_tiny, compression.quantize=int8, export.onnx=True", "odllm", "0.5"),
        ("ml_latest_small, llama_tiny, trainer.max_epochs=1", "svd", "0.5"),
    }
    pooled = cells[("ml_latest_small, llama_tiny", "odllm", "0.5")]
    # seeds 42 (the newer rerun), 43 and 44 pooled; the older seed-42 run left out
    assert float(pooled["retention/ndcg@10"]) == statistics.fmean([0.90, 1.00, 0.95])
    assert int(pooled["seeds"]) == 3 and str(rerun) in pooled["runs"] and "a_seed42 " not in pooled["runs"] + " "
    assert float(cells[("ml_latest_small, llama_tiny, compression.quantize=int8, export.onnx=True", "odllm",
                        "0.5")]["retention/ndcg@10"]) == 0.905
    assert cells[("ml_latest_small, llama_tiny, trainer.max_epochs=1", "svd", "0.5")]["runs"] == str(short)
    text = (out / "report.md").read_text()
    assert "0.950 ± 0.050 (n=3 seeds)" in text
    assert f"| {runs / 'a_seed42'} | the same configuration and seed as {rerun}, which is newer |" in text
    assert ": ml_latest_small, llama_tiny, compression.quantize=int8, export.onnx=True" in text
    assert str(int8) in text


def test_a_single_setting_keeps_the_plain_title_and_the_interval(tmp_path):
    fake_run(tmp_path / "runs" / "one", ["compression=odllm", "ratio=0.5"], 0.8, 100, (0.7, 0.9))
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "(alignment time in brackets)\n" in text and "| 0.5 | 0.800 [0.700, 0.900] |" in text


def test_probe_runs_on_two_datasets_are_two_curves_not_two_seeds(tmp_path):
    """The same encoder, layer and seed on ML-100K and ML-1M: two curves, each with its own
    point; pooled as seeds they would be one point with a made-up spread."""
    for dataset, auc in (("ml_100k", 0.70), ("ml_1m", 0.80)):
        folder = tmp_path / "runs" / dataset
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps({
            "probe/layer": 1, "probe/dim": 32, "probe/compressor": "linear", "repr/encoder": "llama_tiny",
            "data/name": dataset, "seed": 0, "test/auc": auc, "val/best_auc": auc, "test/logloss": 0.5}))
    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    with open(tmp_path / "report" / "mra_curve.csv") as f:
        drawn = sorted((r["curve"], float(r["test/auc"]), r["seeds"]) for r in csv.DictReader(f))
    assert drawn == [("llama_tiny linear dim 32 [ml_100k]", 0.70, "1"), ("llama_tiny linear dim 32 [ml_1m]", 0.80, "1")]
