"""Proxy fine-tuning: the objectives' losses, the task end to end, and the encoder it saves as
every representation consumer reads it (representation.encoder_run)."""

import json
import math
import shutil
import subprocess

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from recsys_compress.tasks.builders import build_ctr_datamodule, build_encoder
from recsys_compress.representations.config import ProxyConfig
from recsys_compress.schema import ConfigError
from recsys_compress.tasks.config import validate_marc, validate_probe
from recsys_compress.representations.layer_means import cache_entry, extract_layer_means, item_texts
from recsys_compress.representations.layer_means import load_encoder
from recsys_compress.representations.proxy import (ProxyModule, chance_loss, cosine_regression, encoder_label,
                                                   held_out_pairs, info_nce, load_proxy_head, matryoshka_info_nce,
                                                   mrl_prefixes, next_token_loss)
from recsys_compress.representations.token_states import llama_top
from recsys_compress.tasks.runner import run_task
from recsys_compress.tasks.compose import compose_config


FAST = ["representation=llama_tiny", "trainer.max_epochs=1", "logger=none", "ctr.batch_size=512", "dataset=ml_100k"]
PROXY = ["task=proxy", *FAST, "proxy.steps=30", "proxy.batch_size=32", "proxy.lr=1e-2", "proxy.llm_lr=1e-3"]


def test_info_nce_equals_a_hand_computed_example():
    queries = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [3.0, 3.0]])  # cosines: row 0 -> (1, 1/sqrt 2), row 1 -> (0, 1/sqrt 2)
    c = 1 / math.sqrt(2)
    t = 0.5
    row0 = -math.log(math.exp(1 / t) / (math.exp(1 / t) + math.exp(c / t)))
    row1 = -math.log(math.exp(c / t) / (math.exp(0) + math.exp(c / t)))
    assert float(info_nce(queries, keys, t)) == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_cosine_regression_equals_a_hand_computed_example():
    queries = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    keys = torch.tensor([[1.0, 0.0], [3.0, 3.0]])  # cosines: row 0 -> (1, 1/sqrt 2), row 1 -> (0, 1/sqrt 2)
    c = 1 / math.sqrt(2)
    positives = ((1 - 1) ** 2 + (c - 1) ** 2) / 2  # (0, 0) and (1, 1)
    negatives = (c ** 2 + 0 ** 2) / 2  # (0, 1) and (1, 0)
    assert float(cosine_regression(queries, keys)) == pytest.approx(0.5 * positives + 0.5 * negatives, rel=1e-6)
    # codes that carry no information reach at best chance_loss (every cosine 1/2)
    same = torch.ones(4, 3)
    assert float(cosine_regression(same, same)) == pytest.approx(0.5)
    half = torch.tensor([[1.0, 0.0]] * 4), torch.tensor([[0.5, math.sqrt(0.75)]] * 4)
    assert float(cosine_regression(*half)) == pytest.approx(chance_loss("cosine", 4, 1))


def test_next_token_loss_equals_a_hand_computed_example():
    hidden = torch.tensor([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]],
                           [[0.0, 1.0], [9.0, 9.0], [9.0, 9.0]]])
    tokens = torch.tensor([[0, 1, 2], [2, 0, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])  # row 1's last position is padding
    readout = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])  # logits = hidden @ readout.T

    def ce(logits, target):
        return -logits[target] + math.log(sum(math.exp(v) for v in logits))

    # predicted: row 0 t0 -> token 1, row 0 t1 -> token 2, row 1 t0 -> token 0 (t1 -> padding: skipped)
    expected = (ce([1.0, 0.0, 1.0], 1) + ce([0.0, 2.0, 2.0], 2) + ce([0.0, 1.0, 1.0], 0)) / 3
    assert float(next_token_loss(hidden, tokens, mask, readout)) == pytest.approx(expected, rel=1e-6)
    assert chance_loss("ntp", 64, 3, vocab_size=49152) == pytest.approx(math.log(49152))


