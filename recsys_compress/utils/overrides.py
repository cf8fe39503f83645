"""Hydra command-line overrides built from values."""

from __future__ import annotations

from pathlib import Path


def path_override(key: str, path: str | Path) -> str:
    """``key='path'``: quoted, so a folder whose name holds Hydra's grammar (``=``, ``,``, spaces,
    brackets, as evaluate_codes' default output folder named by its overrides does) stays one value."""
    quoted = str(path).replace("'", "\\'")
    return f"{key}='{quoted}'"
