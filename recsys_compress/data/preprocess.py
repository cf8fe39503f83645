"""From a raw interaction log to per-user item sequences with contiguous ids.

Steps, each counted in ``SequenceData.stats`` so that nothing disappears unreported:
rating threshold -> k-core -> drop users too short for leave-one-out -> stable time sort
-> id mapping (item index 0 is padding).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from recsys_compress.data.readers import ItemInfo, RawInteractions


class EmptyDatasetError(ValueError):
    """Filtering removed every interaction."""


@dataclass
class SequenceData:
    """Per-user item sequences in time order; item ids are 1..n_items (0 is padding)."""

    sequences: list[list[int]]
    user_ids: list[str]
    item_ids: list[str]  # item_ids[i - 1] is the raw id of item index i
    item_info: list[ItemInfo | None]  # index 0 (padding) is None
    stats: dict[str, float] = field(default_factory=dict)

    @property
    def n_users(self) -> int:
        return len(self.sequences)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def n_interactions(self) -> int:
        return sum(len(s) for s in self.sequences)

    def item_texts(self) -> list[str]:
        """Text of every item index (index 0 is ''); items without metadata get their raw id."""
        texts = [""]
        for raw, info in zip(self.item_ids, self.item_info[1:]):
            text = info.text() if info is not None else ""
            texts.append(text or f"Item {raw}")
        return texts


def _natural_key(raw: str) -> tuple[int, int | str]:
    return (0, int(raw)) if raw.isdigit() else (1, raw)


def k_core(
    users: list[str], items: list[str], k: int
) -> tuple[list[bool], int]:
    """Iteratively keep interactions whose user and item both have >= k of them.

    Returns the keep mask and the number of rounds it took to converge.
    """
    keep = [True] * len(users)
    rounds = 0
    while True:
        rounds += 1
        uc = Counter(u for u, m in zip(users, keep) if m)
        ic = Counter(i for i, m in zip(items, keep) if m)
        changed = False
        for n, (u, i) in enumerate(zip(users, items)):
            if keep[n] and (uc[u] < k or ic[i] < k):
                keep[n] = False
                changed = True
        if not changed:
            return keep, rounds


def build_sequences(
    raw: RawInteractions,
    min_rating: float | None = None,
    k_core_min: int = 0,
    min_user_interactions: int = 3,
) -> SequenceData:
    """Filter, sort and index ``raw``.

    ``min_rating``: keep interactions rated >= this (None: every rating counts).
    ``k_core_min``: iterative k-core on users and items (0 or 1: off).
    ``min_user_interactions``: users with fewer are dropped (leave-one-out needs 3).
    """
    n = len(raw)
    stats: dict[str, float] = {"raw_interactions": n}
    keep = [True] * n
    if min_rating is not None:
        if raw.ratings is None:
            raise ValueError(
                f"dataset.min_rating={min_rating} but {raw.source} has no rating column"
            )
        keep = [r >= min_rating for r in raw.ratings]
    stats["dropped_by_min_rating"] = n - sum(keep)

    idx = [j for j in range(n) if keep[j]]
    users = [raw.users[j] for j in idx]
    items = [raw.items[j] for j in idx]
    if k_core_min > 1:
        core, rounds = k_core(users, items, k_core_min)
        stats["dropped_by_k_core"] = len(idx) - sum(core)
        stats["k_core_rounds"] = rounds
        idx = [j for j, m in zip(idx, core) if m]
    else:
        stats["dropped_by_k_core"] = 0

    counts = Counter(raw.users[j] for j in idx)
    short = {u for u, c in counts.items() if c < min_user_interactions}
    stats["dropped_short_users"] = len(short)
    stats["dropped_short_user_interactions"] = sum(counts[u] for u in short)
    idx = [j for j in idx if raw.users[j] not in short]
    if not idx:
        raise EmptyDatasetError(
            f"dataset {raw.source} is empty after filtering: {n} raw interactions, "
            f"{stats['dropped_by_min_rating']} below min_rating={min_rating}, "
            f"{stats['dropped_by_k_core']} removed by k_core={k_core_min}, "
            f"{stats['dropped_short_users']} users with < {min_user_interactions} interactions"
        )

    # Stable sort: ties in timestamp keep file order.
    if raw.timestamps is not None:
        idx.sort(key=lambda j: raw.timestamps[j])

    item_ids = sorted({raw.items[j] for j in idx}, key=_natural_key)
    user_ids = sorted({raw.users[j] for j in idx}, key=_natural_key)
    item_index = {r: i + 1 for i, r in enumerate(item_ids)}
    user_index = {r: u for u, r in enumerate(user_ids)}
    sequences: list[list[int]] = [[] for _ in user_ids]
    for j in idx:
        sequences[user_index[raw.users[j]]].append(item_index[raw.items[j]])

    item_info: list[ItemInfo | None] = [None] + [raw.item_info.get(r) for r in item_ids]
    data = SequenceData(sequences, user_ids, item_ids, item_info, stats)
    lengths = sorted(len(s) for s in sequences)
    stats.update(
        n_users=data.n_users,
        n_items=data.n_items,
        n_interactions=data.n_interactions,
        avg_seq_len=data.n_interactions / data.n_users,
        median_seq_len=lengths[len(lengths) // 2],
        max_seq_len=lengths[-1],
        density=data.n_interactions / (data.n_users * data.n_items),
        items_without_text=sum(1 for info in item_info[1:] if info is None),
    )
    return data
