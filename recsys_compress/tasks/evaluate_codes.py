"""A fresh CTR model on the item codes a MARC or probe run exported, under any downstream setting.

MARC's reported ``test/auc`` is that of one fresh DCN-V2 trained on its cached codes. This
re-runs that deployment step on a finished run's ``item_codes.safetensors`` with changed
``ctr.*`` settings (learning rate, dropout, width, item-id dropout...), without retraining
MARC, to see how much of a result belongs to the codes and how much to the downstream model.
A single-layer probe run exports its compressed item features the same way (the projection
trained with its CTR model): a fresh model on those is the probe's own deployment, the fair
comparison for MARC's.

    recsys-evaluate-codes outputs/bench/cold_seeds/marc/0 ctr.lr=3e-4 ctr.dropout=0.3
    recsys-evaluate-codes RUN_DIR [KEY=VALUE ...] [--out DIR]
    recsys-evaluate-codes RUN_DIR +trainer.val_check_interval=0.25   # + adds a key

Dataset, split, seed, trainer and the rest come from ``RUN_DIR/.hydra/config.yaml``; the
overrides are validated like a run's config. Writes ``metrics.json`` (``test/auc``,
``test/logloss``, ``val/best_auc``, the overrides) and the settings used
(``.hydra/config.yaml``, as a run keeps them) to ``--out`` (default
``RUN_DIR/evaluate_codes/<overrides>``).
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, OverrideParseException
from omegaconf import DictConfig, OmegaConf
from rich.console import Console
from safetensors.torch import load_file

from recsys_compress.tasks.config import register_schemas, validate_marc, validate_probe
from recsys_compress.ctr.model import RepresentationCompressor
from recsys_compress.marc.bottleneck import deployed_codes
from recsys_compress.representations.proxy import encoder_label
from recsys_compress.tasks.builders import build_ctr_datamodule
from recsys_compress.ctr.fit import ctr_fields, fit_ctr
from recsys_compress.utils.cli import parse_with_overrides
from recsys_compress.tasks.compose import PROJECT_ROOT
from recsys_compress.utils.overrides import path_override
from recsys_compress.utils.instantiators import Trainers
from recsys_compress.utils.run_outputs import finish_run


def run_config(run_dir: Path, overrides: list[str], output_dir: Path) -> DictConfig:
    """The config ``run_dir`` ran with, composed by Hydra from its ``.hydra/config.yaml`` with
    ``overrides`` in Hydra's grammar: a key the run lacks fails (a typo is not ignored), ``+KEY=V``
    adds one, ``~KEY`` deletes one."""
    register_schemas()  # the resolvers the saved config uses
    pinned = [path_override("paths.root_dir", PROJECT_ROOT), path_override("paths.output_dir", output_dir)]
    try:
        with initialize_config_dir(config_dir=str((run_dir / ".hydra").resolve()), version_base="1.3"):
            return compose("config", overrides=[*pinned, *overrides])
    except (ConfigCompositionException, OverrideParseException) as e:
        raise SystemExit(f"{' '.join(overrides)}: {e}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a finished task=marc run, or a single-layer task=mra_probe run")
    parser.add_argument("--out", type=Path, help="where metrics.json goes")
    args, overrides = parse_with_overrides(parser, sys.argv[1:] if argv is None else argv)
    codes_path = args.run_dir / "item_codes.safetensors"
    cfg_path = args.run_dir / ".hydra" / "config.yaml"
    for path in (codes_path, cfg_path):
        if not path.is_file():
            raise SystemExit(f"{path} not found: {args.run_dir} is not a finished task=marc or "
                             "single-layer task=mra_probe run")
    out = args.out or args.run_dir / "evaluate_codes" / ("_".join(overrides) or "as_run")
    cfg = run_config(args.run_dir, overrides, out)
    is_marc = cfg.task.name == "marc"
    run = validate_marc(cfg) if is_marc else validate_probe(cfg)
    d, c = run.dataset, run.ctr
    dm = build_ctr_datamodule(run)
    data = dm.data
    stored = load_file(str(codes_path))
    codes, noise = stored["mu"], None
    if is_marc:
        m = run.marc
        if (m.deploy_noise or m.export_dims is not None) and "logvar" not in stored:
            raise SystemExit(f"marc.deploy_noise and marc.export_dims need the codes' logvar; {codes_path} "
                             "has only mu (an older run)")
        if "logvar" in stored:
            codes, noise, _ = deployed_codes(codes, stored["logvar"], m)
    if codes.shape[0] != len(data.item_ids):
        raise SystemExit(f"{codes_path} holds {codes.shape[0]} items; the run's dataset has {len(data.item_ids)}")
    # the same evaluation run again replaces the last one: its checkpoints would sit beside the new ones
    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    result = fit_ctr(Trainers(cfg), c, run.seed, dm, RepresentationCompressor(codes, "fixed", noise_std=noise),
                     out / "checkpoints")
    source = (f"MARC, beta {run.marc.beta:g}" if is_marc
              else f"{run.probe.compressor} probe of layer {run.probe.layer}")
    if is_marc and codes.shape[1] < stored["mu"].shape[1]:
        source += f", the most informative of {stored['mu'].shape[1]}"
    metrics = {**result, "codes": str(codes_path), "overrides": " ".join(overrides), "seed": run.seed,
               "codes/dim": codes.shape[1], "codes/source": source,
               "repr/encoder": encoder_label(run.representation.model, run.representation.encoder_run),
               "data/name": d.name, **ctr_fields(c)}
    path = finish_run(out, metrics, [])
    (out / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, out / ".hydra" / "config.yaml")  # the exact settings, where a Hydra run keeps them
    Console().print(f"[bold]codes of {args.run_dir} ({' '.join(overrides) or 'as run'}): test auc "
                    f"{metrics['test/auc']:.4f}, val {metrics.get('val/best_auc', float('nan')):.4f} -> {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
