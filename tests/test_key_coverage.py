"""A cell's key covers the code that computes its evaluation: every prunebench module the
evaluation imports (transitively, parsed, never imported) is hashed into the key or declared
infrastructure that decides no number."""
from prunebench.provenance import identity
from test_import_layers import MODULES, imports_of


def imported_closure(start) -> set:
    seen, todo = set(), list(start)
    while todo:
        module = todo.pop()
        if module in seen:
            continue
        seen.add(module)
        todo.extend(target for target, _, local in imports_of(module) if not local)
    return seen


def test_every_module_the_evaluation_imports_is_in_the_key_or_declared_infrastructure():
    # Every cell's key hashes the evaluation modules and the method framework (the sparsity code).
    hashed = set(identity.EVALUATION_MODULES) | set(identity.METHOD_FRAMEWORK_MODULES)
    infrastructure = set(identity.EVALUATION_INFRASTRUCTURE)
    assert hashed <= set(MODULES) and infrastructure <= set(MODULES), "a listed module does not exist"
    uncovered = imported_closure(identity.EVALUATION_MODULES) - hashed - infrastructure
    assert not uncovered, (f"the evaluation imports {sorted(uncovered)} but the key does not hash them: add each to "
                           "EVALUATION_MODULES (it decides numbers) or EVALUATION_INFRASTRUCTURE (it does not)")


def test_declared_infrastructure_is_really_imported():
    # A stale entry would let a module that now decides numbers slip past the check above.
    unused = set(identity.EVALUATION_INFRASTRUCTURE) - imported_closure(identity.EVALUATION_MODULES)
    assert not unused, f"EVALUATION_INFRASTRUCTURE lists modules the evaluation no longer imports: {sorted(unused)}"


def test_a_module_left_out_of_the_key_is_caught(monkeypatch):
    monkeypatch.setattr(identity, "EVALUATION_MODULES",
                        tuple(m for m in identity.EVALUATION_MODULES if m != "prunebench.modeling.sequence_start"))
    hashed = set(identity.EVALUATION_MODULES)
    assert "prunebench.modeling.sequence_start" in imported_closure(hashed) - hashed
