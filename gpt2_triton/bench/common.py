"""Shared by every benchmark: timing, FLOP/byte formulas, peak memory, result rows and reports.

On CUDA, timings come from `triton.testing.do_bench` (warm-up, L2 flushed between reps, median with
p20/p80). Without CUDA (`--quick` on CPU) the same code runs at tiny sizes so CI keeps it working;
those rows are labelled `cpu` and are not kernel performance.

`session(...)` lets a caller (bench/headline.py) receive each row as soon as it is measured, stop
measuring after a deadline, and measure only some cases, without changing the per-kernel modules.
"""
import contextlib
import datetime
import json
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name() if has_cuda() else f"cpu ({platform.processor() or platform.machine()})"


def device_slug() -> str:
    """Folder name for results: 'nvidia-h100-80gb-hbm3', 'cpu'."""
    if not has_cuda():
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    import triton
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "driver": nvidia_smi(("driver_version",)).get("driver_version") if has_cuda() else None,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def nvidia_smi(fields) -> dict:
    """What nvidia-smi reports for GPU 0; fields it cannot read are left out."""
    def query(names):
        try:
            out = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={','.join(names)}",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode != 0 or not out.stdout.strip():
            return None
        values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
        return dict(zip(names, values)) if len(values) == len(names) else None

    values = query(fields)
    if values is None:  # an unknown field fails the whole query: ask one at a time
        values = {}
        for field in fields:
            values.update(query([field]) or {})
    return {k: v for k, v in values.items() if v and "N/A" not in v and "Not Supported" not in v}


# --- timing --------------------------------------------------------------------------------------
def time_ms(fn, grad_to_none=None, quick=False, warm=False):
    """(median, p20, p80) milliseconds of fn(). warm: fn has already run once (compiled, tuned)."""
    if has_cuda():
        import triton.testing
        warmup, rep = (5, 20) if quick else (25, 100)
        med, p20, p80 = triton.testing.do_bench(fn, warmup=warmup, rep=rep, grad_to_none=grad_to_none,
                                                quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    return wall_clock_ms(fn, warmup=0 if warm else 1, reps=3 if quick else 10, grad_to_none=grad_to_none)


SHORT_OP_MS = 0.1  # a per-call timing under this may be mostly launch overhead


def back_to_back_ms(fn, grad_to_none=None, reps=5, target_ms=20.0):
    """(median, p20, p80) ms per call of fn() run many times back to back between two CUDA events (no L2
    flush or host wait between calls): what a short op costs inside a stream of work, launch overhead
    hidden where the host queues faster than the GPU runs. For ops that time under SHORT_OP_MS per call."""
    per_call = max(timed_call_s(fn) * 1e3, 1e-3)
    n = int(min(max(target_ms / per_call, 10), 1000))
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        torch.cuda.synchronize()
        start.record()
        for _ in range(n):
            for t in grad_to_none or ():
                t.grad = None
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n)
    return summarize(times)


