"""Small Lightning callbacks the pipelines share."""

from __future__ import annotations

import time

import lightning as L


class TrainingThroughput(L.Callback):
    """Times training steps only (no validation, no data loading) and counts target tokens.

    ``tokens_per_s`` is the number of next-item targets trained on per second of
    forward + backward + optimiser time, the figure BENCHMARKS.md reports. After every
    validation it logs ``time/elapsed_s``, the wall time since this process started fitting,
    so validation curves can be drawn against time (a resumed run counts from its restart).
    """

    def __init__(self) -> None:
        self.step_s = 0.0
        self.tokens = 0
        self._t0 = 0.0
        self._fit_t0 = 0.0
        self.start_step: int | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        self._fit_t0 = time.perf_counter()

    def on_validation_epoch_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking and trainer.state.fn == "fit":
            pl_module.log("time/elapsed_s", time.perf_counter() - self._fit_t0)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # The optimiser step this process starts training at: 0 for a fresh run, the restored
        # checkpoint's step after a resume.
        if self.start_step is None:
            self.start_step = trainer.global_step
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.step_s += time.perf_counter() - self._t0
        # Left-padded windows: every real position except the last has a target.
        self.tokens += int(batch["attention_mask"][:, :-1].sum())

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.step_s if self.step_s else 0.0
