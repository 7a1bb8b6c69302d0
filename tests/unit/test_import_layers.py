"""The house in layers: imports of prunebench code run one way, with no circle.

Every module of prunebench/ and methods/ is parsed (never imported). Each belongs to a layer by
its folder (LAYERS, lowest first). The suite fails on
- an import from a higher layer,
- a circle among modules (imports inside functions included),
- an import of prunebench code inside a function, unless ALLOWED_LOCAL names it with a reason
  (an allowed one is exempt from the first two checks too: it is a debt written down).
Importing an optional dependency inside a function is fine: only prunebench code is checked.
"""
import ast
from pathlib import Path

import pytest

from conftest import REPO

# Lowest first. A module belongs to the longest prefix that names it.
LAYERS = [
    ("base", ("prunebench.errors", "prunebench.progress", "prunebench.typecheck", "prunebench.version",
              "prunebench.cache", "prunebench.hashing", "prunebench.bounded_yaml")),
    ("modeling", ("prunebench.modeling",)),
    ("sparsity", ("prunebench.sparsity",)),
    ("contract", ("prunebench.contract", "prunebench.registry", "prunebench.plugins")),
    ("provenance", ("prunebench.provenance",)),
    ("store", ("prunebench.store",)),
    ("data", ("prunebench.data",)),
    ("engines", ("prunebench.engines",)),
    ("api", ("prunebench",)),  # the package itself: the public plugin API re-exported
    ("methods", ("prunebench.methods",)),
    ("evaluate", ("prunebench.evaluate",)),
    ("measure", ("prunebench.measure",)),
    ("run", ("prunebench.run",)),
    ("report", ("prunebench.report",)),
    ("cli", ("prunebench.cli",)),
]

# A command imports only what it runs (`prunebench list` never loads pandas, matplotlib or
# lm-eval): cli/ may import lazily. It is the top layer, so its imports are never upward.
LAZY_LAYERS = {"cli"}

# (importing module, imported module): a function-local import kept for now, and why.
ALLOWED_LOCAL = {
}


def module_files() -> dict:
    out = {}
    for path in sorted((REPO / "prunebench").rglob("*.py")):
        parts = path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    for path in sorted((REPO / "methods").rglob("*.py")):
        parts = ("prunebench",) + path.relative_to(REPO).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


MODULES = module_files()


def layer_of(module: str) -> int:
    best = None
    for rank, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[0]:
                    best = (len(prefix), rank)
    assert best is not None, f"{module}: in no layer; add its folder to LAYERS"
    return best[1]


def _is_package(module: str) -> bool:
    return MODULES.get(module, Path()).name == "__init__.py"


def imports_of(module: str) -> list:
    """(imported module, line, inside a function) for each import of prunebench code."""
    tree = ast.parse(MODULES[module].read_text())
    package = module if _is_package(module) else module.rpartition(".")[0]
    local = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            local.update(id(n) for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom)))
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import name`: the module pkg.name where there is one, else pkg itself
            targets = [f"{source}.{a.name}" if f"{source}.{a.name}" in MODULES else source for a in node.names]
        else:
            continue
        for target in dict.fromkeys(targets):
            if target.startswith("prunebench") and target != module:
                while target not in MODULES:  # `import prunebench.x.y` of an attribute: its module
                    target = target.rpartition(".")[0]
                out.append((target, node.lineno, id(node) in local))
    return out


def graph():
    edges = {}
    problems = {"upward": [], "local": []}
    used_allowances = set()
    for module in MODULES:
        for target, line, local in imports_of(module):
            path = MODULES[module]
            where = f"{path.relative_to(REPO) if path.is_relative_to(REPO) else path}:{line}"
            if local:
                if LAYERS[layer_of(module)][0] in LAZY_LAYERS:
                    continue
                if (module, target) in ALLOWED_LOCAL:
                    used_allowances.add((module, target))
                    continue
                problems["local"].append(f"{where}: {target} imported inside a function")
            if layer_of(target) > layer_of(module):
                problems["upward"].append(f"{where}: {module} ({LAYERS[layer_of(module)][0]}) imports "
                                          f"{target} ({LAYERS[layer_of(target)][0]}), a higher layer")
            edges.setdefault(module, set()).add(target)
    return edges, problems, used_allowances


def circles(edges) -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []
    counter = [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in sorted(MODULES):
        if v not in index:
            visit(v)
    return out


EDGES, PROBLEMS, USED = graph()


def test_every_module_has_a_layer():
    for module in MODULES:
        layer_of(module)


def test_no_import_from_a_higher_layer():
    assert not PROBLEMS["upward"], "\n".join(PROBLEMS["upward"])


def test_no_function_local_import_of_prunebench_code():
    assert not PROBLEMS["local"], "\n".join(PROBLEMS["local"])


def test_no_circle():
    found = circles(EDGES)
    assert not found, "\n".join(" <-> ".join(c) for c in found)


def test_allow_list_is_current():
    """An allowance whose import is gone must leave the list, so the list only shrinks."""
    stale = sorted(set(ALLOWED_LOCAL) - USED)
    assert not stale, f"no longer imported inside a function: {stale}"
    assert all(reason.strip() for reason in ALLOWED_LOCAL.values())


@pytest.mark.parametrize("source, expected", [
    ("from prunebench.run.runner import run_grid\n", "upward"),
    ("def f():\n    from prunebench.sparsity.patterns import SparsitySpec\n", "local"),
])
def test_the_checks_can_fail(tmp_path, monkeypatch, source, expected):
    """A planted bad import in a low layer is caught (the checks are not vacuous)."""
    fake = "prunebench.modeling.planted"
    monkeypatch.setitem(MODULES, fake, tmp_path / "planted.py")
    (tmp_path / "planted.py").write_text(source)
    _, problems, _ = graph()
    assert any("planted" in p for p in problems[expected])


def test_a_planted_circle_is_found(tmp_path, monkeypatch):
    monkeypatch.setitem(MODULES, "prunebench.modeling.planted_a", tmp_path / "a.py")
    monkeypatch.setitem(MODULES, "prunebench.modeling.planted_b", tmp_path / "b.py")
    (tmp_path / "a.py").write_text("from prunebench.modeling import planted_b\n")
    (tmp_path / "b.py").write_text("import prunebench.modeling.planted_a\n")
    edges, _, _ = graph()
    assert ["prunebench.modeling.planted_a", "prunebench.modeling.planted_b"] in circles(edges)
