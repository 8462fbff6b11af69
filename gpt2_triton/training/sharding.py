"""How the processes of a run share the model (`--shard`), through PyTorch's own engine:
- none: DDP, every process holds the fp32 weights, grads and AdamW state;
- optimizer: DDP with ZeroRedundancyOptimizer (ZeRO-1): each process keeps the AdamW state of its part
  of the parameters and updates only those, then broadcasts them;
- full: FSDP2 `fully_shard` per Block and at the root (weights, grads and AdamW state sharded; each Block's
  weights gathered for its forward and again for its backward), bf16 compute under a bf16 run, fp32 master
  weights and gradient reductions.
none and optimizer save today's single-file checkpoint (rank 0; ZeRO's state consolidated to it first); full
saves a `torch.distributed.checkpoint` folder, every rank its shard. Each loads into every mode and world size
(`load_sharded_state`, `load_file_state`): DCP reshards a folder; a single file is read whole on every rank."""
import warnings

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.distributed.optim import ZeroRedundancyOptimizer
from torch.distributed.tensor import DTensor
from torch.nn.parallel import DistributedDataParallel as DDP


def shard_model(model, mode: str, amp_dtype):
    """`--shard full`: FSDP2 on each Block, then at the root (embeddings, final LayerNorm, the tied lm_head).
    Under bf16 the weights are gathered in bf16 (so the kernels never cast them) and gradients reduced in fp32;
    in place, returns the model. Other modes: the model as it is."""
    if mode != "full":
        return model
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else \
        MixedPrecisionPolicy()
    for block in model.transformer.h:
        block.sharded = True
        fully_shard(block, mp_policy=policy)
    fully_shard(model, mp_policy=policy)
    # A Block returns views (its pending MLP output); FSDP2 warns that an in-place op on one would skip its
    # pre-backward hook. The next Block's LayerNorm only reads them.
    warnings.filterwarnings("ignore", r"FSDP2-wrapped module \(FSDPBlock\) returned a view tensor")
    return model


def wrap_ddp(model, mode: str, ctx):
    """DDP around the (compiled) model for none / optimizer on several processes; FSDP2 needs no wrapper."""
    if mode == "full" or not ctx.is_ddp:
        return model
    # gradient_as_bucket_view: .grad is a view into DDP's all-reduce buckets, so the kernels that add into .grad
    # write the bucket itself (no copy into it before each all-reduce).
    return DDP(model, device_ids=[ctx.local_rank] if ctx.device.type == "cuda" else None,
               gradient_as_bucket_view=True)


def make_optimizer(model, mode: str, ctx, weight_decay, lr, betas, eps, fused):
    """AdamW over the model's decay / no-decay groups; ZeroRedundancyOptimizer around it for optimizer mode on
    several processes."""
    groups = model.optimizer_groups(weight_decay)
    if fused is None:
        fused = all(p.is_cuda for g in groups for p in g["params"])
    if mode == "optimizer" and ctx.is_ddp:
        return ZeroRedundancyOptimizer(groups, optimizer_class=torch.optim.AdamW, lr=lr, betas=betas, eps=eps,
                                       fused=fused)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=fused)


def set_gradient_sync(model, sync: bool) -> None:
    """Reduce gradients across processes in this backward (the last micro-step) or not (the ones before)."""
    inner = getattr(model, "_orig_mod", model)  # torch.compile's wrapper
    if isinstance(inner, DDP):
        inner.require_backward_grad_sync = sync
    elif isinstance(inner, FSDPModule):
        inner.set_requires_gradient_sync(sync)


def local(tensor):
    """This process's part of a (possibly sharded) tensor."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def full_value(tensor):
    """A DTensor's value as a plain tensor (a clip norm, replicated); other tensors as they are."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def is_sharded(model) -> bool:
    return isinstance(getattr(model, "_orig_mod", model), FSDPModule)


# --- checkpoint state ------------------------------------------------------------------------------------
WHOLE = StateDictOptions(full_state_dict=True)  # a single file's whole tensors, loaded into FSDP2's shards


def file_state(model, optimizer) -> tuple[dict, dict] | None:
    """(model, optimizer) state dicts as a single-file checkpoint holds them (optimizer state keyed by parameter
    index, as torch.optim saves it), on rank 0; None elsewhere. All ranks call (ZeRO consolidates to rank 0)."""
    if isinstance(optimizer, ZeroRedundancyOptimizer):
        optimizer.consolidate_state_dict(to=0)
    if dist.is_initialized() and dist.get_rank() != 0:
        return None
    return model.state_dict(), optimizer.state_dict()


def sharded_state(model, optimizer) -> dict:
    """{"model", "optimizer"}: this rank's shards, keyed by parameter name (what dcp.save writes)."""
    return {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}


def load_file_state(model, optimizer, model_state: dict, optimizer_state: dict) -> None:
    """A single-file checkpoint's weights and AdamW state (index-keyed) into the model and optimizer of any mode."""
    if not is_sharded(model):
        model.load_state_dict(model_state)
        optimizer.load_state_dict(optimizer_state)  # ZeRO keeps its own partition of the full state
        return
    set_model_state_dict(model, model_state, options=WHOLE)
    set_optimizer_state_dict(model, optimizer, _by_name(model, optimizer, optimizer_state), options=WHOLE)


def load_sharded_state(model, optimizer, path) -> None:
    """A DCP folder's weights and AdamW state into the model and optimizer of any mode and world size: DCP reads
    into this run's tensors (its shards under FSDP2, whole tensors otherwise)."""
    import torch.distributed.checkpoint as dcp
    holder = optimizer
    if isinstance(optimizer, ZeroRedundancyOptimizer):  # read into a whole AdamW, then hand ZeRO its part
        holder = torch.optim.AdamW(optimizer.param_groups)
    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, holder)}
    with warnings.catch_warnings():  # one process: DCP warns that it loads in one process, as asked
        warnings.filterwarnings("ignore", r"torch\.distributed is .*uninitialized")
        dcp.load(state, checkpoint_id=str(path), no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, holder, state["optimizer"])
    if holder is not optimizer:
        optimizer.load_state_dict(holder.state_dict())


def _param_names(model, optimizer) -> list[str]:
    """The name of each parameter in the optimizer's index order (its groups' params, one after another)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for g in optimizer.param_groups for p in g["params"]]  # ZeRO's: all processes'


def _by_name(model, optimizer, state: dict) -> dict:
    """Index-keyed optimizer state (torch.optim's) -> keyed by parameter name (DCP's)."""
    names = _param_names(model, optimizer)
    return {"state": {names[i]: v for i, v in state["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
