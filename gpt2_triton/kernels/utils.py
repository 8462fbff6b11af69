"""Shared helpers for the kernels: the target machine, input checks and the autocast policy.
Nothing probes the GPU at import.

Autocast policy of the public ops (one rule, applied by each op itself, so every caller gets it):
custom kernels are invisible to autocast, so each public op asks `autocast_dtype(device_type)` and
- matmul-type ops (flash_attention, gelu_mlp, linear_gelu, the matmul inside linear_cross_entropy)
  cast their float activations to the autocast dtype and return that dtype, as autocast does for
  F.linear / SDPA; parameters are read in their own dtype (fp32 master weights are cast tile by
  tile or once per call) and their grads come back in that dtype, accumulated in fp32;
- fp32-policy ops (layer_norm, cross_entropy) compute in fp32 whatever the input dtype, as
  autocast's fp32 list says; without `out_dtype`, layer_norm returns what F.layer_norm returns in the
  same context (fp32 under CUDA autocast; x's dtype under CPU autocast, which leaves layer_norm alone).
The launchers then run with autocast off (`autocast_disabled`), so the few torch ops inside them
(sums, casts, matmuls of the chunked paths) keep the dtypes the launcher chose.
"""
import contextlib
import functools
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Optional

import torch
from torch.utils.weak import WeakIdKeyDictionary

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class Target:
    """What the launchers assume about the machine they launch on. Every launcher and check reads it
    through `target()` (or the functions below that do); `override_target(...)` replaces it for a block,
    e.g. the static profile sizing an H100's grids on fake CPU tensors. None means: ask the tensor's
    device (its type, its SM count, which fp32-output matmuls its torch has)."""
    interpreter: bool  # kernels run on the CPU through Triton's interpreter (TRITON_INTERPRET=1)
    device_type: Optional[str] = None  # "cuda": every tensor stands for a CUDA tensor
    sm_count: Optional[int] = None
    smem_per_block: Optional[int] = None  # bytes of shared memory one program may use
    fp32_out_matmul_kind: Optional[str] = None  # "addmm" | "mm" | "upcast"
    max_configs: Optional[int] = None  # autotune candidates tried on first contact (None: autotune's default)
    tuning_dir: Optional[str] = None  # persisted autotuning ("": none; None: under Triton's cache dir)
    fail_features: tuple = ()  # FEATURES forced to fail when tried (tests of the fallbacks)
    arch: Optional[str] = None  # devices.ARCHS key the launchers pick tiles and paths for (None: the device's)


_override: Optional[Target] = None


def target() -> Target:
    """The override in force, else this process's machine (the interpreter from TRITON_INTERPRET)."""
    if _override is not None:
        return _override
    return Target(interpreter=os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))


@contextlib.contextmanager
def override_target(**fields):
    """`with override_target(interpreter=False, device_type="cuda", sm_count=132, ...):` the launchers
    and checks see that machine inside the block (process-wide, autograd's threads included)."""
    global _override
    previous = _override
    _override = replace(target(), **fields)
    try:
        yield _override
    finally:
        _override = previous


