"""OD-LLM step 3: progressive, layer-wise alignment of a compressed LLM to the original.

Decoder blocks are refined bottom-up. While block l is refined only its low-rank factors
(``down``/``up`` weights of its ``LowRankLinear`` layers) have ``requires_grad``; its input is
the hidden state produced by the student's already-refined blocks below it, its target the
teacher's block-l output on the teacher's own hidden states, and the loss

    MSE(student_l(h_student), teacher_l(h_teacher))
      + task_weight * the recommender's own cross-entropy (through the frozen blocks above)
      + distill_weight * T^2 KL(teacher logits / T || student logits / T)

Then block l is frozen and block l+1 starts; a block whose MSE rose (too high a learning rate
for an already good factorisation) gets its starting factors back. Steps are counted globally (block = step //
steps_per_layer), so a Lightning checkpoint (weights, optimiser, step) resumes inside the
right block; the student's hidden states are rebuilt from the restored weights on resume.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from recsys_compress.alignment.block_cache import AlignmentBatch, capture_teacher
from recsys_compress.models.blocks import decoder_blocks, run_block
from recsys_compress.compression.low_rank import LowRankLinear
from recsys_compress.models.interface import RecommenderModel

log = logging.getLogger(__name__)


class AlignmentError(ValueError):
    """Teacher and student cannot be aligned (no low-rank layers, mismatched structure)."""


def low_rank_layers(block: nn.Module) -> dict[str, LowRankLinear]:
    return {n: m for n, m in block.named_modules() if isinstance(m, LowRankLinear)}


def check_alignable(teacher: PreTrainedModel, student: PreTrainedModel) -> None:
    """Fail naming the first structural difference between teacher and student."""
    if not any(isinstance(m, LowRankLinear) for m in student.modules()):
        raise AlignmentError("the student has no low-rank layers: alignment refines low-rank factors, "
                             "so compress it with compression=svd|asvd|odllm first")
    t_blocks, s_blocks = decoder_blocks(teacher), decoder_blocks(student)
    if len(t_blocks) != len(s_blocks):
        raise AlignmentError(f"teacher has {len(t_blocks)} decoder blocks, student {len(s_blocks)}")
    for i, (tb, sb) in enumerate(zip(t_blocks, s_blocks)):
        t_linear = {n: m for n, m in tb.named_modules() if isinstance(m, nn.Linear)}
        s_layers = {n: m for n, m in sb.named_modules()
                    if isinstance(m, (nn.Linear, LowRankLinear)) and not n.endswith((".down", ".up"))}
        for name in sorted(set(t_linear) | set(s_layers)):
            t, s = t_linear.get(name), s_layers.get(name)
            if t is None or s is None:
                side = "teacher" if t is None else "student"
                raise AlignmentError(f"layers.{i}.{name} exists in only one model (missing in the {side})")
            if (t.in_features, t.out_features) != (s.in_features, s.out_features):
                raise AlignmentError(
                    f"layers.{i}.{name}: teacher maps {t.in_features}->{t.out_features}, "
                    f"student {s.in_features}->{s.out_features}")


def masked_mse(output: torch.Tensor, target: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Mean squared error over the real (non-padding) positions."""
    return F.mse_loss(output[tokens].float(), target[tokens].float())


