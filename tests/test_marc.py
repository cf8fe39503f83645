"""MARC: the bottleneck's KL, HSIC, the trainable LLM top, item-grouped batches, the task end to end."""

import json
import shutil

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file
from torch.utils.data import DataLoader, TensorDataset

from recsys_compress.ctr.config import CTRConfig
from recsys_compress.marc.config import MARCConfig
from recsys_compress.schema import ConfigError
from recsys_compress.marc.bottleneck import (VariationalBottleneck, hsic, informative_dims, kl_to_standard_normal,
                                             posterior_std)
from recsys_compress.representations.token_states import cached_token_states, llama_top, pooled, token_states
from recsys_compress.ctr.model import RepresentationCompressor
from recsys_compress.ctr.data import ItemGroupBatchSampler
from recsys_compress.representations.layer_means import extract_layer_means, load_encoder
from recsys_compress.marc.bottleneck import deployed_codes
from recsys_compress.tasks.runner import run_task
from recsys_compress.tasks.compose import compose_config


TEXTS = ["Toy Story (1995). Genres: Animation, Children", "Heat (1995). Genres: Action, Crime, Thriller",
         "Jumanji", "Grumpier Old Men (1995). Genres: Comedy, Romance"]


def test_kl_is_zero_exactly_when_q_is_the_prior():
    zeros = torch.zeros(3, 4)
    assert torch.equal(kl_to_standard_normal(zeros, zeros), torch.zeros(3))
    assert (kl_to_standard_normal(torch.full((3, 4), 0.1), zeros) > 0).all()
    assert (kl_to_standard_normal(zeros, torch.full((3, 4), -0.5)) > 0).all()
    mu, logvar = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert float(kl_to_standard_normal(mu, logvar)) == pytest.approx(0.5 * (1 + (torch.e - 1 - 1)))


def test_informative_dims_ranks_dimensions_by_their_kl_to_the_prior():
    mu = torch.tensor([[0.0, 2.0, 0.0, 0.5], [0.0, -2.0, 0.0, -0.5]])
    logvar = torch.tensor([[0.0, 0.0, -3.0, 0.0], [0.0, 0.0, -3.0, 0.0]])
    # KL per dimension: 0 (the prior), 2, (e^-3 - 1 + 3) / 2 = 1.0249, 0.125
    assert informative_dims(mu, logvar, 4).tolist() == [1, 2, 3, 0]
    assert informative_dims(mu, logvar, 2).tolist() == [1, 2]
    with pytest.raises(ValueError, match="k=5 dimensions requested from codes of width 4"):
        informative_dims(mu, logvar, 5)
    codes, sigma, kept = deployed_codes(mu, logvar, MARCConfig(dim=4, export_dims=2, deploy_noise=True))
    assert torch.equal(codes, mu[:, [1, 2]]) and torch.equal(sigma, posterior_std(logvar[:, [1, 2]]))
    assert kept.tolist() == [1, 2]
    codes, sigma, kept = deployed_codes(mu, logvar, MARCConfig(dim=4))
    assert torch.equal(codes, mu) and sigma is None and kept.tolist() == [0, 1, 2, 3]


def test_bottleneck_samples_in_training_and_returns_mu_in_eval():
    torch.manual_seed(0)
    vib = VariationalBottleneck(8, 3)
    h = torch.randn(5, 8)
    z, mu, logvar = vib(h)
    assert z.shape == mu.shape == logvar.shape == (5, 3) and not torch.equal(z, mu)
    vib.eval()
    z, mu, _ = vib(h)
    assert torch.equal(z, mu)


def test_hsic_separates_dependent_from_independent_variables():
    torch.manual_seed(0)
    x = torch.randn(300, 3)
    dependent, independent = float(hsic(x, x ** 2 + 0.01 * torch.randn_like(x))), float(hsic(x, torch.randn(300, 2)))
    assert dependent > 5 * independent and independent < 0.003


