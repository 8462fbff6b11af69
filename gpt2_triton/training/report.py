"""What a training run prints (rank 0 only): a short header, a line per step (every --log-every steps, and
on a terminal a progress bar with the same fields), evaluation lines and a closing summary. The full
config is in train_config.json and every number in metrics.jsonl; this is the part a person reads."""
import shlex
import sys
import time
from pathlib import Path

import torch
from tqdm import tqdm

from gpt2_triton.model.ops import OP_NAMES
from gpt2_triton.training.config import TrainConfig, model_config_of
from gpt2_triton.training.metrics import ema, ema_beta, read_metrics


def format_duration(seconds: float) -> str:
    """0:07, 2:05, 1:02:03."""
    minutes, secs = divmod(max(0, round(seconds)), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def format_count(n: float) -> str:
    """950, 7.23M, 124M, 1.56B."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return f"{n:,.0f}"


def kernels_text(kernels: dict) -> str:
    """"torch" when every op uses one implementation, else "attention=triton, layer_norm=torch, ..."."""
    impls = set(kernels.values())
    return impls.pop() if len(impls) == 1 else ", ".join(f"{op}={impl}" for op, impl in kernels.items())


def fallback_line(fallbacks: dict) -> str:
    """The one line that says which ops --kernels auto runs on torch on a GPU, and why."""
    by_reason = {}
    for op, why in fallbacks.items():
        by_reason.setdefault(why, []).append(op)
    ops = "; ".join(f"{', '.join(names)} ({why})" for why, names in by_reason.items())
    rest = "" if len(fallbacks) == len(OP_NAMES) else "; Triton for the other ops"
    return f"kernels auto: torch for {ops}, where Triton cannot run{rest}"


def device_text(device: torch.device, world_size: int) -> str:
    """"cpu", "cuda:0 (NVIDIA H100 80GB HBM3)", "8 x cuda (NVIDIA H100 80GB HBM3)"."""
    device = torch.device(device)
    name = str(device) if world_size == 1 else f"{world_size} x {device.type}"
    return f"{name} ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else name


def header_lines(cfg: TrainConfig, n_params: int, kernels: dict, grad_accum: int, world_size: int,
                 train_tokens: int, start_step: int = 0, kernels_auto: bool = False,
                 memory: str | None = None) -> list[str]:
    """What this run is, in six lines: model, batch, length, schedule, device (and which kernels run, "(auto)"
    where --kernels auto chose them) and where it writes; a seventh, `memory` (memory.plan_line), where given."""
    m = model_config_of(cfg)
    steps = cfg.max_steps - start_step
    tokens = steps * cfg.total_batch
    processes = f" x {world_size} processes" if world_size > 1 else ""
    dtype = "bf16 autocast" if cfg.dtype == "bfloat16" else "fp32"
    shard = {"optimizer": " | shard optimizer (ZeRO-1)", "full": " | shard full (FSDP2)"}.get(cfg.shard, "")
    recompute = f" | recompute {cfg.recompute}" if cfg.recompute != "none" else ""
    return [
        f"GPT-2 training | preset {cfg.preset} | {format_count(n_params)} parameters "
        f"({m.n_layer} layers, {m.n_head} heads, {m.n_embd} wide, context {m.block_size})",
        f"  batch    {cfg.total_batch:,} tokens per step = {cfg.micro_batch} x {cfg.seq_len} tokens x "
        f"{grad_accum} micro-step{'s' if grad_accum > 1 else ''}{processes}",
        f"  length   steps {start_step + 1}-{cfg.max_steps}: {tokens:,} tokens = {tokens / train_tokens:.2g} epochs "
        f"of {cfg.data} ({train_tokens:,} train tokens)",
        f"  lr       {cfg.max_lr:.2e} after {cfg.warmup_steps} warmup steps, cosine to "
        f"{cfg.max_lr * cfg.min_lr_ratio:.2e} at step {cfg.lr_decay_steps}",
        f"  device   {device_text(cfg.device, world_size)} | {dtype} | torch.compile {'on' if cfg.compile else 'off'}"
        f" | kernels {kernels_text(kernels)}{' (auto)' if kernels_auto else ''}"
        f"{shard if world_size > 1 else ''}{recompute}",
        f"  run      {cfg.run_dir} (full config in train_config.json)",
    ] + ([f"  {memory}"] if memory else [])


def step_fields(record: dict) -> list[str]:
    """A train record's numbers as a person reads them; MFU only where the device's peak is known."""
    fields = [f"loss {record['loss']:.4f}", f"lr {record['lr']:.2e}", f"norm {record['grad_norm']:.3f}",
              f"{record['tokens_per_s']:,.0f} tok/s"]
    if record.get("mfu") is not None:
        fields.append(f"MFU {100 * record['mfu']:.1f}%")
    return fields


def step_prefix(step: int, max_steps: int) -> str:
    return f"step {step:>{len(str(max_steps))}}/{max_steps}"


def step_line(record: dict, max_steps: int, elapsed_s: float, eta_s: float) -> str:
    """step  20/200 | loss 5.8621 | lr 3.00e-03 | norm 1.092 | 7,712 tok/s | 133 ms | elapsed 0:03 | ETA 0:28"""
    return " | ".join([step_prefix(record["step"], max_steps), *step_fields(record), f"{record['step_ms']:,.0f} ms",
                       f"elapsed {format_duration(elapsed_s)}", f"ETA {format_duration(eta_s)}"])


class Report:
    """Rank 0's console output. Step lines every `log_every` steps (and this process's first and the last
    step); on a terminal (stderr a tty) also a tqdm bar updated every step, with lines printed above it.
    `quiet`: no step lines, no bar and no samples; the header, evaluations, checkpoints and summary stay."""

    def __init__(self, enabled: bool, quiet: bool = False, log_every: int = 1, bar: bool | None = None):
        self.enabled, self.quiet, self.log_every = enabled, quiet, log_every
        self.want_bar = enabled and not quiet and (sys.stderr.isatty() if bar is None else bar)
        self.bar = None
        self.started = self.first_step_done = None
        self.steps_done = 0
        self.max_steps = 0

    def print(self, text: str = "", detail: bool = False):
        """One line on stdout (above the bar, if one is open); `detail` lines are left out under quiet."""
        if not self.enabled or (detail and self.quiet):
            return
        if self.bar is not None:
            tqdm.write(text, file=sys.stdout)
        else:
            print(text, flush=True)
        sys.stdout.flush()

    def start(self, step: int, max_steps: int):
        """The loop begins at `step`: start the clock (elapsed, ETA) and open the bar."""
        self.started, self.max_steps = time.monotonic(), max_steps
        if self.want_bar:
            self.bar = tqdm(total=max_steps, initial=step, unit="step", dynamic_ncols=True, file=sys.stderr,
                            bar_format="step {n_fmt}/{total_fmt} |{bar:20}| {elapsed}<{remaining}{postfix}")

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def eta(self, record: dict) -> float:
        """Seconds left at the mean pace since this process's first step (which compiles and warms up),
        evaluations and checkpoints included; from the first step alone until there is a second."""
        left = self.max_steps - record["step"]
        if self.steps_done < 2:
            return left * record["step_ms"] / 1000
        return left * (time.monotonic() - self.first_step_done) / (self.steps_done - 1)

    def step(self, record: dict):
        self.steps_done += 1
        if self.steps_done == 1:
            self.first_step_done = time.monotonic()
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(" | ".join(step_fields(record)), refresh=False)
            self.bar.update(1)
        step = record["step"]
        if step % self.log_every == 0 or step == self.max_steps or self.steps_done == 1:
            self.print(step_line(record, self.max_steps, self.elapsed(), self.eta(record)), detail=True)

    def event(self, step: int, text: str, detail: bool = False):
        """A line about `step` that is not a train step: validation, HellaSwag, a sample, a checkpoint."""
        self.print(f"{step_prefix(step, self.max_steps or step)} | {text}", detail=detail)

    def close(self):
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def summary_lines(cfg: TrainConfig, history: list[dict], wall_s: float, checkpoint: Path | None,
                  plot: Path | None, stopped_by: str | None = None) -> list[str]:
    """The closing summary: what ran, the losses, and where the results are (read back from metrics.jsonl,
    so a resumed run's val history counts too)."""
    metrics_path = Path(cfg.run_dir) / "metrics.jsonl"
    train, val = read_metrics(metrics_path, "train"), read_metrics(metrics_path, "val")
    what = f"stopped by {stopped_by}" if stopped_by else "done"
    if not history:
        return [f"{what}: no steps taken"]
    first, last = history[0]["step"], history[-1]["step"]
    steady = history[1:] or history  # the first step compiles and warms up
    tokens_per_s = len(steady) * cfg.total_batch / (sum(r["step_ms"] for r in steady) / 1000)
    mfu = history[-1].get("mfu")
    mfu_text = "" if mfu is None else f", MFU {100 * mfu * tokens_per_s / history[-1]['tokens_per_s']:.1f}%"
    pace = f"{tokens_per_s:,.0f} tok/s{mfu_text}" + (" after the first step" if len(history) > 1 else "")
    lines = [f"{what}: steps {first}-{last} of {cfg.max_steps} in {format_duration(wall_s)} | "
             f"{len(history) * cfg.total_batch:,} tokens | {pace}"]
    losses = [r["loss"] for r in train]
    loss = f"train {history[-1]['loss']:.4f} (EMA {ema(losses, ema_beta(len(losses)))[-1]:.4f})"
    if val:
        best = min(val, key=lambda r: r["val_loss"])
        loss += (f" | val {val[-1]['val_loss']:.4f} at step {val[-1]['step']}, "
                 f"best {best['val_loss']:.4f} at step {best['step']}")
    memory = max(r["peak_mem_mb"] for r in history)
    where = "CUDA max allocated" if torch.device(cfg.device).type == "cuda" else "process max RSS"
    lines += [f"  loss        {loss}", f"  memory      {memory:,.0f} MB ({where})"]
    if checkpoint is not None:
        lines.append(f"  checkpoint  {checkpoint}")
    lines.append(f"  metrics     {metrics_path}")
    if plot is not None:
        lines.append(f"  plot        {plot}")
    if checkpoint is not None:
        lines.append(f"  sample      python -m gpt2_triton.sample --init {shlex.quote(str(checkpoint))}")
    return lines
