"""Preflight of the headline run: before anything is timed, does what it needs work here?

- the toolchain Triton builds each kernel's launcher with at its first launch (a C compiler and
  Python.h): `toolchain()` builds a one-line extension through Triton itself;
- every kernel, launched once at a tiny shape through each of its paths (TMA and pointer-load attention,
  split-K and plain weight gradients, each fp32-output matmul kind, the fused no-grad loss), each result
  checked against the PyTorch reference: `run()`.

A path that fails costs its row: the feature is recorded as failed (gpt2_triton.kernels.utils.FEATURES),
the headline's later jobs take its fallback from their start, and the summary says so.
"""
import contextlib
import os
import shutil
import sysconfig
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Optional

import torch

from gpt2_triton.kernels import reference
from gpt2_triton.kernels.grads import FP32_OUT_KINDS
from gpt2_triton.kernels.utils import (
    failed_features,
    fp32_out_matmul_kind,
    isolated_features,
    override_target,
    target_paths,
)

_EXTENSION = """#include <Python.h>
static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "gpt2_triton_preflight", NULL, -1, NULL};
PyMODINIT_FUNC PyInit_gpt2_triton_preflight(void) { return PyModule_Create(&module); }
"""


def toolchain() -> dict:
    """{cc, python_h, ok, error, target_paths}: the C compiler and Python.h Triton's launcher build finds
    (its own lookup: $CC, else gcc, else clang), whether a one-line extension builds through Triton, and the
    per-architecture paths the launchers take on this GPU (utils.target_paths: architecture, bf16 dot
    input precision, attention through TMA or pointer loads)."""
    cc = os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")
    scheme = sysconfig.get_default_scheme()
    include = sysconfig.get_paths(scheme="posix_prefix" if scheme == "posix_local" else scheme)["include"]
    python_h = os.path.join(include, "Python.h")
    out = {"cc": cc, "python_h": python_h if os.path.isfile(python_h) else None, "ok": False, "error": "",
           "target_paths": target_paths(torch.device("cuda") if torch.cuda.is_available() else None)}
    try:
        from gpt2_triton.kernels import compat
        with tempfile.TemporaryDirectory() as cache, _triton_cache(cache):
            compat.build_extension(_EXTENSION, "gpt2_triton_preflight")
        out["ok"] = True
    except Exception as e:  # noqa: BLE001 - reported as the row's error
        out["error"] = f"{type(e).__name__}: {e}"[:500]
    return out


@contextlib.contextmanager
def _triton_cache(directory):
    """Triton's cache in `directory` (a fresh one builds the extension instead of loading it)."""
    previous = os.environ.get("TRITON_CACHE_DIR")
    os.environ["TRITON_CACHE_DIR"] = directory
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("TRITON_CACHE_DIR", None)
        else:
            os.environ["TRITON_CACHE_DIR"] = previous


@dataclass(frozen=True)
class Item:
    name: str  # what runs, e.g. "attention fwd+bwd"
    path: str  # which path: "tma", "pointer loads", "split-K", ...
    feature: Optional[str]  # the FEATURES entry this path is (None: no fallback; the kernel itself)
    forced_off: tuple  # features forced to fail so that this path (a fallback) runs
    check: Callable[[torch.device, torch.dtype], float]  # runs ours and the reference: relative RMS error
    fp32_out_kind: Optional[str] = None  # the fp32-output matmul kind this path is (run where the device has it)


def _rel_err(ours, ref) -> float:
    ours, ref = ours.detach().double(), ref.detach().double()
    return float((ours - ref).pow(2).mean().sqrt() / ref.pow(2).mean().sqrt().clamp(min=1e-30))


