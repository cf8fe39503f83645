"""Closed-form progressive alignment: re-fit each low-rank layer's left factor A.

For a low-rank layer y = A (B x) + b of block l, with x_s its input in the student (whose
lower blocks and earlier layers of this block are already re-fitted) and x_t the input of
the same layer in the teacher,

    A* = argmin_A || A B X_s - W X_t ||_F^2 + lambda ||A||_F^2
       = (W X_t)(B X_s)^T  [ (B X_s)(B X_s)^T + lambda I ]^-1,

accumulated over the real tokens of the alignment batches in float64. Layers that read the
same input (q/k/v, gate/up) are re-fitted together; the block is re-run before the next group
so every fit sees the inputs the re-fitted layers before it produce.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import PreTrainedModel

from recsys_compress.alignment.block_cache import AlignmentBatch
from recsys_compress.models.blocks import decoder_blocks, run_block
from recsys_compress.alignment.progressive import check_alignable, low_rank_layers, masked_mse

log = logging.getLogger(__name__)


def refit_left_factor(zz: torch.Tensor, yz: torch.Tensor, ridge: float = 0.0) -> torch.Tensor:
    """Solve ``A (ZZ^T + lambda I) = Y Z^T`` with lambda = ridge * mean(diag(ZZ^T)).

    ``zz`` = Z Z^T (k x k), ``yz`` = Y Z^T (m x k); with ridge 0 this is the least-squares
    solution of ``A Z = Y`` (``torch.linalg.lstsq(Z^T, Y^T).solution.T``).
    """
    k = zz.shape[0]
    lam = ridge * float(torch.diagonal(zz).mean())
    system = zz + lam * torch.eye(k, dtype=zz.dtype, device=zz.device)
    # A S = YZ^T with S symmetric  <=>  S A^T = (YZ^T)^T
    return torch.linalg.solve(system, yz.T).T


def _capture_inputs(block: nn.Module, names: list[str], batches: list[AlignmentBatch],
                    hidden: list[torch.Tensor]) -> list[dict[str, torch.Tensor]]:
    """Inputs (real tokens only) of the named sub-layers of ``block`` on every batch."""
    per_batch: list[dict[str, torch.Tensor]] = []
    current: dict[str, torch.Tensor] = {}
    handles = [block.get_submodule(n).register_forward_pre_hook(
        lambda _m, args, n=n: current.__setitem__(n, args[0])) for n in names]
    try:
        with torch.no_grad():
            for h, b in zip(hidden, batches):
                current.clear()
                run_block(block, h, b.block_kwargs)
                per_batch.append({n: x[b.tokens].double() for n, x in current.items()})
    finally:
        for handle in handles:
            handle.remove()
    return per_batch


@torch.no_grad()
def progressive_lstsq(
    teacher: PreTrainedModel, student: PreTrainedModel, batches: list[AlignmentBatch], ridge: float = 1e-4
) -> list[dict[str, float]]:
    """Re-fit every low-rank layer's ``A`` in place, block by block; returns per-block reports."""
    check_alignable(teacher, student)
    t_blocks, s_blocks = decoder_blocks(teacher), decoder_blocks(student)
    hidden = [student.get_input_embeddings()(b.input_ids) for b in batches]
    reports = []
    for l, (t_block, s_block) in enumerate(tqdm(list(zip(t_blocks, s_blocks)), desc="lstsq alignment")):
        low_rank = low_rank_layers(s_block)
        if low_rank:
            t0 = time.perf_counter()
            before = float(torch.stack([masked_mse(run_block(s_block, h, b.block_kwargs), b.teacher_at(l + 1),
                                                 b.tokens)
                                        for h, b in zip(hidden, batches)]).mean())
            start = {n: m.up.weight.clone() for n, m in low_rank.items()}
            teacher_inputs = _capture_inputs(t_block, list(low_rank), batches, [b.teacher_at(l) for b in batches])
            remaining = list(low_rank)
            while remaining:
                student_inputs = _capture_inputs(s_block, remaining, batches, hidden)
                # Layers fed by the same tensor as the first remaining one form this group.
                first = remaining[0]
                group = [n for n in remaining if all(torch.equal(x[n], x[first]) for x in student_inputs)]
                for name in group:
                    layer = low_rank[name]
                    W = t_block.get_submodule(name).weight.double()
                    B = layer.down.weight.double()
                    zz = torch.zeros(B.shape[0], B.shape[0], dtype=torch.float64, device=B.device)
                    yz = torch.zeros(W.shape[0], B.shape[0], dtype=torch.float64, device=B.device)
                    for xs, xt in zip(student_inputs, teacher_inputs):
                        z = xs[name] @ B.T
                        zz += z.T @ z
                        yz += (xt[name] @ W.T).T @ z
                    layer.up.weight.copy_(refit_left_factor(zz, yz, ridge).to(layer.up.weight.dtype))
                remaining = [n for n in remaining if n not in group]
            after = float(torch.stack([masked_mse(run_block(s_block, h, b.block_kwargs), b.teacher_at(l + 1),
                                                 b.tokens)
                                       for h, b in zip(hidden, batches)]).mean())
            reverted = after >= before
            if reverted:  # per-layer least squares need not lower the block's error: never make it worse
                for n, m in low_rank.items():
                    m.up.weight.copy_(start[n])
                log.warning("block %d: re-fitting raised its mse (%.4g -> %.4g); factors restored", l, before, after)
                after = before
            reports.append({"layer": l, "mse_before": before, "mse_after": after, "reverted": int(reverted),
                            "seconds": time.perf_counter() - t0})
            log.info("block %d re-fitted: mse %.4g -> %.4g", l, before, after)
        hidden = [run_block(s_block, h, b.block_kwargs) for h, b in zip(hidden, batches)]
    return reports
