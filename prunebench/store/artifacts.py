"""Artifacts of a cell: saved masks, exported sparse checkpoints, re-evaluation from masks.

Masks are stored bit-packed (prunebench.sparsity.patterns.pack_mask), one uint8 tensor per prunable
linear, in a safetensors file beside the record (<record stem>.masks.safetensors); the metadata
holds each layer's shape, the model spec, seed and dtype it was loaded with, the cell key, and the
model's fingerprint (prunebench.modeling.models.model_fingerprint: what its weights are), so masks are
never applied to another model that merely has the same shapes.

A mask alone reproduces a cell only when the method keeps the surviving weights unchanged
(magnitude, Wanda, LEAP).  Methods that also update them (SparseGPT, ADMM) get a second file,
<stem>.weights.safetensors, with the pruned prunable weights; loading prefers it.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from prunebench.errors import UserError
from prunebench.modeling.models import TINY_MODEL_SEED, all_prunable
from prunebench.store.records import load_records, record_path
from prunebench.sparsity.patterns import measure_sparsity, pack_mask, unpack_mask
from prunebench.modeling.models import model_fingerprint
from prunebench.store.records import read_record
from prunebench.modeling.models import load_model
from prunebench.store.records import atomic_write_json

MASKS_FORMAT = "prunebench-masks"
MASKS_VERSION = "1"
MASKS_SUFFIX = ".masks.safetensors"
WEIGHTS_SUFFIX = ".weights.safetensors"
log = logging.getLogger("prunebench")


def current_fingerprint(spec: str) -> dict:
    """The model's fingerprint now, not a cached one (a hub id resolves once it is downloaded)."""
    return model_fingerprint.__wrapped__(spec)


def _unresolved(fingerprint: dict) -> bool:
    return str(fingerprint.get("revision", "")).startswith("unresolved")


def _describe(fingerprint: dict) -> str:
    what = fingerprint.get("sha256") or fingerprint.get("revision") or "?"
    return f"{fingerprint.get('kind', '?')} {str(what)[:12]}"


def artifact_path(results_dir, record: dict, suffix: str) -> Path:
    path = record_path(results_dir, record)
    return path.with_name(path.stem + suffix)


def record_beside(masks_file) -> dict | None:
    """The record a masks file was saved with (<record stem>.json beside it, same key), or None
    when it is missing, unreadable or of another cell."""
    path = Path(masks_file)
    if not path.name.endswith(MASKS_SUFFIX):
        return None
    beside = path.with_name(path.name[:-len(MASKS_SUFFIX)] + ".json")
    try:
        record = read_record(beside)
    except (OSError, ValueError):
        return None
    meta = load_masks(path)[1]
    return record if record.get("key") == meta.get("key") else None


def save_cell_masks(model, results_dir, record: dict, dense_snapshot: dict | None = None) -> dict:
    """Write the masks (and, if the kept weights changed, the weights); return the record's
    "artifacts" entry (file names relative to the records folder)."""
    from safetensors.torch import save_file

    prunable = all_prunable(model)
    shapes = {name: list(m.weight.shape) for name, m in prunable.items()}  # storage layout (Conv1D: [in, out])
    packed = {name: pack_mask(m.weight.detach() != 0).cpu() for name, m in prunable.items()}
    fingerprint = (record.get("spec") or {}).get("model_fingerprint")
    if not isinstance(fingerprint, dict) or _unresolved(fingerprint):  # the key's, else what the model resolves to now
        fingerprint = current_fingerprint(record["model"]["id"])
    meta = {"format": MASKS_FORMAT, "version": MASKS_VERSION, "key": record["key"],
            "model": record["model"]["id"], "dtype": str(record["model"].get("dtype") or "float32"),
            "seed": str(record.get("seed", 0)), "method": record["method"]["name"],
            "sparsity": record["sparsity"]["label"], "shapes": json.dumps(shapes),
            "model_fingerprint": json.dumps(fingerprint, sort_keys=True),
            # the seed the runner loads a tiny model's random weights with (never the cell's)
            "model_seed": str(TINY_MODEL_SEED)}
    updated = dense_snapshot is not None and any(
        not torch.equal(m.weight.detach().cpu()[m.weight.detach().cpu() != 0],
                        dense_snapshot[name][m.weight.detach().cpu() != 0])
        for name, m in prunable.items() if name in dense_snapshot)
    out = {}
    if updated:
        weights_path = artifact_path(results_dir, record, WEIGHTS_SUFFIX)
        save_file({name: m.weight.detach().cpu().contiguous() for name, m in prunable.items()}, str(weights_path),
                  metadata={k: meta[k] for k in ("format", "version", "key", "model")})
        meta["weights_file"] = weights_path.name
        out["weights"] = weights_path.name
    masks_path = artifact_path(results_dir, record, MASKS_SUFFIX)
    masks_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = masks_path.with_name("." + masks_path.name + ".tmp")  # written aside, renamed: never half a file
    save_file(packed, str(tmp), metadata=meta)
    tmp.replace(masks_path)
    out["masks"] = masks_path.name
    return out


