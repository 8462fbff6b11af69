"""Native sm_90 compile of one launch spec, and what its code says: registers, spills, shared
memory, how each tl.dot lowered, TMA, and the SASS of its loops.

Runs in a worker process without TRITON_INTERPRET (`python -m gpt2_triton.bench.static.native`, one JSON spec per
stdin line, one JSON result per stdout line), under the project's python or another one with its
own triton (`--python`): everything version-specific (triton, its ptxas and nvdisasm) comes from the
interpreter that runs the worker. The parent side is `Worker`.

Method:
- compile: `triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=GPUTarget("cuda",
  90, 32), options)`: the whole NVIDIA pipeline down to a cubin (ptxas included), no driver needed.
- registers / spills: the `ptxas -v` log of the compile itself (TRITON_DUMP_PTXAS_LOG=1); on a
  Triton cache hit, `ptxas -v` rerun on the PTX with the ptxas and register-allocation flags Triton
  uses (CompiledKernel.n_spills is only filled when a cubin is loaded on a device).
- dots: TTGIR `ttng.warp_group_dot` ops are wgmma (HGMMA in SASS); a remaining `tt.dot` is mma.sync
  (HMMA, an nvidia_mma layout of version 2) or, without tensor cores (fp32 "ieee"), FMA.
- TMA: any UTMALDG / UTMASTG / UBLKCP / UTMAPF instruction in the SASS.
- loops: `nvdisasm -c -gi` on the cubin. A loop is the address range from the target of a backward
  branch to that branch; the loops reported are the outermost ones (barrier retry loops nested in
  them are counted as part of them; the one-instruction self-branch after EXIT is not a loop, nor is
  an out-of-line block placed after the last EXIT (an mbarrier wait's retry spin, or its jump back
  into the body).
  "Instructions per iteration" is every instruction in the range: the exact count of a straight-line
  body (the hot loops here have no forward branch inside; `branches` says when one does). Each loop
  is labelled with a kernel source line (the helper call most of it was inlined from: a helper called
  twice gives two loops with two lines; else its backward branch's line; the line tables of triton
  3.6's ptxas carry no inlining, so there a helper's loops show the helper's line) and broken down by
  opcode class (see CLASSES).
"""
import collections
import contextlib
import io
import json
import os
import re
import select
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

COMPILE_TIMEOUT_S = 600

# SASS base opcode -> class of the breakdown. Opcodes not listed: "other" (moves, shuffles, ...),
# uniform-datapath ones (U...): "uniform".
CLASSES = {
    "HGMMA": "hgmma", "HMMA": "hmma", "MUFU": "mufu",
    "FFMA": "ffma", "FMUL": "fmul", "FADD": "fadd", "FMNMX": "fmnmx", "FSEL": "fsel", "FSETP": "fsetp",
    "ISETP": "isetp",
    **dict.fromkeys(("IMAD", "IADD3", "LEA", "SHF", "LOP3", "VIADD", "IABS", "SGXT", "IMNMX", "VIMNMX",
                     "VIADDMNMX", "SEL", "PRMT", "IMUL", "BMSK", "IADD", "ISCADD", "SHL", "SHR"), "int"),
    "LDG": "ldg", "LDGSTS": "ldgsts", "LDS": "lds", "LDSM": "lds",
    "STG": "stg", "STS": "sts", "STSM": "sts",
    **dict.fromkeys(("UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF", "UTMACCTL"), "tma"),
    **dict.fromkeys(("F2F", "F2FP", "I2F", "I2FP", "F2I"), "cvt"),
    **dict.fromkeys(("BAR", "SYNCS", "WARPGROUP", "DEPBAR", "LDGDEPBAR", "WARPSYNC", "MEMBAR", "FENCE",
                     "ARRIVES", "BSSY", "BSYNC"), "sync"),
}
TMA_OPCODES = ("UTMALDG", "UTMASTG", "UBLKCP", "UTMAPF")


def sass_class(base: str) -> str:
    if base in CLASSES:
        return CLASSES[base]
    return "uniform" if base.startswith("U") else "other"


