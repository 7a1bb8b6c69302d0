"""The pinned environment (constraints.txt at the repository root) and whether this process runs in it.

Every record carries `lock_fingerprint()`, so a figure that does not reproduce can be traced to
an environment that differs from the lock (or to a lock that changed).
"""
from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

LOCK_FILE = "constraints.txt"
DEFAULT_LOCK = Path(__file__).resolve().parents[2] / LOCK_FILE


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()  # PEP 503: the name pip compares


def parse_constraints(text: str) -> dict[str, str]:
    """{normalized name: pinned version} for every `name==version` line (comments, markers dropped)."""
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].split(";", 1)[0].strip()
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*===?\s*(\S+)", line)
        if m:
            pins[_normalize(m.group(1))] = m.group(3)
    return pins


def _installed() -> dict[str, str]:
    from importlib.metadata import distributions

    out = {}
    for dist in distributions():
        name = dist.metadata["Name"]
        if name:
            out.setdefault(_normalize(name), dist.version)
    return out


def _version_matches(installed: str, pinned: str) -> bool:
    # As pip reads `==`: a pin without a local label (+cpu) accepts any local build of that release.
    try:
        from packaging.version import Version

        have, want = Version(installed), Version(pinned)
        return have == want if want.local else Version(have.public) == want
    except Exception:  # an unparsable version: compare the text
        return installed == pinned or (installed.split("+", 1)[0] == pinned and "+" not in pinned)


@functools.lru_cache(maxsize=None)
def _fingerprint(path: str) -> tuple:
    p = Path(path)
    try:
        data = p.read_bytes()
    except OSError:
        return None, False, ()
    pins = parse_constraints(data.decode("utf-8", errors="replace"))
    installed = _installed()
    mismatches = tuple(sorted(n for n, v in pins.items() if n not in installed or not _version_matches(installed[n], v)))
    return hashlib.sha256(data).hexdigest(), not mismatches, mismatches


def lock_fingerprint(path=None) -> dict:
    """{"file", "sha256", "matches", "mismatches"}: computed once per process (per lock file).

    sha256 is None and matches False where the lock file is absent (a non-editable install).
    """
    p = Path(path) if path is not None else DEFAULT_LOCK
    sha, matches, mismatches = _fingerprint(str(p.resolve()))
    return {"file": LOCK_FILE if path is None else str(p), "sha256": sha, "matches": matches,
            "mismatches": list(mismatches)}
