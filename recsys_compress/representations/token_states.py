"""The trainable top of the LLM for MARC: the last k decoder blocks over cached hidden states.

Training the whole LLM end to end on a CTR task is out of reach on a CPU; MARC only needs
the representation to adapt, so the hidden states entering block L-k are computed once for
every item's tokens and only blocks L-k..L-1 (and the final norm) run, with gradients, at
each step. ``LlamaTop`` is a ``LlamaModel`` of k layers sharing those blocks' modules, so
masks and rotary positions are built exactly as in the full model (items are right-padded:
real tokens keep positions 0..n-1 and never attend to padding under the causal mask).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaModel

from recsys_compress.representations.layer_means import Encoder, cache_entry, list_digest, load_or_build


def llama_top(encoder: Encoder, k: int) -> LlamaModel:
    """A deep copy of the last ``k`` blocks and the final norm of a LLaMA encoder, as a model."""
    model = encoder.model
    if not isinstance(model, LlamaModel):
        raise ValueError(f"marc.trainable_layers > 0 needs a LLaMA-architecture encoder; {encoder.name} is "
                         f"{type(model).__name__} (use marc.trainable_layers=0 to keep it frozen)")
    n = model.config.num_hidden_layers
    if not 1 <= k <= n:
        raise ValueError(f"marc.trainable_layers={k} is out of range; allowed: 0..{n}")
    config = copy.deepcopy(model.config)
    # Inputs are hidden states: a one-row token table, and no padding id to point into it.
    config.num_hidden_layers, config.vocab_size, config.pad_token_id = k, 1, None
    top = LlamaModel(config)
    top.layers = copy.deepcopy(model.layers[n - k:])
    top.norm = copy.deepcopy(model.norm)
    top.rotary_emb = copy.deepcopy(model.rotary_emb)
    return top.train()


def text_tokens(encoder: Encoder, texts: Sequence[str], max_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` of the texts, right-padded to the longest: the token positions the cached
    states of ``token_states`` are laid out in."""
    enc = encoder.tokenizer(list(texts), padding="longest", truncation=True, max_length=max_tokens,
                            return_tensors="pt")
    return enc["input_ids"], enc["attention_mask"]


@torch.no_grad()
def token_states(
    encoder: Encoder, texts: Sequence[str], layer: int, batch_size: int = 64, max_tokens: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states entering block ``layer`` for every token of every text, right-padded.

    Returns ``(states [n_texts, T, hidden], mask [n_texts, T])``.
    """
    from tqdm.auto import tqdm

    ids, mask = text_tokens(encoder, texts, max_tokens)
    states = torch.zeros(*ids.shape, encoder.model.config.hidden_size)
    # Batches of similar length waste little compute on padding; rows keep their order.
    order = torch.argsort(mask.sum(1), stable=True)
    for start in tqdm(range(0, len(texts), batch_size), desc=f"{encoder.name} states below the trainable top",
                      unit="batch"):
        rows = order[start:start + batch_size]
        width = int(mask[rows].sum(1).max())
        hidden = encoder.model(input_ids=ids[rows, :width], attention_mask=mask[rows, :width],
                               output_hidden_states=True).hidden_states
        states[rows, :width] = hidden[layer].float()
    return states, mask


def cached_token_states(
    encoder: Encoder, dataset: str, item_ids: Sequence[str], texts: Sequence[str], template: str, layer: int,
    cache_dir: str | Path, batch_size: int = 64, max_tokens: int = 64, key_texts: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, bool, Path]:
    """``token_states`` of the items, cached on disk like the layer means (same key: encoder
    fingerprint, dataset, exact item list, template, max_tokens; plus the layer), so MARC runs
    that differ only in what they train (seed, beta, dim, split) compute them once.

    Returns ``(states, mask, cache_hit, path)``.
    """
    extra = {"kind": "token_states", "layer": str(layer)}
    if key_texts:  # texts that depend on more than the template (user texts: the split, the history)
        extra["texts"] = list_digest(texts)
    path, meta = cache_entry(encoder, dataset, item_ids, template, max_tokens, cache_dir, extra)

    def build() -> dict[str, torch.Tensor]:
        states, mask = token_states(encoder, texts, layer, batch_size, max_tokens)
        return {"states": states, "mask": mask}

    tensors, hit = load_or_build(path, meta, build)
    return tensors["states"], tensors["mask"], hit, path


def pooled(top: nn.Module | None, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over real tokens of ``top(states)`` (or of ``states`` themselves when top is None)."""
    width = int(mask.sum(1).max())
    states, mask = states[:, :width], mask[:, :width]
    if top is not None:
        states = top(inputs_embeds=states, attention_mask=mask, use_cache=False).last_hidden_state
    m = mask.unsqueeze(-1).to(states.dtype)
    return (states * m).sum(1) / m.sum(1).clamp(min=1)
