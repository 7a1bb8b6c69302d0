"""Resumable training state on disk in formats that cannot run code.

The mask-learning engine checkpoints under `<results>/work/<key>/`, and results directories are
shared (several runners, SLURM arrays, committed runs): whatever is read back from them may have
been written by anyone, so nothing is unpickled (torch.load without weights_only, and
torch.distributed.checkpoint whose .metadata file is a pickle, both ran a planted file's code).

One file per process: a safetensors file whose tensors are the state's tensors and whose header
metadata holds everything else as one strict JSON document (no NaN / Infinity, no duplicate
names), with a CRC-32 of every tensor's bytes so a garbled file is refused, not trusted. Writes
are atomic (a temporary sibling moved into place). Reading fails with `StateFileError`, whose
message is one line; the caller then ignores the checkpoint.

Optimizer state (`encode_optimizer` / `decode_optimizer`) round-trips exactly: plain tensors,
DTensor shards (each process writes its local shard, nothing gathered, and gets it back wrapped
like its parameter) and torchao's 8-bit moments (their codes, scales and code book, rebuilt only
as the one allowed class). Decoding checks every tensor against the live optimizer's parameters.
"""
from __future__ import annotations

import json
import zlib
from pathlib import Path

import torch

from prunebench.store.atomic import atomic_path
from prunebench.store.records import strict_json_hooks

FORMAT = "prunebench-training-state"
FORMAT_VERSION = 1
META_KEY = "prunebench"
# Files the previous format wrote (torch.save pickles, a zip or a bare pickle): never loaded.
PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")
# The only tensor subclass rebuilt from a file: torchao's 8-bit moments (optimizer: adamw-8bit),
# from its codes, scales, code book and (signed, dtype).
SUBCLASS_8BIT = "torchao.optim.subclass_8bit.OptimState8bit"
FLOAT_DTYPES = {str(d): d for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)}


class StateFileError(ValueError):
    """A state file that is not what prunebench wrote: the one-line reason."""


# ---------------------------------------------------------------------------------------------
# Files

def write_state(path, meta: dict, tensors: dict) -> None:
    """Atomically write {name: tensor} and the JSON-able `meta` (strict: NaN refused) to `path`."""
    from safetensors.torch import save_file

    out, seen = {}, set()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.untyped_storage().data_ptr() in seen:  # safetensors refuses tensors sharing memory
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    doc = {"format": FORMAT, "version": FORMAT_VERSION, **meta, "crc32": {n: _crc32(t) for n, t in out.items()}}
    text = json.dumps(doc, allow_nan=False, sort_keys=False)
    with atomic_path(path) as tmp:
        save_file(out, str(tmp), metadata={META_KEY: text})


def read_state(path) -> tuple[dict, dict]:
    """(meta, {name: tensor}) of a file `write_state` wrote; FileNotFoundError if there is none,
    StateFileError (one line) for anything else."""
    from safetensors import safe_open

    path = Path(path)
    with open(path, "rb") as f:  # FileNotFoundError passes through: no checkpoint
        head = f.read(4)
    try:
        with safe_open(str(path), framework="pt") as f:
            text = (f.metadata() or {}).get(META_KEY)
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except Exception as exc:  # safetensors' own error types for a truncated or garbled file
        if head.startswith(PICKLE_MAGIC):  # (asked only now: a safetensors header length may start so)
            raise StateFileError("an old-format checkpoint (a pickle), never loaded") from None
        raise StateFileError(f"not a readable safetensors file ({_line(exc)})") from None
    if text is None:
        raise StateFileError("not a prunebench training state (no metadata)")
    meta = strict_json(text)
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise StateFileError("not a prunebench training state")
    if meta.get("version") != FORMAT_VERSION:
        raise StateFileError(f"state format version {meta.get('version')!r}, this prunebench reads {FORMAT_VERSION}")
    crc = meta.get("crc32")
    if not isinstance(crc, dict) or set(crc) != set(tensors):
        raise StateFileError("its tensors are not the ones it lists")
    for name, t in tensors.items():
        if _crc32(t) != crc[name]:
            raise StateFileError(f"tensor {name} is damaged (checksum)")
    return meta, tensors


