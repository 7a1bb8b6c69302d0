"""Methods from a user's file (`--plugin path/to/method.py`) and the `--replace NAME` checks.

Installed packages register through entry points, which the registry loads by itself on the
first lookup (prunebench.registry.Registry.load); a file is loaded only when asked for.
"""
from __future__ import annotations

import hashlib
import importlib.util
import sys
import traceback
from pathlib import Path

from prunebench.errors import UserError
from prunebench.registry import METHODS, importing


def load_plugin(path) -> list[str]:
    """Import a Python file that registers methods; returns the names it added or replaced.

    Errors in the file (syntax, import, anything raised at import time) are one UserError that
    names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"plugin file {str(path)!r} does not exist", hint="pass --plugin path/to/method.py")
    METHODS.load_builtins()
    before = METHODS.classes()
    resolved = path.resolve()
    mod_name = f"prunebench_plugin_{hashlib.sha256(str(resolved).encode()).hexdigest()[:16]}"
    spec = importlib.util.spec_from_file_location(mod_name, resolved)
    if spec is None or spec.loader is None:
        raise UserError(f"plugin {str(path)!r} is not a Python file", hint="pass a .py file")
    module = importlib.util.module_from_spec(spec)
    sys.modules[mod_name] = module
    try:
        with importing({"kind": "plugin", "file": str(resolved)}):
            spec.loader.exec_module(module)
    except UserError as exc:
        sys.modules.pop(mod_name, None)
        raise UserError(f"plugin {path}: {exc.message}", hint=exc.hint) from None
    except SyntaxError as exc:
        sys.modules.pop(mod_name, None)
        raise UserError(f"plugin {path}, line {exc.lineno}: syntax error: {exc.msg}",
                        hint="fix the file; `python -m py_compile FILE` shows the same") from None
    except Exception as exc:
        sys.modules.pop(mod_name, None)
        line = _line_in(exc, resolved)
        where = f"plugin {path}, line {line}" if line else f"plugin {path}"
        raise UserError(f"{where}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300],
                        hint="the file must import and register without errors") from None
    added = sorted(k for k, v in METHODS.classes().items() if before.get(k) is not v)
    if not added:  # a forgotten @register would otherwise pass unnoticed until its name is unknown
        sys.modules.pop(mod_name, None)
        raise UserError(f"plugin {path} registers no method",
                        hint="decorate a Pruner subclass with @register (from prunebench import register)")
    return added


def check_replacements(names) -> None:
    """Every --replace NAME must name a method a plugin registered: otherwise it replaces nothing
    and the user's intent (run the plugin's method under that name) silently did not happen."""
    if names:
        METHODS.load()  # installed entry points may replace a name too
    for name in names:
        key = name.strip().lower()
        if not key:
            raise UserError("--replace needs a method name", hint="e.g. --plugin my_wanda.py --replace wanda")
        if key not in METHODS.from_plugins():
            raise UserError(f"--replace {name}: no --plugin registers a method of that name",
                            hint=f"pass the --plugin file that registers {key!r}, or drop --replace {name}")


def _line_in(exc: BaseException, file: Path) -> int | None:
    """The last traceback line that lies in `file` (where the plugin's own code failed)."""
    line = None
    for frame in traceback.extract_tb(exc.__traceback__):
        if Path(frame.filename).resolve() == file:
            line = frame.lineno
    return line
