"""Shared by every benchmark: timing, FLOP/byte formulas, peak memory, result rows and reports.

On CUDA, timings come from `triton.testing.do_bench` (warm-up, L2 flushed between reps, median with
p20/p80). Without CUDA (`--quick` on CPU) the same code runs at tiny sizes so CI keeps it working;
those rows are labelled `cpu` and are not kernel performance: they are timed by the wall clock on one
thread after the same warm-up, their TFLOP/s and GB/s are left blank, and `check_rows` flags any row
that contradicts another (a fwd+bwd faster than its fwd alone).

`session(...)` lets a caller (bench/headline.py) receive each row as soon as it is measured, stop
measuring after a deadline, and measure only some cases, without changing the per-kernel modules.
"""
import contextlib
import datetime
import json
import math
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from gpt2_triton.devices import cuda_gpu

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
RESULTS_ROOT = Path("bench") / "results"  # under the current folder: bench/results/<device>/
WARMUP_MS = 25  # every case runs this long before it is timed (do_bench's default warm-up, also on CPU)
# CPU rows are timed on one thread: on a busy 2-core machine a second OpenMP thread waits for the
# scheduler (a 0.1 ms attention took 32 ms per call, for seconds); the interpreter runs on one anyway.
CPU_THREADS = 1


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name() if has_cuda() else f"cpu ({platform.processor() or platform.machine()})"


def device_slug() -> str:
    """Folder name for results: 'nvidia-h100-80gb-hbm3', 'cpu'."""
    if not has_cuda():
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-")


def matmul_provider() -> str:
    """The library torch's matmul runs on here: "cublas", "hipblas", or the CPU BLAS torch was built with."""
    if has_cuda():
        return "hipblas" if torch.version.hip else "cublas"
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return {"mkl": "mkl", "open": "openblas"}.get(blas[1] if blas else "", "cpu-blas")


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
def time_ms(fn, grad_to_none=None, quick=False, warmed_ms=0.0):
    """(median, p20, p80) milliseconds of fn(), after WARMUP_MS of untimed calls (`warmed_ms` of them
    already made by the caller: the first call, where compilation and autotuning happen)."""
    if has_cuda():
        import triton.testing
        rep = 20 if quick else 100
        med, p20, p80 = triton.testing.do_bench(fn, warmup=WARMUP_MS, rep=rep, grad_to_none=grad_to_none,
                                                quantiles=[0.5, 0.2, 0.8])
        return med, p20, p80
    return wall_clock_ms(fn, warmup=0, reps=3 if quick else 10, grad_to_none=grad_to_none,
                         warmup_ms=WARMUP_MS - warmed_ms)


@contextlib.contextmanager
def cpu_threads(n: int):
    """torch's intra-op threads set to n while timing on a CPU (nothing changes with CUDA), then restored."""
    if has_cuda():
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


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


def wall_clock_ms(fn, warmup, reps, grad_to_none=None, warmup_ms=0.0):
    """(median, p20, p80) ms of fn() by the wall clock (CUDA synchronised around each call), after
    `warmup` untimed calls (where compilation happens) and then more until `warmup_ms` have passed.
    For work do_bench cannot repeat freely, and on CPU."""
    for _ in range(warmup):
        fn()
    deadline = time.perf_counter() + warmup_ms / 1e3
    while time.perf_counter() < deadline:
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


def peak_memory_of(fn):
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