def test_trainable_top_over_cached_states_reproduces_the_full_model():
    encoder = load_encoder("llama_tiny", seed=0)
    full = extract_layer_means(encoder, TEXTS, progress=False)[-1]  # final layer, mean-pooled
    states, mask = token_states(encoder, TEXTS, layer=1, batch_size=3)  # entering the last block; 2 batches
    with torch.no_grad():
        torch.testing.assert_close(pooled(llama_top(encoder, 1).eval(), states, mask), full, rtol=1e-4, atol=1e-5)
        final_states, final_mask = token_states(encoder, TEXTS, layer=2)
        torch.testing.assert_close(pooled(None, final_states, final_mask), full, rtol=1e-4, atol=1e-5)
    encoder.model.config.pad_token_id = 2  # as in SmolLM2's config: must not reach the one-row token table
    assert len(llama_top(encoder, 2).layers) == 2
    with pytest.raises(ValueError, match="marc.trainable_layers=3 is out of range; allowed: 0..2"):
        llama_top(encoder, 3)
    with pytest.raises(ValueError, match="needs a LLaMA-architecture encoder; minilm is BertModel"):
        llama_top(load_encoder("minilm"), 1)


def test_token_states_cache_round_trips_and_is_keyed_by_layer(tmp_path):
    encoder = load_encoder("llama_tiny", seed=0)
    ids = [str(i) for i in range(len(TEXTS))]
    states, mask, hit, path = cached_token_states(encoder, "ds", ids, TEXTS, "T", 1, tmp_path, batch_size=3)
    assert not hit and path.is_file()
    direct = token_states(encoder, TEXTS, layer=1, batch_size=3)
    assert torch.equal(states, direct[0]) and torch.equal(mask, direct[1])
    again, again_mask, hit, same = cached_token_states(encoder, "ds", ids, TEXTS, "T", 1, tmp_path)
    assert hit and same == path and torch.equal(again, states) and torch.equal(again_mask, mask)
    for layer, template, other_ids in [(2, "T", ids), (1, "T2", ids), (1, "T", ids[::-1])]:
        _, _, hit, other = cached_token_states(encoder, "ds", other_ids, TEXTS, template, layer, tmp_path)
        assert not hit and other != path


def test_deployed_model_can_train_on_samples_of_the_exported_posterior():
    torch.manual_seed(0)
    mu = torch.randn(50, 4) * torch.tensor([0.1, 0.2, 0.5, 1.0])
    sigma = torch.rand(50, 4) + 0.5
    compressor = RepresentationCompressor(mu, "fixed", noise_std=sigma)
    items = torch.arange(50).repeat_interleave(2000)
    eps = (compressor.train()(items) - compressor.eval()(items)).view(50, 2000, 4)
    # training adds sigma * eps in the units of the standardised codes; evaluation sees the codes
    torch.testing.assert_close(eps.std(1), sigma / mu.std(0), rtol=0.06, atol=0)
    torch.testing.assert_close(compressor.eval()(torch.arange(50)), (mu - mu.mean(0)) / mu.std(0))
    with pytest.raises(ValueError, match="noise_std needs kind='fixed'"):
        RepresentationCompressor(mu, "linear", dim=2, noise_std=sigma)


def test_item_group_batches_cover_every_sample_once_grouped_by_item():
    items = torch.tensor([3, 1, 3, 0, 1, 1, 4, 3, 0])
    sampler = ItemGroupBatchSampler(items, items_per_batch=2, seed=0)
    batches = list(sampler)
    assert len(batches) == len(sampler) == 2  # 4 distinct items (2 is never rated), 2 per batch
    assert sorted(i for b in batches for i in b) == list(range(len(items)))
    for b in batches:
        assert len(set(items[b].tolist())) <= 2
    sampler.sampler.set_epoch(1)
    assert list(sampler) != batches  # a new order every epoch


