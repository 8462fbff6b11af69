"""Fused GELU-MLP (kernels/mlp.py) vs kernels/reference.py: forward, every gradient, GELU edge values."""
import functools

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_close_to_ref, error_stats, saved_bytes

from gpt2_triton.kernels import mlp
from gpt2_triton.kernels import reference as ref
from gpt2_triton.kernels.autotune import candidates_of, gpu_configs
from gpt2_triton.kernels.mlp import (
    gelu_mlp,
    gelu_mlp_bwd,
    gelu_mlp_fwd,
    gelu_mlp_pre,
    linear_gelu,
    linear_gelu_bwd,
    linear_gelu_fwd,
)
from gpt2_triton.kernels.utils import feature_failed, is_interpreter, isolated_features, override_target
from gpt2_triton.model import torch_ops

# (x shape, hidden): the last dim of x is C.
SHAPES = [
    pytest.param((1, 16), 64, id="M1-C16-H64"),
    pytest.param((3, 7, 32), 128, id="B3-T7-C32-H128"),
    pytest.param((37, 96), 384, id="M37-C96-H384"),
    pytest.param((5, 9, 40), 200, id="B5-T9-C40-H200"),  # hidden not a multiple of any block
]
PARAM_NAMES = ("x", "fc_weight", "fc_bias", "proj_weight", "proj_bias")
# Low-precision atol: about one fp16 ulp at |value| ~ 1-2. Max errors there are whole output ulps
# (measured: ours <= 2x PyTorch's fp16 error in every case), so this only absorbs a one-ulp tie.
LOWP_ATOL = 1e-3
# Triton's interpreter (3.9) rounds fp32 -> bf16 toward zero where GPUs round to nearest even, doubling
# the error of every bf16 store (measured in the bf16 autocast tests here: up to 2.3x PyTorch's error).
BF16_FACTOR = 3.0 if is_interpreter() else 2.0
GELU_EDGE_VALUES = [-1e4, -100.0, -10.0, -5.0, -3.0, -1.0, -0.5, -1e-3, 0.0, 1e-3, 0.5, 1.0, 3.0, 5.0,
                    10.0, 100.0, 1e4]



def mlp_bwd(dy, x, pre, fc_w, proj_w, accumulate=(False, False, False, False)):
    """gelu_mlp_bwd into fresh grad buffers (or .grad-like ones given as accumulate targets):
    (dx, dfc_w, dfc_b, dproj_w, dproj_b)."""
    H, C = fc_w.shape
    bufs = [torch.zeros(shape, dtype=w.dtype, device=x.device)
            for shape, w in (((H, C), fc_w), ((H,), fc_w), ((C, H), proj_w), ((C,), proj_w))]
    dx = gelu_mlp_bwd(dy, x, pre, fc_w, proj_w, *bufs, accumulate)
    return (dx, *bufs)


def lin_bwd(dout, x, pre, w):
    """linear_gelu_bwd into fresh buffers: (dx, dw, db)."""
    dw, db = torch.empty_like(w), torch.empty((w.shape[0],), dtype=w.dtype, device=w.device)
    return linear_gelu_bwd(dout, x, pre, w, dw, db, (False, False)), dw, db

def fp32_tol(expected):
    """Tight fp32 tolerance, scaled by the magnitude of the tensor (grads sum over many rows)."""
    return dict(atol=1e-5 * max(1.0, expected.abs().max().item()), rtol=1e-5)


def make_mlp_inputs(x_shape, hidden, dtype, device, param_dtype=None, seed=0):
    """x and nn.Linear-layout parameters scaled so pre-activations are O(1) (GELU's curved part)."""
    gen = torch.Generator().manual_seed(seed)
    C = x_shape[-1]
    param_dtype = param_dtype or dtype

    def rand(*shape, scale=1.0, dt=dtype):
        return (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dt)

    x = rand(*x_shape)
    params = (rand(hidden, C, scale=C ** -0.5, dt=param_dtype), rand(hidden, scale=0.1, dt=param_dtype),
              rand(C, hidden, scale=hidden ** -0.5, dt=param_dtype), rand(C, scale=0.1, dt=param_dtype))
    dy = rand(*x_shape)
    return x, params, dy


def forward_and_grads(fn, inputs, dy, **kwargs):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    out = fn(*leaves, **kwargs)
    grads = torch.autograd.grad(out, leaves, dy)
    return out.detach(), grads


def reference_mlp(x, params, dy):
    """(fp32 reference out/grads, PyTorch-in-same-dtype out/grads) for the low-precision rule."""
    want = forward_and_grads(ref.gelu_mlp, (x, *params), dy)
    torch_same = forward_and_grads(ref.gelu_mlp, (x, *params), dy, upcast=False)
    return want, torch_same


