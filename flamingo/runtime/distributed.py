"""One process or several under torchrun: rank, world size, device, and the process group, read from the
environment torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK)."""

from __future__ import annotations

import logging
import os
import sys
from typing import NoReturn, Optional, Union

import torch
import torch.distributed as dist


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment; (0, 1, 0) for one process."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))


def default_device(requested: Union[str, torch.device, None] = None) -> torch.device:
    """`requested`, else this rank's GPU (cuda:LOCAL_RANK) when CUDA exists, else the CPU. A bare "cuda" is this
    rank's GPU too: `torch.cuda.set_device` and the NCCL group need an index, and under torchrun each rank its own."""
    if requested is None:
        return torch.device(f"cuda:{dist_info()[2]}" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", dist_info()[2])
    return device


def init_process_group_from_env(device: Optional[torch.device] = None) -> bool:
    """Join torchrun's process group when the environment names more than one process (NCCL with CUDA, else
    gloo); True when this process is one of several. A group already joined is kept."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    if dist_info()[1] <= 1:
        return False
    device = device if device is not None else default_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return True


def host_group() -> Optional[dist.ProcessGroup]:
    """A group of every rank whose collectives run on CPU tensors, for small agreements between the ranks' host
    code (a stop flag): the default group when it is gloo, else a new gloo group (under NCCL a collective on a CUDA
    tensor is read back with a host sync that waits for every kernel queued before it). None for one process.
    Every rank must call it, in the same order as its other group creations."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return None
    if dist.get_backend() == "gloo":
        return dist.group.WORLD
    return dist.new_group(backend="gloo")


def max_over_ranks(value: int, group: Optional[dist.ProcessGroup]) -> int:
    """The largest of every rank's `value` (one all-reduce on `group`, a `host_group()`); `value` itself for None.
    Every rank of the group must call it the same number of times."""
    if group is None:
        return value
    flag = torch.tensor(value, dtype=torch.int64)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=group)
    return int(flag)


def leave_process_group_and_exit(code: int = 0) -> NoReturn:
    """End a torchrun process whose work is done: destroy its process group, flush logging and the standard streams,
    and exit without finalizing the interpreter (atexit handlers do not run). The gloo group's worker threads outlive
    `destroy_process_group` while anything still references the group (FSDP2 does); one still releasing the last
    collective's tensors asks for the GIL, and asking for it while the interpreter finalizes aborts the process
    (SIGABRT, "terminate called without an active exception") after every file was written."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