def test_the_ntp_head_is_the_principal_components_of_the_items_final_layer():
    """ntp trains no code: pca_head makes the deployed item code the projection of the
    standardised pooled final layer on its principal directions (uncorrelated, variance descending)."""
    torch.manual_seed(0)
    encoder = load_encoder("llama_tiny")
    top = llama_top(encoder, 1).eval()
    states, mask = torch.randn(40, 6, 32), torch.ones(40, 6, dtype=torch.long)
    mask[::3, 4:] = 0
    proxy = type("P", (), {"dim": 8, "objective": "ntp"})()
    module = ProxyModule(top, 32, states, mask, states[:10], mask[:10], proxy, item_tokens=mask, user_tokens=mask,
                         readout=torch.randn(5, 32))
    module.pca_head(torch.arange(40), torch.arange(10))
    codes = module.item_codes().double()
    variance = codes.var(0)
    covariance = codes.T.cov()
    assert torch.allclose(covariance - torch.diag(variance), torch.zeros(8, 8, dtype=torch.double), atol=1e-3)
    assert bool((variance[:-1] >= variance[1:] - 1e-5).all())
    # the first component keeps at least an 8th of 8 components' variance, and no direction beats it
    with torch.no_grad():
        x = module.pooled_final("item", torch.arange(40)).double()
    z = (x - x.mean(0)) / (x.var(0) + 1e-5).sqrt()
    best = torch.linalg.svd(z, full_matrices=False).S[0] ** 2 / 39
    assert float(variance[0]) == pytest.approx(float(best), rel=1e-3)


def test_mrl_is_the_sum_of_its_prefix_losses():
    generator = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 16, generator=generator), torch.randn(6, 16, generator=generator)
    assert mrl_prefixes(16, 3) == [16, 8, 4]
    expected = sum(float(info_nce(q[:, :d], k[:, :d], 0.1)) for d in (16, 8, 4))
    assert float(matryoshka_info_nce(q, k, 0.1, 3)) == pytest.approx(expected, rel=1e-6)
    assert float(matryoshka_info_nce(q, k, 0.1, 1)) == pytest.approx(float(info_nce(q, k, 0.1)), rel=1e-6)
    with pytest.raises(ValueError, match=r"proxy.dim=12 is not divisible by 2\^\(proxy.mrl_levels-1\) = 8"):
        mrl_prefixes(12, 4)


def test_chance_loss_and_held_out_pairs():
    assert chance_loss("mrl", 64, 3) == pytest.approx(3 * math.log(64))
    assert chance_loss("contrastive", 64, 3) == pytest.approx(math.log(64))
    users, items = torch.arange(10), torch.arange(100, 110)
    labels = torch.tensor([1.0, 0, 1, 1, 0, 1, 1, 1, 0, 1])
    u, i = held_out_pairs((users, items, labels), limit=5, batch_size=2, seed=0)
    assert len(u) == 4 and bool((labels[u] > 0.5).all()) and torch.equal(i, u + 100)
    assert len(set(u.tolist())) == 4
    u_all, _ = held_out_pairs((users, items, labels), limit=100, batch_size=3, seed=0)
    assert len(u_all) == 6  # 7 positives, in whole batches of 3
    with pytest.raises(ConfigError, match="proxy.batch_size=8 exceeds the 7 positive validation pairs"):
        held_out_pairs((users, items, labels), limit=100, batch_size=8, seed=0)


@pytest.fixture
def proxy_run(request, ml100k_slice, tmp_path):
    objective = getattr(request, "param", "mrl")
    out = tmp_path / "proxy"
    cfg = compose_config([*PROXY, f"proxy.objective={objective}", f"dataset.path={ml100k_slice}",
                          f"paths.cache_dir={tmp_path / 'cache'}"], out)
    return run_task(cfg), out, ml100k_slice, tmp_path