# ---------------------------------------------------------------------------------------------
# gelu_mlp
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("x_shape, hidden", SHAPES)
def test_gelu_mlp_autograd_fp32(x_shape, hidden, device):
    x, params, dy = make_mlp_inputs(x_shape, hidden, torch.float32, device)
    out, grads = forward_and_grads(gelu_mlp, (x, *params), dy)
    (want, want_grads), _ = reference_mlp(x, params, dy)
    assert out.dtype == torch.float32
    assert_close(out, want, **fp32_tol(want), name="y")
    for name, g, w in zip(PARAM_NAMES, grads, want_grads):
        assert g.dtype == torch.float32
        assert_close(g, w, **fp32_tol(w), name=f"d{name}")


@pytest.mark.parametrize("x_shape, hidden", SHAPES)
def test_gelu_mlp_autograd_fp16(x_shape, hidden, device):
    x, params, dy = make_mlp_inputs(x_shape, hidden, torch.float16, device)
    out, grads = forward_and_grads(gelu_mlp, (x, *params), dy)
    (want, want_grads), (torch_out, torch_grads) = reference_mlp(x, params, dy)
    assert out.dtype == torch.float16
    assert_close_to_ref(out, torch_out, want, atol=LOWP_ATOL, name="y")
    for name, g, tg, w in zip(PARAM_NAMES, grads, torch_grads, want_grads):
        assert g.dtype == torch.float16
        assert_close_to_ref(g, tg, w, atol=LOWP_ATOL, name=f"d{name}")


@pytest.mark.parametrize("x_shape, hidden", [SHAPES[2], SHAPES[3]])
def test_gelu_mlp_launchers(x_shape, hidden, device):
    """gelu_mlp_fwd / gelu_mlp_bwd called directly (no autograd) on 2-D inputs."""
    x, params, dy = make_mlp_inputs(x_shape, hidden, torch.float32, device)
    C = x_shape[-1]
    x2d, dy2d = x.reshape(-1, C), dy.reshape(-1, C)
    fc_w, fc_b, proj_w, proj_b = params

    y, pre = gelu_mlp_fwd(x2d, fc_w, fc_b, proj_w, proj_b, True)
    (want, want_grads), _ = reference_mlp(x2d, params, dy2d)
    want_pre = x2d @ fc_w.T + fc_b
    assert_close(y, want, **fp32_tol(want), name="y")
    assert_close(pre, want_pre, **fp32_tol(want_pre), name="pre")

    y_nosave, pre_nosave = gelu_mlp_fwd(x2d, fc_w, fc_b, proj_w, proj_b, False)
    assert pre_nosave.numel() == 0
    torch.testing.assert_close(y_nosave, y, atol=0, rtol=0)

    grads = mlp_bwd(dy2d, x2d, pre, fc_w, proj_w)
    for name, g, w in zip(PARAM_NAMES, grads, want_grads):
        assert_close(g, w, **fp32_tol(w), name=f"d{name}")


def test_gelu_mlp_mixed_dtype_autocast_rule(device):
    """fp16 x with fp32 parameters (autocast): fp16 output, fp32 parameter grads, fp16-level error."""
    x, params, dy = make_mlp_inputs((4, 9, 40), 200, torch.float16, device, param_dtype=torch.float32)
    out, grads = forward_and_grads(gelu_mlp, (x, *params), dy)
    assert out.dtype == torch.float16
    assert grads[0].dtype == torch.float16
    assert all(g.dtype == torch.float32 for g in grads[1:])
    want, want_grads = forward_and_grads(ref.gelu_mlp, (x, *params), dy)
    # Yardstick: PyTorch with everything in fp16 (what autocast would compute).
    torch_out, torch_grads = forward_and_grads(
        ref.gelu_mlp, (x, *(p.half() for p in params)), dy, upcast=False)
    assert_close_to_ref(out, torch_out, want, atol=LOWP_ATOL, name="y")
    for name, g, tg, w in zip(PARAM_NAMES, grads, torch_grads, want_grads):
        assert_close_to_ref(g, tg, w, atol=LOWP_ATOL, name=f"d{name}")


