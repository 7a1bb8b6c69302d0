"""Data parallelism for the mask-learning engine, on torch.distributed.

A learned cell may run as several processes (one per GPU, or several CPU processes with the gloo
backend): `torchrun --nproc-per-node N`, or a SLURM job of N tasks that prunebench.run.cell_worker turns into
a torch.distributed world.  Every process holds the frozen model and all logits; each runs its
share of an optimizer step's micro-batches, and DistributedDataParallel averages the logit
gradients before clipping and the update, so every process takes the same step.  With
`shard_optimizer_state` the AdamW moments are split across the processes by torch's
ZeroRedundancyOptimizer (ZeRO stage 1): two thirds of the training state of float logits.  With
`shard_logits` torch's FSDP2 (`fully_shard`) shards everything: each layer's logits are one FSDP
unit, gathered in full only while that layer's masked weight is computed (and again for its
backward), their gradients reduce-scattered, and each process keeps and updates its shard of
the logits and of their moments; each process then checkpoints its own shards
(prunebench.engines.masklearn, in prunebench.engines.state_files' formats: torch.distributed.checkpoint's
.metadata is a pickle, and nothing read from a results directory is unpickled).

What a step computes does not depend on the process count: micro-batch k of step s reads the
same sequences and draws the same mask noise whichever process runs it (both are functions of
(seed, step, k) in prunebench.engines.masklearn), so N processes compute what one process with the same
global gradient accumulation computes, up to the order of the floating-point sums.

Nothing here starts a process group at import; `init_from_environment` starts one only when the
launcher's variables say there are several processes.
"""
from __future__ import annotations

import contextlib
import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from prunebench.errors import UserError

# The launchers' variables (torchrun's; cell_worker exports the same from SLURM's for a job's tasks).
WORLD_ENV, RANK_ENV, LOCAL_RANK_ENV = "WORLD_SIZE", "RANK", "LOCAL_RANK"
# A collective that waits longer than this has lost a peer (the default is 30 minutes for gloo):
# a cell's first step includes every process's one-shot prior, minutes at 8B.
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=60)


def backend_for(device: str) -> str:
    return "nccl" if str(device).startswith("cuda") else "gloo"


def launched_world_size() -> int:
    """How many processes the launcher started for this cell (1 outside torchrun / SLURM tasks)."""
    try:
        return int(os.environ.get(WORLD_ENV, "1"))
    except ValueError:
        raise UserError(f"{WORLD_ENV}={os.environ.get(WORLD_ENV)!r} is not a number",
                        hint="launch with torchrun or prunebench run --nproc-per-node") from None


