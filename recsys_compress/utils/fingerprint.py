"""Content fingerprints of data and model files, for cache keys that survive a copy and see an edit.

A path, size and mtime say nothing about an in-place edit of equal size, and change when the
same file is copied anew (the shared models folder is re-created with fresh mtimes), so cache
keys hash the bytes; each file's hash is remembered under its path, size and mtime.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

_HASH_CHUNK = 1 << 20


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()


def content_fingerprint(path: str | Path, cache_dir: str | Path) -> str | None:
    """SHA-256 of a file's bytes, or of a folder's files (names and bytes); None if absent.

    Size and mtime alone miss an in-place edit of equal size, so the bytes are hashed; the
    hash of each file is remembered in ``cache_dir/fingerprints.json`` under its path, size
    and mtime, so a large file is hashed once, not at every run.
    """
    path = Path(path).resolve()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
    else:
        return None
    memo_path = Path(cache_dir) / "fingerprints.json"
    try:
        memo = json.loads(memo_path.read_text())
    except (OSError, ValueError):
        memo = {}
    digest, changed = hashlib.sha256(), False
    for file in files:
        stat = file.stat()
        memo_key = f"{file}|{stat.st_size}|{stat.st_mtime_ns}"
        if memo_key not in memo:
            memo[memo_key], changed = _sha256_file(file), True
        digest.update(f"{file.name}\0{memo[memo_key]}\0".encode())
    if changed:  # written whole and renamed: concurrent jobs at worst hash a file again
        memo_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = memo_path.with_name(f"{memo_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(memo, indent=0, sort_keys=True))
        tmp.replace(memo_path)
    return digest.hexdigest()
