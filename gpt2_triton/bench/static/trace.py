"""Run the real launchers and model on fake tensors, with every Triton kernel replaced by a recorder.

`capture()` gives a `Trace`: inside it, tensors are FakeTensors on "cpu" (shapes, dtypes and strides,
no data, nothing computed: GPT-2 124M shapes cost nothing), CPU autocast works on them as CUDA
autocast would on the ops that matter here, and
- the kernels' target (`gpt2_triton.kernels.utils.override_target`, H100_TARGET) is an H100: no
  interpreter (the GPU configs are chosen), tensors standing for CUDA ones, 132 SMs, bf16 products summed
  into fp32 by cuBLAS; each kernel of a module in KERNEL_MODULES (JITFunction, InterpretedFunction or
  Autotuner) is a recorder that keeps the launch (kernel, arguments, num_warps/num_stages, grid, the
  candidates its autotuner admits there (`gpt2_triton.kernels.autotune.Tuner.candidates` of the GPU configs))
  and runs nothing;
- the project's custom ops (torch.library ops defined in kernels/) run their Python launcher instead
  of their fake implementation, so the launches inside them are seen;
- every aten op and every launch is an event with the HBM bytes it moves (see `aten_bytes` and
  `launch_bytes`) and its FLOPs (see `flops`): the traffic trace;
- data-dependent ops (`.item()`, `bool(tensor)`, `x[mask]`, `nonzero`) are host syncs on a GPU: they
  are recorded as such and answered as if every check passed (scalars 0 / False, masks all True).

Bytes model. An aten op reads each tensor argument once and writes each output once (gathers such as
embedding and nll_loss read only the rows they pick, see `_partial_reads`); views and
no-op casts move nothing (an op whose outputs all alias its inputs costs 0); `empty` allocates without
a kernel; `zeros`/`fill_`/`copy_` write their output without reading it; `out=` arguments are written,
not read; a tensor's bytes are its distinct elements (stride-0 dims count once) times the element
size. A Triton launch reads each tensor argument that the kernel loads from and writes each one it
stores to, once, whatever the tiling: tile re-reads (the matmul's A and B panels, K/V per query tile)
are assumed to hit L2. Which arguments a kernel loads from or stores to is read from its source by
`pointer_roles` (a taint analysis of tl.load / tl.store addresses through locals and @triton.jit
helpers, constexpr branches resolved with the launch's values), so nothing here knows any kernel.
"""
import ast
import builtins
import collections
import contextlib
import functools
import importlib
import inspect
import math
import textwrap
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch._subclasses.fake_tensor import DynamicOutputShapeException, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2_triton.bench.static.flops import aten_flops, launch_flops
from gpt2_triton.devices import H100
from gpt2_triton.kernels import KERNEL_MODULES
from gpt2_triton.kernels.autotune import Tuner, gpu_configs
from gpt2_triton.kernels.utils import override_target

# ----------------------------------------------------------------------------------------------
# Kernel objects: JITFunction (native), InterpretedFunction (TRITON_INTERPRET=1), Autotuner
# ----------------------------------------------------------------------------------------------
H100_SMS = H100.sms
# The machine capture() profiles (gpt2_triton.kernels.utils.Target): no interpreter, fake CPU tensors
# standing for CUDA ones (device-side value checks, no host sync), an H100's SMs, and bf16 products
# summed into fp32 by cuBLAS as on CUDA.
H100_TARGET = dict(interpreter=False, device_type="cuda", sm_count=H100_SMS, smem_per_block=H100.smem_per_block,
                   fp32_out_matmul_kind="addmm")


def is_kernel(obj) -> bool:
    from gpt2_triton.kernels import compat
    return compat.is_kernel(obj)


def raw_kernel(obj):
    """The JITFunction / InterpretedFunction under an Autotuner (or the object itself)."""
    from gpt2_triton.kernels import compat
    return compat.unwrap_autotuner(obj)


