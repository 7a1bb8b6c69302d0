import dataclasses
import textwrap

import pytest

from prunebench import registry
from prunebench.errors import UserError


def test_builtins_are_registered_with_capabilities_and_defaults():
    names = registry.available()
    for expected in ("dense", "magnitude", "wanda"):
        assert expected in names
    described = {m["name"]: m for m in registry.describe()}
    assert described["wanda"]["capabilities"]["statistics"] == "input_norm"
    assert registry.resolve("mag") == "magnitude"


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(UserError) as err:
        registry.resolve("nosuch")
    assert "wanda" in str(err.value) and "magnitude" in str(err.value)


def test_config_rejects_unknown_keys():
    with pytest.raises(UserError, match="unknown option"):
        registry.create("wanda", {"blocksize": 3})


def test_plugin_file_registers_a_method(tmp_path):
    plugin = tmp_path / "my_method.py"
    plugin.write_text(textwrap.dedent('''
        from dataclasses import dataclass
        from prunebench.registry import LayerwisePruner, LinearResult, register
        from prunebench.sparsity import mask_from_scores

        @register
        class Negative(LayerwisePruner):
            name = "plugin_smallest"
            summary = "keeps the smallest weights (a test plugin)"

            @dataclass
            class Config:
                strength: float = 1.0

            def prune_linear(self, weight, stats, spec, ctx):
                return LinearResult(mask=mask_from_scores(-weight.abs(), spec))
    '''))
    added = registry.load_plugin(plugin)
    assert added == ["plugin_smallest"]
    assert registry.create("plugin_smallest").config.strength == 1.0
    with pytest.raises(UserError):
        registry.load_plugin(tmp_path / "missing.py")


def test_entry_point_methods_are_loaded(monkeypatch):
    from dataclasses import dataclass

    from prunebench.registry import Pruner, PruneReport

    class FromEntryPoint(Pruner):
        name = "ep_method"

        @dataclass
        class Config:
            pass

        def prune(self, model, ctx):
            return PruneReport()

    class FakeEntryPoint:
        name = "ep_method"

        def load(self):
            return FromEntryPoint

    import importlib.metadata as md

    monkeypatch.setattr(md, "entry_points", lambda group=None: [FakeEntryPoint()] if group == registry.ENTRY_POINT_GROUP else [])
    monkeypatch.setitem(registry._loaded, "entry_points", False)
    assert "ep_method" in registry.available()


def test_every_config_is_a_dataclass_with_defaults():
    for name in registry.available():
        cls = registry.get(name)
        assert dataclasses.is_dataclass(cls.Config), name
        cls()  # constructible with paper defaults alone