def check_trained_and_deployed(metrics, out):
    assert metrics["proxy/last_loss"] < metrics["proxy/first_loss"]
    assert 0 <= metrics["test/auc"] <= 1 and metrics["proxy/pairs"] > 0
    # the held-out loss is measured on whole validation batches, before and after training
    assert metrics["proxy/val_pairs"] > 0 and metrics["proxy/val_pairs"] % 32 == 0
    assert math.isfinite(metrics["proxy/val_loss"]) and metrics["proxy/val_loss"] != metrics["proxy/val_loss_before"]
    assert load_file(str(out / "item_codes.safetensors"))["mu"].shape[1] == 32
    assert {p.name for p in (out / "encoder").iterdir()} == {"blocks.safetensors", "head.safetensors", "encoder.json"}


@pytest.mark.parametrize("proxy_run", ["contrastive", "cosine", "ntp"], indirect=True)
def test_contrastive_cosine_and_ntp_train_their_loss_decreases_and_their_code_is_deployed(proxy_run, request):
    metrics, out = proxy_run[:2]
    check_trained_and_deployed(metrics, out)
    objective = request.node.callspec.params["proxy_run"]
    if objective == "cosine":
        # the cosine regression's loss is at most 0.5 * 2^2 + 0.5 * 1^2; InfoNCE starts near ln 32
        assert metrics["proxy/chance_loss"] == 0.25 and metrics["proxy/first_loss"] <= 2.5
    if objective == "ntp":
        # a random LLaMA over MiniLM's 30,522 tokens starts near uniform prediction
        assert metrics["proxy/chance_loss"] == pytest.approx(math.log(30522))
        assert abs(metrics["proxy/first_loss"] - math.log(30522)) < 1.0
        weight = load_proxy_head(out).linear.weight  # principal directions: orthonormal rows
        torch.testing.assert_close(weight @ weight.T, torch.eye(32), atol=1e-4, rtol=0)