class Reference:
    """The fp32 reference of one case, to check each provider against on the timed inputs (`max_err`).

    reference(*inputs) runs on fp32 copies of `inputs` (integer tensors as they are); its output and the
    gradients of the floating inputs that require grad are computed once, on first use, with a seeded
    incoming gradient that every provider receives too (cast to its output's dtype).
    `errors(forward, leaves, view)` gives a provider's mode -> max abs error: "fwd" its output (one forward
    without autograd), "bwd" and "fwd+bwd" the output and every gradient of `leaves` (one forward and
    backward; view(grads) maps them onto the reference's inputs where the layouts differ). Each computed
    once per provider when a row first asks, after its timing; nothing runs for a provider no row measures."""

    def __init__(self, reference, inputs, grads=True):
        self.reference, self.inputs, self.grads = reference, list(inputs), grads
        self._result = None

    def result(self):
        if self._result is None:
            copies = [t.detach().float().requires_grad_(t.requires_grad) if t.is_floating_point() else t
                      for t in self.inputs]
            leaves = [t for t in copies if t.is_floating_point() and t.requires_grad] if self.grads else []
            with torch.enable_grad() if leaves else torch.no_grad():
                out = self.reference(*copies)
            gen = torch.Generator(device=out.device).manual_seed(0)
            grad_out = torch.randn(out.shape, device=out.device, generator=gen)
            grads = torch.autograd.grad(out, leaves, grad_out) if leaves else ()
            self._result = out.detach(), grad_out, list(grads)
        return self._result

    def errors(self, forward, leaves=(), view=None):
        """mode -> max abs error of forward() (and of its leaves' grads for bwd modes), cached."""
        cache = {}

        def of(mode):
            key = "fwd" if mode == "fwd" else "bwd"
            if key not in cache:
                ref_out, grad_out, ref_grads = self.result()
                leaves_ = [t for t in leaves if t.requires_grad] if self.grads and key == "bwd" else []
                with torch.enable_grad() if leaves_ else torch.no_grad():  # the graph its timed rows ran
                    out = forward()
                errors = [_max_abs(out, ref_out)]
                if leaves_:
                    grads = list(torch.autograd.grad(out, leaves_, grad_out.to(out.dtype)))
                    errors += [_max_abs(g, r) for g, r in zip(view(grads) if view else grads, ref_grads)]
                cache[key] = max(errors)
            return cache[key]
        return of


def _max_abs(x, ref) -> float:
    if x.shape != ref.shape:
        raise ValueError(f"shape {tuple(x.shape)} differs from the reference's {tuple(ref.shape)}")
    return float((x.detach().float() - ref).abs().max()) if ref.numel() else 0.0


COMPILE_BASELINES = ("compile", "compile-max-autotune")  # torch.compile of the eager code: default, max-autotune
# max-autotune benchmarks candidate GEMM and Triton templates on the device: minutes per graph, CUDA only
MAX_AUTOTUNE_SKIPPED = "max-autotune runs on CUDA without --quick only"


class Skipped(Exception):
    """A provider not run here; its rows say why (measure() gives "Skipped: <reason>")."""


def skipped(reason):
    """A provider that raises Skipped(reason) when called: its rows are error rows naming the reason."""
    def provider(*args, **kwargs):
        raise Skipped(reason)
    return provider


def kernel_providers(ours, eager, quick=False):
    """Ours, the eager PyTorch code and (on CUDA) torch.compile of that same eager code, specialised
    to each shape (dynamic=False: a second shape recompiles statically instead of going dynamic), with
    the default mode ("compile") and mode="max-autotune" ("compile-max-autotune": on CPU or with --quick
    a provider whose rows say it was skipped and why)."""
    out = {"triton": ours, "eager": eager}
    if has_cuda():
        out["compile"] = torch.compile(eager, dynamic=False)
    out["compile-max-autotune"] = (torch.compile(eager, dynamic=False, mode="max-autotune")
                                   if has_cuda() and not quick else skipped(MAX_AUTOTUNE_SKIPPED))
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
    tflops: float | None = None  # CUDA only: on a CPU (tiny sizes, the interpreter) a rate means nothing
    gbps: float | None = None  # CUDA only
    peak_mb: float | None = None  # CUDA only
    extra: dict = field(default_factory=dict)
    error: str | None = None  # a provider that could not run says why
    env: dict = field(default_factory=dict)
    sanity: list | None = None  # check_rows: the checks this row failed, in words ([] passed; None not checked)
    max_err: float | None = None  # max abs error against the fp32 reference on the timed inputs (Reference)

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
            quick=False, memory=True, extra=None, max_err=None):
    """Time fn and return a Row (a failing provider gives a Row with `error` instead of raising).
    max_err(mode) (Reference.errors): the row's error against the reference, asked after the timing; if it
    fails, extra["max_err_failed"] says why.
    extra["first_call_s"]: the first, untimed call (torch.compile and autotuning happen there);
    extra["back_to_back_ms"]: on CUDA, for ops under SHORT_OP_MS per call, the back-to-back timing too."""
    if _session.select is not None and not _session.select(case, provider):
        return Row(bench, case, provider, mode, shape, dtype, None, error=NOT_SELECTED)
    if _session.deadline is not None and time.monotonic() > _session.deadline:
        return record(Row(bench, case, provider, mode, shape, dtype, None,
                          error="skipped: this job's time budget was spent before it started"))
    extra = dict(extra or {})
    if not has_cuda():
        extra["threads"] = CPU_THREADS
    try:
        with cpu_threads(CPU_THREADS):
            first_s = timed_call_s(fn)
            extra["first_call_s"] = round(first_s, 3)
            med, p20, p80 = time_ms(fn, grad_to_none=grad_to_none, quick=quick, warmed_ms=1e3 * first_s)
        if has_cuda() and med < SHORT_OP_MS:
            extra["back_to_back_ms"] = [round(x, 5) for x in back_to_back_ms(fn, grad_to_none)]
        peak = peak_memory_of(fn) if memory else None
    except Exception as e:  # a baseline missing on this device must not stop the suite
        return record(Row(bench, case, provider, mode, shape, dtype, None, extra=extra,
                          error=f"{type(e).__name__}: {e}"[:300]))
    err = None
    if max_err is not None:
        try:
            err = max_err(mode)
        except Exception as e:
            extra["max_err_failed"] = f"{type(e).__name__}: {e}"[:200]
    rates = has_cuda()
    return record(Row(bench, case, provider, mode, shape, dtype, med, p20, p80,
                      tflops=flops / (med * 1e-3) / 1e12 if flops and rates else None,
                      gbps=nbytes / (med * 1e-3) / 1e9 if nbytes and rates else None,
                      peak_mb=peak, extra=extra, max_err=err))


