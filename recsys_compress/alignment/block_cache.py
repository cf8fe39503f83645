"""Per-block inputs and outputs of a decoder stack on alignment batches.

Progressive alignment refines one decoder block at a time. Re-running the whole model for
every step of every block would cost O(layers^2) forward passes; instead the teacher's
hidden state entering every block is captured once, together with the arguments the model
passes to its blocks (causal mask, rotary embeddings, positions), and each block is then run
on its own (the GPTQ / SVD-LLM "catcher" pattern).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel

from recsys_compress.models.blocks import decoder_blocks
from recsys_compress.models.interface import TokenSequence


@dataclass
class AlignmentBatch:
    sequence: TokenSequence  # what the decoder read (RecommenderModel.sequence of the batch)
    block_kwargs: dict[str, Any]
    # teacher[l] enters block l of the teacher; teacher[-1] leaves the last block (pre-norm).
    teacher: list[torch.Tensor] = field(default_factory=list)

    @property
    def input_ids(self) -> torch.Tensor:
        return self.sequence.input_ids

    @property
    def attention_mask(self) -> torch.Tensor:
        return self.sequence.attention_mask

    def teacher_at(self, index: int) -> torch.Tensor:
        """``teacher[index]`` on the batch's device (the states may be offloaded to the CPU)."""
        return self.teacher[index].to(self.attention_mask.device, non_blocking=True)

    @property
    def tokens(self) -> torch.Tensor:
        """Boolean mask of the real (non-padding) positions."""
        return self.attention_mask.bool()


@torch.no_grad()
def capture_teacher(
    teacher: PreTrainedModel, batches: Iterable[dict[str, torch.Tensor]], max_batches: int, device: torch.device,
    sequence: Callable[[dict[str, torch.Tensor]], TokenSequence], offload: bool = False,
) -> list[AlignmentBatch]:
    """Run the teacher over ``max_batches`` batches, recording every block's input and output.
    ``sequence``: the recommender's ``RecommenderModel.sequence``, what its decoder reads for a batch.

    ``offload``: keep those (layers + 1) hidden states per batch in CPU memory, so the accelerator
    holds only the block at work (``AlignmentBatch.teacher_at`` brings one state over)."""
    blocks = decoder_blocks(teacher)
    records: dict[str, Any] = {}

    def before_first(_module, args, kwargs):
        records["kwargs"] = {k: v for k, v in kwargs.items() if k not in ("cache", "past_key_values")}
        first = args[0] if args else kwargs["hidden_states"]
        records["hidden"] = [first.cpu() if offload else first]

    def after_each(_module, _args, _kwargs, output):
        state = output[0] if isinstance(output, tuple) else output
        records["hidden"].append(state.cpu() if offload else state)

    handles = [blocks[0].register_forward_pre_hook(before_first, with_kwargs=True)]
    handles += [b.register_forward_hook(after_each, with_kwargs=True) for b in blocks]
    cached: list[AlignmentBatch] = []
    was_training = teacher.training
    teacher.eval()
    try:
        for batch in batches:
            if len(cached) >= max_batches:
                break
            seq = sequence(batch).to(device)
            teacher.base_model(input_ids=seq.input_ids, attention_mask=seq.attention_mask,
                               position_ids=seq.position_ids, use_cache=False)
            records["kwargs"].pop("hidden_states", None)
            cached.append(AlignmentBatch(seq, records["kwargs"], records["hidden"]))
    finally:
        for h in handles:
            h.remove()
        teacher.train(was_training)
    if not cached:
        raise ValueError("no alignment batches: the training dataloader is empty")
    return cached