# ----------------------------------------------------------------------------------------------
# Tools of the running triton
# ----------------------------------------------------------------------------------------------
def ptxas_path():
    """The ptxas Triton itself runs for sm_90 (triton 3.6: CUDA 12.8, 3.9: 13.x), or None."""
    from gpt2_triton.kernels import compat
    try:
        path = compat.ptxas_path(90)
    except Exception:  # noqa: BLE001 - no NVIDIA backend / no ptxas: the caller reports it
        return None
    return path if path and os.path.isfile(path) else None


def _tool(name):
    """nvdisasm / cuobjdump shipped next to triton's ptxas."""
    from gpt2_triton.kernels import compat
    for d in (os.path.dirname(ptxas_path() or ""), compat.nvidia_bin_dir()):
        path = os.path.join(d, name)
        if d and os.path.isfile(path):
            return path
    raise FileNotFoundError(f"{name} not found next to triton's ptxas")


def _ptxas_extra_flags() -> tuple:
    """Flags of Triton's make_cubin that change register allocation (3.9: --regAllocOptLevel=2)."""
    from gpt2_triton.kernels import compat
    src = compat.make_cubin_source()
    return tuple(f for f in ("--regAllocOptLevel=2",) if f in src)


def ptxas_usage(ptx: str) -> dict:
    """registers / spill bytes / stack of the PTX, from `ptxas -v` (the same ptxas and flags as Triton)."""
    arch = re.search(r"^\.target\s+(\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as d:
        src = os.path.join(d, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas_path(), "-lineinfo", "-v", *_ptxas_extra_flags(), f"--gpu-name={arch}", src,
                              "-o", os.path.join(d, "k.cubin")], capture_output=True, text=True)
    log = res.stdout + res.stderr
    if res.returncode != 0:
        raise RuntimeError(f"ptxas failed:\n{log[-3000:]}")
    return parse_ptxas_log(log)


def parse_ptxas_log(log: str) -> dict:
    regs = re.search(r"Used (\d+) registers", log)
    spill = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    stack = re.search(r"(\d+) bytes stack frame", log)
    return {"regs": int(regs.group(1)) if regs else None,
            "spill_stores": int(spill.group(1)) if spill else None,
            "spill_loads": int(spill.group(2)) if spill else None,
            "stack": int(stack.group(1)) if stack else None}


# ----------------------------------------------------------------------------------------------
# SASS
# ----------------------------------------------------------------------------------------------
_INSTR = re.compile(r"^\s*/\*([0-9a-f]+)\*/\s+(.*?)\s*;")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_LINE = re.compile(r'//## File "([^"]*)", line (\d+)(?: inlined at "([^"]*)", line (\d+))?')
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")


def parse_sass(text: str) -> list:
    """nvdisasm -c -gi text -> [{addr, op (full opcode), base, site, inlined, target (label)}].
    site: the kernel source line the instruction belongs to, or the line its helper was inlined at
    (inlined: True)."""
    instrs, labels, pending = [], {}, []
    block, site, inlined = [], None, False
    for line in text.splitlines():
        m = _LINE.search(line)
        if m:
            block.append(m)
            continue
        if block:  # a run of line-info comments: the last one holds the outermost call site
            last = block[-1]
            site, inlined = int(last.group(4) or last.group(2)), last.group(4) is not None
            block = []
        m = _LABEL.match(line)
        if m:
            pending.append(m.group(1))
            continue
        m = _INSTR.match(line)
        if not m:
            continue
        addr, body = int(m.group(1), 16), m.group(2)
        tokens = body.split()
        if tokens and tokens[0].startswith("@"):
            tokens = tokens[1:]
        if not tokens:
            continue
        op = tokens[0]
        target = _BRANCH_TARGET.search(body)
        for lab in pending:
            labels[lab] = addr
        pending = []
        instrs.append({"addr": addr, "op": op, "base": op.split(".")[0], "site": site, "inlined": inlined,
                       "target": target.group(1) if target else None})
    for ins in instrs:
        ins["target_addr"] = labels.get(ins["target"]) if ins["target"] else None
    return instrs


def _ldg_width(op: str) -> int:
    for mod, bits in ((".U8", 8), (".S8", 8), (".U16", 16), (".S16", 16), (".64", 64), (".128", 128)):
        if mod in op:
            return bits
    return 32


