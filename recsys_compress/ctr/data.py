"""The downstream CTR task on MovieLens: (user, item) -> clicked = rating >= threshold.

Two ways to split (``ctr.split_by``):

- ``time`` (default): each user's ratings are ordered by time and split 80/10/10
  (configurable) into train, validation and test, so every split predicts a user's later
  behaviour from earlier behaviour. Almost every test item has been seen in training (warm
  items), so item id embeddings carry most of the signal.
- ``item``: the items themselves are split 80/10/10 at random (seeded) and every rating goes
  with its item: validation and test items never occur in training (item cold start), so
  they have no trained id embedding (the CTR model gives them a zero one, see
  ``CTRSplits.known_items``) and only the item's text representation describes them. This
  is where the layer a representation comes from can matter; ``ctr.item_id_dropout`` trains
  the model for it.

Users and items are indexed 0..n-1 in natural id order; ``item_ids`` is the order the item
representations follow.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler, TensorDataset

from recsys_compress.data.datamodule import EpochSeededSampler
from recsys_compress.data.formats import read_interactions
from recsys_compress.data.readers import ItemInfo


def _natural_key(raw: str) -> tuple[int, int | str]:
    return (0, int(raw)) if raw.isdigit() else (1, raw)


@dataclass
class CTRSplits:
    user_ids: list[str]
    item_ids: list[str]
    item_info: dict[str, ItemInfo]
    splits: dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # user, item, label
    user_info: dict[str, dict[str, str]] = field(default_factory=dict)  # raw user id -> profile

    def recent_train_items(self, n: int) -> list[list[int]]:
        """Per user (index order), the last ``n`` items of their training split, oldest first.

        Training rows are each user's earliest interactions in time order, so a user text built
        from them never sees the validation or test period.
        """
        history: list[list[int]] = [[] for _ in self.user_ids]
        users, items, _ = self.splits["train"]
        for u, i in zip(users.tolist(), items.tolist()):
            history[u].append(i)
        return [h[-n:] if n else [] for h in history]

    def known_items(self) -> torch.Tensor:
        """``[n_items]`` bool: the item occurs in the training split (its id embedding is trained)."""
        return torch.bincount(self.splits["train"][1], minlength=len(self.item_ids)) > 0

    def stats(self) -> dict[str, float]:
        out: dict[str, float] = {"n_users": len(self.user_ids), "n_items": len(self.item_ids)}
        for name, (_, _, label) in self.splits.items():
            out[f"{name}_samples"] = len(label)
            out[f"{name}_positive_rate"] = float(label.mean()) if len(label) else float("nan")
        return out


def build_ctr_splits(
    fmt: str, path: str, name: str | None = None, threshold: float = 4.0,
    split: tuple[float, float, float] = (0.8, 0.1, 0.1), split_by: str = "time", seed: int = 0,
) -> CTRSplits:
    raw = read_interactions(fmt, path, name)
    if raw.ratings is None or raw.timestamps is None:
        raise ValueError(f"{path}: the CTR task needs ratings and timestamps; {raw.source} has "
                         f"{'no ratings' if raw.ratings is None else 'no timestamps'}")
    if abs(sum(split) - 1) > 1e-6 or min(split) < 0:
        raise ValueError(f"split={split} must be three non-negative fractions summing to 1")
    if split_by not in ("time", "item"):
        raise ValueError(f"split_by={split_by!r}; allowed: time, item")
    user_ids = sorted(set(raw.users), key=_natural_key)
    item_ids = sorted(set(raw.items), key=_natural_key)
    u_index = {u: i for i, u in enumerate(user_ids)}
    i_index = {it: i for i, it in enumerate(item_ids)}
    per_user: dict[int, list[tuple[float, int, int, float]]] = {}
    for row, (u, it, r, t) in enumerate(zip(raw.users, raw.items, raw.ratings, raw.timestamps)):
        per_user.setdefault(u_index[u], []).append((t, row, i_index[it], r))
    parts: dict[str, list[tuple[int, int, float]]] = {"train": [], "val": [], "test": []}
    if split_by == "item":
        order = torch.randperm(len(item_ids), generator=torch.Generator().manual_seed(seed)).tolist()
        item_part = dict(zip(order, _parts_in_order(len(item_ids), split)))
    for u, events in per_user.items():
        events.sort()  # by time, then file order: stable for equal timestamps
        user_part = _parts_in_order(len(events), split) if split_by == "time" else None
        for k, (_, _, item, rating) in enumerate(events):
            part = user_part[k] if user_part is not None else item_part[item]
            parts[part].append((u, item, float(rating >= threshold)))
    splits = {}
    for part, rows in parts.items():
        t = torch.tensor(rows, dtype=torch.float64) if rows else torch.zeros(0, 3, dtype=torch.float64)
        splits[part] = (t[:, 0].long(), t[:, 1].long(), t[:, 2].float())
    return CTRSplits(user_ids, item_ids, raw.item_info, splits, raw.user_info)


def _parts_in_order(n: int, split: tuple[float, float, float]) -> list[str]:
    """The part ("train" | "val" | "test") of each of ``n`` ordered things, in the split's fractions."""
    n_train = round(n * split[0])
    n_val = round(n * (split[0] + split[1])) - n_train
    return ["train"] * n_train + ["val"] * n_val + ["test"] * (n - n_train - n_val)