def timed_call_s(fn):
    """Seconds of one call of fn(), CUDA synchronised around it (e.g. the warm-up call where
    compilation and autotuning happen)."""
    if has_cuda():
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if has_cuda():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def wall_clock_ms(fn, warmup, reps, grad_to_none=None):
    """(median, p20, p80) ms of fn() by the wall clock (CUDA synchronised around each call), after
    `warmup` untimed calls (where compilation happens). For work do_bench cannot repeat freely."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        for t in grad_to_none or ():
            t.grad = None
        times.append(timed_call_s(fn) * 1e3)
    return summarize(times)


def summarize(times_ms):
    """(median, p20, p80) of a list of timings."""
    if len(times_ms) == 1:
        return times_ms[0], times_ms[0], times_ms[0]
    q = statistics.quantiles(times_ms, n=5, method="inclusive")
    return statistics.median(times_ms), q[0], q[3]


def peak_memory_mb(fn):
    """Peak CUDA memory allocated while fn() runs, above what was allocated before (on CPU: None,
    without running fn)."""
    if not has_cuda():
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def run_modes(forward, inputs, modes):
    """Build the callables for "fwd", "bwd" (backward of a retained graph) and "fwd+bwd".

    forward() -> output tensor; inputs: tensors whose grads are reset between reps. Nothing runs
    until a callable is first called (the graph for "bwd" is built then), so a provider that fails
    fails inside measure() and gives an error row, and its compile time lands in the first call.
    """
    graph = {}

    def retained():  # (out, grad_out) of one forward with autograd, built once
        if not graph:
            out = forward()
            graph.update(out=out, grad_out=torch.randn_like(out))
        return graph["out"], graph["grad_out"]

    def fwd():
        with torch.no_grad():
            forward()

    def bwd():
        out, grad_out = retained()
        out.backward(grad_out, retain_graph=True)

    def fwd_bwd():
        grad_out = retained()[1]
        forward().backward(grad_out)

    fns = {"fwd": fwd, "bwd": bwd, "fwd+bwd": fwd_bwd}
    return {mode: fns[mode] for mode in modes}


def kernel_providers(ours, eager):
    """Ours, the eager PyTorch code and (on CUDA) torch.compile of that same eager code, specialised
    to each shape (dynamic=False: a second shape recompiles statically instead of going dynamic)."""
    out = {"triton": ours, "eager": eager}
    if has_cuda():
        out["compile"] = torch.compile(eager, dynamic=False)
    return out


# --- formulas ------------------------------------------------------------------------------------
def attention_flops(B, H, T, D, causal, mode):
    """Standard count: fwd 4·B·H·T²·D (x0.5 causal); bwd 2.5x fwd."""
    fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def matmul_flops(M, N, K):
    return 2 * M * N * K


# --- results -------------------------------------------------------------------------------------
@dataclass
class Row:
    bench: str  # e.g. "attention"
    case: str  # what is compared, e.g. "attention B16-H12-T1024-D64 causal"
    provider: str  # "triton", "eager", "compile", "sdpa-flash", ...
    mode: str  # "fwd", "bwd", "fwd+bwd", "step"
    shape: dict
    dtype: str
    median_ms: float | None
    p20_ms: float | None = None
    p80_ms: float | None = None
    tflops: float | None = None
    gbps: float | None = None
    peak_mb: float | None = None
    extra: dict = field(default_factory=dict)
    error: str | None = None  # a provider that could not run says why
    env: dict = field(default_factory=dict)

    @property
    def key(self):
        return self.bench, self.case, self.mode


@dataclass
class Session:
    """What a caller asked of measure(): `sink(row)` gets every row as soon as it exists, rows are
    skipped (with a reason) once time.monotonic() passes `deadline`, and only what
    `select(case, provider)` accepts is measured (the rest gives an unrecorded "not selected" row)."""
    sink: Optional[Callable[[Row], None]] = None
    deadline: Optional[float] = None
    select: Optional[Callable[[str, str], bool]] = None


_session = Session()
NOT_SELECTED = "not selected"


@contextlib.contextmanager
def session(sink=None, deadline=None, select=None):
    global _session
    previous, _session = _session, Session(sink, deadline, select)
    try:
        yield _session
    finally:
        _session = previous


def record(row):
    """Hand a finished row to the session's sink (if any) and return it."""
    if _session.sink is not None and row.error != NOT_SELECTED:
        _session.sink(row)
    return row


def measure(bench, case, provider, mode, fn, shape, dtype, flops=None, nbytes=None, grad_to_none=None,
            quick=False, memory=True, extra=None):
    """Time fn and return a Row (a failing provider gives a Row with `error` instead of raising).
    extra["first_call_s"]: the first, untimed call (torch.compile and autotuning happen there);
    extra["back_to_back_ms"]: on CUDA, for ops under SHORT_OP_MS per call, the back-to-back timing too."""
    if _session.select is not None and not _session.select(case, provider):
        return Row(bench, case, provider, mode, shape, dtype, None, error=NOT_SELECTED)
    if _session.deadline is not None and time.monotonic() > _session.deadline:
        return record(Row(bench, case, provider, mode, shape, dtype, None,
                          error="skipped: this job's time budget was spent before it started"))
    extra = dict(extra or {})
    try:
        extra["first_call_s"] = round(timed_call_s(fn), 3)
        med, p20, p80 = time_ms(fn, grad_to_none=grad_to_none, quick=quick, warm=True)
        if has_cuda() and med < SHORT_OP_MS:
            extra["back_to_back_ms"] = [round(x, 5) for x in back_to_back_ms(fn, grad_to_none)]
        peak = peak_memory_mb(fn) if memory else None
    except Exception as e:  # a baseline missing on this device must not stop the suite
        return record(Row(bench, case, provider, mode, shape, dtype, None, extra=extra,
                          error=f"{type(e).__name__}: {e}"[:300]))
    return record(Row(bench, case, provider, mode, shape, dtype, med, p20, p80,
                      tflops=flops / (med * 1e-3) / 1e12 if flops else None,
                      gbps=nbytes / (med * 1e-3) / 1e9 if nbytes else None,
                      peak_mb=peak, extra=extra))


def speedups(rows, ours="triton"):
    """[(row_of_ours, baseline_row, speedup = baseline_ms / ours_ms)] per case and mode."""
    by_key = {}
    for r in rows:
        by_key.setdefault(r.key, []).append(r)
    out = []
    for group in by_key.values():
        mine = [r for r in group if r.provider == ours and r.median_ms]
        if not mine:
            continue
        for base in group:
            if base.provider != ours and base.median_ms:
                out.append((mine[0], base, base.median_ms / mine[0].median_ms))
    return out