def breakdown(instrs: list) -> dict:
    """Counts by class, by base opcode, and global loads by width in bits."""
    classes = collections.Counter(sass_class(i["base"]) for i in instrs)
    ops = collections.Counter(i["base"] for i in instrs)
    ldg = collections.Counter(str(_ldg_width(i["op"])) for i in instrs if i["base"] == "LDG")
    return {"instructions": len(instrs), "classes": dict(classes.most_common()), "opcodes": dict(ops.most_common()),
            "ldg_bits": dict(sorted(ldg.items()))}


def find_loops(instrs: list) -> list:
    """Outermost loops in address order: [{start, end, instructions, site, nested, branches, ...breakdown}].
    site: the kernel line of the helper call most of the loop was inlined from, else the line of the
    loop's backward branch (its `for`)."""
    exits = [i["addr"] for i in instrs if i["base"] == "EXIT"]
    back = [(i["target_addr"], i["addr"]) for i in instrs
            if i["base"] == "BRA" and i["target_addr"] is not None and i["target_addr"] < i["addr"]
            and not any(i["target_addr"] < e < i["addr"] for e in exits)  # out-of-line blocks jumping back
            and not (exits and i["target_addr"] > exits[-1])]  # retry spins placed after the last EXIT
    outer = [r for r in back if not any(o != r and o[0] <= r[0] and r[1] <= o[1] for o in back)]
    loops = []
    for start, end in sorted(set(outer)):
        body = [i for i in instrs if start <= i["addr"] <= end]
        nested = sum(1 for r in back if r != (start, end) and start <= r[0] and r[1] <= end)
        branches = sum(1 for i in body if i["base"] == "BRA" and i["addr"] != end)
        inlined = collections.Counter(i["site"] for i in body if i["inlined"])
        site = inlined.most_common(1)[0][0] if 2 * sum(inlined.values()) > len(body) else body[-1]["site"]
        loops.append({"start": start, "end": end, "site": site, "nested": nested, "branches": branches,
                      **breakdown(body)})
    return loops


