"""The paper pipeline on one CUDA GPU, as one short check that writes one JSON of figures.

Fine-tunes SmolLM2-135M (LoRA, bf16 autocast) on ML-1M, compresses it with odllm at 0.5
(sequential, block by block), aligns it progressively, evaluates both, then runs the on-device
benchmark on the GPU. Sized to finish in under 8 minutes on one H100/H200-class GPU.

    python experiments/gpu_check.py --out gpu_check.json      # needs CUDA; refuses at once without
    python experiments/gpu_check.py --dry-run                 # the same steps, tiny, on the CPU
    make gpu-check

The JSON holds the run's test NDCG@10 before and after compression (with the retention and its
paired interval), the tokens/s of training and of calibration, the seconds of every phase and
the benchmark's rows.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from recsys_compress.utils.overrides import path_override

REPO = Path(__file__).resolve().parents[1]

# The steps both runs take: compress with sequential odllm at 0.5, align, evaluate (train.py overrides).
PIPELINE = [
    "compression=odllm", "ratio=0.5", "compression.sequential=true", "alignment=progressive",
    "base_cache=false", "logger=csv",
]
# What runs on the GPU: the model, data and sizes, then the pipeline.
GPU_RUN = [
    "experiment=ml100k_smollm2_lora", "dataset=ml_1m", "trainer=gpu",
    # one window per user per epoch (6,040 sequences): epochs of seconds, so validation picks the best
    "dataset.train_windows=recent", "dataset.batch_size=64", "dataset.eval_batch_size=256",
    "trainer.max_epochs=20", "trainer.max_time=00:00:04:00",
    *PIPELINE, "compression.calib_batches=16", "compression.heldout_batches=4",
    "alignment.lr=1e-4", "alignment.steps_per_layer=50",
]
GPU_BENCH = ["--device", "cuda", "--model", "smollm2_135m", "--ratios", "0.5", "--rounds", "3", "--reps", "30",
             "--batch", "8", "--calib-batches", "4", "dataset=ml_1m"]
# The same steps at toy size on the CPU: what CI checks.
DRY_RUN = [
    "model=llama_tiny", "dataset=ml_latest_small", "trainer=cpu", "trainer.max_epochs=1",
    *PIPELINE, "compression.calib_batches=2", "compression.heldout_batches=1",
    "alignment.steps_per_layer=2", "alignment.batches=2",
]
DRY_BENCH = ["--device", "cpu", "--model", "llama_tiny", "--ratios", "0.5", "--rounds", "1", "--reps", "3",
             "--batch", "4", "--calib-batches", "1", "dataset=ml_latest_small"]


def check_cuda() -> str:
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU, and torch.cuda.is_available() is False on this machine; "
                         "`python experiments/gpu_check.py --dry-run` runs the same steps on the CPU")
    return torch.cuda.get_device_name(0)


def run(command: list[str], log: Path) -> float:
    t0 = time.perf_counter()
    with log.open("w") as out:
        code = subprocess.run(command, cwd=REPO, stdout=out, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"{' '.join(command)} failed ({code}); its output: {log}\n{log.read_text()[-3000:]}")
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU (CI)")
    parser.add_argument("--out", type=Path, default=Path("gpu_check.json"))
    parser.add_argument("--work", type=Path, default=None, help="folder for the run and logs (default: a temp dir)")
    args = parser.parse_args(argv)
    device = "cpu (dry run)" if args.dry_run else check_cuda()
    t_start = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    run_dir = work / "run"
    overrides = DRY_RUN if args.dry_run else GPU_RUN
    pipeline_s = run([sys.executable, "train.py", *overrides, path_override("hydra.run.dir", run_dir)], work / "train.log")
    metrics = json.loads((run_dir / "metrics.json").read_text())
    bench_json = work / "bench.json"
    bench_s = run([sys.executable, "experiments/bench_ondevice.py", *(DRY_BENCH if args.dry_run else GPU_BENCH),
                   "--out", str(bench_json)], work / "bench.log")
    calib_s = metrics.get("time/calibrate_s", float("nan"))
    figures = {
        "device": device,
        "dry_run": args.dry_run,
        "overrides": overrides,
        "seconds/total": time.perf_counter() - t_start,
        "seconds/pipeline": pipeline_s,
        "seconds/bench": bench_s,
        **{k: metrics[k] for k in sorted(metrics) if k.startswith(("time/", "base/test/ndcg", "test/ndcg",
                                                                   "retention/", "compression/", "align"))},
        "train/tokens_per_s": metrics.get("train/tokens_per_s", metrics.get("base/train/tokens_per_s")),
        "calibration/tokens_per_s": metrics.get("compression/calib_tokens", 0) / calib_s if calib_s else None,
        "bench": json.loads(bench_json.read_text())["rows"],
        "run_dir": str(run_dir),
    }
    args.out.write_text(json.dumps(figures, indent=2, default=float) + "\n")
    print(f"{device}: {figures['seconds/total']:.0f} s; NDCG@10 {metrics.get('base/test/ndcg@10', float('nan')):.4f} "
          f"-> {metrics.get('test/ndcg@10', float('nan')):.4f}; figures in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
