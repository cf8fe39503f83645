"""The RQ-VAE item tokenizer (recsys_compress/tokenizers): quantisation, Sinkhorn, collisions."""

import pytest
import torch

from conftest import SHARED_DATA
from recsys_compress.data.lcrec import colliding_groups, read_index, write_index
from recsys_compress.data.formats import read_interactions
from recsys_compress.representations.layer_means import extract_layer_means, load_encoder
from recsys_compress.tokenizers.assign import (
    assign_codes,
    code_tokens,
    disambiguate_tiger,
    resolve_collisions_lcrec,
    sinkhorn,
)
from recsys_compress.tokenizers.rqvae import RQVAE, fit_rqvae


def test_sinkhorn_spreads_points_that_all_prefer_one_code_evenly_over_the_codes():
    torch.manual_seed(0)
    codes = torch.randn(8, 4)
    points = codes[0] + 0.3 * torch.randn(512, 4)
    distances = torch.cdist(points, codes)
    assert torch.bincount(distances.argmin(1), minlength=8)[0] >= 500  # nearest code: nearly all on code 0
    plan = sinkhorn(distances)
    torch.testing.assert_close(plan.sum(1), torch.ones(512, dtype=plan.dtype))  # each point placed once
    torch.testing.assert_close(plan.sum(0), torch.full((8,), 64.0, dtype=plan.dtype), atol=1.0, rtol=0)
    counts = torch.bincount(plan.argmax(1), minlength=8)
    assert counts.min() >= 60 and counts.max() <= 68, counts  # 64 each, within 1/16


def test_tiger_disambiguation_makes_the_published_index_unique():
    index = read_index(SHARED_DATA / "instruments" / "Instruments.index.json")
    groups = colliding_groups(index)
    assert len(groups) == 23
    unique = disambiguate_tiger(index)
    assert len(set(unique.values())) == len(unique) == 9_922
    assert all(len(t) == 5 and t[:4] == index[item] for item, t in unique.items())
    for group in groups:  # the k-th item of a group (in the index's order) gets <e_k>
        assert [unique[item][-1] for item in group] == [f"<e_{k}>" for k in range(len(group))]
    assert unique["0"][-1] == "<e_0>"


@pytest.fixture(scope="module")
def item_embeddings():
    """MiniLM sentence embeddings (the last layer, mean-pooled) of 400 real ML-100K item texts."""
    raw = read_interactions("recbole_atomic", SHARED_DATA / "ml-100k", "ml-100k")
    items = sorted(raw.item_info)[:400]
    return extract_layer_means(load_encoder("minilm"), [raw.item_info[i].text() for i in items], progress=False)[-1]


@pytest.fixture(scope="module")
def trained(item_embeddings):
    """RQ-VAEs of 1 and 3 levels x 16 codes trained alike on the same embeddings."""
    models = {}
    for levels in (1, 3):
        torch.manual_seed(0)
        model = RQVAE(item_embeddings.shape[1], levels=levels, codebook_size=16, code_dim=32, hidden=(128,),
                      dead_code_ratio=0.0)
        losses = fit_rqvae(model, item_embeddings, epochs=300, batch_size=len(item_embeddings), lr=3e-3, seed=0,
                           progress=False)
        assert losses[-1] < losses[0]
        models[levels] = model
    return models


def test_three_levels_reconstruct_real_item_texts_clearly_better_than_one(item_embeddings, trained):
    # measured 0.929 and 0.671 of the embeddings' variance
    assert trained[3].reconstruction_error(item_embeddings) < 0.8 * trained[1].reconstruction_error(item_embeddings)


def test_codes_read_off_the_rqvae_are_balanced_and_lcrec_rounds_remove_collisions(item_embeddings, trained,
                                                                                  tmp_path):
    model = trained[3]
    nearest = assign_codes(model, item_embeddings, epsilon=None)
    balanced = assign_codes(model, item_embeddings)
    assert torch.equal(nearest[:, :2], balanced[:, :2])  # only the last level is re-assigned
    spread = [int(c.max() - c.min()) for c in (torch.bincount(codes[:, 2], minlength=16) for codes in (nearest, balanced))]
    counts = torch.bincount(balanced[:, 2], minlength=16)
    assert counts.min() >= 20 and counts.max() <= 30, counts  # 400 items over 16 codes: 25 each
    assert spread[1] < spread[0]
    before = colliding_groups({str(i): tuple(r) for i, r in enumerate(balanced.tolist())})
    resolved, _ = resolve_collisions_lcrec(model, item_embeddings, balanced)
    after = colliding_groups({str(i): tuple(r) for i, r in enumerate(resolved.tolist())})
    assert len(after) < len(before)
    assert torch.equal(resolved[:, :2], balanced[:, :2])  # only last codes move
    # the codes as LC-Rec's tokens, written and read back as an index
    index = {str(i): t for i, t in enumerate(code_tokens(resolved))}
    assert [t[1] for t in index["0"]] == ["a", "b", "c"]
    assert read_index(write_index(tmp_path / "ml100k.index.json", index)) == index


def test_a_tokenizer_without_levels_or_codes_is_refused():
    with pytest.raises(ValueError, match="levels=0, codebook_size=256, code_dim=32: allowed levels >= 1"):
        RQVAE(384, levels=0)
    with pytest.raises(ValueError, match="codebook_size=1"):
        RQVAE(384, codebook_size=1)
