"""Proxy fine-tuning: the LLM's final layer trained to a compact representation (MARC's setting).

The MARC paper finds the mid-layer advantage after an LLM has been fine-tuned with a proxy
objective that compresses its final layer: the final layer specialises in the proxy task and
middle layers then serve a downstream CTR model better. Here the last ``trainable_layers``
blocks of the LLM (over the cached hidden states entering them, as ``task=marc`` trains them)
and a compression head to ``dim`` on the mean-pooled final layer (``CompressionHead``) learn one of:

- ``contrastive``: InfoNCE between a user's representation (the LLM over the text of the
  user's profile and recent training-split items) and that of an item the user rated
  positively; the other items of the batch are the negatives (an item that occurs twice in a
  batch is then also a negative of itself: rare with thousands of items, and left in);
- ``mrl``: the same on the nested prefixes dim, dim/2, ..., dim/2^(levels-1) of the code
  (Matryoshka representation learning), the prefix losses summed;
- ``cosine``: cosine-similarity regression (Sentence-BERT's ``CosineSimilarityLoss``, on
  in-batch pairs): the cosine of a user's code to its positive item's is regressed to 1, to the
  batch's other items to 0 (``cosine_regression``; no temperature);
- ``ntp``: next-token prediction continued on the domain text, the texts of the batch's users
  and items (``next_token_loss``), read out through the frozen input embeddings (SmolLM2 ties
  them to its LM head). It defines no code, so the head is fitted after training as the
  principal components of the standardised pooled final layer of the training split's items
  (``pca_head``): the d-dimensional linear summary of the final layer that keeps most variance.

The trained blocks are saved (``save_proxy_encoder``) and replace the pretrained ones wherever
``representation.encoder_run`` names the run (``apply_proxy_encoder``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file
from torch import nn

from recsys_compress.representations.config import PROXY_ENCODER_FORMAT, ProxyConfig, mrl_prefixes
from recsys_compress.schema import ConfigError
from recsys_compress.representations.layer_means import Encoder, item_texts, split_user_texts
from recsys_compress.representations.token_states import cached_token_states, pooled, text_tokens



def info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float) -> torch.Tensor:
    """Mean cross-entropy of row i's cosine similarities (/ temperature) to every key, where
    ``keys[i]`` is its positive and the other rows its negatives."""
    logits = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T / temperature
    return F.cross_entropy(logits, torch.arange(len(queries), device=queries.device))


def cosine_regression(queries: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Squared error of the cosines to 1 for the pairs ``(queries[i], keys[i])`` and to 0 for
    every other pair of the batch, each kind averaged on its own and the two weighted equally (a
    batch has b positives and b(b-1) negatives: unweighted, "all 0" would already be near optimal)."""
    cosines = F.normalize(queries, dim=-1) @ F.normalize(keys, dim=-1).T
    positive = torch.eye(len(cosines), dtype=torch.bool, device=cosines.device)
    return 0.5 * (cosines[positive] - 1).square().mean() + 0.5 * cosines[~positive].square().mean()


