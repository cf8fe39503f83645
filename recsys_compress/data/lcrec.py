"""LC-Rec's JSON layout: interactions, item text and semantic item IDs, read and written.

A dataset folder holds ``<name>.inter.json`` ({user: [item, ...] in time order}), optionally
``<name>.item.json`` ({item: {"title", "description", "brand", "categories"}}) and
``<name>.index.json`` ({item: ["<a_137>", "<b_112>", ...]}: each item's code tuple, one token
per level). LC-Rec, LETTER and TIGER code read and write these files, so an index moves between
them and this project unchanged (``read_index`` / ``write_index``). Splits follow LC-Rec: an
item list's last item is the test target, the one before the validation target, which is the
project's leave-one-out split of the same sequences.

Every malformed file fails naming the file, the item and what was expected.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from recsys_compress.data.readers import DataFormatError, ItemInfo, RawInteractions, read_text, require_file

# One code token: a lower-case level letter and the code's number, as LC-Rec writes them.
CODE_TOKEN = re.compile(r"<([a-z])_(\d+)>")


def _load_json(path: Path, expected: str) -> Any:
    require_file(path, expected)
    try:
        return json.loads(read_text(path, line_based=False))
    except json.JSONDecodeError as e:
        raise DataFormatError(f"{path}:{e.lineno}:{e.colno}: not valid JSON ({e.msg}); expected {expected}") from None


def read_lcrec(folder: str | Path, name: str | None = None) -> RawInteractions:
    """``<name>.inter.json`` (and ``<name>.item.json`` where present) as a raw interaction log:
    one row per (user, item) in each user's order; the position is the time."""
    folder = Path(folder)
    name = name or folder.name
    path = folder / f"{name}.inter.json"
    inter = _load_json(path, "an object {user: [item, ...]} with each user's items in time order")
    if not isinstance(inter, dict):
        raise DataFormatError(f"{path}: expected an object {{user: [item, ...]}}, got a {type(inter).__name__}")
    users, items, timestamps = [], [], []
    for user, sequence in inter.items():
        if not isinstance(sequence, list) or not sequence:
            raise DataFormatError(f"{path}: user {user!r} has {sequence!r}; expected a non-empty list of items")
        for item in sequence:
            if isinstance(item, bool) or not isinstance(item, (int, str)):
                raise DataFormatError(f"{path}: user {user!r} has item {item!r}; expected an item id (int or str)")
            timestamps.append(float(len(items)))  # a global counter keeps each user's order
            users.append(str(user))
            items.append(str(item))
    item_path = folder / f"{name}.item.json"
    return RawInteractions(users, items, None, timestamps, read_item_text(item_path) if item_path.is_file() else {},
                           str(path))


def read_item_text(path: str | Path) -> dict[str, ItemInfo]:
    """``<name>.item.json``: each item's title (its description, brand and categories joined into
    the text after it, as LC-Rec's prompts read them)."""
    path = Path(path)
    raw = _load_json(path, "an object {item: {title, description, brand, categories}}")
    if not isinstance(raw, dict):
        raise DataFormatError(f"{path}: expected an object {{item: {{title, ...}}}}, got a {type(raw).__name__}")
    info = {}
    for item, fields in raw.items():
        if not isinstance(fields, dict):
            raise DataFormatError(f"{path}: item {item!r} has {fields!r}; expected an object with a title")
        title = str(fields.get("title") or "").strip() or None
        details = [str(fields[k]).strip() for k in ("brand", "categories", "description") if fields.get(k)]
        info[str(item)] = ItemInfo(title=title, genres=details)
    return info


def read_index(path: str | Path, items: Iterable[str] | None = None) -> dict[str, tuple[str, ...]]:
    """``<name>.index.json``: item -> its code tuple. Every tuple must have the same length and
    every token the form ``<letter_number>``; with ``items`` (the interactions' items) every one
    of them must have a tuple."""
    path = Path(path)
    raw = _load_json(path, "an object {item: [code token, ...]}, e.g. {\"0\": [\"<a_137>\", \"<b_112>\"]}")
    if not isinstance(raw, dict) or not raw:
        raise DataFormatError(f"{path}: expected a non-empty object {{item: [code token, ...]}}")
    index: dict[str, tuple[str, ...]] = {}
    length = None
    for item, tokens in raw.items():
        if not isinstance(tokens, list) or not tokens:
            raise DataFormatError(f"{path}: item {item!r} has {tokens!r}; expected a list of code tokens")
        for token in tokens:
            if not isinstance(token, str) or not CODE_TOKEN.fullmatch(token):
                raise DataFormatError(f"{path}: item {item!r} has code token {token!r}; expected <letter_number>, "
                                      "e.g. <a_137>")
        if length is None:
            length, first = len(tokens), item
        elif len(tokens) != length:
            raise DataFormatError(f"{path}: item {item!r} has {len(tokens)} code tokens, item {first!r} has {length}; "
                                  "every tuple must have the same length")
        index[str(item)] = tuple(tokens)
    if items is not None:
        missing = sorted({str(i) for i in items} - set(index), key=lambda i: (len(i), i))
        if missing:
            raise DataFormatError(f"{path}: {len(missing)} item(s) of the interactions have no code tuple, "
                                  f"e.g. item {missing[0]!r}; expected one for every item")
    return index


def write_index(path: str | Path, index: Mapping[str, Iterable[str]]) -> Path:
    """Write ``index`` as LC-Rec's ``<name>.index.json`` (read back unchanged by ``read_index``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({str(k): list(v) for k, v in index.items()}))
    tmp.replace(path)
    return path


def colliding_groups(index: Mapping[str, tuple[str, ...]]) -> list[list[str]]:
    """Groups of items that share one code tuple (two or more items each), largest first."""
    by_tuple: dict[tuple[str, ...], list[str]] = {}
    for item, tokens in index.items():
        by_tuple.setdefault(tuple(tokens), []).append(item)
    return sorted((g for g in by_tuple.values() if len(g) > 1), key=len, reverse=True)


def index_stats(index: Mapping[str, tuple[str, ...]]) -> dict[str, float]:
    """Items, distinct tuples, levels, colliding groups and the items in them; per level the codes
    used and the perplexity of their use (exp of its entropy: the number of codes when every
    code is used equally)."""
    groups = colliding_groups(index)
    tuples = list(index.values())
    out: dict[str, float] = {"items": len(tuples), "tuples": len(set(tuples)), "levels": len(tuples[0]),
                             "colliding_groups": len(groups), "colliding_items": sum(len(g) for g in groups)}
    for level in range(len(tuples[0])):
        shares = [c / len(tuples) for c in Counter(t[level] for t in tuples).values()]
        out[f"level_{level}/codes_used"] = len(shares)
        out[f"level_{level}/perplexity"] = math.exp(-sum(p * math.log(p) for p in shares))
    return out
