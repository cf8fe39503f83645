"""Left- and right-padded histories (numpy only: the serving runtime imports it without torch)."""

from __future__ import annotations

import numpy as np


def to_right_padding(input_ids: np.ndarray, attention_mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded histories (the datamodule's batches, ``Recommender.encode``) -> the right-padded
    form the artefact's graph takes: each row's items moved to its front, in order."""
    width = input_ids.shape[1]
    order = (np.arange(width)[None, :] + (width - attention_mask.sum(1, keepdims=True))) % width
    ids, mask = np.take_along_axis(input_ids, order, 1), np.take_along_axis(attention_mask, order, 1)
    if (np.diff(mask, axis=1) > 0).any():
        raise ValueError("histories must be left-padded: padding (mask 0) only before the first item")
    return ids, mask
