import math

import pytest
import torch
from torchmetrics.retrieval import RetrievalHitRate, RetrievalMRR, RetrievalNormalizedDCG

from recsys_compress.evaluation.ranking import (FullRankingMetrics, evaluate_scorer, mask_scores, metrics_from_ranks,
                                               target_ranks)


def test_hand_computed_example():
    # item 0 is padding; target item 3 has two items (1 and 4) above it -> rank 2 (0-based)
    scores = torch.tensor([[9.0, 0.9, 0.1, 0.5, 0.7, 0.2]])
    m = FullRankingMetrics()
    m.update(scores, torch.tensor([3]))
    out = {k: float(v) for k, v in m.compute().items()}
    assert out["hr@1"] == 0.0 and out["hr@5"] == 1.0 and out["hr@10"] == 1.0
    assert out["ndcg@5"] == pytest.approx(1 / math.log2(4))  # 0.5
    assert out["mrr"] == pytest.approx(1 / 3)


def test_seen_items_are_excluded_but_never_the_target():
    scores = torch.tensor([[9.0, 0.9, 0.1, 0.5, 0.7, 0.2]])
    # items 1 and 4 were seen: the target (3) moves to rank 0; the target itself is in seen too
    masked = mask_scores(scores, torch.tensor([3]), torch.tensor([[1, 4, 3, 0]]))
    assert masked[0, 3] == 0.5 and torch.isinf(masked[0, [0, 1, 4]]).all()
    m = FullRankingMetrics()
    m.update(scores, torch.tensor([3]), torch.tensor([[1, 4, 3, 0]]))
    assert float(m.compute()["hr@1"]) == 1.0


def test_constant_scores_give_the_random_ranking_expectation():
    n = 100
    m = FullRankingMetrics()
    m.update(torch.zeros(4, n + 1), torch.tensor([1, 2, 3, 4]))
    out = m.compute()
    # target uniform over n ranks (padding excluded)
    assert float(out["hr@10"]) == pytest.approx(10 / n)
    assert float(out["ndcg@10"]) == pytest.approx(sum(1 / math.log2(r + 2) for r in range(10)) / n)
    assert float(out["mrr"]) == pytest.approx(sum(1 / (r + 1) for r in range(n)) / n, rel=1e-6)


def test_tie_expectation_matches_enumeration():
    ahead, ties = torch.tensor([3, 0, 8]), torch.tensor([4, 0, 5])
    out = metrics_from_ranks(ahead, [5, 10], ties)
    for row in range(3):
        ranks = range(int(ahead[row]), int(ahead[row] + ties[row]) + 1)
        for k in (5, 10):
            assert float(out[f"hr@{k}"][row]) == pytest.approx(sum(r < k for r in ranks) / len(ranks))
            assert float(out[f"ndcg@{k}"][row]) == pytest.approx(
                sum(1 / math.log2(r + 2) for r in ranks if r < k) / len(ranks))
        assert float(out["mrr"][row]) == pytest.approx(sum(1 / (r + 1) for r in ranks) / len(ranks))


def test_matches_torchmetrics_retrieval_metrics():
    torch.manual_seed(0)
    users, n_items = 64, 300
    # Positive scores: torchmetrics' reciprocal rank treats a relevant item with a score <= 0
    # as not retrieved, which full ranking never does.
    scores = torch.rand(users, n_items + 1) + 0.01
    target = torch.randint(1, n_items + 1, (users,))
    seen = torch.randint(1, n_items + 1, (users, 20))
    ours = FullRankingMetrics(hr_ks=(1, 5, 10, 20), ndcg_ks=(5, 10, 20))
    ours.update(scores, target, seen)
    ours = {k: float(v) for k, v in ours.compute().items()}

    # torchmetrics on the same candidates: every item except padding and seen non-targets
    masked = mask_scores(scores, target, seen)
    keep = torch.isfinite(masked)
    preds = masked[keep]
    relevance = torch.zeros_like(scores, dtype=torch.bool)
    relevance[torch.arange(users), target] = True
    indexes = torch.arange(users)[:, None].expand_as(scores)[keep]
    rel = relevance[keep]
    for k in (1, 5, 10, 20):
        assert ours[f"hr@{k}"] == pytest.approx(float(RetrievalHitRate(top_k=k)(preds, rel, indexes)), abs=1e-6)
    for k in (5, 10, 20):
        assert ours[f"ndcg@{k}"] == pytest.approx(float(RetrievalNormalizedDCG(top_k=k)(preds, rel, indexes)), abs=1e-6)
    assert ours["mrr"] == pytest.approx(float(RetrievalMRR()(preds, rel, indexes)), abs=1e-6)


