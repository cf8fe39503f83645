"""DDP on CPU (gloo): calibration statistics are reduced across processes, a 2-process run
evaluates and compresses exactly like a single process, each process trains on its share of the
epoch, and a multirun of DDP jobs runs each job once with its ranks joined."""

import json
import os
import subprocess
import sys

import torch
import torch.multiprocessing as mp

from recsys_compress.compression.calibration import collect_input_stats, select_linear_layers
from recsys_compress.models.item_llm import build_llama

from conftest import REPO, run_train


def model_and_batches():
    torch.manual_seed(0)
    model = build_llama(50, hidden_size=16, num_layers=2, num_heads=2, intermediate_size=32, max_len=12).eval()
    batches = []
    for _ in range(5):
        ids = torch.randint(1, 51, (4, 12))
        mask = torch.ones_like(ids)
        mask[0, :5] = 0
        batches.append({"input_ids": ids * mask, "attention_mask": mask})
    return model, batches


def statistics(model, batches):
    names = select_linear_layers(model)
    return names, collect_input_stats(model, names, batches, lambda b: model(**b), max_batches=5)


def _worker(rank, world, init_file, out):
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model, batches = model_and_batches()
        names, stats = statistics(model, batches)
        if rank == 0:
            torch.save({n: (s.gram, s.abs_sum, s.tokens, s.abs_max) for n, s in stats.items()}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_calibration_statistics_are_reduced_across_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "stats.pt")), nprocs=2, join=True)
    reduced = torch.load(tmp_path / "stats.pt")
    model, batches = model_and_batches()
    names, single = statistics(model, batches)
    for n in names:
        gram, abs_sum, tokens, abs_max = reduced[n]
        assert tokens == single[n].tokens
        torch.testing.assert_close(abs_max, single[n].abs_max, rtol=0, atol=0)  # a maximum, not a sum
        torch.testing.assert_close(gram, single[n].gram, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(abs_sum, single[n].abs_sum, rtol=1e-12, atol=1e-12)


def test_a_two_process_ddp_run_evaluates_and_compresses_like_one_process(tmp_path):
    # No training here (limit_train_batches=0): the base models are the same initialisation, so
    # evaluation, calibration and factorisation must agree; DDP training is tested below.
    common = [sys.executable, str(REPO / "train.py"), "compression=odllm", "ratio=0.5", "model.hidden_size=16",
              "model.intermediate_size=32", "dataset.max_len=20", "compression.calib_batches=4",
              "+trainer.limit_train_batches=0", "logger=none", "evaluation.popularity_baseline=false",
              "export.save=false"]
    results = {}
    for trainer in ("cpu", "ddp"):
        out = subprocess.run([*common, f"trainer={trainer}", f"hydra.run.dir={tmp_path / trainer}",
                              f"paths.cache_dir={tmp_path / trainer / 'cache'}"],
                             capture_output=True, text=True, env={**os.environ, "WANDB_MODE": "offline"}, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        if trainer == "ddp":  # really two processes
            log = out.stdout + out.stderr + (tmp_path / trainer / "train.log").read_text()
            assert "MEMBER: 2/2" in log, log[-2000:]
        results[trainer] = json.loads((tmp_path / trainer / "metrics.json").read_text())
    single, ddp = results["cpu"], results["ddp"]
    for key in ("data/n_users", "data/n_items", "data/n_interactions", "params/total", "compression/kept_ratio"):
        assert ddp[key] == single[key], key  # same split, same compressed structure
    for key in ("base/test/ndcg@10", "base/test/hr@10", "test/ndcg@10", "test/hr@10", "test/mrr",
                "compression/mean_rel_output_error"):
        assert abs(ddp[key] - single[key]) < 1e-4, (key, ddp[key], single[key])


def test_a_ddp_multirun_runs_each_job_once_with_its_ranks_even_after_a_failed_job(tmp_path):
    # Lightning starts rank 1 by re-running the command line; with -m in it, rank 1 used to run
    # the whole sweep again (every job twice, four summary records for two jobs).
    common = ["trainer=ddp", "compression=svd", "model.hidden_size=16", "model.intermediate_size=32",
              "dataset.max_len=20", "compression.calib_batches=2", "trainer.max_epochs=1", "logger=none",
              "evaluation.popularity_baseline=false", "export.save=false", "seed=11"]
    sweep = tmp_path / "sweep"
    out = run_train(["-m", *[c for c in common if c != "logger=none"], "logger=csv", "ratio=0.5,7,0.7", f"paths.cache_dir={tmp_path / 'cache'}",
                     f"hydra.sweep.dir={sweep}"])
    log = out.stdout + out.stderr
    assert out.returncode != 0  # job 1 failed, and the sweep says so
    assert log.count("Launching 3 jobs locally") == 1 and log.count("sweep finished:") == 1
    records = [json.loads(line) for line in (sweep / "summary.jsonl").read_text().splitlines()]
    assert [(r["job"], r["status"]) for r in records] == [(0, "completed"), (1, "failed"), (2, "completed")]
    assert records[1]["error"].startswith("ConfigError: ratio=7.0 is out of range")
    assert sorted(p.parent.name for p in sweep.glob("*/metrics.json")) == ["0", "2"]
    for job in ("0", "2"):  # both ranks ran the job, the second one after the failure too
        assert "GLOBAL_RANK: 1, MEMBER: 2/2" in (sweep / job / "train_ddp_process_1.log").read_text()
        assert len(list((sweep / job / "csv").glob("version_*"))) == 1  # rank 0 alone logs
    swept = json.loads((sweep / "2" / "metrics.json").read_text())

    alone = run_train([*common, "ratio=0.7", f"paths.cache_dir={tmp_path / 'cache_alone'}",
                       f"hydra.run.dir={tmp_path / 'alone'}"])
    assert alone.returncode == 0, alone.stderr[-3000:]
    single = json.loads((tmp_path / "alone" / "metrics.json").read_text())
    for key in ("base/test/ndcg@10", "base/test/hr@10", "test/ndcg@10", "test/hr@10", "test/mrr",
                "compression/mean_rel_output_error", "val/ndcg@10"):
        assert swept[key] == single[key], key

    # Each process trained on its half of the epoch (Lightning's distributed sampler over ours).
    one = run_train([*[c for c in common if c.split("=")[0] not in ("trainer", "compression", "compression.calib_batches")], "trainer=cpu",
                     f"hydra.run.dir={tmp_path / 'one'}"])
    assert one.returncode == 0, one.stderr[-3000:]
    tokens_one = json.loads((tmp_path / "one" / "metrics.json").read_text())["train/tokens"]
    base_ddp = json.loads(next((tmp_path / "cache_alone" / "base_models").glob("*/metrics.json")).read_text())
    assert 0.4 < base_ddp["train/tokens"] / tokens_one < 0.6
