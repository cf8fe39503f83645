"""How many singular directions each targeted matrix keeps: one ratio for all, or one budget.

``uniform``: every m x n matrix keeps rank floor(m n rho / (m + n)), a ``rho`` of its
parameters (OD-LLM, SVD-LLM).

``global``: the same total budget, the sum of the uniform ranks' costs, filled greedily with
the singular directions of *all* matrices in order of the error each removes per parameter
it costs. For whitened SVD the output error a direction removes is its squared singular
value of W S, exactly, on the calibration activations; a direction costs m + n parameters.
The gains of one matrix fall with their index, so taking the best ratio first fills every
matrix with a prefix of its spectrum, and the greedy choice is optimal up to the last
direction that did not fit (the fractional knapsack bound). This is the allocation of
Zero-Sum SVD and of SVD-LLM V2's loss-driven ratios, in their simplest exact form.

``global_relative``: the same greedy rule on each matrix's spectrum normalised by its total
energy (sum sigma^2 = ||W S||_F^2), so it minimises the sum of per-matrix *relative* errors:
every matrix counts equally, whatever the scale of its activations. Absolute errors favour
layers with large activations (in LLaMA the late MLPs); this normalisation is the per-matrix
truncation-loss view that SVD-LLM V2 (Wang et al., NAACL 2025) allocates by.

``zero_sum``: Zero-Sum SVD (ZS-SVD; Abbasi et al., "Zero Sum SVD: Balancing Loss Sensitivity
for Low Rank LLM Compression", ICML 2026, arXiv 2602.02848), which ranks directions by the
*recommendation loss* instead of the output error. With A = W S = U Sigma V^T (S the method's
input transform) and G the gradient of the calibration loss with respect to W, removing
direction i changes the loss by dL_i ~ -sigma_i u_i^T (G S^-T) v_i to first order (signed:
some removals lower the loss). Every matrix starts whole and gives up its directions from the
smallest singular value upwards; of the matrices' next candidates, the one with the smallest
|dL| is removed, taken among those with dL >= 0 while the running sum of removed dL is <= 0 and
among those with dL < 0 otherwise (either sign when the preferred one is empty), so the
predicted loss change stays near zero; until the kept parameters fit the budget. A matrix
saves parameters only once its rank is at or below break-even (before that it is stored
dense, and kept dense if it ends there). Left out: ZS-SVD's optional projected-gradient
correction after truncation and its multi-stage schedule (this is its one-shot rule).

No matrix goes beyond its break-even rank floor(m n / (m + n)): the next step keeps it
dense instead (zero error, m n parameters), counted in the budget at that price.
"""

from __future__ import annotations

import heapq
import math

import torch

from recsys_compress.compression.low_rank import rank_for_ratio
from recsys_compress.compression.names import ALLOCATIONS, GRADIENT_ALLOCATIONS  # noqa: F401  (re-exported)

DENSE = -1  # the rank recorded for a matrix kept dense


def break_even_rank(m: int, n: int) -> int:
    """The largest rank whose factors cost no more than the dense m x n matrix."""
    return (m * n) // (m + n)


def uniform_budget(shapes: dict[str, tuple[int, int]], ratio: float) -> int:
    """Parameters the uniform allocation keeps over all matrices: the budget of every rule."""
    return sum(rank_for_ratio(m, n, ratio) * (m + n) for m, n in shapes.values())


def check_budget(shapes: dict[str, tuple[int, int]], ratio: float, min_rank: int) -> int:
    """The budget, after checking it can give every matrix ``min_rank`` (the numbers if not)."""
    if min_rank < 1:
        raise ValueError(f"compression.min_rank={min_rank} is out of range; allowed: >= 1")
    budget = uniform_budget(shapes, ratio)
    floor = sum(min(min_rank, break_even_rank(m, n)) * (m + n) for m, n in shapes.values())
    if floor > budget:
        raise ValueError(
            f"ratio={ratio} gives a budget of {budget:,} parameters over {len(shapes)} matrices, but "
            f"compression.min_rank={min_rank} alone costs {floor:,}: lower compression.min_rank or raise ratio")
    return budget