def disassemble(cubin: bytes) -> str:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "k.cubin")
        with open(path, "wb") as f:
            f.write(cubin)
        res = subprocess.run([_tool("nvdisasm"), "-c", "-gi", path], capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(f"nvdisasm failed: {res.stderr[-2000:]}")
    return res.stdout


def dot_lowering(ttgir: str) -> dict:
    """How the kernel's tl.dot ops lowered, from the TTGIR: `ttng.warp_group_dot` is wgmma (HGMMA);
    a remaining `tt.dot` is mma.sync (HMMA) under an nvidia_mma layout of version 2, else FMA."""
    wgmma = len(re.findall(r"=\s*ttng\.warp_group_dot\s", ttgir))
    other = len(re.findall(r"=\s*tt\.dot\s", ttgir))
    kind = "mma.sync" if re.search(r"nvidia_mma<\{versionMajor\s*=\s*2", ttgir) else "fma"
    return {"dots": wgmma + other, "wgmma": wgmma, "other": other, "other_kind": kind if other else None}


def pipelining(ttgir: str) -> dict:
    """Software pipelining in the TTGIR: asynchronous copies into shared memory (cp.async, TMA) issued
    ahead of their use, which Triton's pipeliner makes of a loop's loads when num_stages > 1."""
    cp_async = len(re.findall(r"ttg\.async_copy_global_to_local", ttgir))
    tma = len(re.findall(r"ttng\.async_tma_copy_global_to_local", ttgir))
    return {"async_copies": cp_async, "tma_copies": tma, "pipelined": cp_async + tma > 0}


# ----------------------------------------------------------------------------------------------
# Compile one spec
# ----------------------------------------------------------------------------------------------
def _kernel(module: str, name: str):
    """The JITFunction called `name` in `module` (under an Autotuner if need be)."""
    import importlib

    from gpt2_triton.kernels import compat
    mod = importlib.import_module(module)
    obj = compat.unwrap_autotuner(getattr(mod, name, None))
    if obj is None:
        for v in vars(mod).values():
            fn = compat.unwrap_autotuner(v)
            if getattr(fn, "__name__", None) == name:
                obj = fn
    if not compat.is_jit_function(obj):
        raise RuntimeError(f"{module}.{name} is a {type(obj).__name__}, not a JITFunction: compile outside the "
                           "interpreter (TRITON_INTERPRET unset)")
    return obj


SM90 = ("cuda", 90, 32)  # GPUTarget(backend, arch, warp size) the profile compiles for


def compile_spec(spec: dict):
    """triton.compile of a spec for its "target" (default sm_90): the JIT's own compile of that
    specialization, so it fills the same entry of Triton's cache as the first launch would."""
    from gpt2_triton.kernels import compat
    fn = _kernel(spec["module"], spec["kernel"])
    attrs = {tuple(k): v for k, v in spec["attrs"]}
    return compat.compile_source(fn, dict(spec["signature"]), dict(spec["constexprs"]), attrs,
                                 tuple(spec.get("target", SM90)), dict(spec["options"]))


def _launch_arg(described):
    """A stand-in for one launch argument: a tensor of its dtype, 16-byte aligned or not (what Triton
    specializes a pointer on), or the value itself."""
    import torch
    kind, *rest = described
    if kind == "tensor":
        dtype, aligned = getattr(torch, rest[0]), rest[1]
        return torch.empty(4, dtype=dtype) if aligned else torch.empty(5, dtype=dtype)[1:]
    return rest[0] if kind == "value" else None


def warmup_spec(spec: dict):
    """The JIT's own compile of a launch (JITFunction.warmup on stand-in arguments) for spec["target"]: the
    entry of Triton's cache the launch itself would make, whatever this triton's specialization rules."""
    from gpt2_triton.kernels import compat
    fn = _kernel(spec["module"], spec["kernel"])
    with compat.target_only_driver(tuple(spec.get("target", SM90))):
        return fn.warmup(*(_launch_arg(a) for a in spec["args"]), grid=(1,), **spec["options"])


def analyze_spec(spec: dict, usage=True, sass=True) -> dict:
    """Compile and measure one spec: {ok, compile_s, shared, num_warps, regs, spill_*, dots, pipeline, tma,
    sass: {...}}; with spec["analyze"] False only {ok, compile_s}."""
    import triton

    from gpt2_triton.kernels import compat
    printed = io.StringIO()
    start = time.perf_counter()
    with contextlib.redirect_stdout(printed):  # TRITON_DUMP_PTXAS_LOG=1: Triton prints its ptxas -v log
        k = warmup_spec(spec) if "args" in spec else compile_spec(spec)
    compile_s = round(time.perf_counter() - start, 3)
    if not spec.get("analyze", True):
        out = {"ok": True, "compile_s": compile_s}
        if spec.get("launcher"):  # the C launcher Triton builds at a kernel's first launch (triton 3.6)
            compat.build_launcher(k)  # this machine's own driver: it has the GPU
            out["launcher_s"] = round(time.perf_counter() - start - compile_s, 3)
        return out
    asm = compat.kernel_asm(k)
    cubin = asm.get("cubin")
    res = {"ok": True, "triton": triton.__version__, "compile_s": compile_s,
           "cubin_bytes": len(cubin) if isinstance(cubin, bytes) else 0, **compat.kernel_resources(k)}
    if usage:
        usage = parse_ptxas_log(printed.getvalue())
        if usage["regs"] is None:  # a cache hit: Triton ran no ptxas, so run it on the same PTX
            usage = ptxas_usage(asm["ptx"])
        res.update(usage)
    res["dots"] = dot_lowering(asm.get("ttgir", ""))
    res["pipeline"] = pipelining(asm.get("ttgir", ""))
    if sass:
        instrs = parse_sass(disassemble(cubin))
        total = breakdown(instrs)
        res["tma"] = any(total["opcodes"].get(o) for o in TMA_OPCODES)
        res["sass"] = {**total, "loops": find_loops(instrs)}
    return res


# ----------------------------------------------------------------------------------------------
# Worker process and its parent-side handle
# ----------------------------------------------------------------------------------------------
def worker_main():
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything printed (triton prints ptxas failures) goes to stderr, not the protocol
    import triton
    proto.write(json.dumps({"hello": True, "triton": triton.__version__, "ptxas": ptxas_path(),
                            "python": sys.executable}) + "\n")
    for line in sys.stdin:
        spec = json.loads(line)
        res = {"id": spec["id"]}
        try:
            res.update(analyze_spec(spec, usage=spec.get("usage", True), sass=spec.get("sass", True)))
        except Exception as e:  # noqa: BLE001 - reported to the parent
            res.update(ok=False, error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-6000:])
        proto.write(json.dumps(res) + "\n")


