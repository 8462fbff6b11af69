"""End-to-end GPT-2 124M training step: tokens/s, MFU and peak memory for five stacks.

1. PyTorch eager + SDPA   2. torch.compile + SDPA (build-nanogpt's recipe)   2b. the same, mode="max-autotune"
3. our Triton kernels, eager   4. our Triton kernels inside torch.compile
Each step is `gpt2_triton.training.step.train_step`, the one train.py runs: forward + backward (bf16
autocast on CUDA), grad clipping, the finiteness checks and fused AdamW, T = 1024. The first step
(torch.compile, autotuning, allocator warm-up) is timed on its own and reported apart, with what it
compiled and tuned (Triton kernels) and the cold start: model built, optimizer made, first step done.
One more step runs under torch.profiler after the timed ones: its per-kernel table (`kernel_table`) is in the
row, for the headline's predicted-vs-measured table (`gpt2_triton.bench.static.predict.compare`).
Then the real gradient accumulation: `train_step` at grad_accum = GRAD_ACCUM (2 on CPU --quick) micro-steps of
the same micro-batch, each micro-step timed apart from the optimizer step (`extra["grad_accum"]`).
"""
import time

import torch

from gpt2_triton import GPT, GPTConfig
from gpt2_triton.bench.common import (
    CPU_THREADS,
    WARMUP_MS,
    Row,
    cpu_threads,
    has_cuda,
    record,
    summarize,
    timed_call_s,
    wall_clock_ms,
)
from gpt2_triton.kernels.autotune import accounting
from gpt2_triton.training.metrics import device_peak_flops, mfu
from gpt2_triton.training.step import StepSettings, train_step

GRAD_ACCUM = 4  # micro-steps of the accumulation timing on a GPU
QUICK_GRAD_ACCUM = 2  # on CPU --quick: a triton micro-step takes seconds in the interpreter

STACKS = {  # provider -> (kernels, torch.compile: False, True (default mode) or its mode)
    "eager-sdpa": ("torch", False),
    "compile-sdpa": ("torch", True),
    "compile-max-autotune": ("torch", "max-autotune"),
    "triton": ("triton", False),
    "triton-compile": ("triton", True),
}
COMPILE_NEEDS_CUDA = "skipped: torch.compile stacks run on CUDA only (not on CPU --quick)"
MAX_AUTOTUNE_NEEDS_FULL = "skipped: max-autotune compiles for minutes; not with --quick"


def setup(quick):
    if quick:  # CPU: a tiny model through the interpreter, just to keep the code working
        return GPTConfig.from_preset("tiny", vocab_size=512, pad_vocab_to=64), [2], 32, 1, 2
    return GPTConfig.from_preset("gpt2", pad_vocab_to=128), [16, 32, 64], 1024, 3, 10


def step_dtype() -> str:
    """What a step computes in: bf16 autocast on CUDA, fp32 on CPU (train_step_fn)."""
    return "bf16-autocast" if has_cuda() else "float32"


def _step_args(device):
    device = torch.device(device)
    return device, torch.bfloat16 if device.type == "cuda" else None


def train_step_fn(model, optimizer, x, y, device):
    """One step of `gpt2_triton.training.step.train_step`, the step train.py runs: bf16 autocast on CUDA,
    gradient clipping at 1.0, the loss/grad-norm/weight checks and their host syncs included."""
    device, amp_dtype = _step_args(device)

    def step():
        train_step(model, optimizer, lambda: (x, y), StepSettings(device, amp_dtype, grad_clip=1.0), lr=6e-4, step=1)
    return step


class _Marks:
    """Points in the device's stream: CUDA events on CUDA, the wall clock on a CPU (which runs in order)."""

    def __init__(self, cuda):
        self.cuda = cuda

    def now(self):
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def record(self, mark):
        """Move `mark` (from now()) to the present point; returns it."""
        if not self.cuda:
            return time.perf_counter()
        mark.record()
        return mark

    def ms(self, a, b):
        return a.elapsed_time(b) if self.cuda else 1e3 * (b - a)


