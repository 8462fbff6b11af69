"""Result rows: `measure` times one provider in one mode into a Row; a `session` receives each row as soon
as it is measured, stops measuring after a deadline and measures only some cases; `check_rows` and
`speedups` compare rows."""
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Optional

from gpt2_triton.bench.env import has_cuda
from gpt2_triton.bench.timing import (
    CPU_THREADS,
    SHORT_OP_MS,
    back_to_back_ms,
    cpu_threads,
    peak_memory_of,
    time_ms,
    timed_call_s,
)
from gpt2_triton.devices import cuda_gpu


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