def check_rows(rows, peak_flops=None, timing_order=None) -> list[str]:
    """Sanity checks of measured rows: a time is positive; a fwd+bwd is not clearly faster than the same
    provider's fwd or bwd alone (its p80 below their p20; `timing_order`, default on a GPU only: the CPU's tiny
    --quick timings on a shared machine are not performance, and a 0.05 ms eager call there swings past that
    margin); TFLOP/s stay under the device's peak (`peak_flops`, default: the table's entry for this GPU). Each
    row's failures go to its `sanity`; returns them all as "case | mode | provider: what is wrong"."""
    timing_order = has_cuda() if timing_order is None else timing_order
    gpu = cuda_gpu()
    peak = peak_flops or (gpu.bf16_flops if gpu else None)
    measured = {(r.case, r.provider, r.mode): r for r in rows if r.median_ms is not None}
    problems = []
    for r in measured.values():
        r.sanity = []
        if not (math.isfinite(r.median_ms) and r.median_ms > 0):
            r.sanity.append(f"time {r.median_ms} ms is not a positive number")
        if r.mode == "fwd+bwd" and timing_order:
            for part in ("fwd", "bwd"):
                alone = measured.get((r.case, r.provider, part))
                if alone is not None and r.p80_ms < alone.p20_ms:
                    r.sanity.append(f"fwd+bwd ({r.median_ms:.3f} ms) is faster than {part} alone "
                                    f"({alone.median_ms:.3f} ms)")
        if peak and r.tflops and r.tflops * 1e12 > peak:
            r.sanity.append(f"{r.tflops:.0f} TFLOP/s is above the device's peak ({peak / 1e12:.0f} TFLOP/s)")
        problems += [f"{r.case} | {r.mode} | {r.provider}: {text}" for text in r.sanity]
    return problems


def speedups(rows, ours="triton"):
    """[(row_of_ours, baseline_row, speedup = baseline_ms / ours_ms, or None where either side was not
    measured)] per case, mode and baseline."""
    by_key = {}
    for r in rows:
        by_key.setdefault(r.key, []).append(r)
    out = []
    for group in by_key.values():
        mine = [r for r in group if r.provider == ours]
        if not mine:
            continue
        for base in group:
            if base.provider != ours:
                value = base.median_ms / mine[0].median_ms if base.median_ms and mine[0].median_ms else None
                out.append((mine[0], base, value))
    return out


def ratio_text(x) -> str:
    """A speed-up as text: 2 decimals, or 2 significant digits below 0.1 (0.0026, never 0.00)."""
    return "" if x is None else f"{x:.2f}" if x >= 0.1 else f"{x:.2g}"


def speedup_text(rows, ours="triton"):
    """Row -> "baseline ms / ours ms" as text for each baseline row that has an ours to compare."""
    ours_ms = {r.key: r.median_ms for r in rows if r.provider == ours and r.median_ms}
    return lambda r: (ratio_text(r.median_ms / ours_ms[r.key])
                      if r.key in ours_ms and r.provider != ours and r.median_ms else "")


def cpu_columns_note() -> str:
    """Why TFLOP/s, GB/s and peak MB are blank on a CPU ("" with CUDA)."""
    if has_cuda():
        return ""
    return ("CPU: TFLOP/s, GB/s and peak MB are left blank (tiny sizes, triton rows run in Triton's interpreter: "
            "a rate means nothing here; peak memory is measured on CUDA only).")


