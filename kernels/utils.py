"""Shared helpers for the kernels: interpreter detection and input checks. Nothing probes the GPU here."""
import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def is_interpreter() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


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
    if device.type == "cpu" and not is_interpreter():
        raise RuntimeError(
            f"{op}: Triton kernels need a CUDA tensor; on CPU set TRITON_INTERPRET=1 "
            "(before triton is imported) to run them through Triton's interpreter")


def check_same_dtype(op: str, **tensors: torch.Tensor) -> None:
    dtypes = {name: t.dtype for name, t in tensors.items() if t is not None}
    if len(set(dtypes.values())) > 1:
        found = ", ".join(f"{n} {d}" for n, d in dtypes.items())
        raise TypeError(f"{op}: tensors must share one dtype; got {found}")
