"""`python -m gpt2_triton.bench --quick` runs every benchmark on CPU (interpreter) and writes complete outputs,
labelled by what ran, with blank rates and every row sanity-checked; the checks, the plots' log axis and
"not measured" marks, titles from the measured sizes, the warm-up; measure() and run_modes() behave as
bench/headline/ relies on."""
import json
import time

import pytest
import torch

from gpt2_triton.bench import attention
from gpt2_triton.bench.__main__ import BENCHES, main
from gpt2_triton.bench.common import (
    NOT_SELECTED,
    WARMUP_MS,
    Reference,
    Row,
    check_rows,
    format_table,
    has_cuda,
    matmul_provider,
    measure,
    ratio_text,
    run_modes,
    scaling_figure,
    session,
    sizes_text,
    speedup_figure,
    wall_clock_ms,
)


@pytest.mark.slow
def test_quick_bench_writes_complete_results(tmp_path, capsys):
    out = main(["--quick", "--out", str(tmp_path)])
    assert out == tmp_path
    printed = capsys.readouterr().out
    for name in BENCHES:
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert rows, name
        ours = [r for r in rows if r["provider"] == "triton"]
        assert ours and all(r["median_ms"] > 0 and r["error"] is None for r in ours), name
        for r in rows:
            assert r["env"]["torch"] and r["env"]["triton"] and r["env"]["device"].startswith("cpu")
            assert r["median_ms"] is not None or r["error"], r
            assert {"bench", "case", "provider", "mode", "shape", "dtype", "p20_ms", "p80_ms"} <= set(r)
            assert r["tflops"] is None and r["gbps"] is None and r["peak_mb"] is None  # meaningless on a CPU
            assert r["provider"] not in ("cublas", "hipblas")  # labelled by what ran
            if r["median_ms"] is not None:
                assert r["sanity"] is not None and r["extra"]["threads"] == 1, r  # checked; timed on one thread
                assert r["sanity"] == [] or f"{r['case']} | {r['mode']} | {r['provider']}: " in printed
        baselines = {r["provider"] for r in rows} - {"triton"}
        assert baselines, f"{name}: no baseline measured"
        md = (tmp_path / f"{name}.md").read_text()
        assert "not kernel performance" in md and "| triton |" in md and "are left blank" in md
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
        if name == "gelu_mlp":
            assert matmul_provider() in {r["provider"] for r in rows}
        if name == "e2e":
            assert {r["dtype"] for r in rows} == {"float32"}  # CPU steps run in fp32, not bf16 autocast
    assert (tmp_path / "attention_scaling.png").exists()
    assert "are left blank" in printed and "every row passed its sanity checks" in printed  # no timing order on CPU


def row(case="c", provider="eager", mode="fwd", ms=1.0, spread=0.1, **kw):
    return Row("b", case, provider, mode, {}, "float32", ms, ms - spread, ms + spread, **kw)


def test_sanity_checks_flag_a_fwd_bwd_faster_than_its_parts_and_a_rate_above_peak():
    rows = [row(mode="fwd", ms=28.0), row(mode="bwd", ms=0.3, spread=0.01), row(mode="fwd+bwd", ms=0.2, spread=0.01),
            row(provider="triton", mode="fwd", ms=1.0), row(provider="triton", mode="fwd+bwd", ms=0.95),  # noise
            row(provider="triton", mode="bwd", ms=0.5, tflops=2000.0),
            Row("b", "c", "sdpa-flash", "fwd", {}, "float32", None, error="not supported")]
    problems = check_rows(rows, peak_flops=989.5e12, timing_order=True)
    assert problems == [
        "c | fwd+bwd | eager: fwd+bwd (0.200 ms) is faster than fwd alone (28.000 ms)",
        "c | fwd+bwd | eager: fwd+bwd (0.200 ms) is faster than bwd alone (0.300 ms)",
        "c | bwd | triton: 2000 TFLOP/s is above the device's peak (990 TFLOP/s)"]
    assert [r.sanity for r in rows[3:5]] == [[], []] and rows[6].sanity is None  # within noise; not measured
    table = format_table(rows)  # a failure is printed, not hidden
    assert "FAILED" in table and "sanity check failed (3):" in table and problems[0] in table
    assert check_rows([row(mode="fwd"), row(mode="fwd+bwd", ms=2.5)], timing_order=True) == []
    assert check_rows(rows[:3], timing_order=False) == []  # a CPU's --quick timings: not performance


