"""The seam between a recommender's model side and everything that transforms or measures it.

Compression, alignment, evaluation and export call only ``RecommenderModel``; a recommender
paradigm implements it once. The atomic model (one item = one vocabulary token, scored by a tied
head: ``models/lit_seqrec.py``) is one implementation; a model that generates each item as a
tuple of code tokens is another. What differs between them stays behind the seam: how a batch
becomes the token sequence the decoder reads, which positions are predicted and against what,
how the held-out item is ranked, and what graph is exported. What the callers see is a Hugging
Face decoder (the ``backbone``), whose linear layers and blocks they transform.

Methods that alignment and export also run on another copy of the decoder (the frozen teacher,
an export copy) take that ``backbone`` as an argument; ``None`` means the model's own.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel


@dataclass
class TokenSequence:
    """What the decoder reads for a batch: token ids, the mask of real tokens, their positions."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor

    def to(self, device: torch.device | str) -> TokenSequence:
        return TokenSequence(self.input_ids.to(device), self.attention_mask.to(device), self.position_ids.to(device))


@dataclass
class TargetRanks:
    """The held-out item's rank for each user of a batch, under both protocols: ``(ahead, ties)``,
    the items ranked strictly before it and those tied with it (``evaluation.ranking.metrics_from_ranks``),
    with the user's seen items excluded from the ranking and kept in it."""

    seen_excluded: tuple[torch.Tensor, torch.Tensor] | None
    seen_kept: tuple[torch.Tensor, torch.Tensor] | None

    def protocol(self, exclude_seen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        ranks = self.seen_excluded if exclude_seen else self.seen_kept
        if ranks is None:
            raise ValueError(f"these ranks hold no {'seen_excluded' if exclude_seen else 'seen_kept'} protocol")
        return ranks


@dataclass
class ExportGraph:
    """What ``deploy.export.export_onnx`` traces: ``module(*inputs.values())`` -> ``output_names``,
    with ``dynamic_shapes`` per input, and ``expected``, the eager model's output on the same
    histories as it runs in training and evaluation (the export's deviation check)."""

    module: torch.nn.Module
    inputs: dict[str, torch.Tensor]
    dynamic_shapes: dict[str, dict[int, Any]]
    output_names: list[str]
    expected: torch.Tensor
    # what the artefact's runner needs beside the graph: into deploy.json and items.json
    meta: dict[str, Any] = field(default_factory=dict)
    item_fields: dict[str, Any] = field(default_factory=dict)


class RecommenderModel(ABC):
    """The interface a recommender's model side implements (see the module docstring)."""

    @property
    @abstractmethod
    def backbone(self) -> PreTrainedModel:
        """The Hugging Face decoder that compression, alignment and export transform in place."""

    @abstractmethod
    def sequence(self, batch: dict[str, torch.Tensor]) -> TokenSequence:
        """The token sequence the backbone reads for ``batch`` (training windows or histories)."""

    @abstractmethod
    def hidden_states(self, batch: dict[str, torch.Tensor], backbone: PreTrainedModel | None = None) -> torch.Tensor:
        """Final (normed) hidden state at every position of ``sequence(batch)``: the forward that
        calibration runs."""

    @abstractmethod
    def decode(self, sequence: TokenSequence, backbone: PreTrainedModel | None = None) -> torch.Tensor:
        """Final (normed) hidden state at every position of a token sequence
        (``hidden_states(batch)`` is ``decode(sequence(batch))``)."""

    @abstractmethod
    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The training objective on a batch of training windows."""

    @abstractmethod
    def target_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The loss of an evaluation batch's held-out ``target`` after each user's history
        (what ``compression.gradient_split=val`` differentiates)."""

    @abstractmethod
    def predicted_logits(self, backbone: PreTrainedModel, last_hidden: torch.Tensor,
                         sequence: TokenSequence) -> tuple[torch.Tensor, torch.Tensor]:
        """From ``backbone``'s last block output (before the final norm) on ``sequence``: the
        logits at every predicted position (float32) and the tokens they predict. Alignment's
        task term is their cross-entropy, its distillation term the teacher's logits."""

    @abstractmethod
    def rank(self, batch: dict[str, torch.Tensor], exclude_seen: bool | None = None) -> TargetRanks:
        """The held-out target's rank per user under both protocols (``exclude_seen`` None), or
        under the one asked for (a model whose ranking is costly need not compute the other)."""

    @abstractmethod
    def export_graph(self, backbone: PreTrainedModel, max_len: int) -> ExportGraph:
        """The graph that serves ``backbone``'s recommendations, with example inputs."""
