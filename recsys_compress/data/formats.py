"""The dataset formats by name (``dataset.format``) and reading one: the readers of
``readers.py`` and LC-Rec's JSON layout (``lcrec.py``, which builds on ``readers.py``'s types)."""

from __future__ import annotations

from pathlib import Path

from recsys_compress.data.lcrec import read_lcrec
from recsys_compress.data.readers import RawInteractions, read_grouplens_csv, read_recbole_atomic, read_sequence_text

READERS = {
    "grouplens_csv": read_grouplens_csv,
    "recbole_atomic": read_recbole_atomic,
    "sequence_text": read_sequence_text,
    "lcrec_json": read_lcrec,  # data/lcrec.py: NAME.inter.json (+ NAME.item.json, NAME.index.json)
}
# the formats whose files are named after the dataset (dataset.file_name, else the folder's name)
NAMED_FORMATS = ("recbole_atomic", "lcrec_json")


def read_interactions(fmt: str, path: str | Path, name: str | None = None) -> RawInteractions:
    """Dispatch on ``fmt`` (one of ``READERS``)."""
    if fmt not in READERS:
        raise ValueError(f"dataset.format={fmt!r} is not supported; allowed: {', '.join(READERS)}")
    if fmt in NAMED_FORMATS:
        return READERS[fmt](path, name)
    return READERS[fmt](path)