def test_speedup_plot_uses_a_log_axis_and_marks_what_was_not_measured():
    rows = [row(provider="triton", ms=300.0), row(provider="eager", ms=0.08),
            Row("b", "c", "sdpa-math", "fwd", {}, "float32", None, error="RuntimeError: no"),
            row(case="d", provider="triton", ms=1.0), row(case="d", provider="eager", ms=2.0)]
    ax = speedup_figure(rows, "b").axes[0]
    assert ax.get_yscale() == "log"
    bars = {round(p.get_y() + p.get_height(), 6) for p in ax.patches}  # bars start at 1x and end at the ratio
    assert bars == {round(0.08 / 300, 6), 2.0} and all(p.get_y() == 1 for p in ax.patches)
    texts = [t.get_text() for t in ax.texts]
    assert "not measured" in texts and "0.00027x" in texts and "2.00x" in texts
    assert ax.get_ylim()[0] < 0.08 / 300 and ax.get_ylim()[1] > 2.0
    assert ratio_text(0.08 / 300) == "0.00027" and ratio_text(1.234) == "1.23"


def test_plot_titles_name_the_sizes_measured():
    def rows_of(shapes):
        return [Row("attention", f"attention B{B}-H{H}-T{T}-D{D} causal", p, m, dict(B=B, H=H, T=T, D=D), "float32",
                    1.0 + T, 1.0, 2.0) for B, H, T, D in shapes for p in ("triton", "eager") for m in ("fwd", "bwd")]
    full_shapes = attention.shapes(quick=False)
    assert {(H, T) for B, H, T, D in full_shapes if H != 12} == {(16, 1024), (20, 1024), (25, 1024)}
    quick, full = rows_of(attention.shapes(quick=True)), rows_of([s for s in full_shapes if s[1] == 12])
    assert sizes_text(quick, ("B", "T")) == "B x T = 1 x 32, 1 x 64" and sizes_text(quick, ("H", "D")) == "H2 D16"
    assert sizes_text(full, ("B", "T")) == "B·T = 16,384" and sizes_text(full, ("H", "D")) == "H12 D64"
    fig = scaling_figure(quick, "T", "attention vs T", fallback=("median_ms", "median ms"))
    if not has_cuda():  # no TFLOP/s on a CPU: times, on a log axis
        assert [ax.get_ylabel() for ax in fig.axes] == ["median ms"] * 2 and fig.axes[0].get_yscale() == "log"
    assert [ax.get_title() for ax in fig.axes] == ["fwd", "bwd"]


def test_every_case_is_warmed_up_before_it_is_timed():
    calls = []
    wall_clock_ms(lambda: calls.append(time.perf_counter()), warmup=0, reps=3, warmup_ms=WARMUP_MS)
    assert len(calls) > 4 and calls[-3] - calls[0] >= 0.99 * WARMUP_MS / 1e3  # WARMUP_MS of untimed calls first
    threads = torch.get_num_threads()
    r = measure("b", "c", "p", "fwd", lambda: torch.ones(8).sum(), {}, "float32", flops=1e9, nbytes=1e9, quick=True)
    assert torch.get_num_threads() == threads  # restored after timing on one thread (CPU)
    if not has_cuda():
        assert r.extra["threads"] == 1 and r.tflops is None and r.gbps is None and matmul_provider() != "cublas"


def test_cpu_without_quick_refuses():
    with pytest.raises(SystemExit, match="only --quick"):
        main(["layer_norm"])


def test_session_hands_over_rows_selects_cases_and_stops_at_the_deadline():
    calls, got = [], []

    def fn():
        calls.append(1)

    def run(case):
        return measure("b", case, "p", "fwd", fn, {}, "float32", quick=True)

    with session(sink=got.append, select=lambda case, provider: case != "other" and provider == "p"):
        kept, other = run("case"), run("other")
    assert got == [kept] and kept.median_ms >= 0 and kept.extra["first_call_s"] >= 0 and calls
    assert other.error == NOT_SELECTED
    n_calls = len(calls)
    with session(sink=got.append, deadline=time.monotonic() - 1):
        late = run("case")
    assert late.error.startswith("skipped") and got[-1] is late and len(calls) == n_calls
    run("case")  # outside a session nothing is handed over
    assert len(got) == 2


