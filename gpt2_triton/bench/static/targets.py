"""The static profile on four GPU targets: the first (hand-picked) candidate of every launch of the
profile's cases (`cases.gpt2_launches`), traced for each target's own architecture (override_target(arch=,
sm_count=, smem_per_block=) from devices.ARCHS: its tiles, its paths, its static rule; sm_90a's trace is
the sm_90 profile's) and compiled on this CPU for sm_90a (H100/H200), sm_100a (B200), gfx942 (MI300X) and
gfx950 (MI355X) with the installed triton.

    python -m gpt2_triton.bench.static.targets --out DIR [--only TEXT] [--jobs N] [--target NAME]

Writes DIR/static_targets.json and DIR/static_targets.md. A row is one launch of the sm_90a trace; the
other targets' launches are matched to it by kernel, variant and order (the case id without its tile),
and each target's cell names the case (tile) that target's launcher picked.

Method, per case and target (`analyze`, in a worker process with its own Triton cache folder; a worker
that dies is restarted and the case is recorded as failed):
- compile: `native.compile_spec` with spec["target"] = GPUTarget(...): the whole pipeline to a cubin
  (ptxas included) or an hsaco (LLVM's AMDGPU backend and lld, in the triton wheel); no GPU, no driver.
- NVIDIA registers / spills: the compile's own `ptxas -v` log (TRITON_DUMP_PTXAS_LOG=1), else
  `native.ptxas_usage` on its PTX; loops: `native.parse_sass` / `native.find_loops` on nvdisasm's SASS.
- AMD registers / scratch / LDS: the code object metadata in the amdgcn text (.vgpr_count, which on
  gfx90a and later is the unified count, arch VGPRs + AGPRs; .agpr_count; .sgpr_count;
  .vgpr_spill_count / .sgpr_spill_count; .private_segment_fixed_size = scratch bytes per lane;
  .group_segment_fixed_size = static LDS) plus Triton's dynamic LDS (metadata.shared). Loops: a
  backward s_branch / s_cbranch_* to an earlier label (`amd_loops`).
- dots: the TTGIR ops (ttng.tc_gen5_mma = tcgen05, ttng.warp_group_dot = wgmma, tt.dot under an
  nvidia_mma v2 layout = mma.sync, under an amd_mfma layout = MFMA, else FMA), each with its operand
  dtype; the MMA instructions by opcode and shape from the PTX (tcgen05.mma / wgmma.mma_async /
  mma.sync) or the amdgcn (v_mfma_*).
- occupancy (`occupancy`): CTAs per SM from registers, shared memory, warps and (sm_100) tensor
  memory columns; waves per SIMD from VGPRs, SGPRs, LDS and the 8-wave cap, for the limits in TARGETS.
"""
import argparse
import collections
import contextlib
import datetime
import io
import json
import math
import os
import platform
import re
import select
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

from gpt2_triton.devices import ARCHS, SM90_LIMITS, arch_gpu

COMPILE_TIMEOUT_S = 600

