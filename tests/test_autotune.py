"""kernels/autotune.py: the static rule and first-contact bound on what a launch tries, persisted tuning (a
second process tunes nothing), and the tuning records. The autotuner benchmarks only on a GPU; here a
toy kernel with several configs runs through the interpreter with a fake benchmark (the autotuner's own
do_bench hook)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from gpt2_triton.kernels.autotune import (
    FIRST_CONTACT_CONFIGS,
    Candidates,
    Tuner,
    accounting,
    max_configs,
    static_rule,
)
from gpt2_triton.kernels.utils import override_target

ROOT = Path(__file__).resolve().parent.parent


def _spec(smem=None):
    return Candidates(names=("BLOCK",), tiles=lambda: [(256, 4, 3), (128, 4, 3), (64, 4, 3), (32, 4, 3)],
                      variants=((),), variant_of=None, interpreter_tile=(32, 4, 1), extra={}, smem=smem)


def _blocks(configs):
    return [c.kwargs["BLOCK"] for c in configs]


def test_static_rule_drops_what_does_not_fit_or_leaves_sms_idle():
    spec = _spec(smem=lambda config, args: config.kwargs["BLOCK"] * 1024)
    args = {"x_ptr": torch.empty(1000)}
    grid = lambda meta: (triton.cdiv(1000, meta["BLOCK"]),)  # noqa: E731
    with override_target(smem_per_block=200 * 1024, sm_count=10):
        # 256: 256 KB of shared memory > 200 KB; 128: 8 programs for 10 SMs while 64 and 32 fill them
        assert _blocks(static_rule(spec, spec.gpu_configs(), args, grid)) == [64, 32]
    with override_target(smem_per_block=200 * 1024, sm_count=100):  # none fills the SMs: all that fit stay
        assert _blocks(static_rule(spec, spec.gpu_configs(), args, grid)) == [128, 64, 32]
    with override_target(smem_per_block=1024):  # nothing fits: the hand-picked one stays (its launch says why)
        assert _blocks(static_rule(spec, spec.gpu_configs(), args, grid)) == [256]
    # no device limits known (the interpreter on CPU): the rule drops nothing
    assert _blocks(static_rule(spec, spec.gpu_configs(), args, grid)) == [256, 128, 64, 32]


def test_first_contact_bound():
    assert max_configs() == FIRST_CONTACT_CONFIGS
    with override_target(max_configs=4):
        assert max_configs() == 4


@triton.jit
def _add_one(x_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < N) + 1, mask=offs < N)


def _toy_tuner(timings):
    """A Tuner over BLOCK 16 / 32 / 64 whose benchmark returns `timings` (ms) in order, calling the kernel."""
    calls = []

    def fake_bench(kernel_call, quantiles):
        kernel_call()
        calls.append(1)
        return [timings[len(calls) - 1]] * 3
    tuner = Tuner(_add_one, [triton.Config({"BLOCK": b}) for b in (16, 32, 64)], key=["N"], do_bench=fake_bench)
    return tuner, calls


def test_tuning_tries_the_first_contact_configs_and_records_it(tmp_path):
    tuner, calls = _toy_tuner([2.0, 1.0, 0.5])
    x = torch.zeros(100)
    with override_target(tuning_dir=str(tmp_path)), accounting() as acct:
        tuner[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, 100)
        tuner[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, 100)  # same key: no new tuning
    assert len(calls) == FIRST_CONTACT_CONFIGS == 2  # 64 (the fastest) is not among the first two
    assert tuner.best_config.kwargs["BLOCK"] == 32 and (x == 4).all()  # 2 benchmark calls + 2 launches
    (tuning,) = acct.tunings
    assert (tuning.kernel, tuning.candidates, tuning.tried, tuning.cached) == ("_add_one", 3, 2, False)
    assert tuning.best.startswith("BLOCK: 32") and len(tuning.timings_ms) == 2
    assert acct.per_kernel()["_add_one"]["configs_tried"] == 2
    assert len(list(tmp_path.glob("_add_one-*.json"))) == 1


def test_tuning_off_the_store_and_without_bound(tmp_path):
    tuner, calls = _toy_tuner([2.0, 1.0, 0.5])
    with override_target(tuning_dir="", max_configs=0):  # no store; every admitted candidate
        tuner[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](torch.zeros(100), 100)
    assert len(calls) == 3 and tuner.best_config.kwargs["BLOCK"] == 64


_SCRIPT = """
import json, sys
import torch, triton, triton.language as tl
from gpt2_triton.kernels.autotune import Tuner, accounting
from gpt2_triton.kernels.utils import override_target

calls = []

def fake_bench(kernel_call, quantiles):
    kernel_call()
    calls.append(1)
    return [3.0 - len(calls)] * 3  # each candidate measures faster than the one before

@triton.jit
def add_one(x_ptr, N, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=offs < N) + 1, mask=offs < N)

tuner = Tuner(add_one, [triton.Config({"BLOCK": b}) for b in (16, 32, 64)], key=["N"], do_bench=fake_bench)
x = torch.zeros(100)
with override_target(tuning_dir=sys.argv[1], max_configs=3), accounting() as acct:
    tuner[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, 100)
print(json.dumps({"benchmarked": len(calls), "best": tuner.best_config.kwargs["BLOCK"],
                  "tunings": [[t.tried, t.cached] for t in acct.tunings]}))
