"""Timing: `do_bench` on CUDA (warm-up, L2 flushed between reps, median with p20/p80); on a CPU the wall
clock on one thread after the same warm-up; back to back for short ops; peak CUDA memory."""
import contextlib
import statistics
import time

import torch

from gpt2_triton.bench.env import has_cuda

WARMUP_MS = 25  # every case runs this long before it is timed (do_bench's default warm-up, also on CPU)
# CPU rows are timed on one thread: on a busy 2-core machine a second OpenMP thread waits for the
# scheduler (a 0.1 ms attention took 32 ms per call, for seconds); the interpreter runs on one anyway.
CPU_THREADS = 1


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
