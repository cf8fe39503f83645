"""Experiment and search configs compose; a multirun records a failing job and finishes the rest."""

import csv
import json
import os
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from recsys_compress.tasks.config import validate, validate_marc, validate_probe
from recsys_compress.tasks.compose import PROJECT_ROOT, compose_config

from conftest import REPO

EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))
VALIDATORS = {"train": validate, "mra_probe": validate_probe, "marc": validate_marc}


@pytest.mark.parametrize("name", EXPERIMENTS)
def test_every_experiment_config_composes_and_validates(name, tmp_path):
    cfg = compose_config([f"experiment={name}"], tmp_path)
    VALIDATORS[cfg.task.name](cfg)
    assert cfg.task_name == name  # its outputs go to outputs/<experiment name>/
    expected_task = {"marc_ml1m": "marc", "mra_cold_ml1m": "mra_probe", "mra_curve_ml1m": "mra_probe"}
    assert cfg.task.name == expected_task.get(name, "train")


def hydra_config(overrides):
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose("train", overrides=[f"paths.root_dir={PROJECT_ROOT}", "paths.output_dir=/tmp/x", *overrides],
                       return_hydra_config=True)


@pytest.mark.parametrize("overrides, key, expected", [
    (["experiment=odllm_table_ml1m"], "hydra.sweeper.params.alignment", "none,progressive,progressive_lstsq"),
    (["experiment=mra_curve_ml1m"], "hydra.sweeper.params", {"probe.layer": "0,5,10,15,20,25,30",
                                                             "probe.compressor": "linear,pca"}),
    (["compression=odllm", "alignment=progressive", "hparams_search=alignment_optuna"],
     "hydra.sweeper._target_", "hydra_plugins.hydra_optuna_sweeper.optuna_sweeper.OptunaSweeper"),
    (["task=marc", "hparams_search=marc_optuna"], "hydra.sweeper.params", {"marc.beta": "tag(log, interval(1e-5, 1e-1))",
                                                                           "marc.dim": "choice(8, 16, 32, 64)"}),
    (["hydra/launcher=joblib"], "hydra.launcher._target_",
     "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"),
    (["hydra/launcher=submitit_slurm"], "hydra.launcher._target_",
     "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"),
])
def test_sweepers_and_launchers_compose(overrides, key, expected):
    from omegaconf import OmegaConf

    cfg = hydra_config(overrides)
    value = OmegaConf.select(cfg, key)
    assert (OmegaConf.to_container(value) if not isinstance(value, str) else value) == expected


