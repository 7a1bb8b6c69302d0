"""Content fingerprints: sha256 of text, JSON, files and folders.

Large files' hashes are also cached on disk, keyed by (path, size, mtime). The base layer: the
model loader and the data stream need these, below the provenance code that builds cell keys.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

from prunebench.cache import cache_root


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(obj) -> str:
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))


@functools.lru_cache(maxsize=None)
def _disk_cache() -> Path:
    return cache_root() / "file_sha256"


@functools.lru_cache(maxsize=256)
def _file_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    entry = _disk_cache() / (sha256_text(f"{path}|{size}|{mtime_ns}")[:32] + ".txt")
    if size >= 1 << 24:  # files of 16 MiB and more: remember the hash on disk (model weights)
        try:
            cached = entry.read_text().strip()
            if len(cached) == 64:
                return cached
        except OSError:
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if size >= 1 << 24:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(digest)
            os.replace(tmp, entry)
        except OSError:  # a read-only cache only costs time
            pass
    return digest


def file_sha256(path) -> str:
    p = Path(path).resolve()
    st = p.stat()
    return _file_sha256_cached(str(p), st.st_size, st.st_mtime_ns)


def tree_sha256(directory) -> str:
    """Every file under a directory (names and contents), hidden files excluded."""
    root = Path(directory)
    files = sorted(q for q in root.rglob("*") if q.is_file() and not any(part.startswith(".") for part in q.relative_to(root).parts))
    return sha256_json({str(q.relative_to(root)): file_sha256(q) for q in files})
