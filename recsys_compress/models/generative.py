"""The generative recommender: every item is a tuple of code tokens (semantic IDs), the decoder
generates the next item's tuple, and items are ranked by beam search constrained to valid tuples.

This is the paradigm of TIGER and LC-Rec, the model OD-LLM compresses. The decoder is a stock
Hugging Face LLaMA over a vocabulary of code tokens (``CodeVocabulary``), so compression,
alignment and the block-wise tools work on it unchanged through the ``RecommenderModel`` seam.

Ranking: ``constrained_beam_search`` keeps ``beams`` partial tuples per user, level by level,
on the history's KV cache, shared by the user's beams; at each level a beam may only be extended by a code that leads to
at least one valid tuple the user may still be recommended (``ItemTrie``), so every beam that
comes out is an item, and, with seen items excluded, never a seen one (the beams are still
filled from the rest of the catalogue). Scores are the tuple's log-probability under the
decoder's full softmax, so with ``beams`` >= the catalogue size the search is exhaustive and
returns every item in the order of its exact log-probability.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric
from transformers import DynamicCache, PreTrainedModel

from recsys_compress.evaluation.config import EvaluationConfig
from recsys_compress.models.config import OptimConfig
from recsys_compress.models.interface import ExportGraph, TargetRanks, TokenSequence
from recsys_compress.models.item_llm import position_ids_for
from recsys_compress.models.lit_base import RecLitModule
from recsys_compress.models.lit_seqrec import example_inputs

PAD_TOKEN = 0


class CodeVocabulary:
    """Token 0 is padding; code ``c`` of level ``l`` is token ``1 + offsets[l] + c`` (each level
    has its own tokens, as LC-Rec's ``<a_c>``, ``<b_c>``, ... and TIGER's per-level codebooks)."""

    def __init__(self, codebook_sizes: Sequence[int]):
        if not codebook_sizes or min(codebook_sizes) < 1:
            raise ValueError(f"codebook sizes {list(codebook_sizes)}: each level needs at least one code")
        self.sizes = tuple(int(k) for k in codebook_sizes)
        self.offsets = tuple(1 + sum(self.sizes[:level]) for level in range(len(self.sizes)))
        self.size = 1 + sum(self.sizes)

    @property
    def levels(self) -> int:
        return len(self.sizes)

    def tokens(self, codes: torch.Tensor) -> torch.Tensor:
        """``codes[..., l]`` (level l's code) -> its token."""
        return codes + torch.as_tensor(self.offsets, dtype=codes.dtype, device=codes.device)

    def level_slice(self, level: int) -> slice:
        return slice(self.offsets[level], self.offsets[level] + self.sizes[level])


def code_tokens(vocab: CodeVocabulary, codes: torch.Tensor) -> torch.Tensor:
    """(items + 1) x L: every item's tuple as its tokens, row 0 (the padding item) all padding."""
    tokens = vocab.tokens(codes.long())
    tokens[0] = PAD_TOKEN
    return tokens


def code_sequence(item_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> TokenSequence:
    """Each item of a left-padded window as its L code tokens, in order."""
    levels = item_tokens.shape[1]
    tokens = item_tokens[input_ids].reshape(input_ids.shape[0], -1)
    token_mask = attention_mask.repeat_interleave(levels, 1)
    return TokenSequence(tokens, token_mask, position_ids_for(token_mask))


def codebook_sizes(codes: torch.Tensor) -> tuple[int, ...]:
    """Codes per level that ``codes`` ((items + 1) x L, row 0 the padding item) needs."""
    return tuple(int(k) + 1 for k in codes[1:].max(0).values)


class ItemTrie:
    """The prefix tree of the items' code tuples, as dense per-level tables.

    ``children[l][p, c]``: the id of the level-l prefix reached from level-(l-1) prefix ``p``
    (level 0: the root, ``p = 0``) by code ``c``, or -1 where no item continues that way.
    ``prefix_of[l][i]``: the id of item i's level-l prefix; ``items_below[l][p]``: how many items
    share prefix ``p``; ``leaf_item[p]``: the item whose whole tuple is level-(L-1) prefix ``p``.
    Row 0 of ``codes`` (the padding item) is no item. Every item must have its own tuple
    (collisions are resolved when the index is built or loaded).
    """

    def __init__(self, codes: torch.Tensor, codebook_sizes: Sequence[int]):
        codes = codes.long().cpu()
        levels = len(codebook_sizes)
        if codes.ndim != 2 or codes.shape[1] != levels:
            raise ValueError(f"codes of shape {tuple(codes.shape)}: expected (items + 1, {levels})")
        items = codes[1:]
        for level, size in enumerate(codebook_sizes):
            bad = (items[:, level] < 0) | (items[:, level] >= size)
            if bad.any():
                item = int(bad.nonzero()[0, 0]) + 1
                raise ValueError(f"item {item} has code {int(codes[item, level])} at level {level}, outside 0..{size - 1}")
        self.children: list[torch.Tensor] = []
        self.prefix_of: list[torch.Tensor] = []
        self.items_below: list[torch.Tensor] = []
        parent = torch.zeros(len(items), dtype=torch.long)  # every item starts at the root
        n_parents = 1
        for level, size in enumerate(codebook_sizes):
            pair = parent * size + items[:, level]
            unique, prefix = torch.unique(pair, return_inverse=True)
            table = torch.full((n_parents, size), -1, dtype=torch.long)
            table.view(-1)[unique] = torch.arange(len(unique))
            self.children.append(table)
            self.prefix_of.append(torch.cat([torch.tensor([-1]), prefix]))
            self.items_below.append(torch.bincount(prefix, minlength=len(unique)))
            parent, n_parents = prefix, len(unique)
        if n_parents != len(items):
            shared = len(items) - n_parents
            raise ValueError(f"{len(items)} items have {n_parents} distinct code tuples ({shared} items share "
                             "another's): resolve collisions when building or loading the index")
        self.leaf_item = torch.empty(n_parents, dtype=torch.long)
        self.leaf_item[parent] = torch.arange(1, len(items) + 1)

    def to(self, device: torch.device | str) -> ItemTrie:
        for tables in (self.children, self.prefix_of, self.items_below):
            tables[:] = [t.to(device) for t in tables]
        self.leaf_item = self.leaf_item.to(device)
        return self

    def remaining(self, banned: torch.Tensor | None) -> list[torch.Tensor] | None:
        """Per user and level-l prefix, the items below it the user may still be recommended
        (``banned``: B x (items + 1), True = excluded); None when nothing is banned."""
        if banned is None:
            return None
        out = []
        for prefix, below in zip(self.prefix_of, self.items_below):
            count = torch.zeros(banned.shape[0], len(below), dtype=torch.long, device=banned.device)
            count.index_add_(1, prefix[1:], banned[:, 1:].long())
            out.append(below[None, :] - count)
        return out

    def extend(self, level: int, prefix: torch.Tensor) -> torch.Tensor:
        """B x W level-(l-1) prefix ids (-1: a dead beam; ignored at level 0, the root) -> B x W x K
        the ids of the prefixes each code leads to (-1 where no item continues that way)."""
        if level == 0:
            return self.children[0][0].expand(*prefix.shape, -1)
        children = self.children[level][prefix.clamp(min=0)]
        return torch.where(prefix[..., None] >= 0, children, torch.full_like(children, -1))

    def allowed(self, level: int, children: torch.Tensor, remaining: list[torch.Tensor] | None) -> torch.Tensor:
        """Which of the B x N candidate prefixes lead to an item the user may be recommended."""
        valid = children >= 0  # -1: no item continues that way
        if remaining is not None:
            valid &= remaining[level].gather(1, children.clamp(min=0)) > 0
        return valid

    def item(self, prefix: torch.Tensor) -> torch.Tensor:
        """The item of each whole-tuple prefix id (0 for a dead beam)."""
        return torch.where(prefix >= 0, self.leaf_item[prefix.clamp(min=0)], torch.zeros_like(prefix))


class PerLevelCodes:
    """LC-Rec's decoding constraint (``evaluation.decoding=per_level``): position l may hold any
    code some item has at level l, whatever the codes before it, so a beam can end on a tuple
    that is no item (``item`` gives 0 for it: a miss that takes a place in the list).

    Same interface as ``ItemTrie``; a prefix id is the tuple so far as a mixed-radix number."""

    def __init__(self, codes: torch.Tensor, codebook_sizes: Sequence[int]):
        items = codes[1:].long().cpu()
        self.sizes = tuple(int(k) for k in codebook_sizes)
        self.seen = [torch.zeros(size, dtype=torch.bool).index_fill_(0, items[:, level], True)
                     for level, size in enumerate(self.sizes)]
        keys = torch.zeros(len(items), dtype=torch.long)
        for level, size in enumerate(self.sizes):
            keys = keys * size + items[:, level]
        self.keys, order = keys.sort()
        self.key_item = order + 1

    def to(self, device: torch.device | str) -> PerLevelCodes:
        self.seen = [t.to(device) for t in self.seen]
        self.keys, self.key_item = self.keys.to(device), self.key_item.to(device)
        return self

    def remaining(self, banned: torch.Tensor | None) -> torch.Tensor | None:
        return banned

    def extend(self, level: int, prefix: torch.Tensor) -> torch.Tensor:
        codes = torch.arange(self.sizes[level], device=prefix.device)
        children = prefix.clamp(min=0)[..., None] * self.sizes[level] + codes
        alive = self.seen[level] & (prefix[..., None] >= 0 if level else True)
        return torch.where(alive, children, torch.full_like(children, -1))

    def allowed(self, level: int, children: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
        valid = children >= 0
        if banned is not None and level == len(self.sizes) - 1:  # a banned item's tuple; a non-item's is not banned
            item = self.item(children)
            valid &= ~(banned.gather(1, item) & (item > 0))
        return valid

    def item(self, prefix: torch.Tensor) -> torch.Tensor:
        at = torch.searchsorted(self.keys, prefix.clamp(min=0)).clamp(max=len(self.keys) - 1)
        match = (self.keys[at] == prefix) & (prefix >= 0)
        return torch.where(match, self.key_item[at], torch.zeros_like(prefix))


def beam_query(history: TokenSequence, paths: torch.Tensor, offsets: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The beams' partial tuples (``paths``: B x W x l codes) as one query after the history:
    their tokens and positions (B x W*l) and the attention mask (B x 1 x W*l x (T + W*l)) that lets
    each beam see the history and its own earlier tokens only."""
    batch, beams, level = paths.shape
    device = paths.device
    tokens = (paths + offsets[:level]).reshape(batch, beams * level)
    positions = history.position_ids[:, -1:] + 1 + torch.arange(level, device=device).repeat(beams)
    beam_of = torch.arange(beams, device=device).repeat_interleave(level)
    step_of = torch.arange(level, device=device).repeat(beams)
    own = (beam_of[:, None] == beam_of[None, :]) & (step_of[None, :] <= step_of[:, None])  # (W*l) x (W*l)
    sees_history = history.attention_mask.bool()[:, None, None, :].expand(-1, -1, beams * level, -1)
    return tokens, torch.cat([sees_history, own[None, None].expand(batch, -1, -1, -1)], -1), positions


def full_query(history: TokenSequence, paths: torch.Tensor, offsets: torch.Tensor) -> dict[str, torch.Tensor]:
    """History and beams as one sequence, decoded without a cache (the exported step graph's
    inputs): ``input_ids``, a 4D ``attention_mask``, ``position_ids`` and ``read``, the positions
    whose logits predict each beam's next code (the history's last one at level 0)."""
    ids, mask = history.input_ids, history.attention_mask.bool()
    length = ids.shape[1]
    causal = torch.tril(torch.ones(length, length, dtype=torch.bool, device=ids.device))
    # left-padding rows see themselves only, so no softmax row is empty
    history_block = (causal & mask[:, None, :]) | torch.eye(length, dtype=torch.bool, device=ids.device)
    history_block = history_block[:, None]  # B x 1 x T x T
    batch, beams, level = paths.shape
    if level == 0:
        return {"input_ids": ids, "attention_mask": history_block, "position_ids": history.position_ids,
                "read": torch.tensor([length - 1], device=ids.device)}
    tokens, beam_mask, positions = beam_query(history, paths, offsets)
    no_future = torch.zeros(batch, 1, length, beams * level, dtype=torch.bool, device=ids.device)
    return {"input_ids": torch.cat([ids, tokens], 1),
            "attention_mask": torch.cat([torch.cat([history_block, no_future], -1), beam_mask], 2),
            "position_ids": torch.cat([history.position_ids, positions], 1),
            "read": length + torch.arange(beams, device=ids.device) * level + level - 1}


class CachedDecoder:
    """Next-code logits of every beam (B x W x V, ``paths``: B x W x l) from ``model``, the
    history decoded once with its KV cache shared by the user's beams; the cache is cut back to
    the history after each level. Copying the history's cache for every beam (what
    ``generate(num_beams=...)`` does) costs ``beams`` times the memory and a copy at every step."""

    def __init__(self, model: PreTrainedModel, history: TokenSequence):
        out = model(input_ids=history.input_ids, attention_mask=history.attention_mask,
                    position_ids=history.position_ids, use_cache=True, logits_to_keep=1)
        self.model, self.history = model, history
        self.cache: DynamicCache = out.past_key_values
        self.root = out.logits[:, -1:]

    def __call__(self, paths: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        batch, beams, level = paths.shape
        if level == 0:
            return self.root
        tokens, mask, positions = beam_query(self.history, paths, offsets)
        out = self.model(input_ids=tokens, attention_mask=mask, position_ids=positions, cache=self.cache,
                         use_cache=True)
        self.cache = out.past_key_values
        self.cache.crop(-beams * level)  # back to the history: the next level decodes the longer paths again
        return out.logits.view(batch, beams, level, -1)[:, :, -1]  # each beam's newest token


class QueryDecoder:
    """Next-code logits of every beam from ``run(**full_query(...))`` -> B x (reads) x V: the history and
    the beams decoded as one query at each level, no cache (an exported step graph)."""

    def __init__(self, run: Callable[..., torch.Tensor], history: TokenSequence):
        self.run, self.history = run, history

    def __call__(self, paths: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
        return self.run(**full_query(self.history, paths, offsets))


@torch.no_grad()
def constrained_beam_search(
    model: PreTrainedModel | None, vocab: CodeVocabulary, trie: ItemTrie | PerLevelCodes, history: TokenSequence,
    beams: int, banned: torch.Tensor | None = None, decoder: Callable[..., torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top ``beams`` tuples after each history (left-padded code-token sequences), best
    first: their items (0 where fewer valid items remain than beams, or, under ``PerLevelCodes``,
    for a tuple that is no item) and log-probabilities. ``banned`` (B x (items + 1), True = never
    recommend) masks tuples out per user. Deterministic top-k at every level, never sampled.

    The beams' next-code logits come from ``decoder`` (default: ``CachedDecoder(model, history)``;
    ``QueryDecoder`` for an exported graph): at level l the beams' partial tuples (l tokens each)
    are decoded together as one query of ``beams x l`` tokens whose attention mask lets each beam
    see the history and its own tokens only."""
    batch = history.input_ids.shape[0]
    device = history.input_ids.device
    decoder = decoder if decoder is not None else CachedDecoder(model, history)
    remaining = trie.remaining(banned)
    rows = torch.arange(batch, device=device)[:, None]
    prefix = torch.zeros(batch, 1, dtype=torch.long, device=device)  # the root, one beam per user
    score = torch.zeros(batch, 1, device=device)
    paths = torch.zeros(batch, 1, 0, dtype=torch.long, device=device)  # B x W x l: each beam's codes so far
    offsets = torch.as_tensor(vocab.offsets, device=device)
    for level in range(vocab.levels):
        step = F.log_softmax(decoder(paths, offsets).float(), -1)  # B x W x V
        size = vocab.sizes[level]
        children = trie.extend(level, prefix).reshape(batch, -1)  # B x (W x K)
        total = (score[..., None] + step[..., vocab.level_slice(level)]).reshape(batch, -1)
        total = total.masked_fill(~trie.allowed(level, children, remaining), float("-inf"))
        prefix, score, code, origin = _best(total, children, beams, size)
        paths = torch.cat([paths[rows, origin], code[..., None]], -1)
    return trie.item(prefix), score


def _best(scores: torch.Tensor, children: torch.Tensor, beams: int, size: int):
    """The ``beams`` best of the B x (W x K) scored extensions (-inf: not allowed): their prefix
    ids (-1: none left), scores, codes and the beam each extends."""
    k = min(beams, scores.shape[1])
    best, index = scores.topk(k, dim=1)
    if k < beams:  # fewer candidates than beams (a small first codebook): pad with dead beams
        best = F.pad(best, (0, beams - k), value=float("-inf"))
        index = F.pad(index, (0, beams - k), value=0)
    prefix = children.gather(1, index).masked_fill(best == float("-inf"), -1)
    return prefix, best, index % size, index // size


def banned_items(batch: dict[str, torch.Tensor], n_items: int) -> torch.Tensor:
    """B x (items + 1), True for each user's seen items, except the target (the atomic protocol
    keeps it rankable)."""
    banned = torch.zeros(batch["input_ids"].shape[0], n_items + 1, dtype=torch.bool, device=batch["input_ids"].device)
    banned.scatter_(1, batch["seen"], True)
    if "target" in batch:
        banned.scatter_(1, batch["target"][:, None], False)
    return banned


def ranks_in_list(items: torch.Tensor, target: torch.Tensor, n_items: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ahead, ties)`` of each target in its ranked list (``items``: B x beams, best first): its
    position, or the last rank when it is not in the list (HR and NDCG at K <= beams are exact,
    MRR is truncated at the beams)."""
    hit = items == target[:, None]
    position = hit.long().argmax(1)
    ahead = torch.where(hit.any(1), position, torch.full_like(position, n_items - 1))
    return ahead, torch.zeros_like(ahead)


class GenerativeStep(torch.nn.Module):
    """The exported step graph: ``full_query``'s inputs -> the logits at the ``read`` positions
    (B x reads x V); the beam search runs around it (``deploy/generative.py``)."""

    def __init__(self, backbone: PreTrainedModel):
        super().__init__()
        self.backbone = backbone

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                read: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, use_cache=False).last_hidden_state
        picked = hidden[:, read]
        # the head on a 2-D input: onnxruntime fuses a tied head's transpose into FusedMatMul
        # with batch transposes that its CPU kernel then refuses for a 3-D input
        logits = self.backbone.get_output_embeddings()(picked.reshape(-1, picked.shape[-1]))
        return logits.view(picked.shape[0], picked.shape[1], -1)


class GenerativeRecLitModule(RecLitModule):
    """Next-item generation over code tuples (``codes``: (items + 1) x L, row 0 the padding item).

    Training: causal cross-entropy on every code token of every next item of a window at once
    (``target='window'``, as the atomic model trains on every next item), or on the last item's
    tuple only (``'last'``, one target per prefix as LC-Rec and TIGER train). Ranking:
    ``constrained_beam_search`` with ``beams`` beams under both protocols.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        codes: torch.Tensor,
        codebook_sizes: Sequence[int],
        optim: OptimConfig | None = None,
        evaluation: EvaluationConfig | None = None,
        embedding_dropout: float = 0.0,
        target: str = "window",
    ):
        super().__init__(model, optim, evaluation, embedding_dropout)
        if target not in ("window", "last"):
            raise ValueError(f"target={target!r}; allowed: window, last")
        self.vocab = CodeVocabulary(codebook_sizes)
        vocab_size = model.get_input_embeddings().num_embeddings
        if vocab_size != self.vocab.size:
            raise ValueError(f"the decoder has {vocab_size} tokens; codes of {self.vocab.levels} levels x "
                             f"{list(self.vocab.sizes)} need {self.vocab.size} (padding + every code)")
        self.trie = ItemTrie(codes, self.vocab.sizes)
        self.per_level = PerLevelCodes(codes, self.vocab.sizes)
        # per protocol, the share of the test's returned tuples that are no item (per_level decoding)
        self.test_invalid = torch.nn.ModuleDict({p: MeanMetric() for p in ("seen_excluded", "seen_kept")})
        self.register_buffer("item_tokens", code_tokens(self.vocab, codes), persistent=False)
        self.target = target

    @property
    def n_items(self) -> int:
        return self.item_tokens.shape[0] - 1

    def sequence(self, batch: dict[str, torch.Tensor]) -> TokenSequence:
        """Each item of the left-padded window as its L code tokens, in order."""
        return code_sequence(self.item_tokens, batch["input_ids"], batch["attention_mask"])

    @staticmethod
    def _has_target(seq: TokenSequence) -> torch.Tensor:
        """The positions whose next token is a real one (what the decoder predicts)."""
        return seq.attention_mask[:, 1:].bool() & seq.attention_mask[:, :-1].bool()

    def _code_loss(self, batch: dict[str, torch.Tensor], last_only: bool) -> torch.Tensor:
        seq = self.sequence(batch)
        hidden = self.decode(seq)[:, :-1]
        has_target = self._has_target(seq)
        if last_only:  # the last item's L tokens only
            has_target[:, : -self.vocab.levels] = False
        logits = self.model.get_output_embeddings()(hidden[has_target])
        return F.cross_entropy(logits.float(), seq.input_ids[:, 1:][has_target])

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self._code_loss(batch, last_only=self.target == "last")

    def target_loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy of the held-out target's tuple after each user's history."""
        ids = torch.cat([batch["input_ids"], batch["target"][:, None]], 1)
        mask = torch.cat([batch["attention_mask"], torch.ones_like(batch["target"])[:, None]], 1)
        return self._code_loss({"input_ids": ids, "attention_mask": mask}, last_only=True)

    def predicted_logits(self, backbone: PreTrainedModel, last_hidden: torch.Tensor,
                         sequence: TokenSequence) -> tuple[torch.Tensor, torch.Tensor]:
        has_target = self._has_target(sequence)
        normed = backbone.base_model.norm(last_hidden)[:, :-1][has_target]
        return backbone.get_output_embeddings()(normed).float(), sequence.input_ids[:, 1:][has_target]

    def recommend(self, batch: dict[str, torch.Tensor], exclude_seen: bool,
                  decoding: str = "trie") -> tuple[torch.Tensor, torch.Tensor]:
        """The top ``evaluation.beams`` items after each history, best first, and their
        log-probabilities; seen items (except the target, as the atomic protocol keeps it
        rankable) excluded when asked. ``decoding``: see ``evaluation.decoding`` (item 0 for a
        tuple that is no item)."""
        banned = banned_items(batch, self.n_items) if exclude_seen else None
        constraint = {"trie": self.trie, "per_level": self.per_level}[decoding].to(self.item_tokens.device)
        return constrained_beam_search(self.model, self.vocab, constraint, self.sequence(batch),
                                       self.evaluation.beams, banned)

    def rank(self, batch: dict[str, torch.Tensor], exclude_seen: bool | None = None) -> TargetRanks:
        """The target's position in the beam list (a target outside the beams counts as ranked
        last: HR and NDCG at K <= beams are exact, MRR is truncated at the beams); one beam
        search per protocol asked for."""
        return TargetRanks(seen_excluded=self._ranks(batch, True) if exclude_seen in (None, True) else None,
                           seen_kept=self._ranks(batch, False) if exclude_seen in (None, False) else None)

    def _ranks(self, batch: dict[str, torch.Tensor], exclude_seen: bool) -> tuple[torch.Tensor, torch.Tensor]:
        trainer = self._trainer
        testing = trainer is not None and trainer.testing
        # validation selects the checkpoint: always on valid tuples (evaluation.decoding is the test's)
        items, scores = self.recommend(batch, exclude_seen, self.evaluation.decoding if testing else "trie")
        if testing:
            returned = torch.isfinite(scores)
            self.test_invalid["seen_excluded" if exclude_seen else "seen_kept"].update((items == 0)[returned].float())
        return ranks_in_list(items, batch["target"], self.n_items)

    def codes_fingerprint(self) -> str:
        return hashlib.sha256(self.item_tokens.cpu().numpy().tobytes()).hexdigest()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["item_codes_sha256"] = self.codes_fingerprint()

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        # a checkpoint of another index can have the same vocabulary size and load without a
        # shape error, while every item now means another tuple
        saved = checkpoint.get("item_codes_sha256")
        if saved is not None and saved != self.codes_fingerprint():
            raise ValueError(f"the checkpoint was trained on other item codes (sha256 {saved[:12]}) than this run's "
                             f"index ({self.codes_fingerprint()[:12]}): resume or test it with the index it was "
                             "trained on (RUN_DIR/<dataset>.index.json, semantic.index_path)")
        super().on_load_checkpoint(checkpoint)

    def on_test_epoch_end(self) -> None:
        super().on_test_epoch_end()
        for protocol, invalid in self.test_invalid.items():
            if invalid.update_called:
                self.log(f"test/{protocol}/invalid_tuples", invalid.compute())
            invalid.reset()

    def _longest_query(self, max_len: int) -> int:
        """Tokens of the longest step query: a full history, then every beam's tuple but its last code
        (onnxruntime's fused rotary embedding needs its cache that long)."""
        return max_len * self.vocab.levels + self.evaluation.beams * (self.vocab.levels - 1)

    def export_graph(self, backbone: PreTrainedModel, max_len: int) -> ExportGraph:
        """``GenerativeStep`` over ``backbone`` on example histories with two-code beams after them
        (history and beams as one query, no cache); ``expected``: the logits the evaluation's
        cached decoding gives the same beams."""
        left_ids, left_mask = example_inputs(self.n_items, max_len)
        history = self.sequence({"input_ids": left_ids, "attention_mask": left_mask})
        generator = torch.Generator().manual_seed(0)
        beams = self.evaluation.beams
        paths = torch.stack([torch.randint(0, size, (len(left_ids), beams), generator=generator)
                             for size in self.vocab.sizes[:2]], -1)
        offsets = torch.as_tensor(self.vocab.offsets)
        inputs = full_query(history, paths, offsets)
        with torch.no_grad():
            expected = CachedDecoder(backbone.eval(), history)(paths, offsets)
        batch = torch.export.Dim("batch", min=1, max=65536)
        length = torch.export.Dim("length", min=2, max=65536)
        reads = torch.export.Dim("reads", min=1, max=65536)
        return ExportGraph(GenerativeStep(backbone).eval(), inputs,
                           {"input_ids": {0: batch, 1: length}, "attention_mask": {0: batch, 2: length, 3: length},
                            "position_ids": {0: batch, 1: length}, "read": {0: reads}},
                           ["logits"], expected,
                           meta={"recommender": "generative", "codebook_sizes": list(self.vocab.sizes),
                                 "beams": beams, "max_positions": self._longest_query(max_len)},
                           item_fields={"codes": self.item_tokens[1:].sub(
                               torch.as_tensor(self.vocab.offsets)).tolist()})