def param_info(fn):
    """(arg names, constexpr arg names, do_not_specialize arg names) of a JITFunction or an
    InterpretedFunction, read from the Python function (same rules as JITFunction's KernelParam)."""
    import triton.language as tl

    from gpt2_triton.kernels import compat
    params = inspect.signature(compat.python_function(fn)).parameters
    names = list(params)
    constexprs = {n for n, p in params.items()
                  if p.annotation is tl.constexpr or "constexpr" in str(p.annotation)}
    return names, constexprs, compat.do_not_specialize(fn, names)


# ----------------------------------------------------------------------------------------------
# Which pointer arguments a kernel reads and writes, from its source
# ----------------------------------------------------------------------------------------------
_UNKNOWN = object()
_NO_TAINT = frozenset()


def _is_jit_helper(obj) -> bool:
    """A @triton.jit function outside triton itself (tl.sum & co. neither load nor store)."""
    from gpt2_triton.kernels import compat
    if not compat.is_plain_jit(obj):
        return False
    fn = compat.python_function(obj)
    return inspect.isfunction(fn) and not fn.__module__.startswith("triton")


@functools.cache
def _fn_ast(pyfn):
    tree = ast.parse(textwrap.dedent(inspect.getsource(pyfn)))
    return next(n for n in tree.body if isinstance(n, ast.FunctionDef))


@functools.cache
def _analyze(pyfn, taints: tuple, known: tuple):
    """(roles {label: frozenset{"read","write"}}, taint of the return value) of a jit function whose
    params carry `taints` ((param, labels) pairs) and constexpr values `known` ((param, value) pairs)."""
    a = _Taint(pyfn, dict(taints), dict(known))
    a.run()
    return {k: frozenset(v) for k, v in a.roles.items()}, frozenset(a.ret)