# Per-target limits used for occupancy, each with its source.
TARGETS = {
    "sm_90a": {
        "arch": "sm_90", "gpu": "H100 / H200", "target": ["cuda", 90, 32], "mma": "wgmma", **SM90_LIMITS,
        "source": "CUDA C++ Programming Guide, compute capability 9.0 table (devices.SM90_LIMITS)",
    },
    "sm_100a": {
        "arch": "sm_100", "gpu": "B200", "target": ["cuda", 100, 32], "mma": "tcgen05",
        "regs_per_sm": 65536, "reg_alloc_unit": 256, "smem_per_sm": 233472, "smem_per_block": 232448,
        "smem_reserved_per_block": 1024, "max_warps_per_sm": 64, "max_ctas_per_sm": 32, "tmem_columns": 512,
        "source": "CUDA C++ Programming Guide, compute capability 10.0 table (64K registers, 228 KB shared "
                  "memory per SM, 227 KB per block, 64 warps, 32 blocks); PTX ISA tcgen05: 512 tensor memory "
                  "columns per SM",
    },
    "gfx942": {
        "arch": "gfx942", "gpu": "MI300X", "target": ["hip", "gfx942", 64], "mma": "mfma",
        "vgprs_per_simd_lane": 512, "vgpr_granule": 8, "sgprs_per_simd": 800, "sgpr_granule": 16,
        "max_waves_per_simd": 8, "simds_per_cu": 4, "lds_per_cu": 65536,
        "source": "AMD CDNA3 ISA guide and LLVM AMDGPUUsage (unified 512-entry VGPR/AGPR file per lane of "
                  "a SIMD, allocated in granules of 8; 800 SGPRs per SIMD; at most 8 waves per SIMD; 4 SIMDs "
                  "per CU); MI300X datasheet: 64 KB LDS per CU",
    },
    "gfx950": {
        "arch": "gfx950", "gpu": "MI355X", "target": ["hip", "gfx950", 64], "mma": "mfma",
        "vgprs_per_simd_lane": 512, "vgpr_granule": 8, "sgprs_per_simd": 800, "sgpr_granule": 16,
        "max_waves_per_simd": 8, "simds_per_cu": 4, "lds_per_cu": 163840,
        "source": "AMD CDNA4 ISA guide (register file, waves and SIMDs as CDNA3); CDNA4 white paper / "
                  "MI355X datasheet: 160 KB LDS per CU",
    },
}


# ----------------------------------------------------------------------------------------------
# What the code says (pure text functions)
# ----------------------------------------------------------------------------------------------
_LAYOUT_ALIAS = re.compile(r"^(#[\w.]+)\s*=\s*(#[\w.]+)<", re.M)
_TT_DOT = re.compile(r"=\s*tt\.dot\s[^\n]*?:\s*tensor<[\dx]+x(\w+?),[^\n]*?->\s*tensor<[\dx]+x\w+,\s*(#[\w.]+)")
_TCGEN5 = re.compile(r"ttng\.tc_gen5_mma\s[^\n]*?:\s*!ttg\.memdesc<(\d+)x(\d+)x(\w+?),[^\n]*?"
                     r"!ttg\.memdesc<\d+x(\d+)x\w+?,")
_WGMMA = re.compile(r"=\s*ttng\.warp_group_dot\s[^\n]*?:\s*(?:tensor|!ttg\.memdesc)<[\dx]+x(\w+?),")


def dot_ops(ttgir: str) -> list:
    """[{op, kind, dtype}] for every dot in the TTGIR: kind tcgen05 | wgmma | mma.sync | mfma | fma;
    dtype: the A operand's element type (bf16, f32, ...)."""
    layouts = {m.group(1): m.group(2) for m in _LAYOUT_ALIAS.finditer(ttgir)}
    out = []
    for m in _TCGEN5.finditer(ttgir):
        out.append({"op": "ttng.tc_gen5_mma", "kind": "tcgen05", "dtype": m.group(3),
                    "shape": f"{m.group(1)}x{m.group(4)}x{m.group(2)}"})
    for m in _WGMMA.finditer(ttgir):
        out.append({"op": "ttng.warp_group_dot", "kind": "wgmma", "dtype": m.group(1)})
    for m in _TT_DOT.finditer(ttgir):
        layout = layouts.get(m.group(2), "")
        if "amd_mfma" in layout:
            kind = "mfma"
        elif "nvidia_mma" in layout:
            kind = "mma.sync"
        else:
            kind = "fma"
        out.append({"op": "tt.dot", "kind": kind, "dtype": m.group(1)})
    return out


def mma_instructions(text: str, backend: str) -> dict:
    """{opcode with shape: count} of the MMA instructions in the PTX (NVIDIA) or amdgcn (AMD) text."""
    if backend == "hip":
        pattern = r"^\s*(v_mfma_\w+)"
    else:
        pattern = r"^\s*(?:@!?%p\d+\s+)?((?:tcgen05\.mma|wgmma\.mma_async|mma\.sync)[\w.:]*)"
    return dict(collections.Counter(re.findall(pattern, text, re.M)).most_common())


