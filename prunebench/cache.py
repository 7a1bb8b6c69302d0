"""The one folder prunebench caches into (dequantised models, token windows, file hashes, built
kernels): $PRUNEBENCH_CACHE, else ~/.cache/prunebench."""
import os
from pathlib import Path


def cache_root() -> Path:
    return Path(os.environ.get("PRUNEBENCH_CACHE", Path.home() / ".cache" / "prunebench"))
