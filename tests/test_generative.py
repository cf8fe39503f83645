"""The generative recommender (items as code tuples) and its constrained beam search: exact
against brute force on a catalogue small enough to enumerate, only valid tuples, seen items never
returned, metrics from beam positions, and compression + alignment through the model seam."""

import copy

import lightning as L
import pytest
import torch

from conftest import SMALL
from recsys_compress.alignment.config import AlignmentConfig
from recsys_compress.alignment.runner import align
from recsys_compress.compression.compressor import Compressor
from recsys_compress.compression.config import CompressionConfig
from recsys_compress.compression.low_rank import LowRankLinear
from recsys_compress.data.datamodule import NextItemDataModule
from recsys_compress.evaluation.config import EvaluationConfig
from recsys_compress.evaluation.ranking import FullRankingMetrics
from recsys_compress.models.generative import (CodeVocabulary, GenerativeRecLitModule, ItemTrie, PerLevelCodes,
                                               banned_items, constrained_beam_search)
from recsys_compress.models.item_llm import build_llama, position_ids_for
from recsys_compress.models.interface import TokenSequence
from recsys_compress.schema import ConfigError

SIZES = (4, 3, 5)


def unique_codes(n_items: int, sizes=SIZES, seed: int = 0) -> torch.Tensor:
    """(n_items + 1) x L distinct random tuples (row 0: the padding item)."""
    g = torch.Generator().manual_seed(seed)
    total = torch.tensor(sizes).prod().item()
    flat = torch.randperm(total, generator=g)[:n_items]
    digits = []
    for size in reversed(sizes):
        digits.append(flat % size)
        flat = flat // size
    return torch.cat([torch.zeros(1, len(sizes), dtype=torch.long), torch.stack(digits[::-1], 1)])


def decoder(vocab: CodeVocabulary, seed: int, hidden: int = 16):
    torch.manual_seed(seed)
    return build_llama(vocab.size - 1, hidden_size=hidden, num_layers=2, num_heads=2, intermediate_size=32,
                       max_len=64, dropout=0.0).eval()