def sanity_notes(rows) -> list[str]:
    """Every failed sanity check of `rows` (check_rows), under a heading line; [] when none failed."""
    failed = [f"{r.case} | {r.mode} | {r.provider}: {text}" for r in rows for text in r.sanity or ()]
    return [f"sanity check failed ({len(failed)}):"] + [f"  {text}" for text in failed] if failed else []


def _check_mark(r) -> str:
    return "" if r.sanity is None else "FAILED" if r.sanity else "ok"


def format_table(rows, ours="triton"):
    lines = [f"{'case':<46} {'mode':<8} {'provider':<20} {'median ms':>10} {'p20-p80':>17} "
             f"{'TFLOP/s':>8} {'GB/s':>8} {'peak MB':>9} {'max err':>9} {'ours x':>7} {'check':>6}"]
    ratio_of = speedup_text(rows, ours)
    for r in rows:
        if r.error:
            lines.append(f"{r.case:<46} {r.mode:<8} {r.provider:<20} not measured: {r.error[:60]}")
            continue
        ratio = ratio_of(r)
        lines.append(
            f"{r.case:<46} {r.mode:<8} {r.provider:<20} {r.median_ms:>10.3f} "
            f"{f'{r.p20_ms:.3f}-{r.p80_ms:.3f}':>17} {_fmt(r.tflops, 1):>8} {_fmt(r.gbps, 0):>8} "
            f"{_fmt(r.peak_mb, 1):>9} {err_text(r.max_err):>9} {ratio:>7} {_check_mark(r):>6}")
    return "\n".join(lines + sanity_notes(rows))


MAX_ERR_NOTE = ("max err: the largest absolute difference from the fp32 reference (gpt2_triton.kernels.reference) "
                "on the timed inputs, computed once apart from the timing: fwd rows the output, bwd and fwd+bwd rows "
                "the output and every input gradient (one seeded incoming gradient for all providers).")


def err_text(x) -> str:
    """A max abs error as text: 2 significant digits ("3.1e-03"), "0" when exact, "" when not computed."""
    return "" if x is None else "0" if x == 0 else f"{x:.1e}"


def _fmt(x, digits):
    return "" if x is None else f"{x:.{digits}f}"


def write_results(rows, out_dir, name, env):
    """Write the JSON lines, the markdown table and the PNG plot of one benchmark."""
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
    md += ["| case | mode | provider | median ms | p20-p80 ms | TFLOP/s | GB/s | peak MB | max err | speedup of ours "
           "| check |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    ratio_of = speedup_text(rows)
    for r in rows:
        if r.error:
            md.append(f"| {r.case} | {r.mode} | {r.provider} | not measured: {r.error[:80]} | | | | | | | |")
            continue
        ratio = ratio_of(r)
        ratio = f"{ratio}x" if ratio else ""
        md.append(f"| {r.case} | {r.mode} | {r.provider} | {r.median_ms:.3f} | {r.p20_ms:.3f}-{r.p80_ms:.3f} | "
                  f"{_fmt(r.tflops, 1)} | {_fmt(r.gbps, 0)} | {_fmt(r.peak_mb, 1)} | {err_text(r.max_err)} | {ratio} | "
                  f"{_check_mark(r)} |")
    md += ["", MAX_ERR_NOTE, "", cpu_columns_note()] + [f"- {note.strip()}" if note.startswith("  ") else note
                                                        for note in sanity_notes(rows)]
    (out_dir / f"{name}.md").write_text("\n".join(md) + "\n")
    speedup_figure(rows, title=f"{name} on {env['device']}").savefig(out_dir / f"{name}.png", dpi=120)
    return out_dir


def cpu_note(on_cuda: bool | None = None) -> str:
    """A plot title's warning for CPU results (on_cuda: where the rows were measured; default: here)."""
    return "" if (has_cuda() if on_cuda is None else on_cuda) else " - CPU interpreter, not performance"


def ratio_bars(ax, items, ylabel):
    """Bars of ratios on a log axis, drawn from 1x (above: ours ahead; below: behind), each labelled with
    its value; an item whose value is None is marked "not measured" instead of a bar of height 0."""
    values = [v for _, v in items if v]
    low, high = min(values + [1.0]) / 3, max(values + [1.0]) * 3
    for i, (_, v) in enumerate(items):
        if v:
            ax.bar(i, v - 1, bottom=1, color="tab:green" if v >= 1 else "tab:red")
            ax.annotate(f"{ratio_text(v)}x", (i, v), ha="center", va="bottom" if v >= 1 else "top", fontsize=6)
        else:
            ax.annotate("not measured", (i, math.sqrt(low * high)), ha="center", va="center", rotation=90,
                        fontsize=7, color="gray")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ax.set_yscale("log")
    ax.set_ylim(low, high)
    ax.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}x"))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(items)))
    ax.set_xticklabels([label for label, _ in items], rotation=75, ha="right", fontsize=6)
    ax.set_xlim(-0.6, len(items) - 0.4)
    ax.set_ylabel(ylabel, fontsize=8)


