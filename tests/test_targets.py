"""Gates of the four-target static profile (`python -m gpt2_triton.bench.static.targets`,
bench/results/static/targets/static_targets.json): the first (hand-picked) candidate of every launch of
the static profile's cases, compiled on the CPU for sm_90a (H100/H200), sm_100a (B200), gfx942 (MI300X)
and gfx950 (MI355X). Each target's launches are traced for its own architecture (its tiles,
paths and limits: bench/static/targets.py). Gates, per target, on the committed profile:
- every case compiled;
- no spills: NVIDIA ptxas spill stores, AMD scratch bytes and VGPR / SGPR spill counts all 0;
- every bf16 dot on the target's MMA (wgmma on sm_90a, tcgen05 on sm_100a, MFMA on gfx9xx);
- the launch fits the target (shared memory / LDS within the per-SM / per-CU limit: occupancy >= 1);
except the cases in EXCEPTIONS, each with the reason (what the profile measured and why). An exception
that no longer holds fails too (remove it). Live: the cheapest cases of LIVE_CASES are compiled here for
every target and must give the committed numbers exactly (registers / VGPRs / SGPRs, spills, smem / LDS,
MMA instructions, loop lengths), so a triton or kernel change that moves them fails a named test; a
triton newer than the profile's fails them (regenerate the profile), an older one (the CI leg with the
minimum triton) skips them with that reason.

    python -m pytest tests/test_targets.py -q
    python -m gpt2_triton.bench.static.targets --out bench/results/static/targets
"""
import json
from pathlib import Path

import pytest

from gpt2_triton.bench.static import targets

PROFILE_PATH = Path(__file__).resolve().parent.parent / "bench/results/static/targets/static_targets.json"
PROFILE = json.loads(PROFILE_PATH.read_text())

_SGPR = "SGPR spills to VGPR lanes (v_writelane / v_readlane, no scratch memory: scratch 0 B) at the 106-SGPR " \
        "maximum of the varlen forward with documents (its per-sequence and per-document scalars); the tile " \
        "does not change the scalar count"

# {target: {case: {gate: reason}}}, gate in compile | spills | mma | fit.
EXCEPTIONS = {
    "sm_90a": {},
    "sm_100a": {
        "varlen_bwd_dq-bf16-D64-causal-128x32-w8s3": {
            "spills": "8 B of spill stores at 64 registers (ptxas for sm_100a; sm_90a: 0)"},
        "cross_entropy_fwd-bf16-grad#2": {
            "spills": "4 B of spill stores at 64 registers (ptxas for sm_100a; sm_90a: 0)"},
    },
    "gfx942": {
        "varlen_fwd-bf16-D64-causal-docs-128x64-w4s3": {"spills": _SGPR + " (35)"},
    },
    "gfx950": {
        "varlen_fwd-bf16-D64-causal-docs-128x64-w4s3": {"spills": _SGPR + " (32)"},
    },
}

# Compiled live for every target (under 2 s each here): three row kernels and one bf16 matmul.
LIVE_CASES = ("embedding_fwd-fp32", "layer_norm_fwd-fp32", "gelu_bwd-bf16",
              "matmul-bf16-none-nobias-NT-128x256x64-w8s3")
# The numbers a live compile must reproduce exactly.
LIVE_FIELDS = {"cuda": ("regs", "spill_stores", "shared", "tmem", "mma_instructions"),
               "hip": ("vgprs", "agprs", "sgprs", "vgpr_spills", "sgpr_spills", "scratch", "lds", "mma_instructions")}


def _gate_failures(name: str, r: dict) -> dict:
    """{gate: what the profile measured} for each gate this result fails."""
    if not r["ok"]:
        return {"compile": r["error"]}
    out = {}
    if r["spill_bytes"] or r["spills"]:
        out["spills"] = f"{r['spill_bytes']} B, {r['spills']} spill(s)"
    if r["bf16_dots_off_mma"]:
        kinds = sorted({d["kind"] for d in r["dots"] if d["kind"] != targets.TARGETS[name]["mma"]})
        out["mma"] = f"{r['bf16_dots_off_mma']} of {r['bf16_dots']} bf16 dots on {kinds}"
    if r["occupancy"] is None or r["occupancy"]["value"] < 1:
        out["fit"] = f"occupancy {r['occupancy']}"
    return out


