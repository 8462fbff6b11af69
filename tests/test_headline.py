"""`python -m gpt2_triton.bench headline`: every stage writes rows or a stated skip reason, on CPU through the
interpreter, so the GPU path cannot rot unseen; the budget, the job time cap, the marker-chosen pytest
stage, the preflight, and the summary a GPU run gets (goal verdicts, fallbacks, compile and tuning cost)
are checked here too."""
import json
import os
import subprocess
import sys
import time

import pytest

from gpt2_triton.bench import common, headline
from gpt2_triton.bench import preflight as headline_preflight
from gpt2_triton.bench.__main__ import main as bench_main
from gpt2_triton.bench.common import Row

GPU_ENV = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
           "driver": "580.1", "git_commit": "abc1234", "date": "2026-01-01", "budget_s": 420.0, "quick": False,
           "max_configs": 4, "pytest_max_configs": 1, "dtype": "bfloat16", "sm_count": 132, "memory_gib": 79.2,
           "hbm_bandwidth_gbps": 3350.0, "nvidia_smi": {"clocks.sm": "1980", "clocks.max.sm": "1980"},
           "autotuners": {"mlp._matmul": 10}}


def _records(path):
    return [json.loads(line) for line in (path / headline.RESULTS).read_text().splitlines()]


@pytest.mark.slow
def test_quick_headline_every_stage_writes_rows_or_a_skip_reason(tmp_path):
    out = bench_main(["headline", "--quick", "--out", str(tmp_path), "--budget-s", "2000"])  # ample: a loaded CI
    assert out == tmp_path
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(headline.OUTPUTS)  # few files, one folder
    env = json.loads((tmp_path / headline.ENV).read_text())
    assert env["device"].startswith("cpu") and env["torch"] and env["triton"] and env["autotuners"]
    records = _records(tmp_path)
    jobs = {r["job"]: r for r in records if r["kind"] == "job"}
    assert set(jobs) == {job.name for job in headline.JOBS}
    for job in headline.JOBS:
        event = jobs[job.name]
        if job.needs_cuda:
            assert event["event"] == "skipped" and "CUDA" in event["reason"], event
        else:
            assert event["event"] == "done", event
    rows = [r for r in records if r["kind"] == "row"]
    for job in (j for j in headline.JOBS if j.stage == "kernels" and not j.needs_cuda):
        mine = [r for r in rows if r["job"] == job.name]
        ours = [r for r in mine if r["provider"] == "triton"]
        assert {r["mode"] for r in ours} == {"fwd", "bwd", "fwd+bwd"}, job.name
        assert all(r["median_ms"] > 0 and r["extra"]["first_call_s"] > 0 for r in ours), job.name
        assert any(r["provider"] != "triton" and r["median_ms"] for r in mine), f"{job.name}: no baseline"
    assert not any(r["case"].startswith("linear_gelu") for r in rows)  # gelu_mlp job selects its cases
    for stack in ("eager-sdpa", "triton"):
        (row,) = [r for r in rows if r["job"] == stack]
        assert row["extra"]["tokens_per_s"] > 0 and row["extra"]["first_step_s"] > 0
    assert not any(r["case"].startswith("attention-qkv") for r in rows if r["job"] == "attention-T2048")
    tests = [r for r in records if r["kind"] == "test" and r["when"] != "collect"]
    (collected,) = [r["tests"] for r in records if r["kind"] == "collected"]
    assert collected and {t["test"] for t in tests} == set(collected)
    assert all(t["outcome"] == "skipped" and "CUDA" in t["message"] for t in tests)  # no GPU here
    preflight = [r for r in records if r["kind"] == "preflight"]
    assert {r["item"] for r in preflight} == {item.name for item in headline_preflight.ITEMS}
    assert all(r["ok"] for r in preflight), preflight
    (precompiled,) = [r for r in records if r["kind"] == "precompile"]
    assert precompiled["compiled"] == 1 and precompiled["specs"] > 20 and not precompiled["failed"]
    summary = (tmp_path / headline.SUMMARY).read_text()
    assert "CPU run" in summary and "## Goals" in summary and "## Preflight" in summary
    for goal in headline.GOALS:
        assert goal.text in summary
    assert f"{len(collected)} `gpu` tests collected: 0 passed, 0 failed, {len(collected)} skipped, 0 not run" \
        in summary
    assert not headline.strict_problems(records)
    for png in (headline.KERNELS_PNG, headline.E2E_PNG):
        assert (tmp_path / png).stat().st_size > 1000