def is_interpreter() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter."""
    return target().interpreter


def device_type(device: torch.device) -> str:
    """The device type the launchers treat `device` as (the target's, where it names one)."""
    return target().device_type or device.type


def asserts_on_device(device: torch.device) -> bool:
    """Checks of tensor values run as device-side asserts (no host sync) everywhere but on the CPU."""
    return device_type(device) != "cpu"


def check_float(op: str, name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor; got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16; got {t.dtype}")


def check_device(op: str, **tensors: torch.Tensor) -> None:
    """All tensors on one device, and that device can run Triton (CUDA, or CPU under the interpreter)."""
    devices = {name: t.device for name, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        found = ", ".join(f"{n} on {d}" for n, d in devices.items())
        raise ValueError(f"{op}: all tensors must be on the same device; got {found}")
    device = next(iter(devices.values()))
    if device_type(device) == "cpu" and not is_interpreter():
        raise RuntimeError(
            f"{op}: Triton kernels need a CUDA tensor; on CPU set TRITON_INTERPRET=1 "
            "(before triton is imported) to run them through Triton's interpreter")


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        found = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise TypeError(f"{op}: tensors must share one dtype; got {found}")


def row_major(t: torch.Tensor) -> torch.Tensor:
    """t itself when its last dimension is contiguous (what the row kernels index), else a contiguous copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def split_heads(qkv: torch.Tensor, n_head: int):
    """The (B, T, 3C) QKV projection (q | k | v along the last dim, heads side by side) -> q, k, v as
    (B, n_head, T, C // n_head) views: no copy."""
    B, T, C3 = qkv.shape
    return qkv.unflatten(2, (3, n_head, C3 // (3 * n_head))).permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(y: torch.Tensor) -> torch.Tensor:
    """(B, H, T, D) -> (B, T, H * D), heads side by side (no copy when y is stored as (B, T, H, D))."""
    B, H, T, D = y.shape
    return y.transpose(1, 2).reshape(B, T, H * D)


def _autocast_enabled(device_type: str) -> bool:
    """torch.is_autocast_enabled, False for device types autocast does not know (e.g. "meta")."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def autocast_dtype(device_type: str) -> Optional[torch.dtype]:
    """The dtype autocast runs matmuls in on `device_type` ("cuda", "cpu"), or None where it is off."""
    if _autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def cast_floats(dtype: Optional[torch.dtype], *tensors):
    """tensors with every floating-point one cast to dtype (None entries and dtype None: unchanged)."""
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if t is not None and t.is_floating_point() else t for t in tensors)


# Casts of model parameters, one per version of their values: parameter -> (version, storage, dtype, cast).
_weight_casts = WeakIdKeyDictionary()


def cast_weight(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """weight in dtype, for a matmul that reads it in the activations' dtype (fp32 master weights under
    bf16 autocast). An nn.Parameter is cast once per version of its values and the cast reused until they
    change (an optimizer step, a load, any in-place write bumps the version): one cast per optimizer step
    however many micro-steps, forwards and backwards read it. Other tensors (views, activations) and
    traced code (torch.compile) cast on every call. The cast is a copy: writing into it changes nothing."""
    if weight.dtype == dtype:
        return weight
    if not isinstance(weight, torch.nn.Parameter) or torch.compiler.is_compiling():
        return weight.to(dtype)
    key = (weight._version, weight.device, weight.untyped_storage().data_ptr(), weight.storage_offset(), dtype)
    entry = _weight_casts.get(weight)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = (key, weight.detach().to(dtype))
        _weight_casts[weight] = entry
    return entry[1]


def autocast_disabled(device_type: str):
    """Context manager: autocast off on device_type while a launcher runs its own torch ops."""
    if not _autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, enabled=False)


@functools.cache
def _cuda_sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> Optional[int]:
    """Streaming multiprocessors of a CUDA device (asked when a launcher sizes a grid, never at import);
    None for other devices (the interpreter on CPU)."""
    if target().sm_count is not None:
        return target().sm_count
    if device.type != "cuda" or is_interpreter():
        return None
    return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.cache
def _cuda_smem_per_block(device_index: int) -> int:
    from gpt2_triton.kernels import compat  # what Triton itself checks a kernel's shared memory against
    return compat.max_shared_mem(device_index)


def smem_per_block(device: torch.device) -> Optional[int]:
    """Shared memory one program may use on a CUDA device (with opt-in), None for other devices."""
    if target().smem_per_block is not None:
        return target().smem_per_block
    if device.type != "cuda" or is_interpreter():
        return None
    return _cuda_smem_per_block(device.index if device.index is not None else torch.cuda.current_device())


def device_guard(device: torch.device):
    """Context manager: `device` is CUDA's current device inside (Triton launches on the current
    device and allocates a kernel's global scratch there), so tensors on cuda:1 run on cuda:1."""
    if device.type != "cuda" or is_interpreter():
        return contextlib.nullcontext()
    return torch.cuda.device(device)


@functools.cache
def _cuda_arch(device_index: int) -> str:
    props = torch.cuda.get_device_properties(device_index)
    if torch.version.hip:  # ROCm's torch: gcnArchName is e.g. "gfx942:sramecc+:xnack-"
        return props.gcnArchName.split(":")[0]
    return f"sm_{props.major}{props.minor}"


def gpu_arch(device: Optional[torch.device] = None) -> Optional[str]:
    """The architecture the launchers pick tiles and paths for: the target's, else the CUDA / ROCm device's
    ("sm_90", "sm_100", "gfx942", ...; ROCm builds of torch report torch.version.hip), asked at launch;
    None on the CPU and under the interpreter."""
    if target().arch is not None:
        return target().arch
    if device is None or device.type != "cuda" or is_interpreter():
        return None
    return _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())


def known_arch(device: Optional[torch.device] = None):
    """devices.ARCHS' entry for gpu_arch(device); None for an architecture not in the table (the launchers
    then pick as for sm_90)."""
    from gpt2_triton.devices import ARCHS
    return ARCHS.get(gpu_arch(device))


def tf32_ok(device: Optional[torch.device] = None) -> bool:
    """tl.dot takes input_precision="tf32" on this architecture (unknown ones: True, as on sm_90)."""
    arch = known_arch(device)
    return arch is None or arch.tf32


def tma_hardware(device: Optional[torch.device] = None) -> bool:
    """Tensor descriptors are read by a TMA unit (NVIDIA sm_90 and later; unknown ones: True, as on sm_90).
    AMD's CDNA3/4 have none: Triton lowers a descriptor to masked loads there, and the pointer-load
    path is the one tuned for it."""
    arch = known_arch(device)
    return arch is None or arch.tma


def dot_precision(dtype: torch.dtype, device: Optional[torch.device] = None) -> str:
    """tl.dot's input_precision for operands of `dtype`: fp32 "ieee" (exact fp32 products: tf32 would break
    fp32 tolerances); fp16/bf16 "tf32" where the architecture accepts it (the option is ignored for them),
    else "ieee"."""
    return "tf32" if dtype != torch.float32 and tf32_ok(device) else "ieee"


def target_paths(device: Optional[torch.device] = None) -> dict:
    """The per-architecture choices the launchers make on `device` (recorded by the headline's preflight)."""
    return {"arch": gpu_arch(device), "known": known_arch(device) is not None,
            "bf16_input_precision": dot_precision(torch.bfloat16, device), "attention_tma": tma_hardware(device)}


@functools.cache
def _cuda_fp32_out_matmul_kind(device_index: int) -> str:
    device = torch.device("cuda", device_index)
    a = torch.zeros((2, 2), dtype=torch.bfloat16, device=device)
    acc = torch.zeros((2, 2), dtype=torch.float32, device=device)
    kind = "upcast"
    try:
        torch.mm(a, a, out_dtype=torch.float32)
        kind = "mm"
        torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
        kind = "addmm"
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    return kind


def fp32_out_matmul_kind(device: torch.device) -> str:
    """How fp16/bf16 products reach an fp32 output on `device` without rounding to the inputs' dtype:
    'addmm' (torch.addmm(acc, a, b, out_dtype=float32, out=acc), recent torch on CUDA), 'mm'
    (torch.mm(a, b, out_dtype=float32) only) or 'upcast' (fp32 copies: CPU, whose torch has no
    aten::mm.dtype kernel). Found with a tiny call on the GPU the first time it is asked, never at import."""
    if target().fp32_out_matmul_kind is not None:
        return target().fp32_out_matmul_kind
    if device.type != "cuda":
        return "upcast"
    return _cuda_fp32_out_matmul_kind(device.index if device.index is not None else torch.cuda.current_device())


# ----------------------------------------------------------------------------------------------
# Features with a fallback: one place decides, per process, whether a faster path is used.
# ----------------------------------------------------------------------------------------------
FEATURES = {
    "tma": "attention: fp16/bf16 tiles read through TMA descriptors (fallback: pointer loads)",
    "split_k": "matmul: weight gradients split over K (fallback: one program per output tile)",
    "fp32_out_addmm": "weight gradients by the vendor's matmul (linear, linear_cross_entropy): torch.addmm("
                      "out_dtype=float32) into the fp32 gradient (fallback: torch.mm(out_dtype=float32))",
    "fp32_out_mm": "weight gradients by the vendor's matmul: torch.mm(out_dtype=float32) (fallback: fp32 copies "
                   "of the operands)",
}
_failed_features: dict = {}  # feature -> why it failed, in this process


def feature_failed(name: str) -> Optional[str]:
    """Why `name` failed in this process (it then always takes its fallback), or None."""
    return _failed_features.get(name)


def failed_features() -> dict:
    return dict(_failed_features)


def mark_feature_failed(name: str, reason: str) -> None:
    """From now on `name` takes its fallback (e.g. the headline's preflight found it broken)."""
    if name not in FEATURES:
        raise KeyError(f"unknown feature {name!r}; known: {sorted(FEATURES)}")
    _failed_features.setdefault(name, reason)


def reset_features() -> None:
    _failed_features.clear()


@contextlib.contextmanager
def isolated_features():
    """The record of failed features as it was before the block, again after it (a probe or a test that
    makes a feature fail leaves no trace)."""
    saved = dict(_failed_features)
    try:
        yield
    finally:
        _failed_features.clear()
        _failed_features.update(saved)


def with_fallbacks(attempts: Sequence[tuple], last: Callable):
    """The result of the first of `attempts` ((feature, fn) pairs) that runs, else of last(). A feature
    that raises is recorded (with a warning, once) and skipped from then on; running out of memory is
    no feature's fault and is raised."""
    for name, fn in attempts:
        if name in _failed_features:
            continue
        try:
            if name in target().fail_features:
                raise RuntimeError(f"{name} forced to fail (override_target(fail_features=...))")
            return fn()
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as e:  # noqa: BLE001 - any failure of the faster path: take the fallback
            reason = f"{type(e).__name__}: {e}"[:500]
            mark_feature_failed(name, reason)
            warnings.warn(f"gpt2_triton: {FEATURES[name]} failed, using the fallback from now on: {reason}",
                          RuntimeWarning, stacklevel=2)
    return last()


def document_bounds(starts: torch.Tensor) -> torch.Tensor:
    """Document boundaries of a (B, T) batch of packed rows, for attention that stays inside documents.

    starts: (B, T) bool, True where a document begins (e.g. `idx == EOT_ID`: GPT-2 data puts the
    end-of-text token before each document); position 0 always begins one. Returns (B, 2, T) int32:
    [:, 0] the first position of each token's document, [:, 1] one past its last, row-local. Device
    ops only (cummax / cummin), no host sync."""
    B, T = starts.shape
    pos = torch.arange(T, dtype=torch.int32, device=starts.device)  # (T,)
    begins = starts.bool() | (pos == 0)  # (B, T)
    start = torch.where(begins, pos, 0).cummax(dim=1).values  # (B, T): the latest start at or before t
    later = torch.where(begins[:, 1:], pos[1:], T)  # (B, T - 1): starts after position 0
    end = torch.cat([later, later.new_full((B, 1), T)], dim=1).flip(1).cummin(dim=1).values.flip(1)
    return torch.stack([start, end], dim=1).to(torch.int32)
