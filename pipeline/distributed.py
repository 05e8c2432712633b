"""Small torch.distributed helpers shared by multi-process stages (mask extraction, DDP training).

A process started by `torchrun` finds RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its
environment; `init_from_env` joins the default process group from them (NCCL on CUDA, Gloo on the CPU) and
`shutdown` leaves it again if, and only if, `init_from_env` created it. Without those variables, or with
WORLD_SIZE=1, nothing is initialised and every helper here acts as for a single process.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Optional

import torch
import torch.distributed as dist

from pipeline.core.utils import resolve_device

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job, and the device it should compute on."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    initialised_here: bool  # `shutdown` destroys the process group only when this is True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise RuntimeError(f"environment variable {name}={value!r} is not an integer") from None


def init_from_env(device: str | torch.device = "auto", backend: Optional[str] = None) -> DistInfo:
    """Join (or reuse) the default process group described by the torchrun environment.

    `device` is resolved as by `pipeline.core.utils.resolve_device`; with more than one process a CUDA device
    becomes cuda:LOCAL_RANK, so that each process of a node has its own GPU. `backend` defaults to "nccl" for
    a CUDA device and "gloo" otherwise. A group that is already initialised (by a caller) is reused as it is.
    """
    dev = resolve_device(device) if isinstance(device, str) else torch.device(device)
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = _env_int("LOCAL_RANK", rank)
        return DistInfo(rank, world, local, _local_device(dev, local, world), False)
    world = _env_int("WORLD_SIZE", 1)
    if world <= 1:
        return DistInfo(0, 1, 0, dev, False)
    if not dist.is_available():
        raise RuntimeError(f"WORLD_SIZE={world} but this torch build has no torch.distributed")
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise RuntimeError(f"WORLD_SIZE={world} but {', '.join(missing)} unset: start the processes with "
                           f"torchrun (or set RANK, MASTER_ADDR and MASTER_PORT yourself)")
    rank, local = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = _local_device(dev, local, world)
    backend = backend or ("nccl" if dev.type == "cuda" else "gloo")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)  # NCCL and the object collectives use the current device
    dist.init_process_group(backend=backend, init_method="env://", rank=rank, world_size=world,
                            device_id=dev if backend == "nccl" else None)
    log.info("rank %d of %d (local rank %d) on %s, backend %s", rank, world, local, dev, backend)
    return DistInfo(rank, world, local, dev, True)


def _local_device(dev: torch.device, local_rank: int, world: int) -> torch.device:
    if dev.type != "cuda" or world <= 1:
        return dev
    if dev.index not in (None, local_rank):
        log.warning("device %s replaced by cuda:%d: with %d processes each uses the GPU of its local rank",
                    dev, local_rank, world)
    if local_rank >= torch.cuda.device_count():
        raise RuntimeError(f"local rank {local_rank} has no GPU: only {torch.cuda.device_count()} visible "
                           f"(start at most that many processes per node, or use device: cpu)")
    return torch.device("cuda", local_rank)


def shutdown(info: DistInfo) -> None:
    """Destroy the process group if `init_from_env` created it (a caller's group is left alone)."""
    if info.initialised_here and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """Whether a process group with more than one process is initialised."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank: from the group when one is initialised, else from RANK (0 when unset)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else _env_int("RANK", 0)


def world_size() -> int:
    """Number of processes in the group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, and in a single process (also after `shutdown`, via RANK): the one that logs and writes."""
    return rank() == 0


def _collective_device() -> torch.device:
    # NCCL only moves CUDA tensors; Gloo moves CPU ones.
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every process of the group (no-op without one)."""
    if not active():
        return
    if dist.get_backend() == "nccl":
        dist.barrier(device_ids=[torch.cuda.current_device()])
    else:
        dist.barrier()


def all_ok(flag: bool) -> bool:
    """True on every process iff `flag` is True on every process (a barrier too); `flag` without a group."""
    if not active():
        return bool(flag)
    t = torch.tensor([1 if flag else 0], dtype=torch.int32, device=_collective_device())
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """`obj` of rank `src`, returned on every process (picklable objects only); `obj` without a group."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def gather_objects(obj: Any, dst: int = 0) -> Optional[list[Any]]:
    """Every process's `obj` in rank order on rank `dst`, None elsewhere; `[obj]` without a group."""
    if not active():
        return [obj]
    out: Optional[list[Any]] = [None] * dist.get_world_size() if dist.get_rank() == dst else None
    dist.gather_object(obj, out, dst=dst)
    return out


def all_gather_objects(obj: Any) -> list[Any]:
    """Every process's `obj` in rank order, on every process; `[obj]` without a group."""
    if not active():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
