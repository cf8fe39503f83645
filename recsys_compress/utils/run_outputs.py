"""Run outputs that reports and dashboards are built from."""

from __future__ import annotations

import json
import os
import math
from pathlib import Path
from typing import Any


def to_number(value: Any) -> Any:
    """Plain Python scalars for JSON (tensors, numpy scalars); non-finite floats become None."""
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_metrics_json(output_dir: str | Path, metrics: dict[str, Any]) -> Path:
    """Write ``metrics.json``: one flat object, keys sorted, numbers (and a few id strings).

    Under DDP only global rank 0 writes (every rank holds the same, reduced metrics).
    """
    path = Path(output_dir) / "metrics.json"
    if int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0))) != 0:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = {k: to_number(v) for k, v in sorted(metrics.items())}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(flat, indent=2) + "\n")
    tmp.replace(path)
    return path
