"""FLOP formulas shared by the kernel benches and the static profile."""


def attention_flops(B, H, T, D, causal, mode):
    """Standard count: fwd 4·B·H·T²·D (x0.5 causal); bwd 2.5x fwd."""
    fwd = 4 * B * H * T * T * D * (0.5 if causal else 1.0)
    return {"fwd": fwd, "bwd": 2.5 * fwd, "fwd+bwd": 3.5 * fwd}[mode]


def matmul_flops(M, N, K):
    return 2 * M * N * K
