import os

import pytest

# Tests never reach a hub and never draw progress bars.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("PRUNEBENCH_NO_PROGRESS", "1")

from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
SLOW_TESTS = Path(__file__).resolve().parent / "slow"  # the tests that load the embedded models
SHARED_DATA = Path(os.environ.get("PRUNEBENCH_DATA_DIR", REPO.parent / "shared" / "data"))

TINY_FAMILIES = ("llama", "qwen2", "gemma3", "mistral", "opt", "gpt2")

# Six quick cells (2 tiny models x dense, magnitude 0.5, wanda 0.5) for multi-process tests.
SIX_CELL_GRID_YAML = """\
models: [tiny:llama, tiny:qwen2]
methods: [magnitude, wanda]
sparsities: ["0.5"]
calibration: {dataset: lee, n_samples: 4, seqlen: 64}
eval: {perplexity: [lee], seqlen: 64, tasks: [], max_ppl_windows: 16}
"""


@pytest.hookimpl(tryfirst=True)  # before -m selects on the marks
def pytest_collection_modifyitems(items):
    """Every test under tests/slow/ is marked slow, whether or not its file says so."""
    for item in items:
        if SLOW_TESTS in item.path.parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def data_dir():
    if not SHARED_DATA.is_dir():
        pytest.skip(f"no shared data directory at {SHARED_DATA}")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from prunebench.modeling.models import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def calib_windows(tiny_tokenizer):
    """Eight windows of 64 byte-tokens of real English (Lee calibration documents)."""
    from prunebench.data.windows import WindowSpec, calibration_windows

    ids, _ = calibration_windows(tiny_tokenizer, WindowSpec("lee", 8, 64, 0))
    return ids
