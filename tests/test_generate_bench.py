"""gpt2_triton.bench.generate --quick: tokens/s rows for both kernel sets, with and without the KV cache."""
import json

import pytest

from gpt2_triton.bench.generate import main


@pytest.mark.slow
def test_quick_generate_bench_writes_rows(tmp_path, capsys):
    rows = main(["--quick", "--out", str(tmp_path)])
    assert {(r.extra.get("kernels"), r.provider) for r in rows} == {
        (k, p) for k in ("torch", "triton") for p in ("kv-cache", "recompute")}
    for r in rows:
        assert r.error is None and r.median_ms > 0 and r.extra["tokens_per_s"] > 0, r
        assert r.shape["new_tokens"] == 4 and r.mode == "generate"
    saved = [json.loads(line) for line in (tmp_path / "generate.jsonl").read_text().splitlines()]
    assert len(saved) == 4 and all(s["env"]["device"].startswith("cpu") for s in saved)
    assert "tokens/s" in capsys.readouterr().out