def test_a_multirun_records_a_failing_job_and_completes_the_others(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "ratio=7,0.5", "compression=svd", "model.hidden_size=16",
           "model.intermediate_size=32", "dataset.max_len=20", "compression.calib_batches=2",
           "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "logger=none",
           "evaluation.popularity_baseline=false", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode != 0  # the sweep as a whole reports the failure...
    assert "ratio=7.0 is out of range; allowed: (0, 1]" in (sweep / "0" / "error.txt").read_text()
    assert (sweep / "1" / "metrics.json").is_file()  # ...after the other job ran to the end
    records = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["failed", "completed"]
    assert "ratio=7" in records[0]["overrides"] and records[0]["error"].startswith("ConfigError: ratio=7")
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    assert records[1]["objective"] == metrics["val/ndcg@10"]

    # The report turns the sweep into the retention table, its costs and the failed job.
    from recsys_compress.reporting import report

    assert report.main([str(sweep), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    low, high = metrics["retention/ndcg@10_ci_low"], metrics["retention/ndcg@10_ci_high"]
    assert f"| 0.5 | {metrics['retention/ndcg@10']:.3f} [{low:.3f}, {high:.3f}] |" in text
    assert "base model trained in 1 (" in text and "| svd | none | 0.5 | trained" in text
    assert "| ratio=7 compression=svd" in text and "ConfigError: ratio=7.0 is out of range" in text
    with open(tmp_path / "report" / "retention.csv") as f:  # the plotted points
        drawn = list(csv.reader(f))
    assert drawn == [["setting", "method", "alignment", "ratio", "retention/ndcg@10", "ci_low", "ci_high", "std",
                      "seeds", "runs"],
                     ["ml_latest_small, llama_tiny", "svd", "none", "0.5", repr(metrics["retention/ndcg@10"]),
                      repr(low), repr(high), "0.0", "1", str(sweep / "1")]]
    assert (tmp_path / "report" / "retention.png").stat().st_size > 10_000


def test_the_joblib_launcher_records_a_failing_job_and_completes_the_other(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=joblib", "hydra.launcher.n_jobs=2",
           "ratio=7,0.5", "compression=svd", "model.hidden_size=16", "model.intermediate_size=32",
           "dataset.max_len=20", "compression.calib_batches=2", "trainer.max_epochs=1",
           "+trainer.limit_train_batches=2", "logger=none", "evaluation.popularity_baseline=false",
           f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode != 0
    records = sorted((json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()),
                     key=lambda r: r["job"])
    assert [(r["job"], r["status"]) for r in records] == [(0, "failed"), (1, "completed")]
    assert records[0]["error"].startswith("ConfigError: ratio=7.0 is out of range")
    metrics = json.loads((sweep / "1" / "metrics.json").read_text())
    assert records[1]["objective"] == metrics["val/ndcg@10"] and metrics["compression/ratio"] == 0.5


def test_two_concurrent_jobs_needing_one_base_model_train_it_once(tmp_path):
    import fcntl
    import time

    from recsys_compress.models.base_cache import base_model_key

    overrides = ["compression=svd", "model.hidden_size=16", "model.intermediate_size=32", "dataset.max_len=20",
                 "compression.calib_batches=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=2",
                 "logger=none", "evaluation.popularity_baseline=false", f"paths.cache_dir={tmp_path / 'cache'}"]
    key, _ = base_model_key(compose_config(overrides, tmp_path / "key"))
    lock = tmp_path / "cache" / "locks" / f"base_model-{key}.lock"
    lock.parent.mkdir(parents=True)
    logs = [tmp_path / str(r) / "train.log" for r in (0.3, 0.6)]
    with open(lock, "w") as held:
        # Hold the entry's lock, as a third job training it would: both jobs must wait for it
        # (timing cannot make this pass without the lock: nobody waits then).
        fcntl.flock(held, fcntl.LOCK_EX)
        jobs = [subprocess.Popen([sys.executable, str(REPO / "train.py"), *overrides, f"ratio={r}",
                                  f"hydra.run.dir={tmp_path / str(r)}"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                 env={**os.environ, "WANDB_MODE": "offline"}) for r in (0.3, 0.6)]
        deadline = time.monotonic() + 300
        waiting = lambda log: log.is_file() and "waiting for it" in log.read_text()  # noqa: E731
        while not all(waiting(log) for log in logs) and time.monotonic() < deadline:
            if any(job.poll() is not None for job in jobs):
                break  # a job ended without waiting
            time.sleep(0.5)
        both_waited = all(waiting(log) for log in logs)
    for job in jobs:
        assert job.wait(timeout=600) == 0, job.stderr.read()[-2000:]
    assert both_waited, [log.read_text()[-1000:] for log in logs]
    hits = sorted(json.loads((tmp_path / str(r) / "metrics.json").read_text())["base/cache_hit"] for r in (0.3, 0.6))
    assert hits == [0, 1]  # one trained, the other waited and reused it
    entries = [p for p in (tmp_path / "cache" / "base_models").iterdir() if p.is_dir()]
    assert len(entries) == 1 and not any(".tmp" in p.name for p in entries)


def test_kill_then_resume_gives_the_uninterrupted_result(tmp_path):
    from recsys_compress.tasks.runner import run_task

    overrides = ["model.hidden_size=16", "model.intermediate_size=32", "dataset.max_len=20", "trainer.max_epochs=3",
                 "+trainer.limit_train_batches=3", "logger=none", "evaluation.popularity_baseline=false",
                 "model.optim.warmup_steps=2", "model.optim.scheduler=cosine",  # LR state must be restored too
                 "ckpt_path=null"]  # test the last epoch's weights, which the resumed part produced
    straight = run_task(compose_config(overrides, tmp_path / "straight"))
    with pytest.raises(RuntimeError, match="killed at the start of epoch 2"):
        run_task(compose_config([*overrides, "+callbacks.kill._target_=conftest.KillAfterEpoch",
                                     "+callbacks.kill.epoch=2"], tmp_path / "killed"))
    assert (tmp_path / "killed" / "checkpoints" / "last.ckpt").is_file()
    resumed = run_task(compose_config([*overrides, "resume=auto"], tmp_path / "killed"))
    for key in ("test/ndcg@10", "test/hr@10", "test/mrr", "val/best_ndcg@10"):
        assert resumed[key] == straight[key], key
    assert resumed["train/epochs"] == straight["train/epochs"] == 3
    # It trained from the checkpoint: a retrain from scratch with the same seed gives the same
    # numbers above, but would start at step 0, not after the 2 epochs x 3 batches checkpointed.
    assert (straight["train/start_step"], resumed["train/start_step"]) == (0, 6)


def test_a_missing_launcher_or_sweeper_names_the_package_to_install():
    from recsys_compress.utils.plugins import missing_plugin

    assert missing_plugin(["hydra/launcher=ray"]) == \
        "hydra/launcher=ray needs the hydra/launcher plugin 'ray': pip install hydra-ray-launcher"
    assert "pip install hydra-ax-sweeper" in missing_plugin(["ratio=0.5", "hydra/sweeper=ax"])
    assert missing_plugin(["hydra/launcher=joblib", "hparams_search=alignment_optuna"]) is None  # installed here
    out = subprocess.run([sys.executable, str(REPO / "train.py"), "-m", "hydra/launcher=rq"],
                         capture_output=True, text=True)
    assert out.returncode == 1 and "pip install hydra-rq-launcher" in out.stderr


def test_a_nan_loss_stops_training_with_the_epoch_and_step(tmp_path):
    from recsys_compress.tasks.runner import run_task

    cfg = compose_config(["model.hidden_size=16", "model.intermediate_size=32", "dataset.max_len=20",
                          "trainer.max_epochs=1", "logger=none", "evaluation.popularity_baseline=false",
                          "model.optim.lr=1e30", "trainer.gradient_clip_val=null"], tmp_path)
    with pytest.raises(FloatingPointError, match=r"training loss is nan at epoch 0, step \d+: lower the learning rate"):
        run_task(cfg)


def test_an_optuna_search_runs_its_trials_on_the_validation_objective(tmp_path):
    sweep = tmp_path / "search"
    cmd = [sys.executable, str(REPO / "train.py"), "-m", "compression=odllm", "ratio=0.5", "alignment=progressive",
           "hparams_search=alignment_optuna", "hydra.sweeper.n_trials=2",
           "alignment.steps_per_layer=choice(2,3)",  # the search space, shrunk to tiny steps
           "alignment.batches=2", "model.hidden_size=16", "model.intermediate_size=32", "dataset.max_len=20",
           "compression.calib_batches=2", "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "logger=none",
           "evaluation.popularity_baseline=false", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.sweep.dir={sweep}"]
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"})
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [r["status"] for r in records] == ["completed", "completed"]
    for r in records:  # each trial reports the aligned model's validation NDCG@10, never a test metric
        metrics = json.loads((sweep / str(r["job"]) / "metrics.json").read_text())
        assert r["objective"] == metrics["val/ndcg@10"] != metrics["test/ndcg@10"]
    best = (sweep / "optimization_results.yaml").read_text()
    assert "best_params" in best and "alignment.lr" in best
    assert f"best_value: {max(r['objective'] for r in records)}" in best


def test_script_command_lines_keep_overrides_out_of_list_options():
    import argparse

    from recsys_compress.utils.cli import parse_with_overrides

    parser = argparse.ArgumentParser()
    parser.add_argument("run_dir")
    parser.add_argument("--ratios", nargs="+", type=float)
    parser.add_argument("--out")
    parser.add_argument("--rounds", type=int)
    parser.add_argument("--quick", action="store_true")
    args, overrides = parse_with_overrides(parser, [
        "RUN", "--ratios", "0.3", "0.5", "dataset=ml_100k", "--out=x.json", "+trainer.limit_train_batches=2",
        "--rounds", "2"])
    assert (args.run_dir, args.ratios, args.out, args.rounds) == ("RUN", [0.3, 0.5], "x.json", 2)
    assert overrides == ["dataset=ml_100k", "+trainer.limit_train_batches=2"]
    # An option's own value stays its value even when it holds '=' (a folder named by overrides);
    # a flag takes none, so the override after it stays an override.
    args, overrides = parse_with_overrides(parser, ["RUN", "--out", "runs/ratio=0.5/b.json", "--quick", "seed=3"])
    assert (args.out, args.quick, overrides) == ("runs/ratio=0.5/b.json", True, ["seed=3"])


def test_the_report_lists_a_failed_job_that_recorded_no_error_text(tmp_path):
    # A job killed from outside (OOM, scancel) can leave a summary record with an empty error.
    from recsys_compress.reporting import report

    records = [{"status": "failed", "overrides": ["ratio=0.3"], "error": ""},
               {"status": "failed", "overrides": ["ratio=0.5"]},
               {"status": "completed", "overrides": ["ratio=0.7"], "objective": 0.1}]
    (tmp_path / "summary.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    lines = report.failed_jobs([tmp_path])
    assert "| ratio=0.3 | (no error recorded) |" in lines and "| ratio=0.5 | (no error recorded) |" in lines
    assert not any("ratio=0.7" in line for line in lines)
