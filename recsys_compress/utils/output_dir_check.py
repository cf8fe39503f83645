"""A Hydra callback that checks the run (or sweep) folder can be written before Hydra makes it.

Hydra creates the folder before any of our code runs; a path that is a file, or a folder on a
read-only disk, would end in a raw ``FileExistsError`` / ``PermissionError`` traceback with
Hydra's "set HYDRA_FULL_ERROR" hint. This says what is wrong with the folder in one line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig


def check_writable_folder(folder: str | Path, key: str) -> None:
    """Create ``folder`` (and its parents), or exit with status 1 and one line naming ``key``
    (``SystemExit``: Hydra turns a callback's ordinary exception into a warning and goes on)."""
    folder = Path(folder)
    problem = None
    blocking = next((p for p in [folder, *folder.parents] if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        problem = f"{blocking} is a file, not a folder"
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            if not os.access(folder, os.W_OK | os.X_OK):
                problem = "it is not writable"
        except OSError as e:
            problem = f"{e.strerror.lower() if e.strerror else e}" + (f" ({e.filename})" if e.filename else "")
    if problem:
        raise SystemExit(f"error: cannot write the run outputs to {key}={folder}: {problem}; "
                         f"choose another folder with {key}=PATH")


class OutputFolderCheck(Callback):
    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable_folder(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        check_writable_folder(config.hydra.sweep.dir, "hydra.sweep.dir")