def test_failing_provider_gives_an_error_row_to_the_sink():
    got = []
    with session(sink=got.append):
        row = measure("b", "case", "p", "fwd", lambda: 1 / 0, {}, "float32", quick=True)
    assert got == [row] and row.median_ms is None and row.error.startswith("ZeroDivisionError")


def test_run_modes_runs_nothing_until_called():
    x = torch.randn(4, 3, requires_grad=True)
    forwards = []

    def forward():
        forwards.append(1)
        return x * 2

    fns = run_modes(forward, [x], ("fwd", "bwd", "fwd+bwd"))
    assert list(fns) == ["fwd", "bwd", "fwd+bwd"] and not forwards
    fns["bwd"]()
    first = x.grad.clone()
    fns["bwd"]()  # backward of the same retained graph, same grad_out
    assert len(forwards) == 1 and torch.equal(x.grad, 2 * first)
    fns["fwd+bwd"]()
    fns["fwd"]()
    assert len(forwards) == 3



def test_document_tile_counts():
    """bench/varlen.py's tile counts on a hand-checked case: T=8, 4x4 tiles."""
    from gpt2_triton.bench.varlen import document_starts, tile_counts
    starts = torch.zeros(2, 8, dtype=torch.bool)
    starts[0, 4] = True  # row 0: documents [0, 4) and [4, 8): the second query tile skips key tile 0
    starts[1, 5] = True  # row 1: [0, 5) and [5, 8): the second query tile's first row still needs key tile 0
    # varlen: row 0 one tile per document; row 1: [0, 5) needs 1 + 2 tiles, [5, 8) one
    assert tile_counts(starts, 4, 4) == {"dense_causal": 6, "documents": 5, "varlen": 2 + 4}
    drawn = document_starts(4, 256, (3.0, 0.5), seed=1)
    assert drawn.shape == (4, 256) and 25 < int(drawn.sum()) < 75  # mean length exp(3 + 0.5**2 / 2) = 23


def test_varlen_bench_takes_out_like_the_others(tmp_path, monkeypatch, capsys):
    from gpt2_triton.bench import varlen
    row = Row("varlen", "varlen B1-T8", "triton", "fwd", {"B": 1, "T": 8}, "float32", 1.0, 0.9, 1.1)
    monkeypatch.setattr(varlen, "run", lambda dtype, quick=False: [row])
    assert varlen.main(["--quick", "--out", str(tmp_path / "out")]) == [row]
    saved = [json.loads(line) for line in (tmp_path / "out" / "varlen.jsonl").read_text().splitlines()]
    assert [(s["case"], s["median_ms"]) for s in saved] == [("varlen B1-T8", 1.0)]
    assert f"results in {tmp_path / 'out'}" in capsys.readouterr().out


def test_accumulation_times_each_micro_step_apart_from_the_optimizer_step():
    from gpt2_triton import GPT, GPTConfig
    from gpt2_triton.bench import e2e
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=512, pad_vocab_to=64), kernels="torch")
    optimizer = model.configure_optimizer(0.1, 6e-4)
    x, y = torch.randint(0, 512, (2, 32)), torch.randint(0, 512, (2, 32))
    before = [p.detach().clone() for p in model.parameters()]
    micro, opt, whole = e2e.accumulation_ms(model, optimizer, x, y, "cpu", grad_accum=3, reps=2, warmup=1)
    assert len(micro) == 6 and len(opt) == 2 and len(whole) == 2
    assert all(t > 0 for t in micro + opt)
    for i, total in enumerate(whole):  # the parts tile the step: micro-steps back to back, then the optimizer
        assert total == pytest.approx(sum(micro[3 * i:3 * i + 3]) + opt[i], rel=1e-3, abs=0.05)
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))  # the optimizer stepped
    assert all(not p._post_accumulate_grad_hooks for p in model.parameters())  # its hooks are gone
    text = e2e.accumulation_text([Row("e2e", "tiny", "eager-sdpa", "step", {}, "float32", 1.0, extra={
        "grad_accum": e2e._accumulation(model, optimizer, x, y, "cpu", 64, reps=3)})])
    assert "eager-sdpa: grad_accum 2 x 1 step(s): " in text and "ms per micro-step, optimizer step" in text


