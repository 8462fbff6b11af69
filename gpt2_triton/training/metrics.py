"""Helpers for train.py: the LR schedule, MFU, peak memory, the metrics log and the loss plot."""
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


def format_step(step, max_steps, loss, lr, grad_norm, step_ms, tokens_per_s, mfu_value, mem_mb) -> str:
    mfu_text = "n/a" if mfu_value is None else f"{100 * mfu_value:.1f}%"
    return (f"step {step:>6}/{max_steps} | loss {loss:.4f} | lr {lr:.2e} | norm {grad_norm:.3f} | "
            f"{step_ms:.0f} ms | {tokens_per_s:,.0f} tok/s | MFU {mfu_text} | mem {mem_mb:,.0f} MB")


class MetricsLog:
    """metrics.jsonl: one JSON object per line, each with a "kind" ("train", "val", "hellaswag",
    "sample", "resume"). Append-only: a resumed run appends a "resume" record and goes on, so nothing
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


def plot_metrics(metrics_path, out_path) -> Path:
    """loss.png: train and val loss against step, and HellaSwag acc_norm when there is any."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val, hella = (read_metrics(metrics_path, kind) for kind in ("train", "val", "hellaswag"))
    ncols = 2 if hella else 1
    fig, axes = plt.subplots(1, ncols, figsize=(7 * ncols, 4.5), squeeze=False)
    ax = axes[0, 0]
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train", lw=1)
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="val")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    if hella:
        ax = axes[0, 1]
        ax.plot([r["step"] for r in hella], [r["acc_norm"] for r in hella], "o-", label="acc_norm")
        ax.axhline(0.2955, ls="--", color="gray", label="GPT-2 124M (0.2955)")
        ax.set_xlabel("step")
        ax.set_title("HellaSwag")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    out_path = Path(out_path)
    fig.savefig(out_path, dpi=100)
    plt.close(fig)
    return out_path
