"""Progress bars that stay quiet when asked (tests, CI logs) or when tqdm is not wanted."""
from __future__ import annotations

import os
import sys


class _Silent:
    def update(self, n=1):
        pass

    def set_postfix(self, *args, **kwargs):
        pass

    def set_description(self, *args, **kwargs):
        pass

    def close(self):
        pass


def progress_bar(total=None, desc="", enabled=True, unit="it", leave=False, position=None):
    if not enabled or os.environ.get("PRUNEBENCH_NO_PROGRESS") == "1":
        return _Silent()
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=leave, file=sys.stderr, dynamic_ncols=True,
                position=position, mininterval=0.5)