@pytest.mark.parametrize("name", list(targets.TARGETS))
def test_profile_gates(name):
    """Every case of the committed profile passes every gate on `name`, or is an exception with its
    reason; every exception still fails its gate."""
    assert name in PROFILE["targets"], f"the committed profile has no {name}"
    failing, stale = [], []
    for row in PROFILE["cases"]:
        found = _gate_failures(name, row["targets"][name])
        excused = EXCEPTIONS[name].get(row["id"], {})
        failing += [f"{row['id']}: {gate}: {what}" for gate, what in found.items() if gate not in excused]
        stale += [f"{row['id']}: {gate}" for gate in excused if gate not in found]
    assert not failing, f"{name}: gates failed (fix, or add to EXCEPTIONS with the reason):\n  " + "\n  ".join(failing)
    assert not stale, f"{name}: exceptions that no longer hold (remove them):\n  " + "\n  ".join(stale)


def test_profile_covers_the_cases():
    """The committed profile has every first-candidate case of today's trace, on every target, and the
    exceptions and live cases name existing cases."""
    from gpt2_triton.bench.static import cases
    ids = [c.id for c in cases.gpt2_cases(16) if c.first_candidate]
    profiled = {row["id"] for row in PROFILE["cases"]}
    assert profiled == set(ids), f"regenerate the profile: missing {sorted(set(ids) - profiled)}, " \
                                 f"gone {sorted(profiled - set(ids))}"
    assert all(set(row["targets"]) == set(targets.TARGETS) for row in PROFILE["cases"])
    assert all(row["targets"]["sm_90a"]["case"] == row["id"] for row in PROFILE["cases"])
    for row in PROFILE["cases"]:  # every target's launch was found in its own trace, and is the same launch
        for name, r in row["targets"].items():
            assert r["case"] is not None, (name, row["id"])
            assert targets.launch_key(r["case"]) == targets.launch_key(row["id"]) or \
                (r.get("same_specialization") and "-C" in row["id"]), (name, row["id"])  # a larger width's launch
    named = {case for per in EXCEPTIONS.values() for case in per} | set(LIVE_CASES)
    assert named <= set(ids), sorted(named - set(ids))


def test_markdown_renders_every_target():
    md = targets.markdown(PROFILE)
    for name, t in targets.TARGETS.items():
        assert f"## {name} ({t['gpu']})" in md
    assert md.count("FAILED:") == sum(not r["targets"][n]["ok"] for r in PROFILE["cases"] for n in targets.TARGETS)


# ----------------------------------------------------------------------------------------------
# Live compiles against the committed numbers
# ----------------------------------------------------------------------------------------------
def _version(v: str) -> tuple:
    return tuple(int(x) for x in v.split(".")[:3] if x.isdigit())


@pytest.fixture(scope="module")
def live():
    triton = pytest.importorskip("triton")
    pytest.importorskip("triton.backends.nvidia.compiler", reason="triton's NVIDIA backend is not installed")
    pytest.importorskip("triton.backends.amd.compiler", reason="triton's AMD backend is not installed")
    from gpt2_triton.bench.static import cases
    from gpt2_triton.bench.static.native import ptxas_path
    if ptxas_path() is None:
        pytest.skip("triton's ptxas not found: cannot compile for NVIDIA targets")
    committed = PROFILE["env"]["triton"]
    if _version(triton.__version__) < _version(committed):
        pytest.skip(f"the committed profile is triton {committed}; this is triton {triton.__version__} (older)")
    assert triton.__version__ == committed, \
        f"triton {triton.__version__} is newer than the profile's {committed}: regenerate the profile"
    chosen = [c for c in cases.gpt2_cases(16) if c.first_candidate and c.id in LIVE_CASES]
    rows = {row["id"]: row for row in PROFILE["cases"]}
    per_target = {}
    for name in targets.TARGETS:  # a target whose launcher picks another tile is traced for it
        if all(rows[c.id]["targets"][name]["case"] == c.id for c in chosen):
            per_target[name] = chosen
        else:
            per_target[name] = list(targets.matched(chosen, targets.target_cases(16, name)).values())
    results = targets.compile_all(targets.target_specs(per_target), jobs=1, log=lambda *a: None)
    return {(r["target_name"], r["id"]): targets.summarize(r, r["target_name"]) for r in results}