def test_target_ranks_counts_ahead_and_ties():
    ahead, ties = target_ranks(torch.tensor([[0.0, 2.0, 1.0, 2.0, 3.0]]), torch.tensor([1]))
    assert ahead.tolist() == [1] and ties.tolist() == [1]


def test_the_paired_bootstrap_interval_holds_the_estimate_shrinks_with_users_and_is_exact_for_equal_models():
    from recsys_compress.evaluation.bootstrap import paired_bootstrap_ratio

    generator = torch.Generator().manual_seed(0)

    def users(n):
        base = torch.rand(n, generator=generator)
        return base, (base * 0.9 + 0.1 * torch.rand(n, generator=generator)).clamp(0, 1)

    widths = []
    for n in (100, 1000, 10000):
        base, other = users(n)
        low, high = paired_bootstrap_ratio(base, other)
        point = float(other.mean() / base.mean())
        assert low < point < high
        widths.append(high - low)
    assert widths[0] > 2 * widths[1] > 4 * widths[2]  # ~1/sqrt(n)
    base, _ = users(500)
    assert paired_bootstrap_ratio(base, base.clone()) == (1.0, 1.0)
    assert paired_bootstrap_ratio(base, base * 0.5) == pytest.approx((0.5, 0.5))
    with pytest.raises(ValueError, match="paired per-user values"):
        paired_bootstrap_ratio(base, base[:-1])


def test_retention_is_the_ratio_of_means_with_its_paired_interval_under_the_key():
    from recsys_compress.evaluation.bootstrap import retention

    assert retention(0.2, 0.1) == {"retention/ndcg@10": 0.5}  # no per-user values: no interval
    assert retention(0.0, 0.1)["retention/ndcg@10"] == pytest.approx(0.1 / 1e-12)
    base = torch.rand(300, generator=torch.Generator().manual_seed(1))
    out = retention(float(base.mean()), float(base.mean()) * 0.5, base, base * 0.5, key="deploy/retention/ndcg@10")
    assert out == pytest.approx({"deploy/retention/ndcg@10": 0.5, "deploy/retention/ndcg@10_ci_low": 0.5,
                                 "deploy/retention/ndcg@10_ci_high": 0.5})
    assert set(retention(1.0, 1.0, base, None)) == {"retention/ndcg@10"}  # one side missing (DDP): no interval


def test_the_metric_keeps_each_examples_value_in_order():
    metric = FullRankingMetrics(keep_per_example="ndcg@10")
    scores = torch.tensor([[0.0, 3.0, 2.0, 1.0], [0.0, 1.0, 2.0, 3.0]])
    metric.update(scores, torch.tensor([1, 1]))
    metric.update(scores[:1], torch.tensor([2]))
    kept = metric.per_example()
    torch.testing.assert_close(kept, torch.tensor([1.0, 1 / math.log2(4), 1 / math.log2(3)], dtype=torch.float64))
    assert float(metric.compute()["ndcg@10"]) == pytest.approx(float(kept.mean()))
    with pytest.raises(ValueError, match="keep_per_example='auc'; allowed: hr@1"):
        FullRankingMetrics(keep_per_example="auc")


@pytest.mark.parametrize("exclude_seen", [True, False])
def test_a_scorer_is_evaluated_under_both_protocols_in_one_pass(exclude_seen):
    """Scores = the item index: user 0's target 3 has seen items 4 and 5 above it (rank 0 with
    them excluded, 2 kept); user 1's target 5 is on top either way."""
    scores = torch.arange(6, dtype=torch.float32)[None].expand(2, -1)
    batch = {"input_ids": torch.tensor([[4, 5], [1, 2]]), "attention_mask": torch.ones(2, 2, dtype=torch.long),
             "seen": torch.tensor([[4, 5], [1, 2]]), "target": torch.tensor([3, 5])}
    calls = []

    def score(ids, mask):
        calls.append((ids, mask))
        return scores[: len(ids)]

    values, per_user = evaluate_scorer(score, [batch], exclude_seen)
    assert len(calls) == 1 and calls[0][0] is batch["input_ids"] and calls[0][1] is batch["attention_mask"]
    assert values["seen_excluded/ndcg@10"] == pytest.approx(1.0)
    assert values["seen_kept/ndcg@10"] == pytest.approx((1 / math.log2(4) + 1) / 2)
    assert values["seen_kept/hr@1"] == pytest.approx(0.5) and values["seen_excluded/hr@1"] == 1.0
    configured = "seen_excluded" if exclude_seen else "seen_kept"
    assert all(values[k] == values[f"{configured}/{k}"] for k in values if "/" not in k)
    expected = [1.0, 1.0] if exclude_seen else [1 / math.log2(4), 1.0]
    torch.testing.assert_close(per_user, torch.tensor(expected, dtype=torch.float64))
