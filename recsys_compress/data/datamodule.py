"""LightningDataModule for next-item prediction with a leave-one-out split.

Per user with items i_1..i_n (time order): i_n is the test target, i_{n-1} the validation
target, i_1..i_{n-2} the training sequence. Inputs are truncated to the last ``max_len``
items. Batches are left-padded with item 0 so that the last position is always the most
recent item.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from recsys_compress.data.preprocess import SequenceData, build_sequences
from recsys_compress.data.formats import read_interactions


def training_windows(sequence: list[int], max_len: int, mode: str) -> list[list[int]]:
    """Windows of up to ``max_len + 1`` items; each gives ``max_len`` next-item targets.

    ``recent``: only the most recent window (SASRec's choice). ``all``: consecutive windows
    overlapping by one item from the end backwards, so every transition is trained on once
    per epoch.
    """
    if len(sequence) < 2:
        return []
    if mode == "recent":
        return [sequence[-(max_len + 1):]]
    if mode != "all":
        raise ValueError(f"dataset.train_windows={mode!r}; allowed: recent, all")
    windows = []
    end = len(sequence)
    while end >= 2:
        windows.append(sequence[max(0, end - max_len - 1):end])
        end -= max_len
    return windows[::-1]


class TrainWindows(Dataset):
    """(user, window) pairs: the user travels with the window so calibration can keep held-out
    users apart from the users its statistics saw."""

    def __init__(self, windows: list[list[int]], users: list[int]):
        if len(windows) != len(users):
            raise ValueError(f"{len(windows)} windows but {len(users)} users")
        self.windows, self.users = windows, users

    def __len__(self) -> int:
        return len(self.windows)

    def __getitem__(self, i: int) -> tuple[int, list[int]]:
        return self.users[i], self.windows[i]


class NextItemExamples(Dataset):
    """(user, history, target): predict ``target`` from ``history`` (the full history is kept
    so that evaluation can exclude every item the user already interacted with)."""

    def __init__(self, sequences: list[list[int]], offset: int):
        # offset 1 -> test (target = last item), 2 -> validation (target = second last).
        self.examples = [
            (u, s[: len(s) - offset], s[len(s) - offset]) for u, s in enumerate(sequences)
        ]

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> tuple[int, list[int], int]:
        return self.examples[i]


def left_pad(seqs: list[list[int]], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad with 0 to the longest sequence (or ``length``); returns ids and mask."""
    length = length or max(len(s) for s in seqs)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    for row, s in enumerate(seqs):
        s = s[-length:]
        if s:
            ids[row, length - len(s):] = torch.as_tensor(s, dtype=torch.long)
    return ids, (ids != 0).long()


def collate_train(batch: list[tuple[int, list[int]]]) -> dict[str, torch.Tensor]:
    users, windows = zip(*batch)
    ids, mask = left_pad(list(windows))
    return {"user": torch.tensor(users), "input_ids": ids, "attention_mask": mask}


class EvalCollator:
    def __init__(self, max_len: int):
        self.max_len = max_len

    def __call__(self, batch: list[tuple[int, list[int], int]]) -> dict[str, torch.Tensor]:
        users, histories, targets = zip(*batch)
        ids, mask = left_pad([h[-self.max_len:] for h in histories])
        seen, _ = left_pad(list(histories))
        return {
            "user": torch.tensor(users),
            "input_ids": ids,
            "attention_mask": mask,
            "target": torch.tensor(targets),
            "seen": seen,  # every item in the user's history, 0-padded
        }


class EpochSeededSampler(Sampler[int]):
    """A random permutation per epoch drawn from ``seed + epoch`` (Lightning calls set_epoch).

    The order of epoch e does not depend on how many epochs this process has run, so a run
    resumed from a checkpoint sees exactly the batches an uninterrupted run would.
    """

    def __init__(self, n: int, seed: int = 0):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.n

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())


class NextItemDataModule(L.LightningDataModule):
    def __init__(
        self,
        format: str,
        path: str | Path,
        name: str | None = None,
        min_rating: float | None = None,
        k_core: int = 0,
        max_len: int = 50,
        train_windows: str = "recent",
        batch_size: int = 128,
        eval_batch_size: int = 256,
        num_workers: int = 0,
        seed: int = 0,
    ):
        super().__init__()
        self.format, self.path, self.name = format, Path(path), name
        self.min_rating, self.k_core = min_rating, k_core
        self.max_len, self.train_windows = max_len, train_windows
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.num_workers, self.seed = num_workers, seed
        self.data: SequenceData | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.data is not None:
            return
        raw = read_interactions(self.format, self.path, self.name)
        self.data = build_sequences(raw, self.min_rating, self.k_core)
        pairs = [
            (user, w)
            for user, s in enumerate(self.data.sequences)
            for w in training_windows(s[:-2], self.max_len, self.train_windows)
        ]
        train = [w for _, w in pairs]
        self.train_set = TrainWindows(train, [user for user, _ in pairs])
        self.val_set = NextItemExamples(self.data.sequences, offset=2)
        self.test_set = NextItemExamples(self.data.sequences, offset=1)
        self.data.stats["train_windows"] = len(train)
        self.data.stats["train_targets"] = sum(len(w) - 1 for w in train)

    @property
    def n_items(self) -> int:
        assert self.data is not None, "call setup() first"
        return self.data.n_items

    def item_counts(self, stage: str = "test") -> torch.Tensor:
        """Interactions per item index in what precedes the ``stage`` targets.

        For ``test`` that is training + validation items (exactly the histories the model
        sees at test time); for ``validate`` the training items only.
        """
        assert self.data is not None, "call setup() first"
        cut = {"test": 1, "validate": 2}[stage]
        flat = [i for s in self.data.sequences for i in s[: len(s) - cut]]
        return torch.bincount(torch.as_tensor(flat, dtype=torch.long), minlength=self.n_items + 1).float()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(
            self.train_set,
            batch_size=self.batch_size,
            sampler=EpochSeededSampler(len(self.train_set), self.seed),
            collate_fn=collate_train,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
        )

    def _eval_loader(self, dataset: Dataset) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            shuffle=False,
            collate_fn=EvalCollator(self.max_len),
            num_workers=self.num_workers,
        )

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader(self.test_set)