@pytest.mark.parametrize("name", list(targets.TARGETS))
@pytest.mark.parametrize("case", LIVE_CASES)
def test_live_compile_matches_profile(live, name, case):
    want = next(row for row in PROFILE["cases"] if row["id"] == case)["targets"][name]
    got = live[(name, want["case"])]
    assert got["ok"], f"{case} on {name}: {got['error']}"
    fields = LIVE_FIELDS[targets.TARGETS[name]["target"][0]]
    assert got[fields[0]] is not None and got[fields[0]] > 0, f"{case} on {name}: no register count read"
    diff = {f: (got.get(f), want.get(f)) for f in fields if got.get(f) != want.get(f)}
    loops = ([lp["instructions"] for lp in got["loops"]], [lp["instructions"] for lp in want["loops"]])
    if loops[0] != loops[1]:
        diff["loop instructions"] = loops
    if [d["kind"] for d in got["dots"]] != [d["kind"] for d in want["dots"]]:
        diff["dots"] = (got["dots"], want["dots"])
    assert not diff, f"{case} on {name} (live, committed): {diff}; regenerate the profile if this is intended"


# ----------------------------------------------------------------------------------------------
# The readers of the code
# ----------------------------------------------------------------------------------------------
AMDGCN = """
_k:
\ts_load_dwordx2 s[0:1], s[4:5], 0x0
\t.loc\t1 20 3 prologue_end                 ; k.py:20:3
\ts_cbranch_scc1 .LBB0_3
.LBB0_1:
\t.loc\t2 43 12 is_stmt 0               ; standard.py:43:12 @[ k.py:31:9 ]
\tglobal_load_dwordx4 v[0:3], v[4:5], off
\tds_read_b128 v[6:9], v10
\tv_mfma_f32_32x32x8_bf16 v[16:31], v[0:1], v[6:7], v[16:31]
\ts_waitcnt vmcnt(0)
\ts_cmp_lg_u32 s2, s3
\ts_cbranch_scc1 .LBB0_1
\ts_branch .LBB0_4
.LBB0_2:
\tv_mov_b32_e32 v0, 0
\ts_branch .LBB0_4
.LBB0_3:
\tv_mov_b32_e32 v1, 0
\ts_cbranch_scc1 .LBB0_2
.LBB0_4:
\ts_endpgm
\t.amdgpu_metadata
amdhsa.kernels:
  - .agpr_count:     4
    .group_segment_fixed_size: 0
    .private_segment_fixed_size: 16
    .sgpr_count:     30
    .sgpr_spill_count: 0
    .vgpr_count:     40
    .vgpr_spill_count: 2
\t.end_amdgpu_metadata
"""


def test_amd_loops_are_cycles():
    """A backward branch is a loop only where its target reaches it again: .LBB0_3 -> .LBB0_2 is an
    if/else arm placed before its condition (it exits to .LBB0_4), not a loop."""
    instrs = targets.parse_amdgcn(AMDGCN)
    (loop,) = targets.amd_loops(instrs)
    assert loop["instructions"] == 6 and loop["site"] == "k.py:31" and loop["nested"] == 0
    assert loop["classes"] == {"global": 1, "lds": 1, "mfma": 1, "sync": 1, "salu": 2}


def test_amd_metadata_and_mma():
    meta = targets.amd_metadata(AMDGCN)
    assert meta == {"vgprs": 40, "arch_vgprs": None, "agprs": 4, "sgprs": 30, "vgpr_spills": 2,
                    "sgpr_spills": 0, "scratch": 16, "lds_static": 0}
    assert targets.mma_instructions(AMDGCN, "hip") == {"v_mfma_f32_32x32x8_bf16": 1}
    ptx = "\t@%p1 tcgen05.mma.cta_group::1.kind::f16 [%r1], %rd2, %rd3, %r4, %p2;\n" \
          "\twgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 {%f1}, %rd1, %rd2, p, 1, 1, 0, 1;\n"
    assert targets.mma_instructions(ptx, "cuda") == {"tcgen05.mma.cta_group::1.kind::f16": 1,
                                                     "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16": 1}


