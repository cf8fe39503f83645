"""The sequential-recommendation LLM: a Hugging Face causal LM whose vocabulary is the items.

Item index i is token i (0 is padding), the input embedding table is the item embedding
table, and the (tied) output head scores every item, so next-item prediction is exactly
causal language modelling over item "sentences". The result is a stock
``PreTrainedModel``: compression, saving and export see an ordinary LLaMA.
"""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM, PreTrainedModel


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions count from each sequence's first real item, so left padding is invisible."""
    return (attention_mask.cumsum(-1) - 1).clamp(min=0)


def build_llama(
    n_items: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 2,
    num_kv_heads: int | None = None,
    intermediate_size: int | None = None,
    max_len: int = 50,
    dropout: float = 0.1,
    tie_embeddings: bool = True,
    rope_theta: float = 10000.0,
) -> LlamaForCausalLM:
    """A LLaMA built from scratch over ``n_items`` items (+ padding)."""
    config = LlamaConfig(
        vocab_size=n_items + 1,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads or num_heads,
        max_position_embeddings=max(max_len + 1, 64),
        attention_dropout=dropout,
        tie_word_embeddings=tie_embeddings,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
        rope_theta=rope_theta,
    )
    return LlamaForCausalLM(config)


@torch.no_grad()
def text_embeddings(
    embedding: torch.nn.Embedding, tokenizer, texts: list[str], batch_size: int = 512
) -> torch.Tensor:
    """Mean of the LLM's input embeddings over each text's tokens (empty text -> zeros)."""
    out = torch.zeros(len(texts), embedding.embedding_dim)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        enc = tokenizer(chunk, add_special_tokens=False)["input_ids"]
        for row, ids in enumerate(enc):
            if ids:
                out[start + row] = embedding.weight[torch.as_tensor(ids)].float().mean(0)
    return out


def load_item_llm(
    path: str | Path,
    n_items: int,
    item_texts: list[str] | None = None,
    item_init: str = "text",
    dtype: torch.dtype = torch.float32,
) -> PreTrainedModel:
    """A pretrained causal LM from a local folder, re-headed for ``n_items`` items.

    ``item_init='text'`` starts item i from the mean of the LLM's token embeddings of its
    text (title, year, genres), so the pretrained model sees familiar vectors; ``'random'``
    uses the model's own initialiser.
    """
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model.pretrained_path={path} is not a Hugging Face model folder (no config.json)"
        )
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    old = model.get_input_embeddings()
    new = torch.nn.Embedding(n_items + 1, old.embedding_dim, padding_idx=0, dtype=old.weight.dtype)
    if item_init == "text":
        if item_texts is None or len(item_texts) != n_items + 1:
            raise ValueError("item_init='text' needs one text per item index (0 = padding)")
        tokenizer = AutoTokenizer.from_pretrained(path)
        new.weight.data.copy_(text_embeddings(old, tokenizer, item_texts))
    elif item_init == "random":
        std = getattr(model.config, "initializer_range", 0.02)
        new.weight.data.normal_(0.0, std)
        new.weight.data[0].zero_()
    else:
        raise ValueError(f"model.item_init={item_init!r}; allowed: text, random")
    model.set_input_embeddings(new)
    model.config.vocab_size = n_items + 1
    model.config.pad_token_id = 0
    model.config.bos_token_id = None
    model.config.eos_token_id = None
    if getattr(model.config, "tie_word_embeddings", False):
        out = model.get_output_embeddings()
        out.weight = new.weight
        out.out_features = n_items + 1
    else:
        head = torch.nn.Linear(old.embedding_dim, n_items + 1, bias=False, dtype=new.weight.dtype)
        head.weight.data.copy_(new.weight.data)
        model.set_output_embeddings(head)
    # from_pretrained returns eval mode; Lightning keeps module modes, so fine-tuning would
    # silently run without the model's dropout.
    return model.train()


def count_parameters(model: torch.nn.Module) -> int:
    """Unique parameters (a tied head is counted once), int8-quantised linears included."""
    from torch.ao.nn.quantized.dynamic import Linear as QuantizedLinear

    total = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    for module in model.modules():
        if isinstance(module, QuantizedLinear):  # packed weights are not nn.Parameters
            bias = module.bias()
            total += module.in_features * module.out_features + (bias.numel() if bias is not None else 0)
    return total


def count_nonzero_parameters(model: torch.nn.Module) -> int:
    """Parameters that are not exactly zero (what pruning keeps)."""
    return sum(int(torch.count_nonzero(p)) for p in {id(p): p for p in model.parameters()}.values())


def serialized_megabytes(model: torch.nn.Module) -> float:
    """Bytes of the saved state dict in MiB: packed int8 weights count as stored, shared
    (tied) tensors once, and pruned zeros at full dense size, as a checkpoint stores them."""
    import io

    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.tell() / 2**20