def test_tiny_budget_skips_every_job_with_the_reason(tmp_path):
    headline.main(["--quick", "--out", str(tmp_path), "--budget-s", "1"])
    jobs = [r for r in _records(tmp_path) if r["kind"] == "job"]
    assert len(jobs) == len(headline.JOBS)
    for r in jobs:
        assert r["event"] == "skipped" and ("budget" in r["reason"] or "CUDA" in r["reason"]), r
    summary = (tmp_path / headline.SUMMARY).read_text()
    assert "skipped: budget" in summary and "not measured" in summary


def test_stages_option_runs_only_what_is_asked(tmp_path):
    headline.main(["--quick", "--out", str(tmp_path), "--budget-s", "1", "--stages", "e2e"])
    records = _records(tmp_path)
    assert {r["stage"] for r in records if r["kind"] == "stage" and r["event"] == "skip"} == \
        {"preflight", "pytest", "kernels"}
    assert {r["stage"] for r in records if r["kind"] == "job"} == {"e2e"}


def test_a_job_past_its_time_cap_is_killed(tmp_path):
    args = headline.parse_args(["--quick", "--out", str(tmp_path)])
    event, reason = headline.launch(headline.JOBS_BY_NAME["attention"], 0.5, args, tmp_path)
    assert event == "killed" and "time cap" in reason
    assert "kernels/attention" in (tmp_path / headline.RUN_LOG).read_text()


def test_pytest_job_runs_gpt2_sized_tests_first_and_stops_at_its_deadline(tmp_path):
    subprocess.run([sys.executable, "-m", "gpt2_triton.bench.headline", "--job", "pytest", "--out", str(tmp_path),
                    "--deadline", "0", "--quick"], cwd=headline.ROOT, check=True, capture_output=True)
    records = [r for r in _records(tmp_path) if not (r["kind"] == "test" and r["when"] == "collect")]
    assert [r["kind"] for r in records] == ["collected", "test", "pytest-stop", "pytest-exit"]
    collected, test, _, exit_ = records
    assert len(collected["tests"]) > 1 and "gpt2_size" in test["test"]  # one test, then the cap
    assert exit_["rc"] == pytest.ExitCode.INTERRUPTED
    assert "(the time cap was reached)" in headline.pytest_text(records)


