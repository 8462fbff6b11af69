"""Memory per GPU of a training run, planned before anything is allocated, and the refusal of a run that
cannot fit.

Model state: fp32 master parameters and gradients, AdamW's two fp32 states. shard="optimizer" (ZeRO-1)
gives each rank the AdamW state of whole parameters (its largest share: `zero_partition`); "full" (FSDP2)
divides parameters, gradients and state, and
needs one Block's unsharded bf16 parameters as workspace while it runs.

Activations: the bytes autograd keeps between forward and backward, per token, measured with
torch.autograd.graph.saved_tensors_hooks (tests/test_memory.py) for each op's torch and Triton path, in fp32
and under bf16 autocast. Per layer, with C the width and H the heads:
  fp32:  48C (Triton GELU-MLP) or 64C (torch: it also keeps the GELU output) + 4H (attention's logsumexp)
         + 16 (two LayerNorms' mean and rstd)
  bf16:  28C (Triton) or 36C (torch) + 4H + 16; torch's linears under autocast keep their bf16 weight
         copies too, 24C^2 bytes per layer
and once per token outside the blocks: 8C + 16 (fp32) or 6C + 16 (bf16), plus 4V with torch's
cross-entropy (its fp32 log-softmax of V logits); and once per run one (V_padded, C) tensor: the fused lm_head +
cross-entropy keeps an fp32 one (the lm_head gradient it computes in forward), torch's linear under bf16
autocast its bf16 copy of the tied weight.
recompute="gelu" keeps no 4C tensor of the MLP (its GELU input is recomputed in backward); "block" keeps
each Block's input (the residual stream and the pending MLP branch, 2C fp32) and one Block's activations
while that Block is recomputed.
"""
from dataclasses import dataclass

import torch

from gpt2_triton.model.config import GPTConfig
from gpt2_triton.model.ops import resolve_kernels
from gpt2_triton.training.config import PRESETS, model_config_of
from gpt2_triton.training.errors import ConfigError

GB = 1e9


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per GPU, and what they were planned for."""
    params: int
    grads: int
    adamw: int
    activations: int
    workspace: int
    micro_batch: int
    seq_len: int
    world_size: int
    shard: str
    recompute: str
    amp: bool
    kernels: tuple  # ((op, impl), ...)
    model: GPTConfig

    @property
    def total(self) -> int:
        return self.params + self.grads + self.adamw + self.activations + self.workspace


def num_params(config: GPTConfig) -> int:
    """Elements of model.parameters(): wte (padded vocab, tied to lm_head), wpe, the blocks, ln_f."""
    C = config.n_embd
    return config.padded_vocab_size * C + config.block_size * C + config.n_layer * block_params(C) + 2 * C


def param_groups(config: GPTConfig) -> list[list[int]]:
    """Elements of each parameter in GPT.optimizer_groups' order: the decayed (dim >= 2) ones, then the rest."""
    C, L = config.n_embd, config.n_layer
    return [[config.padded_vocab_size * C, config.block_size * C] + [3 * C * C, C * C, 4 * C * C, 4 * C * C] * L,
            [C, C, 3 * C, C, C, C, 4 * C, C] * L + [C, C]]


def zero_partition(config: GPTConfig, world_size: int) -> int:
    """Elements of the largest rank's share under ZeroRedundancyOptimizer, which gives each parameter whole to
    the rank with the fewest so far, largest first, group by group: the (V, C) embedding alone can exceed 1/N."""
    sizes = [0] * world_size
    for group in param_groups(config):
        for numel in sorted(group, reverse=True):
            sizes[sizes.index(min(sizes))] += numel
    return max(sizes)


def block_params(C: int) -> int:
    """c_attn 3C^2+3C, c_proj C^2+C, c_fc 4C^2+4C, mlp c_proj 4C^2+C, two LayerNorms 4C."""
    return 12 * C * C + 13 * C


def _impls(kernels) -> dict:
    if isinstance(kernels, dict):
        return kernels
    return resolve_kernels(kernels)


