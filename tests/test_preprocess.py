import pytest

from conftest import SMALL
from recsys_compress.data.preprocess import EmptyDatasetError, build_sequences, k_core
from recsys_compress.data.readers import RawInteractions, read_grouplens_csv


def raw(rows, ratings=None):
    users, items, ts = zip(*rows)
    return RawInteractions(list(users), list(items), ratings, [float(t) for t in ts], {}, "test")


def test_time_sort_is_stable_on_ties_and_ids_are_contiguous():
    data = build_sequences(raw([("u", "30", 5), ("u", "10", 1), ("u", "20", 5), ("u", "40", 9), ("v", "10", 0),
                                ("v", "20", 0), ("v", "30", 0)]))
    # items sorted by natural id order: 10 -> 1, 20 -> 2, 30 -> 3, 40 -> 4
    assert data.item_ids == ["10", "20", "30", "40"]
    assert data.sequences[0] == [1, 3, 2, 4]  # ties at t=5 keep file order (30 before 20)
    assert data.sequences[1] == [1, 2, 3]
    assert data.n_interactions == 7 and data.stats["n_items"] == 4


def test_min_rating_counts_what_it_drops():
    r = raw([("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("u", "d", 4)], ratings=[5.0, 1.0, 4.0, 4.5])
    data = build_sequences(r, min_rating=4.0)
    assert data.stats["dropped_by_min_rating"] == 1
    assert data.n_interactions == 3


def test_short_users_are_dropped_and_reported():
    data = build_sequences(raw([("u", "a", 1), ("u", "b", 2), ("u", "c", 3), ("v", "a", 1), ("v", "b", 2)]))
    assert data.user_ids == ["u"]
    assert data.stats["dropped_short_users"] == 1
    assert data.stats["dropped_short_user_interactions"] == 2


def test_k_core_on_real_data_holds_the_core_property():
    r = read_grouplens_csv(SMALL)
    data = build_sequences(r, k_core_min=10)
    from collections import Counter

    item_counts = Counter(i for s in data.sequences for i in s)
    assert min(len(s) for s in data.sequences) >= 10
    assert min(item_counts.values()) >= 10
    assert data.stats["dropped_by_k_core"] == 100_836 - data.n_interactions - data.stats["dropped_short_user_interactions"]
    assert data.stats["dropped_by_k_core"] > 0


def test_k_core_cascades():
    # Dropping item c (1 interaction) leaves w with 1 interaction, which then must go too.
    keep, rounds = k_core(["u", "u", "v", "v", "w", "w"], ["a", "b", "a", "b", "a", "c"], 2)
    assert keep == [True, True, True, True, False, False]
    assert rounds >= 2


def test_empty_after_filtering_says_so():
    r = raw([("u", "a", 1), ("u", "b", 2), ("u", "c", 3)], ratings=[1.0, 2.0, 1.0])
    with pytest.raises(EmptyDatasetError, match="empty after filtering.*3 below min_rating=4"):
        build_sequences(r, min_rating=4.0)


def test_min_rating_without_ratings_column_is_an_error():
    with pytest.raises(ValueError, match="has no rating column"):
        build_sequences(raw([("u", "a", 1)]), min_rating=4.0)


def test_item_texts_fall_back_to_raw_id():
    data = build_sequences(raw([("u", "a", 1), ("u", "b", 2), ("u", "c", 3)]))
    assert data.item_texts() == ["", "Item a", "Item b", "Item c"]
    assert data.stats["items_without_text"] == 3
