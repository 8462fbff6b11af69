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
    smem_per_block: Optional[int] = None  # shared memory / LDS one program may use (opt-in), bytes; where known
    arch: Optional[str] = None  # the architecture ARCHS describes (what the launchers pick tiles for)


GPUS = (
    # HGX B200 datasheet (per GPU: 4.5 PFLOP/s bf16 with sparsity, 2.25 dense; 8 TB/s HBM3e); 148 SMs and
    # 227 KB shared memory per block: CUDA C++ Programming Guide, compute capability 10.0. A GB200 is faster
    # and not in the table.
    GPU("B200", 2.25e15, 8.0e12, 148, 232448, "sm_100"),
    GPU("H200", 989.5e12, 4.8e12, 132, 232448, "sm_90"),
    GPU("H100 PCIe", 756e12, 2.0e12, 114, 232448, "sm_90"),
    GPU("H100", 989.5e12, 3.35e12, 132, 232448, "sm_90"),  # SXM5, HBM3
    GPU("GH200", 989.5e12, 4.0e12, 132, 232448, "sm_90"),
    # AMD Instinct MI300X datasheet: 1307.4 TFLOP/s bf16 dense, 5.3 TB/s HBM3, 304 CUs; CDNA3 white paper:
    # 64 KB LDS per CU.
    GPU("MI300X", 1307.4e12, 5.3e12, 304, 65536, "gfx942"),
    # AMD Instinct MI355X datasheet: 2.5 PFLOP/s bf16 dense (2516.6 TFLOP/s), 8 TB/s HBM3E, 256 CUs; CDNA4
    # white paper: 160 KB LDS per CU.
    GPU("MI355X", 2516.6e12, 8.0e12, 256, 163840, "gfx950"),
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


@dataclass(frozen=True)
class Arch:
    """What the launchers and the tuner's static rule know of one GPU architecture."""
    name: str  # "sm_90" | "sm_100" | "gfx942" | "gfx950"
    vendor: str  # "nvidia" | "amd"
    gpu: str  # the GPUS entry whose SM / CU count and peaks stand for it
    smem_per_block: int  # shared memory (NVIDIA, opt-in) / LDS (AMD) one program may use, bytes
    register_file: int  # bytes of registers per SM (NVIDIA) / vector registers per CU (AMD)
    tf32: bool  # tl.dot takes input_precision="tf32" (triton's backend options for the arch)
    tma: bool  # a TMA unit reads tensor descriptors (NVIDIA sm_90 and later)
    target: tuple  # triton's GPUTarget (backend, arch, warp size) that compiles for it


# Sources: CUDA C++ Programming Guide, compute capability tables 9.0 and 10.0 (64K 32-bit registers per SM,
# 227 KB shared memory per block); AMD CDNA3 and CDNA4 ISA guides (512 VGPRs of 64 lanes x 4 bytes per SIMD,
# 4 SIMDs per CU: 512 KB per CU) and white papers (LDS 64 KB per CU on CDNA3, 160 KB on CDNA4); tf32: triton
# 3.9's HIPOptions accept "tf32" on gfx942 only (tests/test_compat.py checks it against the backend).
ARCHS = {a.name: a for a in (
    Arch("sm_90", "nvidia", "H100", 232448, 65536 * 4, True, True, ("cuda", 90, 32)),
    Arch("sm_100", "nvidia", "B200", 232448, 65536 * 4, True, True, ("cuda", 100, 32)),
    Arch("gfx942", "amd", "MI300X", 65536, 512 * 64 * 4 * 4, True, False, ("hip", "gfx942", 64)),
    Arch("gfx950", "amd", "MI355X", 163840, 512 * 64 * 4 * 4, False, False, ("hip", "gfx950", 64)),
)}


def arch_gpu(arch: str) -> GPU:
    """The GPUS entry an architecture's numbers (SMs / CUs, peaks) come from."""
    return next(g for g in GPUS if g.key == ARCHS[arch].gpu)
