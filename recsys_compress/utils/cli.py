"""Command-line helpers for the scripts under experiments/ (no heavy imports: the ONNX
benchmark's worker processes use them and must stay free of torch and Hydra)."""

from __future__ import annotations

from collections.abc import Sequence


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[str]]:
    """(options, Hydra overrides) of a script's command line: KEY=VALUE words, wherever they
    stand, are overrides; argparse alone would let an ``nargs="+"`` option swallow them."""
    overrides = [a for a in argv if "=" in a and not a.startswith("-")]
    return [a for a in argv if a not in overrides], overrides