def test_dot_ops_kinds():
    ttgir = """#mma = #ttg.amd_mfma<{version = 3, instrShape = [32, 32, 8]}>
#blocked = #ttg.blocked<{sizePerThread = [1, 1]}>
    %a = tt.dot %x, %y, %z, inputPrecision = tf32 : tensor<128x64xbf16, #ttg.dot_op<{opIdx = 0, parent = #mma}>> * tensor<64x256xbf16, #ttg.dot_op<{opIdx = 1, parent = #mma}>> -> tensor<128x256xf32, #mma>
    %b = tt.dot %x, %y, %z : tensor<16x16xf32, #ttg.dot_op<{opIdx = 0, parent = #blocked}>> * tensor<16x16xf32, #ttg.dot_op<{opIdx = 1, parent = #blocked}>> -> tensor<16x16xf32, #blocked>
    ttng.tc_gen5_mma %a, %b, %acc, %f, %t : !ttg.memdesc<128x64xbf16, #shared1, #smem>, !ttg.memdesc<64x256xbf16, #shared2, #smem>, !ttg.memdesc<128x256xf32, #tmem, #ttng.tensor_memory, mutable>
"""  # noqa: E501
    assert [(d["kind"], d["dtype"]) for d in targets.dot_ops(ttgir)] == \
        [("tcgen05", "bf16"), ("mfma", "bf16"), ("fma", "f32")]
    assert targets.dot_ops(ttgir)[0]["shape"] == "128x256x64"


def test_occupancy_rules():
    """gfx942: 96 KB of LDS does not fit 64 KB; gfx950: 166 VGPRs (168 allocated) give 3 waves per SIMD,
    2 in whole 8-wave workgroups; sm_100a: 256 of 512 tensor-memory columns allow 2 CTAs."""
    amd = {"num_warps": 8, "vgprs": 166, "sgprs": 30, "lds": 98304}
    assert targets.occupancy(amd, targets.TARGETS["gfx942"]) == {"value": 0, "unit": "waves/SIMD", "limiter": "lds"}
    assert targets.occupancy(amd, targets.TARGETS["gfx950"]) == {"value": 2, "unit": "waves/SIMD", "limiter": "vgprs"}
    nv = {"num_warps": 4, "regs": 96, "shared": 66560, "tmem": 256}
    assert targets.occupancy(nv, targets.TARGETS["sm_100a"]) == {"value": 2, "unit": "CTAs/SM", "limiter": "tmem"}


def test_dead_worker_is_a_failed_case_and_is_replaced():
    """A compile that kills its worker is recorded as that case's failure; the next case gets a new worker."""
    import os
    import signal
    specs = [{"id": "crash", "target_name": "gfx942"}, {"id": "next", "target_name": "gfx942"}]
    started = []
    real_run = targets._Worker.run

    def run(self, spec):
        started.append(self.proc.pid)
        if spec["id"] == "crash":
            os.kill(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        return real_run(self, spec)
    targets._Worker.run = run
    try:
        results = {r["id"]: r for r in targets.compile_all(specs, jobs=1, log=lambda *a: None)}
    finally:
        targets._Worker.run = real_run
    assert not results["crash"]["ok"] and "compile worker died" in results["crash"]["error"]
    assert not results["next"]["ok"] and "KeyError" in results["next"]["error"]  # the spec has no kernel: it ran
    assert len(set(started)) == 2


# ----------------------------------------------------------------------------------------------
# The per-architecture paths, chosen at launch (utils.target_paths), forced per target
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch, precision, tma", [("sm_90", "tf32", True), ("sm_100", "tf32", True),
                                                  ("gfx942", "tf32", False), ("gfx950", "ieee", False),
                                                  (None, "tf32", True)])
def test_paths_per_arch(arch, precision, tma):
    """bf16 dots ask for tf32 only where the architecture's triton takes it (gfx950 does not), fp32 always
    for ieee; attention reads through TMA descriptors only where a TMA unit reads them (NVIDIA); an
    unknown architecture (None: CPU, sm_80) picks as sm_90 does."""
    import torch

    from gpt2_triton.kernels.attention.core import input_precision, use_tma
    from gpt2_triton.kernels.utils import override_target, target_paths
    with override_target(arch=arch):
        assert input_precision(torch.bfloat16) == precision
        assert input_precision(torch.float32) == "ieee"
        assert use_tma(torch.bfloat16) is tma and use_tma(torch.float32) is False
        assert target_paths() == {"arch": arch, "known": arch is not None, "bf16_input_precision": precision,
                                  "attention_tma": tma}
