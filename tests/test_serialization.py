import json

import pytest
import torch

from recsys_compress.compression.apply import compress_low_rank, prune_layers
from recsys_compress.compression.calibration import InputStats, select_linear_layers
from recsys_compress.compression.low_rank import LowRankLinear
from recsys_compress.compression.serialization import ArtefactMismatchError, load_compressed, save_compressed
from recsys_compress.models.item_llm import build_llama


def model_and_stats(n_items=40):
    torch.manual_seed(0)
    model = build_llama(n_items, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2, intermediate_size=64).eval()
    names = select_linear_layers(model)
    stats = {}
    for n in names:
        x = torch.randn(300, model.get_submodule(n).in_features, dtype=torch.float64)
        stats[n] = InputStats(x.T @ x, x.abs().sum(0), 300)
    return model, names, stats


@pytest.mark.parametrize("method", ["odllm", "wanda"])
def test_save_load_gives_identical_outputs(method, tmp_path):
    model, names, stats = model_and_stats()
    if method == "odllm":
        compress_low_rank(model, names, method, 0.4, stats)
    else:
        prune_layers(model, names, method, 0.4, stats)
    save_compressed(model, tmp_path / "m", {"method": method, "ratio": 0.4})
    loaded = load_compressed(tmp_path / "m")
    ids = torch.randint(1, 41, (3, 7))
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, model(input_ids=ids).logits, rtol=0, atol=0)
    if method == "odllm":
        assert isinstance(loaded.get_submodule(names[0]), LowRankLinear)
        assert loaded.get_submodule(names[1]).rank == model.get_submodule(names[1]).rank  # GQA k_proj
    assert json.loads((tmp_path / "m" / "compression.json").read_text())["method"] == method


def test_mismatched_artefact_fails_clearly(tmp_path):
    model, names, stats = model_and_stats()
    compress_low_rank(model, names, "svd", 0.4, stats)
    folder = save_compressed(model, tmp_path / "m")
    info = json.loads((folder / "compression.json").read_text())
    info["low_rank"][names[0]] += 1
    (folder / "compression.json").write_text(json.dumps(info))
    with pytest.raises(ArtefactMismatchError, match="(?s)does not match compression.json.*size mismatch"):
        load_compressed(folder)
    del info["low_rank"][names[0]]
    (folder / "compression.json").write_text(json.dumps(info))
    with pytest.raises(ArtefactMismatchError, match="does not match compression.json: missing"):
        load_compressed(folder)
    info["low_rank"]["model.layers.9.mlp.up_proj"] = 4
    (folder / "compression.json").write_text(json.dumps(info))
    with pytest.raises(ArtefactMismatchError, match="names layer model.layers.9.mlp.up_proj, which the architecture lacks"):
        load_compressed(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors is missing"):
        load_compressed(folder)


def test_non_finite_weight_names_the_layer():
    model, names, stats = model_and_stats()
    with torch.no_grad():
        model.get_submodule(names[3]).weight[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match=f"non-finite weight in layer {names[3]}"):
        compress_low_rank(model, names, "odllm", 0.5, stats)