def stop_worker(proc: subprocess.Popen) -> None:
    """End a worker subprocess: close its stdin (it exits at EOF), killed if it has not gone in 30 s."""
    if proc.poll() is None:
        with contextlib.suppress(OSError):
            proc.stdin.close()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Worker:
    """A compile worker subprocess: `python -m gpt2_triton.bench.static.native` under `python` (default: this
    one), with the repository on PYTHONPATH and TRITON_INTERPRET removed."""

    def __init__(self, python=None, repo=None, cache_dir=None, ptxas_log=True):
        """cache_dir: Triton's cache for its compiles (default: this process's, TRITON_CACHE_DIR); an empty
        folder makes every compile cold. ptxas_log: registers and spills from the compile's own ptxas run."""
        from gpt2_triton.kernels import compat
        repo = repo or str(Path(__file__).resolve().parents[3])  # the folder that holds gpt2_triton
        env = dict(os.environ)
        env.pop("TRITON_INTERPRET", None)
        if ptxas_log:
            env[compat.PTXAS_LOG_ENV] = "1"
        if cache_dir is not None:
            env["TRITON_CACHE_DIR"] = str(cache_dir)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (repo, env.get("PYTHONPATH")) if p)
        self.python = python or sys.executable
        self.log = tempfile.TemporaryFile(mode="w+")
        self.proc = subprocess.Popen([self.python, "-m", "gpt2_triton.bench.static.native"], cwd=repo, env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self.info = self._read("worker start")
        if "hello" not in self.info:
            raise RuntimeError(f"compile worker under {self.python} did not start:\n{self._log_tail()}")

    def _log_tail(self):
        self.log.seek(0)
        return self.log.read()[-4000:]

    def _read(self, what):
        if not select.select([self.proc.stdout], [], [], COMPILE_TIMEOUT_S)[0]:
            self.close()
            raise TimeoutError(f"{what}: no answer from the compile worker in {COMPILE_TIMEOUT_S} s")
        line = self.proc.stdout.readline()
        if not line:
            self.proc.wait(timeout=30)
            raise RuntimeError(f"compile worker ({self.python}) died ({self.proc.returncode}) on {what}:\n"
                               f"{self._log_tail()}")
        return json.loads(line)

    def submit(self, spec: dict):
        """Send a spec; its result comes back from `receive`, in order."""
        if self.proc.poll() is not None:
            raise RuntimeError(f"compile worker exited ({self.proc.returncode}):\n{self._log_tail()}")
        self.proc.stdin.write(json.dumps(spec) + "\n")
        self.proc.stdin.flush()

    def receive(self, what="compile") -> dict:
        return self._read(what)

    def run(self, spec: dict) -> dict:
        self.submit(spec)
        return self.receive(spec["id"])

    def close(self):
        stop_worker(self.proc)
        self.log.close()


def compile_many(specs, python=None, jobs=1, cache_dir=None, ptxas_log=True, deadline=None) -> tuple:
    """(triton version, {spec id: result}) of every spec, compiled by `jobs` workers under `python`;
    deadline (time.monotonic()): no spec is started after it (those left get no result)."""
    workers = [Worker(python, cache_dir=cache_dir, ptxas_log=ptxas_log) for _ in range(max(1, jobs))]
    version = workers[0].info["triton"]
    results = {}
    try:
        pending = list(specs)
        busy = {}  # worker -> spec id
        while busy or (pending and (deadline is None or time.monotonic() < deadline)):
            for w in workers:
                if w not in busy and pending and (deadline is None or time.monotonic() < deadline):
                    spec = pending.pop(0)
                    w.submit(spec)
                    busy[w] = spec["id"]
            if not busy:
                break
            ready, _, _ = select.select([w.proc.stdout for w in busy], [], [], COMPILE_TIMEOUT_S)
            if not ready:
                raise TimeoutError(f"no compile result in {COMPILE_TIMEOUT_S} s for {sorted(busy.values())}")
            for w in list(busy):
                if w.proc.stdout in ready:
                    res = w.receive(busy.pop(w))
                    results[res["id"]] = res
    finally:
        for w in workers:
            w.close()
    return version, results


if __name__ == "__main__":
    worker_main()
