"""Representation extraction and cache, CTR splits and metrics, and the MRA probe task."""

import json
import statistics

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file

from recsys_compress.schema import ConfigError
from recsys_compress.data.readers import ItemInfo
from recsys_compress.ctr.data import CTRDataModule, build_ctr_splits
from recsys_compress.ctr.model import CTRLitModule, DCNv2, RepresentationCompressor, pca_projection
from recsys_compress.representations.layer_means import (
    cached_layer_means,
    extract_layer_means,
    item_texts,
    load_encoder,
    user_texts,
)
from recsys_compress.tasks.runner import run_task
from recsys_compress.tasks.compose import compose_config

from conftest import SMALL

TEXTS = ["Toy Story (1995). Genres: Animation, Children", "Heat (1995). Genres: Action, Crime, Thriller",
         "Jumanji", "Grumpier Old Men (1995). Genres: Comedy, Romance", "Item 77"]


@pytest.fixture(scope="module")
def encoder():
    return load_encoder("llama_tiny", seed=0)


def test_extraction_gives_every_layer_of_every_item_and_matches_a_direct_forward(encoder):
    reps = extract_layer_means(encoder, TEXTS, batch_size=2, progress=False)
    assert reps.shape == (encoder.n_layers + 1, len(TEXTS), 32)
    for i, text in enumerate(TEXTS):  # one text at a time: no padding at all
        enc = encoder.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            hidden = encoder.model(**enc, output_hidden_states=True).hidden_states
        direct = torch.stack([h[0].mean(0) for h in hidden])
        torch.testing.assert_close(reps[:, i], direct, rtol=1e-4, atol=1e-5)


def test_minilm_sentence_encoder_loads_from_the_pip_package():
    minilm = load_encoder("minilm")
    reps = extract_layer_means(minilm, TEXTS[:2], progress=False)
    assert reps.shape == (7, 2, 384)  # embeddings + 6 layers


def test_cache_round_trips_and_is_keyed_by_model_dataset_items_and_template(encoder, tmp_path):
    ids = [str(i) for i in range(len(TEXTS))]
    first, hit, path = cached_layer_means(encoder, "ds", ids, TEXTS, "T1", tmp_path)
    assert not hit and path.is_file()
    again, hit, same = cached_layer_means(encoder, "ds", ids, TEXTS, "T1", tmp_path)
    assert hit and same == path and torch.equal(first, again)
    other_model = load_encoder("llama_tiny", seed=1)
    for args in [(encoder, "ds", ids, TEXTS, "T2"), (encoder, "other", ids, TEXTS, "T1"),
                 (encoder, "ds", ids[::-1], TEXTS[::-1], "T1"), (other_model, "ds", ids, TEXTS, "T1")]:
        _, hit, other = cached_layer_means(*args, tmp_path)
        assert not hit and other != path
    assert len(list((tmp_path / "representations").glob("*.safetensors"))) == 5


def test_items_without_text_are_counted_and_fall_back_to_their_id():
    infos = {"1": ItemInfo("Toy Story (1995)", "1995", ["Animation"]), "2": ItemInfo(None)}
    texts, missing = item_texts(["1", "2", "3"], infos, "{title}. Genres: {genres}")
    assert texts == ["Toy Story (1995). Genres: Animation", "Item 2", "Item 3"] and missing == 2


