"""Shared by every benchmark, one import for the kernel benches; each name has its home in one module:

- `bench.env`: the device, its folder name, the matmul library, the commit and versions (`environment`).
- `bench.timing`: `do_bench` on CUDA (warm-up, L2 flushed between reps, median with p20/p80); without CUDA
  (`--quick` on CPU) the wall clock on one thread after the same warm-up; back-to-back timing; peak memory.
- `bench.providers`: ours, eager and torch.compile as providers, fwd/bwd/fwd+bwd callables, the fp32 reference.
- `bench.flops`: the FLOP formulas.
- `bench.rows`: `Row`, `measure`, the `session(...)` that lets a caller (bench/headline) receive each row as
  soon as it is measured, stop measuring after a deadline and measure only some cases, and `check_rows`,
  which flags any row that contradicts another (a fwd+bwd faster than its fwd alone).
- `bench.report`: JSON lines, markdown and printed tables, and where results go.
- `bench.plots`: the figures.

CPU rows are labelled `cpu` and are not kernel performance: their TFLOP/s and GB/s are left blank.
"""
from gpt2_triton.bench.env import (
    DTYPES,
    device_name,
    device_slug,
    environment,
    git_commit,
    has_cuda,
    matmul_provider,
    nvidia_smi,
)
from gpt2_triton.bench.flops import attention_flops, matmul_flops
from gpt2_triton.bench.plots import cpu_note, plot_scaling, ratio_bars, scaling_figure, sizes_text, speedup_figure
from gpt2_triton.bench.providers import (
    COMPILE_BASELINES,
    MAX_AUTOTUNE_SKIPPED,
    Reference,
    Skipped,
    kernel_providers,
    run_modes,
    skipped,
)
from gpt2_triton.bench.report import (
    MAX_ERR_NOTE,
    RESULTS_ROOT,
    cpu_columns_note,
    err_text,
    format_table,
    out_dir_for,
    sanity_notes,
    speedup_text,
    write_results,
)
from gpt2_triton.bench.rows import (
    NOT_SELECTED,
    Row,
    Session,
    check_rows,
    measure,
    ratio_text,
    record,
    session,
    speedups,
)
from gpt2_triton.bench.timing import (
    CPU_THREADS,
    SHORT_OP_MS,
    WARMUP_MS,
    back_to_back_ms,
    cpu_threads,
    peak_memory_of,
    summarize,
    time_ms,
    timed_call_s,
    wall_clock_ms,
)

__all__ = [
    "DTYPES", "device_name", "device_slug", "environment", "git_commit", "has_cuda", "matmul_provider", "nvidia_smi",
    "attention_flops", "matmul_flops", "cpu_note", "plot_scaling", "ratio_bars", "scaling_figure", "sizes_text",
    "speedup_figure", "COMPILE_BASELINES", "MAX_AUTOTUNE_SKIPPED", "Reference", "Skipped", "kernel_providers",
    "run_modes", "skipped", "MAX_ERR_NOTE", "RESULTS_ROOT", "cpu_columns_note", "err_text", "format_table",
    "out_dir_for", "sanity_notes", "speedup_text", "write_results", "NOT_SELECTED", "Row", "Session", "check_rows",
    "measure", "ratio_text", "record", "session", "speedups", "CPU_THREADS", "SHORT_OP_MS", "WARMUP_MS",
    "back_to_back_ms", "cpu_threads", "peak_memory_of", "summarize", "time_ms", "timed_call_s", "wall_clock_ms",
]