def amd_metadata(amdgcn: str) -> dict:
    """Registers, spills, scratch and static LDS from the code object metadata of the amdgcn text."""
    meta = amdgcn[amdgcn.find(".amdgpu_metadata"):]

    def field(name):
        m = re.search(rf"^[\s-]*\.{name}:\s+(\d+)", meta, re.M)
        return int(m.group(1)) if m else None
    arch = re.search(r"^\s*\.set\s+\S+\.num_vgpr,\s*(\d+)", amdgcn, re.M)
    return {"vgprs": field("vgpr_count"), "arch_vgprs": int(arch.group(1)) if arch else None,
            "agprs": field("agpr_count"), "sgprs": field("sgpr_count"),
            "vgpr_spills": field("vgpr_spill_count"), "sgpr_spills": field("sgpr_spill_count"),
            "scratch": field("private_segment_fixed_size"), "lds_static": field("group_segment_fixed_size")}


_AMD_LABEL = re.compile(r"^(\.LBB\d+_\d+):")
_AMD_INSTR = re.compile(r"^\s+([a-z][a-z0-9_]*)\b(.*)$")
_AMD_LOC = re.compile(r"([\w.]+):(\d+):\d+")


def _amd_class(op: str) -> str:
    if op.startswith("v_mfma"):
        return "mfma"
    if op.startswith("ds_"):
        return "lds"
    if op.startswith(("global_", "buffer_", "flat_")):
        return "global"
    if op == "s_waitcnt" or op in ("s_barrier", "s_sleep"):
        return "sync"
    if op.startswith("v_"):
        return "valu"
    return "salu" if op.startswith("s_") else "other"


def parse_amdgcn(text: str) -> list:
    """The kernel's instructions in order: [{index, op, target (label), site ("file:line" of the
    outermost .loc call site)}]; labels map to the index of the next instruction."""
    instrs, labels, pending, site = [], {}, [], None
    for line in text.split(".amdgpu_metadata")[0].splitlines():
        if line.lstrip().startswith(".loc"):  # ".loc ... ; file:line:col @[ call site file:line:col ]"
            found = _AMD_LOC.findall(line.partition(";")[2])
            if found and found[-1][1] != "0":
                site = f"{found[-1][0]}:{found[-1][1]}"
            continue
        m = _AMD_LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _AMD_INSTR.match(line)
        if not m or line.lstrip().startswith((".", ";")):
            continue
        op, rest = m.group(1), m.group(2)
        for lab in pending:
            labels[lab] = len(instrs)
        pending = []
        target = re.search(r"(\.LBB\d+_\d+)", rest) if op.startswith(("s_branch", "s_cbranch")) else None
        instrs.append({"index": len(instrs), "op": op, "target": target.group(1) if target else None, "site": site})
    for ins in instrs:
        ins["target_index"] = labels.get(ins["target"]) if ins["target"] else None
    return instrs


def _successors(ins: dict, n: int) -> list:
    if ins["op"] == "s_endpgm":
        return []
    if ins["op"] == "s_branch":
        return [ins["target_index"]] if ins["target_index"] is not None else []
    nxt = [ins["index"] + 1] if ins["index"] + 1 < n else []
    return nxt + ([ins["target_index"]] if ins["target_index"] is not None else [])


def _reaches(instrs: list, start: int, goal: int) -> bool:
    seen, todo = set(), [start]
    while todo:
        i = todo.pop()
        if i == goal:
            return True
        if i in seen:
            continue
        seen.add(i)
        todo += _successors(instrs[i], len(instrs))
    return False


def amd_loops(instrs: list) -> list:
    """Outermost loops in program order: [{start, end, instructions, site, nested, branches, classes}]:
    the range from the target of a backward branch to that branch, where the target reaches the branch
    again (a cycle of the control flow; LLVM also places if/else arms so that a forward-only path
    jumps back to an earlier label)."""
    back = [(i["target_index"], i["index"]) for i in instrs
            if i["target_index"] is not None and i["target_index"] <= i["index"]
            and _reaches(instrs, i["target_index"], i["index"])]
    outer = [r for r in back if not any(o != r and o[0] <= r[0] and r[1] <= o[1] for o in back)]
    loops = []
    for start, end in sorted(set(outer)):
        body = instrs[start:end + 1]
        classes = collections.Counter(_amd_class(i["op"]) for i in body)
        loops.append({"start": start, "end": end, "instructions": len(body), "site": body[-1]["site"],
                      "nested": sum(1 for r in back if r != (start, end) and start <= r[0] and r[1] <= end),
                      "branches": sum(1 for i in body if i["target"] and i["index"] != end),
                      "classes": dict(classes.most_common())})
    return loops