def activation_bytes(config: GPTConfig, amp: bool, kernels, recompute: str = "none") -> tuple:
    """(bytes per token per Block, bytes per token outside the blocks, bytes per Block not per token, bytes
    once: the (V_padded, C) tensor the loss keeps)."""
    impls = _impls(kernels)
    C, H, V = config.n_embd, config.n_head, config.vocab_size
    triton_mlp = impls.get("gelu_mlp") == "triton"
    act = 2 if amp else 4
    # fp32: 12C (triton) / 16C (torch) elements of 4 bytes; bf16: 2C fp32 residual + 10C / 14C bf16 elements
    layer = (8 * C + act * (10 if triton_mlp else 14) * C) if amp else 4 * (12 if triton_mlp else 16) * C
    layer += 4 * H + 16
    mlp_wide = (4 if triton_mlp else 8) * C * act  # the MLP's 4C-wide tensors
    fused_loss = impls.get("cross_entropy") == "triton"
    outside = (6 if amp else 8) * C + 16 + (0 if fused_loss else 4 * V)
    weight_copies = 0
    if amp:
        weight_copies = 2 * C * C * ((4 if impls.get("linear") != "triton" else 0) + (8 if not triton_mlp else 0))
    lm_head_copy = 4 * config.padded_vocab_size * C if fused_loss else 2 * config.padded_vocab_size * C * amp
    if recompute == "gelu":
        layer -= mlp_wide
    return layer, outside, weight_copies, lm_head_copy