def histories(n_items: int, codes: torch.Tensor, vocab: CodeVocabulary, batch: int, length: int, seed: int):
    """Left-padded item windows and their code-token sequences."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, n_items + 1, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(1, batch):  # a little padding on every row but the first
        ids[row, :row % length] = 0
        mask[row, :row % length] = 0
    tokens = vocab.tokens(codes)[ids]
    tokens[ids == 0] = 0
    tokens = tokens.reshape(batch, -1)
    token_mask = mask.repeat_interleave(vocab.levels, 1)
    return ids, mask, TokenSequence(tokens, token_mask, position_ids_for(token_mask))


def brute_force_log_probs(model, vocab: CodeVocabulary, codes: torch.Tensor, history: TokenSequence) -> torch.Tensor:
    """B x (items + 1) log-probability of every item's whole tuple after each history, from a
    full forward per item (no cache, no trie); item 0: -inf."""
    batch, n = history.input_ids.shape[0], codes.shape[0] - 1
    out = torch.full((batch, n + 1), float("-inf"))
    tuples = vocab.tokens(codes[1:])  # n x L
    with torch.no_grad():
        for i in range(n):
            tokens = torch.cat([history.input_ids, tuples[i].expand(batch, -1)], 1)
            mask = torch.cat([history.attention_mask, torch.ones(batch, vocab.levels, dtype=torch.long)], 1)
            logits = model(input_ids=tokens, attention_mask=mask, position_ids=position_ids_for(mask)).logits
            log_probs = torch.log_softmax(logits.float(), -1)
            steps = log_probs[:, -vocab.levels - 1:-1]  # the positions that predict the tuple's tokens
            out[:, i + 1] = steps.gather(2, tuples[i].expand(batch, -1)[..., None]).squeeze(-1).sum(1)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_beams_as_wide_as_the_catalogue_return_every_item_in_exact_log_probability_order(seed):
    n = 40
    vocab, codes = CodeVocabulary(SIZES), unique_codes(n, seed=seed)
    model = decoder(vocab, seed)
    _, _, history = histories(n, codes, vocab, batch=3, length=4, seed=seed)
    items, scores = constrained_beam_search(model, vocab, ItemTrie(codes, SIZES), history, beams=n)
    exact = brute_force_log_probs(model, vocab, codes, history)
    expected_scores, expected_items = exact[:, 1:].sort(1, descending=True)
    assert torch.equal(items, expected_items + 1)
    torch.testing.assert_close(scores, expected_scores, rtol=0, atol=1e-4)


@pytest.mark.parametrize("seed", range(6))
def test_no_beam_ever_leaves_the_trie_and_the_beams_are_always_filled(seed):
    """A sparse catalogue (most prefixes lead nowhere) and fewer beams than items: every beam is a
    distinct catalogue item, the best ones by exact log-probability."""
    n, beams = 9, 6
    vocab, codes = CodeVocabulary(SIZES), unique_codes(n, seed=100 + seed)
    model = decoder(vocab, seed)
    _, _, history = histories(n, codes, vocab, batch=4, length=3, seed=seed)
    items, scores = constrained_beam_search(model, vocab, ItemTrie(codes, SIZES), history, beams=beams)
    assert ((items >= 1) & (items <= n)).all()
    assert all(len(set(row.tolist())) == beams for row in items)
    assert torch.isfinite(scores).all() and (scores[:, :-1] >= scores[:, 1:]).all()


def test_seen_items_are_never_returned_and_the_beams_are_filled_from_the_rest():
    n, beams = 30, 20
    vocab, codes = CodeVocabulary(SIZES), unique_codes(n, seed=3)
    model = decoder(vocab, 3)
    ids, _, history = histories(n, codes, vocab, batch=4, length=6, seed=3)
    banned = torch.zeros(4, n + 1, dtype=torch.bool)
    banned.scatter_(1, ids, True)
    items, _ = constrained_beam_search(model, vocab, ItemTrie(codes, SIZES), history, beams=beams, banned=banned)
    exact = brute_force_log_probs(model, vocab, codes, history).masked_fill(banned, float("-inf"))
    for row in range(4):
        assert not banned[row, items[row]].any()
        allowed = int((~banned[row, 1:]).sum())
        filled = items[row][items[row] > 0]
        assert len(filled) == min(beams, allowed)
        assert filled.tolist() == exact[row].argsort(descending=True)[:len(filled)].tolist()


@pytest.mark.parametrize("exclude", [False, True])
def test_lc_recs_per_level_decoding_ranks_every_combination_of_seen_codes_and_marks_non_items(exclude):
    """evaluation.decoding=per_level: with beams = every tuple whose codes were seen at their
    levels, the search returns them all in exact log-probability order, item 0 for those that are
    no item; a banned (seen) item's tuple never comes out, a non-item's still does."""
    n = 9
    vocab, codes = CodeVocabulary(SIZES), unique_codes(n, seed=5)
    model = decoder(vocab, 5)
    ids, _, history = histories(n, codes, vocab, batch=3, length=2, seed=5)
    combos = torch.cartesian_prod(*[codes[1:, level].unique() for level in range(vocab.levels)])
    item_of = {tuple(codes[i].tolist()): i for i in range(1, n + 1)}
    combo_item = torch.tensor([item_of.get(tuple(t.tolist()), 0) for t in combos])
    assert len(combos) > n  # some tuples are no item
    banned = None
    exact = brute_force_log_probs(model, vocab, torch.cat([codes[:1], combos]), history)[:, 1:]
    if exclude:
        banned = torch.zeros(3, n + 1, dtype=torch.bool).scatter_(1, ids, True)
        exact = exact.masked_fill(banned.gather(1, combo_item.expand(3, -1)) & (combo_item > 0), float("-inf"))
    items, scores = constrained_beam_search(model, vocab, PerLevelCodes(codes, SIZES), history,
                                            beams=len(combos), banned=banned)
    expected_scores, order = exact.sort(1, descending=True)
    returned = torch.isfinite(expected_scores)
    assert torch.equal(items[returned], combo_item[order][returned]) and not items[~returned].any()
    torch.testing.assert_close(scores[returned], expected_scores[returned], rtol=0, atol=1e-4)
    assert (items[returned] == 0).sum() == (len(combos) - n) * 3
    if exclude:
        assert not any(banned[row, items[row][items[row] > 0]].any() for row in range(3))


def test_a_catalogue_with_two_items_on_one_tuple_is_refused():
    codes = unique_codes(5)
    codes[3] = codes[2]
    with pytest.raises(ValueError, match="5 items have 4 distinct code tuples"):
        ItemTrie(codes, SIZES)
    codes = unique_codes(5)
    codes[4, 1] = 3
    with pytest.raises(ValueError, match="item 4 has code 3 at level 1, outside 0..2"):
        ItemTrie(codes, SIZES)


def test_a_decoder_whose_vocabulary_does_not_fit_the_codes_is_refused_naming_both():
    codes = unique_codes(10)
    with pytest.raises(ValueError, match=r"the decoder has 14 tokens; codes of 3 levels x \[4, 3, 5\] need 13"):
        GenerativeRecLitModule(build_llama(13, hidden_size=16, num_layers=1, num_heads=2), codes, SIZES)


def test_beams_below_the_largest_k_are_refused():
    with pytest.raises(ConfigError, match=r"evaluation.beams=10 .* >= the largest K of hr_ks and ndcg_ks \(20\)"):
        EvaluationConfig(beams=10)


@pytest.fixture(scope="module")
def generative():
    """A generative recommender trained briefly on MovieLens sequences, random unique tuples."""
    L.seed_everything(0)
    dm = NextItemDataModule("grouplens_csv", SMALL, max_len=10, batch_size=64, eval_batch_size=128)
    dm.setup()
    sizes = (256, 256, 16)  # as wide as a real index's: a narrow vocabulary hid an onnxruntime head-fusion failure
    codes = unique_codes(dm.n_items, sizes, seed=0)
    vocab = CodeVocabulary(sizes)
    model = build_llama(vocab.size - 1, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, max_len=40)
    lit = GenerativeRecLitModule(model, codes, sizes)
    L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
              enable_model_summary=False, limit_val_batches=0, limit_train_batches=20).fit(lit, datamodule=dm)
    return dm, lit


def test_ranks_are_the_targets_beam_positions_and_metrics_follow_by_hand(generative):
    dm, lit = generative
    lit.eval()
    batch = next(iter(dm.test_dataloader()))
    batch = {k: v[:8] for k, v in batch.items()}
    items, _ = lit.recommend(batch, exclude_seen=False)
    # make the targets: beam positions 0, 3, 19 and one item outside the beams
    outside = next(i for i in range(1, lit.n_items + 1) if i not in items[3].tolist())
    batch["target"] = torch.stack([items[0, 0], items[1, 3], items[2, 19], torch.tensor(outside)] +
                                  list(items[4:8, 1]))
    ahead, ties = lit.rank(batch).seen_kept
    assert ahead.tolist()[:4] == [0, 3, 19, lit.n_items - 1] and not ties.any()
    metrics = FullRankingMetrics((1, 5, 10, 20), (5, 10, 20))
    metrics.update_ranks(ahead[:4], ties[:4])
    values = metrics.compute()
    assert values["hr@1"] == pytest.approx(1 / 4) and values["hr@5"] == pytest.approx(2 / 4)
    assert values["hr@20"] == pytest.approx(3 / 4)
    assert values["ndcg@5"] == pytest.approx((1 + 1 / torch.log2(torch.tensor(5.0)).item()) / 4)


@pytest.mark.parametrize("sequential,alignment", [(False, "progressive"), (True, "progressive_lstsq")])
def test_compression_and_alignment_run_on_the_generative_model_through_the_seam(generative, sequential, alignment):
    """Calibration counts the code tokens the decoder reads (three per item), and every step
    (whole or block-by-block compression, gradient or closed-form alignment, test) runs."""
    dm, trained = generative
    lit = copy.deepcopy(trained)
    teacher = copy.deepcopy(lit.model).eval()
    compressor = Compressor(CompressionConfig(method="odllm", calib_batches=4, heldout_batches=2,
                                              sequential=sequential), 0.5)
    compressor.compress(lit, dm.train_dataloader())
    assert compressor.calib_tokens == sum(int(b["attention_mask"].sum()) * 3 for b in list(dm.train_dataloader())[:4])
    assert all(isinstance(lit.model.get_submodule(r.name), LowRankLinear) for r in compressor.reports)
    out = align(AlignmentConfig(method=alignment, batches=2, steps_per_layer=5, task_weight=0.1,
                                distill_weight=0.1, checkpoint=False), lit, teacher, dm.train_dataloader())
    assert out["align/layers"] == 2 and out["align/mean_mse_after"] <= out["align/mean_mse_before"]
    test = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False).test(
        lit, datamodule=dm, verbose=False)[0]
    assert 0 <= test["test/ndcg@10"] <= 1 and len(lit.test_per_user) == dm.data.n_users


def test_the_test_records_the_rate_of_tuples_that_are_no_item_none_with_the_trie(generative):
    dm, trained = generative
    lit = copy.deepcopy(trained)
    limited = dict(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_test_batches=2)
    trie = L.Trainer(**limited).test(lit, datamodule=dm, verbose=False)[0]
    lit.evaluation = lit.evaluation.model_copy(update={"decoding": "per_level"})
    per_level = L.Trainer(**limited).test(lit, datamodule=dm, verbose=False)[0]
    for protocol in ("seen_excluded", "seen_kept"):
        assert trie[f"test/{protocol}/invalid_tuples"] == 0
        assert 0 < per_level[f"test/{protocol}/invalid_tuples"] < 1


@pytest.mark.parametrize("quantize", [None, "int8"])
def test_the_exported_artefact_recommends_what_the_eager_model_does(generative, tmp_path, quantize):
    """Beam search over the exported step graph (history and beams as one query, no cache) gives
    the eager model's lists (its KV cache) under both protocols; int8 changes the weights, so there
    the first item and the list's members mostly agree. recsys-recommend serves it; bad requests fail naming what is wrong."""
    import json

    from recsys_compress.deploy.export import export_onnx
    from recsys_compress.deploy.serve import main, open_artefact

    dm, lit = generative
    lit.eval()
    smoothing = {"int8_smooth": 0.5, "calibration": [b for _, b in zip(range(2), dm.train_dataloader())]}
    folder = export_onnx(lit, tmp_path / "onnx", dm.max_len, dm.data.item_ids, quantize=quantize,
                         **(smoothing if quantize else {}))
    if quantize:  # SmoothQuant's statistics count the code tokens the decoder reads, three per item
        tokens = sum(int(b["attention_mask"][:, -dm.max_len:].sum()) * 3 for b in smoothing["calibration"])
        assert json.loads((folder / "deploy.json").read_text())["smoothing"]["tokens"] == tokens
    artefact = open_artefact(folder)
    batches = [b for _, b in zip(range(2), dm.test_dataloader())]
    for exclude in (True, False):
        for batch in batches:
            eager, _ = lit.recommend(batch, exclude)
            got, _ = artefact.search(batch["input_ids"], batch["attention_mask"],
                                     banned_items(batch, lit.n_items) if exclude else None)
            if quantize is None:
                assert torch.equal(got, eager)
            else:  # int8 reorders near-ties: the first item and the set of 20 mostly stay
                overlap = sum(len(set(a.tolist()) & set(b.tolist())) for a, b in zip(got, eager)) / got.numel()
                assert (got[:, 0] == eager[:, 0]).float().mean() >= 0.9 and overlap >= 0.9
    if quantize:
        return
    history = list(dm.data.item_ids[:3])
    top = artefact.recommend(history, k=5)
    ids = torch.tensor([[dm.data.item_ids.index(h) + 1 for h in history]])
    eager, scores = lit.recommend({"input_ids": ids, "attention_mask": torch.ones_like(ids), "seen": ids}, True)
    assert [r.item_id for r in top] == [dm.data.item_ids[i - 1] for i in eager[0, :5].tolist()]
    assert [r.score for r in top] == pytest.approx(scores[0, :5].tolist(), abs=1e-4)
    assert not set(history) & {r.item_id for r in top}
    with pytest.raises(ValueError, match=r"k=21; allowed: 1..20 \(the artefact's beams\)"):
        artefact.recommend(history, k=21)
    assert main([str(folder), "--history", "no-such-item", "--k", "3"]) == 2


