"""Lightning's overhead: time per training epoch, Trainer vs a plain PyTorch loop.

Both sides train the same architecture on the same batches (same DataModule, same seed,
same loss code: ``SeqRecLitModule.training_step``), with AdamW, gradient clipping at 1.0
and deterministic algorithms, as the real runs do. Blocks of epochs alternate between the
two so that machine noise hits both alike; we report the median epoch time of each and
their ratio.

    python experiments/bench_lightning_overhead.py --blocks 4 --epochs-per-block 2 dataset=ml_100k

Trailing arguments are Hydra overrides of the training config (dataset, model sizes).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import lightning as L
import torch

from recsys_compress.tasks.config import RunConfig, validate
from recsys_compress.data.datamodule import NextItemDataModule
from recsys_compress.models.lit_seqrec import SeqRecLitModule
from recsys_compress.tasks.builders import build_datamodule, build_lit_module, build_model
from recsys_compress.tasks.compose import compose_config


class EpochTimer(L.Callback):
    def __init__(self) -> None:
        self.times: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._t0 = time.perf_counter()

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.times.append(time.perf_counter() - self._t0)


def make_module(run: RunConfig, dm: NextItemDataModule, cache_dir: str) -> SeqRecLitModule:
    torch.manual_seed(run.seed)
    return build_lit_module(run, build_model(run.model, dm, cache_dir))


def plain_epochs(dm: NextItemDataModule, lit: SeqRecLitModule, optimizer, epochs: int) -> list[float]:
    lit.train()
    lit.log = lambda *a, **k: None  # type: ignore[method-assign]  # no trainer attached
    times = []
    for _ in range(epochs):
        t0 = time.perf_counter()
        for step, batch in enumerate(dm.train_dataloader()):
            loss = lit.training_step(batch, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(lit.parameters(), 1.0)
            optimizer.step()
        times.append(time.perf_counter() - t0)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=4)
    parser.add_argument("--epochs-per-block", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. dataset=ml_100k")
    args = parser.parse_args()

    cfg = compose_config(args.overrides or ["dataset=ml_100k"])
    run = validate(cfg)
    dm = build_datamodule(run.dataset, run.seed)
    torch.use_deterministic_algorithms(True)

    plain_lit = make_module(run, dm, cfg.paths.cache_dir)
    plain_opt = plain_lit.configure_optimizers()
    lightning_lit = make_module(run, dm, cfg.paths.cache_dir)

    plain, light = [], []
    plain_epochs(dm, plain_lit, plain_opt, 1)  # warm-up (allocator, thread pools)
    for block in range(args.blocks):
        timer = EpochTimer()
        trainer = L.Trainer(
            max_epochs=args.epochs_per_block, accelerator="cpu", devices=1, logger=False,
            enable_checkpointing=False, limit_val_batches=0, num_sanity_val_steps=0,
            gradient_clip_val=1.0, deterministic=True, callbacks=[timer],
            enable_model_summary=False,
        )
        trainer.fit(lightning_lit, train_dataloaders=dm.train_dataloader())
        light += timer.times[1:] if block == 0 else timer.times  # first epoch warms up
        plain += plain_epochs(dm, plain_lit, plain_opt, args.epochs_per_block)

    result = {
        "dataset": run.dataset.name,
        "model": run.model.name,
        "batches_per_epoch": len(dm.train_dataloader()),
        "plain_epoch_s_median": statistics.median(plain),
        "lightning_epoch_s_median": statistics.median(light),
        "ratio_lightning_over_plain": statistics.median(light) / statistics.median(plain),
        "plain_epochs": len(plain),
        "lightning_epochs": len(light),
        "torch_threads": torch.get_num_threads(),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