def load_masks(path) -> tuple[dict, dict, dict | None]:
    """(name -> bool mask in storage layout, metadata, name -> pruned weights or None)."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise UserError(f"masks file {str(path)!r} does not exist", hint="run with --save-masks to write one")
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            packed = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for a bad header
        raise UserError(f"cannot read masks file {str(path)!r}: {exc}") from None
    if meta.get("format") != MASKS_FORMAT:
        raise UserError(f"{str(path)!r} is not a prunebench masks file", hint="pass a *.masks.safetensors file")
    shapes = json.loads(meta["shapes"])
    masks = {name: unpack_mask(packed[name], shapes[name]) for name in packed}
    weights = None
    if meta.get("weights_file"):
        from safetensors.torch import load_file

        weights_path = path.with_name(meta["weights_file"])
        if not weights_path.is_file():
            raise UserError(f"the masks in {path.name} need their pruned weights {weights_path.name}, which is missing",
                            hint="the method updates the kept weights; copy both files together")
        weights = load_file(str(weights_path))
    return masks, meta, weights


def apply_masks(model, masks: dict, weights: dict | None = None) -> None:
    """Zero the pruned weights in place (after loading the pruned weights, where the method changed them)."""
    prunable = all_prunable(model)
    missing, extra = sorted(set(prunable) - set(masks)), sorted(set(masks) - set(prunable))
    if missing or extra:
        raise UserError("the masks do not fit this model: "
                        + (f"no mask for {missing[0]}" if missing else f"no layer {extra[0]}")
                        + (f" (+{len(missing) + len(extra) - 1} more)" if len(missing) + len(extra) > 1 else ""),
                        hint="use the model the masks were made for (see the file's metadata)")
    with torch.no_grad():
        for name, module in prunable.items():
            mask = masks[name]
            if tuple(mask.shape) != tuple(module.weight.shape):
                raise UserError(f"mask for {name} is {tuple(mask.shape)}, the layer is {tuple(module.weight.shape)}",
                                hint="use the model the masks were made for")
            if weights is not None:
                module.weight.copy_(weights[name].to(module.weight.device, module.weight.dtype))
            module.weight.mul_(mask.to(module.weight.device, module.weight.dtype))


def check_masks_fit(masks_file, meta: dict, model_spec: str | None = None, *, loaded: bool = False) -> None:
    """Refuse masks made for another model than `model_spec` (default: the one they name): the
    fingerprints must agree.  A hub id not yet downloaded cannot be resolved: checked again once
    loaded (`loaded`), and only warned about if it still cannot be.  A file written before masks
    files recorded a fingerprint is used only with the model it names, with a warning."""
    name = Path(masks_file).name
    target = model_spec or meta["model"]
    stored = meta.get("model_fingerprint")
    if not stored:
        if target != meta["model"]:
            raise UserError(f"{name} records no model fingerprint (an older prunebench wrote it), so nothing shows "
                            f"that masks made for {meta['model']} fit {target}",
                            hint="rerun the cell with --save-masks --force for a file that records one")
        if loaded:
            log.warning("%s records no model fingerprint (an older prunebench wrote it): not verified that %s is "
                        "the model its masks were made for; rerun the cell with --save-masks --force to record it",
                        name, target)
        return
    try:
        made_for = json.loads(stored)
    except ValueError:
        raise UserError(f"{name} has an unreadable model fingerprint", hint="rerun the cell with --save-masks --force") from None
    current = current_fingerprint(target)
    if current == made_for:
        return
    if _unresolved(current) or _unresolved(made_for):
        if loaded:
            log.warning("%s: cannot verify that %s is the model its masks were made for (a hub revision is "
                        "unresolved)", name, target)
        return
    raise UserError(f"the masks in {name} were made for {meta['model']} ({_describe(made_for)}), not for {target} "
                    f"({_describe(current)})", hint="evaluate them with the model they were made for, or prune this model "
                                                   "with run --save-masks")


def load_masked_model(masks_file, model_spec: str | None = None, *, dtype: str | None = None, seed: int | None = None):
    """Load the model the masks were made for (or `model_spec`, if it is that model) and apply them."""
    masks, meta, weights = load_masks(masks_file)
    check_masks_fit(masks_file, meta, model_spec)  # before loading: a wrong model is refused at once
    if seed is None:  # a tiny model's weights: the seed the runner loaded it with (old files: the cell's)
        seed = int(meta.get("model_seed", meta.get("seed", 0)))
    loaded = load_model(model_spec or meta["model"], dtype=dtype or meta.get("dtype", "float32"), seed=seed)
    check_masks_fit(masks_file, meta, model_spec, loaded=True)
    apply_masks(loaded.model, masks, weights)
    return loaded, meta


def find_record(results_dir, key: str | None = None, model: str | None = None, method: str | None = None,
                sparsity: str | None = None) -> dict:
    records, _ = load_records(results_dir)
    if not records:
        raise UserError(f"no records in {str(results_dir)!r}", hint="--results points at a `prunebench run` output")
    if key:
        found = [r for r in records if r["key"].startswith(key)]
    elif model and method:
        found = [r for r in records if r["model"]["id"] == model and r["method"]["name"] == method
                 and (sparsity is None or r["sparsity"]["label"] == sparsity)]
    else:
        raise UserError("say which cell to export", hint="--key KEY, or --model M --method X [--sparsity S]")
    ok = [r for r in found if r.get("status") == "ok"]
    if not ok:
        raise UserError(f"no ok record matches {key or f'{model} | {method} | {sparsity}'}",
                        hint="`prunebench run --dry-run ...` lists the cells and their keys")
    if len(ok) > 1:
        raise UserError(f"{len(ok)} records match; be more specific",
                        hint="; ".join(f"{r['key'][:12]} {r['method']['name']} {r['sparsity']['label']}" for r in ok[:5]))
    return ok[0]


def export_checkpoint(results_dir, out_dir, **which) -> Path:
    """Write an HF checkpoint (safetensors) with the pruned weights zeroed, plus sparsity_report.json."""
    record = find_record(results_dir, **which)
    masks_file = artifact_path(results_dir, record, MASKS_SUFFIX)
    if record["method"]["name"] == "dense":
        masks_file = None
    elif not masks_file.is_file():
        raise UserError(f"the cell {record['key'][:12]} has no saved masks",
                        hint="rerun it with `prunebench run ... --save-masks --force`")
    if masks_file is None:
        loaded = load_model(record["model"]["id"], dtype=record["model"].get("dtype") or "float32",
                            seed=int(record.get("seed", 0)))
    else:
        loaded, _ = load_masked_model(masks_file)
    out_dir = Path(out_dir)
    before = set(out_dir.iterdir()) if out_dir.is_dir() else None
    try:
        _write_checkpoint(loaded, record, out_dir)
    except OSError:  # an unwritable place or a full disk: no half checkpoint is left behind
        _remove_new(out_dir, before)
        raise
    return out_dir


def _remove_new(folder: Path, before) -> None:
    """Remove what was written into `folder` since `before` (the folder itself if it was new)."""
    import shutil

    if not folder.is_dir():
        return
    for path in [folder] if before is None else set(folder.iterdir()) - before:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def _write_checkpoint(loaded, record: dict, out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    loaded.model.save_pretrained(out_dir, safe_serialization=True)
    if loaded.tokenizer is not None:
        loaded.tokenizer.save_pretrained(out_dir)
    measured = measure_sparsity((n, m.weight) for n, m in all_prunable(loaded.model).items())
    report = {"key": record["key"], "model": record["model"]["id"], "method": record["method"],
              "sparsity": {"target": record["sparsity"]["target"], "pattern": record["sparsity"]["pattern"],
                           "label": record["sparsity"]["label"], "achieved": measured["overall"],
                           "recorded": record["sparsity"].get("achieved"), "n_weights": measured["n_weights"],
                           "n_zero": measured["n_zero"], "per_layer": measured["per_layer"]},
              "eval": record.get("eval")}

    atomic_write_json(out_dir / "sparsity_report.json", report)
