"""`python -m bench --quick` runs every benchmark on CPU (interpreter) and writes complete outputs."""
import json

import pytest

from bench.__main__ import BENCHES, main


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