def init_from_environment(device: str = "cpu") -> bool:
    """Join the world the launcher describes (torchrun: env://).  True if this call started the
    process group (the caller then ends it with `shutdown`)."""
    if launched_world_size() <= 1 or dist.is_initialized():
        return False
    if str(device).startswith("cuda"):
        torch.cuda.set_device(int(os.environ.get(LOCAL_RANK_ENV, "0")))
    dist.init_process_group(backend=backend_for(device), timeout=COLLECTIVE_TIMEOUT)
    return True


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass(frozen=True)
class DataParallel:
    """This process's place in the cell's world; world 1 is the plain single-process path."""

    rank: int = 0
    world: int = 1

    @classmethod
    def current(cls) -> "DataParallel":
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return cls(dist.get_rank(), dist.get_world_size())
        return cls()

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def micro_batches(self, grad_accum: int, who: str) -> range:
        """The global micro-batch indices of one step this process runs: a contiguous share."""
        if grad_accum % self.world:
            raise UserError(f"{who}: grad_accum {grad_accum} micro-batches per step do not split over "
                            f"{self.world} processes", hint=f"use a grad_accum divisible by {self.world}")
        share = grad_accum // self.world
        return range(self.rank * share, (self.rank + 1) * share)

    def wrap(self, holder: "LogitHolder", device="cpu", shard_logits: bool = False) -> nn.Module:
        """The module a training step runs through (its forward runs the masked model's forward),
        so the parallel wrapper sees every use of the logits: the holder itself on one process;
        with several, DistributedDataParallel around it (the gradients averaged at the end of the
        backward), or with `shard_logits` the holder under FSDP2, one unit per layer."""
        if not self.active:
            return holder
        if shard_logits:
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(torch.device(device).type, (self.world,))
            for unit in holder.layers:
                fully_shard(unit, mesh=mesh)  # gathered for its own forward and backward only
            fully_shard(holder, mesh=mesh)  # the root: it holds no logits of its own
            holder.sharded = True
            return holder
        from torch.nn.parallel import DistributedDataParallel

        # the holder has no buffers; at construction rank 0's initial logits reach every process
        return DistributedDataParallel(holder)

    def no_sync(self, module: nn.Module, last_micro: bool):
        """Accumulate locally on all but a step's last micro-batch (one all-reduce per step).
        Sharded logits reduce-scatter every micro-batch instead: accumulating would keep a full
        unsharded gradient per layer, the memory sharding is there to save."""
        if self.active and not last_micro and hasattr(module, "no_sync"):
            return module.no_sync()
        return contextlib.nullcontext()

    def clip_grad_norm(self, params: list, max_norm: float) -> float:
        """Clip the global gradient norm (over every process's shard when sharded); the norm."""
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        if hasattr(norm, "full_tensor"):  # a DTensor under FSDP: the reduced value
            norm = norm.full_tensor()
        return float(norm)

    def sum_floats(self, values: dict) -> dict:
        """{name: float} summed over the processes (the logged losses, the held-out sums)."""
        if not self.active or not values:
            return values
        names = sorted(values)
        t = torch.tensor([float(values[n]) for n in names], dtype=torch.float64)
        dist.all_reduce(t)  # gloo and nccl both reduce float64 (nccl on the current device)
        return dict(zip(names, t.tolist()))

    def any_true(self, flag: bool) -> bool:
        """True on every process if it is True on any (a non-finite loss stops all of them)."""
        if not self.active:
            return flag
        t = torch.tensor([1.0 if flag else 0.0])
        dist.all_reduce(t)
        return bool(t.item() > 0)

    def broadcast(self, obj):
        """Rank 0's value of a picklable object, on every process."""
        if not self.active:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def make_optimizer(self, params: list, build, shard: bool):
        """AdamW from `build(params)`; with `shard`, torch's ZeroRedundancyOptimizer around the
        same class and settings, so each process keeps the moments of its share of the logits."""
        optimizer = build(params)
        if not (shard and self.active):
            return optimizer
        from torch.distributed.optim import ZeroRedundancyOptimizer

        defaults = {k: v for k, v in optimizer.defaults.items() if k in ("lr", "betas", "eps", "weight_decay")}
        return ZeroRedundancyOptimizer(params, optimizer_class=type(optimizer), **defaults)


class LayerLogits(nn.Module):
    """One layer's logits ({key: tensor}): the unit FSDP gathers in full for this module's
    forward, which computes the layer's masked weight, and shards again after it."""

    def __init__(self, tensors: dict):
        super().__init__()
        # Assigned one by one: nn.ParameterDict(a plain dict) sorts the keys, and the order of
        # the parameters is the order of the sums in the clipped gradient norm (PATCH's "T", "G"
        # would become "G", "T" and the masks drift by rounding from those of the layer-major order).
        self.tensors = nn.ParameterDict()
        for key, tensor in tensors.items():
            self.tensors[key] = tensor

    def forward(self, compute):
        return compute(dict(self.tensors))


class LogitHolder(nn.Module):
    """Every layer's trainable logits as one module (the unit DDP synchronises, FSDP's root).
    Its forward runs a closure, the masked model's forward, inside which each layer's masked
    weight is computed through that layer's `LayerLogits`."""

    def __init__(self, logits: dict):
        super().__init__()
        self.names = list(logits)
        self.index = {name: i for i, name in enumerate(self.names)}
        self.layers = nn.ModuleList(LayerLogits(logits[name]) for name in self.names)
        self.sharded = False

    def forward(self, run):
        return run()

    def layer(self, name: str) -> LayerLogits:
        return self.layers[self.index[name]]

    def trainable(self) -> list:
        return [p for p in self.parameters() if p.requires_grad]

    def full(self, device=None) -> dict:
        """{layer: {key: detached tensor}}: the whole logits, gathered from every process's shard
        when sharded (a collective: every process calls it), optionally moved to `device`."""
        out = {}
        for name, unit in zip(self.names, self.layers):
            out[name] = {}
            for key, p in unit.tensors.items():
                t = p.detach()
                if hasattr(t, "full_tensor"):
                    t = t.full_tensor()
                out[name][key] = t if device is None else t.to(device)
        return out

    def layout(self) -> dict:
        """{layer: {key: [shape, trainable]}}: what a sharded checkpoint restores into."""
        return {name: {key: [list(p.shape), p.requires_grad] for key, p in unit.tensors.items()}
                for name, unit in zip(self.names, self.layers)}

    def local_bytes(self) -> int:
        """Bytes of logits this process holds (its shards when sharded)."""
        return sum((p.to_local() if hasattr(p, "to_local") else p).nbytes for p in self.parameters())
