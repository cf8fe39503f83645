"""DDP on CPU (gloo): calibration statistics are reduced across processes, and a 2-process run
evaluates and compresses exactly like a single process."""

import json
import os
import subprocess
import sys

import torch
import torch.multiprocessing as mp

from recsys_compress.compression.calibration import collect_input_stats, select_linear_layers
from recsys_compress.models.item_llm import build_llama

from conftest import REPO


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
            torch.save({n: (s.gram, s.abs_sum, s.tokens) for n, s in stats.items()}, out)
    finally:
        torch.distributed.destroy_process_group()


def test_calibration_statistics_are_reduced_across_processes(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(tmp_path / "stats.pt")), nprocs=2, join=True)
    reduced = torch.load(tmp_path / "stats.pt")
    model, batches = model_and_batches()
    names, single = statistics(model, batches)
    for n in names:
        gram, abs_sum, tokens = reduced[n]
        assert tokens == single[n].tokens
        torch.testing.assert_close(gram, single[n].gram, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(abs_sum, single[n].abs_sum, rtol=1e-12, atol=1e-12)


def test_a_two_process_ddp_run_matches_one_process(tmp_path):
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
