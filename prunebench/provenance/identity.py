"""What a cell's numbers depend on, as content fingerprints.

A cell's key hashes these, so two runs share a key only when they computed from the same bytes:
the same model file, the same calibration and evaluation text (its content, never its path or
dataset name), the same method code and the same evaluation code.  Every fingerprint is a
sha256 hex digest; expensive ones (large files) are computed once per process, and file hashes
are also cached on disk keyed by (path, size, mtime).
"""
from __future__ import annotations

import functools
import hashlib
import importlib
import json
import os
from pathlib import Path

from prunebench import __version__

# The framework code that decides what an evaluation computes: a change here is a new key for
# every cell (and the committed records must be regenerated).
EVALUATION_MODULES = ("prunebench.evaluate.perplexity", "prunebench.evaluate.zeroshot", "prunebench.data.windows")
# Shared by every method: mask selection and the sparsity arithmetic.
METHOD_FRAMEWORK_MODULES = ("prunebench.sparsity.patterns",)


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def sha256_json(obj) -> str:
    return sha256_text(json.dumps(obj, sort_keys=True, default=str))


@functools.lru_cache(maxsize=None)
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


def _disk_cache() -> Path:
    from prunebench.modeling.models import cache_root

    return cache_root() / "file_sha256"


@functools.lru_cache(maxsize=256)
def _file_sha256_cached(path: str, size: int, mtime_ns: int) -> str:
    entry = _disk_cache() / (sha256_text(f"{path}|{size}|{mtime_ns}")[:32] + ".txt")
    if size >= 1 << 24:  # files of 16 MiB and more: remember the hash on disk (model weights)
        try:
            cached = entry.read_text().strip()
            if len(cached) == 64:
                return cached
        except OSError:
            pass
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    digest = h.hexdigest()
    if size >= 1 << 24:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = entry.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(digest)
            os.replace(tmp, entry)
        except OSError:  # a read-only cache only costs time
            pass
    return digest


def file_sha256(path) -> str:
    p = Path(path).resolve()
    st = p.stat()
    return _file_sha256_cached(str(p), st.st_size, st.st_mtime_ns)


def tree_sha256(directory) -> str:
    """Every file under a directory (names and contents), hidden files excluded."""
    root = Path(directory)
    files = sorted(q for q in root.rglob("*") if q.is_file() and not any(part.startswith(".") for part in q.relative_to(root).parts))
    return sha256_json({str(q.relative_to(root)): file_sha256(q) for q in files})


def method_identity(pruner) -> dict:
    """Built-in: prunebench's version and a hash of the method's source, the engine it runs on,
    the shared sparsity code and the methods it calls.  Plugin: a hash of its file."""
    from prunebench import registry

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
    modules = {cls.__module__, *METHOD_FRAMEWORK_MODULES}
    for base in cls.__mro__:
        for engine in getattr(base, "engine_modules", ()):
            modules.add(engine)
    for dep in pruner.uses_methods():
        modules.add(registry.get(dep).__module__)
    if allocation is not None:  # a per-block allocation decides the result as much as the method
        modules.update({type(allocation).__module__, "prunebench.engines.allocation"})
    ident = {"kind": origin["kind"], "prunebench": __version__, "sha256": modules_sha256(modules)}
    if origin["kind"] == "entry_point":
        ident["package"] = origin.get("package")
        ident["package_version"] = origin.get("package_version")
    return ident
