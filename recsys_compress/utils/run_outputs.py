"""Run outputs that reports and dashboards are built from."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any


def to_number(value: Any) -> Any:
    """Plain Python scalars for JSON (tensors, numpy scalars); non-finite floats become None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def global_rank() -> int:
    """This process's rank under DDP (0 without it; rank 0 alone writes run outputs)."""
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def write_metrics_json(output_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json``: one flat object, keys sorted, numbers (and a few id strings).

    Under DDP only global rank 0 writes (every rank holds the same, reduced metrics).
    """
    path = Path(output_dir) / "metrics.json"
    if global_rank() != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: to_number(v) for k, v in sorted(metrics.items())}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(flat, indent=2) + "\n")
    tmp.replace(path)
    return path


def finish_run(output_dir: str | Path, metrics: dict[str, Any], loggers: list) -> Path:
    """Write ``metrics.json``, send the numeric metrics to every logger and close them."""
    path = write_metrics_json(output_dir, metrics)
    for logger in loggers:
        logger.log_metrics({k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))})
        logger.finalize("success")
    return path
