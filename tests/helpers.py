"""One comparison helper for every test: failures name the max abs error and the relative RMS error."""
import pytest
import torch


def error_stats(actual: torch.Tensor, expected: torch.Tensor):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = a - e
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rel_rms = (diff.pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp(min=1e-30)).item() if diff.numel() else 0.0
    return max_abs, rel_rms


def assert_close(actual, expected, atol=1e-5, rtol=1e-5, name="tensor"):
    """torch.testing.assert_close with a message that gives max abs and relative RMS error."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    max_abs, rel_rms = error_stats(actual, expected)
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), atol=atol, rtol=rtol,
        msg=lambda m: f"{name}: max abs err {max_abs:.3e}, rel RMS err {rel_rms:.3e}\n{m}")


def assert_close_to_ref(ours, torch_same_dtype, ref_fp32, factor=2.0, atol=1e-5, name="tensor"):
    """Low-precision rule: our error vs the fp32 reference is at most `factor`x PyTorch's own
    error in the same dtype, plus atol (max-abs and RMS both checked)."""
    assert ours.shape == ref_fp32.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref_fp32.shape)}"
    ours_max, ours_rms = error_stats(ours, ref_fp32)
    torch_max, torch_rms = error_stats(torch_same_dtype, ref_fp32)
    msg = (f"{name}: ours max abs {ours_max:.3e} / rel RMS {ours_rms:.3e}; "
           f"PyTorch same dtype max abs {torch_max:.3e} / rel RMS {torch_rms:.3e}")
    assert ours_max <= factor * torch_max + atol, msg
    assert ours_rms <= factor * torch_rms + atol, msg


def require_sm90_compiler():
    """Skip the calling test module unless triton's NVIDIA backend and its ptxas are installed: they
    compile kernels for sm_90 without a GPU. Returns the triton module."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("triton.backends.nvidia.compiler",
                        reason="triton's NVIDIA backend is not available: cannot compile for sm_90")
    from gpt2_triton.bench.static.native import ptxas_path
    if ptxas_path() is None:
        pytest.skip("ptxas (bundled with triton's NVIDIA backend) not found: cannot compile for sm_90",
                    allow_module_level=True)
    return triton