def test_ctr_split_is_per_user_and_in_time_order():
    data = build_ctr_splits("grouplens_csv", str(SMALL), threshold=4.0)
    train, val, test = (data.splits[k] for k in ("train", "val", "test"))
    total = sum(len(s[2]) for s in (train, val, test))
    assert total == 100836 and len(data.user_ids) == 610 and len(data.item_ids) == 9724
    assert abs(len(train[2]) / total - 0.8) < 0.01 and abs(len(test[2]) / total - 0.1) < 0.01
    # the first user's ratings: the file is in (user, time) order only by chance, so check by time
    import csv

    with open(SMALL / "ratings.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["userId"] == "1"]
    rows.sort(key=lambda r: int(r["timestamp"]))
    n_train = round(len(rows) * 0.8)
    expected_train = [data.item_ids.index(r["movieId"]) for r in rows[:n_train]]
    got_train = train[1][train[0] == 0].tolist()
    assert got_train == expected_train
    labels = [float(float(r["rating"]) >= 4.0) for r in rows[:n_train]]
    assert train[2][train[0] == 0].tolist() == labels


def test_item_split_keeps_validation_and_test_items_out_of_training():
    data = build_ctr_splits("grouplens_csv", str(SMALL), threshold=4.0, split_by="item", seed=3)
    items = {k: set(data.splits[k][1].tolist()) for k in ("train", "val", "test")}
    assert not items["train"] & items["val"] and not items["train"] & items["test"]
    assert not items["val"] & items["test"]
    # every rating is kept, with its label, in the part of its item; items split 80/10/10
    time_split = build_ctr_splits("grouplens_csv", str(SMALL), threshold=4.0)
    assert sum(len(data.splits[k][2]) for k in data.splits) == 100836
    assert sum(float(data.splits[k][2].sum()) for k in data.splits) == sum(
        float(time_split.splits[k][2].sum()) for k in time_split.splits)
    n = len(data.item_ids)  # items with ratings: parts hold those of their items that were rated
    assert len(items["train"]) + len(items["val"]) + len(items["test"]) == n == 9724
    assert abs(len(items["train"]) / n - 0.8) < 0.01 and abs(len(items["test"]) / n - 0.1) < 0.01
    # seeded: the same seed gives the same partition, another seed another one
    again = build_ctr_splits("grouplens_csv", str(SMALL), threshold=4.0, split_by="item", seed=3)
    other = build_ctr_splits("grouplens_csv", str(SMALL), threshold=4.0, split_by="item", seed=4)
    assert torch.equal(again.splits["test"][1], data.splits["test"][1])
    assert set(other.splits["test"][1].tolist()) != items["test"]
    with pytest.raises(ValueError, match="split_by='user'; allowed: time, item"):
        build_ctr_splits("grouplens_csv", str(SMALL), split_by="user")


def test_item_grouped_batches_hold_every_training_sample_of_a_few_items():
    data = build_ctr_splits("grouplens_csv", str(SMALL), threshold=4.0, split_by="item", seed=3)
    train_items = data.splits["train"][1]
    dm = CTRDataModule(data, batch_size=1000, seed=0, batch_by="item", items_per_batch=50)
    batches = list(dm.train_dataloader())
    n_items = len(torch.unique(train_items))
    assert len(batches) == -(-n_items // 50)
    assert sum(len(b[2]) for b in batches) == len(train_items)  # every sample once per epoch
    seen: set[int] = set()
    for users, items, labels in batches:
        distinct = set(items.tolist())
        assert len(distinct) <= 50 and not distinct & seen  # an item's samples all come in one batch
        assert len(items) == int(torch.isin(train_items, items).sum())
        seen |= distinct
    again = [b[1] for b in CTRDataModule(data, seed=0, batch_by="item", items_per_batch=50).train_dataloader()]
    assert all(torch.equal(a, b[1]) for a, b in zip(again, batches))  # seeded
    by_sample = list(CTRDataModule(data, batch_size=1000, seed=0).train_dataloader())
    assert len(by_sample) == -(-len(train_items) // 1000)
    with pytest.raises(ValueError, match="batch_by='user'; allowed: sample, item"):
        CTRDataModule(data, batch_by="user")


def test_items_unseen_in_training_score_from_their_features_alone():
    data = build_ctr_splits("grouplens_csv", str(SMALL), threshold=4.0, split_by="item", seed=3)
    known = data.known_items()
    assert torch.equal(known.nonzero().squeeze(1), torch.unique(data.splits["train"][1]))
    torch.manual_seed(0)
    model = DCNv2(n_users=3, n_items=len(known), feature_dim=4, known_items=known).eval()
    cold, warm = int(data.splits["test"][1][0]), int(data.splits["train"][1][0])
    users, features = torch.tensor([0, 1]), torch.randn(2, 4)
    before = model(users, torch.tensor([cold, warm]), features)
    with torch.no_grad():
        model.item.weight[[cold, warm]] += 1.0  # only the warm item's id embedding is used
    after = model(users, torch.tensor([cold, warm]), features)
    assert after[0] == before[0] and after[1] != before[1]


def test_item_id_dropout_zeroes_that_fraction_of_id_embeddings_in_training():
    torch.manual_seed(0)
    model = DCNv2(n_users=1, n_items=10, feature_dim=0, item_id_dropout=0.3)
    items = torch.randint(0, 10, (20000,))
    dropped = (model.item_embedding(items) == 0).all(-1).float().mean()
    assert abs(float(dropped) - 0.3) < 0.015
    assert not (model.eval().item_embedding(items) == 0).all(-1).any()  # evaluation keeps every id
    no_ids = DCNv2(n_users=1, n_items=10, feature_dim=0, item_id_dropout=1.0)
    for mode in (no_ids.train(), no_ids.eval()):
        assert not mode.item_embedding(items).any()
    with pytest.raises(ValueError, match=r"item_id_dropout=1.5 must lie in \[0, 1\]"):
        DCNv2(n_users=1, n_items=10, feature_dim=0, item_id_dropout=1.5)


def test_auc_and_logloss_match_a_hand_example():
    lit = CTRLitModule(RepresentationCompressor(None, "none"), n_users=1, n_items=4)
    logits = torch.tensor([-2.0, 0.5, 0.2, 1.5])
    labels = torch.tensor([0.0, 0.0, 1.0, 1.0])
    lit.forward = lambda users, items: logits
    lit._eval((torch.zeros(4, dtype=torch.long), torch.arange(4), labels), "test")
    # positive/negative pairs ranked correctly: (0.2 > -2), (1.5 > -2), (1.5 > 0.5); wrong: (0.2 < 0.5)
    assert float(lit.auc["test"].compute()) == pytest.approx(3 / 4)
    p = torch.sigmoid(logits)
    hand = -(torch.log(1 - p[0]) + torch.log(1 - p[1]) + torch.log(p[2]) + torch.log(p[3])) / 4
    assert float(lit.logloss["test"].compute()) == pytest.approx(float(hand), rel=1e-6)


def test_pca_features_are_decorrelated_with_unit_variance():
    torch.manual_seed(0)
    reps = torch.randn(500, 20) @ torch.randn(20, 20)
    compressor = RepresentationCompressor(reps, "pca", dim=5)
    feats = compressor(torch.arange(500))
    torch.testing.assert_close(torch.cov(feats.T), torch.eye(5), atol=1e-3, rtol=0)
    assert pca_projection(reps, 5).shape == (20, 5)
    with pytest.raises(ValueError, match="probe.dim=30 exceeds the representation width 20"):
        RepresentationCompressor(reps, "linear", dim=30)


FAST = ["task=mra_probe", "representation=llama_tiny", "trainer.max_epochs=1", "logger=none",
        "ctr.batch_size=512"]


@pytest.mark.parametrize("compressor", ["linear", "pca", "none"])
def test_probe_task_end_to_end(compressor, ml100k_slice, tmp_path):
    cfg = compose_config([*FAST, "dataset=ml_100k", f"dataset.path={ml100k_slice}", "probe.layer=1",
                          f"probe.compressor={compressor}", f"paths.cache_dir={tmp_path / 'cache'}"], tmp_path / "out")
    metrics = run_task(cfg)
    saved = json.loads((tmp_path / "out" / "metrics.json").read_text())
    for key in ("probe/layer", "probe/dim", "test/auc", "test/logloss"):
        assert key in saved, key
    assert 0.0 <= saved["test/auc"] <= 1.0 and saved["test/logloss"] > 0
    assert saved["probe/layer"] == (-1 if compressor == "none" else 1)
    if compressor != "none":
        assert metrics["repr/cache_hit"] == 0 and metrics["time/extract_s"] > 0
        codes = load_file(str(tmp_path / "out" / "item_codes.safetensors"))["mu"]  # the probe's deployable codes
        assert codes.shape == (metrics["data/n_items"], 32) and torch.isfinite(codes).all()
        if compressor == "pca":  # fitted once: standardised principal components, unit variance
            torch.testing.assert_close(codes.var(0), torch.ones(32), atol=1e-3, rtol=0)
        else:  # a fresh CTR model on them, as for MARC's codes
            (tmp_path / "out" / ".hydra").mkdir()
            OmegaConf.save(cfg, tmp_path / "out" / ".hydra" / "config.yaml")
            from recsys_compress.tasks import evaluate_codes

            assert evaluate_codes.main([str(tmp_path / "out"), "--out", str(tmp_path / "fresh")]) == 0
            fresh = json.loads((tmp_path / "fresh" / "metrics.json").read_text())
            assert fresh["codes/source"] == "linear probe of layer 1" and 0 <= fresh["test/auc"] <= 1
    else:
        assert not (tmp_path / "out" / "item_codes.safetensors").exists()


def drawn_points(report_dir):
    """The points the MRA figure draws (its source table), after checking the figure exists."""
    import csv

    assert (report_dir / "mra_curve.png").stat().st_size > 10_000
    with open(report_dir / "mra_curve.csv") as f:
        return list(csv.DictReader(f))


def test_probe_all_layers_in_one_run_then_the_report_and_bad_inputs(ml100k_slice, tmp_path):
    overrides = [*FAST, "dataset=ml_100k", f"dataset.path={ml100k_slice}", f"paths.cache_dir={tmp_path / 'cache'}"]
    metrics = run_task(compose_config([*overrides, "probe.layer=all"], tmp_path / "runs" / "all"))
    assert metrics["probe/layer"] == "all" and metrics["probe/final_layer"] == 2
    assert (tmp_path / "runs" / "all" / "probe_layers.csv").read_text().count("\n") == 4  # header + layers 0..2
    assert metrics["test/auc"] == metrics[f"layers/{metrics['probe/best_layer']}/test/auc"]
    # Each layer of the curve is that layer's probe: the same result as a single-layer run of it
    # (every CTR fit starts from the run's seed), and the layers differ from the final one.
    single = run_task(compose_config([*overrides, "probe.layer=0"], tmp_path / "single" / "layer0"))
    assert (metrics["layers/0/test/auc"], metrics["layers/0/val/best_auc"]) == (single["test/auc"],
                                                                              single["val/best_auc"])
    assert metrics["layers/0/test/auc"] != metrics["layers/2/test/auc"]
    id_only = run_task(compose_config([*overrides, "probe.compressor=none"], tmp_path / "runs" / "id_only"))

    from recsys_compress.reporting import report

    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    assert "MRA curve: llama_tiny, linear compression to 32 dims" in text
    assert f"| ID-only CTR model | {id_only['test/auc']:.4f} |" in text
    assert f"| 1 | {metrics['layers/1/val/best_auc']:.4f} | {metrics['layers/1/test/auc']:.4f} |" in text
    drawn = drawn_points(tmp_path / "report")
    assert [(r["layer"], float(r["test/auc"])) for r in drawn if r["layer"]] == \
        [(str(layer), metrics[f"layers/{layer}/test/auc"]) for layer in range(3)]
    assert [float(r["test/auc"]) for r in drawn if r["curve"] == "ID-only CTR model"] == [id_only["test/auc"]]
    with pytest.raises(ConfigError, match=r"probe.layer=9 is out of range for llama_tiny; allowed: 0..2"):
        run_task(compose_config([*overrides, "probe.layer=9"], tmp_path / "bad"))
    with pytest.raises(ConfigError, match="probe.dim=0 is out of range"):
        run_task(compose_config([*overrides, "probe.dim=0"], tmp_path / "bad"))
    with pytest.raises(ConfigError, match="ctr.split_by='user' is not allowed; allowed: time, item"):
        run_task(compose_config([*overrides, "ctr.split_by=user"], tmp_path / "bad"))
    with pytest.raises(ConfigError, match=r"ctr.item_id_dropout=2.0 is out of range; allowed: \[0, 1\]"):
        run_task(compose_config([*overrides, "ctr.item_id_dropout=2"], tmp_path / "bad"))
    with pytest.raises(ConfigError, match="sequence_text has no ratings"):
        run_task(compose_config([*FAST, "dataset=sequence_text"], tmp_path / "bad"))


def test_report_pools_the_seeds_of_one_configuration(ml100k_slice, tmp_path):
    overrides = [*FAST, "dataset=ml_100k", f"dataset.path={ml100k_slice}", f"paths.cache_dir={tmp_path / 'cache'}",
                 "probe.layer=1"]
    runs = {(what, seed): run_task(compose_config([*overrides, *extra, f"seed={seed}"], tmp_path / "runs" / f"{what}{seed}"))
            for what, extra in [("probe", []), ("id_only", ["probe.compressor=none", "ctr.item_id_dropout=0.5",
                                                                 "ctr.batch_by=item"])]
            for seed in (0, 1)}
    from recsys_compress.reporting import report

    assert report.main([str(tmp_path / "runs"), "--out", str(tmp_path / "report")]) == 0
    text = (tmp_path / "report" / "report.md").read_text()
    for what, row in [("probe", "| 1 (best on val) | {val} | {test} |"),
                      ("id_only", "| ID-only CTR model [item-id dropout 0.5, item-grouped batches] | {test} |")]:
        aucs = [runs[(what, seed)]["test/auc"] for seed in (0, 1)]
        vals = [runs[(what, seed)]["val/best_auc"] for seed in (0, 1)]
        assert aucs[0] != aucs[1]  # the seeds really differ
        test = f"{statistics.fmean(aucs):.4f} ± {statistics.stdev(aucs):.4f} (n=2)"
        val = f"{statistics.fmean(vals):.4f} ± {statistics.stdev(vals):.4f} (n=2)"
        assert row.format(val=val, test=test) in text, text
    # paired by seed against the final (here the only) probed layer: same split, same initialisation
    diff = [runs[("id_only", seed)]["test/auc"] - runs[("probe", seed)]["test/auc"] for seed in (0, 1)]
    wins = sum(d > 0 for d in diff)
    p = 0.5 if diff[0] * diff[1] > 0 else 1.0  # of the 4 sign patterns, 2 (same signs) or 4 reach |mean|
    assert (f"| ID-only CTR model [item-id dropout 0.5, item-grouped batches] | {statistics.fmean(diff):+.4f} ± "
            f"{statistics.stdev(diff):.4f} | {wins} of 2 | {p:.2f} |") in text, text
    (probe,) = [r for r in drawn_points(tmp_path / "report") if r["layer"] == "1"]  # the point and its error bar
    aucs = [runs[("probe", seed)]["test/auc"] for seed in (0, 1)]
    assert (float(probe["test/auc"]), float(probe["std"]), probe["seeds"]) == \
        (statistics.fmean(aucs), statistics.stdev(aucs), "2")


def test_sign_flip_test_counts_the_sign_patterns_by_hand():
    from recsys_compress.reporting import report

    # 3 positive differences: only all-plus and all-minus reach |mean| = 2, so 2 of 8 patterns
    assert report.sign_flip_p([1.0, 2.0, 3.0]) == 0.25
    assert report.sign_flip_p([1.0, -1.0]) == 1.0  # mean 0: every pattern is as extreme
    # 5 pairs, mean 1.6: +-(2,2,2,2,0) flips that keep |sum| >= 8 are all-same-sign among the four 2s
    # (2 of 16 for them, times 2 for the 0's sign) -> 4 of 32
    assert report.sign_flip_p([2.0, 2.0, 2.0, 2.0, 0.0]) == 4 / 32
    # beyond the exact range it samples 2^10 patterns and counts the observed one: 1 / 1025 here
    assert report.sign_flip_p([1.0] * 20, exact_up_to=10) == 1 / 1025


def test_the_report_pairs_each_reference_with_its_own_encoders_final_and_best_on_validation_layers():
    from recsys_compress.reporting import report

    def run(seed, split="item", **metrics):
        return {"_seed": seed, "_split_by": split, "_item_id_dropout": 0.0, "_batch_by": "sample", "_run": "r",
                "test/logloss": 0.5, **metrics}

    # encoder A's layers 0..2 on seeds 0..2: validation picks layer 1, 0 and 2 (the final) in turn
    val = {0: [0.60, 0.70, 0.65], 1: [0.72, 0.70, 0.71], 2: [0.60, 0.61, 0.69]}
    test = {0: [0.61, 0.66, 0.63], 1: [0.70, 0.64, 0.65], 2: [0.62, 0.60, 0.67]}
    runs = [run(s, **{"_encoder": "A", "_base_encoder": "P", "probe/layer": layer, "val/best_auc": val[s][layer],
                      "test/auc": test[s][layer]}) for s in range(3) for layer in range(3)]
    # A is a proxy-trained P: P's final layer (2) on the same seeds; Q, also from P, was probed at layer 1 only
    pretrained = {0: 0.60, 1: 0.66, 2: 0.68}
    runs += [run(s, **{"_encoder": "P", "probe/layer": 2, "val/best_auc": 0.6, "test/auc": pretrained[s]})
             for s in range(3)]
    runs += [run(s, **{"_encoder": "Q", "_base_encoder": "P", "probe/layer": 1, "val/best_auc": 0.6,
                       "test/auc": 0.6}) for s in range(3)]
    marc = {0: 0.69, 1: 0.71, 2: 0.66}
    runs += [run(s, **{"_encoder": "A", "marc/dim": 32, "marc/beta": 1.0, "test/auc": marc[s]}) for s in range(3)]
    runs += [run(s, **{"_encoder": "B", "marc/dim": 32, "marc/beta": 1.0, "test/auc": 0.9}) for s in range(3)]
    runs += [run(s, **{"_encoder": "A", "probe/layer": -1, "test/auc": 0.5 + s / 100}) for s in range(3)]
    runs += [run(s, split="time", **{"_encoder": "A", "probe/layer": -1, "test/auc": 0.8}) for s in range(3)]
    text = "\n".join(report.mra_tables(report.probe_points(runs), report.references(runs)))

    def row(label, diffs):
        wins = sum(d > 0 for d in diffs)
        return (f"| {label} | {statistics.fmean(diffs):+.4f} ± {statistics.stdev(diffs):.4f} | {wins} of 3 | "
                f"{report.sign_flip_p(diffs):.2f} |")

    best = [test[0][1], test[1][0], test[2][2]]  # each seed's best layer on validation, its test AUC
    final = [test[s][2] for s in range(3)]
    marc_a = "MARC (A, final layer, dim 32, beta 1) [cold items]"
    assert "layers per seed 0: 1, 1: 0, 2: 2" in text
    assert row("best layer on validation, per seed (1, 0, 2)", [b - f for b, f in zip(best, final)]) in text
    assert row(marc_a, [marc[s] - final[s] for s in range(3)]) in text
    assert row(marc_a, [marc[s] - best[s] for s in range(3)]) in text
    assert row("ID-only CTR model [cold items]", [0.5 + s / 100 - best[s] for s in range(3)]) in text
    # MARC on another encoder and an ID-only model on other test sets are listed, never paired with A
    assert "| MARC (B, final layer, dim 32, beta 1) [cold items] | 0.9000 ± 0.0000 (n=3) |" in text
    assert text.count("| MARC (B,") == 1 and text.count("| ID-only CTR model |") == 1
    # the proxy's final layer minus its pretrained model's, once: not for P itself, nor for Q (its last layer is not P's)
    assert row("final layer (2) after the proxy", [final[s] - pretrained[s] for s in range(3)]) in text
    assert text.count("after the proxy minus before") == 1 and "(A linear dim None [cold items] vs P)" in text


def test_user_texts_spell_out_profiles_and_use_only_the_training_period(ml1m_slice):
    data = build_ctr_splits("recbole_atomic", str(ml1m_slice), "ml-1m")
    # ML-1M codes: user 1 is age code 1, F, occupation 10; user 2 is 56, M, 16
    titles = [data.item_info[raw].title for raw in data.item_ids]
    history = [[titles[i] for i in items] for items in data.recent_train_items(3)]
    texts, counts = user_texts(data.user_ids, data.user_info, history, "{profile} | {history}")
    u1, u2 = data.user_ids.index("1m_1"), data.user_ids.index("1m_2")
    assert texts[u1].startswith("age under 18, female, K-12 student | ")
    assert texts[u2].startswith("age 56 or older, male, self-employed | ")
    assert counts == {"users_without_profile": 0, "users_without_history": 0}

    # the history is the user's last 3 training interactions, checked against the raw file
    rows = [line.split("\t") for line in (ml1m_slice / "ml-1m.inter").read_text().splitlines()[1:]]
    events = sorted((float(t), k, item) for k, (user, item, _, t) in enumerate(rows) if user == "1m_2")
    n_train = round(0.8 * len(events))
    expected = [item for _, _, item in events[:n_train]][-3:]
    assert [data.item_ids[i] for i in data.recent_train_items(3)[u2]] == expected
    assert texts[u2].endswith(" | " + "; ".join(data.item_info[i].title for i in expected))

    texts, counts = user_texts(["9", "1m_1"], data.user_info, [[], ["Heat"]], "{profile} | {history}")
    assert texts == ["unknown | nothing yet", "age under 18, female, K-12 student | Heat"]
    assert counts == {"users_without_profile": 1, "users_without_history": 1}


def test_probe_with_user_representations(ml100k_slice, tmp_path):
    overrides = [*FAST, "dataset=ml_100k", f"dataset.path={ml100k_slice}", "probe.layer=2", "probe.dim=8",
                 "representation.users=true", "representation.user_history=5", f"paths.cache_dir={tmp_path / 'cache'}"]
    metrics = run_task(compose_config(overrides, tmp_path / "users"))
    assert metrics["repr/users"] == 1 and metrics["repr/users_cache_hit"] == 0
    assert metrics["repr/users_without_profile"] == 0 and 0.0 <= metrics["test/auc"] <= 1.0
    ckpt = torch.load(next((tmp_path / "users" / "checkpoints").glob("*.ckpt")), weights_only=False)
    width = ckpt["state_dict"]["model.cross.layers.0.weight"].shape[1]
    assert width == 2 * 16 + 8 + 8  # user and item ids, item and user features
    again = run_task(compose_config(overrides, tmp_path / "again"))
    assert again["repr/users_cache_hit"] == 1 and again["repr/cache_hit"] == 1
    other = run_task(compose_config([*overrides, "representation.user_history=2"], tmp_path / "other"))
    assert other["repr/users_cache_hit"] == 0  # other texts, other cache entry
    with pytest.raises(ConfigError, match="representation.users=true needs representations"):
        run_task(compose_config([*overrides, "probe.compressor=none"], tmp_path / "bad"))
    with pytest.raises(ConfigError, match="representation.user_template=.* allowed fields: profile, history, id"):
        run_task(compose_config([*overrides, "representation.user_template='{name}'"], tmp_path / "bad"))
    from recsys_compress.tasks.config import validate_marc

    with pytest.raises(ConfigError, match="representation.users=true is supported by task=mra_probe only"):
        validate_marc(compose_config(["task=marc", "representation.users=true"], tmp_path / "bad"))


def test_a_probe_reads_the_layer_it_names(ml100k_slice, tmp_path):
    # PCA codes are a fixed function of the layer's representation: the codes a probe of layer l
    # exports equal those computed here from the cached layer l, and layers 0 and 2 differ.
    overrides = [*FAST, "dataset=ml_100k", f"dataset.path={ml100k_slice}", f"paths.cache_dir={tmp_path / 'cache'}",
                 "probe.compressor=pca"]
    codes = {}
    for layer in (0, 2):
        run_task(compose_config([*overrides, f"probe.layer={layer}"], tmp_path / str(layer)))
        codes[layer] = load_file(str(tmp_path / str(layer) / "item_codes.safetensors"))["mu"]
    (cache,) = (tmp_path / "cache" / "representations").glob("*.safetensors")
    layers = load_file(str(cache))["layers"]
    assert layers.shape[0] == 3  # token embeddings + 2 blocks
    for layer in (0, 2):
        expected = RepresentationCompressor(layers[layer], "pca", 32).eval()(torch.arange(layers.shape[1]))
        torch.testing.assert_close(codes[layer], expected, rtol=0, atol=1e-6)
    assert not torch.allclose(codes[0], codes[2], atol=1e-2)
