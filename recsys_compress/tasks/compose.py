"""Compose the project's Hydra config outside `train.py` (benchmark scripts, tests, notebooks), with
every group's schema defaults registered first."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from recsys_compress.tasks.config import register_schemas
from recsys_compress.utils.overrides import path_override

PROJECT_ROOT = Path(__file__).resolve().parents[2]


def compose_config(
    overrides: Sequence[str] = (), output_dir: str | Path | None = None, config_name: str = "train"
) -> DictConfig:
    """The config `python train.py OVERRIDES` would run with (Hydra's own paths pinned)."""
    register_schemas()  # the groups' ``base`` options
    output_dir = output_dir or PROJECT_ROOT / "outputs" / "adhoc"
    with initialize_config_dir(config_dir=str(PROJECT_ROOT / "conf"), version_base="1.3"):
        return compose(
            config_name,
            overrides=[path_override("paths.root_dir", PROJECT_ROOT), path_override("paths.output_dir", output_dir),
                       *overrides],
        )
