"""Top-K next items for a history, from an atomic model's exported ONNX artefact (no torch
needed); ``deploy/serve.py`` is the command line (``recsys-recommend``), for generative artefacts too."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from recsys_compress.models.padding import to_right_padding

FORMAT = "recsys-compress/onnx-v2"  # kept equal to export.FORMAT; this module must not import torch


def share_one_thread_pool(threads: int) -> None:
    """Make every ``Recommender`` this process creates from now on run on one pool of
    ``threads`` intra-op threads (onnxruntime's global thread pool; onnxruntime then refuses
    sessions with a pool of their own). Several artefacts in one process otherwise each keep a
    pool, and an idle pool's worker takes a core from the session that runs (SmolLM2, 50
    items, 2 threads: a 576 x 209 factor matmul ran single-threaded, 120 us instead of 65 us)."""
    global _shared_pool_threads
    from onnxruntime.capi import _pybind_state  # the Python binding of CreateEnvWithGlobalThreadPools

    _pybind_state.set_global_thread_pool_sizes(threads, 1)
    _shared_pool_threads = threads


_shared_pool_threads: int | None = None  # set by share_one_thread_pool


@dataclass
class Recommendation:
    item_id: str
    text: str
    score: float


class Recommender:
    """An onnxruntime session over an artefact folder written by ``export_onnx``: ``threads``
    intra-op threads of its own (onnxruntime's default: one per core), or, after
    ``share_one_thread_pool``, the process's shared pool."""

    def __init__(self, folder: str | Path, threads: int | None = None):
        import onnxruntime as ort

        if threads and _shared_pool_threads is not None and threads != _shared_pool_threads:
            raise ValueError(f"threads={threads}, but this process shares one pool of "
                             f"{_shared_pool_threads} threads (share_one_thread_pool)")

        folder = Path(folder)
        for name in ("model.onnx", "items.json", "deploy.json"):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"{folder} is not an exported artefact: {name} is missing")
        self.meta = json.loads((folder / "deploy.json").read_text())
        if self.meta.get("format") != FORMAT:
            raise ValueError(f"{folder}/deploy.json has format {self.meta.get('format')!r}, expected {FORMAT!r}: export it again with this version")
        self.items = json.loads((folder / "items.json").read_text())
        self.item_ids: list[str] = self.items["ids"]
        self.texts: list[str] = self.items["texts"]
        self.index = {raw: i + 1 for i, raw in enumerate(self.item_ids)}
        self.max_len: int = self.meta["max_len"]
        options = ort.SessionOptions()
        options.use_per_session_threads = _shared_pool_threads is None
        if threads and _shared_pool_threads is None:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])

    def encode(self, histories: Sequence[Sequence[str]]) -> tuple[np.ndarray, np.ndarray]:
        """Left-padded ``(input_ids, attention_mask)`` of raw-id histories (last ``max_len`` kept)."""
        if not histories:
            raise ValueError("no history given")
        rows = []
        for history in histories:
            unknown = [h for h in history if h not in self.index]
            if unknown:
                raise KeyError(f"unknown item ids {unknown[:10]} (the artefact knows {len(self.index)} items)")
            if not history:
                raise ValueError("a history is empty: at least one item is needed")
            rows.append([self.index[h] for h in history][-self.max_len:])
        width = max(2, max(len(r) for r in rows))  # the graph was exported for length >= 2
        ids = np.zeros((len(rows), width), dtype=np.int64)
        mask = np.zeros_like(ids)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = r
            mask[i, width - len(r):] = 1
        return ids, mask

    def scores(self, histories: Sequence[Sequence[str]]) -> np.ndarray:
        """Scores of every item index (column 0 is padding) for each history."""
        return self.score_indices(*self.encode(histories))

    def score_indices(self, input_ids: np.ndarray, attention_mask: np.ndarray) -> np.ndarray:
        """Scores of every item index for left-padded item-index histories (the model's own
        inputs, as the datamodule's batches hold them)."""
        ids, mask = to_right_padding(input_ids.astype(np.int64), attention_mask.astype(np.int64))
        return self.session.run(None, {"input_ids": ids, "attention_mask": mask})[0]

    def recommend(self, history: Sequence[str], k: int = 10, exclude_seen: bool = True) -> list[Recommendation]:
        """The ``k`` highest-scoring items after ``history``, best first."""
        if k < 1:
            raise ValueError(f"k={k}; allowed: >= 1")
        scores = self.scores([history])[0].astype(np.float64)
        scores[0] = -np.inf  # padding is not an item
        if exclude_seen:
            scores[[self.index[h] for h in history]] = -np.inf
        k = min(k, int(np.isfinite(scores).sum()))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        return [Recommendation(self.item_ids[i - 1], self.texts[i - 1], float(scores[i])) for i in top]
