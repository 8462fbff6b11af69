"""Processes: one, or one per torchrun rank (DDP), and the few collectives training needs."""
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2_triton.training.errors import ConfigError


def wants_cuda(device: str) -> bool:
    return device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())


@dataclass(frozen=True)
class DistContext:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_ddp(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str) -> DistContext:
    """Under torchrun (RANK set): init the process group (NCCL on GPU, gloo on CPU); else one process."""
    use_cuda = wants_cuda(device)
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if "RANK" not in os.environ:
        return DistContext(0, 0, 1, torch.device(device if device != "auto" else ("cuda" if use_cuda else "cpu")))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return DistContext(rank, local_rank, world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"))


def all_reduce_mean(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    if ctx.is_ddp:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)  # gloo has no AVG
        t /= ctx.world_size
    return t


def gather(obj, ctx: DistContext) -> list:
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not ctx.is_ddp:
        return [obj]
    out = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def on_rank0(ctx: DistContext, fn):
    """fn() on rank 0 only (its result there; None elsewhere). If it fails every rank raises, so no rank
    waits forever at a collective for one that is gone: a ConfigError as a ConfigError, anything else
    as a RuntimeError naming rank 0's error (rank 0 re-raises its own, traceback and all)."""
    error, result = None, None
    if ctx.is_main:
        try:
            result = fn()
        except BaseException as e:
            error = e
    if ctx.is_ddp:
        box = [None if error is None else (isinstance(error, ConfigError), f"{type(error).__name__}: {error}")]
        dist.broadcast_object_list(box, src=0)
        if not ctx.is_main and box[0] is not None:
            is_config, text = box[0]
            if is_config:
                raise ConfigError(text.split(": ", 1)[1])
            raise RuntimeError(f"rank 0 failed: {text}")
    if error is not None:
        raise error
    return result