class _Taint:
    """Flow-insensitive taint of local names by the params they derive from (a value loaded from
    memory carries none); tl.load / tl.store / atomics and descriptor .load/.store mark the labels of
    their address read / written; calls to @triton.jit helpers are analysed with the argument taints."""

    def __init__(self, pyfn, taints, known):
        self.pyfn, self.globals = pyfn, pyfn.__globals__
        self.env = dict(taints)
        self.known = known
        self.roles = collections.defaultdict(set)
        self.ret = set()

    def run(self):
        body = _fn_ast(self.pyfn).body
        for _ in range(10):  # loops: iterate to a fixed point (taints only grow)
            before = (dict(self.env), {k: set(v) for k, v in self.roles.items()})
            self.block(body)
            if before == (dict(self.env), {k: set(v) for k, v in self.roles.items()}):
                return
        raise RuntimeError(f"pointer_roles: no fixed point for {self.pyfn.__name__}")

    def block(self, stmts):
        for s in stmts:
            self.stmt(s)

    def stmt(self, s):
        if isinstance(s, ast.Assign):
            t = self.expr(s.value)
            for target in s.targets:
                self.assign(target, t)
        elif isinstance(s, (ast.AugAssign, ast.AnnAssign)):
            if s.value is not None:
                self.assign(s.target, self.expr(s.value) | self.expr(s.target))
        elif isinstance(s, ast.If):
            cond = self.const(s.test)
            if cond is _UNKNOWN:
                self.expr(s.test)
                self.block(s.body)
                self.block(s.orelse)
            else:
                self.block(s.body if cond else s.orelse)
        elif isinstance(s, ast.For):
            self.assign(s.target, self.expr(s.iter))
            self.block(s.body)
            self.block(s.orelse)
        elif isinstance(s, ast.While):
            self.expr(s.test)
            self.block(s.body)
        elif isinstance(s, ast.With):
            for item in s.items:
                self.expr(item.context_expr)
            self.block(s.body)
        elif isinstance(s, ast.Return):
            if s.value is not None:
                self.ret |= self.expr(s.value)
        elif isinstance(s, ast.Expr):
            self.expr(s.value)
        else:
            for child in ast.iter_child_nodes(s):
                if isinstance(child, ast.expr):
                    self.expr(child)

    def assign(self, target, taint):
        if isinstance(target, ast.Name):
            self.env[target.id] = self.env.get(target.id, _NO_TAINT) | taint
        elif isinstance(target, (ast.Tuple, ast.List)):
            for elt in target.elts:
                self.assign(elt, taint)
        elif isinstance(target, ast.Starred):
            self.assign(target.value, taint)

    def expr(self, e) -> frozenset:
        if isinstance(e, ast.Name):
            return self.env.get(e.id, _NO_TAINT)
        if isinstance(e, ast.Call):
            return self.call(e)
        out = _NO_TAINT
        for child in ast.iter_child_nodes(e):
            if isinstance(child, ast.expr):
                out = out | self.expr(child)
            elif isinstance(child, ast.keyword):
                out = out | self.expr(child.value)
        return out

    def resolve(self, e):
        if isinstance(e, ast.Name):
            if e.id in self.env or e.id in self.known:
                return _UNKNOWN
            obj = self.globals.get(e.id, getattr(builtins, e.id, _UNKNOWN))
            return raw_kernel(obj.kernel) if isinstance(obj, _Recorder) else obj  # helpers during capture()
        if isinstance(e, ast.Attribute):
            base = self.resolve(e.value)
            return _UNKNOWN if base is _UNKNOWN else getattr(base, e.attr, _UNKNOWN)
        return _UNKNOWN

    def const(self, e):
        """Value of a compile-time expression (constexpr params, literals, module constants) or _UNKNOWN."""
        if isinstance(e, ast.Constant):
            return e.value
        if isinstance(e, ast.Name):
            if e.id in self.known:
                return self.known[e.id]
            if e.id in self.env:
                return _UNKNOWN
            v = self.globals.get(e.id, _UNKNOWN)
            return v if isinstance(v, (bool, int, float, str)) else _UNKNOWN
        if isinstance(e, ast.UnaryOp):
            v = self.const(e.operand)
            if v is _UNKNOWN:
                return _UNKNOWN
            return {ast.Not: lambda x: not x, ast.USub: lambda x: -x, ast.UAdd: lambda x: x,
                    ast.Invert: lambda x: ~x}[type(e.op)](v)
        if isinstance(e, ast.BoolOp):
            vals = [self.const(v) for v in e.values]
            if any(v is _UNKNOWN for v in vals):
                return _UNKNOWN
            return all(vals) if isinstance(e.op, ast.And) else any(vals)
        if isinstance(e, ast.Compare):
            left = self.const(e.left)
            for op, right_e in zip(e.ops, e.comparators):
                right = self.const(right_e)
                if left is _UNKNOWN or right is _UNKNOWN:
                    return _UNKNOWN
                ok = {ast.Eq: lambda a, b: a == b, ast.NotEq: lambda a, b: a != b, ast.Lt: lambda a, b: a < b,
                      ast.LtE: lambda a, b: a <= b, ast.Gt: lambda a, b: a > b, ast.GtE: lambda a, b: a >= b,
                      ast.Is: lambda a, b: a is b, ast.IsNot: lambda a, b: a is not b}.get(type(op))
                if ok is None or not ok(left, right):
                    return False if ok is not None else _UNKNOWN
                left = right
            return True
        if isinstance(e, ast.BinOp):
            a, b = self.const(e.left), self.const(e.right)
            if a is _UNKNOWN or b is _UNKNOWN:
                return _UNKNOWN
            try:
                return {ast.Add: lambda x, y: x + y, ast.Sub: lambda x, y: x - y, ast.Mult: lambda x, y: x * y,
                        ast.FloorDiv: lambda x, y: x // y, ast.Mod: lambda x, y: x % y}[type(e.op)](a, b)
            except (KeyError, ZeroDivisionError, TypeError):
                return _UNKNOWN
        return _UNKNOWN

    def mark(self, taint, *roles):
        for label in taint:
            self.roles[label].update(roles)

    def call(self, c) -> frozenset:
        import triton.language as tl
        args = [self.expr(a) for a in c.args]
        kwargs = {k.arg: self.expr(k.value) for k in c.keywords}
        func = c.func
        if isinstance(func, ast.Attribute) and func.attr in ("load", "store") or \
                isinstance(func, ast.Attribute) and func.attr.startswith("atomic_"):
            is_tl = self.resolve(func.value) is tl
            if is_tl:
                ptr = args[0] if args else kwargs.get("pointer", _NO_TAINT)
            else:  # descriptor / block pointer method: desc.load(offsets), desc.store(offsets, value)
                ptr = self.expr(func.value)
            if func.attr == "load":
                self.mark(ptr, "read")
            elif func.attr == "store":
                self.mark(ptr, "write")
            else:
                self.mark(ptr, "read", "write")
            return _NO_TAINT  # a loaded value is data, not an address
        target = self.resolve(func)
        if target is not _UNKNOWN and _is_jit_helper(target):
            from gpt2_triton.kernels import compat
            pyfn = compat.python_function(target)
            params = inspect.signature(pyfn).parameters
            taints, known = {}, {}
            arg_exprs = dict(zip(params, c.args))
            arg_exprs.update({k.arg: k.value for k in c.keywords})
            for name, p in params.items():
                if name in arg_exprs:
                    taints[name] = self.expr(arg_exprs[name])
                    v = self.const(arg_exprs[name])
                    if v is not _UNKNOWN:
                        known[name] = v
                elif p.default is not inspect.Parameter.empty:
                    known[name] = p.default
            try:
                key_known = tuple(sorted(known.items()))
                hash(key_known)
            except TypeError:
                key_known = ()
            roles, ret = _analyze(pyfn, tuple(sorted(taints.items())), key_known)
            for label, r in roles.items():
                self.roles[label].update(r)
            return ret
        out = self.expr(func) if isinstance(func, ast.Attribute) else _NO_TAINT
        for t in args:
            out = out | t
        for t in kwargs.values():
            out = out | t
        return out


def pointer_roles(fn, constexprs: dict) -> dict:
    """{param: {"read", "write"}} of a @triton.jit kernel (JITFunction or InterpretedFunction) for
    these constexpr values; params it never loads from or stores to are absent."""
    from gpt2_triton.kernels import compat
    pyfn = compat.python_function(fn)
    names = list(inspect.signature(pyfn).parameters)
    known = []
    for k, v in constexprs.items():
        try:
            hash(v)
            known.append((k, v))
        except TypeError:
            pass
    roles, _ = _analyze(pyfn, tuple((n, frozenset([n])) for n in names), tuple(sorted(known, key=lambda kv: kv[0])))
    return {k: set(v) for k, v in roles.items() if k in names}


# ----------------------------------------------------------------------------------------------
# Bytes
# ----------------------------------------------------------------------------------------------
def tensor_bytes(t) -> int:
    """Distinct elements times element size (stride-0 dims count once); a tensor or a TensorMeta."""
    if t.numel() == 0:
        return 0
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _tensor_key(t):
    storage = t.storage if isinstance(t, TensorMeta) else t.untyped_storage()._cdata
    return (storage, t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from _tensors(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from _tensors(o)


_NO_KERNEL = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted",
              "_local_scalar_dense"}
_WRITE_ONLY_INPLACE = {"fill_", "zero_", "copy_", "normal_", "uniform_", "random_", "bernoulli_", "exponential_"}


def _partial_reads(name, args: dict, out) -> dict:
    """{argument name: bytes read} for aten ops that read only part of an input (gathers) or only its
    shape; every other argument is read whole."""
    def rows(t, n):
        return min(tensor_bytes(t), n * (t.numel() // max(t.shape[0], 1)) * t.element_size()) if t.dim() else 0
    if name in ("nll_loss_forward", "nll_loss2d_forward"):  # one logit per target
        return {"self": min(tensor_bytes(args["self"]), args["target"].numel() * args["self"].element_size())}
    if name in ("nll_loss_backward", "nll_loss2d_backward"):
        return {"self": 0}
    if name == "embedding":
        return {"weight": rows(args["weight"], args["indices"].numel())}
    if name in ("index", "index_select", "gather"):
        outs = list(_tensors(out))
        return {"self": min(tensor_bytes(args["self"]), sum(t.numel() for t in outs) * args["self"].element_size())}
    return {}


def aten_bytes(func, args, kwargs, out) -> tuple:
    """(bytes read, bytes written) of one aten op, by the rules of the module docstring."""
    name = func._schema.name.split("::")[-1]
    if name in _NO_KERNEL:
        return 0, 0
    metadata_only = name.endswith("_like") or name.startswith("new_")
    schema_args = func._schema.arguments
    mutated, write_only = set(), set()
    bound = list(zip(schema_args, args)) + [(a, kwargs[a.name]) for a in schema_args if a.name in kwargs]
    for a, v in bound:
        if a.alias_info is not None and a.alias_info.is_write:
            for t in _tensors(v):
                mutated.add(_tensor_key(t))
                if getattr(a, "is_out", False) or name in _WRITE_ONLY_INPLACE and a.name == "self":
                    write_only.add(_tensor_key(t))
    inputs, partial = {}, {}
    special = _partial_reads(name, {a.name: v for a, v in bound}, out)
    for a, v in bound:
        for t in _tensors(v):
            inputs.setdefault(_tensor_key(t), t)
            if a.name in special:
                partial[_tensor_key(t)] = special[a.name]
    in_storages = {k[0] for k in inputs}
    new_outputs = {}
    for t in _tensors(out):
        k = _tensor_key(t)
        if k[0] not in in_storages:
            new_outputs.setdefault(k, t)
    if not mutated and not new_outputs:
        return 0, 0  # a view, an alias or a no-op cast
    read = 0 if metadata_only else \
        sum(partial.get(k, tensor_bytes(t)) for k, t in inputs.items() if k not in write_only)
    written = sum(tensor_bytes(inputs[k]) for k in mutated) + sum(tensor_bytes(t) for t in new_outputs.values())
    return read, written


@dataclass(frozen=True)
class TensorMeta:
    """What a launch record keeps of a tensor argument: its metadata, no reference (a kept reference
    would stop autograd from stealing a grad buffer and add a copy that a real run does not make)."""
    dtype: torch.dtype
    shape: tuple
    strides: tuple
    offset: int
    itemsize: int
    storage: int  # storage identity

    @classmethod
    def of(cls, t: torch.Tensor) -> "TensorMeta":
        return cls(t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset(), t.element_size(),
                   t.untyped_storage()._cdata)

    def stride(self):
        return self.strides

    def storage_offset(self):
        return self.offset

    def element_size(self):
        return self.itemsize

    def numel(self):
        return math.prod(self.shape)

    def is_floating_point(self):
        return self.dtype.is_floating_point


@dataclass(frozen=True)
class DescriptorMeta:
    """A host TensorDescriptor argument (triton.tools.tensor_descriptor): its base tensor and block."""
    base: TensorMeta
    block_shape: tuple


def _arg_meta(v):
    if isinstance(v, torch.Tensor):
        return TensorMeta.of(v)
    from gpt2_triton.kernels import compat
    parts = compat.descriptor_parts(v)
    if parts is not None and isinstance(parts[0], torch.Tensor):
        return DescriptorMeta(TensorMeta.of(parts[0]), parts[1])
    return v


def launch_bytes(launch) -> tuple:
    """(bytes read, bytes written) of a recorded Triton launch: each tensor argument the kernel loads
    from read once, each it stores to written once (`pointer_roles`)."""
    roles = pointer_roles(launch.fn, {k: v for k, v in launch.args.items() if k in launch.constexpr_names})
    per_tensor = {}
    for name, v in launch.args.items():
        t = v.base if isinstance(v, DescriptorMeta) else v
        if isinstance(t, TensorMeta):
            entry = per_tensor.setdefault(_tensor_key(t), [t, set()])
            entry[1] |= roles.get(name, set())
    read = sum(tensor_bytes(t) for t, r in per_tensor.values() if "read" in r)
    written = sum(tensor_bytes(t) for t, r in per_tensor.values() if "write" in r)
    return read, written


# ----------------------------------------------------------------------------------------------
# Launch capture
# ----------------------------------------------------------------------------------------------
@dataclass
class Launch:
    module: str
    name: str  # attribute name of the launched kernel (e.g. "_matmul" for the autotuner)
    fn: Any  # raw kernel object (JITFunction or InterpretedFunction)
    args: dict  # kernel arg name -> value as passed (ints, floats, None, constexprs), TensorMeta for tensors
    options: dict  # num_warps / num_stages passed at launch
    grid: Any = None  # tuple, or callable of the meta-parameters
    configs: Optional[list] = None  # triton.Config list the autotuner would try, when autotuned
    op: Optional[str] = None  # the custom op whose launcher made this launch
    constexpr_names: frozenset = field(default_factory=frozenset)
    tag: str = ""  # the shapes' name where they are not GPT-2 124M's (e.g. "C1024"), for case ids

    def programs(self, config=None) -> int:
        """Grid size (CTAs) of this launch, with `config`'s meta-parameters for autotuned kernels."""
        grid = self.grid
        if callable(grid):
            grid = grid({**self.args, **(config.kwargs if config is not None else {})})
        n = 1
        for g in (grid if isinstance(grid, (tuple, list)) else (grid,)):
            n *= int(g)
        return n


class _Recorder:
    def __init__(self, module, name, kernel, trace):
        self.module, self.name, self.kernel, self.trace = module, name, kernel, trace

    def __getitem__(self, grid):

        def launch(*args, **kwargs):
            fn = raw_kernel(self.kernel)
            names, constexprs, _ = param_info(fn)
            bound = dict(zip(names, args))
            opts = {}
            for k, v in kwargs.items():
                (bound if k in names else opts)[k] = v
            configs = None
            if isinstance(self.kernel, Tuner):  # what the autotuner may try for this launch, in order
                configs = self.kernel.candidates({**dict(zip(names, args)), **kwargs}, grid,
                                                 gpu_configs(self.kernel))
            bound = {k: _arg_meta(v) for k, v in bound.items()}
            rec = Launch(self.module, self.name, fn, bound, opts, grid, configs,
                         self.trace.op_stack[-1] if self.trace.op_stack else None, frozenset(constexprs))
            self.trace.record_launch(rec)
        return launch


@dataclass
class Event:
    kind: str  # "aten" | "launch" | "sync"
    name: str  # aten op ("aten.mm.default") or kernel name
    read: int
    written: int
    op: Optional[str] = None  # enclosing custom op, if any
    launch: Optional[Launch] = None
    flops: int = 0  # `flops.aten_flops` / `flops.launch_flops`


class Trace(TorchDispatchMode):
    """Events of everything run under it (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self.events = []
        self.op_stack = []

    def record_launch(self, launch):
        read, written = launch_bytes(launch)
        self.events.append(Event("launch", launch.fn.__name__, read, written, launch.op, launch,
                                 launch_flops(launch)))

    @property
    def launches(self):
        return [e.launch for e in self.events if e.kind == "launch"]

    def mark(self) -> int:
        return len(self.events)

    def since(self, mark: int) -> list:
        return self.events[mark:]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        opdef = _project_custom_op(func)
        if opdef is not None:  # our launcher, not its fake implementation
            self.op_stack.append(func._schema.name.split("::")[-1])
            try:
                with self:
                    return opdef._init_fn(*args, **kwargs)
            finally:
                self.op_stack.pop()
        op = self.op_stack[-1] if self.op_stack else None
        if func is torch.ops.aten._local_scalar_dense.default:
            self.events.append(Event("sync", str(func), tensor_bytes(args[0]), 0, op))
            return {torch.bool: False}.get(args[0].dtype, 0 if not args[0].is_floating_point() else 0.0)
        try:
            out = func(*args, **kwargs)
        except DynamicOutputShapeException:
            out = _all_kept(func, args, kwargs)
            self.events.append(Event("sync", str(func), 0, 0, op))
        read, written = aten_bytes(func, args, kwargs, out)
        self.events.append(Event("aten", str(func), read, written, op, None, aten_flops(func, args, kwargs, out)))
        return out


def _project_custom_op(func):
    """The CustomOpDef of a torch.library custom op defined in kernels/, or None."""
    from torch._library.custom_ops import OPDEFS
    opdef = OPDEFS.get(func._schema.name)
    if opdef is not None and opdef._init_fn.__module__.startswith("gpt2_triton.kernels."):
        return opdef
    return None


def _all_kept(func, args, kwargs):
    """Output of a data-dependent-shape op when every mask element is True."""
    name = func._schema.name.split("::")[-1]
    if name == "nonzero":
        x = args[0]
        return torch.empty((x.numel(), x.dim()), dtype=torch.int64, device=x.device)
    if name == "masked_select":
        x, mask = args[0], args[1]
        shape = torch.broadcast_shapes(x.shape, mask.shape)
        return torch.empty((int(torch.Size(shape).numel()),), dtype=x.dtype, device=x.device)
    if name == "index" and len(args[1]) == 1 and args[1][0] is not None and args[1][0].dtype == torch.bool:
        x, mask = args[0], args[1][0]
        return torch.empty((mask.numel(), *x.shape[mask.dim():]), dtype=x.dtype, device=x.device)
    raise NotImplementedError(f"gpt2_triton.bench.static: data-dependent output of {func} is not modelled")


@contextlib.contextmanager
def capture(target_fields: Optional[dict] = None):
    """Fake tensors + launch recorders + the event trace; yields the Trace. All undone on exit
    (gpt2_triton.kernels.utils is not touched). target_fields: the machine the launchers size their
    launches for (default H100_TARGET)."""
    trace = Trace()
    saved = []
    try:
        for mod_name in KERNEL_MODULES:
            mod = importlib.import_module(mod_name)
            for name, v in list(vars(mod).items()):
                if is_kernel(v):
                    saved.append((mod, name, v))
                    setattr(mod, name, _Recorder(mod_name, name, v, trace))
        with override_target(**(H100_TARGET if target_fields is None else target_fields)), FakeTensorMode(), \
                trace, warnings.catch_warnings():
            # Launchers check real tensors' alignment (e.g. TMA's 16 bytes); a fake one's data_ptr() is 0
            # (aligned), which is what a GPU allocation gives, but torch warns about reading it.
            warnings.filterwarnings("ignore", message="Accessing the data pointer of FakeTensor")
            yield trace
    finally:
        for mod, name, v in reversed(saved):
            setattr(mod, name, v)


def is_recorder(obj) -> bool:
    return isinstance(obj, _Recorder)


def summarize(events) -> dict:
    """Bytes (in all, and by source: the enclosing custom op, else the aten op), launches by kernel, device
    ops by aten name and host syncs of a list of events."""
    launches = collections.Counter(e.name for e in events if e.kind == "launch")
    device_ops = collections.Counter(e.name for e in events if e.kind == "aten" and (e.read or e.written))
    syncs = collections.Counter(e.name for e in events if e.kind == "sync")
    by_source = collections.Counter()
    for e in events:  # inside one of our custom ops: the op; else the aten op or kernel
        by_source[e.op or e.name] += e.read + e.written
    return {
        "read": sum(e.read for e in events), "written": sum(e.written for e in events),
        "bytes": sum(e.read + e.written for e in events),
        "bytes_by_source": {k: v for k, v in by_source.most_common() if v},
        "triton_launches": sum(launches.values()), "launches": dict(launches.most_common()),
        "device_ops": sum(device_ops.values()), "ops": dict(device_ops.most_common()),
        "host_syncs": sum(syncs.values()), "syncs": dict(syncs.most_common()),
    }