def memory_plan(config: GPTConfig, micro_batch: int, seq_len: int, world_size: int = 1, shard: str = "none",
                recompute: str = "none", amp: bool = True, kernels="triton") -> MemoryPlan:
    """Bytes per GPU of a run of `config` at micro_batch x seq_len tokens per forward on each of world_size
    GPUs; amp: bf16 autocast (else fp32); kernels: "torch" | "triton" | {op: impl}."""
    if shard not in ("none", "optimizer", "full"):
        raise ValueError(f"memory_plan: shard must be none, optimizer or full; got {shard!r}")
    if recompute not in ("none", "gelu", "block"):
        raise ValueError(f"memory_plan: recompute must be none, gelu or block; got {recompute!r}")
    n = num_params(config)
    state = 4 * n
    params = grads = state
    adamw = 2 * state
    workspace = 0
    if shard == "optimizer":
        adamw = 2 * 4 * zero_partition(config, world_size)
    if shard == "full":
        adamw = -(-adamw // world_size)
        params, grads = -(-params // world_size), -(-grads // world_size)
        workspace = 2 * block_params(config.n_embd)
    tokens = micro_batch * seq_len
    layer, outside, weight_copies, lm_head_copy = activation_bytes(
        config, amp, kernels, "gelu" if recompute == "gelu" else "none")
    L = config.n_layer
    if recompute == "block":
        activations = tokens * (L * 2 * config.n_embd * 4 + layer + outside) + weight_copies + lm_head_copy
    else:
        activations = tokens * (L * layer + outside) + L * weight_copies + lm_head_copy
    return MemoryPlan(params, grads, adamw, activations, workspace, micro_batch, seq_len, world_size, shard,
                      recompute, amp, tuple(sorted(_impls(kernels).items())), config)


def _replan(plan: MemoryPlan, **changes) -> MemoryPlan:
    kw = dict(micro_batch=plan.micro_batch, seq_len=plan.seq_len, world_size=plan.world_size, shard=plan.shard,
              recompute=plan.recompute, amp=plan.amp, kernels=dict(plan.kernels))
    return memory_plan(plan.model, **{**kw, **changes})


def gb(n: int) -> str:
    return f"{n / GB:.1f}"


def plan_line(plan: MemoryPlan, device_bytes: int | None = None) -> str:
    """memory per GPU: params X, grads X, AdamW X, activations X, workspace X = X GB of Y (on a CPU: per
    process, in MB below 1 GB, no "of")."""
    scale, unit = (GB, "GB") if plan.total >= GB or device_bytes else (1e6, "MB")  # the demo's are MBs
    size = lambda n: f"{n / scale:.1f}"  # noqa: E731
    of = f" of {size(device_bytes)}" if device_bytes else ""
    where = "GPU" if device_bytes else "process"  # a CPU run: no device memory to compare with
    return (f"memory per {where}: params {size(plan.params)}, grads {size(plan.grads)}, AdamW {size(plan.adamw)}, "
            f"activations {size(plan.activations)}, workspace {size(plan.workspace)} = {size(plan.total)} {unit}{of}")


def plan_problem(plan: MemoryPlan, device_bytes: int) -> str | None:
    """None where the plan fits device_bytes, else one line: what it needs and the cheapest change that fits
    (tried in this order: --shard optimizer, a smaller --micro-batch with more accumulation, --recompute gelu,
    --shard full, --recompute block, then the two together)."""
    if plan.total <= device_bytes:
        return None
    head = (f"memory: this run needs {gb(plan.total)} GB per GPU (params {gb(plan.params)}, grads "
            f"{gb(plan.grads)}, AdamW {gb(plan.adamw)}, activations {gb(plan.activations)}, workspace "
            f"{gb(plan.workspace)}) and the GPU has {gb(device_bytes)} GB")
    candidates = []
    if plan.shard == "none" and plan.world_size > 1:
        candidates.append(({"shard": "optimizer"}, "--shard optimizer"))
    mb = plan.micro_batch // 2
    while mb >= 1:
        steps = plan.micro_batch // mb
        candidates.append(({"micro_batch": mb}, f"--micro-batch {mb} (x{steps} the accumulation steps, the same "
                                                f"tokens per step)"))
        mb //= 2
    if plan.recompute == "none":
        candidates.append(({"recompute": "gelu"}, "--recompute gelu"))
    if plan.shard != "full" and plan.world_size > 1:
        candidates.append(({"shard": "full"}, "--shard full"))
    if plan.recompute != "block":
        candidates.append(({"recompute": "block"}, "--recompute block"))
        if plan.world_size > 1 and plan.shard != "full":
            candidates.append(({"recompute": "block", "shard": "full"}, "--shard full --recompute block"))
    for changes, flag in candidates:
        fixed = _replan(plan, **changes)
        if fixed.total <= device_bytes:
            return f"{head}: run it with {flag} ({gb(fixed.total)} GB)"
    return f"{head}, and no --micro-batch, --shard or --recompute fits it: use more GPUs or a smaller model"


def plan_of(cfg, world_size: int, kernels) -> MemoryPlan:
    """The plan of a resolved TrainConfig (its dtype concrete) running `kernels` ({op: impl})."""
    return memory_plan(model_config_of(cfg), cfg.micro_batch, cfg.seq_len, world_size, cfg.shard, cfg.recompute,
                       cfg.dtype == "bfloat16", kernels)


def device_bytes_of(device) -> int | None:
    """Memory of the GPU a run uses (torch.device), or None on a CPU (no plan refuses a CPU run)."""
    if device.type != "cuda":
        return None
    return torch.cuda.get_device_properties(device).total_memory


def check_memory(cfg, world_size: int, device) -> tuple:
    """(plan, the device's bytes or None) of a resolved TrainConfig; raises ConfigError with plan_problem's
    line where it cannot fit the GPU."""
    plan, device_bytes = plan_of(cfg, world_size, resolve_kernels(cfg.kernels)), device_bytes_of(device)
    if device_bytes and (problem := plan_problem(plan, device_bytes)):
        raise ConfigError(problem)
    return plan, device_bytes


def plan_table(device_bytes: int = 80 * 10**9, world_size: int = 8) -> str:
    """Markdown: each GPT-2 size at its training preset's micro-batch, each shard mode, on world_size GPUs."""
    rows = ["| preset | micro-batch | shard | params | grads | AdamW | activations | workspace | total GB | fits |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for name in ("gpt2-124m", "gpt2-350m", "gpt2-774m", "gpt2-1558m"):
        p = PRESETS[name]
        config = GPTConfig.from_preset(p["model"], pad_vocab_to=p["pad_vocab_to"])
        for shard in ("none", "optimizer", "full"):
            plan = memory_plan(config, p["micro_batch"], p["seq_len"], world_size, shard, "none", True, "triton")
            fits = "yes" if plan.total <= device_bytes else "no"
            rows.append(f"| `{name}` | {p['micro_batch']} | {shard} | {gb(plan.params)} | {gb(plan.grads)} | "
                        f"{gb(plan.adamw)} | {gb(plan.activations)} | {gb(plan.workspace)} | {gb(plan.total)} | "
                        f"{fits} |")
    return "\n".join(rows)


if __name__ == "__main__":
    print(plan_table())
