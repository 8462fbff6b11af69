"""Flash attention: dense (B, H, T, D), on the model's (B, T, 3C) QKV projection (optionally
document-masked), and over sequences packed along the token axis.

    from gpt2_triton.kernels.attention import flash_attention, flash_attention_qkv, flash_attention_varlen

Modules, each importing only those before it: core (the loops over tiles, key windows, TMA, candidate
tiles, input checks, the launch helper), dense and varlen (their kernels, launchers and custom ops),
api (the autograd Functions and the public ops).
"""
from gpt2_triton.kernels.attention.api import flash_attention, flash_attention_qkv, flash_attention_varlen
from gpt2_triton.kernels.attention.core import SUPPORTED_HEAD_DIMS

__all__ = ["flash_attention", "flash_attention_qkv", "flash_attention_varlen", "SUPPORTED_HEAD_DIMS"]
