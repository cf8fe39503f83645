"""The names a compression config chooses from, in a leaf module that imports nothing heavy, so a
config is validated (and a typo refused) before torch, Lightning and transformers load.

The implementations stay with their code: ``methods.METHODS`` (the registry, which checks itself
against ``METHOD_KINDS`` when it loads), ``allocation.allocate_ranks`` and
``calibration.select_linear_layers``.
"""

from __future__ import annotations

# Every compression method and its kind (low_rank, pruning, quantization).
METHOD_KINDS = {
    "svd": "low_rank", "asvd": "low_rank", "odllm": "low_rank",
    "prune_magnitude": "pruning", "wanda": "pruning",
    "int8": "quantization",
}
LOW_RANK_METHODS = tuple(n for n, kind in METHOD_KINDS.items() if kind == "low_rank")
PRUNING_METHODS = tuple(n for n, kind in METHOD_KINDS.items() if kind == "pruning")

ALLOCATIONS = ("uniform", "global", "global_relative", "zero_sum")
# rules that rank directions by the calibration loss's gradient, not by singular values alone
GRADIENT_ALLOCATIONS = ("zero_sum",)

# The linear layers compressed by default: attention q/k/v/o and MLP gate/up/down of every block.
DEFAULT_TARGETS = (
    "*.self_attn.q_proj", "*.self_attn.k_proj", "*.self_attn.v_proj", "*.self_attn.o_proj",
    "*.mlp.gate_proj", "*.mlp.up_proj", "*.mlp.down_proj",
)
