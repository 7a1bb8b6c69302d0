"""A cell's key covers the code that computes it: every prunebench module that the evaluation or
a built-in method imports (transitively; parsed, never imported) is hashed into the key or
declared infrastructure that decides no number (identity.KEY_INFRASTRUCTURE)."""
import pytest

from prunebench import registry
from prunebench.provenance import identity
from test_import_layers import MODULES, imports_of

INFRASTRUCTURE = set(identity.KEY_INFRASTRUCTURE)
# Plugins loaded by other tests are registered too; their key is their file's hash.
BUILTINS = [name for name in registry.available() if registry.origin(name)["kind"] == "builtin"]
# Every cell's key hashes the evaluation modules and the method framework (the sparsity code).
IN_EVERY_KEY = set(identity.EVALUATION_MODULES) | set(identity.METHOD_FRAMEWORK_MODULES)


def imported_closure(start) -> set:
    seen, todo = set(), list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(target for target, _, local in imports_of(module) if not local)
    return seen


def test_listed_modules_exist():
    assert IN_EVERY_KEY | INFRASTRUCTURE <= set(MODULES)


def test_every_module_the_evaluation_imports_is_in_the_key_or_declared_infrastructure():
    uncovered = imported_closure(identity.EVALUATION_MODULES) - IN_EVERY_KEY - INFRASTRUCTURE
    assert not uncovered, (f"the evaluation imports {sorted(uncovered)} but the key does not hash them: add each to "
                           "EVALUATION_MODULES (it decides numbers) or KEY_INFRASTRUCTURE (it does not)")


@pytest.mark.parametrize("name", BUILTINS)
def test_every_module_a_builtin_method_imports_is_in_its_key_or_declared_infrastructure(name):
    pruner = registry.create(name)
    hashed = identity.method_modules(pruner) | IN_EVERY_KEY
    uncovered = imported_closure({type(pruner).__module__}) - hashed - INFRASTRUCTURE
    assert not uncovered, (f"{name} imports {sorted(uncovered)} but its key does not hash them: name each in the "
                           "engine_modules of the class that uses it, or in KEY_INFRASTRUCTURE if it decides no number")


def test_declared_infrastructure_is_really_imported():
    # A stale entry would let a module that later decides numbers slip past the checks above.
    everything = imported_closure(identity.EVALUATION_MODULES)
    for name in BUILTINS:
        everything |= imported_closure({type(registry.create(name)).__module__})
    unused = INFRASTRUCTURE - everything
    assert not unused, f"KEY_INFRASTRUCTURE lists modules nothing computing imports: {sorted(unused)}"


def test_a_module_left_out_of_the_key_is_caught(monkeypatch):
    monkeypatch.setattr(identity, "EVALUATION_MODULES",
                        tuple(m for m in identity.EVALUATION_MODULES if m != "prunebench.modeling.sequence_start"))
    hashed = set(identity.EVALUATION_MODULES) | set(identity.METHOD_FRAMEWORK_MODULES)
    assert "prunebench.modeling.sequence_start" in imported_closure(identity.EVALUATION_MODULES) - hashed - INFRASTRUCTURE
