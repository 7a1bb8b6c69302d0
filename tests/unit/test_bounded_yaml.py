"""Grid YAML loads within limits: the limits refuse bombs (aliases expanded past a bound, counted
from the distinct nodes), not what grids use (merge keys, shared anchors, every shipped grid).
The command line's refusals of bad grid files are in run/test_cli_bad_input.py."""
import textwrap

import pytest

from prunebench.errors import UserError
from prunebench.run.grid import load_yaml

from conftest import REPO


def test_merge_keys_and_shared_anchors_still_load():
    text = textwrap.dedent("""\
        base: &base {steps: 3, lr: 0.1}
        methods:
          - {name: leap, config: {<<: *base, steps: 5}}   # a merged key overridden: not a duplicate
          - {name: admm, config: *base}
        """)
    data = load_yaml(text, "test")
    assert data["methods"][0]["config"] == {"steps": 5, "lr": 0.1}
    assert data["methods"][1]["config"] == {"steps": 3, "lr": 0.1}


def test_every_shipped_grid_loads_as_before():
    import yaml

    files = sorted((REPO / "prunebench" / "presets").glob("*.yaml")) + sorted((REPO / "benchmarks" / "grids").glob("*.yaml"))
    assert files
    for path in files:
        assert load_yaml(path.read_bytes(), path.name) == yaml.safe_load(path.read_text()), path


def test_a_deep_bomb_is_refused_from_its_distinct_nodes():
    """Thirty anchors of ten aliases (10**30 items): refused from the 31 nodes, never expanded."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 30)]
    with pytest.raises(UserError, match="aliases expand it past"):
        load_yaml("\n".join(lines), "bomb")