def speedup_figure(rows, title):
    """Bars: speedup of ours over each baseline, one per (case, mode, baseline), on a log axis."""
    from matplotlib.figure import Figure

    pairs = speedups(rows)
    fig = Figure(figsize=(max(6, 0.3 * len(pairs) + 2), 5), layout="constrained")
    ax = fig.add_subplot()
    if pairs:
        ratio_bars(ax, [(f"{base.case}\n{base.mode} vs {base.provider}", s) for _, base, s in pairs],
                   "speedup of ours (baseline ms / ours ms)")
    else:
        ax.text(0.5, 0.5, "no comparable results", ha="center", transform=ax.transAxes)
    ax.set_title(title + cpu_note(), fontsize=9)
    return fig


def sizes_text(rows, keys) -> str:
    """The sizes of `keys` that `rows` measured, for a title: "H12 D64" when each key has one value, else
    "B·T = 16,384" when their product has one, else every combination: "B x T = 1 x 32, 1 x 64"."""
    combos = sorted({tuple(r.shape[k] for k in keys) for r in rows})
    if len(combos) == 1:
        return " ".join(f"{k}{v}" for k, v in zip(keys, combos[0]))
    products = {math.prod(c) for c in combos}
    if len(products) == 1:
        return f"{'·'.join(keys)} = {products.pop():,}"
    return f"{' x '.join(keys)} = " + ", ".join(" x ".join(map(str, c)) for c in combos)


def scaling_figure(rows, x_key, title, y="tflops", ylabel="TFLOP/s", fallback=None):
    """Lines: one per provider, y against shape[x_key], one panel per mode. Where no row has y (TFLOP/s
    on a CPU) and `fallback` = (field, label) names another (("median_ms", "median ms")), that is drawn
    instead; a provider's sizes without a measurement are named in its legend entry."""
    from matplotlib.figure import Figure

    log_y = False
    if fallback and not any(getattr(r, y) is not None for r in rows):
        (y, ylabel), log_y = fallback, True  # times of ours (interpreter) and eager lie decades apart
    modes = list(dict.fromkeys(r.mode for r in rows))
    fig = Figure(figsize=(5 * len(modes), 4), layout="constrained")
    axes = fig.subplots(1, len(modes), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        for provider in sorted({r.provider for r in rows}):
            mine = [r for r in rows if r.mode == mode and r.provider == provider]
            pts = sorted((r.shape[x_key], getattr(r, y)) for r in mine if getattr(r, y) is not None)
            missing = sorted({r.shape[x_key] for r in mine if getattr(r, y) is None})
            label = provider + (f" (not measured: {x_key}={', '.join(map(str, missing))})" if missing else "")
            if pts:
                ax.plot(*zip(*pts), marker="o", label=label)
        ax.set_xscale("log", base=2)
        if log_y:
            ax.set_yscale("log")
        ax.set_xlabel(x_key)
        ax.set_ylabel(ylabel)
        ax.set_title(f"{mode}", fontsize=9)
        if ax.lines:
            ax.legend(fontsize=7)
        else:
            ax.text(0.5, 0.5, f"no {ylabel} measured on this device", ha="center", transform=ax.transAxes)
    fig.suptitle(title + cpu_note(), fontsize=9)
    return fig


def plot_scaling(rows, path, x_key, title, **kwargs):
    scaling_figure(rows, x_key, title, **kwargs).savefig(path, dpi=120)


def out_dir_for(base, device=None):
    """Where results go: `base` when given, else bench/results/<device> under the current folder (the
    device's name, e.g. nvidia-h100-80gb-hbm3 or cpu; or a fixed name such as "static")."""
    return Path(base) if base else RESULTS_ROOT / (device or device_slug())
