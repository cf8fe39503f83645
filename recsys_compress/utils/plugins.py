"""Name the package to install when a command line asks for a Hydra plugin that is missing.

Hydra itself only says that ``hydra/launcher=ray`` is not among the installed options; this
check runs before Hydra and says which pip package provides it.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

# option -> (module that provides it, pip package)
PLUGINS = {
    ("hydra/launcher", "joblib"): ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    ("hydra/launcher", "submitit_local"): ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("hydra/launcher", "submitit_slurm"): ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("hydra/launcher", "ray"): ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
    ("hydra/launcher", "ray_aws"): ("hydra_plugins.hydra_ray_launcher", "hydra-ray-launcher"),
    ("hydra/launcher", "rq"): ("hydra_plugins.hydra_rq_launcher", "hydra-rq-launcher"),
    ("hydra/sweeper", "optuna"): ("hydra_plugins.hydra_optuna_sweeper", "hydra-optuna-sweeper"),
    ("hydra/sweeper", "ax"): ("hydra_plugins.hydra_ax_sweeper", "hydra-ax-sweeper"),
    ("hydra/sweeper", "nevergrad"): ("hydra_plugins.hydra_nevergrad_sweeper", "hydra-nevergrad-sweeper"),
}
# Our own configs that select a plugin.
CONFIG_PLUGINS = {("hparams_search", name): ("hydra/sweeper", "optuna")
                  for name in ("alignment_optuna", "marc_optuna")}


def missing_plugin(argv: Sequence[str]) -> str | None:
    """A message naming the pip package for the first plugin ``argv`` needs but lacks, or None."""
    for arg in argv:
        group, _, option = arg.lstrip("+~").partition("=")
        key = CONFIG_PLUGINS.get((group, option), (group, option))
        if key not in PLUGINS:
            continue
        module, package = PLUGINS[key]
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            return f"{arg} needs the {key[0]} plugin '{key[1]}': pip install {package}"
    return None
