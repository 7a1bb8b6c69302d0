"""Checkpoint and resume of a learned-mask run.

One process writes the whole state in one file; several write one file per process in a
directory per step, made current by a pointer file (prunebench.engines.state_files' formats:
tensors in safetensors, the rest strict JSON, so nothing read back can run code).  A checkpoint
is resumed only when it matches the run (its run key: method, config, target, seed, data,
shapes) and every tensor fits what it goes into; one that does not is named in a warning and the
run starts from scratch (found unfit only while restoring: Unresumable, and the engine starts
again).
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Optional

import torch

from prunebench.engines.distributed import DataParallel
from prunebench.engines.state_files import FORMAT as STATE_FILE_FORMAT
from prunebench.engines.state_files import (
    FORMAT_VERSION, StateFileError, decode_optimizer, encode_optimizer, read_state, require, strict_json,
    write_state
)
from prunebench.modeling.models import resolve_dtype, weight_matrix
from prunebench.store.records import atomic_write_json, sanitize_nonfinite

CHECKPOINT_VERSION = 1
STATE_FORMAT = f"{STATE_FILE_FORMAT}/{FORMAT_VERSION}"  # in the multi-process pointer file


class ResumableTraining:
    """The checkpoint half of LearnedMaskPruner (its base class): saving, reading, checking and
    restoring the run's state.  Uses the pruner's name, display, config (steps, logits_dtype)
    and its final rule, hard_masks."""

    @property
    def checkpoint_file(self) -> str:
        return f"{self.name}_state.safetensors"

    def _run_key(self, ctx, modules, fingerprint) -> str:
        """What a checkpoint must match to be resumed: method, config, target, seed, data, shapes."""
        key = {"v": CHECKPOINT_VERSION, "method": self.name, "config": dataclasses.asdict(self.config),
               "sparsity": ctx.sparsity.to_dict(), "seed": ctx.seed, "stream": fingerprint,
               "shapes": [[n, list(m.weight.shape)] for n, m in modules.items()]}
        return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()

    def _checkpoint(self, dp, path: Path, run_key, holder, optimizer, scheduler, step, curves) -> None:
        """One process: the whole state in one file.  Several: one file per process in a directory
        per step, nothing gathered (replicated logits, schedule and curves from rank 0 alone; with
        shard_optimizer_state each process writes only its own AdamW moments; with shard_logits
        each its own shards of the logits and of their moments), made current when rank 0
        atomically rewrites the pointer file.  Every file: tensors in safetensors, the rest
        strict JSON (prunebench.engines.state_files): nothing read back can run code."""
        if not dp.active:
            self._save_state(path, run_key, holder.full(), optimizer, scheduler, step, curves)
            return
        shard_dir = _shard_dir(path, step)
        shard_dir.mkdir(parents=True, exist_ok=True)
        zero = getattr(optimizer, "optim", None)  # ZeroRedundancyOptimizer: this process's share
        mode = "sharded" if holder.sharded else "zero" if zero is not None else "replicated"
        meta, tensors = {"run_key": run_key, "step": step, "world": dp.world, "rank": dp.rank, "mode": mode}, {}
        if mode == "sharded":  # every process: its own shards, read back by the same rank
            logits = {name: {key: p.detach().to_local() for key, p in unit.tensors.items()}
                      for name, unit in zip(holder.names, holder.layers)}
            _put_logits(meta, tensors, logits)
            _put_optimizer(meta, tensors, optimizer)
        elif zero is not None:
            _put_optimizer(meta, tensors, zero)
        if dp.is_main:
            if mode != "sharded":  # replicated: every process holds the same full logits
                _put_logits(meta, tensors, holder.full())
            if mode == "replicated":
                _put_optimizer(meta, tensors, optimizer)
            _put_replicated(meta, tensors, scheduler, curves)
            if mode == "sharded":
                meta["layout"] = holder.layout()
        write_state(_shard_file(shard_dir, dp.rank), meta, tensors)
        dp.barrier()  # every shard is on disk before the pointer names them
        if dp.is_main:
            pointer = {"format": STATE_FORMAT, "run_key": run_key, "step": step, "world": dp.world,
                       "dir": shard_dir.name}
            atomic_write_json(_pointer(path), pointer)
            for old in path.parent.glob(f"{path.stem}.step*"):  # earlier steps: superseded
                if old != shard_dir:
                    shutil.rmtree(old, ignore_errors=True)
        dp.barrier()

    def _save_state(self, path: Path, run_key, logits, optimizer, scheduler, step, curves) -> None:
        """Atomic: write a temp file, then os.replace.  The noise and data order are counter-based
        functions of (seed, step), so no generator state is needed beyond the step."""
        meta, tensors = {"run_key": run_key, "step": step, "world": 1, "rank": 0, "mode": "single"}, {}
        _put_logits(meta, tensors, logits)
        _put_optimizer(meta, tensors, optimizer)
        _put_replicated(meta, tensors, scheduler, curves)
        write_state(path, meta, tensors)

    def _load_state(self, path: Optional[Path], run_key, report, dp=DataParallel(), layers=None):
        """The checkpoint to resume from, or None.  Read as data only and checked (format, run,
        step, tensors); one that fails is named in one warning line and ignored, and a pickle of
        the old format is never opened.  Several processes: all of them resume, or none does."""
        if path is None:
            return None
        who = self.display or self.name
        legacy = path.with_suffix(".pt")
        if legacy.exists() or (dp.active and any(path.parent.glob(f"{path.stem}.step*/rank*.pt"))):
            report.warnings.append(f"{who}: ignored an old-format checkpoint beside {path} (a pickle: never loaded)")
        state, reason = None, None
        try:
            state = self._read_checkpoint(path, run_key, dp, layers)
        except StateFileError as exc:
            reason = str(exc)
        if dp.any_true(state is None):  # one process cannot resume: none does
            if reason is not None:
                report.warnings.append(f"{who}: ignored checkpoint {reason}; the cell starts from scratch")
            return None
        return state

    def _read_checkpoint(self, path: Path, run_key, dp, layers):
        """This process's view of the checkpoint (None if there is none); StateFileError naming
        the file and the reason otherwise."""
        if not dp.active:
            if not path.exists():
                return None
            where = path
            main = own = _read_part(path, run_key, 1, 0, None, "single")
        else:
            pointer_path = _pointer(path)
            try:
                pointer = strict_json(pointer_path.read_text(encoding="utf-8"))
            except FileNotFoundError:
                return None
            except (OSError, UnicodeDecodeError, StateFileError) as exc:
                raise StateFileError(f"{pointer_path}: {str(exc).splitlines()[0]}") from None
            if not isinstance(pointer, dict) or pointer.get("format") != STATE_FORMAT:
                raise StateFileError(f"{pointer_path}: an old-format or foreign checkpoint pointer")
            if pointer.get("run_key") != run_key:
                raise StateFileError(f"{pointer_path}: from a different run (config, data or seed differ)")
            if pointer.get("world") != dp.world:
                raise StateFileError(f"{pointer_path}: written by {pointer.get('world')} processes, this run has "
                                     f"{dp.world} (the optimizer shards follow the process count)")
            step = pointer.get("step")
            if type(step) is not int or pointer.get("dir") != _shard_dir(path, step).name:  # no path from the file
                raise StateFileError(f"{pointer_path}: malformed")
            shard_dir = where = _shard_dir(path, step)
            main = _read_part(_shard_file(shard_dir, 0), run_key, dp.world, 0, step, None)
            own = main if dp.rank == 0 else _read_part(_shard_file(shard_dir, dp.rank), run_key, dp.world, dp.rank,
                                                       step, main[0]["mode"])
        (meta, tensors), (own_meta, own_tensors) = main, own
        try:
            return self._checked_state(meta, tensors, own_meta, own_tensors, layers)
        except StateFileError as exc:
            raise StateFileError(f"{where}: {exc}") from None

    def _checked_state(self, meta, tensors, own_meta, own_tensors, layers) -> dict:
        """The resumable state from rank 0's part (replicated) and this process's (its shards),
        checked for everything that is known before the logits exist."""
        step, mode = meta["step"], meta["mode"]
        require(0 < step < self.config.steps, f"step {step} is outside this run's 1..{self.config.steps - 1}")
        curves = meta.get("curves")
        require(isinstance(curves, dict) and all(isinstance(v, list) and all(_scalar(x) for x in v)
                                                 for v in curves.values())
                and len(curves.get("step", [])) == step, "its training curves do not match its step")
        require(isinstance(meta.get("scheduler"), dict), "no lr schedule")
        rng = tensors.get("torch_rng")
        require(rng is not None and rng.dtype == torch.uint8 and rng.shape == torch.get_rng_state().shape,
                "no generator state")
        # sharded logits: this process's shards; sharded moments (zero, sharded): its own
        logits = _get_logits(*((own_meta, own_tensors) if mode == "sharded" else (meta, tensors)), layers,
                             resolve_dtype(self.config.logits_dtype))
        opt_meta, opt_tensors = (own_meta, own_tensors) if mode in ("sharded", "zero") else (meta, tensors)
        state = {"step": step, "mode": mode, "curves": curves, "scheduler": meta["scheduler"], "torch_rng": rng,
                 "logits": logits, "optimizer": (opt_meta.get("optimizer"), opt_tensors)}
        if mode == "sharded":  # the full shapes the placeholders take (FSDP then shards them)
            layout = meta.get("layout")
            require(isinstance(layout, dict) and list(layout) == list(logits)
                    and all(isinstance(keys, dict) and list(keys) == list(logits[name])
                            and all(isinstance(v, list) and len(v) == 2 and isinstance(v[0], list)
                                    and all(type(d) is int and d >= 0 for d in v[0]) for v in keys.values())
                            for name, keys in layout.items()), "its layout does not match its logits")
            state["layout"] = layout
        return state

    def _restore(self, resumed, holder, optimizer, scheduler, modules, spec, dp):
        """Load a checked checkpoint into the run's logits, optimizer and schedule, each tensor
        checked against what it goes into.  Any mismatch on any process: Unresumable on all."""
        reason = None
        try:
            if resumed["mode"] == "sharded":  # this process's shards, in place
                with torch.no_grad():
                    for name, unit in zip(holder.names, holder.layers):
                        require(list(unit.tensors) == list(resumed["logits"][name]), f"layer {name}: other logits")
                        for key, p in unit.tensors.items():
                            local, t = p.to_local(), resumed["logits"][name][key]
                            require(t.shape == local.shape, f"logits {name}.{key}: shard {list(t.shape)}, this "
                                                            f"process holds {list(local.shape)}")
                            local.copy_(t)
            target = optimizer.optim if resumed["mode"] == "zero" else optimizer
            opt_meta, opt_tensors = resumed["optimizer"]
            target.load_state_dict(decode_optimizer(opt_meta, opt_tensors, target))
            live = scheduler.state_dict()
            saved = resumed["scheduler"]
            require(set(saved) == set(live) and all(_same_json_type(saved[k], live[k]) for k in live)
                    and saved.get("last_epoch") == resumed["step"], "its lr schedule does not match its step")
            scheduler.load_state_dict(saved)
        except Exception as exc:  # ours (StateFileError) or torch's own checks of a state dict
            reason = _one_line(exc)
        if dp.any_true(reason is not None):
            raise Unresumable(reason or "another process could not use its part")
        # The logits must give masks of the run's weights (the one check of their shapes against
        # the model that needs no prior): the method's own final rule, on every process.
        full = holder.full()
        try:
            masks = self.hard_masks(full, spec)
            require(list(masks) == list(modules) and all(
                tuple(masks[n].shape) == tuple(weight_matrix(m).shape) for n, m in modules.items()),
                "its logits do not give masks of this model's weights")
        except StateFileError as exc:
            reason = str(exc)
        except Exception as exc:  # the method's rule failed on them
            reason = f"its logits do not fit this model ({_one_line(exc)})"
        del full
        if dp.any_true(reason is not None):
            raise Unresumable(reason or "another process could not use its part")
        torch.set_rng_state(resumed["torch_rng"])


class Unresumable(Exception):
    """A checkpoint that passed reading but does not fit the run: the cell starts from scratch."""


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else type(exc).__name__


def _scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def _same_json_type(saved, live) -> bool:
    if isinstance(live, (list, tuple)):
        return isinstance(saved, list) and len(saved) == len(live) and all(
            _same_json_type(s, v) for s, v in zip(saved, live))
    if isinstance(live, float):
        return type(saved) in (int, float)
    return type(saved) is type(live)


def _put_logits(meta: dict, tensors: dict, logits: dict) -> None:
    """{layer: {key: tensor}} as tensors logits/<layer>/<key> and their order in the JSON."""
    meta["logits"] = [[layer, list(keys)] for layer, keys in logits.items()]
    for layer, keys in logits.items():
        for key, t in keys.items():
            tensors[f"logits/{layer}/{key}"] = t


def _get_logits(meta: dict, tensors: dict, layers, dtype) -> dict:
    listing = meta.get("logits")
    require(isinstance(listing, list) and all(isinstance(row, list) and len(row) == 2 and isinstance(row[0], str)
                                              and isinstance(row[1], list) and row[1]
                                              and all(isinstance(k, str) for k in row[1]) for row in listing),
            "no logits")
    out = {}
    for layer, keys in listing:
        require(layer not in out and len(set(keys)) == len(keys), "its logits are listed twice")
        out[layer] = {}
        for key in keys:
            t = tensors.get(f"logits/{layer}/{key}")
            require(t is not None, f"logits {layer}.{key} are missing")
            require(t.dtype == dtype, f"logits {layer}.{key} are {t.dtype}, this run trains {dtype}")
            out[layer][key] = t
    require(layers is None or list(out) == list(layers), "its layers are not this model's prunable layers")
    return out


def _put_optimizer(meta: dict, tensors: dict, optimizer) -> None:
    meta["optimizer"], more = encode_optimizer(optimizer.state_dict())
    tensors.update(more)


def _put_replicated(meta: dict, tensors: dict, scheduler, curves) -> None:
    """What every process holds alike: the lr schedule, the curves (non-finite values as null,
    as the record stores them) and the generator state."""
    curves = json.loads(json.dumps(curves, default=float))
    sanitize_nonfinite(curves)
    meta.update(scheduler=scheduler.state_dict(), curves=curves)
    tensors["torch_rng"] = torch.get_rng_state()


def _read_part(path: Path, run_key, world, rank, step, mode):
    """One process's file, checked against the pointer and rank 0's (StateFileError naming it)."""
    try:
        meta, tensors = read_state(path)
    except FileNotFoundError:
        raise StateFileError(f"{path}: missing") from None
    except StateFileError as exc:
        raise StateFileError(f"{path}: {exc}") from None
    if meta.get("run_key") != run_key:
        raise StateFileError(f"{path}: from a different run (config, data or seed differ)")
    if (meta.get("world"), meta.get("rank")) != (world, rank) or (step is not None and meta.get("step") != step) \
            or type(meta.get("step")) is not int:
        raise StateFileError(f"{path}: does not match its checkpoint (step, process)")
    expected = ("single",) if world == 1 else ("replicated", "zero", "sharded")
    if meta.get("mode") not in expected or (mode is not None and meta.get("mode") != mode):
        raise StateFileError(f"{path}: written for another way of running")
    return meta, tensors


def remove_state(path: Path) -> None:
    """A checkpoint's every file: the single-process file, the pointer (first: without it the
    shards are never read) and the shard directories; and an old-format file, never read."""
    path.unlink(missing_ok=True)
    path.with_suffix(".pt").unlink(missing_ok=True)
    _pointer(path).unlink(missing_ok=True)
    for shard_dir in path.parent.glob(f"{path.stem}.step*"):
        shutil.rmtree(shard_dir, ignore_errors=True)


def _shard_dir(path: Path, step: int) -> Path:
    return path.with_name(f"{path.stem}.step{step:07d}")


def _shard_file(shard_dir: Path, rank: int) -> Path:
    return shard_dir / f"rank{rank}.safetensors"


def _pointer(path: Path) -> Path:
    """The file naming the current sharded checkpoint of `path`."""
    return path.with_name(f"{path.stem}.latest.json")
