"""Convert a GGUF checkpoint into a plain safetensors model folder, once, and reuse it.

transformers de-quantises GGUF to float on every load (~20 s for SmolLM2-135M on 2 cores)
and refuses ``save_pretrained`` on the result, so we rebuild the model from a config without
``quantization_config``, copy the weights and save an ordinary folder (~2 s to load).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch

from recsys_compress.utils.fingerprint import content_fingerprint

log = logging.getLogger(__name__)


def convert_gguf(gguf_path: str | Path, cache_dir: str | Path) -> Path:
    """Return a safetensors folder for ``gguf_path``, converting it on first use.

    The folder name carries a fingerprint of the GGUF file's bytes (a fresh copy of the same
    file, with a new mtime, reuses the folder; an edited file gets a new one), and is written
    to a temporary folder first and renamed, so a half-written cache is never read.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise FileNotFoundError(
            f"GGUF model not found: {gguf_path} (set model.gguf_path, or model.pretrained_path "
            "to a Hugging Face folder)"
        )
    target = Path(cache_dir) / f"{gguf_path.stem}-{content_fingerprint(gguf_path, cache_dir)[:12]}"
    if (target / "config.json").is_file():
        return target

    log.info("converting %s to safetensors in %s (one-time)", gguf_path, target)
    folder, name = str(gguf_path.parent), gguf_path.name
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantised.state_dict(), strict=False)
    # A tied head is absent from the state dict by design; anything else is a real mismatch.
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"GGUF conversion mismatch: missing={missing} unexpected={unexpected}")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)

    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / "source.json").write_text(json.dumps({"gguf": str(gguf_path.resolve())}))
    try:
        tmp.rename(target)
    except OSError:  # another process finished first; its folder is complete
        shutil.rmtree(tmp, ignore_errors=True)
    return target
