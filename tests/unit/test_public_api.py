"""A plugin imports the contract from `prunebench` itself; importing the package stays cheap."""
import subprocess
import sys

import prunebench


def test_every_public_name_is_the_defining_modules_object():
    import importlib

    for name, module in prunebench.PUBLIC.items():
        assert getattr(prunebench, name) is getattr(importlib.import_module(module), name), name
    from prunebench import LayerwisePruner, LinearResult, register  # noqa: F401  (the docs' form)


def test_an_unknown_name_is_an_attribute_error():
    try:
        prunebench.NoSuchThing  # noqa: B018
    except AttributeError as exc:
        assert "NoSuchThing" in str(exc)
    else:
        raise AssertionError("no error")


def test_importing_the_package_loads_no_torch():
    code = "import sys, prunebench; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
