"""The real SmolLM2-135M from ../shared/models: GGUF -> cached safetensors -> item LLM."""

import os
import shutil

import pytest
import torch
from transformers import AutoTokenizer

from conftest import SMOLLM2_GGUF as GGUF
from recsys_compress.models.gguf_cache import convert_gguf
from recsys_compress.models.item_llm import load_item_llm
from recsys_compress.models.lit_seqrec import SeqRecLitModule

# smollm2_folder: conftest's session fixture, the conversion of GGUF


def no_conversion(monkeypatch):
    """Make any GGUF conversion fail, so a test sees that the cached folder was used."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("converted the GGUF again")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)


def test_conversion_is_cached(smollm2_folder, monkeypatch):
    assert (smollm2_folder / "model.safetensors").is_file()
    no_conversion(monkeypatch)
    assert convert_gguf(GGUF, smollm2_folder.parent) == smollm2_folder


def test_a_fresh_copy_of_the_gguf_reuses_the_conversion(smollm2_folder, monkeypatch, tmp_path):
    """The shared models folder is copied anew with new mtimes: the same bytes, the same folder;
    other bytes, another folder."""
    copy = tmp_path / GGUF.name
    shutil.copyfile(GGUF, copy)
    os.utime(copy, (1_000_000_000, 1_000_000_000))
    no_conversion(monkeypatch)
    assert convert_gguf(copy, smollm2_folder.parent) == smollm2_folder
    with open(copy, "r+b") as f:  # one byte of the tensor data changed in place
        f.seek(-1, os.SEEK_END)
        last = f.read(1)
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last[0] ^ 1]))
    with pytest.raises(AssertionError, match="converted the GGUF again"):
        convert_gguf(copy, smollm2_folder.parent)


def test_missing_gguf_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="GGUF model not found: .*nope.gguf"):
        convert_gguf(tmp_path / "nope.gguf", tmp_path)


def test_text_initialised_item_llm(smollm2_folder):
    texts = ["", "Toy Story (1995). Genres: Animation, Children's, Comedy", "Heat (1995). Genres: Action, Crime"]
    model = load_item_llm(smollm2_folder, n_items=2, item_texts=texts, item_init="text")
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert all(m.training for m in model.modules())  # ready to fine-tune
    emb = model.get_input_embeddings().weight
    assert emb.shape == (3, 576)
    assert model.get_output_embeddings().weight is emb  # SmolLM2 ties its head

    # item 1 starts exactly at the mean of the LLM's token embeddings of its text
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(smollm2_folder).get_input_embeddings().weight
    ids = AutoTokenizer.from_pretrained(smollm2_folder)(texts[1], add_special_tokens=False)["input_ids"]
    torch.testing.assert_close(emb[1], original[ids].mean(0))
    assert torch.count_nonzero(emb[0]) == 0

    lit = SeqRecLitModule(model).eval()
    with torch.no_grad():
        scores = lit(torch.tensor([[1, 2]]), torch.ones(1, 2, dtype=torch.long))
    assert scores.shape == (1, 3) and torch.isfinite(scores).all()


def test_random_init_and_bad_init(smollm2_folder):
    model = load_item_llm(smollm2_folder, n_items=4, item_init="random")
    assert model.get_input_embeddings().weight.shape == (5, 576)
    with pytest.raises(ValueError, match="allowed: text, random"):
        load_item_llm(smollm2_folder, n_items=4, item_init="bert")
    with pytest.raises(FileNotFoundError, match="not a Hugging Face model folder"):
        load_item_llm(smollm2_folder.parent, n_items=4)
