"""Which linear layers to compress, and the input statistics of each on calibration data.

Calibration runs the model over training sequences of the recommendation data itself
(OD-LLM's "task-adaptive" part) with forward hooks that accumulate, per targeted layer,
the Gram matrix sum_t x_t x_t^T (uncentred), sum_t |x_t| and max_t |x_t|, over real (non-padding)
tokens only. The sums over batches are float64; each batch's product x^T x is computed in
``gram_dtype``: float64 (the default) is exact to the last bit of the activations; float32
is faster, but on real LLM activations (a few channels hundreds of times larger than the
rest) its rounding can leave the Gram matrix not positive definite: on SmolLM2-135M 53-76
of 210 layers then needed the jitter fallback (BENCHMARKS.md).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from recsys_compress.compression.names import DEFAULT_TARGETS


def select_linear_layers(
    model: nn.Module, include: Sequence[str] = DEFAULT_TARGETS, exclude: Sequence[str] = ()
) -> list[str]:
    """Names of ``nn.Linear`` modules matching any ``include`` glob and no ``exclude`` glob.

    A pattern that matches nothing is an error listing the candidate names: a typo must not
    silently compress nothing.
    """
    candidates = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    for pattern in list(include) + list(exclude):
        if not fnmatch.filter(candidates, pattern):
            shown = ", ".join(candidates[:12]) + (" ..." if len(candidates) > 12 else "")
            raise ValueError(f"compression pattern {pattern!r} matches no linear layer; candidates: {shown}")
    return [
        n for n in candidates
        if any(fnmatch.fnmatch(n, p) for p in include) and not any(fnmatch.fnmatch(n, p) for p in exclude)
    ]


@dataclass
class InputStats:
    gram: torch.Tensor | None  # n x n float64, sum_t x_t x_t^T
    abs_sum: torch.Tensor  # n float64, sum_t |x_t|
    tokens: int
    abs_max: torch.Tensor | None = None  # n float64, max_t |x_t| (the range int8 must cover)

    def to(self, device: torch.device | str) -> InputStats:
        """The statistics on ``device`` (they are summed on the CPU; factorisation runs by the weight)."""
        return InputStats(None if self.gram is None else self.gram.to(device), self.abs_sum.to(device), self.tokens,
                          None if self.abs_max is None else self.abs_max.to(device))

    @property
    def rank_deficient(self) -> bool:
        """Fewer tokens than input features: the Gram matrix is singular."""
        return self.tokens < self.abs_sum.numel()

    @property
    def abs_mean(self) -> torch.Tensor:
        return self.abs_sum / max(self.tokens, 1)


@torch.no_grad()
def collect_input_stats(
    model: nn.Module,
    layer_names: Sequence[str],
    batches: Iterable[dict[str, torch.Tensor]],
    forward,
    max_batches: int,
    gram: bool = True,
    gram_dtype: torch.dtype = torch.float64,
) -> dict[str, InputStats]:
    """Run ``forward(batch)`` over up to ``max_batches`` batches and return per-layer stats.

    Only positions where ``batch['attention_mask']`` is 1 count, so padding never enters
    the statistics. NaN or Inf in an activation fails naming the layer.
    """
    modules = dict(model.named_modules())
    stats = {
        name: InputStats(
            torch.zeros(modules[name].in_features, modules[name].in_features, dtype=torch.float64) if gram else None,
            torch.zeros(modules[name].in_features, dtype=torch.float64),
            0,
            torch.zeros(modules[name].in_features, dtype=torch.float64),
        )
        for name in layer_names
    }
    mask_holder: dict[str, torch.Tensor] = {}
    # q/k/v (and gate/up) are called one after another on the same input tensor: compute its
    # contribution once and add it to each of them. Holding only the latest input keeps
    # memory flat, and the identity check cannot confuse two different tensors.
    last: dict[str, object] = {"input": None, "contribution": None}

    def contribution(x: torch.Tensor, name: str) -> tuple[torch.Tensor | None, torch.Tensor, int, torch.Tensor]:
        x = x[mask_holder["mask"].to(x.device).bool()] if x.dim() == 3 else x.reshape(-1, x.shape[-1])
        if not torch.isfinite(x).all():
            raise FloatingPointError(f"non-finite input activation in layer {name}")
        x = x.to(gram_dtype)
        x_gram = (x.T @ x).double().cpu() if gram else None
        magnitude = x.abs()
        x_max = magnitude.amax(0).double().cpu() if x.shape[0] else torch.zeros(x.shape[1], dtype=torch.float64)
        return x_gram, magnitude.sum(0, dtype=torch.float64).cpu(), x.shape[0], x_max

    def hook(name: str):
        def fn(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if inputs[0] is not last["input"]:
                last["input"], last["contribution"] = inputs[0], contribution(inputs[0], name)
            x_gram, x_abs, tokens, x_max = last["contribution"]
            s = stats[name]
            if s.gram is not None:
                s.gram += x_gram
            s.abs_sum += x_abs
            s.tokens += tokens
            torch.maximum(s.abs_max, x_max, out=s.abs_max)
        return fn

    # Under DDP every process reads the same batches; each takes every world-th one and the
    # sums are all-reduced, so the statistics (and the factors) equal a single process's.
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in layer_names]
    try:
        for i, batch in enumerate(batches):
            if i >= max_batches:
                break
            if i % world != rank:
                continue
            mask_holder["mask"] = batch["attention_mask"]
            forward(batch)
    finally:
        for h in handles:
            h.remove()
        last["input"] = last["contribution"] = None
    if distributed:
        # NCCL reduces GPU tensors only; the statistics live on the CPU.
        device = (torch.device("cuda", torch.cuda.current_device())
                  if torch.distributed.get_backend() == "nccl" else torch.device("cpu"))
        for s in stats.values():
            tokens = torch.tensor([float(s.tokens)], dtype=torch.float64)
            for name, tensor in (("gram", s.gram), ("abs_sum", s.abs_sum), ("tokens", tokens), ("abs_max", s.abs_max)):
                if tensor is None:
                    continue
                reduced = tensor.to(device)
                op = torch.distributed.ReduceOp.MAX if name == "abs_max" else torch.distributed.ReduceOp.SUM
                torch.distributed.all_reduce(reduced, op=op)
                if name == "tokens":
                    s.tokens = int(reduced.item())
                else:
                    tensor.copy_(reduced.cpu())
    return stats


def batch_budget(n_batches: int | None, calib_batches: int, heldout_batches: int) -> tuple[int, int]:
    """How many (calibration, held-out) batches to take from a split of ``n_batches`` (None:
    unknown, take what was asked). A split too small for both keeps their proportion, with at
    least one calibration batch: a small dataset (ml-latest-small's 5 training batches against the
    default 16 + 4) still reports its held-out error, instead of calibrating on every batch."""
    if n_batches is None or heldout_batches == 0 or n_batches >= calib_batches + heldout_batches:
        return calib_batches, heldout_batches
    calibration = max(1, n_batches * calib_batches // (calib_batches + heldout_batches))
    return calibration, n_batches - calibration


def split_calibration(
    batches: Iterable[dict[str, torch.Tensor]], calib_batches: int, heldout_batches: int = 0
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """The first ``calib_batches`` batches, and the next ``heldout_batches`` with every row of a
    calibration user removed, so held-out figures are measured on users the statistics never saw.

    Rows are matched by ``batch["user"]``; a batch left with no row is skipped (not counted).
    Batches without a ``user`` field give no held-out batches (disjointness could not be told).
    """
    calibration: list[dict[str, torch.Tensor]] = []
    heldout: list[dict[str, torch.Tensor]] = []
    seen_users: set[int] = set()
    for batch in batches:
        if len(calibration) < calib_batches:
            calibration.append(batch)
            seen_users.update(int(u) for u in batch.get("user", ()))
            continue
        if len(heldout) >= heldout_batches or "user" not in batch:
            break
        keep = torch.tensor([int(u) not in seen_users for u in batch["user"]], dtype=torch.bool)
        if keep.any():
            rows = len(keep)
            heldout.append({k: v[keep] if isinstance(v, torch.Tensor) and v.shape[:1] == (rows,) else v
                            for k, v in batch.items()})
    return calibration, heldout


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now (``MemAvailable``; None where unknown)."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def statistics_bytes(in_features: Sequence[Sequence[int]], hidden_size: int, padded_tokens: int,
                     heldout: bool, sequential: bool, gradient_weights: int = 0) -> int:
    """Host memory the calibration statistics need: one float64 Gram matrix and |x| sum per layer
    (twice with held-out statistics). ``in_features``: the targeted layers' input widths, grouped
    by decoder block. The sequential path holds one block's statistics plus the cached float32
    hidden states of every calibration and held-out position (``padded_tokens``).
    ``gradient_weights``: the targeted weights' element count when a loss-driven allocation keeps
    their float64 loss gradients through the whole compression (both paths)."""
    copies = 2 if heldout else 1
    per_block = [copies * sum(8 * (n * n + n) for n in block) for block in in_features]
    gradients = 8 * gradient_weights
    if sequential:
        return max(per_block, default=0) + 4 * hidden_size * padded_tokens + gradients
    return sum(per_block) + gradients
