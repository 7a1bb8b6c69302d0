"""Atomic file writes: records, reports, caches.

A report is rebuilt while other processes (a notebook, a second `prunebench report`) may read the
same folder, so every file is written to a temporary sibling and moved into place with
os.replace, which is atomic within one filesystem: a reader sees the old file or the new one,
never half of one.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

SHARED_FILE_MODE = 0o644


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success move it onto `path`, else delete it.

    The temporary name ends in ".tmp" (ignored by the repository's .gitignore) and keeps the
    target's suffix before it, so writers that pick a format from the suffix still see it.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary_name = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.stem}.", suffix=f"{target.suffix}.tmp")
    os.close(handle)
    # mkstemp creates the file private (0600); reports are shared outputs, readable like any
    # file the user writes (reading the umask would mean changing it, a process-wide side effect).
    os.chmod(temporary_name, SHARED_FILE_MODE)
    temporary = Path(temporary_name)
    try:
        yield temporary
        os.replace(temporary, target)
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return Path(path)
