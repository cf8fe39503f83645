"""A real `python train.py` run on a tiny configuration, end to end."""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO

TINY = [
    "dataset.max_len=20",
    "model.hidden_size=16",
    "model.intermediate_size=32",
    "trainer.max_epochs=2",
]
REQUIRED = [
    "test/hr@1", "test/hr@5", "test/hr@10", "test/hr@20", "test/ndcg@5", "test/ndcg@10",
    "test/ndcg@20", "test/mrr", "params/total", "time/train_s", "time/test_s",
    "data/n_users", "data/n_items", "data/n_interactions",
]


def train(run_dir, *overrides):
    # W&B as a user has it (CI sets WANDB_SILENT): quiet by train.py's own default
    env = {**{k: v for k, v in os.environ.items() if k not in ("WANDB_SILENT", "WANDB_QUIET")}, "WANDB_MODE": "offline"}
    out = subprocess.run(
        [sys.executable, "train.py", *TINY, f"hydra.run.dir={run_dir}", *overrides],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=600,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return json.loads((run_dir / "metrics.json").read_text()), out


@pytest.fixture(scope="module")
def default_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    metrics, out = train(run_dir)
    return run_dir, metrics, out


def test_metrics_json_has_the_contract_keys(default_run):
    _, metrics, _ = default_run
    assert set(REQUIRED) <= set(metrics)
    assert metrics["data/n_users"] == 610 and metrics["data/n_items"] == 9724
    assert metrics["data/n_interactions"] == 100_836
    assert 0 <= metrics["test/ndcg@10"] <= metrics["test/hr@10"] <= metrics["test/hr@20"] <= 1
    assert metrics["params/total"] == 9725 * 16 + 2 * (4 * 16 * 16 + 3 * 16 * 32 + 2 * 16) + 16
    assert metrics["baseline/popularity/test/ndcg@10"] == pytest.approx(0.01917, abs=1e-4)


def test_the_runs_answer_is_its_last_lines(default_run):
    run_dir, metrics, out = default_run
    lines = out.stdout.strip().splitlines()
    assert lines[-1] == f"metrics -> {run_dir / 'metrics.json'}"
    assert lines[-2].startswith(f"test ndcg@10 {metrics['test/ndcg@10']:.4f}  hr@10 {metrics['test/hr@10']:.4f}  "
                                f"(popularity ndcg@10 {metrics['baseline/popularity/test/ndcg@10']:.4f})")
    assert "Run summary" not in out.stdout + out.stderr  # W&B's ~40 summary lines stay off the console


def test_a_compression_runs_answer_names_base_compressed_and_retention_with_its_interval(tmp_path):
    from recsys_compress.tasks.train_seqrec import result_lines

    metrics = {"test/ndcg@10": 0.0412, "test/hr@10": 0.08, "time/train_s": 0.0, "base/cache_hit": 1,
               "base/test/ndcg@10": 0.0500, "retention/ndcg@10": 0.824, "retention/ndcg@10_ci_low": 0.75,
               "retention/ndcg@10_ci_high": 0.9, "compression/method": "odllm", "compression/ratio": 0.5,
               "alignment/method": "progressive", "deploy/test/ndcg@10": 0.0410, "deploy/retention/ndcg@10": 0.82,
               "deploy/retention/ndcg@10_ci_low": 0.74, "deploy/retention/ndcg@10_ci_high": 0.89, "size/onnx_mb": 3.25}
    assert result_lines(metrics, tmp_path / "metrics.json") == [
        "[bold]test ndcg@10 0.0412  hr@10 0.0800  train 0.0s  (base model from the cache)[/bold]",
        "[bold]odllm@0.5 + progressive: test ndcg@10 0.0500 (base) -> 0.0412, retention 0.824 [0.750, 0.900] "
        "(95% paired bootstrap over test users)[/bold]",
        "[bold]deployed artefact: test ndcg@10 0.0410, retention 0.820 [0.740, 0.890], 3.2 MB[/bold]",
        f"metrics -> {tmp_path / 'metrics.json'}"]


def test_run_directory_has_checkpoints_csv_and_config(default_run):
    run_dir, _, _ = default_run
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    assert any(p.name.startswith("epoch") for p in (run_dir / "checkpoints").iterdir())
    csv = next(run_dir.glob("csv/version_*/metrics.csv")).read_text()
    assert "val/ndcg@10" in csv and "train/loss" in csv
    assert (run_dir / ".hydra" / "config.yaml").is_file()  # the exact config of the run


def test_offline_wandb_run_has_the_metrics(default_run):
    run_dir, metrics, _ = default_run
    runs = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1
    out = subprocess.run(
        ["wandb", "leet", "inspect", "--summary", "--json", str(runs[0])],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    summary = json.loads(out.stdout)
    assert summary["state"] == "finished" and summary["exit_code"] == 0
    assert summary["project"] == "recsys-compress"
    logged = summary["summary"]
    for key in ("test/ndcg@10", "test/hr@10", "data/n_items", "val/ndcg@10"):
        assert key in logged, sorted(logged)
    assert logged["test/ndcg@10"] == pytest.approx(metrics["test/ndcg@10"], rel=1e-5)


def test_same_seed_gives_the_same_test_metrics(default_run, tmp_path):
    _, first, _ = default_run
    second, _ = train(tmp_path / "again", "logger=none")
    for key in REQUIRED:
        if key.startswith("test/"):
            assert second[key] == first[key], key


def test_bad_config_fails_before_training(tmp_path):
    env = {**os.environ, "WANDB_MODE": "offline"}
    out = subprocess.run(
        [sys.executable, "train.py", "dataset.max_len=-3", f"hydra.run.dir={tmp_path}"],
        cwd=REPO, capture_output=True, text=True, env=env, timeout=300,
    )
    assert out.returncode != 0
    assert "dataset.max_len=-3 is out of range; allowed: >= 1" in out.stderr + out.stdout
    assert not (tmp_path / "metrics.json").exists()