def test_max_err_checks_each_provider_against_the_fp32_reference_once_outside_the_timing():
    x = torch.randn(64, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).requires_grad_()
    ref = Reference(lambda x: 2 * x, [x])
    calls = []

    def wrong_grad():  # the right values, half the right gradient
        calls.append(1)
        return 2 * x.detach() + (x - x.detach())

    exact, shifted, bad_grad = ref.errors(lambda: 2 * x, [x]), ref.errors(lambda: 2 * x + 0.5, [x]), ref.errors(
        wrong_grad, [x])
    assert exact("fwd") == 0 and exact("bwd") == 0
    assert shifted("fwd") == pytest.approx(0.5) and shifted("fwd+bwd") == pytest.approx(0.5)
    grad_out = ref.result()[1]
    assert bad_grad("fwd") == 0 and bad_grad("bwd") == pytest.approx(float(grad_out.abs().max()))
    bad_grad("fwd+bwd")
    assert len(calls) == 2 and x.grad is None  # once per kind of row; the timed inputs' .grad untouched
    assert ref.result()[0].dtype == torch.float32  # the reference ran on fp32 copies
    half = torch.randn(64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    rounding = Reference(lambda t: t, [half.float()], grads=False).errors(lambda: half)("fwd")
    assert rounding == 0  # a bf16 output is compared in fp32

    row = measure("b", "c", "p", "fwd", lambda: 2 * x, {}, "float64", quick=True, memory=False, max_err=shifted)
    assert row.max_err == pytest.approx(0.5)
    failing = measure("b", "c", "p", "fwd", lambda: None, {}, "float64", quick=True, memory=False,
                      max_err=ref.errors(lambda: None))
    assert failing.max_err is None and "AttributeError" in failing.extra["max_err_failed"]
    asked = []
    with session(select=lambda case, provider: False):
        measure("b", "c", "p", "fwd", lambda: 2 * x, {}, "float64", quick=True, max_err=asked.append)
    assert asked == []  # a provider no row measures is not checked
    assert "max err" in format_table([row]) and "5.0e-01" in format_table([row])


def test_max_autotune_joins_the_compile_baselines_and_says_why_it_is_skipped(monkeypatch):
    from gpt2_triton.bench import common, e2e
    from gpt2_triton.bench import providers as providers_module
    providers = common.kernel_providers(torch.neg, torch.neg)
    assert "compile" not in providers  # CPU: no torch.compile baseline
    row = measure("b", "c", "compile-max-autotune", "fwd", lambda: providers["compile-max-autotune"](torch.ones(2)),
                  {}, "float32", quick=True, memory=False)
    assert row.median_ms is None and row.error == "Skipped: max-autotune runs on CUDA without --quick only"
    assert "not measured: Skipped: max-autotune runs on CUDA without --quick only" in format_table([row])
    (cpu_row,) = e2e.run(quick=True, stacks=["compile-max-autotune"])
    assert cpu_row.error == e2e.COMPILE_NEEDS_CUDA
    monkeypatch.setattr(providers_module, "has_cuda", lambda: True)  # a GPU: compiled, not with --quick
    with pytest.raises(common.Skipped, match="without --quick"):
        common.kernel_providers(torch.neg, torch.neg, quick=True)["compile-max-autotune"](torch.ones(2))
    full = common.kernel_providers(torch.neg, torch.neg)
    assert set(full) == {"triton", "eager", "compile", "compile-max-autotune"}
    assert "skipped" not in getattr(full["compile-max-autotune"], "__qualname__", "")
    monkeypatch.setattr(e2e, "has_cuda", lambda: True)
    monkeypatch.setattr(e2e, "device_peak_flops", lambda device: None)
    (quick_gpu_row,) = e2e.run(quick=True, stacks=["compile-max-autotune"])
    assert quick_gpu_row.error == e2e.MAX_AUTOTUNE_NEEDS_FULL


def test_headline_runs_the_max_autotune_baselines_in_their_own_job_only():
    from gpt2_triton.bench import headline
    jobs = headline.JOBS_BY_NAME
    assert jobs["max-autotune-baselines"].needs_cuda and jobs["compile-max-autotune"].needs_cuda
    assert jobs["max-autotune-baselines"].select("attention B16-H12-T1024-D64 causal", "compile-max-autotune")
    assert not jobs["max-autotune-baselines"].select("attention B16-H12-T1024-D64 causal", "compile")
    for name in ("attention", "layer_norm", "gelu_mlp", "compile-baselines"):
        assert not jobs[name].select("layer_norm M16384-N768", "compile-max-autotune"), name
