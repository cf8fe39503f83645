import torch

from conftest import SMALL
from recsys_compress.data.datamodule import EvalCollator, NextItemDataModule, left_pad, training_windows


def test_training_windows_recent_and_all():
    seq = list(range(1, 12))  # 11 items -> 10 transitions
    assert training_windows(seq, 4, "recent") == [[7, 8, 9, 10, 11]]
    windows = training_windows(seq, 4, "all")
    assert windows == [[1, 2, 3], [3, 4, 5, 6, 7], [7, 8, 9, 10, 11]]
    transitions = [(w[i], w[i + 1]) for w in windows for i in range(len(w) - 1)]
    assert sorted(transitions) == [(i, i + 1) for i in range(1, 11)]  # each exactly once
    assert training_windows([5], 4, "all") == []


def test_left_pad():
    ids, mask = left_pad([[1, 2, 3], [4]])
    assert ids.tolist() == [[1, 2, 3], [0, 0, 4]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]


def test_leave_one_out_on_real_data():
    dm = NextItemDataModule("grouplens_csv", SMALL, max_len=5)
    dm.setup()
    seqs = dm.data.sequences
    assert len(dm.train_set) == len(seqs) == len(dm.val_set) == len(dm.test_set) == 610
    for u in (0, 17, 609):
        s = seqs[u]
        assert dm.train_set[u] == (u, s[:-2][-6:])  # max_len inputs + 1 for the last target
        user, history, target = dm.val_set[u]
        assert (user, history, target) == (u, s[:-2], s[-2])
        user, history, target = dm.test_set[u]
        assert (user, history, target) == (u, s[:-1], s[-1])
    # no test target ever appears in a training window of the same user
    for u, s in enumerate(seqs[:50]):
        assert len(dm.train_set[u][1]) <= 6 and dm.train_set[u] == (u, s[: len(s) - 2][-6:])
    batch = EvalCollator(5)([dm.test_set[0], dm.test_set[1]])
    assert batch["input_ids"].shape == (2, 5)
    assert batch["input_ids"][0].tolist() == seqs[0][-6:-1]
    assert batch["target"].tolist() == [seqs[0][-1], seqs[1][-1]]
    assert set(batch["seen"][0].tolist()) - {0} == set(seqs[0][:-1])


def test_item_counts_follow_the_stage():
    dm = NextItemDataModule("grouplens_csv", SMALL)
    dm.setup()
    assert dm.item_counts("test").sum() == dm.data.n_interactions - dm.data.n_users
    assert dm.item_counts("validate").sum() == dm.data.n_interactions - 2 * dm.data.n_users
    assert dm.item_counts("test")[0] == 0


def test_train_loader_is_seeded():
    def first_batch(seed):
        dm = NextItemDataModule("grouplens_csv", SMALL, batch_size=8, seed=seed)
        dm.setup()
        return next(iter(dm.train_dataloader()))["input_ids"]

    assert torch.equal(first_batch(3), first_batch(3))
    assert not torch.equal(first_batch(3), first_batch(4))
