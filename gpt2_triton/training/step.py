"""One optimizer step (`train_step`): what `train.py` runs each step and what the bench times."""
import math
from contextlib import nullcontext

import torch
from torch.nn.parallel import DistributedDataParallel as DDP

from gpt2_triton.model.config import EOT_ID
from gpt2_triton.model.gpt import unwrap_model
from gpt2_triton.training.distributed import DistContext, all_reduce_mean
from gpt2_triton.training.errors import NonFiniteError


def autocast_context(device: torch.device, amp_dtype):
    if amp_dtype is None:
        return nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def doc_starts(x: torch.Tensor, doc_mask: bool):
    """Where documents begin in the batch x (B, T), for the model's document masking (doc_mask), else None.
    GPT-2 data puts the EOT token before each document; computed on x's device, no host sync."""
    return x == EOT_ID if doc_mask else None


def accumulate_gradients(model, next_batch, grad_accum: int, device, amp_dtype=None, doc_mask=False) -> torch.Tensor:
    """Forward/backward over grad_accum micro-batches; the grads sum to those of their mean loss.
    Returns this process's mean loss (detached). doc_mask: attention stays inside documents."""
    loss_accum = torch.zeros((), device=device)
    for micro_step in range(grad_accum):
        x, y = next_batch()
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        if isinstance(model, DDP):  # all-reduce grads on the last micro-step only; decided before forward
            model.require_backward_grad_sync = micro_step == grad_accum - 1
        with autocast_context(device, amp_dtype):
            _, loss = model(x, y, doc_starts=doc_starts(x, doc_mask))
        loss = loss / grad_accum  # k micro-steps == one k-times bigger batch
        loss_accum += loss.detach()
        loss.backward()
    return loss_accum


def weights_finite(params) -> bool:
    """True when every parameter is finite (by the norm of each; weights beyond ~1e19 count as inf)."""
    params = [p.detach() for p in params]
    return bool(torch.stack([n.float() for n in torch._foreach_norm(params)]).isfinite().all())



def train_step(model, optimizer, next_batch, grad_accum: int, device: torch.device, amp_dtype, lr: float,
               grad_clip: float, step: int, ctx: DistContext | None = None, doc_mask: bool = False
               ) -> tuple[float, float]:
    """Optimizer step number `step`: zero the grads, accumulate them over grad_accum micro-batches, clip
    them, set the learning rate and update. `model` may be wrapped (torch.compile, DDP); the optimizer
    holds its parameters. Returns (loss averaged over processes, gradient norm before clipping).

    The loss and gradient norm are checked before the update and the weights after it: a NonFiniteError
    leaves the weights as they were or stops before anything non-finite can be saved."""
    optimizer.zero_grad(set_to_none=True)
    loss = accumulate_gradients(model, next_batch, grad_accum, device, amp_dtype, doc_mask)
    if ctx is not None:
        loss = all_reduce_mean(loss, ctx)
    loss = loss.item()
    params = list(unwrap_model(model).parameters())
    grad_norm = torch.nn.utils.clip_grad_norm_(params, grad_clip).item()
    for name, value in (("loss", loss), ("grad norm", grad_norm)):
        if not math.isfinite(value):
            raise NonFiniteError(f"step {step}: {name} is {value}; stopped before the update")
    for group in optimizer.param_groups:
        group["lr"] = lr
    optimizer.step()
    if not weights_finite(params):
        raise NonFiniteError(f"step {step}: the update made the weights non-finite (loss {loss:.4f}, "
                             f"grad norm {grad_norm:.3g}, lr {lr:.3g}); they were not saved")
    return loss, grad_norm
