"""Processes: one, or one per torchrun rank (DDP), and the few collectives training needs.

Every collective of the training loop waits at most `timeout` seconds (`--dist-timeout`) for the other
processes, so a rank that froze or died ends the run instead of hanging it: gloo raises on the waiting
ranks, NCCL's watchdog ends them. Rank 0's setup (claiming the run folder, preparing data, which can
take hours) is awaited through a gloo group without that bound."""
import os
from dataclasses import dataclass, field
from datetime import timedelta

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
    setup_group: object = field(default=None, compare=False)  # gloo, no short timeout: waits for rank 0's setup

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_ddp(self) -> bool:
        return self.world_size > 1


SETUP_TIMEOUT = timedelta(days=7)  # rank 0 may prepare a whole dataset while the others wait


def setup_distributed(device: str, timeout: float = 300.0) -> DistContext:
    """Under torchrun (RANK set): init the process group (NCCL on GPU, gloo on CPU) whose collectives give
    up after `timeout` seconds, and a gloo group for waiting on rank 0's setup; else one process."""
    use_cuda = wants_cuda(device)
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available on this machine")
    if "RANK" not in os.environ:
        return DistContext(0, 0, 1, torch.device(device if device != "auto" else ("cuda" if use_cuda else "cpu")))
    rank, local_rank, world_size = (int(os.environ[k]) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE"))
    if use_cuda:
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend="nccl" if use_cuda else "gloo", timeout=timedelta(seconds=timeout))
    setup_group = dist.new_group(backend="gloo", timeout=SETUP_TIMEOUT)
    return DistContext(rank, local_rank, world_size, torch.device(f"cuda:{local_rank}" if use_cuda else "cpu"),
                       setup_group)


# What gloo's transport says when a collective times out or loses its peer; DDP's reducer raises the
# timeout in backward without gloo's source-file prefix.
GLOO_FAILURES = ("gloo", "Timed out waiting", "Application timeout caused pair closure", "Connection closed by peer",
                 "Connection reset by peer")


def is_collective_failure(error: BaseException) -> bool:
    """A collective that timed out or lost a peer: torch's DistError, or gloo's RuntimeError from its
    transport."""
    return isinstance(error, dist.DistError) or (
        isinstance(error, RuntimeError) and any(text in str(error) for text in GLOO_FAILURES))


def broadcast(obj, ctx: DistContext):
    """Rank 0's `obj` on every rank (through the setup group)."""
    if not ctx.is_ddp:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0, group=ctx.setup_group)
    return box[0]


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
        dist.broadcast_object_list(box, src=0, group=ctx.setup_group)
        if not ctx.is_main and box[0] is not None:
            is_config, text = box[0]
            if is_config:
                raise ConfigError(text.split(": ", 1)[1])
            raise RuntimeError(f"rank 0 failed: {text}")
    if error is not None:
        raise error
    return result

