"""Per-layer (per-block) result tables: one CSV in the run folder and one W&B table."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def write_table(rows: Sequence[dict[str, Any]], csv_path: str | Path | None, loggers: list, key: str,
                columns: Sequence[str] | None = None) -> list[str]:
    """Write ``rows`` (``columns`` of them, default: the first row's keys) to ``csv_path`` (when
    given) and as the W&B table ``key`` to every logger that logs tables; returns the columns."""
    if not rows:
        return list(columns or [])
    columns = list(columns or rows[0])
    if csv_path is not None:
        Path(csv_path).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    data = [[r[c] for c in columns] for r in rows]
    for logger in loggers:
        if hasattr(logger, "log_table"):  # W&B
            logger.log_table(key, columns=columns, data=data)
    return columns
