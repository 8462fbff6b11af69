"""Known GPUs: dense bf16 peak FLOP/s, HBM bandwidth and SM count, from the vendors' data sheets.

The one table behind MFU (training and bench), the bench's fraction of HBM bandwidth, and the H100 the
static profile compiles for. A GPU is matched on its `torch.cuda.get_device_name()`, first entry that
the name contains (so "H100 PCIe" comes before "H100").
"""
from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class GPU:
    key: str  # a substring of the device name
    bf16_flops: float  # dense (no sparsity) bf16 tensor-core peak, FLOP/s; V100: fp16
    hbm_bytes_per_s: float
    sms: int
    smem_per_block: Optional[int] = None  # shared memory one program may use (opt-in), bytes; where known


GPUS = (
    GPU("B200", 2.25e15, 8.0e12, 148),  # HGX B200 datasheet (per GPU); a GB200 is faster and not in the table
    GPU("H200", 989.5e12, 4.8e12, 132, 232448),
    GPU("H100 PCIe", 756e12, 2.0e12, 114, 232448),
    GPU("H100", 989.5e12, 3.35e12, 132, 232448),  # SXM5, HBM3
    GPU("GH200", 989.5e12, 4.0e12, 132, 232448),
    GPU("A100", 312e12, 2.0e12, 108),
    GPU("A10G", 125e12, 0.6e12, 80),
    GPU("A10", 125e12, 0.6e12, 72),
    GPU("L40S", 362e12, 0.864e12, 142),
    GPU("L4", 121e12, 0.3e12, 58),
    GPU("RTX 4090", 165e12, 1.0e12, 128),
    GPU("RTX 3090", 71e12, 0.936e12, 82),
    GPU("V100", 125e12, 0.9e12, 80),
)
H100 = next(g for g in GPUS if g.key == "H100")  # what the static profile targets (sm_90)


def gpu_named(name: str) -> Optional[GPU]:
    """The table entry for a device name, or None for a GPU not in the table."""
    return next((g for g in GPUS if g.key in name), None)


def cuda_gpu(device=None) -> Optional[GPU]:
    """The table entry of a CUDA device (the current one by default); None without CUDA or when unknown."""
    import torch  # here: the table itself is read by processes that never load torch (compile workers)
    if not torch.cuda.is_available():
        return None
    return gpu_named(torch.cuda.get_device_name(device))


# Per-SM limits of compute capability 9.0 (H100 / H200), for occupancy: CUDA C++ Programming Guide, its
# compute capability table (64K 32-bit registers per SM allocated per warp in units of 256, 228 KB shared
# memory per SM of which 227 KB per block and 1 KB reserved per block, 64 warps, 32 blocks).
SM90_LIMITS = {"regs_per_sm": 65536, "reg_alloc_unit": 256, "smem_per_sm": 233472, "smem_per_block": 232448,
               "smem_reserved_per_block": 1024, "max_warps_per_sm": 64, "max_ctas_per_sm": 32}
