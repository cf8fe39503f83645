"""The base-model cache: keyed by what determines the model, data contents included; a corrupt
entry is reported by path and rebuilt."""

from __future__ import annotations

import json
import logging
import os
import random

import pytest

from recsys_compress.models.base_cache import base_model_key
from recsys_compress.tasks.runner import run_task
from recsys_compress.tasks.compose import compose_config
from recsys_compress.utils.fingerprint import content_fingerprint

TINY = ["model.hidden_size=16", "model.intermediate_size=32", "dataset.max_len=20", "compression.calib_batches=2",
        "trainer.max_epochs=1", "logger=none", "evaluation.popularity_baseline=false"]


def write_sequences(path, reverse=False):
    rng = random.Random(0)
    lines = []
    for user in range(60):
        items = [str(rng.randrange(1, 50)) for _ in range(12)]
        lines.append(f"u{user} " + " ".join(reversed(items) if reverse else items) + "\n")
    path.write_text("".join(lines))


def test_the_fingerprint_sees_an_in_place_edit_of_equal_size_and_hashes_each_file_once(tmp_path):
    data, cache = tmp_path / "seq.txt", tmp_path / "cache"
    write_sequences(data)
    first = content_fingerprint(data, cache)
    assert content_fingerprint(data, cache) == first
    assert len(json.loads((cache / "fingerprints.json").read_text())) == 1  # remembered, not hashed again
    size = data.stat().st_size
    write_sequences(data, reverse=True)
    stat = data.stat()
    os.utime(data, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000))  # an editor's save: a new mtime
    assert data.stat().st_size == size and content_fingerprint(data, cache) != first
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "a.inter").write_text("x")
    before = content_fingerprint(folder, cache)
    (folder / "a.item").write_text("y")
    assert content_fingerprint(folder, cache) != before
    assert content_fingerprint(tmp_path / "absent", cache) is None


@pytest.mark.parametrize("override, same", [
    ("dataset.max_len=30", False), ("dataset.min_rating=4", False), ("model.hidden_size=32", False),
    ("model.optim.lr=0.01", False), ("trainer.max_epochs=3", False), ("evaluation.exclude_seen=false", False),
    ("seed=1", False), ("ckpt_path=null", False), ("callbacks.early_stopping.patience=3", False),
    ("model.finetune=lora", False), ("model.lora.r=4", False), ("model.optim.item_lr=0.01", False),
    ("trainer.precision=bf16-mixed", False), ("compression.allocation=global", True), ("compression=odllm", True), ("ratio=0.3", True), ("logger=csv", True), ("alignment=progressive", True),
    ("export.onnx=true", True), ("callbacks.progress_bar=null", True),
])
def test_the_cache_key_covers_each_part_that_determines_the_base_model(tmp_path, override, same):
    common = [*TINY, "compression=svd", f"paths.cache_dir={tmp_path / 'cache'}"]
    base, _ = base_model_key(compose_config(common, tmp_path / "a"))
    other, _ = base_model_key(compose_config([*common, override], tmp_path / "b"))
    assert (other == base) is same


def test_an_edited_data_file_misses_the_cache_and_a_corrupt_entry_is_reported_and_rebuilt(tmp_path, caplog):
    data, cache = tmp_path / "seq.txt", tmp_path / "cache"
    write_sequences(data)
    common = [*TINY, "dataset=sequence_text", f"dataset.path={data}", "compression=svd",
              f"paths.cache_dir={cache}"]
    first = run_task(compose_config(common, tmp_path / "1"))
    again = run_task(compose_config(common, tmp_path / "2"))
    assert (first["base/cache_hit"], again["base/cache_hit"]) == (0, 1)

    write_sequences(data, reverse=True)  # the same size, other contents
    edited = run_task(compose_config(common, tmp_path / "3"))
    assert edited["base/cache_hit"] == 0 and edited["base/cache_key"] != first["base/cache_key"]
    assert edited["base/test/ndcg@10"] != first["base/test/ndcg@10"]  # measured on the new data

    entry = cache / "base_models" / edited["base/cache_key"]
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a truncated write
    with caplog.at_level(logging.WARNING):
        rebuilt = run_task(compose_config(common, tmp_path / "4"))
    assert f"the cached base model {entry} is unreadable (SafetensorError" in caplog.text
    assert "base_cache=false bypasses the cache" in caplog.text
    assert rebuilt["base/cache_hit"] == 0 and rebuilt["base/test/ndcg@10"] == edited["base/test/ndcg@10"]
    assert run_task(compose_config(common, tmp_path / "5"))["base/cache_hit"] == 1  # sound again


def test_a_callback_switched_off_is_another_base_model(tmp_path):
    common = [*TINY, "compression=svd", f"paths.cache_dir={tmp_path / 'cache'}"]
    base, _ = base_model_key(compose_config(common, tmp_path / "a"))
    off, _ = base_model_key(compose_config([*common, "callbacks.early_stopping=null"], tmp_path / "b"))
    assert off != base
