"""Command-line helpers for the scripts under experiments/ (no heavy imports: the ONNX
benchmark's worker processes use them and must stay free of torch and Hydra)."""

from __future__ import annotations

import argparse
from collections.abc import Sequence


def split_overrides(argv: Sequence[str], parser: argparse.ArgumentParser) -> tuple[list[str], list[str]]:
    """(options, Hydra overrides) of a script's command line: KEY=VALUE words, wherever they
    stand, are overrides (argparse alone would let an ``nargs="+"`` option swallow them), except
    the words an option of ``parser`` takes as its fixed number of values, so that
    ``--out runs/ratio=0.5/b.json`` stays a path."""
    arity = {}  # argparse has no public view of how many values each option takes
    for action in parser._actions:
        for flag in action.option_strings:
            arity[flag] = 1 if action.nargs is None else action.nargs
    options, overrides, owed = [], [], 0
    for word in argv:
        if owed:
            options.append(word)
            owed -= 1
        elif word.startswith("-"):
            options.append(word)
            nargs = arity.get(word) if "=" not in word else 0
            owed = nargs if isinstance(nargs, int) else 0  # "+", "*", "?": values end at an override
        else:
            (overrides if "=" in word else options).append(word)
    return options, overrides


def parse_with_overrides(
    parser: argparse.ArgumentParser, argv: Sequence[str]
) -> tuple[argparse.Namespace, list[str]]:
    """``parser``'s arguments and the Hydra overrides of a script's command line."""
    options, overrides = split_overrides(argv, parser)
    return parser.parse_args(options), overrides