class ItemGroupBatchSampler(Sampler[list[int]]):
    """Batches of sample indices: all samples of ``items_per_batch`` shuffled items at a time.

    ``sampler`` orders the items from ``seed + epoch``. Lightning finds it where it looks on a
    torch ``BatchSampler`` and sets its epoch before every epoch, so a resumed run sees the
    item order of an uninterrupted one.
    """

    def __init__(self, items: torch.Tensor, items_per_batch: int, seed: int = 0):
        order = torch.argsort(items, stable=True)
        counts = torch.bincount(items)
        self.by_item = [g for g in torch.split(order, counts.tolist()) if len(g)]
        self.items_per_batch = items_per_batch
        self.sampler = EpochSeededSampler(len(self.by_item), seed)

    def __len__(self) -> int:
        return -(-len(self.by_item) // self.items_per_batch)

    def __iter__(self) -> Iterator[list[int]]:
        perm = list(self.sampler)
        for start in range(0, len(perm), self.items_per_batch):
            yield torch.cat([self.by_item[i] for i in perm[start:start + self.items_per_batch]]).tolist()


class CTRDataModule(L.LightningDataModule):
    """Train/val/test loaders over a ``CTRSplits``. Training batches are random samples
    (``batch_by="sample"``, ``batch_size`` each) or every training sample of
    ``items_per_batch`` random items (``batch_by="item"``), the batches MARC's task module
    trains on, so a CTR model can be trained the same way."""

    def __init__(self, data: CTRSplits, batch_size: int = 2048, eval_batch_size: int = 8192, seed: int = 0,
                 batch_by: str = "sample", items_per_batch: int = 32):
        super().__init__()
        if batch_by not in ("sample", "item"):
            raise ValueError(f"batch_by={batch_by!r}; allowed: sample, item")
        self.data = data
        self.batch_size, self.eval_batch_size, self.seed = batch_size, eval_batch_size, seed
        self.batch_by, self.items_per_batch = batch_by, items_per_batch

    def _loader(self, part: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(TensorDataset(*self.data.splits[part]), shuffle=shuffle, generator=generator,
                          batch_size=self.batch_size if shuffle else self.eval_batch_size)

    def train_dataloader(self) -> DataLoader:
        if self.batch_by == "item":
            return self.item_grouped_loader(self.items_per_batch)
        return self._loader("train", True)

    def item_grouped_loader(self, items_per_batch: int) -> DataLoader:
        """Training batches of every sample of ``items_per_batch`` items at a time."""
        train = self.data.splits["train"]
        return DataLoader(TensorDataset(*train),
                          batch_sampler=ItemGroupBatchSampler(train[1], items_per_batch, self.seed))

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False)
