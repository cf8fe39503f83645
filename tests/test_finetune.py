"""LoRA fine-tuning through PEFT (merged back into a stock model) and the item table's own rate."""

import csv
import json

import pytest
import torch

from conftest import SMALL, run_train
from recsys_compress.models.config import LoraSettings, OptimConfig
from recsys_compress.models.finetune import add_lora, has_lora, merge_lora
from recsys_compress.models.item_llm import build_llama
from recsys_compress.models.lit_seqrec import SeqRecLitModule

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_llama(n_items=30, hidden_size=16, num_layers=2, num_heads=2, max_len=10, dropout=0.0).eval()


def test_merged_lora_model_equals_the_unmerged_peft_model():
    model = tiny()
    stock_keys = set(model.state_dict())
    add_lora(model, LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=TARGETS))
    assert has_lora(model)
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: a merge of zero adapters proves nothing
            p.data.normal_(0, 0.5)
    trained = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trained and all("lora_" in n or "embed_tokens" in n for n in trained)
    ids = torch.randint(1, 31, (3, 7))
    with torch.no_grad():
        plain_base = tiny()(input_ids=ids).logits
        unmerged = model(input_ids=ids).logits
        assert (unmerged - plain_base).abs().max() > 1e-2  # the adapters change the outputs
        merge_lora(model)
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)
    assert set(model.state_dict()) == stock_keys and not has_lora(model)  # a stock LLaMA again
    assert all(p.requires_grad for p in model.parameters())


def test_lora_names_linears_the_model_does_not_have():
    with pytest.raises(ValueError, match=r"target_modules: \['qkv'\] are not linears.*q_proj"):
        add_lora(tiny(), LoraSettings(r=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "qkv"]))


def test_item_table_gets_its_own_learning_rate():
    lit = SeqRecLitModule(tiny(), OptimConfig(lr=1e-4, item_lr=3e-3, weight_decay=0.1))
    optimizer = lit.configure_optimizers()
    table = lit.model.get_input_embeddings().weight
    by_param = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    assert by_param[id(table)]["lr"] == 3e-3 and by_param[id(table)]["weight_decay"] == 0.0
    others = [g for g in optimizer.param_groups if all(p is not table for p in g["params"])]
    assert others and all(g["lr"] == 1e-4 for g in others)
    assert sum(len(g["params"]) for g in optimizer.param_groups) == len(list(lit.parameters()))
    default = SeqRecLitModule(tiny(), OptimConfig(lr=1e-4)).configure_optimizers()
    assert all(g["lr"] == 1e-4 for g in default.param_groups)


def test_lora_run_trains_adapters_and_stores_a_merged_stock_base_model(tmp_path):
    out = tmp_path / "run"
    result = run_train([
        "model=llama_tiny", "model.finetune=lora", "model.lora.r=4", "model.optim.item_lr=1e-2",
        "dataset=ml_latest_small", f"dataset.path={SMALL}", "trainer.max_epochs=2", "logger=csv",
        "compression=svd", "ratio=0.5", f"paths.cache_dir={tmp_path / 'cache'}", f"hydra.run.dir={out}",
    ])
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    full = build_llama(n_items=metrics["data/n_items"], hidden_size=64, num_layers=2, num_heads=2,
                       intermediate_size=256)
    n_table = full.get_input_embeddings().weight.numel()
    # exactly the item table and the adapters (rank 4: r (in + out) on 7 linears x 2 blocks), not the decoder
    assert metrics["params/trained"] == n_table + 2 * 4 * (4 * (64 + 64) + 3 * (64 + 256))
    from safetensors import safe_open

    [entry] = (tmp_path / "cache" / "base_models").iterdir()
    with safe_open(str(entry / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert not any("lora" in k or "base_layer" in k for k in keys)
    assert "model.layers.0.self_attn.q_proj.weight" in keys
    # every validation is timed: the curve of NDCG@10 against wall time
    from recsys_compress.reporting import training_curves

    assert training_curves.main([str(out), "--out", str(tmp_path / "curves.png")]) == 0
    with open(tmp_path / "curves.csv") as f:
        points = list(csv.DictReader(f))
    assert [int(p["epoch"]) for p in points] == [0, 1]
    assert 0 < float(points[0]["elapsed_s"]) < float(points[1]["elapsed_s"])
    assert float(points[1]["val/ndcg@10"]) == pytest.approx(metrics["val/best_ndcg@10"], abs=1e-6) \
        or float(points[0]["val/ndcg@10"]) == pytest.approx(metrics["val/best_ndcg@10"], abs=1e-6)
    # the saved points are drawn again, under their labels, beside a run (whose folder may be gone)
    assert training_curves.main([str(out), "--points", str(tmp_path / "curves.csv"), "--labels", "again",
                                 "--out", str(tmp_path / "both.png")]) == 0
    with open(tmp_path / "both.csv") as f:
        redrawn = list(csv.DictReader(f))
    assert redrawn == points + [{**p, "run": "again"} for p in points]
