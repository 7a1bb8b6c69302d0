"""A kernel build never waits on a dead builder, and a live stuck one ends in one line."""
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from prunebench.errors import UserError
from prunebench.engines import kernel_build
from prunebench.engines.kernel_build import (
    LOCK_NAME, NO_CPP_KERNELS_ENV, TORCH_BATON, build_folder, build_lock, optional_extension
)

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from prunebench.engines.kernel_build import build_lock, TORCH_BATON
    with build_lock(Path(sys.argv[1])) as folder:
        (folder / TORCH_BATON).touch()  # as torch leaves it when killed mid-build
        print("held", flush=True)
        time.sleep(600)
""")


def _start_holder(folder):
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_builder_killed_mid_build_leaves_nothing_that_blocks(tmp_path):
    folder = tmp_path / "k"
    holder = _start_holder(folder)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (folder / TORCH_BATON).exists()
    with build_lock(folder, timeout_s=5):  # would raise if the dead holder still counted
        assert not (folder / TORCH_BATON).exists(), "torch's stale lock file must be cleared"


def test_a_live_holder_times_out_with_one_line_naming_it(tmp_path):
    folder = tmp_path / "k"
    holder = _start_holder(folder)
    try:
        with pytest.raises(UserError) as err:
            with build_lock(folder, timeout_s=0.5):
                pass
        message = str(err.value)
        assert "\n" not in message and f"pid {holder.pid}" in message and "PRUNEBENCH_NO_CPP_KERNELS" in message
        assert (folder / TORCH_BATON).exists(), "a live holder's build must not be touched"
    finally:
        holder.kill()
        holder.wait()
    assert (folder / LOCK_NAME).exists()


def test_each_build_has_its_own_folder(tmp_path):
    a = build_folder("k", "int f();", ["-O3"], tmp_path)
    assert a == build_folder("k", "int f();", ["-O3"], tmp_path)
    assert a != build_folder("k", "int f();", ["-O2"], tmp_path)
    assert a != build_folder("k", "int g();", ["-O3"], tmp_path)


def test_two_environments_never_share_a_build_folder(tmp_path, monkeypatch):
    # torch's build.ninja names the interpreter's paths: a shared folder is rebuilt by each in turn
    a = build_folder("k", "int f();", ["-O3"], tmp_path)
    monkeypatch.setattr(sys, "prefix", "/another/venv")
    assert a != build_folder("k", "int f();", ["-O3"], tmp_path)


CONCRETE_HOLDER = textwrap.dedent("""
    import time
    from prunebench.engines import concrete
    from prunebench.engines.kernel_build import build_lock, TORCH_BATON
    with build_lock(concrete.build_folder()) as folder:  # concrete.py's own build folder
        (folder / TORCH_BATON).touch()  # as torch leaves it when killed mid-build
        print("held", flush=True)
        time.sleep(600)
""")

CONCRETE_BUILD = textwrap.dedent("""
    import torch
    from prunebench.engines import concrete
    logits, weight = torch.randn(64, 300) * 0.05, torch.randn(64, 300)
    fused = concrete.concrete_masked_weight(logits, weight, 5, 50.0, 0.5)
    print(concrete.backend("cpu"), flush=True)
    concrete._extension = lambda: None  # the torch path (no compiler): the same values
    plain = concrete.concrete_masked_weight(logits, weight, 5, 50.0, 0.5)
    for a, b in zip(fused, plain):
        torch.testing.assert_close(a.float(), b.float(), rtol=1e-5, atol=1e-6)
    print("same", flush=True)
""")


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_concrete_builds_after_a_builder_was_killed_holding_its_lock():
    """The issue's hang: a process killed while it held the fused gate kernel's build lock.
    concrete.py's own entry point, in a fresh process, then builds (or loads) without waiting:
    torch's load_inline takes its lock file even for a build that is up to date, so a stale one
    would make it wait forever.  (The lock itself after a killed holder:
    test_a_builder_killed_mid_build_leaves_nothing_that_blocks.)"""
    from prunebench.engines import concrete

    folder = concrete.build_folder()
    concrete.backend("cpu")  # built once here (cached), so the fresh process below only loads it
    assert concrete.build_folder() == folder  # (torch appends to the flag lists it is given)
    holder = subprocess.Popen([sys.executable, "-c", CONCRETE_HOLDER], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    assert (folder / TORCH_BATON).exists() and str(holder.pid) in (folder / LOCK_NAME).read_text()
    # A dead holder must not count (torch's bare lock file made this wait forever); 300 s covers a cold build.
    done = subprocess.run([sys.executable, "-c", CONCRETE_BUILD], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split() == ["cpp", "same"]
    assert not (folder / TORCH_BATON).exists()


def test_an_optional_extension_falls_back_to_torch_but_not_past_a_stuck_build(monkeypatch, caplog):
    """The one fallback every kernel uses: the environment switch and a failed build give None (the
    caller's torch path), the failure with a warning; a stuck build's UserError is raised."""
    built = []
    monkeypatch.setattr(kernel_build, "load_inline_locked", lambda name, *args: built.append(name) or "module")
    args = ("prunebench_test", "int f();", ("f",), ["-O3"], [], "test")
    assert optional_extension(*args) == "module"
    assert built == [kernel_build.extension_name("prunebench_test", "int f();", ["-O3"])]
    monkeypatch.setenv(NO_CPP_KERNELS_ENV, "1")
    assert optional_extension(*args) is None and len(built) == 1
    monkeypatch.delenv(NO_CPP_KERNELS_ENV)

    def fail(error):
        def load(*_):
            raise error
        return load

    monkeypatch.setattr(kernel_build, "load_inline_locked", fail(RuntimeError("no compiler\ndetails")))
    with caplog.at_level("WARNING", logger=kernel_build.__name__):
        assert optional_extension(*args) is None
    assert "test kernel unavailable (no compiler); using torch ops" in caplog.text
    monkeypatch.setattr(kernel_build, "load_inline_locked", fail(UserError("build lock held")))
    with pytest.raises(UserError, match="build lock held"):
        optional_extension(*args)
