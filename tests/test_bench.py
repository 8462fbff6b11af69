"""`python -m gpt2_triton.bench --quick` runs every benchmark on CPU (interpreter) and writes complete outputs;
measure() and run_modes() behave as bench/headline.py relies on."""
import json
import time

import pytest
import torch

from gpt2_triton.bench.__main__ import BENCHES, main
from gpt2_triton.bench.common import NOT_SELECTED, measure, run_modes, session


@pytest.mark.slow
def test_quick_bench_writes_complete_results(tmp_path):
    out = main(["--quick", "--out", str(tmp_path)])
    assert out == tmp_path
    for name in BENCHES:
        rows = [json.loads(line) for line in (tmp_path / f"{name}.jsonl").read_text().splitlines()]
        assert rows, name
        ours = [r for r in rows if r["provider"] == "triton"]
        assert ours and all(r["median_ms"] > 0 and r["error"] is None for r in ours), name
        for r in rows:
            assert r["env"]["torch"] and r["env"]["triton"] and r["env"]["device"].startswith("cpu")
            assert r["median_ms"] is not None or r["error"], r
            assert {"bench", "case", "provider", "mode", "shape", "dtype", "p20_ms", "p80_ms"} <= set(r)
        baselines = {r["provider"] for r in rows} - {"triton"}
        assert baselines, f"{name}: no baseline measured"
        md = (tmp_path / f"{name}.md").read_text()
        assert "not kernel performance" in md and "| triton |" in md
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    assert (tmp_path / "attention_scaling.png").exists()


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
