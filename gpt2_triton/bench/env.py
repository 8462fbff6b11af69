"""Where a benchmark runs: the device, its name as a folder, the matmul library, the commit and the
versions every result row carries."""
import datetime
import platform
import re
import subprocess
from pathlib import Path

import torch

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def has_cuda() -> bool:
    return torch.cuda.is_available()


def device_name() -> str:
    return torch.cuda.get_device_name() if has_cuda() else f"cpu ({platform.processor() or platform.machine()})"


def device_slug() -> str:
    """Folder name for results: 'nvidia-h100-80gb-hbm3', 'cpu'."""
    if not has_cuda():
        return "cpu"
    return "".join(c if c.isalnum() else "-" for c in device_name().lower()).strip("-")


def matmul_provider() -> str:
    """The library torch's matmul runs on here: "cublas", "hipblas", or the CPU BLAS torch was built with."""
    if has_cuda():
        return "hipblas" if torch.version.hip else "cublas"
    blas = re.search(r"BLAS_INFO=(\w+)", torch.__config__.show())
    return {"mkl": "mkl", "open": "openblas"}.get(blas[1] if blas else "", "cpu-blas")


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent, timeout=5).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment() -> dict:
    import triton
    return {
        "device": device_name(),
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "driver": nvidia_smi(("driver_version",)).get("driver_version") if has_cuda() else None,
        "git_commit": git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def nvidia_smi(fields) -> dict:
    """What nvidia-smi reports for GPU 0; fields it cannot read are left out."""
    def query(names):
        try:
            out = subprocess.run(["nvidia-smi", "-i", "0", f"--query-gpu={','.join(names)}",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=15)
        except (OSError, subprocess.SubprocessError):
            return None
        if out.returncode != 0 or not out.stdout.strip():
            return None
        values = [v.strip() for v in out.stdout.strip().splitlines()[0].split(",")]
        return dict(zip(names, values)) if len(values) == len(names) else None

    values = query(fields)
    if values is None:  # an unknown field fails the whole query: ask one at a time
        values = {}
        for field in fields:
            values.update(query([field]) or {})
    return {k: v for k, v in values.items() if v and "N/A" not in v and "Not Supported" not in v}