def test_mrl_trains_and_its_saved_encoder_read_through_encoder_run_gives_the_trained_states(proxy_run):
    metrics, out, data, tmp_path = proxy_run
    check_trained_and_deployed(metrics, out)
    overrides = ["task=mra_probe", *FAST, f"dataset.path={data}", f"paths.cache_dir={tmp_path / 'cache'}"]
    pretrained = validate_probe(compose_config(overrides, tmp_path / "a"))
    finetuned = validate_probe(compose_config([*overrides, f"representation.encoder_run={out}"], tmp_path / "b"))
    base = build_encoder(pretrained.representation, tmp_path / "cache", pretrained.seed)
    encoder = build_encoder(finetuned.representation, tmp_path / "cache", finetuned.seed)
    # the head on the fine-tuned final layer, as every consumer now computes it, is the code the
    # proxy run exported from its trained module (over the cached states below its top)
    splits = build_ctr_datamodule(finetuned).data
    texts, _ = item_texts(splits.item_ids, splits.item_info, finetuned.representation.template)
    final = extract_layer_means(encoder, texts, progress=False)[-1]
    with torch.no_grad():
        codes = load_proxy_head(out)(final, "item")
    torch.testing.assert_close(codes, load_file(str(out / "item_codes.safetensors"))["mu"], atol=2e-4, rtol=1e-4)
    # the cache keys on the weights: a probe of the fine-tuned encoder never reads the pretrained cache
    args = ("ml_100k", splits.item_ids, finetuned.representation.template, 64, tmp_path / "cache")
    assert cache_entry(base, *args)[0] != cache_entry(encoder, *args)[0]
    # the token embeddings below the trained blocks stay pretrained; the final layer moved
    before, after = extract_layer_means(base, texts[:5], progress=False), extract_layer_means(encoder, texts[:5],
                                                                                              progress=False)
    torch.testing.assert_close(before[0], after[0], rtol=0, atol=0)
    assert not torch.allclose(before[-1], after[-1], atol=1e-3)
    # MARC on the encoder starts its trainable top from the blocks and norm the proxy trained
    marc_run = validate_marc(compose_config(["task=marc", *overrides[1:], f"representation.encoder_run={out}"],
                                            tmp_path / "marc"))
    top = llama_top(build_encoder(marc_run.representation, tmp_path / "cache", marc_run.seed),
                    marc_run.marc.trainable_layers).state_dict()
    saved = load_file(str(out / "encoder" / "blocks.safetensors"))
    assert marc_run.marc.trainable_layers == 2 and any(k.startswith("layers.1.") for k in saved)
    for key, value in saved.items():
        torch.testing.assert_close(top[key], value, rtol=0, atol=0, msg=key)
    assert not torch.equal(llama_top(base, 2).state_dict()["layers.1.mlp.down_proj.weight"],
                           saved["layers.1.mlp.down_proj.weight"])

    # the report's curve label: the objective and the settings off their defaults, not the seed,
    # so the runs of one proxy configuration pool over seeds and other settings stay apart
    label = "llama_tiny + mrl proxy (steps=30, batch_size=32, llm_lr=0.001)"
    assert encoder_label("llama_tiny", str(out)) == label
    # the settings off their defaults are those of the day it was trained (encoder.json): a later
    # change of a default does not rename a finished run
    with pytest.MonkeyPatch.context() as m:
        m.setattr(ProxyConfig.model_fields["steps"], "default", 30)
        assert encoder_label("llama_tiny", str(out)) == label
    # a run from before encoder.json recorded them: compared with today's defaults (run_config.yaml)
    info = json.loads((out / "encoder" / "encoder.json").read_text())
    del info["settings_off_default"]
    for name, key, value, same in [("seed", "seed", 7, True), ("steps", "proxy.steps", 31, False)]:
        other = tmp_path / f"other_{name}"
        shutil.copytree(out / "encoder", other / "encoder")
        (other / "encoder" / "encoder.json").write_text(json.dumps(info))
        saved = OmegaConf.load(out / "run_config.yaml")
        OmegaConf.update(saved, key, value)
        OmegaConf.save(saved, other / "run_config.yaml")
        assert (encoder_label("llama_tiny", str(other)) == label) == same, name
    # the report draws the proxy's deployed code as a reference line under that name
    from recsys_compress.reporting import report

    assert report.main([str(out), "--out", str(tmp_path / "report")]) == 0
    assert f"| {label}: its deployed code, dim 32 | {metrics['test/auc']:.4f} |" \
        in (tmp_path / "report" / "report.md").read_text()
    # a fresh CTR model on codes of a run that read the encoder is named by that encoder too, so the
    # report pairs it with that encoder's probes
    from recsys_compress.tasks import evaluate_codes

    probe_cfg = compose_config([*overrides, f"representation.encoder_run={out}", "probe.layer=2"], tmp_path / "p2")
    run_task(probe_cfg)
    (tmp_path / "p2" / ".hydra").mkdir()
    OmegaConf.save(probe_cfg, tmp_path / "p2" / ".hydra" / "config.yaml")  # as Hydra does for train.py runs
    assert evaluate_codes.main([str(tmp_path / "p2"), "--out", str(tmp_path / "p2_codes")]) == 0
    assert json.loads((tmp_path / "p2_codes" / "metrics.json").read_text())["repr/encoder"] == label
    check_wandb_groups_probe_runs_by_encoder(overrides, out, tmp_path)
    # bad input fails at start, naming the problem
    probe = ["task=mra_probe", *FAST, f"dataset.path={data}", f"paths.cache_dir={tmp_path / 'cache'}"]
    for override, message in [
        (f"representation.encoder_run={tmp_path / 'nowhere'}", "does not exist"),
        (f"representation.encoder_run={tmp_path}", r"holds no encoder \(.*encoder.json is missing\)"),
        ("ctr.split_by=item", r"was trained on other data or another split \(ctr.split_by: encoder 'time', "
                              r"this run 'item'"),
    ]:
        extra = [override] if "encoder_run" in override else [override, f"representation.encoder_run={out}"]
        with pytest.raises(ConfigError, match=message):
            validate_probe(compose_config([*probe, *extra], tmp_path / "bad"))
    for override, message in [("proxy.objective=larr", "proxy.objective='larr' is not allowed; allowed: contrastive, mrl, cosine, ntp"),
                              ("proxy.dim=30", r"proxy.dim=30 is not divisible by 2\^\(proxy.mrl_levels-1\) = 4"),
                              (f"representation.encoder_run={out}", "it starts from the pretrained model")]:
        with pytest.raises(ConfigError, match=message):
            run_task(compose_config([*PROXY, "proxy.objective=mrl", override, f"dataset.path={data}"], tmp_path / "x"))