"""


def test_a_second_process_tunes_nothing(tmp_path):
    """The first process benchmarks 3 candidates and persists the fastest (the last); a new process with
    the same kernel source and key uses it without benchmarking."""
    script, store = tmp_path / "toy_kernel.py", tmp_path / "tuning"
    script.write_text(textwrap.dedent(_SCRIPT))
    env = dict(os.environ, TRITON_INTERPRET="1",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))

    def run():
        out = subprocess.run([sys.executable, str(script), str(store)], env=env, capture_output=True, text=True,
                             timeout=300)
        assert out.returncode == 0, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1])
    assert run() == {"benchmarked": 3, "best": 64, "tunings": [[3, False]]}
    assert run() == {"benchmarked": 0, "best": 64, "tunings": [[0, True]]}
    (entry,) = store.glob("add_one-*.json")
    record = json.loads(entry.read_text())
    assert record["config"]["kwargs"] == {"BLOCK": 64} and len(record["timings_ms"]) == 3
    assert record["identity"][-2:] == [torch.__version__, triton.__version__]


def test_a_persisted_config_the_static_rule_no_longer_admits_is_retuned(tmp_path):
    tuner, calls = _toy_tuner([2.0, 1.0, 0.5, 2.0, 1.0])
    with override_target(tuning_dir=str(tmp_path), max_configs=3):
        tuner[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](torch.zeros(100), 100)
    assert tuner.best_config.kwargs["BLOCK"] == 64
    fresh, calls = _toy_tuner([2.0, 1.0])
    fresh.configs = fresh.configs[:2]  # the candidates changed: 64 is no longer one
    with override_target(tuning_dir=str(tmp_path)):
        fresh[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](torch.zeros(100), 100)
    assert len(calls) == 2 and fresh.best_config.kwargs["BLOCK"] == 32


@pytest.mark.parametrize("module, name", [("gpt2_triton.kernels.mlp", "_matmul"),
                                          ("gpt2_triton.kernels.attention.dense", "_flash_attention_fwd"),
                                          ("gpt2_triton.kernels.loss", "_linear_cross_entropy_lse")])
def test_kernels_tune_through_the_tuner(module, name):
    import importlib
    assert isinstance(getattr(importlib.import_module(module), name), Tuner)


def test_the_arch_limits_the_static_rule():
    """A forced architecture brings its own per-program limit (devices.ARCHS), the smaller of it and the
    target's: gfx942's 64 KB LDS drops what an H100's 227 KB admits."""
    spec = _spec(smem=lambda config, args: config.kwargs["BLOCK"] * 512)
    args = {"x_ptr": torch.empty(1000)}
    with override_target(smem_per_block=232448, arch="gfx942"):
        assert _blocks(static_rule(spec, spec.gpu_configs(), args, None)) == [128, 64, 32]
    with override_target(smem_per_block=232448, arch="sm_90"):
        assert _blocks(static_rule(spec, spec.gpu_configs(), args, None)) == [256, 128, 64, 32]


def _first_tiles(tuner, variant, arch):
    from gpt2_triton.kernels.autotune import candidates_of
    return candidates_of(tuner).tiles_for(variant, arch)[0]


@pytest.mark.parametrize("arch", [None, "sm_90", "sm_100", "gfx942", "gfx950"])
def test_per_arch_first_candidates(arch):
    """Each architecture's hand-picked tiles (what its launches try first): NVIDIA's are sm_90's (an H100's
    static profile is unchanged by the table); AMD's matmul fits gfx942's 64 KB LDS at 2 stages and its
    dK/dV is the tile that compiles without scratch there (bench/results/static/targets)."""
    from gpt2_triton.devices import ARCHS
    from gpt2_triton.kernels.attention import dense, varlen
    from gpt2_triton.kernels.mlp import _matmul
    bf16 = (torch.float16,)
    amd = arch is not None and ARCHS[arch].vendor == "amd"
    matmul = _first_tiles(_matmul, bf16, arch)
    dkdv = _first_tiles(dense._flash_attention_bwd_dkdv, (64, torch.float16), arch)
    if amd:
        bm, bn, bk, _, stages = matmul
        assert (stages - 1) * (bm + bn) * bk * 2 <= ARCHS["gfx942"].smem_per_block
        assert dkdv == (16, 128, 8, 2) == _first_tiles(varlen._varlen_bwd_dkdv, (64, torch.float16), arch)
    else:
        assert matmul == (128, 256, 64, 8, 3)
        assert dkdv == (32, 128, 8, 5, 128)
        assert _first_tiles(varlen._varlen_bwd_dkdv, (64, torch.float16), arch) == (32, 128, 8, 3)
    assert _first_tiles(_matmul, (torch.float32,), arch) == (128, 128, 64, 8, 3)


def test_gpu_configs_hold_every_arch_tiles_sm90_first():
    """The configs a GPU holds: every architecture's tiles, sm_90's first in their own order (prune then
    picks the launch's architecture's)."""
    from gpt2_triton.kernels.autotune import candidates_of
    from gpt2_triton.kernels.mlp import _matmul
    spec = candidates_of(_matmul)
    tiles = [spec.tile(c) for c in spec.gpu_configs()]
    sm90 = list(dict.fromkeys(spec.tiles_for((torch.float16,), None) + spec.tiles_for((torch.float32,), None)))
    assert tiles[:len(sm90)] == sm90
    assert set(spec.tiles_for((torch.float16,), "gfx942")) <= set(tiles)