def test_cpu_without_interpreter_and_quick_refuses(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1 and --quick"):
        headline.main(["--out", "unused"])


# --- the pytest job ------------------------------------------------------------------------------
_BROKEN = """import pytest
import gpt2_triton.no_such_module  # a test module that cannot import

@pytest.mark.gpu
def test_never_collected():
    pass
"""
_NEEDS_MISSING = """import pytest
import no_such_dist_xyz  # a declared dependency this machine lacks

@pytest.mark.gpu
def test_skipped_whole():
    pass
"""
_GOOD = """import pytest

@pytest.mark.gpu
def test_gpu_one():
    pass

def test_not_gpu():
    pass
"""


def _test_folder(tmp_path):
    """A checkout with tests/ (the real conftest) whose pyproject declares one dependency that is missing."""
    repo = tmp_path / "repo"
    (repo / "tests").mkdir(parents=True)
    (repo / "pyproject.toml").write_text('[project]\nname = "x"\ndependencies = ["torch", "no-such-dist-xyz>=1"]\n'
                                         '[tool.pytest.ini_options]\nmarkers = ["gpu: needs a GPU"]\n')
    (repo / "tests" / "conftest.py").write_text((headline.ROOT / "tests" / "conftest.py").read_text())
    for name, text in (("test_broken.py", _BROKEN), ("test_needs_missing.py", _NEEDS_MISSING), ("test_good.py", _GOOD)):
        (repo / "tests" / name).write_text(text)
    return repo / "tests"


def test_pytest_job_chooses_gpu_tests_by_marker_and_reports_a_broken_module(tmp_path):
    """Every test file is collected and the `gpu` marker picks the tests; a module that does not import is
    a failure with its error (collection goes on past it, no time-out), one that needs a missing declared
    dependency is skipped with that reason."""
    tests = _test_folder(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    subprocess.run([sys.executable, "-m", "gpt2_triton.bench.headline", "--job", "pytest", "--out", str(out),
                    "--deadline", str(time.time() + 600), "--quick", "--tests", str(tests)],
                   cwd=headline.ROOT, check=True, capture_output=True)
    records = _records(out)
    (collected,) = [r["tests"] for r in records if r["kind"] == "collected"]
    assert [t.split("::")[-1] for t in collected] == ["test_gpu_one"]
    by_test = {r["test"].split("/")[-1]: r for r in records if r["kind"] == "test"}
    broken = by_test["test_broken.py"]
    assert (broken["outcome"], broken["when"]) == ("failed", "collect")
    assert "No module named 'gpt2_triton.no_such_module'" in broken["message"]
    missing = by_test["test_needs_missing.py"]
    assert missing["outcome"] == "skipped" and "needs no_such_dist_xyz" in missing["message"]
    text = headline.pytest_text(records)
    assert "1 `gpu` tests collected" in text and "1 test module did not import" in text
    assert "FAILED `tests/test_broken.py` (collect): " in text and "no_such_module" in text
    assert "Test modules skipped whole: `tests/test_needs_missing.py` (" in text
    assert "time cap" not in text
    problems = headline.strict_problems(records + [{"kind": "job", "job": "pytest", "event": "done", "reason": ""}])
    assert len(problems) == 1 and "test_broken.py" in problems[0]


def test_find_autotuners_scans_the_kernels_package():
    from gpt2_triton.kernels.autotune import Tuner
    tuners = headline.find_autotuners()
    assert {"attention.dense._flash_attention_fwd", "attention.dense._flash_attention_bwd_dkdv",
            "attention.dense._flash_attention_bwd_dq", "attention.varlen._varlen_fwd", "mlp._matmul",
            "loss._linear_cross_entropy_lse"} <= set(tuners)
    assert all(isinstance(t, Tuner) for t in tuners.values())


# --- the summary a GPU run gets ------------------------------------------------------------------
def _row(job, case, provider, mode, ms, peak=None, tflops=None, gbps=None, extra=None, stage="kernels"):
    row = Row(case.split()[0], case, provider, mode, {}, "bfloat16", ms, ms, ms, tflops=tflops, gbps=gbps,
              peak_mb=peak, extra=extra or {"first_call_s": 1.5})
    return {"kind": "row", "stage": stage, "job": job, **headline.row_record(row)}


def _gpu_records():
    attn, ln, ce = "attention B16-H12-T1024-D64 causal", "layer_norm M16384-N768", "cross_entropy M16384-V50304"
    lce = "linear_cross_entropy M16384-C768-V50257"
    step = "gpt2-124m train step B16-T1024"
    records = [
        {**_row("attention", attn, "triton", "fwd", 0.8, peak=10, tflops=250.0), "max_err": 0.0021},
        _row("attention", attn, "sdpa-flash", "fwd", 1.0, peak=10),
        _row("attention", attn, "sdpa-math", "fwd", 5.0, peak=800),
        {**_row("attention", attn, "compile", "fwd", 0.5, peak=10, extra={"first_call_s": 20.0}), "max_err": 0.0039},
        _row("attention", attn, "triton", "fwd+bwd", 2.5, peak=50),
        _row("attention", attn, "sdpa-cudnn", "fwd+bwd", 2.0, peak=50),
        _row("layer_norm", ln, "triton", "fwd+bwd", 0.1, peak=60, gbps=2900.0),
        _row("layer_norm", ln, "compile", "fwd+bwd", 0.12, peak=60),
        _row("cross_entropy", ce, "triton", "fwd+bwd", 1.0, peak=1600),
        _row("cross_entropy", ce, "eager", "fwd+bwd", 3.0, peak=8000),
        _row("linear_cross_entropy", lce, "triton", "fwd+bwd", 5.0, peak=400),
        {"kind": "job", "stage": "kernels", "job": "gelu_mlp", "event": "killed", "reason": "time cap: stopped",
         "allowance_s": 30.0, "elapsed_s": 30.0},
        _row("compile-sdpa", step, "compile-sdpa", "step", 40.0, peak=30000, stage="e2e",
             extra={"tokens_per_s": 400000, "mfu": 0.45, "first_step_s": 50.0, "compile_s": 49.9}),
        _row("triton-compile", step, "triton-compile", "step", 36.0, peak=25000, stage="e2e",
             extra={"tokens_per_s": 440000, "mfu": 0.5, "first_step_s": 60.0, "compile_s": 59.9}),
    ]
    records.append({**_row("linear_cross_entropy", lce, "eager", "fwd+bwd", None, stage="kernels"),
                    "error": "OutOfMemoryError: CUDA out of memory"})
    return records


def test_summary_judges_each_goal_from_gpu_rows(tmp_path):
    headline.write_summary(tmp_path, _gpu_records(), GPU_ENV)
    lines = (tmp_path / headline.SUMMARY).read_text().splitlines()

    def verdict(goal_text, case=""):
        (line,) = [row for row in lines if row.startswith(f"| {goal_text} | {case}")]
        return line.rsplit("|", 2)[-2].strip()

    assert verdict("attention fwd ≥ 1.0× the fastest SDPA backend") == "**met**"  # 1.0/0.8, compile not SDPA
    assert verdict("attention fwd ≥ 300 TFLOP/s") == "missed by 17%"
    assert verdict("attention fwd+bwd ≥ 1.0× the fastest SDPA backend") == "missed by 20%"
    assert verdict("layer_norm fwd+bwd ≥ 1.0× torch.compile") == "**met**"
    assert verdict("layer_norm fwd+bwd ≥ 80% of HBM bandwidth") == "**met**"  # 2900 / 3350 = 87%
    assert verdict("cross_entropy fwd+bwd ≥ 2× eager") == "**met**"
    assert verdict("cross_entropy fwd+bwd ≥ 4× less peak memory than eager") == "**met**"
    assert verdict("linear_cross_entropy fwd+bwd time ≤ 1.0× lm_head + eager CE") == "not measured"
    assert verdict("gelu_mlp fwd+bwd ≥ 1.0× torch.compile of the eager MLP") == "not measured"
    assert verdict("e2e ours compiled ≥ 1.05× compile+SDPA tokens/s") == "**met**"  # 1.10x
    text = "\n".join(lines)
    assert "OutOfMemoryError" in text and "killed: time cap" in text
    assert "attention B16-H12-T1024-D64 causal 20 s" in text  # the compile baseline's compile time, apart
    assert ("| attention B16-H12-T1024-D64 causal | fwd | 0.800 | 250.0 | – | 10.0 | 2.1e-03 | compile | 0.500 | "
            "3.9e-03 |") in text  # ours' and the fastest baseline's max error against the fp32 reference
    assert "| compile-sdpa | gpt2-124m train step B16-T1024 | 40.0 (40.0-40.0) | 400,000 | 45.0% |" in text


def _first_contact_records():
    """What a GPU run's preflight, jobs and e2e write about compiling, tuning and fallbacks."""
    tma_error = "CompilationError: make_tensor_descriptor unsupported"
    return [
        {"kind": "precompile", "stage": "preflight", "job": "precompile", "triton": "3.6.0", "specs": 111,
         "compiled": 109, "failed": {"attn_fwd-bf16-D64-causal-128x64-w4s3": tma_error}, "not_reached": 2,
         "workers": 16, "compile_s": 180.0, "launcher_s": 20.0, "trace_s": 4.0, "wall_s": 21.0,
         "target": ["cuda", 90, 32]},
        {"kind": "toolchain", "stage": "preflight", "job": "preflight", "cc": "/usr/bin/gcc",
         "python_h": "/usr/include/python3.12/Python.h", "ok": True, "error": ""},
        {"kind": "preflight", "stage": "preflight", "job": "preflight", "item": "attention fwd+bwd", "path": "TMA",
         "feature": "tma", "dtype": "bfloat16", "ok": False, "skipped": "", "rel_err": None, "error": tma_error,
         "seconds": 1.2},
        {"kind": "preflight", "stage": "preflight", "job": "preflight", "item": "attention fwd+bwd",
         "path": "pointer loads", "feature": None, "dtype": "bfloat16", "ok": True, "skipped": "", "rel_err": 3e-3,
         "error": "", "seconds": 0.8},
        {"kind": "fallback", "stage": "kernels", "job": "gelu_mlp", "feature": "split_k",
         "reason": "RuntimeError: CUDA error: misaligned address"},
        {"kind": "autotune", "stage": "kernels", "job": "gelu_mlp", "kernel": "_matmul_kernel", "key": "(16384,)",
         "candidates": 10, "tried": 4, "cached": False, "compile_s": 0.4, "bench_s": 0.9,
         "best": "BLOCK_M: 128, BLOCK_N: 256", "timings_ms": {}},
        {"kind": "autotune", "stage": "e2e", "job": "triton", "kernel": "_matmul_kernel", "key": "(16384,)",
         "candidates": 10, "tried": 0, "cached": True, "compile_s": 0.0, "bench_s": 0.0,
         "best": "BLOCK_M: 128, BLOCK_N: 256", "timings_ms": {}},
        {"kind": "compile-cost", "stage": "kernels", "job": "gelu_mlp", "kernels": {"_matmul_kernel": {
            "compiles": 6, "compile_s": 0.5, "tunings": 1, "cached_tunings": 0, "configs_tried": 4, "tune_s": 0.9}}},
    ]


def test_summary_gives_the_accumulation_per_micro_step_and_the_optimizer_step_apart(tmp_path):
    step = "gpt2-124m train step B16-T1024"
    accum = {"micro_steps": 4, "steps": 6, "micro_step_ms": [30.5, 30.1, 31.0], "optimizer_step_ms": [2.25, 2.0, 2.5],
             "step_ms": [124.0, 123.0, 125.0], "tokens_per_s": 528516}
    records = _gpu_records() + [_row("triton", step, "triton", "step", 32.0, stage="e2e",
                                     extra={"tokens_per_s": 512000, "mfu": 0.45, "grad_accum": accum})]
    headline.write_summary(tmp_path, records, GPU_ENV)
    text = (tmp_path / headline.SUMMARY).read_text()
    assert "### Gradient accumulation: `train_step` at grad_accum > 1" in text
    assert (f"| triton | {step} | 4 x 6 | 30.50 (30.10-31.00) | 2.25 (2.00-2.50) | 124.0 | 528,516 |") in text
    assert "| compile-sdpa | | no accumulation timing in the row |" in text  # a row without it says so
    assert "| eager-sdpa | | not run yet |" in text


def test_summary_sets_predicted_beside_measured_kernels(tmp_path):
    """A GPU run's profiled e2e step against the static prediction: ours by kernel name, cuBLAS by its names."""
    from gpt2_triton.bench.static import predict
    table = [{"name": "_matmul_kernel", "count": 72, "total_us": 9000.0},
             {"name": "sm90_xmma_gemm_bf16bf16_bf16f32_f32_tn_n_tilesize128x128x64", "count": 61, "total_us": 7000.0},
             {"name": "nvjet_tst_128x256_64x4_1x2_h_bz_coopA_TNT", "count": 1, "total_us": 100.0},
             {"name": "void at::native::vectorized_elementwise_kernel<4>", "count": 40, "total_us": 2000.0}]
    step = "gpt2-124m train step B16-T1024"
    records = _gpu_records() + [
        {**_row("triton", step, "triton", "step", 30.0, stage="e2e",
                extra={"tokens_per_s": 540000, "mfu": 0.47, "kernel_table": table}), "shape": {"B": 16, "T": 1024}}]
    headline.write_summary(tmp_path, records, GPU_ENV)
    text = (tmp_path / headline.SUMMARY).read_text()
    assert "## Predicted vs measured per kernel (one training step)" in text
    predicted = predict.step_kernel_times("triton", 16, "H100")
    count, us = predicted["_matmul_kernel"]
    assert f"| triton | _matmul_kernel | {count} | {us:,.0f} | 72 | 9,000 | {9000 / us:.2f} |" in text
    gemm_count, gemm_us = predicted["GEMM (cuBLAS)"]
    assert f"| triton | GEMM (cuBLAS) | {gemm_count} | {gemm_us:,.0f} | 62 | 7,100 |" in text
    assert "| eager-sdpa | – (no profiled step) |" in text
    headline.write_summary(tmp_path, records, {**GPU_ENV, "device": "cpu"})
    assert "nothing to compare" in (tmp_path / headline.SUMMARY).read_text()


def test_summary_says_what_first_contact_cost_and_which_fallbacks_ran(tmp_path):
    records = _first_contact_records()
    headline.write_summary(tmp_path, records, GPU_ENV)
    text = (tmp_path / headline.SUMMARY).read_text()
    assert "109 of 111 kernel specs compiled by 16 processes in 21 s" in text and "2 not reached" in text
    assert "| attention fwd+bwd | TMA | bfloat16 | **fails**: CompilationError" in text
    assert "| attention fwd+bwd | pointer loads | bfloat16 | works (rel. error 3.0e-03) |" in text
    assert "fallback taken: **tma**" in text and "fallback taken: **split_k**" in text
    assert "| gelu_mlp | _matmul_kernel | 6 | 0.5 | 1 (0) | 4 | 0.9 |" in text
    assert "| triton | _matmul_kernel | `(16384,)` | persisted result |" in text
    assert headline.preflight_failures(records) == {"tma": "CompilationError: make_tensor_descriptor unsupported"}
    assert [p.split(":")[0] for p in headline.strict_problems(records)] == ["preflight attention fwd+bwd (TMA)"]


def test_summary_lists_failed_sanity_checks(tmp_path):
    headline.write_summary(tmp_path, _gpu_records(), GPU_ENV)
    assert "## Sanity checks\n\nEvery measured row passed" in (tmp_path / headline.SUMMARY).read_text()
    attn = "attention B16-H12-T1024-D64 causal"
    records = _gpu_records() + [_row("attention", attn, "sdpa-flash", "fwd+bwd", 0.2)]  # faster than its fwd alone
    headline.write_summary(tmp_path, records, GPU_ENV)
    assert (f"- FAILED {attn} | fwd+bwd | sdpa-flash: fwd+bwd (0.200 ms) is faster than fwd alone (1.000 ms)"
            in (tmp_path / headline.SUMMARY).read_text())


def test_plots_from_gpu_rows(tmp_path):
    headline.write_plots(tmp_path, _gpu_records(), GPU_ENV)
    for png in (headline.KERNELS_PNG, headline.E2E_PNG):
        assert (tmp_path / png).stat().st_size > 1000


def test_pytest_summary_counts_failures_and_tests_cut_by_the_cap():
    records = [
        {"kind": "collected", "stage": "pytest", "job": "pytest", "tests": ["t::a", "t::b", "t::c"]},
        {"kind": "test", "stage": "pytest", "job": "pytest", "test": "t::a", "outcome": "passed", "when": "call",
         "duration_s": 1.0, "message": ""},
        {"kind": "test", "stage": "pytest", "job": "pytest", "test": "t::b", "outcome": "failed", "when": "call",
         "duration_s": 1.0, "message": "E   AssertionError: max abs err 0.5"},
        {"kind": "job", "stage": "pytest", "job": "pytest", "event": "killed", "reason": "time cap: stopped",
         "allowance_s": 60.0, "elapsed_s": 60.0},
    ]
    text = headline.pytest_text(records)
    assert text.startswith("3 `gpu` tests collected: 1 passed, 1 failed, 0 skipped, 1 not run (killed: time cap")
    assert "FAILED `t::b`" in text and "max abs err 0.5" in text


def _fake_nvidia_smi(tmp_path, monkeypatch, script):
    fake = tmp_path / "nvidia-smi"
    fake.write_text("#!/bin/sh\n" + script + "\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")


def test_nvidia_smi_fields_it_cannot_read_are_left_out(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch, 'echo "NVIDIA H100 80GB HBM3, 580.1, [N/A]"')
    assert common.nvidia_smi(("name", "driver_version", "clocks.sm")) == {
        "name": "NVIDIA H100 80GB HBM3", "driver_version": "580.1"}


def test_nvidia_smi_asks_one_field_at_a_time_when_a_field_is_unknown(tmp_path, monkeypatch):
    _fake_nvidia_smi(tmp_path, monkeypatch,
                     'case "$3" in *,*) exit 2;; *=clocks.sm) echo 1980;; *=name) echo H100;; *) exit 2;; esac')
    assert common.nvidia_smi(("name", "clocks.sm", "no.such.field")) == {"name": "H100", "clocks.sm": "1980"}