def test_item_group_batch_order_follows_the_epoch_lightning_sets():
    from lightning.fabric.utilities.data import _set_sampler_epoch  # what the fit loop calls each epoch

    items = torch.arange(40) % 13

    def loader() -> DataLoader:
        return DataLoader(TensorDataset(items), batch_sampler=ItemGroupBatchSampler(items, 3, seed=5))

    uninterrupted = loader()
    epochs = []
    for epoch in range(3):
        _set_sampler_epoch(uninterrupted, epoch)
        epochs.append(list(uninterrupted.batch_sampler))
    assert epochs[0] != epochs[1] != epochs[2]
    resumed = loader()  # a run restarted from a checkpoint taken after epoch 1
    _set_sampler_epoch(resumed, 2)
    assert list(resumed.batch_sampler) == epochs[2]


FAST = ["task=marc", "representation=llama_tiny", "trainer.max_epochs=1", "logger=none", "ctr.batch_size=512"]


@pytest.mark.parametrize("variant", [["marc.trainable_layers=1"],
                                     ["marc.trainable_layers=2", "marc.finetune=lora", "marc.constraint=hsic"],
                                     ["marc.trainable_layers=0", "marc.dim=8", "ctr.split_by=item",
                                      "ctr.item_id_dropout=0.5", "marc.deploy_noise=true", "ctr.batch_by=item",
                                      "marc.export_dims=3"]])
