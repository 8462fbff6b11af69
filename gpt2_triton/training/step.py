"""One optimizer step (`train_step`): what `train.py` runs each step and what the bench times."""
import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2_triton.model.config import EOT_ID
from gpt2_triton.model.gpt import unwrap_model
from gpt2_triton.training.distributed import DistContext, all_reduce_mean
from gpt2_triton.training.errors import NonFiniteError
from gpt2_triton.training.sharding import full_value, local, set_gradient_sync


def autocast_context(device: torch.device, amp_dtype):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def doc_starts(x: torch.Tensor, doc_mask: bool):
    """Where documents begin in the batch x (B, T), for the model's document masking (doc_mask), else None.
    GPT-2 data puts the EOT token before each document; computed on x's device, no host sync."""
    return x == EOT_ID if doc_mask else None


@dataclass(frozen=True)
class StepSettings:
    """How a step runs, built once (by the trainer, the bench): where, in which precision, with how many
    micro-batches, the clip, document masking and the processes its loss is averaged over."""
    device: torch.device
    amp_dtype: torch.dtype | None = None  # autocast dtype; None: no autocast
    grad_accum: int = 1  # micro-batches per optimizer step
    grad_clip: float = float("inf")
    doc_mask: bool = False  # attention stays inside documents (they begin at EOT)
    ctx: DistContext | None = None  # DDP processes (None: this one alone)


def model_loss(model, x, y, settings: StepSettings) -> torch.Tensor:
    """The mean next-token loss of batch x, y (B, T) on settings.device: how training and validation call the
    model (autocast, document starts)."""
    x, y = x.to(settings.device, non_blocking=True), y.to(settings.device, non_blocking=True)
    with autocast_context(settings.device, settings.amp_dtype):
        _, loss = model(x, y, doc_starts=doc_starts(x, settings.doc_mask))
    return loss


def accumulate_gradients(model, next_batch, settings: StepSettings) -> torch.Tensor:
    """Forward/backward over settings.grad_accum micro-batches; the grads sum to those of their mean loss.
    Returns this process's mean loss (detached)."""
    grad_accum = settings.grad_accum
    loss_accum = torch.zeros((), device=settings.device)
    for micro_step in range(grad_accum):
        x, y = next_batch()
        set_gradient_sync(model, micro_step == grad_accum - 1)  # reduce on the last micro-step only
        loss = model_loss(model, x, y, settings) / grad_accum  # k micro-steps == one k-times bigger batch
        loss_accum += loss.detach()
        loss.backward()
    return loss_accum


def weights_finite(params, ctx: DistContext | None = None) -> bool:
    """True when every parameter is finite (by the norm of each; weights beyond ~1e19 count as inf). Sharded
    (FSDP2) parameters are checked by their shards here, and every process of `ctx` gets the same answer."""
    params = [p.detach() for p in params]
    shards = [local(p) for p in params]
    finite = torch.stack([n.float() for n in torch._foreach_norm(shards)]).isfinite().all()
    if ctx is not None and ctx.is_ddp and any(p is not q for p, q in zip(params, shards)):
        finite = finite.float()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite)


def train_step(model, optimizer, next_batch, settings: StepSettings, lr: float, step: int) -> tuple[float, float]:
    """Optimizer step number `step`: zero the grads, accumulate them over settings.grad_accum micro-batches,
    clip them, set the learning rate and update. `model` may be wrapped (torch.compile, DDP); the optimizer
    holds its parameters. Returns (loss averaged over processes, gradient norm before clipping).

    The loss and gradient norm are checked before the update and the weights after it: a NonFiniteError
    leaves the weights as they were or stops before anything non-finite can be saved."""
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, next_batch, settings)
    if settings.ctx is not None:
        loss = all_reduce_mean(loss, settings.ctx)
    loss = loss.item()
    params = list(unwrap_model(model).parameters())
    grad_norm = full_value(torch.nn.utils.clip_grad_norm_(params, settings.grad_clip)).item()
    for name, value in (("loss", loss), ("grad norm", grad_norm)):
        if not math.isfinite(value):
            raise NonFiniteError(f"step {step}: {name} is {value}; stopped before the update")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    if not weights_finite(params, settings.ctx):
        raise NonFiniteError(f"step {step}: the update made the weights non-finite (loss {loss:.4f}, "
                             f"grad norm {grad_norm:.3g}, lr {lr:.3g}); they were not saved")
    return loss, grad_norm