def check_wandb_groups_probe_runs_by_encoder(overrides, out, tmp_path):
    """The offline W&B run of a probe.layer=all run of the fine-tuned encoder, as `wandb leet
    inspect` reads it: named, grouped and tagged by that encoder, with the per-layer table and
    the curve; probe runs of one encoder at other layers share the group and differ in config."""
    from omegaconf import OmegaConf

    probe = [*[o for o in overrides if o != "logger=none"], f"representation.encoder_run={out}"]
    metrics = run_task(compose_config([*probe, "logger=wandb", "probe.layer=all"], tmp_path / "wandb_all"))
    run_dir = next((tmp_path / "wandb_all" / "wandb").glob("offline-run-*"))
    inspect = ["wandb", "leet", "inspect", "--json"]
    summary = json.loads(subprocess.run([*inspect, "--summary", str(run_dir)], capture_output=True, text=True,
                                        timeout=120, check=True).stdout)
    records = [json.loads(line) for line in subprocess.run([*inspect, str(run_dir)], capture_output=True, text=True,
                                                           timeout=120, check=True).stdout.splitlines()]
    run_record = next(r["run"] for r in records if r["type"] == "run")
    assert run_record["run_group"] == "ml_100k-llama_tiny+proxy"
    assert summary["name"] == "mra_probe-ml_100k-llama_tiny+proxy" and summary["tags"] == ["ml_100k", "llama_tiny+proxy"]
    assert summary["config"]["probe"]["layer"] == "all"
    assert summary["config"]["representation"]["encoder_run"] == str(out)
    logged = summary["summary"]
    assert logged["probe/mra_curve_table"]["nrows"] == 3 and logged["probe/layers_table"]["nrows"] == 3
    for layer in range(3):
        assert logged[f"layers/{layer}/test/auc"] == pytest.approx(metrics[f"layers/{layer}/test/auc"], rel=1e-6)
    groups = {OmegaConf.select(compose_config([*probe, "logger=wandb", f"probe.layer={layer}"], tmp_path / "c"),
                               "logger.wandb.group", throw_on_missing=True) for layer in (0, 2)}
    pretrained = compose_config([*overrides, "logger=wandb"], tmp_path / "c").logger.wandb.group
    assert groups == {"ml_100k-llama_tiny+proxy"} and pretrained == "ml_100k-llama_tiny"


@pytest.mark.parametrize("task,subject", [("task=mra_probe", "minilm"), ("task=marc", "minilm"),
                                          ("task=proxy", "minilm"), ("task=train", "llama_tiny")])
def test_a_runs_wandb_name_and_tags_name_what_it_is_about(task, subject, tmp_path):
    from omegaconf import OmegaConf

    cfg = compose_config([task, "representation=minilm", "logger=wandb"] if task != "task=train"
                         else [task, "logger=wandb"], tmp_path)
    wandb = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
    assert wandb["name"] == f"{task.split('=')[1]}-ml_latest_small-{subject}"
    assert wandb["tags"] == ["ml_latest_small", subject] and wandb["group"] == f"ml_latest_small-{subject}"


def test_the_head_sweep_script_prints_one_row_per_setting(ml100k_slice, tmp_path, capsys):
    import proxy_head_sweep

    assert proxy_head_sweep.main(["--temperatures", "0.2", "--lrs", "1e-2", "--steps", "100", *FAST,
                                  "proxy.batch_size=32", f"dataset.path={ml100k_slice}",
                                  f"paths.cache_dir={tmp_path / 'cache'}"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| 0.2 |")]
    assert len(rows) == 2  # fixed and learned temperature
    fixed, learned = ([float(v) for v in row.split("|")[4:8]] for row in rows)
    assert all(math.isfinite(v) for v in fixed + learned)
    assert fixed[0] == learned[0]  # the same untrained head on the same held-out pairs
    assert fixed[3] == 0.2 and learned[3] != 0.2  # only the learned temperature moves