def speedup_text(rows, ours="triton"):
    """Row -> "baseline ms / ours ms" as text for each baseline row that has an ours to compare."""
    ours_ms = {r.key: r.median_ms for r in rows if r.provider == ours and r.median_ms}
    return lambda r: (f"{r.median_ms / ours_ms[r.key]:.2f}"
                      if r.key in ours_ms and r.provider != ours and r.median_ms else "")


def format_table(rows, ours="triton"):
    lines = [f"{'case':<46} {'mode':<8} {'provider':<16} {'median ms':>10} {'p20-p80':>17} "
             f"{'TFLOP/s':>8} {'GB/s':>8} {'peak MB':>9} {'ours x':>7}"]
    ratio_of = speedup_text(rows, ours)
    for r in rows:
        if r.error:
            lines.append(f"{r.case:<46} {r.mode:<8} {r.provider:<16} unavailable: {r.error[:60]}")
            continue
        ratio = ratio_of(r)
        lines.append(
            f"{r.case:<46} {r.mode:<8} {r.provider:<16} {r.median_ms:>10.3f} "
            f"{f'{r.p20_ms:.3f}-{r.p80_ms:.3f}':>17} {_fmt(r.tflops, 1):>8} {_fmt(r.gbps, 0):>8} "
            f"{_fmt(r.peak_mb, 1):>9} {ratio:>7}")
    return "\n".join(lines)


def _fmt(x, digits):
    return "" if x is None else f"{x:.{digits}f}"


def write_results(rows, out_dir, name, env):
    """Append JSON lines, and write the markdown summary and PNG plots for one benchmark."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / f"{name}.jsonl", "w") as f:
        for r in rows:
            r.env = env
            f.write(json.dumps(asdict(r)) + "\n")
    md = [f"# {name}", "", f"device: {env['device']}; torch {env['torch']}, triton {env['triton']}, "
          f"CUDA {env['cuda']}, driver {env['driver']}; commit {env['git_commit']}; {env['date']}", ""]
    if not has_cuda():
        md += ["**CPU run (`--quick`): tiny sizes through Triton's interpreter. These numbers check "
               "that the code runs; they are not kernel performance.**", ""]
    md += ["| case | mode | provider | median ms | p20-p80 ms | TFLOP/s | GB/s | peak MB | speedup of ours |",
           "|---|---|---|---:|---:|---:|---:|---:|---:|"]
    ratio_of = speedup_text(rows)
    for r in rows:
        if r.error:
            md.append(f"| {r.case} | {r.mode} | {r.provider} | unavailable: {r.error[:80]} | | | | | |")
            continue
        ratio = ratio_of(r)
        ratio = f"{ratio}x" if ratio else ""
        md.append(f"| {r.case} | {r.mode} | {r.provider} | {r.median_ms:.3f} | {r.p20_ms:.3f}-{r.p80_ms:.3f} | "
                  f"{_fmt(r.tflops, 1)} | {_fmt(r.gbps, 0)} | {_fmt(r.peak_mb, 1)} | {ratio} |")
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    plot_speedups(rows, out_dir / f"{name}.png", title=f"{name} on {env['device']}")
    return out_dir


def plot_speedups(rows, path, title):
    """Bars: speedup of ours over each baseline, one group per (case, mode)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = speedups(rows)
    fig, ax = plt.subplots(figsize=(max(6, 0.45 * len(pairs) + 2), 4.5))
    if pairs:
        labels = [f"{base.case}\n{base.mode} vs {base.provider}" for _, base, _ in pairs]
        values = [s for _, _, s in pairs]
        colors = ["tab:green" if s >= 1 else "tab:red" for s in values]
        ax.bar(range(len(values)), values, color=colors)
        ax.set_xticks(range(len(values)))
        ax.set_xticklabels(labels, rotation=75, ha="right", fontsize=6)
        ax.axhline(1.0, color="black", linewidth=0.8)
    else:
        ax.text(0.5, 0.5, "no comparable results", ha="center")
    ax.set_ylabel("speedup of ours (baseline ms / ours ms)")
    ax.set_title(title + ("" if has_cuda() else " - CPU interpreter, not performance"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_scaling(rows, path, x_key, title, y="tflops", ylabel="TFLOP/s"):
    """Lines: one per provider, y against shape[x_key], for one mode at a time."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r.mode for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(5 * len(modes), 4), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for provider in sorted({r.provider for r in rows}):
            pts = sorted((r.shape[x_key], getattr(r, y)) for r in rows
                         if r.mode == mode and r.provider == provider and getattr(r, y) is not None)
            if pts:
                ax.plot(*zip(*pts), marker="o", label=provider)
        ax.set_xscale("log", base=2)
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{mode}", fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no {ylabel} measured on this device", ha="center", transform=ax.transAxes)
    fig.suptitle(title + ("" if has_cuda() else " - CPU interpreter, not performance"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def out_dir_for(base):
    return Path(base) if base else Path("bench") / "results" / device_slug()
