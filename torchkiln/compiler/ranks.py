"""Which process of a ``torchrun`` group this is: passes that work data-parallel (calibration,
distillation) join the group when ``WORLD_SIZE`` > 1 (gloo on CPU, NCCL with a GPU; collectives
time out after ``TORCHKILN_DIST_TIMEOUT`` seconds, default 300, instead of hanging)."""

from __future__ import annotations

import datetime
import os

import torch


def join_process_group() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when there is one."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    if not dist.is_initialized():
        timeout = datetime.timedelta(seconds=float(os.environ.get("TORCHKILN_DIST_TIMEOUT", "300")))
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", timeout=timeout)
    return dist.get_rank(), dist.get_world_size()