def test_gelu_mlp_without_biases_and_no_grad(device):
    x, (fc_w, _, proj_w, _), dy = make_mlp_inputs((6, 32), 128, torch.float32, device)
    out, grads = forward_and_grads(lambda x, a, b: gelu_mlp(x, a, None, b, None), (x, fc_w, proj_w), dy)
    want, want_grads = forward_and_grads(lambda x, a, b: ref.gelu_mlp(x, a, None, b, None), (x, fc_w, proj_w), dy)
    assert_close(out, want, **fp32_tol(want), name="y")
    for name, g, w in zip(("x", "fc_weight", "proj_weight"), grads, want_grads):
        assert_close(g, w, **fp32_tol(w), name=f"d{name}")
    with torch.no_grad():
        out_nograd = gelu_mlp(x, fc_w, None, proj_w, None)
    torch.testing.assert_close(out_nograd, out, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("x_shape, hidden", SHAPES)
@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_gelu_mlp_recompute_same_bits_without_the_hidden_activation(impl, x_shape, hidden, dtype, device):
    """recompute=True: the output and every grad equal recompute=False bit for bit, and backward keeps
    M·H values fewer (Triton: its pre-activation, so only x is left; torch: c_fc's output)."""
    op = gelu_mlp if impl == "triton" else torch_ops.gelu_mlp
    x, params, dy = make_mlp_inputs(x_shape, hidden, dtype, device)
    def without_biases(x, fc_w, proj_w, recompute=False):
        return op(x, fc_w, None, proj_w, None, recompute=recompute)
    for fn, inputs in ((op, (x, *params)), (without_biases, (x, params[0], params[2]))):
        want, want_grads = forward_and_grads(fn, inputs, dy)
        out, grads = forward_and_grads(functools.partial(fn, recompute=True), inputs, dy)
        assert torch.equal(out, want)
        assert len(grads) == len(inputs) and all(torch.equal(g, w) for g, w in zip(grads, want_grads))
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        kept = [saved_bytes(functools.partial(fn, recompute=r), *leaves, leaves=leaves[1:])[1]
                for r in (False, True)]
        assert kept[0] - kept[1] == x.numel() // x_shape[-1] * hidden * x.element_size()
        if impl == "triton":
            assert kept[1] == x.numel() * x.element_size()


# ---------------------------------------------------------------------------------------------
# linear_gelu
# ---------------------------------------------------------------------------------------------
LINEAR_SHAPES = [
    pytest.param((3, 7, 32), 48, id="B3-T7-K32-N48"),
    pytest.param((37, 40), 200, id="M37-K40-N200"),
]


def make_linear_inputs(x_shape, n_out, dtype, device, seed=1):
    gen = torch.Generator().manual_seed(seed)
    K = x_shape[-1]
    x = torch.randn(*x_shape, generator=gen).to(device, dtype)
    w = (torch.randn(n_out, K, generator=gen) * K ** -0.5).to(device, dtype)
    b = (torch.randn(n_out, generator=gen) * 0.1).to(device, dtype)
    dout = torch.randn(*x_shape[:-1], n_out, generator=gen).to(device, dtype)
    return x, w, b, dout


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("x_shape, n_out", LINEAR_SHAPES)
def test_linear_gelu_autograd(x_shape, n_out, dtype, device):
    x, w, b, dout = make_linear_inputs(x_shape, n_out, dtype, device)
    out, grads = forward_and_grads(linear_gelu, (x, w, b), dout)
    want, want_grads = forward_and_grads(ref.linear_gelu, (x, w, b), dout)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    if dtype == torch.float32:
        assert_close(out, want, **fp32_tol(want), name="out")
        for name, g, wg in zip(("x", "weight", "bias"), grads, want_grads):
            assert_close(g, wg, **fp32_tol(wg), name=f"d{name}")
    else:
        torch_out, torch_grads = forward_and_grads(ref.linear_gelu, (x, w, b), dout, upcast=False)
        assert_close_to_ref(out, torch_out, want, atol=LOWP_ATOL, name="out")
        for name, g, tg, wg in zip(("x", "weight", "bias"), grads, torch_grads, want_grads):
            assert_close_to_ref(g, tg, wg, atol=LOWP_ATOL, name=f"d{name}")


def test_linear_gelu_launchers(device):
    x, w, b, dout = make_linear_inputs((37, 40), 200, torch.float32, device)
    out, pre = linear_gelu_fwd(x, w, b, True)
    want, want_grads = forward_and_grads(ref.linear_gelu, (x, w, b), dout)
    assert_close(out, want, **fp32_tol(want), name="out")
    assert_close(pre, x @ w.T + b, **fp32_tol(want), name="pre")
    assert linear_gelu_fwd(x, w, b, False)[1].numel() == 0
    for name, g, wg in zip(("x", "weight", "bias"), lin_bwd(dout, x, pre, w), want_grads):
        assert_close(g, wg, **fp32_tol(wg), name=f"d{name}")


# ---------------------------------------------------------------------------------------------
# GELU itself: the kernel's GELU is reached exactly through linear_gelu with an identity weight
# (x @ I is exact in fp32) and its derivative through both backward paths.
# ---------------------------------------------------------------------------------------------
def gelu_grad_fp64(x):
    x64 = x.double().requires_grad_()
    (g,) = torch.autograd.grad(F.gelu(x64, approximate="tanh").sum(), x64)
    return g


def test_gelu_matches_torch_including_large_values(device):
    z = torch.tensor(GELU_EDGE_VALUES, device=device).repeat(3)
    z = torch.cat([z, torch.randn(200, device=device) * 4])  # (251,)
    eye = torch.eye(1, device=device)
    out = linear_gelu(z[:, None], eye, None).squeeze(1)
    assert torch.isfinite(out).all()
    want64 = F.gelu(z.double(), approximate="tanh")
    assert_close(out, want64, atol=1e-6, rtol=1e-6, name="gelu vs fp64")
    assert_close(out, F.gelu(z, approximate="tanh"), atol=1e-6, rtol=1e-6, name="gelu vs fp32")
    # Far tails are exact: gelu(x) = x for large x and 0 for very negative x.
    big = torch.tensor([1e4, 100.0, -100.0, -1e4], device=device)
    torch.testing.assert_close(linear_gelu(big[:, None], eye, None).squeeze(1),
                               torch.tensor([1e4, 100.0, 0.0, 0.0], device=device), atol=0, rtol=0)


def test_gelu_derivative_matches_autograd(device):
    z = torch.cat([torch.tensor(GELU_EDGE_VALUES, device=device), torch.randn(100, device=device) * 4])
    want = gelu_grad_fp64(z)
    n = z.numel()
    # Path 1: linear_gelu backward (elementwise GELU-grad kernel): dx = gelu'(z) for W = I, dout = 1.
    x = z[:, None].clone().requires_grad_()
    (dx,) = torch.autograd.grad(linear_gelu(x, torch.eye(1, device=device), None).sum(), x)
    assert torch.isfinite(dx).all()
    assert_close(dx.squeeze(1), want, atol=1e-6, rtol=1e-5, name="gelu' (elementwise kernel)")
    # Path 2: the matmul's GELU-grad epilogue, via gelu_mlp_bwd with W_proj = I: d(pre) = gelu'(pre),
    # so dx = d(pre) @ W_fc = d(pre) for W_fc = I, and dfc_b = column sums of d(pre) = gelu'(pre).
    pre = z[None, :]  # (1, n): each pre value in its own hidden column
    eye_n = torch.eye(n, device=device)
    dx2, _, dfc_b, _, _ = mlp_bwd(torch.ones(1, n, device=device), torch.zeros(1, n, device=device), pre, eye_n,
                                  eye_n)
    assert torch.isfinite(dx2).all()
    assert_close(dx2.squeeze(0), want, atol=1e-6, rtol=1e-5, name="gelu' (matmul epilogue) via dx")
    assert_close(dfc_b, want, atol=1e-6, rtol=1e-5, name="gelu' (matmul epilogue) via dfc_b")


# ---------------------------------------------------------------------------------------------
# The matmul launcher alone: awkward shapes, transposed (strided) operands, bias and GELU epilogues
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("apply_gelu, with_bias", [(False, False), (False, True), (True, True)],
                         ids=["plain", "bias", "bias-gelu"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_matmul_strided_operands(apply_gelu, with_bias, dtype, device):
    M, K, N = 70, 45, 33
    gen = torch.Generator().manual_seed(2)
    a = torch.randn(K, M, generator=gen).to(device, dtype).t()            # (M, K), column-major
    b_full = torch.randn(N, 2 * K, generator=gen).to(device, dtype)
    b = b_full[:, ::2].t()                                                 # (K, N), strides (2, 2K)
    bias = (torch.randn(2 * N, generator=gen) * 0.1).to(device, dtype)[::2] if with_bias else None
    assert not a.is_contiguous() and not b.is_contiguous() and (bias is None or not bias.is_contiguous())

    def torch_version(a, b, bias, upcast):
        a, b, bias = (t.float() if upcast and t is not None else t for t in (a, b, bias))
        out = a @ b if bias is None else a @ b + bias
        return ref.gelu_tanh(out) if apply_gelu else out

    out = mlp.launch_matmul(a, b, torch.empty((M, N), dtype=dtype, device=device), bias=bias,
                             epilogue=mlp.EPI_GELU if apply_gelu else mlp.EPI_NONE)
    want = torch_version(a, b, bias, upcast=True)
    assert out.shape == (M, N) and out.dtype == dtype and out.is_contiguous()
    if dtype == torch.float32:
        assert_close(out, want, **fp32_tol(want), name="out")
    else:
        assert_close_to_ref(out, torch_version(a, b, bias, upcast=False), want, atol=LOWP_ATOL, name="out")


# ---------------------------------------------------------------------------------------------
# Split-K (the weight-grad products): fp32 partials per K range, summed in a fixed order
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("K, split_k", [(45, 3), (128, 2), (200, 4), (40, 8)],
                         ids=["K45-S3", "K128-S2-even", "K200-S4", "K40-S8-empty-splits"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["out_fp32", "out_fp16"])
def test_split_k_matches_reference(K, split_k, out_dtype, device):
    """a (M, K) as a transposed view, like d(pre).T in the weight grads; some splits may get no K at all."""
    M, N = 70, 33
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(K, M, generator=gen).to(device, torch.float16).t()  # (M, K), column-major
    b = torch.randn(K, N, generator=gen).to(device, torch.float16)
    want = a.double() @ b.double()
    out = torch.empty(M, N, dtype=out_dtype, device=device)
    mlp.split_matmul(a, b, out, split_k)
    single = torch.empty(M, N, dtype=out_dtype, device=device)
    mlp.launch_matmul(a, b, single)
    # fp16 products are exact in fp32: only the summation order and the final rounding differ
    tol = dict(atol=1e-4, rtol=1e-5) if out_dtype == torch.float32 else dict(atol=2e-3, rtol=1e-3)
    assert_close(out, want, **tol, name="split-K")
    assert_close(out, single, **tol, name="split-K vs one split")
    again = torch.empty_like(out)
    mlp.split_matmul(a, b, again, split_k)
    assert torch.equal(out, again), "split-K must give the same bits on every run"


def test_split_k_through_the_public_ops(device, monkeypatch):
    """gelu_mlp / linear_gelu weight grads with split-K forced on (off a GPU it is never chosen)."""
    monkeypatch.setattr(mlp, "split_k_for", lambda M, N, K, num_sms, tile: 3)
    x, params, dy = make_mlp_inputs((5, 9, 40), 200, torch.float32, device)
    lx, lw, lb, ldout = make_linear_inputs((37, 40), 200, torch.float32, device)
    with override_target(sm_count=4):
        out, grads = forward_and_grads(gelu_mlp, (x, *params), dy)
        _, lgrads = forward_and_grads(linear_gelu, (lx, lw, lb), ldout)
    (want, want_grads), _ = reference_mlp(x, params, dy)
    for name, g, w in zip(PARAM_NAMES, grads, want_grads):
        assert_close(g, w, **fp32_tol(w), name=f"d{name}")
    _, lwant_grads = forward_and_grads(ref.linear_gelu, (lx, lw, lb), ldout)
    assert_close(lgrads[1], lwant_grads[1], **fp32_tol(lwant_grads[1]), name="linear_gelu dweight")


def test_split_k_failure_falls_back_to_one_split(device, monkeypatch):
    """A split-K launch that fails is recorded once, with a warning, and the weight grads run unsplit."""
    monkeypatch.setattr(mlp, "split_k_for", lambda M, N, K, num_sms, tile: 3)
    x, params, dy = make_mlp_inputs((5, 9, 40), 200, torch.float32, device)
    with isolated_features(), override_target(sm_count=4, fail_features=("split_k",)):
        with pytest.warns(RuntimeWarning, match="split over K"):
            out, grads = forward_and_grads(gelu_mlp, (x, *params), dy)
        assert "forced to fail" in feature_failed("split_k")
    (want, want_grads), _ = reference_mlp(x, params, dy)
    for name, g, w in zip(PARAM_NAMES, grads, want_grads):
        assert_close(g, w, **fp32_tol(w), name=f"d{name}")


def test_matmul_candidates_fit_and_lead_with_the_hand_picked_tile():
    """Per dtype family, the first candidate is the hand-picked tile; every candidate's shared memory
    (the static rule's estimate) fits an H100's 227 KB, so the static rule drops none at GPT-2 shapes."""
    assert mlp.matmul_tiles(torch.bfloat16)[0] == (128, 256, 64, 8, 3)
    assert mlp.matmul_tiles(torch.float32)[0] == (128, 128, 64, 8, 3)  # 128x256x64 spilled 0.4-45 KB in fp32
    spec = candidates_of(mlp._matmul)
    for dtype in (torch.bfloat16, torch.float32):
        args = {"a_ptr": torch.empty(1, dtype=dtype)}
        for tile in mlp.matmul_tiles(dtype):
            assert mlp._matmul_smem(spec.config(tile), args) <= 232448, (dtype, tile)


def test_split_k_choice():
    """The split-K time model at GPT-2 124M training shapes on 132 SMs (an H100), for the tile that runs
    (the hand-picked bf16 tile, 128x256)."""
    B_T, C, H = 16 * 1024, 768, 3072
    tile = mlp.matmul_tiles(torch.bfloat16)[0][:2]
    assert mlp.split_k_for(H, C, B_T, 132, tile) == 3  # dW_fc: 72 output tiles -> 216 programs (1.64 waves)
    assert mlp.split_k_for(C, H, B_T, 132, tile) == 3  # dW_proj
    assert mlp.split_k_for(H, C, 1024, 132, tile) == 1  # short K: the partials would cost more than they win
    assert mlp.split_k_for(B_T, C, H, 132, tile) == 1  # c_proj-shaped: 384 tiles already fill the GPU
    assert mlp._k_split(B_T, 3) % mlp._max_block("BLOCK_K") == 0  # uneven splits stay whole BLOCK_Ks: no K mask


def test_gpu_configs_lower_to_wgmma():
    """Hopper's wgmma needs whole warpgroups (4 warps) and 64-row tiles; the autotune key is bucketed."""
    for cfg in gpu_configs(mlp._matmul):
        assert cfg.num_warps % 4 == 0 and cfg.kwargs["BLOCK_M"] >= 64, cfg
    assert "M" not in mlp._matmul.keys and "K" not in mlp._matmul.keys
    assert "M_BUCKET" in mlp._matmul.keys and "K_BUCKET" in mlp._matmul.keys


def test_huge_strides_rejected_before_launch():
    """In-tile offsets are int32: strides that could overflow them raise instead of reading wrong memory."""
    a = torch.empty_strided((64, 2 ** 26), (2 ** 26, 1), device="meta", dtype=torch.float16)
    b = torch.empty((2 ** 26, 8), device="meta", dtype=torch.float16)
    out = torch.empty((64, 8), device="meta", dtype=torch.float16)
    with pytest.raises(ValueError, match="a strides .* too large for the kernel's int32 offsets"):
        mlp.launch_matmul(a, b, out)


# ---------------------------------------------------------------------------------------------
# Autocast: the op casts x itself, reads fp32 parameters, returns the autocast dtype, and gives the
# parameters' grads in fp32, like nn.Linear + F.gelu under the same autocast
# ---------------------------------------------------------------------------------------------
AMP_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]


def torch_linear_gelu(x, w, b):
    """nn.Linear + F.gelu: what autocast does to them is the behaviour to match."""
    return F.gelu(F.linear(x, w, b), approximate="tanh")


def torch_gelu_mlp(x, fc_w, fc_b, proj_w, proj_b):
    return F.linear(torch_linear_gelu(x, fc_w, fc_b), proj_w, proj_b)


def _check_against_torch_autocast(ours, theirs, truth, names, amp_dtype):
    for name, a, t, e in zip(names, ours, theirs, truth):
        assert a.dtype == t.dtype, f"{name}: {a.dtype} != PyTorch's {t.dtype}"
        factor = BF16_FACTOR if amp_dtype == torch.bfloat16 else 2.0
        assert_close_to_ref(a, t, e, factor=factor, atol=LOWP_ATOL, name=name)


@pytest.mark.parametrize("cast", ["none", "x", "all"], ids=["x_fp32", "x_amp", "all_amp"])
@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
def test_gelu_mlp_under_autocast(amp_dtype, cast, device):
    """fp32 x and parameters; x already in the autocast dtype; everything already cast (as gpt2_triton.model.ops'
    under_autocast hands them over)."""
    x, params, _ = make_mlp_inputs((3, 7, 32), 128, torch.float32, device)
    x = x.to(amp_dtype) if cast != "none" else x
    params = tuple(p.to(amp_dtype) for p in params) if cast == "all" else params
    dy = torch.randn(x.shape, generator=torch.Generator().manual_seed(5)).to(device, amp_dtype)
    with torch.autocast(device, dtype=amp_dtype):
        ours = forward_and_grads(gelu_mlp, (x, *params), dy)
        theirs = forward_and_grads(torch_gelu_mlp, (x, *params), dy)
    assert ours[0].dtype == amp_dtype and ours[1][0].dtype == x.dtype
    assert all(g.dtype == p.dtype for g, p in zip(ours[1][1:], params))
    truth = forward_and_grads(torch_gelu_mlp, (x.double(), *(p.double() for p in params)), dy.double())
    _check_against_torch_autocast([ours[0], *ours[1]], [theirs[0], *theirs[1]], [truth[0], *truth[1]],
                                  ("y",) + tuple(f"d{n}" for n in PARAM_NAMES), amp_dtype)


@pytest.mark.parametrize("x_dtype", [torch.float32, "amp"], ids=["x_fp32", "x_amp"])
@pytest.mark.parametrize("amp_dtype", AMP_DTYPES)
def test_linear_gelu_under_autocast(amp_dtype, x_dtype, device):
    x, w, b, _ = make_linear_inputs((37, 40), 200, torch.float32, device)
    x = x.to(amp_dtype if x_dtype == "amp" else x_dtype)
    dout = torch.randn(37, 200, generator=torch.Generator().manual_seed(6)).to(device, amp_dtype)
    with torch.autocast(device, dtype=amp_dtype):
        ours = forward_and_grads(linear_gelu, (x, w, b), dout)
        theirs = forward_and_grads(torch_linear_gelu, (x, w, b), dout)
    assert ours[0].dtype == amp_dtype
    truth = forward_and_grads(torch_linear_gelu, (x.double(), w.double(), b.double()), dout.double())
    _check_against_torch_autocast([ours[0], *ours[1]], [theirs[0], *theirs[1]], [truth[0], *truth[1]],
                                  ("out", "dx", "dweight", "dbias"), amp_dtype)


def test_linear_gelu_fp16_closer_to_fp64_than_nn_linear_under_autocast(device):
    """fp16 x, fp32 nn.Linear weights, fp16 autocast: we differ from nn.Linear + F.gelu by more than 1e-3
    because PyTorch rounds the bias and the pre-activation to fp16 before the GELU, and we do not (fp32
    accumulator + fp32 bias, one rounding of the result). Against fp64 ours is the closer one."""
    gen = torch.Generator().manual_seed(7)
    M, K, N = 64, 128, 192
    x = torch.randn(M, K, generator=gen).to(device, torch.float16)
    w = (torch.randn(N, K, generator=gen) * K ** -0.5).to(device)
    b = (torch.randn(N, generator=gen) * 0.1).to(device)
    dout = torch.randn(M, N, generator=gen).to(device, torch.float16)
    with torch.autocast(device, dtype=torch.float16):
        ours = forward_and_grads(linear_gelu, (x, w, b), dout)
        theirs = forward_and_grads(torch_linear_gelu, (x, w, b), dout)
    truth = forward_and_grads(torch_linear_gelu, (x.double(), w.double(), b.double()), dout.double())
    assert (ours[0].double() - theirs[0].double()).abs().max() > 1e-3  # the difference the issue saw
    ours_max, ours_rms = error_stats(ours[0], truth[0])
    torch_max, torch_rms = error_stats(theirs[0], truth[0])
    assert ours_max <= torch_max and ours_rms < torch_rms, (ours_max, ours_rms, torch_max, torch_rms)
    for name, g, tg, wg in zip(("dx", "dweight", "dbias"), ours[1], theirs[1], truth[1]):
        assert_close_to_ref(g, tg, wg, atol=1e-5, name=name)


# ---------------------------------------------------------------------------------------------
# Errors, custom-op registration, torch.compile
# ---------------------------------------------------------------------------------------------
def _bad_calls(device):
    x, (fc_w, fc_b, proj_w, proj_b), _ = make_mlp_inputs((4, 16), 64, torch.float32, device)
    return [
        (lambda: gelu_mlp(x[:, :8], fc_w, fc_b, proj_w, proj_b), ValueError, "x must have shape"),
        (lambda: gelu_mlp(x, fc_w, fc_b, proj_w.t(), proj_b), ValueError, "proj_weight must have shape"),
        (lambda: gelu_mlp(x, fc_w, fc_b[:10], proj_w, proj_b), ValueError, "fc_bias must have shape"),
        (lambda: gelu_mlp(x, fc_w[0], fc_b, proj_w, proj_b), ValueError, "fc_weight must be 2-D"),
        (lambda: gelu_mlp(x.long(), fc_w, fc_b, proj_w, proj_b), TypeError, "x must be float32"),
        (lambda: gelu_mlp(x, fc_w.half(), fc_b, proj_w, proj_b), TypeError, "share one dtype"),
        (lambda: gelu_mlp(x, fc_w.half(), fc_b.half(), proj_w.half(), proj_b.half()), TypeError,
         "parameters must be in x's dtype"),
        (lambda: linear_gelu(x, fc_w.t(), None), ValueError, "x must have shape"),
        (lambda: linear_gelu(x, fc_w, proj_b), ValueError, "bias must have shape"),
        (lambda: linear_gelu(x.double(), fc_w, fc_b), TypeError, "float32, float16 or bfloat16"),
    ]


def test_bad_inputs_raise_clear_errors(device):
    for call, exc, match in _bad_calls(device):
        with pytest.raises(exc, match=match):
            call()


def test_wrong_device_raises(device):
    if device == "cpu":
        pytest.skip("needs a second device type")
    x, (fc_w, fc_b, proj_w, proj_b), _ = make_mlp_inputs((4, 16), 64, torch.float32, device)
    with pytest.raises(ValueError, match="same device"):
        gelu_mlp(x.cpu(), fc_w, fc_b, proj_w, proj_b)


def test_custom_ops_opcheck(device):
    x, (fc_w, fc_b, proj_w, proj_b), dy = make_mlp_inputs((5, 16), 32, torch.float32, device)
    y, pre = gelu_mlp_fwd(x, fc_w, fc_b, proj_w, proj_b, True)
    lx, lw, lb, ldout = make_linear_inputs((5, 16), 32, torch.float32, device)
    _, lpre = linear_gelu_fwd(lx, lw, lb, True)
    cases = [
        (gelu_mlp_fwd, (x, fc_w, fc_b, proj_w, proj_b, True)),
        (gelu_mlp_fwd, (x, fc_w, None, proj_w, None, False)),
        (gelu_mlp_bwd, (dy, x, pre, fc_w, proj_w, torch.zeros_like(fc_w), torch.zeros_like(fc_b),
                        torch.zeros_like(proj_w), torch.zeros_like(proj_b), (False, True, True, False))),
        (gelu_mlp_bwd, (dy, x, pre, fc_w, proj_w, None, torch.zeros_like(fc_b), None, None,
                        (False, False, False, False))),
        (gelu_mlp_pre, (x, fc_w, fc_b)),
        (gelu_mlp_pre, (x, fc_w, None)),
        (linear_gelu_fwd, (lx, lw, lb, True)),
        (linear_gelu_bwd, (ldout, lx, lpre, lw, torch.zeros_like(lw), torch.zeros_like(lb), (True, False))),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args)  # schema, fake impl, autograd registration, aot dispatch


def test_torch_compile_no_graph_breaks(device):
    """fullgraph=True fails on any graph break; aot_eager traces fwd and bwd through the fake impls."""
    x, params, dy = make_mlp_inputs((2, 5, 32), 128, torch.float32, device)
    torch._dynamo.reset()
    eager_out, eager_grads = forward_and_grads(gelu_mlp, (x, *params), dy)
    for recompute in (False, True):
        compiled = torch.compile(functools.partial(gelu_mlp, recompute=recompute), backend="aot_eager",
                                 fullgraph=True)
        out, grads = forward_and_grads(compiled, (x, *params), dy)
        torch.testing.assert_close(out, eager_out, atol=0, rtol=0)
        for g, eg in zip(grads, eager_grads):
            torch.testing.assert_close(g, eg, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------
# GPT-2 size on a GPU (bf16 cannot be tested under the interpreter)
# ---------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("param_dtype", [torch.bfloat16, torch.float32], ids=["bf16-params", "fp32-params"])
def test_gelu_mlp_gpt2_size_bf16(param_dtype, device):
    x, params, dy = make_mlp_inputs((16, 1024, 768), 3072, torch.bfloat16, device, param_dtype=param_dtype)
    out, grads = forward_and_grads(gelu_mlp, (x, *params), dy)
    want, want_grads = forward_and_grads(ref.gelu_mlp, (x, *params), dy)
    torch_out, torch_grads = forward_and_grads(
        ref.gelu_mlp, (x, *(p.bfloat16() for p in params)), dy, upcast=False)
    assert_close_to_ref(out, torch_out, want, atol=LOWP_ATOL, name="y")
    for name, g, tg, w in zip(PARAM_NAMES, grads, torch_grads, want_grads):
        assert g.dtype == (torch.bfloat16 if name == "x" else param_dtype)
        assert_close_to_ref(g, tg, w, atol=LOWP_ATOL, name=f"d{name}")


@pytest.mark.gpu
def test_linear_gelu_gpt2_size_bf16(device):
    x, w, b, dout = make_linear_inputs((16384, 768), 3072, torch.bfloat16, device)
    out, grads = forward_and_grads(linear_gelu, (x, w, b), dout)
    want, want_grads = forward_and_grads(ref.linear_gelu, (x, w, b), dout)
    torch_out, torch_grads = forward_and_grads(ref.linear_gelu, (x, w, b), dout, upcast=False)
    assert_close_to_ref(out, torch_out, want, atol=LOWP_ATOL, name="out")
    for name, g, tg, wg in zip(("x", "weight", "bias"), grads, torch_grads, want_grads):
        assert_close_to_ref(g, tg, wg, atol=LOWP_ATOL, name=f"d{name}")


@pytest.mark.gpu
def test_gelu_mlp_gpt2_size_fp32(device):
    """fp32 on the GPU must use IEEE dots (not tf32): tight tolerance at M = 4096."""
    x, params, dy = make_mlp_inputs((4096, 768), 3072, torch.float32, device)
    out, grads = forward_and_grads(gelu_mlp, (x, *params), dy)
    want, want_grads = forward_and_grads(ref.gelu_mlp, (x, *params), dy)
    assert_close(out, want, atol=1e-4, rtol=1e-4, name="y")
    for name, g, w in zip(PARAM_NAMES, grads, want_grads):
        assert_close(g, w, atol=1e-4 * max(1.0, w.abs().max().item()), rtol=1e-4, name=f"d{name}")


@pytest.mark.parametrize("split", [1, 3], ids=["unsplit", "split-K"])
def test_grads_accumulate_into_existing_grad(split, device, monkeypatch):
    """Two .backward() passes over nn.Parameters: the second adds into the first's .grad inside the kernels
    (the .grad tensors stay the same objects; split-K sums its pieces, the fc bias its column-sum partials,
    into them), giving twice one pass; autograd.grad returns the grads and leaves .grad alone."""
    monkeypatch.setattr(mlp, "split_k_for", lambda M, N, K, num_sms, tile: split)
    x, params, dy = make_mlp_inputs((3, 7, 40), 200, torch.float32, device, seed=9)
    params = [torch.nn.Parameter(p.clone()) for p in params]
    with override_target(sm_count=4):
        gelu_mlp(x, *params).backward(dy)
        once = [p.grad.clone() for p in params]
        grads = [p.grad for p in params]
        gelu_mlp(x, *params).backward(dy)
        fresh = torch.autograd.grad(gelu_mlp(x, *params), params, dy)
    (_, want_grads), _ = reference_mlp(x, [p.detach() for p in params], dy)
    for name, p, g, first, f, w in zip(PARAM_NAMES[1:], params, grads, once, fresh, want_grads[1:]):
        assert p.grad is g, name
        assert_close(first, w, **fp32_tol(w), name=f"d{name}")
        assert_close(p.grad, 2 * first, **fp32_tol(w), name=f"d{name} accumulated")
        assert_close(f, first, **fp32_tol(w), name=f"d{name} autograd.grad")


def test_weights_cast_once_per_version(device):
    """Under autocast the fp32 master weights are cast to the activations' dtype once per version of
    their values: two forwards and backwards share the cast; an in-place update makes a new one."""
    from gpt2_triton.kernels.utils import cast_weight
    x, params, dy = make_mlp_inputs((2, 3, 16), 32, torch.float16, device, param_dtype=torch.float32, seed=10)
    fc_w = torch.nn.Parameter(params[0].clone())
    first = cast_weight(fc_w, torch.float16)
    assert cast_weight(fc_w, torch.float16) is first and first.dtype == torch.float16
    with torch.no_grad():
        fc_w.mul_(2)
    second = cast_weight(fc_w, torch.float16)
    assert second is not first
    assert torch.equal(second, (2 * params[0]).to(torch.float16))
    view = fc_w.t()  # not a parameter: cast on every call
    assert cast_weight(view, torch.float16) is not cast_weight(view, torch.float16)