def accumulation_ms(model, optimizer, x, y, device, grad_accum, reps, warmup=0):
    """`train_step` at grad_accum micro-steps of (x, y), `warmup` times untimed (a kernel that accumulates into
    an existing .grad may compile or tune on first contact), then `reps` times: ([ms of each micro-step], [ms of each
    optimizer step], [ms of each whole step]). A micro-step runs from its batch being fetched to the last
    parameter's gradient accumulated (its forward, backward and grad accumulation); the optimizer step is
    the rest of train_step: the loss sync, grad clipping, fused AdamW and the finiteness checks. The end of a
    backward is marked by post-accumulate-grad hooks (what DDP's reducer uses): they run after a kernel
    that wrote its gradient straight into `.grad` too, and leave that in-place path on (kernels/grads.py)."""
    device, amp_dtype = _step_args(device)
    settings = StepSettings(device, amp_dtype, grad_accum, grad_clip=1.0)
    marks = _Marks(device.type == "cuda")
    starts, backward_done = [], [marks.now()]

    def next_batch():
        starts.append(marks.now())
        return x, y

    def grad_accumulated(_):
        if len(starts) == grad_accum:  # the last micro-step: the latest hook marks the end of its backward
            backward_done[0] = marks.record(backward_done[0])

    params = [p for p in model.parameters() if p.requires_grad]
    hooks = [p.register_post_accumulate_grad_hook(grad_accumulated) for p in params]
    micro, opt, whole = [], [], []
    try:
        for i in range(warmup + reps):
            starts.clear()
            train_step(model, optimizer, next_batch, settings, lr=6e-4, step=1)
            end = marks.now()
            if marks.cuda:
                torch.cuda.synchronize()
            if i < warmup:
                continue
            bounds = starts + [backward_done[0]]
            micro += [marks.ms(a, b) for a, b in zip(bounds, bounds[1:])]
            opt.append(marks.ms(backward_done[0], end))
            whole.append(marks.ms(starts[0], end))
    finally:
        for h in hooks:
            h.remove()
    return micro, opt, whole


KERNEL_TABLE_ROWS = 80
KERNEL_NAME_CHARS = 160


