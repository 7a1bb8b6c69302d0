"""The method registry and plugins: built-ins with their capabilities and defaults, plugin files and
entry points, a plugin that takes a built-in's name only when asked (--replace), and its identity
in the cell's key then."""
import dataclasses
import os
import textwrap

import pytest

from prunebench import registry
from prunebench.contract import config_to_dict, make_config
from prunebench.errors import UserError
from prunebench.plugins import load_plugin

from tiny_runs import TINY, by_method, run, write_plugin


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
        from prunebench import LayerwisePruner, LinearResult, register
        from prunebench.sparsity.patterns import mask_from_scores

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
    added = load_plugin(plugin)
    assert added == ["plugin_smallest"]
    assert registry.create("plugin_smallest").config.strength == 1.0
    with pytest.raises(UserError):
        load_plugin(tmp_path / "missing.py")


def test_entry_point_methods_are_loaded(monkeypatch):
    from dataclasses import dataclass

    from prunebench.contract import Pruner, PruneReport

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
    monkeypatch.setitem(registry.METHODS._loaded, "entry_points", False)
    assert "ep_method" in registry.available()


class NoDeclaredType:
    """A value no config field declares."""


def test_every_config_is_a_dataclass_whose_defaults_pass_their_own_type_checks():
    for name in registry.available():
        cls = registry.get(name)
        assert dataclasses.is_dataclass(cls.Config), name
        defaults = cls().config  # constructible with paper defaults alone
        # every default, given explicitly, passes its field's declared type and comes back the same
        assert make_config(cls.Config, dataclasses.asdict(defaults)) == defaults, name
        for field in dataclasses.fields(cls.Config):  # and that check is there for every field
            with pytest.raises(UserError, match=f"{field.name} must be"):
                make_config(cls.Config, {field.name: NoDeclaredType()})


def test_list_shows_each_presets_values(capsys):
    import json

    from prunebench.cli.command import main

    assert main(["list"]) == 0
    lines = capsys.readouterr().out.splitlines()

    def block(method):  # the method's header line and its indented lines
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{method} "))
        end = next((i for i in range(start + 1, len(lines)) if not lines[i].startswith("    ")), len(lines))
        return lines[start + 1:end]

    for method, presets in (("leap", ("paper", "embedded", "tiny")), ("maskllm", ("paper", "embedded", "tiny")),
                            ("patch", ("paper", "paper-tile", "embedded", "tiny"))):
        shown = [line.split(":")[0].strip() for line in block(method) if line.startswith("    preset ")]
        assert shown == [f"preset {p}" for p in presets], method
        assert not any("steps=None" in line or "lr=None" in line for line in block(method)), method  # values, not Nones
    assert "    preset paper: steps=2000, batch_size=256, seqlen=4096, grad_accum=256, lr=0.001," in block("leap")[2]
    assert not any(line.startswith("    preset ") for line in block("wanda") + block("sparsegpt"))
    assert main(["list", "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)}
    for name in ("leap", "maskllm", "patch"):
        cls = registry.get(name)
        assert set(entries[name]["presets"]) == set(cls.Config.PRESETS)
        for preset, values in entries[name]["presets"].items():
            resolved = config_to_dict(cls.Config(preset=preset))
            resolved.pop("preset")
            assert values == json.loads(json.dumps(resolved, default=str)), (name, preset)
    assert entries["leap"]["presets"]["paper"]["steps"] == 2000 and registry.get("leap").Config().steps == 2000
    assert "presets" not in entries["wanda"] and "presets" not in entries["sparsegpt"]


# ---------------------------------------------------------------------------------------------
# A plugin may not take a built-in's name unless asked

HIJACK = '''
from dataclasses import dataclass
import torch
from prunebench import Capabilities, LayerwisePruner, LinearResult, STATS_NONE, register
from prunebench.sparsity.patterns import mask_from_scores

@register
class Wanda(LayerwisePruner):
    name = "wanda"
    capabilities = Capabilities(patterns=("unstructured",), needs_calibration=False, statistics=STATS_NONE)
    default_scope = "row"

    @dataclass
    class Config:
        pass

    def prune_linear(self, weight, stats, spec, ctx):
        return LinearResult(mask=mask_from_scores(-weight.abs(), spec))
'''


def test_a_plugin_that_takes_a_builtin_name_is_refused(tmp_path, capsys):
    plugin = write_plugin(tmp_path / "hijack.py", HIJACK)
    results = tmp_path / "results"
    base = ["--models", "tiny:llama", "--methods", "wanda", "--sparsities", "0.5", "--no-dense", "--results", str(results), *TINY]
    assert run("--plugin", str(plugin), *base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "already taken" in err[0] and "--replace wanda" in err[0]
    assert not results.exists()
    from prunebench import registry

    assert registry.origin("wanda")["kind"] == "builtin"


def test_an_explicit_replace_carries_the_plugins_identity(tmp_path, capsys):
    import subprocess
    import sys

    plugin = write_plugin(tmp_path / "hijack.py", HIJACK)
    results = tmp_path / "results"
    base = ["--models", "tiny:llama", "--methods", "wanda", "--sparsities", "0.5", "--no-dense", "--results", str(results), *TINY]
    # A fresh process: --replace changes the registry for the rest of the process.
    code = subprocess.run([sys.executable, "-m", "prunebench.cli.command", "run", "--plugin", str(plugin), "--replace", "wanda", *base],
                          capture_output=True, text=True, env={**os.environ, "PRUNEBENCH_NO_PROGRESS": "1"})
    assert code.returncode == 0, code.stderr
    rec = by_method(results)[("wanda", "0.5")]
    ident = rec["spec"]["method_identity"]
    assert ident["kind"] == "plugin" and ident["replaces_builtin"] and ident["file"] == str(plugin.resolve())
    # Without the plugin, the built-in Wanda's cell is a different cell: not "already done".
    capsys.readouterr()
    assert run(*base, "--dry-run") == 0
    assert capsys.readouterr().out.startswith("todo")