def test_a_checkpoint_of_other_item_codes_is_refused_even_when_the_vocabulary_fits(generative, tmp_path):
    dm, lit = generative
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, max_epochs=0)
    trainer.strategy.connect(lit)
    trainer.save_checkpoint(tmp_path / "model.ckpt")
    checkpoint = torch.load(tmp_path / "model.ckpt", weights_only=True)
    lit.on_load_checkpoint(checkpoint)  # its own codes: fine
    codes = torch.cat([torch.zeros(1, 3, dtype=torch.long), lit.item_tokens[1:] - torch.tensor(lit.vocab.offsets)])
    codes[[1, 2]] = codes[[2, 1]]  # two items swap tuples: same vocabulary, another index
    other = GenerativeRecLitModule(copy.deepcopy(lit.model), codes, lit.vocab.sizes)
    with pytest.raises(ValueError, match=r"trained on other item codes \(sha256 \w+\) than this run.s index"):
        other.on_load_checkpoint(checkpoint)


GENERATIVE = ["item_ids=semantic", "semantic.kind=random", "semantic.collisions=tiger", "semantic.levels=3",
              "semantic.codebook_size=32", "model.hidden_size=16", "model.intermediate_size=32", "dataset.max_len=10",
              "logger=none", "trainer.max_epochs=1", "evaluation.popularity_baseline=false"]


