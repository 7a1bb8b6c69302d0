"""What a cell's numbers depend on, as content fingerprints.

A cell's key hashes these, so two runs share a key only when they computed from the same bytes:
the same model file, the same calibration and evaluation text (its content, never its path or
dataset name), the same method code and the same evaluation code.  Every fingerprint is a
sha256 hex digest; expensive ones (large files) are computed once per process, and file hashes
are also cached on disk keyed by (path, size, mtime).
"""
from __future__ import annotations

import importlib
from pathlib import Path

from prunebench import registry
from prunebench.hashing import file_sha256, sha256_json, sha256_text, tree_sha256  # noqa: F401  (callers' names)
from prunebench.sparsity.pattern_registry import builtin_pattern_modules
from prunebench.version import __version__

# The framework code that decides what an evaluation computes: a change here is a new key for
# every cell (and the committed records must be regenerated). It is every prunebench module the
# evaluation imports, directly or not, except KEY_INFRASTRUCTURE (tests/unit/test_key_coverage.py
# holds the two lists to that): the windows and their first token, the model as loaded, the block
# pipeline streamed perplexity shares with the layer-wise engine, the output head's blocked scan,
# the zero-shot documents (local files converted, the embedded tasks built).
EVALUATION_MODULES = ("prunebench.evaluate.perplexity", "prunebench.evaluate.dense_relative", "prunebench.evaluate.zeroshot",
                      "prunebench.evaluate.local_tasks", "prunebench.evaluate.embedded_tasks",
                      "prunebench.data.windows", "prunebench.modeling.sequence_start", "prunebench.modeling.output_head",
                      "prunebench.modeling.models", "prunebench.engines.layerwise")
# Imported by the evaluation or a method but deciding none of their numbers: errors, progress
# bars, caches of content-addressed files, atomic writes and state files, the registry's
# bookkeeping, the compiler driver (each kernel's source and flags live in, and are hashed with,
# the module that owns it).
KEY_INFRASTRUCTURE = ("prunebench.errors", "prunebench.progress", "prunebench.cache", "prunebench.hashing",
                      "prunebench.typecheck", "prunebench.store.atomic", "prunebench.store.records",
                      "prunebench.registry", "prunebench.engines.kernel_build", "prunebench.engines.state_files")
# Shared by every method: mask selection and the sparsity arithmetic, with the patterns that read,
# complete and check a spec (the base class, the registry and each built-in pattern's file), and
# the contract (a layer's statistics as the engine hands them to a method, config building).
METHOD_FRAMEWORK_MODULES = ("prunebench.contract", "prunebench.sparsity.patterns", "prunebench.sparsity.pattern_base",
                            "prunebench.sparsity.pattern_registry", *builtin_pattern_modules())


def module_source_sha256(module_name: str) -> str:
    """sha256 of a module's source file (its package's __init__ for a package)."""
    module = importlib.import_module(module_name)
    path = getattr(module, "__file__", None)
    if not path:
        return sha256_text(module_name)
    return file_sha256(Path(path))


def modules_sha256(module_names) -> str:
    return sha256_json({name: module_source_sha256(name) for name in sorted(set(module_names))})


def evaluation_code_sha256() -> str:
    files = {name: module_source_sha256(name) for name in EVALUATION_MODULES}
    tasks_dir = Path(__file__).parent.parent / "evaluate" / "tasks"
    for p in sorted(tasks_dir.rglob("*.yaml")):
        files[str(p.relative_to(tasks_dir))] = file_sha256(p)
    return sha256_json(files)


def method_modules(pruner) -> set:
    """The modules a built-in method's key hashes: its own file, the shared sparsity code, the
    engine modules its classes declare, the methods it calls and its allocation."""
    cls = type(pruner)
    modules = {cls.__module__, *METHOD_FRAMEWORK_MODULES}
    for base in cls.__mro__:
        for engine in getattr(base, "engine_modules", ()):
            modules.add(engine)
    for dep in pruner.uses_methods():
        modules.add(registry.get(dep).__module__)
    allocation = getattr(pruner, "allocation", None)
    if allocation is not None:  # a per-block allocation decides the result as much as the method
        modules.update({type(allocation).__module__, "prunebench.engines.allocation"})
    return modules


def method_identity(pruner) -> dict:
    """Built-in: prunebench's version and a hash of the method's source, the engine it runs on,
    the shared sparsity code and the methods it calls.  Plugin: a hash of its file."""
    cls = type(pruner)
    origin = registry.origin(cls.name)
    allocation = getattr(pruner, "allocation", None)
    if origin["kind"] == "plugin":
        ident = {"kind": "plugin", "file": origin["file"], "sha256": file_sha256(origin["file"]),
                 "prunebench": __version__, "replaces_builtin": origin.get("replaces_builtin", False)}
        if allocation is not None:
            ident["allocation_sha256"] = modules_sha256({type(allocation).__module__, "prunebench.engines.allocation",
                                                         "prunebench.engines.layerwise"})
        return ident
    ident = {"kind": origin["kind"], "prunebench": __version__, "sha256": modules_sha256(method_modules(pruner))}
    if origin["kind"] == "entry_point":
        ident["package"] = origin.get("package")
        ident["package_version"] = origin.get("package_version")
    return ident