def _grads_err(fn, ref_fn, inputs) -> float:
    """Largest relative error of the output and of every input's gradient, ours vs the fp32 reference."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ref_leaves = [t.detach().float().clone().requires_grad_() for t in inputs]
    out, ref = fn(*leaves), ref_fn(*ref_leaves)
    grad = torch.randn_like(ref)
    out.backward(grad.to(out.dtype))
    ref.backward(grad)
    return max([_rel_err(out, ref)] + [_rel_err(a.grad, b.grad) for a, b in zip(leaves, ref_leaves)])


def _randn(*shape, device, dtype, scale=1.0):
    return (scale * torch.randn(*shape, device=device)).to(dtype)


def _layer_norm(device, dtype):
    from gpt2_triton.kernels import layer_norm
    x, w, b = _randn(5, 96, device=device, dtype=dtype), _randn(96, device=device, dtype=dtype), \
        _randn(96, device=device, dtype=dtype)
    return _grads_err(layer_norm, reference.layer_norm, [x, w, b])


def _attention(device, dtype):
    from gpt2_triton.kernels import flash_attention
    q, k, v = (_randn(1, 2, 64, 64, device=device, dtype=dtype) for _ in range(3))
    return _grads_err(flash_attention, reference.flash_attention, [q, k, v])


def _gelu_mlp(device, dtype):
    from gpt2_triton.kernels import gelu_mlp
    params = [_randn(37, 64, device=device, dtype=dtype), _randn(256, 64, device=device, dtype=dtype, scale=0.1),
              _randn(256, device=device, dtype=dtype), _randn(64, 256, device=device, dtype=dtype, scale=0.1),
              _randn(64, device=device, dtype=dtype)]
    return _grads_err(gelu_mlp, reference.gelu_mlp, params)


def _linear_gelu(device, dtype):
    from gpt2_triton.kernels import linear_gelu
    params = [_randn(37, 64, device=device, dtype=dtype), _randn(96, 64, device=device, dtype=dtype, scale=0.1),
              _randn(96, device=device, dtype=dtype)]
    return _grads_err(linear_gelu, reference.linear_gelu, params)


def _weight_grad(split_k):
    def check(device, dtype):
        from gpt2_triton.kernels import mlp
        a, b = _randn(4096, 64, device=device, dtype=dtype), _randn(4096, 96, device=device, dtype=dtype)
        out = torch.empty((64, 96), device=device, dtype=torch.float32)
        mlp.split_matmul(a.t(), b, out, split_k) if split_k > 1 else mlp.launch_matmul(a.t(), b, out)
        return _rel_err(out, a.t().float() @ b.float())
    return check


def _cross_entropy(device, dtype):
    from gpt2_triton.kernels import cross_entropy
    logits = _randn(8, 320, device=device, dtype=dtype, scale=3.0)
    targets = torch.randint(0, 300, (8,), device=device)
    return _grads_err(lambda x: cross_entropy(x, targets, num_classes=300),
                      lambda x: reference.cross_entropy(x, targets, num_classes=300), [logits])


def _linear_cross_entropy(device, dtype):
    from gpt2_triton.kernels import linear_cross_entropy
    x, w = _randn(48, 64, device=device, dtype=dtype), _randn(320, 64, device=device, dtype=dtype, scale=0.2)
    targets = torch.randint(0, 300, (48,), device=device)
    return _grads_err(lambda a, b: linear_cross_entropy(a, b, targets, chunk_size=16, num_classes=300),
                      lambda a, b: reference.linear_cross_entropy(a, b, targets, num_classes=300), [x, w])


def _linear_cross_entropy_no_grad(device, dtype):
    from gpt2_triton.kernels import linear_cross_entropy
    x, w = _randn(48, 64, device=device, dtype=dtype), _randn(320, 64, device=device, dtype=dtype, scale=0.2)
    targets = torch.randint(0, 300, (48,), device=device)
    with torch.no_grad():
        return _rel_err(linear_cross_entropy(x, w, targets, num_classes=300),
                        reference.linear_cross_entropy(x.float(), w.float(), targets, num_classes=300))


ITEMS = (
    Item("layer_norm fwd+bwd", "kernels", None, (), _layer_norm),
    Item("attention fwd+bwd", "TMA", "tma", (), _attention),
    Item("attention fwd+bwd", "pointer loads", None, ("tma",), _attention),
    Item("gelu_mlp fwd+bwd", "kernels", None, (), _gelu_mlp),
    Item("linear_gelu fwd+bwd", "kernels", None, (), _linear_gelu),
    Item("weight-gradient matmul", "split-K", "split_k", (), _weight_grad(4)),
    Item("weight-gradient matmul", "no split", None, ("split_k",), _weight_grad(1)),
    Item("cross_entropy fwd+bwd", "kernels", None, (), _cross_entropy),
    Item("linear_cross_entropy fwd+bwd", "addmm(out_dtype=fp32)", "fp32_out_addmm", (), _linear_cross_entropy,
         "addmm"),
    Item("linear_cross_entropy fwd+bwd", "mm(out_dtype=fp32)", "fp32_out_mm", ("fp32_out_addmm",),
         _linear_cross_entropy, "mm"),
    Item("linear_cross_entropy fwd+bwd", "fp32 copies", None, ("fp32_out_addmm", "fp32_out_mm"),
         _linear_cross_entropy, "upcast"),
    Item("linear_cross_entropy no grad", "fused kernel", None, (), _linear_cross_entropy_no_grad),
)


def tolerance(dtype: torch.dtype) -> float:
    """Relative RMS error allowed against the fp32 reference: a wrong kernel is far off, not close."""
    return 2e-2 if dtype in (torch.float16, torch.bfloat16) else 1e-3


def item_dtype(item: Item, device: torch.device) -> torch.dtype:
    """bf16 on a GPU; on CPU (the interpreter) fp32, and fp16 where a path exists only for 16-bit
    tensors (TMA attention, fp32-output products)."""
    if device.type == "cuda":
        return torch.bfloat16
    sixteen_bit = item.feature == "tma" or "tma" in item.forced_off or item.fp32_out_kind is not None
    return torch.float16 if sixteen_bit else torch.float32


def not_here(item: Item, device: torch.device) -> Optional[str]:
    """Why the item's path is not one this device's runs take (None: it is)."""
    if item.fp32_out_kind is None:
        return None
    kind = fp32_out_matmul_kind(device)
    if FP32_OUT_KINDS.index(item.fp32_out_kind) < FP32_OUT_KINDS.index(kind):
        return f"torch on {device.type} has no {item.path}: bf16 products reach fp32 through {kind}"
    return None


def run_item(item: Item, device: torch.device) -> dict:
    """One item: ok (ran, within tolerance, and its feature did not fall back), error, seconds; or
    skipped with the reason where its path is not this device's."""
    dtype = item_dtype(item, device)
    row = {"item": item.name, "path": item.path, "feature": item.feature, "dtype": str(dtype).removeprefix("torch."),
           "ok": False, "skipped": "", "rel_err": None, "error": "", "seconds": None}
    reason = not_here(item, device)
    if reason:
        return {**row, "ok": True, "skipped": reason}
    start = time.perf_counter()
    torch.manual_seed(0)
    try:
        with isolated_features(), override_target(fail_features=item.forced_off), warnings.catch_warnings():
            if item.forced_off:  # the forced failures' warnings are no news
                warnings.simplefilter("ignore", RuntimeWarning)
            err = item.check(device, dtype)
            fell_back = failed_features().get(item.feature) if item.feature else None
        if device.type == "cuda":
            torch.cuda.synchronize()
        row["rel_err"] = err
        if fell_back:
            row["error"] = f"fell back: {fell_back}"
        elif not err <= tolerance(dtype):
            row["error"] = f"relative RMS error {err:.2e} against the fp32 reference (allowed {tolerance(dtype):.0e})"
        else:
            row["ok"] = True
    except Exception as e:  # noqa: BLE001 - the row says what broke; the next item runs
        row["error"] = f"{type(e).__name__}: {e}"[:500]
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def run(device: torch.device, on_row: Callable[[dict], None]) -> list:
    rows = []
    for item in ITEMS:
        row = run_item(item, device)
        on_row(row)
        rows.append(row)
    return rows
