"""The atomic recommender: one item = one vocabulary token of a causal LM, scored by its tied head.

``SeqRecLitModule`` implements the ``RecommenderModel`` seam for it (what compression, alignment,
evaluation and export call) on the Lightning side every recommender shares (``lit_base.py``);
this module is the only place that knows an item is one token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers import PreTrainedModel

from recsys_compress.evaluation.ranking import mask_scores, target_ranks
from recsys_compress.models.interface import ExportGraph, TargetRanks, TokenSequence
from recsys_compress.models.lit_base import RecLitModule
from recsys_compress.models.item_llm import position_ids_for
from recsys_compress.models.padding import to_right_padding


class ItemScorer(nn.Module):
    """``(input_ids, attention_mask) -> scores`` of every item index as the next item, for
    **right-padded** histories (real items first, item 0 after them): the exported graph.

    The same scores as ``SeqRecLitModule.forward`` in eval mode gives the left-padded history
    (positions count from the first real item either way, and causal attention never lets a real
    item see the padding after it), without Lightning, for export. Right padding is what
    onnxruntime's ``GroupQueryAttention`` kernel handles (``deploy.fusions``); ``to_right_padding``
    turns the datamodule's left-padded batches into it. Every slot gets its index as position, so
    that the kernel reads each sequence as the full width: padding slots then attend to items
    and to each other, and only the last real item's state is read.
    """

    def __init__(self, model: PreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        batch, length = input_ids.shape
        hidden = self.model.base_model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=torch.arange(length, device=input_ids.device).expand(batch, length),
            use_cache=False,
        ).last_hidden_state
        last = (attention_mask.sum(-1) - 1).clamp(min=0)
        return self.model.get_output_embeddings()(hidden[torch.arange(batch, device=hidden.device), last])


def example_inputs(n_items: int, max_len: int, batch: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-padded example histories (one full, one half padding), as the datamodule pads them:
    the export traces their right-padded form and checks the graph against the eager model."""
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(1, n_items + 1, (batch, max_len), generator=generator)
    mask = torch.ones_like(ids)
    ids[1:, : max_len // 2] = 0
    mask[1:, : max_len // 2] = 0
    return ids, mask


class SeqRecLitModule(RecLitModule):
    """The atomic recommender: causal next-item cross-entropy at every position over a vocabulary
    of items, and full-ranking evaluation of the tied head's scores of every item."""

    # ---- the RecommenderModel seam (backbone and hidden_states: RecLitModule) ---------------
    @property
    def n_items(self) -> int:
        """Items in the catalogue (vocabulary token 0 is padding)."""
        return self.model.get_input_embeddings().num_embeddings - 1

    def sequence(self, batch: dict[str, torch.Tensor]) -> TokenSequence:
        """The items themselves, left-padded; positions count from each sequence's first item."""
        mask = batch["attention_mask"]
        return TokenSequence(batch["input_ids"], mask, position_ids_for(mask))

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Scores of every item (index 0 = padding) as the next item after each sequence."""
        last = self.hidden_states({"input_ids": input_ids, "attention_mask": attention_mask})[:, -1]
        return self.model.get_output_embeddings()(last)

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective on ``batch``: mean next-item cross-entropy over every position
        that has a next item (also the calibration loss of gradient-driven rank allocations)."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        hidden = self.hidden_states(batch)[:, :-1]
        # Score the catalogue only where there is a next item: the full softmax dominates
        # the step, and padding is often half the positions.
        has_target = mask[:, :-1].bool()
        logits = self.model.get_output_embeddings()(hidden[has_target])
        return F.cross_entropy(logits.float(), ids[:, 1:][has_target])

    def target_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Mean cross-entropy of an evaluation batch's held-out ``target`` item after each user's
        history (the calibration loss of gradient-driven allocations with gradient_split=val)."""
        return F.cross_entropy(self(batch["input_ids"], batch["attention_mask"]).float(), batch["target"])

    def predicted_logits(self, backbone: PreTrainedModel, last_hidden: torch.Tensor,
                         sequence: TokenSequence) -> tuple[torch.Tensor, torch.Tensor]:
        """Every item's logit at each position that has a next item, and that next item."""
        has_target = sequence.attention_mask[:, :-1].bool()
        normed = backbone.base_model.norm(last_hidden)[:, :-1][has_target]
        return backbone.get_output_embeddings()(normed).float(), sequence.input_ids[:, 1:][has_target]

    def rank(self, batch: dict[str, torch.Tensor], exclude_seen: bool | None = None) -> TargetRanks:
        """The target's rank among all items' scores, seen items masked out and not (both are one
        scoring pass: ``exclude_seen`` changes nothing)."""
        scores = self(batch["input_ids"], batch["attention_mask"]).float()
        target = batch["target"]
        return TargetRanks(seen_excluded=target_ranks(mask_scores(scores, target, batch["seen"]), target),
                           seen_kept=target_ranks(mask_scores(scores, target, None), target))

    def export_graph(self, backbone: PreTrainedModel, max_len: int) -> ExportGraph:
        """``ItemScorer`` over ``backbone`` on right-padded example histories; ``expected``: this
        model's own scores of their left-padded form, as trained and evaluated."""
        left_ids, left_mask = example_inputs(self.n_items, max_len)
        ids, mask = (torch.from_numpy(a) for a in to_right_padding(left_ids.numpy(), left_mask.numpy()))
        batch = torch.export.Dim("batch", min=1, max=65536)
        length = torch.export.Dim("length", min=2, max=max(max_len, 2))
        was_training = self.training
        with torch.no_grad():
            expected = self.eval()(left_ids, left_mask)
        self.train(was_training)
        return ExportGraph(ItemScorer(backbone).eval(), {"input_ids": ids, "attention_mask": mask},
                           {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 1: length}},
                           ["scores"], expected, meta={"recommender": "atomic"})
