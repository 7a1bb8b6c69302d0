"""Building an inline C++ kernel so that no build can wait forever on a dead one.

torch's `load_inline` guards its build folder with a bare lock file that names no holder and
has no timeout: a process killed while it builds (kill -9, out of memory, a test timeout) leaves
the file behind, and every later build on the machine waits on it at ~1% CPU, silently.
Two virtual environments sharing ~/.cache/torch_extensions also rebuild one another's module.

Here each build gets a folder of its own, named by the torch build, the Python ABI, the
environment's prefix, the source and the compiler flags, so environments never share one;
builders take an flock on a file in it, which the kernel releases however the holder dies, so a
dead holder's lock is simply free.
The lock file records its holder (pid, host, start) for the message a waiter prints. Holding the
flock proves that no other prunebench process is building in the folder, so torch's own lock
file found there is a dead build's and is removed. A wait beyond `timeout_s` (a live but stuck
holder) ends in a one-line error naming the holder.

`optional_extension` is how every kernel of the suite is built: where the build cannot run (no
compiler) the caller's torch path is used instead, with a warning; the environment can ask for
the torch path outright.
"""
from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from prunebench.errors import UserError
from prunebench.cache import cache_root

log = logging.getLogger(__name__)

LOCK_NAME = "prunebench-build.lock"
TORCH_BATON = "lock"  # the file torch.utils.cpp_extension's FileBaton creates in the folder
DEFAULT_TIMEOUT_S = 900.0  # a cold build of the concrete-gate pass takes about a minute
# Set to anything non-empty: no kernel is built, every caller runs its torch path.
NO_CPP_KERNELS_ENV = "PRUNEBENCH_NO_CPP_KERNELS"


def kernels_root() -> Path:
    return cache_root() / "kernels"


def build_folder(name: str, source: str, flags: list[str], root: Path | None = None) -> Path:
    """The folder of one build: everything that makes a different binary is in its name, and the
    environment too: torch's build.ninja names the interpreter's include and library paths, so two
    virtual environments sharing a folder would each see the other's build as stale and rebuild."""
    torch_build = f"{torch.__version__}|{getattr(torch.version, 'git_version', '')}|{sys.implementation.cache_tag}"
    digest = hashlib.sha256("\0".join([torch_build, sys.prefix, source, *flags]).encode()).hexdigest()[:16]
    return (root or kernels_root()) / f"{name}-{digest}"


def describe_holder(lock_path: Path) -> str:
    try:
        holder = json.loads(lock_path.read_text() or "{}")
    except (OSError, ValueError):
        holder = {}
    if not holder:
        return "an unknown process"
    started = time.strftime("%H:%M:%S", time.localtime(holder.get("started", 0)))
    return f"pid {holder.get('pid')} on {holder.get('host')} (since {started})"


@contextmanager
def build_lock(folder: Path, timeout_s: float = DEFAULT_TIMEOUT_S, poll_s: float = 0.2) -> Iterator[Path]:
    """Hold the folder's build lock; yields the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    lock_path = folder / LOCK_NAME
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        announced = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise UserError(
                        f"kernel build in {folder} still held by {describe_holder(lock_path)} after "
                        f"{timeout_s:.0f} s; if that process is stuck, stop it (or set "
                        f"{NO_CPP_KERNELS_ENV}=1 to use the torch path)") from None
                if not announced:
                    log.info("waiting for the kernel build held by %s", describe_holder(lock_path))
                    announced = True
                time.sleep(poll_s)
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                  "started": time.time()}).encode(), 0)
        baton = folder / TORCH_BATON
        if baton.exists():  # only a builder that died inside torch's build leaves it here
            log.warning("removing the lock file of a build that did not finish: %s", baton)
            baton.unlink(missing_ok=True)
        yield folder
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def extension_folder(name: str, source: str, cflags: list[str], ldflags: list[str], root: Path | None = None) -> Path:
    """The folder `load_inline_locked` builds these arguments in."""
    return build_folder(name, source, [*cflags, "|", *ldflags], root)


def load_inline_locked(name: str, source: str, functions: list[str], cflags: list[str],
                       ldflags: list[str], timeout_s: float = DEFAULT_TIMEOUT_S, root: Path | None = None):
    """torch's load_inline in a folder of this build's own, under `build_lock`."""
    from torch.utils.cpp_extension import load_inline

    folder = extension_folder(name, source, cflags, ldflags, root)
    with build_lock(folder, timeout_s):
        # copies: torch appends to the flag lists it is given, which would change the caller's
        # lists and so the folder the next call names
        return load_inline(name=name, cpp_sources=source, functions=list(functions), extra_cflags=list(cflags),
                           extra_ldflags=list(ldflags), build_directory=str(folder), verbose=False)


def extension_name(prefix: str, source: str, cflags: list[str]) -> str:
    """A kernel's module name: its prefix and a digest of its source and compiler flags."""
    digest = hashlib.sha256((source + " ".join(cflags)).encode()).hexdigest()[:12]
    return f"{prefix}_{digest}"


def optional_extension(prefix: str, source: str, functions, cflags: list[str], ldflags, what: str):
    """The compiled kernel (module `extension_name(prefix, source, cflags)`), or None where the
    caller's torch path runs instead: NO_CPP_KERNELS_ENV is set, or the build failed (no
    compiler), which is logged as "<what> kernel unavailable".  A live build-lock holder stuck
    past the timeout stays a UserError: a silent switch to the torch path, whose values differ by
    a few ulps, would hide it."""
    if os.environ.get(NO_CPP_KERNELS_ENV):
        return None
    try:
        return load_inline_locked(extension_name(prefix, source, cflags), source, functions, cflags, ldflags)
    except UserError:
        raise
    except Exception as exc:  # a missing compiler is not an error: the torch path computes the same values
        log.warning("%s kernel unavailable (%s); using torch ops", what, str(exc).splitlines()[0][:200])
        return None
