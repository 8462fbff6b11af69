"""Helpers for train.py: the LR schedule, MFU, peak memory, the metrics log, the loss smoothing and the
loss plot."""
import json
import math
import resource
import sys
from pathlib import Path

import torch

from gpt2_triton.devices import cuda_gpu


def cosine_lr(step: int, max_lr: float, min_lr: float, warmup_steps: int, decay_steps: int) -> float:
    """Linear warmup over warmup_steps, then cosine from max_lr to min_lr at decay_steps, then flat."""
    if step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup_steps) / max(decay_steps - warmup_steps, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (max_lr - min_lr)


def device_peak_flops(device, override=None) -> float | None:
    """Peak bf16 FLOP/s of one device: `override`, else the table entry (gpt2_triton.devices); None on
    CPU/unknown GPUs."""
    if override:
        return float(override)
    device = torch.device(device)
    if device.type != "cuda":
        return None
    gpu = cuda_gpu(device)
    return gpu.bf16_flops if gpu else None


def mfu(flops_per_token: float, tokens_per_s: float, peak_flops: float | None, n_devices: int = 1):
    """Model FLOPs utilisation in [0, 1]; None where the peak is unknown (CPU)."""
    if not peak_flops:
        return None
    return flops_per_token * tokens_per_s / (peak_flops * n_devices)


def peak_memory_mb(device) -> float:
    """CUDA max allocated on a GPU; the process's max RSS on CPU."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 2**20 if sys.platform == "darwin" else rss / 2**10  # bytes on macOS, KiB on Linux


class MetricsLog:
    """metrics.jsonl: one JSON object per line, each with a "kind" ("train", "val", "hellaswag",
    "sample", "resume", "kernels"). Append-only: a resumed run appends a "resume" record and goes on, so nothing
    an earlier process wrote is ever lost; `read_metrics` gives the run's history as it stands."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file() and self.path.stat().st_size:
            with open(self.path, "rb+") as f:  # a kill mid-line leaves it unterminated: end it
                f.seek(-1, 2)
                if f.read(1) != b"\n":
                    f.write(b"\n")

    def log(self, kind: str, **fields) -> dict:
        record = {"kind": kind, **fields}
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        return record

    def records(self, kind=None) -> list[dict]:
        return read_metrics(self.path, kind)


def read_metrics(path, kind=None, superseded: bool = False) -> list[dict]:
    """The records of a metrics.jsonl (only those of `kind` if given), in order.

    A "resume" record at step s means the steps after s that came before it were lost with their
    process and done again: those earlier records are left out unless `superseded`. Lines that are
    not JSON (a kill mid-write, bytes that are not UTF-8) are skipped."""
    path = Path(path)
    if not path.is_file():
        return []
    rows = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            if record.get("kind") == "resume" and not superseded:
                rows = [r for r in rows if r.get("step", 0) <= record["step"]]
            rows.append(record)
    return [r for r in rows if kind is None or r.get("kind") == kind]


def ema_beta(n_steps: int) -> float:
    """The smoothing of the train loss curve: an EMA over about n_steps / 20 steps (5 to 100)."""
    return 1 - 1 / min(100, max(5, n_steps // 20))


def ema(values, beta: float) -> list[float]:
    """Exponential moving average, bias-corrected (Adam's way), so it starts at the first value."""
    out, avg = [], 0.0
    for i, value in enumerate(values, 1):
        avg = beta * avg + (1 - beta) * value
        out.append(avg / (1 - beta**i))
    return out


HELLASWAG_GPT2 = 0.2955  # GPT-2 124M's HellaSwag acc_norm, the line a run aims to cross


def loss_figure(metrics_path):
    """The figure of loss.png: the train loss per step (faint) and EMA-smoothed, the val loss, the learning
    rate in a panel below; HellaSwag acc_norm beside them when the run has any. Line labels name each
    series (a test reads them back)."""
    from matplotlib.figure import Figure

    train, val, hella = (read_metrics(metrics_path, kind) for kind in ("train", "val", "hellaswag"))
    fig = Figure(figsize=(12 if hella else 7.5, 5.5), layout="constrained")
    grid = fig.add_gridspec(2, 2 if hella else 1, height_ratios=(3, 1))
    ax = fig.add_subplot(grid[0, 0])
    ax_lr = fig.add_subplot(grid[1, 0], sharex=ax)
    steps, losses = [r["step"] for r in train], [r["loss"] for r in train]
    beta = ema_beta(len(losses))
    ax.plot(steps, losses, color="tab:blue", alpha=0.35, lw=0.8, label="train, per step")
    ax.plot(steps, ema(losses, beta), color="tab:blue", lw=1.8, label=f"train, EMA (β = {beta:.2f})")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:orange", ms=4, lw=1.2,
                label="val")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    ax.tick_params(labelbottom=False)
    ax_lr.plot(steps, [r["lr"] for r in train], color="tab:green", lw=1.2, label="lr")
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax_lr.grid(alpha=0.3)
    if hella:
        ax_h = fig.add_subplot(grid[:, 1])
        ax_h.plot([r["step"] for r in hella], [r["acc_norm"] for r in hella], "o-", color="tab:purple", ms=4,
                  label="HellaSwag acc_norm")
        ax_h.axhline(HELLASWAG_GPT2, ls="--", color="gray", label=f"GPT-2 124M ({HELLASWAG_GPT2})")
        ax_h.set_xlabel("step")
        ax_h.set_title("HellaSwag")
        ax_h.grid(alpha=0.3)
        ax_h.legend()
    last = f", val {val[-1]['val_loss']:.3f} at step {val[-1]['step']}" if val else ""
    fig.suptitle(f"{Path(metrics_path).parent.name}: {len(train)} steps{last}")
    return fig


def plot_metrics(metrics_path, out_path) -> Path:
    """Write loss.png (`loss_figure`)."""
    out_path = Path(out_path)
    loss_figure(metrics_path).savefig(out_path, dpi=100)
    return out_path