def test_item_ids_semantic_trains_then_compresses_and_aligns_from_the_cached_base_through_train_py(tmp_path):
    import json

    from conftest import run_train

    common = [*GENERATIVE, f"paths.cache_dir={tmp_path / 'cache'}"]
    out = run_train([*common, f"hydra.run.dir={tmp_path / 'base'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    base = json.loads((tmp_path / "base" / "metrics.json").read_text())
    # 3 random levels, and TIGER's extra code that tells apart the items that drew one tuple
    assert base["item_ids"] == "semantic" and base["semantic/levels"] == 4 and base["semantic/colliding_groups"] == 0
    assert base["evaluation/beams"] == 20 and 0 <= base["test/ndcg@10"] <= base["test/hr@10"] <= 1
    from recsys_compress.data.lcrec import read_index

    written = read_index(tmp_path / "base" / "ml_latest_small.index.json")  # what it trained on, LC-Rec's format
    assert len(written) == base["data/n_items"] and len(set(written.values())) == len(written)
    out = run_train([*common, "compression=odllm", "ratio=0.5", "alignment=progressive_lstsq", "export.onnx=true",
                     f"hydra.run.dir={tmp_path / 'odllm'}"])
    assert out.returncode == 0, out.stderr[-3000:]
    compressed = json.loads((tmp_path / "odllm" / "metrics.json").read_text())
    assert compressed["base/cache_hit"] == 1 and compressed["base/test/ndcg@10"] == base["test/ndcg@10"]
    assert compressed["compression/layers"] == 14 and compressed["align/layers"] == 2
    assert "retention/ndcg@10" in compressed and 0 <= compressed["test/ndcg@10"] <= 1
    # the artefact, beam search over its step graph, recommends what the eager model does
    assert compressed["deploy/test/ndcg@10"] == pytest.approx(compressed["test/ndcg@10"], abs=1e-6)
    assert compressed["deploy/test/seen_kept/hr@10"] == pytest.approx(compressed["test/seen_kept/hr@10"], abs=1e-6)
    assert compressed["export/max_abs_deviation"] < 1e-4


def test_what_the_generative_recommender_cannot_do_yet_fails_at_start_naming_the_key():
    from recsys_compress.tasks.compose import compose_config
    from recsys_compress.tasks.config import validate

    with pytest.raises(ConfigError, match="export.int8=static with item_ids=semantic: .* allowed: export.int8=dynamic"):
        validate(compose_config([*GENERATIVE, "export.onnx=true", "compression=int8", "export.int8=static"]))
    with pytest.raises(ConfigError, match="item_ids=semantic with model.source=pretrained: .* not built yet"):
        validate(compose_config([*GENERATIVE, "model=smollm2_135m"]))
    assert validate(compose_config(GENERATIVE)).item_ids == "semantic"
    assert validate(compose_config([])).item_ids == "atomic" and validate(compose_config([])).semantic is None


def test_the_base_model_cache_is_keyed_by_the_items_codes():
    from recsys_compress.models.base_cache import base_model_key
    from recsys_compress.tasks.compose import compose_config

    cfg = compose_config(GENERATIVE)
    codes = unique_codes(20)
    same = base_model_key(cfg, codes.clone())[0]
    other = codes.clone()
    other[[1, 2]] = other[[2, 1]]  # two items swap their tuples: another model
    assert base_model_key(cfg, codes)[0] == same != base_model_key(cfg, other)[0]
    assert base_model_key(cfg)[0] != same


def test_items_still_sharing_a_tuple_after_lc_recs_rounds_get_tigers_extra_code_for_the_generative_model(
        monkeypatch):
    """An RQ-VAE index can keep a colliding group after its re-assignment rounds (ML-100K: one);
    the generative recommender needs one item per tuple, so there every tuple gets the extra code,
    and task=semantic_ids (unique=False) reports the index as built."""
    from recsys_compress.tasks import item_index as module
    from recsys_compress.tasks.compose import compose_config
    from recsys_compress.tasks.config import validate_semantic

    dm = NextItemDataModule("grouplens_csv", SMALL, max_len=10, batch_size=64)
    dm.setup()
    ids = list(dm.data.item_ids)
    built = {item: (f"<a_{i % 7}>", f"<b_{i // 7}>") for i, item in enumerate(ids)}
    built[ids[1]] = built[ids[0]]  # one colliding pair left
    monkeypatch.setattr(module, "build_rqvae_index", lambda *a, **k: (dict(built), {}))
    run = validate_semantic(compose_config(["task=semantic_ids"]))
    kept, figures, _ = module.item_index(run, dm, "unused")
    assert kept == built and "semantic/extra_code_groups" not in figures
    unique, figures, _ = module.item_index(run, dm, "unused", unique=True)
    assert figures["semantic/extra_code_groups"] == 1
    assert unique[ids[0]] == (*built[ids[0]], "<c_0>") and unique[ids[1]] == (*built[ids[0]], "<c_1>")
    assert len(set(unique.values())) == len(ids)
    ItemTrie(module.item_codes(unique, ids), (7, max(int(t[1][3:-1]) for t in built.values()) + 1, 2))
