"""A kernel build never waits on a dead builder, and a live stuck one ends in one line."""
import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from prunebench.errors import UserError
from prunebench.kernel_build import LOCK_NAME, TORCH_BATON, build_folder, build_lock, load_inline_locked

HOLDER = textwrap.dedent("""
    import sys, time
    from pathlib import Path
    from prunebench.kernel_build import build_lock, TORCH_BATON
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


SOURCE = "int64_t twice(int64_t x) { return 2 * x; }"


@pytest.mark.skipif(shutil.which("c++") is None and shutil.which("g++") is None, reason="no C++ compiler")
def test_a_build_after_a_killed_build_does_not_wait(tmp_path):
    folder = build_folder("prunebench_test_twice", SOURCE, ["-O1", "|"], tmp_path)
    holder = _start_holder(folder)
    holder.kill()
    holder.wait()
    module = load_inline_locked("prunebench_test_twice", SOURCE, ["twice"], ["-O1"], [], timeout_s=5, root=tmp_path)
    assert module.twice(21) == 42
