"""gpt2_triton.bench.generate --quick: tokens/s rows for both kernel sets, with and without the KV cache,
written where every bench writes by default (bench/results/<device> under the current folder)."""
import json

import pytest

from gpt2_triton.bench.common import device_slug
from gpt2_triton.bench.generate import main


@pytest.mark.slow
def test_quick_generate_bench_writes_rows(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rows = main(["--quick"])
    assert {(r.extra.get("kernels"), r.provider) for r in rows} == {
        (k, p) for k in ("torch", "triton") for p in ("kv-cache", "recompute")}
    for r in rows:
        assert r.error is None and r.median_ms > 0 and r.extra["tokens_per_s"] > 0, r
        assert r.shape["new_tokens"] == 4 and r.mode == "generate"
    out = tmp_path / "bench" / "results" / device_slug()
    saved = [json.loads(line) for line in (out / "generate.jsonl").read_text().splitlines()]
    assert len(saved) == 4 and all(s["env"]["device"].startswith("cpu") for s in saved)
    assert (out / "generate.md").is_file() and (out / "generate.png").is_file()
    printed = capsys.readouterr().out
    assert "tokens/s" in printed and f"results in {out.relative_to(tmp_path)}" in printed


def test_each_row_is_printed_as_it_is_measured(tmp_path, capsys, monkeypatch):
    """Piped output shows progress per row (each line flushed), before the closing table."""
    from gpt2_triton.bench import generate
    printed = []
    monkeypatch.setattr(generate, "wall_clock_ms", lambda fn, warmup, reps: (printed.append(capsys.readouterr().out)
                                                                              or (2.0, 1.9, 2.1)))
    rows = main(["--quick", "--out", str(tmp_path)])
    assert len(rows) == 4 and len(printed) == 4
    out = "".join(printed[1:]) + capsys.readouterr().out
    progress = [line for line in out.splitlines() if line.endswith("ms, 2,000.0 tokens/s")]
    assert progress[:4] == [f"{r.case} | {r.provider}: 2.0 ms, 2,000.0 tokens/s" for r in rows]
    assert out.index(progress[3]) < out.index("results in")