def allocate_ranks(
    shapes: dict[str, tuple[int, int]],
    scores: dict[str, torch.Tensor] | None,
    ratio: float,
    allocation: str = "uniform",
    min_rank: int = 1,
    rank_align: int = 1,
) -> dict[str, int]:
    """Rank per matrix name (``DENSE``: keep the matrix dense).

    ``scores``: per matrix, one value per singular direction in descending singular-value
    order: the singular values (of W S for whitened SVD, of W for plain SVD) for ``global``
    and ``global_relative``, each direction's first-order loss change for ``zero_sum``
    (``apply.direction_scores`` computes either); not needed for ``uniform``. ``rank_align``:
    ranks end as multiples of it (``align_ranks``).
    """
    if allocation not in ALLOCATIONS:
        raise ValueError(f"compression.allocation={allocation!r}; allowed: {', '.join(ALLOCATIONS)}")
    if allocation == "uniform":
        return align_ranks(shapes, {name: rank_for_ratio(m, n, ratio) for name, (m, n) in shapes.items()},
                           rank_align)
    if scores is None or set(scores) != set(shapes):
        what = "first-order loss changes" if allocation in GRADIENT_ALLOCATIONS else "singular values"
        raise ValueError(f"compression.allocation={allocation} needs the {what} of every targeted matrix")
    budget = check_budget(shapes, ratio, min_rank)
    if allocation == "zero_sum":
        return align_ranks(shapes, _zero_sum_ranks(shapes, scores, budget, min_rank), rank_align)

    gains: dict[str, list[float]] = {}
    for name, sigma in scores.items():
        energy = sigma.double() ** 2
        if allocation == "global_relative":
            energy = energy / energy.sum().clamp(min=1e-300)
        gains[name] = energy.tolist()

    ranks = {name: min(min_rank, break_even_rank(m, n)) for name, (m, n) in shapes.items()}
    spent = sum(ranks[name] * (m + n) for name, (m, n) in shapes.items())

    def next_step(name: str) -> tuple[float, int, float] | None:
        """(gain, cost, gain per parameter) of the matrix's next step; None when it is dense."""
        m, n = shapes[name]
        k, top = ranks[name], break_even_rank(m, n)
        if k == DENSE:
            return None
        if k < top:
            gain, cost = gains[name][k], m + n  # k < break-even <= min(m, n): a direction exists
        else:  # past break-even: the dense matrix, which removes every remaining direction's error
            gain, cost = math.fsum(gains[name][k:]), m * n - k * (m + n)
        return gain, cost, gain / max(cost, 1)

    def entry(name: str, step: tuple[float, int, float]) -> tuple[float, str, int]:
        return -step[2], name, step[1]  # a max-heap on gain per parameter; the name breaks ties

    heap = [entry(name, step) for name in shapes if (step := next_step(name)) is not None]
    heapq.heapify(heap)
    while heap:
        _, name, cost = heapq.heappop(heap)
        if spent + cost > budget:
            continue  # the matrix's later steps cost as much or more: it stops here
        spent += cost
        m, n = shapes[name]
        ranks[name] = ranks[name] + 1 if ranks[name] < break_even_rank(m, n) else DENSE
        step = next_step(name)
        if step is not None:
            heapq.heappush(heap, entry(name, step))
    return align_ranks(shapes, ranks, rank_align)


def _zero_sum_ranks(shapes: dict[str, tuple[int, int]], loss_changes: dict[str, torch.Tensor], budget: int,
                    min_rank: int) -> dict[str, int]:
    """ZS-SVD's one-shot selection (module docstring): remove directions, each matrix's from its
    smallest singular value up, keeping the running sum of first-order loss changes near zero,
    until the kept parameters are within ``budget``."""
    deltas = {name: d.double().tolist() for name, d in loss_changes.items()}
    ranks = {name: len(deltas[name]) for name in shapes}  # every direction kept: the dense matrix
    floors = {name: min(min_rank, break_even_rank(m, n)) for name, (m, n) in shapes.items()}

    def stored(name: str, rank: int) -> int:
        m, n = shapes[name]
        return m * n if rank > break_even_rank(m, n) else rank * (m + n)

    kept = sum(stored(name, ranks[name]) for name in shapes)
    heaps: dict[bool, list[tuple[float, str]]] = {True: [], False: []}  # by sign of dL: >= 0, < 0

    def push(name: str) -> None:
        if ranks[name] > floors[name]:
            delta = deltas[name][ranks[name] - 1]
            heapq.heappush(heaps[delta >= 0], (abs(delta), name))  # the smallest |dL| first; name breaks ties

    for name in shapes:
        push(name)
    running = 0.0
    while kept > budget:
        prefer = running <= 0  # a non-negative change when the sum is at or below zero
        heap = heaps[prefer] or heaps[not prefer]
        if not heap:  # every matrix at its floor: check_budget makes this unreachable
            raise RuntimeError(f"zero_sum: {kept:,} parameters left at the floor ranks, budget {budget:,}")
        _, name = heapq.heappop(heap)
        rank = ranks[name]
        running += deltas[name][rank - 1]
        kept -= stored(name, rank) - stored(name, rank - 1)
        ranks[name] = rank - 1
        push(name)
    return {name: DENSE if k > break_even_rank(*shapes[name]) else k for name, k in ranks.items()}


def align_ranks(shapes: dict[str, tuple[int, int]], ranks: dict[str, int], multiple: int) -> dict[str, int]:
    """Ranks made multiples of ``multiple`` (matrix kernels run skinny factors fastest at
    multiples of their register/cache tiles) without spending more parameters than ``ranks``.

    Every rank goes down to its multiple; the parameters that freed are then spent raising
    ranks to the next multiple, the ranks that lost most first, skipping any raise that would
    pass the matrix's break-even rank or the budget. So the result never keeps more
    parameters than ``ranks``, and the parameters left unspent are fewer than the cost
    (``multiple`` (m + n)) of any raise it skipped for the budget. ``DENSE`` stays dense.
    """
    if multiple < 1:
        raise ValueError(f"compression.rank_align={multiple} is out of range; allowed: >= 1")
    if multiple == 1:
        return dict(ranks)
    small = {name: k for name, k in ranks.items() if k != DENSE and k < multiple}
    if small:
        name, k = min(small.items(), key=lambda kv: kv[1])
        raise ValueError(f"compression.rank_align={multiple} is larger than the rank {k} of {name} "
                         f"({len(small)} matrices below it); allowed: 1 to {k}, or a higher ratio")
    aligned = {name: k if k == DENSE else k - k % multiple for name, k in ranks.items()}
    slack = kept_parameters(shapes, ranks) - kept_parameters(shapes, aligned)
    for name in sorted((n for n in ranks if ranks[n] != DENSE), key=lambda n: (-(ranks[n] % multiple), n)):
        m, n = shapes[name]
        raised = aligned[name] + multiple
        if ranks[name] % multiple and raised <= break_even_rank(m, n) and multiple * (m + n) <= slack:
            aligned[name] = raised
            slack -= multiple * (m + n)
    return aligned


def kept_parameters(shapes: dict[str, tuple[int, int]], ranks: dict[str, int]) -> int:
    """Parameters an allocation keeps (a dense matrix at its full m n)."""
    return sum(m * n if ranks[name] == DENSE else ranks[name] * (m + n) for name, (m, n) in shapes.items())