class ProgressiveAlignmentModule(L.LightningModule):
    """Aligns ``recommender.backbone`` (the student, compressed) to ``teacher``, its uncompressed
    twin, on the sequences the recommender's decoder reads for ``batches``."""

    def __init__(
        self,
        recommender: RecommenderModel,
        teacher: PreTrainedModel,
        batches: Iterable[dict[str, torch.Tensor]],
        num_batches: int = 16,
        steps_per_layer: int = 100,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        scheduler: str = "cosine",
        warmup_steps: int = 0,
        task_weight: float = 0.0,
        distill_weight: float = 0.0,
        distill_temperature: float = 1.0,
        offload_states: bool = False,
    ):
        super().__init__()
        student = recommender.backbone
        check_alignable(teacher, student)
        self.save_hyperparameters(ignore=["recommender", "teacher", "batches"])
        self.student = student
        # Not a submodule either: the recommender holds the student, which is registered above.
        self.__dict__["recommender"] = recommender
        # Not a registered submodule: the frozen teacher is rebuilt from the base model, so it
        # stays out of checkpoints and optimisers.
        self.__dict__["teacher"] = teacher.requires_grad_(False).eval()
        self.__dict__["_batches"] = batches
        blocks = decoder_blocks(student)
        self.factors = {
            i: [p for m in low_rank_layers(b).values() for p in (m.down.weight, m.up.weight)]
            for i, b in enumerate(blocks)
        }
        self.schedule = [i for i, ps in self.factors.items() if ps]  # blocks to refine, bottom-up
        self.total_steps = steps_per_layer * len(self.schedule)
        self.cache: list[AlignmentBatch] = []
        self.layer_reports: list[dict[str, float]] = []
        self._layer: int | None = None  # block whose input self._hidden holds
        self._hidden: list[torch.Tensor] = []
        self._started = 0.0

    # ---- data -------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        if not self.cache:
            self.teacher.to(self.device)
            self.cache = capture_teacher(self.teacher, self._batches, self.hparams.num_batches, self.device,
                                         self.recommender.sequence, self.hparams.offload_states)

    def train_dataloader(self):
        # Steps index the cached batches (step % n); the loader only paces Lightning's loop.
        return torch.utils.data.DataLoader(range(self.total_steps), batch_size=None)

    # ---- which block is being refined ---------------------------------------------------
    def layer_at(self, step: int) -> int:
        return self.schedule[min(step // self.hparams.steps_per_layer, len(self.schedule) - 1)]

    @torch.no_grad()
    def _student_inputs(self, layer: int) -> None:
        """Make ``self._hidden`` the student's input to block ``layer`` on every cached batch."""
        blocks = decoder_blocks(self.student)
        if self._layer is None or self._layer > layer:
            embed = self.student.get_input_embeddings()
            self._hidden = [embed(b.input_ids) for b in self.cache]
            self._layer = 0
        for i in range(self._layer, layer):
            self._hidden = [run_block(blocks[i], h, b.block_kwargs) for h, b in zip(self._hidden, self.cache)]
        self._layer = layer

    @torch.no_grad()
    def block_error(self, layer: int) -> float:
        """Mean over cached batches of the block's MSE against the teacher's block output."""
        block = decoder_blocks(self.student)[layer]
        errors = [masked_mse(run_block(block, h, b.block_kwargs), b.teacher_at(layer + 1), b.tokens)
                  for h, b in zip(self._hidden, self.cache)]
        return float(torch.stack(errors).mean())

    def _start_layer(self, layer: int) -> None:
        self._student_inputs(layer)
        for p in self.student.parameters():
            p.requires_grad_(False)
        for p in self.factors[layer]:
            p.requires_grad_(True)
        self._current = {"layer": layer, "mse_before": self.block_error(layer)}
        self._start_weights = [p.detach().clone() for p in self.factors[layer]]
        self._started = time.perf_counter()
        log.info("aligning block %d: mse %.4g", layer, self._current["mse_before"])

    def _finish_layer(self) -> None:
        layer = self._current["layer"]
        after = self.block_error(layer)
        reverted = after >= self._current["mse_before"]
        if reverted:
            # Alignment must never leave a block worse than compression did (too high an lr
            # on an already good factorisation): keep the factors the block started with.
            with torch.no_grad():
                for p, start in zip(self.factors[layer], self._start_weights):
                    p.copy_(start)
            log.warning("block %d: mse rose from %.4g to %.4g; its factors are restored (lower alignment.lr)",
                        layer, self._current["mse_before"], after)
            after = self.block_error(layer)
        report = {**self._current, "mse_after": after, "reverted": int(reverted),
                  "seconds": time.perf_counter() - self._started}
        self.layer_reports.append(report)
        log.info("block %d aligned: mse %.4g -> %.4g", layer, report["mse_before"], report["mse_after"])
        for logger in self.loggers:
            logger.log_metrics({f"align/layer_{layer}/mse_before": report["mse_before"],
                                f"align/layer_{layer}/mse_after": report["mse_after"]}, step=self.global_step)

    # ---- Lightning hooks ------------------------------------------------------------------
    def on_train_start(self) -> None:
        # After a resume the restored step says which block is in progress.
        self.student.eval()  # no dropout: targets are deterministic teacher outputs
        self._layer = None
        self._start_layer(self.layer_at(self.global_step))

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self.student.eval()  # Lightning puts modules in train mode at every epoch start
        layer = self.layer_at(self.global_step)
        if layer != self._current["layer"]:
            self._finish_layer()
            self._start_layer(layer)

    def on_train_end(self) -> None:
        if self.global_step >= self.total_steps:
            self._finish_layer()
        for p in self.student.parameters():
            p.requires_grad_(True)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        hp = self.hparams
        layer = self._current["layer"]
        index = self.global_step % len(self.cache)
        cached = self.cache[index]
        output = run_block(decoder_blocks(self.student)[layer], self._hidden[index], cached.block_kwargs)
        mse = masked_mse(output, cached.teacher_at(layer + 1), cached.tokens)
        loss = mse
        if hp.task_weight > 0 or hp.distill_weight > 0:
            loss = loss + self._task_terms(output, layer, cached)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"alignment loss is {loss.item()} at block {layer}, step "
                f"{self.global_step % hp.steps_per_layer} of {hp.steps_per_layer}: lower alignment.lr")
        self.log_dict({"align/loss": loss, "align/mse": mse, "align/layer": float(layer)}, prog_bar=True)
        return loss

    def _task_terms(self, output: torch.Tensor, layer: int, cached: AlignmentBatch) -> torch.Tensor:
        """The recommender's own cross-entropy and logit distillation through the (frozen) blocks
        above ``layer``."""
        hp = self.hparams
        hidden = output
        for block in decoder_blocks(self.student)[layer + 1:]:
            hidden = run_block(block, hidden, cached.block_kwargs)
        logits, targets = self.recommender.predicted_logits(self.student, hidden, cached.sequence)
        loss = hp.task_weight * F.cross_entropy(logits, targets)
        if hp.distill_weight > 0:
            with torch.no_grad():
                teacher_logits, _ = self.recommender.predicted_logits(self.teacher, cached.teacher_at(-1),
                                                                      cached.sequence)
            t = hp.distill_temperature
            kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher_logits / t, -1),
                          log_target=True, reduction="batchmean")
            loss = loss + hp.distill_weight * t * t * kl
        return loss

    def configure_optimizers(self):
        hp = self.hparams
        params = [p for layer in self.schedule for p in self.factors[layer]]
        # AdamW skips parameters without gradients, so frozen blocks keep their weights and state.
        optimizer = torch.optim.AdamW(params, lr=hp.lr, weight_decay=hp.weight_decay)

        def factor(step: int) -> float:  # the schedule restarts with every block
            s = step % hp.steps_per_layer
            if s < hp.warmup_steps:
                return (s + 1) / hp.warmup_steps
            if hp.scheduler == "cosine":
                progress = (s - hp.warmup_steps) / max(1, hp.steps_per_layer - hp.warmup_steps)
                return 0.5 * (1 + math.cos(math.pi * progress))
            return 1.0

        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    def summary(self) -> dict[str, float]:
        if not self.layer_reports:
            return {}
        before = [r["mse_before"] for r in self.layer_reports]
        after = [r["mse_after"] for r in self.layer_reports]
        return {"align/layers": len(self.layer_reports),
                "align/mean_mse_before": sum(before) / len(before),
                "align/mean_mse_after": sum(after) / len(after)}