def kernel_table(step, device) -> list:
    """One call of `step` under torch.profiler: [{name, count, total_us}], longest first. On CUDA the device
    kernels by self device time; on a CPU the aten ops by self CPU time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = torch.device(device).type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        us = e.self_device_time_total if cuda else e.self_cpu_time_total
        if us > 0 and (e.device_type == DeviceType.CUDA) == cuda:
            rows.append({"name": e.key[:KERNEL_NAME_CHARS], "count": e.count, "total_us": round(us, 1)})
    return sorted(rows, key=lambda r: -r["total_us"])[:KERNEL_TABLE_ROWS]


def run(dtype=torch.bfloat16, quick=False, batch_sizes=None, stacks=None, warmup=None, reps=None):
    """Rows for each batch size and stack (default: all). warmup counts the first step (>= 1)."""
    config, default_batch_sizes, T, default_warmup, default_reps = setup(quick)
    warmup = max(1, warmup or default_warmup)
    reps = reps or default_reps
    device = "cuda" if has_cuda() else "cpu"
    peak = device_peak_flops(device)
    rows = []
    for B in batch_sizes or default_batch_sizes:
        case = f"gpt2-124m train step B{B}-T{T}" if not quick else f"tiny train step B{B}-T{T}"
        shape = {"B": B, "T": T, "n_layer": config.n_layer, "n_embd": config.n_embd}
        for provider in stacks or STACKS:
            kernels, compile_model = STACKS[provider]
            skip = (COMPILE_NEEDS_CUDA if compile_model and not has_cuda() else
                    MAX_AUTOTUNE_NEEDS_FULL if compile_model == "max-autotune" and quick else None)
            if skip:
                rows.append(record(Row("e2e", case, provider, "step", shape, step_dtype(), None, error=skip)))
                continue
            rows.append(record(_measure_stack(config, kernels, compile_model, B, T, device, peak, warmup,
                                              reps, case, provider, shape)))
    return rows


def _accumulation(model, optimizer, x, y, device, tokens, reps):
    """extra["grad_accum"]: the accumulation timing (accumulation_ms) summarised as [median, p20, p80] ms, and
    tokens/s of the whole step (all its micro-batches' tokens over its median time). On CUDA one untimed step
    first and `reps` timed; on a CPU (the interpreter: seconds per micro-step) one timed step."""
    cuda = torch.device(device).type == "cuda"
    k = GRAD_ACCUM if cuda else QUICK_GRAD_ACCUM
    reps = reps if cuda else 1
    micro, opt, whole = accumulation_ms(model, optimizer, x, y, device, k, reps, warmup=1 if cuda else 0)
    step_ms = summarize(whole)
    return {"micro_steps": k, "steps": reps, "micro_step_ms": [round(v, 3) for v in summarize(micro)],
            "optimizer_step_ms": [round(v, 3) for v in summarize(opt)],
            "step_ms": [round(v, 3) for v in step_ms], "tokens_per_s": round(k * tokens / (step_ms[0] * 1e-3))}


def _measure_stack(config, kernels, compile_model, B, T, device, peak, warmup, reps, case, provider, shape):
    model = optimizer = None
    try:
        torch.manual_seed(0)
        cold_start = time.perf_counter()
        model = GPT(config, kernels=kernels).to(device)
        optimizer = model.configure_optimizer(0.1, 6e-4)
        runner = (model if not compile_model else torch.compile(model) if compile_model is True
                  else torch.compile(model, mode=compile_model))
        x = torch.randint(0, config.vocab_size, (B, T), device=device)
        y = torch.randint(0, config.vocab_size, (B, T), device=device)
        step = train_step_fn(runner, optimizer, x, y, device)
        if has_cuda():
            torch.cuda.reset_peak_memory_stats()
        with cpu_threads(CPU_THREADS):
            with accounting() as first:
                first_step_s = timed_call_s(step)
            cold_start_s = time.perf_counter() - cold_start
            cost = first.per_kernel().values()
            med, p20, p80 = wall_clock_ms(step, warmup - 1, reps, warmup_ms=WARMUP_MS - 1e3 * first_step_s)
            kernels_profiled = kernel_table(step, device)
            accum = _accumulation(runner, optimizer, x, y, device, B * T, reps)
        tokens_per_s = B * T / (med * 1e-3)
        util = mfu(model.flops_per_token(T), tokens_per_s, peak)
        return Row("e2e", case, provider, "step", shape, step_dtype(), med, p20, p80,
                   tflops=model.flops_per_token(T) * tokens_per_s / 1e12 if has_cuda() else None,
                   peak_mb=torch.cuda.max_memory_allocated() / 2**20 if has_cuda() else None,
                   extra={"tokens_per_s": round(tokens_per_s), "mfu": None if util is None else round(util, 4),
                          "kernels": kernels, "compile": compile_model, "first_step_s": round(first_step_s, 2),
                          "compile_s": round(max(first_step_s - med * 1e-3, 0.0), 2),
                          "cold_start_s": round(cold_start_s, 2),
                          "first_step_compiles": sum(c["compiles"] for c in cost),
                          "first_step_compile_s": round(sum(c["compile_s"] for c in cost), 2),
                          "first_step_tunings": sum(c["tunings"] for c in cost),
                          "first_step_tune_s": round(sum(c["tune_s"] for c in cost), 2),
                          "warmup_steps": warmup, "timed_steps": reps, "kernel_table": kernels_profiled,
                          "grad_accum": accum,
                          **({} if has_cuda() else {"threads": CPU_THREADS})})
    except Exception as e:  # e.g. out of memory at a large micro-batch
        return Row("e2e", case, provider, "step", shape, step_dtype(), None, error=f"{type(e).__name__}: {e}"[:300])
    finally:
        del model, optimizer
        if has_cuda():
            torch.cuda.empty_cache()


def accumulation_text(rows) -> str:
    """The gradient-accumulation timing of each measured row, a line each (for the printed table)."""
    lines = []
    for r in rows:
        a = r.extra.get("grad_accum")
        if a:
            lines.append(f"{r.case} | {r.provider}: grad_accum {a['micro_steps']} x {a['steps']} step(s): "
                         f"{a['micro_step_ms'][0]:.3f} ms per micro-step, "
                         f"optimizer step {a['optimizer_step_ms'][0]:.3f} ms, "
                         f"whole step {a['step_ms'][0]:.3f} ms = {a['tokens_per_s']:,} tok/s")
    return "\n".join(["gradient accumulation (median ms; micro-steps timed apart from the optimizer step):"] + lines
                     if lines else [])
