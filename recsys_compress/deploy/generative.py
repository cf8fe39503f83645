"""The generative recommender's artefact at work: constrained beam search over its exported step
graph (``models.generative.GenerativeStep``), the items' code tuples shipped in ``items.json``.

The search itself is the evaluation's (``models.generative.constrained_beam_search``, the same
trie and top-k), with the step graph decoding history and beams as one query per level
(``QueryDecoder``) instead of the eager model's KV cache, so the artefact recommends exactly what
the model it was exported from does (``tests/test_generative.py``). Unlike the atomic
artefact's, this runner needs torch for the search.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from recsys_compress.deploy.recommend import Recommendation, Recommender
from recsys_compress.models.generative import (CodeVocabulary, ItemTrie, QueryDecoder, banned_items, code_sequence,
                                               code_tokens, constrained_beam_search, ranks_in_list)


class GenerativeRecommender(Recommender):
    """An artefact whose ``deploy.json`` says ``"recommender": "generative"``: the top items are
    the ``beams`` best valid code tuples after the history (``open_artefact`` picks this class)."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        super().__init__(folder, threads)
        codes = torch.tensor(self.items["codes"], dtype=torch.long)
        codes = torch.cat([torch.zeros(1, codes.shape[1], dtype=torch.long), codes])
        self.vocab = CodeVocabulary(self.meta["codebook_sizes"])
        self.trie = ItemTrie(codes, self.vocab.sizes)
        self.item_tokens = code_tokens(self.vocab, codes)
        self.beams: int = self.meta["beams"]

    def _run(self, **inputs: torch.Tensor) -> torch.Tensor:
        feed = {name: value.numpy() for name, value in inputs.items()}
        return torch.from_numpy(self.session.run(None, feed)[0])

    def search(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               banned: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``beams`` best items (B x beams, 0: none left) and their tuples' log-probabilities
        after left-padded item-index histories; ``banned`` (B x (items + 1)) never recommended."""
        history = code_sequence(self.item_tokens, input_ids, attention_mask)
        return constrained_beam_search(None, self.vocab, self.trie, history, self.beams, banned,
                                       decoder=QueryDecoder(self._run, history))

    def ranks(self, batch: dict[str, torch.Tensor], exclude_seen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """The target's ``(ahead, ties)`` in the artefact's list, as the eager model's test ranks it."""
        banned = banned_items(batch, len(self.item_ids)) if exclude_seen else None
        items, _ = self.search(batch["input_ids"], batch["attention_mask"], banned)
        return ranks_in_list(items, batch["target"], len(self.item_ids))

    def scores(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        raise TypeError("a generative artefact ranks by beam search, it scores no catalogue: use recommend()")

    def recommend(self, history: Sequence[str], k: int = 10, exclude_seen: bool = True) -> list[Recommendation]:
        if not 1 <= k <= self.beams:
            raise ValueError(f"k={k}; allowed: 1..{self.beams} (the artefact's beams)")
        ids, mask = (torch.from_numpy(a) for a in self.encode([history]))
        banned = banned_items({"input_ids": ids, "seen": ids}, len(self.item_ids)) if exclude_seen else None
        items, scores = self.search(ids, mask, banned)
        return [Recommendation(self.item_ids[i - 1], self.texts[i - 1], float(s))
                for i, s in zip(items[0, :k].tolist(), scores[0, :k].tolist()) if i > 0]