def strict_json(text: str):
    """json.loads refusing NaN / Infinity and duplicate names (StateFileError)."""
    try:
        return json.loads(text, **strict_json_hooks(StateFileError))
    except (json.JSONDecodeError, RecursionError) as exc:
        raise StateFileError(f"not valid JSON ({_line(exc)})") from None


def _crc32(t: torch.Tensor) -> int:
    return zlib.crc32(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else 0


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def require(condition, reason: str) -> None:
    if not condition:
        raise StateFileError(reason)


# ---------------------------------------------------------------------------------------------
# Optimizer state

def encode_optimizer(state_dict: dict, prefix: str = "optim") -> tuple[dict, dict]:
    """An optimizer's state_dict as (JSON meta, {name: tensor}): each process's local shards."""
    tensors, state = {}, []
    for pid, entry in state_dict["state"].items():
        items = []
        for name, value in entry.items():
            key = f"{prefix}/{pid}/{name}"
            if not torch.is_tensor(value):
                items.append([name, {"value": value}])
                continue
            if hasattr(value, "to_local"):  # a DTensor: this process's shard only
                value = value.to_local()
            cls = f"{type(value).__module__}.{type(value).__qualname__}"
            if cls == SUBCLASS_8BIT:
                for inner in ("codes", "scale", "qmap"):
                    tensors[f"{key}/{inner}"] = getattr(value, inner)
                items.append([name, {"subclass": cls, "signed": bool(value.signed), "dtype": str(value.dtype)}])
            elif type(value) is torch.Tensor or isinstance(value, torch.nn.Parameter):
                tensors[key] = value
                items.append([name, {"tensor": True}])
            else:
                raise TypeError(f"cannot store optimizer state of type {cls}")
        state.append([int(pid), items])
    groups = []
    for g, group in enumerate(state_dict["param_groups"]):
        out = {}
        for name, value in group.items():
            if torch.is_tensor(value):  # torchao keeps its lr a tensor
                tensors[f"{prefix}/group{g}/{name}"] = value
                out[name] = {"tensor": True}
            else:
                out[name] = {"value": list(value) if isinstance(value, tuple) else value}
        groups.append(out)
    return {"state": state, "param_groups": groups}, tensors


def decode_optimizer(meta, tensors: dict, optimizer, prefix: str = "optim") -> dict:
    """`encode_optimizer`'s output back into a state_dict for `optimizer.load_state_dict`, every
    tensor checked against the live optimizer's parameters (StateFileError)."""
    require(isinstance(meta, dict) and isinstance(meta.get("state"), list)
            and isinstance(meta.get("param_groups"), list), "no optimizer state")
    live = optimizer.state_dict()["param_groups"]
    require(len(meta["param_groups"]) == len(live), "its optimizer has another number of parameter groups")
    params = [p for group in optimizer.param_groups for p in group["params"]]
    groups = []
    for g, (saved, current) in enumerate(zip(meta["param_groups"], live)):
        # every live setting, and possibly more: ZeRO copies the scheduler's initial_lr into its
        # local optimizer's groups only at the first step, so a fresh one lacks it
        require(isinstance(saved, dict) and set(current) <= set(saved), "its optimizer has other settings")
        group = {}
        for name, spec in saved.items():
            group[name] = _decode_value(spec, tensors, f"{prefix}/group{g}/{name}", like=current.get(name, _ANY))
        require(group["params"] == current["params"], "its optimizer holds other parameters")
        groups.append(group)
    state = {}
    for row in meta["state"]:
        require(isinstance(row, list) and len(row) == 2 and type(row[0]) is int and 0 <= row[0] < len(params)
                and isinstance(row[1], list) and row[0] not in state, "malformed optimizer state")
        pid, items = row
        param = params[pid]
        local = param.to_local() if hasattr(param, "to_local") else param
        entry = {}
        for item in items:
            require(isinstance(item, list) and len(item) == 2 and isinstance(item[0], str)
                    and isinstance(item[1], dict), "malformed optimizer state")
            name, spec = item
            key = f"{prefix}/{pid}/{name}"
            if "value" in spec:
                require(set(spec) == {"value"} and _is_json_scalar(spec["value"]), f"malformed optimizer value {key}")
                entry[name] = spec["value"]
                continue
            if name == "step":  # AdamW's step count: a float scalar
                t = tensors.get(key)
                require(spec == {"tensor": True} and t is not None and t.dim() == 0 and t.is_floating_point()
                        and bool(torch.isfinite(t)) and float(t) >= 0, f"bad optimizer step count {key}")
                entry[name] = t
                continue
            if spec.get("subclass") is not None:
                value = _decode_8bit(spec, tensors, key, local)
            else:
                t = tensors.get(key)
                require(spec == {"tensor": True} and t is not None, f"optimizer tensor {key} is missing")
                require(t.shape == local.shape and t.dtype == local.dtype,
                        f"optimizer tensor {key} is {t.dtype} {list(t.shape)}, its parameter "
                        f"{local.dtype} {list(local.shape)}")
                value = t
            if hasattr(param, "to_local"):  # back into a shard of the parameter's layout
                from torch.distributed.tensor import DTensor

                value = DTensor.from_local(value.to(local.device), param.device_mesh, param.placements,
                                           run_check=False, shape=param.shape, stride=param.stride())
            entry[name] = value
        state[pid] = entry
    return {"state": state, "param_groups": groups}


_ANY = object()  # a setting the live optimizer does not have (yet): a JSON scalar or a tensor


def _decode_value(spec, tensors, key, like):
    require(isinstance(spec, dict) and len(spec) == 1 and ("value" in spec or spec.get("tensor") is True),
            f"malformed optimizer setting {key}")
    if like is _ANY:
        value = tensors.get(key) if "value" not in spec else spec["value"]
        require(torch.is_tensor(value) or _is_json_scalar(value), f"malformed optimizer setting {key}")
        return value
    if "value" in spec:
        value = spec["value"]
        if isinstance(like, tuple):
            require(isinstance(value, list), f"malformed optimizer setting {key}")
            value = tuple(value)
        require(type(value) is type(like) or (isinstance(like, float) and type(value) is int),
                f"optimizer setting {key} has another type")
        return value
    t = tensors.get(key)
    require(torch.is_tensor(like) and t is not None and t.shape == like.shape and t.dtype == like.dtype,
            f"optimizer setting {key} does not match")
    return t


def _decode_8bit(spec, tensors, key, local):
    require(spec.get("subclass") == SUBCLASS_8BIT and set(spec) == {"subclass", "signed", "dtype"}
            and isinstance(spec["signed"], bool) and spec["dtype"] in FLOAT_DTYPES,
            f"optimizer tensor {key} is of a kind this prunebench does not read")
    codes, scale, qmap = (tensors.get(f"{key}/{inner}") for inner in ("codes", "scale", "qmap"))
    require(codes is not None and scale is not None and qmap is not None, f"optimizer tensor {key} is missing")
    require(codes.dtype == torch.uint8 and codes.shape == local.shape and scale.dtype == torch.float32
            and scale.dim() == 1 and scale.numel() > 0 and codes.numel() % scale.numel() == 0
            and qmap.dtype == torch.float32 and qmap.shape == (256,)
            and FLOAT_DTYPES[spec["dtype"]] == local.dtype, f"optimizer tensor {key} does not match its parameter")
    from torchao.optim.subclass_8bit import OptimState8bit

    return OptimState8bit(codes, scale, qmap, spec["signed"], FLOAT_DTYPES[spec["dtype"]])


def _is_json_scalar(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))
