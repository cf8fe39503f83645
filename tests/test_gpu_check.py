"""experiments/gpu_check.py: refuses without CUDA at once; its dry run does every step on the CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_without_cuda_the_gpu_check_refuses_at_once_with_the_reason(tmp_path):
    out = subprocess.run([sys.executable, "experiments/gpu_check.py", "--out", str(tmp_path / "g.json")],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and not (tmp_path / "g.json").exists()
    assert "needs a CUDA GPU, and torch.cuda.is_available() is False" in out.stderr
    assert "--dry-run" in out.stderr


def test_the_dry_run_fine_tunes_compresses_aligns_evaluates_and_benchmarks(tmp_path):
    out = subprocess.run([sys.executable, "experiments/gpu_check.py", "--dry-run", "--out", str(tmp_path / "g.json"),
                          "--work", str(tmp_path / "work=dry")], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    figures = json.loads((tmp_path / "g.json").read_text())
    assert figures["dry_run"] and "compression.sequential=true" in figures["overrides"]
    assert figures["compression/layers"] == 14 and figures["compression/kept_ratio"] <= 0.5
    assert figures["align/layers"] == 2 and figures["time/align_s"] > 0
    assert 0 <= figures["test/ndcg@10"] <= 1 and figures["train/tokens_per_s"] > 0
    assert figures["calibration/tokens_per_s"] > 0
    assert [row["variant"] for row in figures["bench"]] == ["base", "base+int8", "odllm@0.5", "odllm+int8@0.5"]