def test_marc_task_end_to_end(variant, ml100k_slice, tmp_path):
    cfg = compose_config([*FAST, *variant, "dataset=ml_100k", f"dataset.path={ml100k_slice}",
                          f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "out")
    metrics = run_task(cfg)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("test/auc", "test/logloss", "marc/dim", "marc/kl", "time/extract_s", "time/train_s"):
        assert key in saved, key
    assert 0 <= saved["test/auc"] <= 1 and saved["marc/kl"] >= 0 and saved["repr/cache_hit"] == 0
    assert saved["ctr/batch_by"] == cfg.ctr.batch_by  # how the deployed model was trained
    stored = load_file(str(tmp_path / "out" / "item_codes.safetensors"))
    assert stored["mu"].shape == stored["logvar"].shape == (metrics["data/n_items"], saved["marc/dim"])
    assert saved["marc/export_dims"] == (cfg.marc.export_dims or cfg.marc.dim)
    exported = (informative_dims(stored["mu"], stored["logvar"], cfg.marc.export_dims) if cfg.marc.export_dims
                else torch.arange(cfg.marc.dim))
    assert torch.equal(stored["exported_dims"], exported)
    assert saved["marc/exported_kl"] <= saved["marc/kl"] + 1e-6
    # the deployment step again, on the exported codes, with another downstream setting
    (tmp_path / "out" / ".hydra").mkdir()
    OmegaConf.save(cfg, tmp_path / "out" / ".hydra" / "config.yaml")  # as Hydra does for train.py runs
    from recsys_compress.tasks import evaluate_codes

    changed = ["ctr.dropout=0.3", "++marc.deploy_noise=true"]  # the report reads "++" as the plain setting
    assert evaluate_codes.main([str(tmp_path / "out"), *changed]) == 0
    # the default output folder is named by the overrides, Hydra's grammar and all
    default_out = tmp_path / "out" / "evaluate_codes" / "ctr.dropout=0.3_++marc.deploy_noise=true"
    shutil.move(default_out, tmp_path / "again")
    again = json.loads((tmp_path / "again" / "metrics.json").read_text())
    assert 0 <= again["test/auc"] <= 1 and again["overrides"] == " ".join(changed)
    assert again["codes/dim"] == saved["marc/export_dims"]
    kept = OmegaConf.load(tmp_path / "again" / ".hydra" / "config.yaml")  # the settings it ran with
    assert kept.ctr.dropout == 0.3 and kept.marc.deploy_noise and kept.ctr.batch_by == cfg.ctr.batch_by
    # the same evaluation again into that folder replaces it: one set of checkpoints, not two
    first_checkpoints = sorted(p.name for p in (tmp_path / "again").rglob("*.ckpt"))
    assert evaluate_codes.main([str(tmp_path / "out"), *changed, "--out", str(tmp_path / "again")]) == 0
    assert sorted(p.name for p in (tmp_path / "again").rglob("*.ckpt")) == first_checkpoints
    from recsys_compress.reporting import report

    assert report.main([str(tmp_path / "out"), str(tmp_path / "again"), "--out", str(tmp_path / "report")]) == 0
    exported = f", its {cfg.marc.export_dims} most informative dims deployed" if cfg.marc.export_dims else ""
    assert (f"| MARC (llama_tiny, final layer, dim {cfg.marc.dim}, beta 0.001{exported}"
            in (tmp_path / "report" / "report.md").read_text())
    of = f", the most informative of {saved['marc/dim']}" if cfg.marc.export_dims else ""
    assert (f"| codes (llama_tiny, MARC, beta 0.001{of}, dim {saved['marc/export_dims']}), fresh CTR model with "
            f"ctr.dropout=0.3 marc.deploy_noise=true") in (tmp_path / "report" / "report.md").read_text()
    with pytest.raises(ConfigError, match=r"ctr.dropout=1.5 is out of range"):
        evaluate_codes.main([str(tmp_path / "out"), "ctr.dropout=1.5", "--out", str(tmp_path / "bad")])
    # Hydra's rule: a typo fails; a key the run's config lacks is added with +
    with pytest.raises(SystemExit, match=r"Could not override 'ctr.dropuot'.\nTo append to your config use "
                                         r"\+ctr.dropuot=0.3"):
        evaluate_codes.main([str(tmp_path / "out"), "ctr.dropuot=0.3", "--out", str(tmp_path / "bad")])
    added = evaluate_codes.run_config(tmp_path / "out", ["+trainer.val_check_interval=0.5", "ctr.dropout=0.2"],
                                      tmp_path / "added")
    assert added.trainer.val_check_interval == 0.5 and added.ctr.dropout == 0.2
    assert added.paths.output_dir == str(tmp_path / "added") and added.marc == cfg.marc


def test_marc_bad_inputs_fail_at_start(tmp_path):
    for bad, message in [("marc.beta=-1", "marc.beta=-1.0 is out of range; allowed: >= 0"),
                         ("marc.dim=0", "marc.dim=0 is out of range; allowed: >= 1"),
                         ("marc.constraint=mmd", "marc.constraint='mmd' is not allowed; allowed: none, hsic"),
                         ("marc.export_dims=33", "marc.export_dims=33 is out of range; allowed: null (all) or "
                                                 "1..marc.dim (32)")]:
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            run_task(compose_config([*FAST, bad], tmp_path))
    with pytest.raises(ConfigError, match="marc.trainable_layers=5 is out of range for llama_tiny; allowed: 0..2"):
        run_task(compose_config([*FAST, "marc.trainable_layers=5"], tmp_path))


def _marc_posterior_kl(beta: float) -> float:
    """Mean KL to the prior of every item's code after training MARC (frozen LLM) with ``beta``."""
    import lightning as L

    from recsys_compress.marc.marc_module import MARCModule

    L.seed_everything(0)
    n_items, n_users = 40, 20
    states, mask = torch.randn(n_items, 4, 8), torch.ones(n_items, 4, dtype=torch.long)
    users, items = torch.randint(0, n_users, (4000,)), torch.randint(0, n_items, (4000,))
    labels = (states[items, 0, 0] > 0).float()  # clicks the item representation explains
    module = MARCModule(None, states, mask, n_users, MARCConfig(dim=4, beta=beta, lr=1e-2), CTRConfig())
    L.Trainer(max_epochs=4, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0).fit(
        module, DataLoader(TensorDataset(users, items, labels), batch_size=250, shuffle=True))
    mu, logvar = module.item_codes()
    return float(kl_to_standard_normal(mu, logvar).mean())


def test_the_kl_weight_beta_pulls_marcs_posterior_towards_the_prior():
    # The loss is BCE + beta * KL: without beta the codes drift from the prior to carry the
    # label; with it they stay close to it. A loss that dropped the KL term gives equal figures.
    free, pulled = _marc_posterior_kl(0.0), _marc_posterior_kl(1.0)
    assert pulled < 0.25 * free, (pulled, free)