def next_token_loss(hidden: torch.Tensor, tokens: torch.Tensor, mask: torch.Tensor,
                    readout: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of predicting token t+1 from the final-layer state at t, over the
    positions where both are real tokens; logits are ``hidden @ readout.T``."""
    target = mask[:, 1:].bool()
    logits = hidden[:, :-1][target] @ readout.T
    return F.cross_entropy(logits.float(), tokens[:, 1:][target])


class ProxyTexts(NamedTuple):
    """What the proxy reads: every item's text and every user's training-split text
    (``representation.users``' texts), the items without text and a description of the user texts."""
    items: list[str]
    users: list[str]
    missing: int
    counts: dict[str, Any]


def proxy_texts(data: Any, rep: Any) -> ProxyTexts:
    """The item and user texts of ``data`` under ``rep``'s templates (built once per run: the
    token states and, for ``ntp``, the token ids are laid out from the same texts)."""
    texts, missing = item_texts(data.item_ids, data.item_info, rep.template)
    user_texts, counts = split_user_texts(data, rep.user_template, rep.user_history)
    return ProxyTexts(texts, user_texts, missing, counts)


def proxy_token_ids(encoder: Encoder, texts: ProxyTexts, rep: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The token ids of the item and user texts, laid out as ``proxy_token_states``' states."""
    return (text_tokens(encoder, texts.items, rep.max_tokens)[0],
            text_tokens(encoder, texts.users, rep.user_max_tokens)[0])


def proxy_token_states(encoder: Encoder, data: Any, texts: ProxyTexts, rep: Any, dataset_name: str, below: int,
                       cache_dir: str | Path) -> tuple[tuple, tuple]:
    """The cached token states entering block ``below`` of every item's and every user's text
    (``texts``, of ``data``'s items and users in order). Returns ``(items, users)``, each
    ``cached_token_states``' (states, mask, cache hit, path)."""
    items = cached_token_states(encoder, dataset_name, data.item_ids, texts.items, rep.template, below, cache_dir,
                                rep.batch_size, rep.max_tokens)
    users = cached_token_states(encoder, f"{dataset_name}/users", data.user_ids, texts.users,
                                f"{rep.user_template}|history={rep.user_history}", below, cache_dir, rep.batch_size,
                                rep.user_max_tokens, key_texts=True)
    return items, users


def chance_loss(objective: str, batch_size: int, levels: int, vocab_size: int = 0) -> float:
    """The least proxy loss codes that carry no information reach (every cosine the same):
    ln(batch) per InfoNCE term; for ``cosine`` 0.25 (every cosine 1/2); for ``ntp`` the uniform
    prediction's ln(vocabulary) (a pretrained LLM starts far below it: compare with the loss
    before training)."""
    if objective == "cosine":
        return 0.25
    if objective == "ntp":
        return math.log(vocab_size)
    return (levels if objective == "mrl" else 1) * math.log(batch_size)


def matryoshka_info_nce(queries: torch.Tensor, keys: torch.Tensor, temperature: float, levels: int) -> torch.Tensor:
    """The sum of ``info_nce`` over the nested prefixes of the codes."""
    return sum(info_nce(queries[:, :d], keys[:, :d], temperature) for d in mrl_prefixes(queries.shape[1], levels))


def held_out_pairs(split: tuple[torch.Tensor, ...], limit: int, batch_size: int,
                   seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Up to ``limit`` positive (user, item) pairs of a split, shuffled by ``seed``, in whole batches."""
    users, items, labels = split
    positives = (labels > 0.5).nonzero().squeeze(1)
    order = positives[torch.randperm(len(positives), generator=torch.Generator().manual_seed(seed))]
    keep = min(limit, len(order)) // batch_size * batch_size
    if keep == 0:
        raise ConfigError(f"proxy.batch_size={batch_size} exceeds the {len(order)} positive validation pairs")
    return users[order[:keep]], items[order[:keep]]


class CompressionHead(nn.Module):
    """Pooled final-layer states -> ``dim``: batch normalisation, then one linear map.

    SmolLM2's mean-pooled final layer is dominated by one direction (the first token's massive
    activation): on ML-1M items the mean cosine between two items is 0.995, and 0.004 once the
    mean is removed. Under a cosine InfoNCE the raw states start at chance and stay there (300
    steps, loss 12.4 = 3 ln 64 throughout); normalising each feature over the batch removes that
    direction. Users and items get their own normalisation (their statistics differ), the linear
    map is shared; deployed item codes use the item side's running statistics.
    """

    def __init__(self, hidden: int, dim: int):
        super().__init__()
        self.user_norm, self.item_norm = nn.BatchNorm1d(hidden), nn.BatchNorm1d(hidden)
        self.linear = nn.Linear(hidden, dim)

    def forward(self, pooled: torch.Tensor, side: str) -> torch.Tensor:
        return self.linear((self.item_norm if side == "item" else self.user_norm)(pooled))


class ProxyModule(L.LightningModule):
    """The trainable top blocks and the compression head, trained on (user, item) positives.

    ``ntp`` also takes the texts' token ids (``proxy_token_ids``) and the frozen ``readout``
    matrix [vocab, hidden]."""

    def __init__(self, top: nn.Module, hidden: int, item_states: torch.Tensor, item_mask: torch.Tensor,
                 user_states: torch.Tensor, user_mask: torch.Tensor, proxy: Any,
                 item_tokens: torch.Tensor | None = None, user_tokens: torch.Tensor | None = None,
                 readout: torch.Tensor | None = None):
        super().__init__()
        self.top, self.head = top, CompressionHead(hidden, proxy.dim)
        self.proxy = proxy
        # cached inputs of the top, kept on the CPU; a step moves only its rows
        self.item_states, self.item_mask = item_states, item_mask
        self.user_states, self.user_mask = user_states, user_mask
        self.item_tokens, self.user_tokens = item_tokens, user_tokens
        if proxy.objective == "ntp":
            if readout is None or item_tokens is None or user_tokens is None:
                raise ValueError("proxy.objective=ntp needs the texts' token ids and the readout matrix")
            self.register_buffer("readout", readout.detach().clone(), persistent=False)
        self.losses: list[float] = []

    def _next_token_loss(self, states: torch.Tensor, mask: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        width = int(mask.sum(1).max())
        states, mask, tokens = (t[:, :width].to(self.device) for t in (states, mask, tokens))
        hidden = self.top(inputs_embeds=states, attention_mask=mask, use_cache=False).last_hidden_state
        return next_token_loss(hidden, tokens, mask, self.readout)

    def encode(self, states: torch.Tensor, mask: torch.Tensor, side: str) -> torch.Tensor:
        """Codes ``[rows, dim]``: the head on the mean-pooled output of the top blocks."""
        return self.head(pooled(self.top, states.to(self.device), mask.to(self.device)), side)

    def loss(self, users: torch.Tensor, items: torch.Tensor) -> torch.Tensor:
        users, items = users.cpu(), items.cpu()
        if self.proxy.objective == "ntp":  # the batch's texts, users' and items' weighted equally
            return 0.5 * (self._next_token_loss(self.user_states[users], self.user_mask[users], self.user_tokens[users])
                          + self._next_token_loss(self.item_states[items], self.item_mask[items],
                                                  self.item_tokens[items]))
        u = self.encode(self.user_states[users], self.user_mask[users], "user")
        i = self.encode(self.item_states[items], self.item_mask[items], "item")
        p = self.proxy
        if p.objective == "mrl":
            return matryoshka_info_nce(u, i, p.temperature, p.mrl_levels)
        if p.objective == "cosine":
            return cosine_regression(u, i)
        return info_nce(u, i, p.temperature)

    @torch.no_grad()
    def held_out_loss(self, users: torch.Tensor, items: torch.Tensor) -> float:
        """The proxy loss, in eval mode, averaged over consecutive batches of ``batch_size``
        (user, item) pairs: the training objective measured on pairs it never saw."""
        was = self.training
        self.eval()
        b = self.proxy.batch_size
        losses = [float(self.loss(users[s:s + b], items[s:s + b])) for s in range(0, len(users) - b + 1, b)]
        self.train(was)
        return sum(losses) / len(losses)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self.loss(*batch)
        self.log("proxy/loss", loss, prog_bar=True, batch_size=len(batch[0]))
        self.losses.append(float(loss.detach()))
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW([{"params": self.top.parameters(), "lr": self.proxy.llm_lr},
                                  {"params": self.head.parameters(), "lr": self.proxy.lr}])

    @torch.no_grad()
    def pooled_final(self, side: str, rows: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
        """Mean-pooled final-layer states ``[len(rows), hidden]`` of items or users, in eval mode."""
        was = self.training
        self.eval()
        states, mask = (self.item_states, self.item_mask) if side == "item" else (self.user_states, self.user_mask)
        out = torch.cat([pooled(self.top, states[r].to(self.device), mask[r].to(self.device)).cpu()
                         for r in rows.split(batch_size)])
        self.train(was)
        return out

    @torch.no_grad()
    def pca_head(self, items: torch.Tensor, users: torch.Tensor) -> None:
        """Make the head the principal components of the standardised pooled final layer of
        ``items`` (each side's normalisation from its own rows): for objectives that train no code."""
        for side, rows, norm in (("item", items, self.head.item_norm), ("user", users, self.head.user_norm)):
            x = self.pooled_final(side, rows)
            norm.running_mean.copy_(x.mean(0))
            norm.running_var.copy_(x.var(0))
            norm.weight.fill_(1.0)
            norm.bias.zero_()
            if side == "item":
                z = (x - x.mean(0)) / (x.var(0) + norm.eps).sqrt()
                components = torch.linalg.svd(z, full_matrices=False).Vh[: self.proxy.dim]
                self.head.linear.weight.copy_(components)
                self.head.linear.bias.zero_()

    @torch.no_grad()
    def item_codes(self, batch_size: int = 256) -> torch.Tensor:
        """The deployed code ``[n_items, dim]`` of every item."""
        was = self.training
        self.eval()  # the head's item normalisation from its running statistics
        pooled_items = self.pooled_final("item", torch.arange(len(self.item_states)), batch_size)
        codes = self.head(pooled_items.to(self.device), "item").cpu()
        self.train(was)
        return codes


def save_proxy_encoder(folder: Path, module: ProxyModule, encoder: Encoder, info: dict[str, Any]) -> Path:
    """``folder/encoder``: the trained blocks and final norm (``blocks.safetensors``), the head
    (``head.safetensors``) and ``encoder.json`` (what they were trained on, and from which
    pretrained weights)."""
    out = Path(folder) / "encoder"
    out.mkdir(parents=True, exist_ok=True)
    blocks = {k: v.detach().cpu().contiguous() for k, v in module.top.state_dict().items()
              if k.startswith(("layers.", "norm."))}
    save_file(blocks, str(out / "blocks.safetensors"))
    save_file({k: v.detach().cpu().contiguous() for k, v in module.head.state_dict().items()},
              str(out / "head.safetensors"))
    (out / "encoder.json").write_text(json.dumps({
        "format": PROXY_ENCODER_FORMAT, "base_fingerprint": encoder.fingerprint(), "n_layers": encoder.n_layers,
        "trainable_layers": len(module.top.layers), **info}, indent=2) + "\n")
    return out


def encoder_info(run_dir: str | Path) -> tuple[Path, dict[str, Any]]:
    """A task=proxy run's encoder folder and its ``encoder.json``."""
    folder = Path(run_dir) / "encoder"
    return folder, json.loads((folder / "encoder.json").read_text())


def apply_proxy_encoder(encoder: Encoder, run_dir: str | Path) -> Encoder:
    """``encoder`` with its last blocks and final norm replaced by those a task=proxy run
    trained; the weights change, so every representation cache keys anew."""
    folder, info = encoder_info(run_dir)
    if info["base_fingerprint"] != encoder.fingerprint():
        raise ValueError(f"representation.encoder_run={run_dir} was fine-tuned from other pretrained weights "
                         f"(fingerprint {info['base_fingerprint']}, this encoder {encoder.fingerprint()})")
    n, k = encoder.n_layers, info["trainable_layers"]
    model = encoder.model
    remapped = {}
    for key, value in load_file(str(folder / "blocks.safetensors")).items():
        if key.startswith("layers."):
            index, rest = key.removeprefix("layers.").split(".", 1)
            key = f"layers.{n - k + int(index)}.{rest}"
        remapped[key] = value
    missing = set(remapped) - set(model.state_dict())
    if missing:
        raise ValueError(f"{folder}/blocks.safetensors has weights the encoder lacks: {sorted(missing)[:5]}")
    model.load_state_dict(remapped, strict=False)
    return encoder


def load_proxy_head(run_dir: str | Path) -> CompressionHead:
    """The compression head a task=proxy run trained, in eval mode (item codes: ``head(x, "item")``)."""
    folder, info = encoder_info(run_dir)
    state = load_file(str(folder / "head.safetensors"))
    head = CompressionHead(state["linear.weight"].shape[1], info["dim"])
    head.load_state_dict(state)
    return head.eval()


def settings_off_default(settings: dict[str, Any]) -> list[str]:
    """``key=value`` for each proxy training setting that differs from ``ProxyConfig``'s default.
    A proxy run stores this list in its ``encoder.json`` when it finishes, so its label keeps the
    defaults of the day it was trained."""
    return [f"{k}={v}" for k, v in settings.items()
            if k not in ("objective", "val_pairs")  # in the label already / not a training setting
            and k in ProxyConfig.model_fields and v != ProxyConfig.model_fields[k].default]


def encoder_label(model: str, encoder_run: str | None) -> str:
    """What a run records as its representation encoder (``repr/encoder``): the pretrained
    model, or that model after a proxy run's fine-tuning, named by the objective and the proxy
    settings that differed from the defaults when it was trained (``encoder.json``; a run from
    before that was recorded is compared with today's defaults through its ``run_config.yaml``).
    The seed is not part of it, so ``report.py`` pools the proxy runs of one configuration over
    seeds into one curve; a run without either record is named by its folder."""
    if not encoder_run:
        return model
    _, info = encoder_info(encoder_run)
    changed = info.get("settings_off_default")
    if changed is None:
        saved = Path(encoder_run) / "run_config.yaml"
        if not saved.is_file():
            return f"{model} + {info['objective']} proxy ({Path(encoder_run).name})"
        changed = settings_off_default(OmegaConf.to_container(OmegaConf.load(saved).proxy))
    return f"{model} + {info['objective']} proxy" + (f" ({', '.join(changed)})" if changed else "")