def occupancy(res: dict, limits: dict):
    """NVIDIA: resident CTAs per SM (0: does not fit); AMD: resident waves per SIMD (0: does not fit).
    {value, unit, limiter} or None when a count is missing."""
    warps = res["num_warps"]
    if "regs_per_sm" in limits:
        regs, shared = res.get("regs"), res.get("shared")
        if regs is None or shared is None:
            return None
        if shared > limits["smem_per_block"]:
            return {"value": 0, "unit": "CTAs/SM", "limiter": "smem"}
        regs_per_warp = math.ceil(max(regs, 1) * 32 / limits["reg_alloc_unit"]) * limits["reg_alloc_unit"]
        by = {"regs": (limits["regs_per_sm"] // regs_per_warp) // warps,
              "smem": limits["smem_per_sm"] // (shared + limits["smem_reserved_per_block"]),
              "warps": limits["max_warps_per_sm"] // warps, "ctas": limits["max_ctas_per_sm"]}
        if limits.get("tmem_columns") and res.get("tmem"):
            by["tmem"] = limits["tmem_columns"] // res["tmem"]
        unit = "CTAs/SM"
    else:
        vgprs, sgprs, lds = res.get("vgprs"), res.get("sgprs"), res.get("lds")
        if vgprs is None or lds is None:
            return None
        if lds > limits["lds_per_cu"]:
            return {"value": 0, "unit": "waves/SIMD", "limiter": "lds"}
        waves_per_group = math.ceil(warps / limits["simds_per_cu"])  # a workgroup's waves on its SIMDs
        alloc_v = math.ceil(max(vgprs, 1) / limits["vgpr_granule"]) * limits["vgpr_granule"]
        alloc_s = math.ceil(max(sgprs or 1, 1) / limits["sgpr_granule"]) * limits["sgpr_granule"]
        groups_by_lds = limits["lds_per_cu"] // lds if lds else None
        by = {"vgprs": limits["vgprs_per_simd_lane"] // alloc_v, "sgprs": limits["sgprs_per_simd"] // alloc_s,
              "waves": limits["max_waves_per_simd"]}
        if groups_by_lds is not None:
            by["lds"] = (groups_by_lds * warps) // limits["simds_per_cu"]
        by = {k: v // waves_per_group * waves_per_group for k, v in by.items()}  # whole workgroups
        unit = "waves/SIMD"
    limiter = min(by, key=by.get)
    return {"value": by[limiter], "unit": unit, "limiter": limiter}


# ----------------------------------------------------------------------------------------------
# One compile (in the worker)
# ----------------------------------------------------------------------------------------------
def analyze(spec: dict) -> dict:
    """Compile spec for spec["target"] and measure it (see the module docstring)."""
    import triton

    from gpt2_triton.bench.static import native
    backend = spec["target"][0]
    printed = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(printed):  # TRITON_DUMP_PTXAS_LOG=1: Triton prints its ptxas -v log
        k = native.compile_spec(spec)
    res = {"ok": True, "triton": triton.__version__, "target": spec["target"],
           "compile_s": round(time.perf_counter() - start, 3), "num_warps": k.metadata.num_warps,
           "num_stages": spec["options"].get("num_stages"),
           "global_scratch": getattr(k.metadata, "global_scratch_size", 0)}
    ttgir = k.asm.get("ttgir", "")
    res["dots"] = dot_ops(ttgir)
    res["pipeline"] = native.pipelining(ttgir)
    if backend == "cuda":
        usage = native.parse_ptxas_log(printed.getvalue())
        if usage["regs"] is None:  # a cache hit: Triton ran no ptxas
            usage = native.ptxas_usage(k.asm["ptx"])
        res.update(usage)
        res["shared"] = k.metadata.shared
        res["tmem"] = getattr(k.metadata, "tmem_size", 0) or 0
        res["mma_instructions"] = mma_instructions(k.asm["ptx"], backend)
        instrs = native.parse_sass(native.disassemble(k.asm["cubin"]))
        res["instructions"] = len(instrs)
        res["loops"] = [{"instructions": lp["instructions"], "site": lp["site"], "nested": lp["nested"],
                         "branches": lp["branches"], "classes": lp["classes"]} for lp in native.find_loops(instrs)]
    else:
        amdgcn = k.asm["amdgcn"]
        res.update(amd_metadata(amdgcn))
        res["lds_dynamic"] = k.metadata.shared
        res["lds"] = (res["lds_static"] or 0) + k.metadata.shared
        res["mma_instructions"] = mma_instructions(amdgcn, backend)
        instrs = parse_amdgcn(amdgcn)
        res["instructions"] = len(instrs)
        res["loops"] = [{k2: lp[k2] for k2 in ("instructions", "site", "nested", "branches", "classes")}
                        for lp in amd_loops(instrs)]
    return res


def worker_main():
    """One JSON spec per stdin line, one JSON result per stdout line (prints go to stderr)."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    import triton
    proto.write(json.dumps({"hello": True, "triton": triton.__version__}) + "\n")
    for line in sys.stdin:
        spec = json.loads(line)
        res = {"id": spec["id"], "target_name": spec["target_name"]}
        try:
            res.update(analyze(spec))
        except Exception as e:  # noqa: BLE001 - reported to the parent
            res.update(ok=False, error=compile_error_line(e),
                       traceback=traceback.format_exc()[-4000:])
        proto.write(json.dumps(res) + "\n")


def compile_error_line(exc: BaseException, limit: int = 300) -> str:
    """The reason of a failed compile in one line: the innermost exception of the chain (a
    CompilationError's own text is the source excerpt) and its last line (MLIR diagnostics: the line
    with 'error:')."""
    inner = exc
    while inner.__cause__ is not None or inner.__context__ is not None:
        inner = inner.__cause__ or inner.__context__
    lines = [ln.strip() for ln in str(inner).splitlines() if ln.strip()]
    errors = [ln[ln.find("error:"):] for ln in lines if "error:" in ln]
    reason = errors[0] if errors else (lines[-1] if lines else "")
    where = f"{type(exc).__name__} / " if inner is not exc else ""
    return f"{where}{type(inner).__name__}: {reason}"[:limit]


# ----------------------------------------------------------------------------------------------
# Parent side: workers that survive a crashing compile
# ----------------------------------------------------------------------------------------------
class _Worker:
    def __init__(self, repo: str, cache_dir: str):
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        env.update(TRITON_DUMP_PTXAS_LOG="1", TRITON_CACHE_DIR=cache_dir,
                   PYTHONPATH=os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p))
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([sys.executable, "-m", "gpt2_triton.bench.static.targets", "--worker"],
                                     cwd=repo, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self.log, text=True)
        hello = self._read()
        if not hello or "hello" not in hello:
            raise RuntimeError(f"target compile worker did not start: {self.log_tail()}")

    def log_tail(self) -> str:
        self.log.seek(0)
        return self.log.read()[-2000:]

    def _read(self):
        if not select.select([self.proc.stdout], [], [], COMPILE_TIMEOUT_S)[0]:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def run(self, spec: dict) -> dict:
        try:
            self.proc.stdin.write(json.dumps(spec) + "\n")
            self.proc.stdin.flush()
            res = self._read()
        except OSError:  # the worker is gone (a broken pipe)
            res = None
        if res is None:
            self.close()
            tail = [ln for ln in self.log_tail().splitlines() if ln.strip()]
            return {"id": spec["id"], "target_name": spec["target_name"], "ok": False,
                    "error": f"compile worker died or hung (exit {self.proc.returncode}): "
                             f"{tail[-1][:200] if tail else 'no output'}"}
        return res

    def close(self):
        from gpt2_triton.bench.static.native import stop_worker
        stop_worker(self.proc)


def compile_all(specs: list, jobs: int = 1, log=print) -> list:
    """Results of every spec, `jobs` worker processes (each with its own empty Triton cache); a worker
    that dies is replaced."""
    repo = str(Path(__file__).resolve().parents[3])
    pending = list(specs)
    results = []
    lock = threading.Lock()

    def loop():
        with tempfile.TemporaryDirectory(prefix="gpt2_triton_targets_cache") as cache_dir:
            worker = _Worker(repo, cache_dir)
            while True:
                with lock:
                    if not pending:
                        break
                    spec = pending.pop(0)
                res = worker.run(spec)
                if worker.proc.poll() is not None:
                    worker = _Worker(repo, cache_dir)
                with lock:
                    results.append(res)
                    status = "ok" if res["ok"] else f"FAIL {res['error'][:160]}"
                    log(f"  [{len(results)}/{len(specs)}] {spec['target_name']} {spec['id']}: {status}")
            worker.close()

    threads = [threading.Thread(target=loop) for _ in range(max(1, min(jobs, len(specs))))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


_TILE = re.compile(r"-\d+x\d+(?:x\d+)?-w\d+s\d+(?:r\d+)?(?:[emk]\d+)*")  # cases.config_id


def launch_key(case_id: str) -> str:
    """A case id without its tile and duplicate number: what a launch is, whatever tile a target picks."""
    return _TILE.sub("", case_id).split("#")[0]


def target_fields(name: str) -> dict:
    """The machine the launchers size their launches for on target `name` (trace.capture's target)."""
    from gpt2_triton.bench.static.trace import H100_TARGET
    arch = ARCHS[TARGETS[name]["arch"]]
    return {**H100_TARGET, "arch": arch.name, "sm_count": arch_gpu(arch.name).sms,
            "smem_per_block": arch.smem_per_block}


def target_cases(batch: int, name: str) -> list:
    """The first-candidate cases of every launch as target `name`'s launchers pick them."""
    from gpt2_triton.bench.static import cases as cases_mod
    launches, step = cases_mod.gpt2_launches(batch, target_fields(name))
    return [c for c in cases_mod.cases_from_launches(launches, [id(launch) for launch in step]) if c.first_candidate]


def matched(reference: list, cases: list) -> dict:
    """{reference case id: the case of `cases` for the same launch}: by launch_key, in order; a larger width's
    launch that this target specializes as another launch's (e.g. the same K split) maps to that case."""
    pending = collections.defaultdict(list)
    for c in cases:
        pending[launch_key(c.id)].append(c)
    alias_of = {alias: c for c in cases for alias in c.aliases}
    out = {r.id: pending[launch_key(r.id)].pop(0) for r in reference if pending[launch_key(r.id)]}
    out.update({r.id: alias_of[launch_key(r.id)] for r in reference
                if r.id not in out and launch_key(r.id) in alias_of})
    return out


def target_specs(cases_by_target: dict) -> list:
    specs = []
    for name, cases in cases_by_target.items():
        for c in cases:
            spec = c.spec()
            spec.update(target=TARGETS[name]["target"], target_name=name)
            specs.append(spec)
    return specs


def summarize(res: dict, name: str) -> dict:
    """The derived fields of one result: spill bytes, bf16 dots off the target's MMA, occupancy."""
    out = dict(res)
    out.pop("traceback", None)
    if not res.get("ok"):
        return out
    limits = TARGETS[name]
    if res["target"][0] == "hip":  # scratch bytes per lane; VGPR spills to scratch, SGPR spills to VGPR lanes
        out["spill_bytes"] = res.get("scratch") or 0
        out["spills"] = (res.get("vgpr_spills") or 0) + (res.get("sgpr_spills") or 0)
    else:
        out["spill_bytes"] = res.get("spill_stores") or 0
        out["spills"] = 1 if out["spill_bytes"] else 0
    out["bf16_dots"] = sum(1 for d in res["dots"] if d["dtype"] in ("bf16", "f16"))
    out["bf16_dots_off_mma"] = sum(1 for d in res["dots"]
                                   if d["dtype"] in ("bf16", "f16") and d["kind"] != limits["mma"])
    out["occupancy"] = occupancy(res, limits)
    return out


def run(out_dir, only=(), jobs=1, batch=16, target_names=tuple(TARGETS), log=print) -> dict:
    import torch

    from gpt2_triton.bench.common import git_commit
    from gpt2_triton.bench.static import cases as cases_mod
    t0 = time.time()
    cases = target_cases(batch, "sm_90a")
    if only:
        cases = [c for c in cases if any(s in c.id for s in only)]
    per_target = {name: matched(cases, cases if name == "sm_90a" else target_cases(batch, name))
                  for name in target_names}
    log(f"{len(cases)} first-candidate cases x {len(target_names)} targets")
    results = compile_all(target_specs({n: list({c.id: c for c in m.values()}.values())
                                        for n, m in per_target.items()}), jobs, log)
    by_key = {(r["target_name"], r["id"]): r for r in results}
    rows = []
    for c in cases:
        row = {"id": c.id, "kernel": c.launch.fn.__name__, "sites": list(c.sites),
               "in_step": any(" x" in s for s in c.sites), "num_warps": c.num_warps, "targets": {}}
        for name in target_names:
            own = per_target[name].get(c.id)
            r = by_key.get((name, own.id), {"ok": False, "error": "not compiled"}) if own else \
                {"ok": False, "error": "no matching launch in this target's trace"}
            row["targets"][name] = {"case": own.id if own else None, **summarize(r, name)}
            if own and launch_key(own.id) != launch_key(c.id):  # another width's launch, the same binary here
                row["targets"][name]["same_specialization"] = True
        rows.append(row)
    import triton
    profile = {
        "env": {"triton": triton.__version__, "torch": torch.__version__, "git_commit": git_commit(),
                "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "host": platform.node(), "cpus": os.cpu_count(), "jobs": jobs,
                "wall_s": round(time.time() - t0, 1)},
        "shapes": {"B": batch, "T": cases_mod.T, "C": cases_mod.C, "H": cases_mod.N_HEAD, "V": cases_mod.VOCAB,
                   "launches": "traced per target (its architecture's tiles, paths and limits); first autotune "
                               "candidate only"},
        "targets": {n: TARGETS[n] for n in target_names}, "summary": totals(rows, target_names), "cases": rows,
    }
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "static_targets.json").write_text(json.dumps(profile, indent=1, default=str))
    (out_dir / "static_targets.md").write_text(markdown(profile))
    log(f"wrote {out_dir / 'static_targets.json'} and .md ({profile['env']['wall_s']:.0f} s)")
    return profile


def totals(rows, target_names) -> dict:
    out = {}
    for name in target_names:
        rs = [r["targets"][name] for r in rows]
        ok = [r for r in rs if r.get("ok")]
        out[name] = {"cases": len(rs), "ok": len(ok), "failed": len(rs) - len(ok),
                     "spilling": sum(1 for r in ok if r["spill_bytes"] or r["spills"]),
                     "bf16_dots": sum(r["bf16_dots"] for r in ok),
                     "bf16_dots_off_mma": sum(r["bf16_dots_off_mma"] for r in ok),
                     "not_fitting": sum(1 for r in ok if r["occupancy"] and r["occupancy"]["value"] == 0)}
    return out


# ----------------------------------------------------------------------------------------------
# Markdown
# ----------------------------------------------------------------------------------------------
def _mma_cell(r) -> str:
    kinds = collections.Counter(d["kind"] for d in r["dots"])
    dots = ", ".join(f"{n} {k}" for k, n in kinds.items()) or "-"
    instr = ", ".join(f"{op.replace('.cta_group::1', '')} x{n}" for op, n in r["mma_instructions"].items())
    return f"{dots}" + (f" ({instr})" if instr else "")


def _regs_cell(r) -> str:
    if r.get("vgprs") is not None:
        return f"{r['vgprs']} v ({r.get('agprs') or 0} a) / {r.get('sgprs')} s"
    return str(r.get("regs"))


def _spill_cell(r) -> str:
    if r.get("vgprs") is not None:
        return f"{r['spill_bytes']} ({r.get('vgpr_spills') or 0} v / {r.get('sgpr_spills') or 0} s spills)"
    return f"{r['spill_bytes']}" + (f" (stack {r['stack']})" if r.get("stack") else "")


def _occ_cell(r) -> str:
    o = r.get("occupancy")
    return "-" if not o else f"{o['value']} ({o['limiter']})"


def markdown(p) -> str:
    names = list(p["targets"])
    lines = ["# Static profile on four GPU targets (compiled on a CPU, nothing run)", "",
             f"triton {p['env']['triton']}, torch {p['env']['torch']}, commit {p['env']['git_commit']}, "
             f"{p['env']['date']}, {p['env']['wall_s']:.0f} s with {p['env']['jobs']} job(s). "
             f"GPT-2 124M shapes, B={p['shapes']['B']} x T={p['shapes']['T']}; {p['shapes']['launches']}.", "",
             "Regenerate: `python -m gpt2_triton.bench.static.targets --out bench/results/static/targets "
             "[--jobs 2]`", "",
             "| target | GPU | compiled | failed | spilling | bf16 dots on the MMA | does not fit (smem / LDS) |",
             "|---|---|---|---|---|---|---|"]
    for n in names:
        s = p["summary"][n]
        lines.append(f"| {n} | {p['targets'][n]['gpu']} | {s['ok']}/{s['cases']} | {s['failed']} | {s['spilling']} | "
                     f"{s['bf16_dots'] - s['bf16_dots_off_mma']}/{s['bf16_dots']} ({p['targets'][n]['mma']}) | "
                     f"{s['not_fitting']} |")
    lines += ["", "Rows: the launches of the sm_90a trace; a target whose launcher picks another tile names "
              "its own case (here ...). Occupancy: CTAs per SM (NVIDIA) or waves per SIMD (AMD) and what "
              "limits it; 0 = the launch "
              "needs more shared memory / LDS than the target has. Spills: NVIDIA ptxas spill-store bytes (and "
              "the stack frame); AMD scratch bytes per lane (private segment) and the VGPR spills (to scratch) "
              "/ SGPR spills (to VGPR lanes) counts. Loops: instructions per iteration of each "
              "outermost loop (SASS on NVIDIA, amdgcn on AMD), in program order.", ""]
    for n in names:
        t = p["targets"][n]
        lines += [f"## {n} ({t['gpu']})", "", f"Limits: {t['source']}.", "",
                  "| case | regs | spill B | smem/LDS B | occupancy | dots (MMA instructions) | loops |",
                  "|---|---|---|---|---|---|---|"]
        for row in p["cases"]:
            r = row["targets"][n]
            case = row["id"] if r.get("case") in (None, row["id"]) else f"{row['id']} (here {r['case']})"
            if not r.get("ok"):
                lines.append(f"| {case} | FAILED: {r['error'][:200].replace('|', '/')} | | | | | |")
                continue
            smem = r["lds"] if "lds" in r else r.get("shared")
            smem = "-" if smem is None else smem
            loops = " / ".join(str(lp["instructions"]) for lp in r["loops"]) or "-"
            lines.append(f"| {case} | {_regs_cell(r)} | {_spill_cell(r)} | {smem} | {_occ_cell(r)} | "
                         f"{_mma_cell(r)} | {loops} |")
        lines.append("")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(allow_abbrev=False, prog="python -m gpt2_triton.bench.static.targets",
                                description="Static profile of the first autotune candidates on sm_90a, sm_100a, "
                                            "gfx942 and gfx950 (compiled on a CPU, no GPU).")
    p.add_argument("--out", required=True, help="folder for static_targets.json / .md")
    p.add_argument("--only", action="append", default=[], metavar="TEXT", help="cases whose id contains TEXT")
    p.add_argument("--target", action="append", default=[], choices=list(TARGETS), help="only this target")
    p.add_argument("--jobs", type=int, default=1, help="compile worker processes (at most 2)")
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    if not 1 <= args.jobs <= 2:
        sys.exit("python -m gpt2_triton.bench.static.targets: --jobs must be 1 or 2")
    run(args.out, only=args.only, jobs=args.jobs, batch=args.batch, target_names=tuple(args.target or TARGETS))


if __name__ == "__main__":
    if sys.argv[1:] == ["--worker"]:
        worker_main()
    else:
        main()
