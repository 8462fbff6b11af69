"""Dense flash attention (kernels/attention/) against the fp32 reference (kernels/reference.py)."""
import math

import pytest
import torch
from helpers import assert_close, assert_close_to_ref

from gpt2_triton.kernels import reference as ref
from gpt2_triton.kernels.attention import core, flash_attention, flash_attention_qkv
from gpt2_triton.kernels.attention.dense import (
    flash_attention_bwd,
    flash_attention_fwd,
    flash_attention_qkv_bwd,
    flash_attention_qkv_fwd,
)
from gpt2_triton.kernels.utils import feature_failed, isolated_features, override_target

SHAPES = [  # (B, H, T, D); T not a multiple of any block on purpose
    pytest.param((1, 1, 1, 16), id="B1-H1-T1-D16"),
    pytest.param((1, 1, 16, 16), id="B1-H1-T16-D16"),
    pytest.param((2, 3, 37, 32), id="B2-H3-T37-D32"),
    pytest.param((1, 2, 64, 64), id="B1-H2-T64-D64"),
    pytest.param((2, 2, 130, 64), id="B2-H2-T130-D64"),
    pytest.param((1, 1, 200, 128), id="B1-H1-T200-D128"),
    pytest.param((1, 2, 128, 32), id="B1-H2-T128-D32"),  # T % 128 == 0: the kernels' unmasked EVEN_T variant
]
# fp16 skips T = 1 without the causal mask: dq and dk are exactly 0 there, so a relative-error rule
# means nothing (fp32 covers that shape with an absolute tolerance).
SHAPES_FP16 = SHAPES[1:]
CAUSAL = [pytest.param(True, id="causal"), pytest.param(False, id="full")]

# fp32: measured max abs error <= 3e-6 on these shapes (values and grads are O(1)).
FP32_TOL = dict(atol=1e-5, rtol=1e-5)


def _inputs(shape, dtype, device, seed=0, requires_grad=False):
    gen = torch.Generator().manual_seed(seed)
    q, k, v, do = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype) for _ in range(4))
    if requires_grad:
        for t in (q, k, v):
            t.requires_grad_(True)
    return q, k, v, do


def _reference(q, k, v, do, causal, scale=None, upcast=True):
    """Reference output and (dq, dk, dv) for upstream grad do."""
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    o = ref.flash_attention(q, k, v, causal, scale, upcast=upcast)
    dq, dk, dv = torch.autograd.grad(o, (q, k, v), do)
    return o.detach(), dq, dk, dv


def _reference_lse(q, k, causal, scale):
    scores = (q.float() @ k.float().transpose(-2, -1)) * scale
    if causal:
        T = q.shape[-2]
        mask = torch.ones(T, T, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~mask, float("-inf"))
    return torch.logsumexp(scores, dim=-1)


# ------------------------------------------------------------------------------------------------
# fp32: launchers and autograd, every shape, causal and full
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("shape", SHAPES)
def test_launchers_fp32(shape, causal, device):
    q, k, v, do = _inputs(shape, torch.float32, device)
    scale = 1.0 / math.sqrt(shape[-1])
    o, lse = flash_attention_fwd(q, k, v, causal, None)
    assert o.dtype == torch.float32 and lse.dtype == torch.float32 and lse.shape == shape[:3]
    o_ref, dq_ref, dk_ref, dv_ref = _reference(q, k, v, do, causal)
    assert_close(o, o_ref, **FP32_TOL, name="o")
    assert_close(lse, _reference_lse(q, k, causal, scale), **FP32_TOL, name="lse")

    dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, causal, None)
    assert_close(dq, dq_ref, **FP32_TOL, name="dq")
    assert_close(dk, dk_ref, **FP32_TOL, name="dk")
    assert_close(dv, dv_ref, **FP32_TOL, name="dv")


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("shape", SHAPES)
def test_autograd_fp32(shape, causal, device):
    q, k, v, do = _inputs(shape, torch.float32, device, seed=1, requires_grad=True)
    o = flash_attention(q, k, v, causal=causal)
    o.backward(do)
    o_ref, dq_ref, dk_ref, dv_ref = _reference(q, k, v, do, causal)
    assert_close(o, o_ref, **FP32_TOL, name="o")
    assert_close(q.grad, dq_ref, **FP32_TOL, name="dq")
    assert_close(k.grad, dk_ref, **FP32_TOL, name="dk")
    assert_close(v.grad, dv_ref, **FP32_TOL, name="dv")


@pytest.mark.parametrize("scale", [0.37, -0.37, 0.0], ids=["pos", "neg", "zero"])
@pytest.mark.parametrize("causal", CAUSAL)
def test_custom_scale_fp32(causal, scale, device):
    """The forward folds scale in after the row max, which needs scale > 0: other signs go through (-q, -scale)
    and (0 * q, 1); the backward takes any scale as it is."""
    shape = (1, 2, 37, 32)
    q, k, v, do = _inputs(shape, torch.float32, device, seed=2, requires_grad=True)
    o = flash_attention(q, k, v, causal=causal, scale=scale)
    o.backward(do)
    o_ref, dq_ref, dk_ref, dv_ref = _reference(q, k, v, do, causal, scale)
    assert_close(o, o_ref, **FP32_TOL, name="o")
    for name, ours, theirs in (("dq", q.grad, dq_ref), ("dk", k.grad, dk_ref), ("dv", v.grad, dv_ref)):
        assert_close(ours, theirs, **FP32_TOL, name=name)


# ------------------------------------------------------------------------------------------------
# fp16: within 2x PyTorch's own fp16 error (bf16 only on the GPU: the interpreter mis-loads it)
# ------------------------------------------------------------------------------------------------
def _check_low_precision(shape, causal, dtype, device, seed=3):
    q, k, v, do = _inputs(shape, dtype, device, seed=seed, requires_grad=True)
    o = flash_attention(q, k, v, causal=causal)
    assert o.dtype == dtype
    o.backward(do)
    ours = (o, q.grad, k.grad, v.grad)
    exact = _reference(q, k, v, do, causal, upcast=True)
    same_dtype = _reference(q, k, v, do, causal, upcast=False)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), ours, same_dtype, exact):
        assert a.dtype == dtype, name
        assert_close_to_ref(a, b, c, name=name)


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("shape", SHAPES_FP16)
def test_autograd_fp16(shape, causal, device):
    _check_low_precision(shape, causal, torch.float16, device)


def test_tma_failure_falls_back_to_pointer_loads(device):
    """A TMA launch that fails is recorded once, with a warning, and the op runs on pointer loads."""
    with isolated_features(), override_target(fail_features=("tma",)):
        with pytest.warns(RuntimeWarning, match="TMA descriptors"):
            _check_low_precision((1, 2, 40, 32), True, torch.float16, device)
        assert "forced to fail" in feature_failed("tma")
        _check_low_precision((1, 2, 40, 32), False, torch.float16, device)  # no retry, no second warning
    assert feature_failed("tma") is None


def test_launchers_fp16(device):
    shape, causal = (2, 2, 130, 64), True
    q, k, v, do = _inputs(shape, torch.float16, device, seed=4)
    o, lse = flash_attention_fwd(q, k, v, causal, None)
    dq, dk, dv = flash_attention_bwd(do, q, k, v, o, lse, causal, None)
    exact = _reference(q, k, v, do, causal, upcast=True)
    same_dtype = _reference(q, k, v, do, causal, upcast=False)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), (o, dq, dk, dv), same_dtype, exact):
        assert a.dtype == torch.float16, name
        assert_close_to_ref(a, b, c, name=name)


# ------------------------------------------------------------------------------------------------
# Layouts: the model's strided q/k/v views, non-contiguous upstream grads
# ------------------------------------------------------------------------------------------------
def _model_views(x, n_head):
    """Exactly what the model does: split the (B, T, 3C) projection and view it as (B, H, T, D)."""
    B, T, C3 = x.shape
    C = C3 // 3
    q, k, v = x.split(C, dim=2)
    return tuple(t.view(B, T, n_head, C // n_head).transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)


@pytest.mark.parametrize("causal", CAUSAL)
def test_model_layout_views_match_contiguous(causal, device):
    B, T, H, D = 2, 37, 3, 32
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(B, T, 3 * H * D, generator=gen).to(device).requires_grad_(True)
    dy = torch.randn(B, T, H * D, generator=gen).to(device)

    q, k, v = _model_views(x, H)
    assert not q.is_contiguous()
    y = flash_attention(q, k, v, causal=causal)  # (B, H, T, D)
    y_btc = y.transpose(1, 2).contiguous().view(B, T, H * D)
    assert y.transpose(1, 2).is_contiguous(), "output should be stored as (B, T, H, D)"
    y_btc.backward(dy)

    qc, kc, vc = (t.detach().contiguous().requires_grad_(True) for t in _model_views(x, H))
    yc = flash_attention(qc, kc, vc, causal=causal)
    yc.transpose(1, 2).reshape(B, T, H * D).backward(dy)
    # Same arithmetic whatever the strides: the results must be identical.
    assert_close(y, yc, atol=0, rtol=0, name="o")
    grad_c = torch.cat([g.transpose(1, 2).reshape(B, T, H * D) for g in (qc.grad, kc.grad, vc.grad)], dim=2)
    assert_close(x.grad, grad_c, atol=0, rtol=0, name="dx")

    # And both agree with the reference.
    xr = x.detach().clone().requires_grad_(True)
    yr = ref.flash_attention(*_model_views(xr, H), causal=causal)
    yr.transpose(1, 2).reshape(B, T, H * D).backward(dy)
    assert_close(y, yr, **FP32_TOL, name="o vs reference")
    assert_close(x.grad, xr.grad, **FP32_TOL, name="dx vs reference")


def test_noncontiguous_do_launcher(device):
    shape, causal = (2, 3, 37, 32), True
    q, k, v, do = _inputs(shape, torch.float32, device, seed=6)
    o, lse = flash_attention_fwd(q, k, v, causal, None)
    expected = flash_attention_bwd(do, q, k, v, o, lse, causal, None)
    B, H, T, D = shape
    do_t = do.transpose(-1, -2).contiguous().transpose(-1, -2)  # stride 1 along T, not D
    do_bthd = do.transpose(1, 2).contiguous().transpose(1, 2)  # (B, T, H, D) storage
    do_expanded = torch.randn(1, 1, 1, D, device=device).expand(B, H, T, D)  # stride 0
    for name, weird in (("transposed", do_t), ("bthd", do_bthd), ("expanded", do_expanded)):
        assert not weird.is_contiguous()
        got = flash_attention_bwd(weird, q, k, v, o, lse, causal, None)
        want = expected if weird is not do_expanded else flash_attention_bwd(
            weird.contiguous(), q, k, v, o, lse, causal, None)
        for g_name, a, b in zip(("dq", "dk", "dv"), got, want):
            assert_close(a, b, atol=0, rtol=0, name=f"{g_name} with {name} do")
    # Inputs are not mutated by the launchers.
    q2, k2, v2, do2 = _inputs(shape, torch.float32, device, seed=6)
    for a, b in zip((q, k, v, do), (q2, k2, v2, do2)):
        assert torch.equal(a, b)


def test_noncontiguous_upstream_autograd(device):
    """dO arrives as a transposed view when the model reshapes y to (B, T, C) and multiplies."""
    B, H, T, D = 2, 2, 40, 16
    q, k, v, _ = _inputs((B, H, T, D), torch.float32, device, seed=7, requires_grad=True)
    weight = torch.randn(H * D, 24, generator=torch.Generator().manual_seed(8)).to(device)
    y = flash_attention(q, k, v, causal=True)
    loss = (y.transpose(1, 2).reshape(B, T, H * D) @ weight).square().sum()
    loss.backward()

    qr, kr, vr = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    yr = ref.flash_attention(qr, kr, vr, causal=True)
    (yr.transpose(1, 2).reshape(B, T, H * D) @ weight).square().sum().backward()
    # Loss is a sum of squares of O(10) values: scale tolerance with the grad magnitudes.
    for name, a, b in (("dq", q.grad, qr.grad), ("dk", k.grad, kr.grad), ("dv", v.grad, vr.grad)):
        assert_close(a, b, atol=1e-5 * b.abs().max().item(), rtol=1e-5, name=name)


# ------------------------------------------------------------------------------------------------
# flash_attention_qkv: the (B, T, 3C) projection in, (B, T, C) out, dqkv written in place
# ------------------------------------------------------------------------------------------------
QKV_SHAPES = [  # (B, T, H, D)
    pytest.param((2, 37, 3, 32), id="B2-T37-H3-D32"),
    pytest.param((1, 130, 2, 64), id="B1-T130-H2-D64"),
    pytest.param((1, 128, 2, 16), id="B1-T128-H2-D16"),
    pytest.param((1, 17, 1, 128), id="B1-T17-H1-D128"),
]


def _qkv_inputs(B, T, H, D, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    qkv = torch.randn(B, T, 3 * H * D, generator=gen).to(device=device, dtype=dtype).requires_grad_(True)
    dy = torch.randn(B, T, H * D, generator=gen).to(device=device, dtype=dtype)
    return qkv, dy


def _qkv_reference(qkv, dy, n_head, causal, upcast=True):
    x = qkv.detach().clone().requires_grad_(True)
    y = ref.flash_attention_qkv(x, n_head, causal, upcast=upcast)
    y.backward(dy)
    return y.detach(), x.grad


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("shape", QKV_SHAPES)
def test_qkv_fp32(shape, causal, device):
    B, T, H, D = shape
    qkv, dy = _qkv_inputs(B, T, H, D, torch.float32, device, seed=20)
    y = flash_attention_qkv(qkv, H, causal=causal)
    assert y.shape == (B, T, H * D) and y.is_contiguous()
    y.backward(dy)
    y_ref, dqkv_ref = _qkv_reference(qkv, dy, H, causal)
    assert_close(y, y_ref, **FP32_TOL, name="y")
    assert_close(qkv.grad, dqkv_ref, **FP32_TOL, name="dqkv")


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("shape", QKV_SHAPES[:2])
def test_qkv_fp16(shape, causal, device):
    _check_qkv_low_precision(*shape, torch.float16, causal, device, seed=21)


def _check_qkv_low_precision(B, T, H, D, dtype, causal, device, seed):
    """y and dqkv in dtype, within 2x PyTorch's own error in that dtype of the fp32 reference."""
    qkv, dy = _qkv_inputs(B, T, H, D, dtype, device, seed=seed)
    y = flash_attention_qkv(qkv, H, causal=causal)
    y.backward(dy)
    exact = _qkv_reference(qkv, dy, H, causal, upcast=True)
    same_dtype = _qkv_reference(qkv, dy, H, causal, upcast=False)
    for name, a, b, c in zip(("y", "dqkv"), (y, qkv.grad), same_dtype, exact):
        assert a.dtype == dtype, name
        assert_close_to_ref(a, b, c, name=name)


@pytest.mark.parametrize("causal", CAUSAL)
def test_qkv_equals_flash_attention_on_views(causal, device):
    """Same kernels on the same strided views: y and dqkv equal flash_attention's output and its three
    gradients concatenated, bit for bit."""
    B, T, H, D = 2, 37, 3, 32
    qkv, dy = _qkv_inputs(B, T, H, D, torch.float32, device, seed=22)
    y = flash_attention_qkv(qkv, H, causal=causal)
    y.backward(dy)

    x = qkv.detach().clone().requires_grad_(True)
    o = flash_attention(*_model_views(x, H), causal=causal)  # (B, H, T, D)
    o.transpose(1, 2).reshape(B, T, H * D).backward(dy)
    assert_close(y, o.transpose(1, 2).reshape(B, T, H * D), atol=0, rtol=0, name="y")
    assert_close(qkv.grad, x.grad, atol=0, rtol=0, name="dqkv")


def test_qkv_backward_is_one_op(device):
    """Autograd runs the backward launcher and nothing else: no cat of dq, dk, dv, no copy (the views
    path, for comparison, ends in aten.cat)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    B, T, H, D = 1, 20, 2, 16
    qkv, dy = _qkv_inputs(B, T, H, D, torch.float32, device, seed=32)
    y = flash_attention_qkv(qkv, H)
    with Recorder() as rec:
        y.backward(dy)
    assert [op for op in rec.ops if "detach" not in op] == ["gpt2_triton.flash_attention_qkv_bwd.default"], rec.ops

    x = qkv.detach().clone().requires_grad_(True)
    o = flash_attention(*_model_views(x, H))
    with Recorder() as rec:
        o.transpose(1, 2).reshape(B, T, H * D).backward(dy)
    assert "aten.cat.default" in rec.ops


def test_qkv_launchers_layout(device):
    """The backward launcher returns one contiguous (B, T, 3C) buffer in qkv's layout (no cat after it),
    and takes strided inputs (qkv a slice of a wider buffer, dy transposed)."""
    B, T, H, D = 2, 37, 2, 16
    C = H * D
    gen = torch.Generator().manual_seed(23)
    wide = torch.randn(B, T, 3 * C + 16, generator=gen).to(device)
    qkv = wide[..., 8:8 + 3 * C]  # row stride 3C + 16, base 32 bytes in: still TMA-aligned
    dy = torch.randn(B, C, T, generator=gen).to(device).transpose(1, 2)
    y, lse = flash_attention_qkv_fwd(qkv, H, True, None)
    assert y.shape == (B, T, C) and y.is_contiguous() and lse.shape == (B, H, T)
    dqkv = flash_attention_qkv_bwd(dy, qkv, y, lse, H, True, None)
    assert dqkv.shape == (B, T, 3 * C) and dqkv.is_contiguous()
    y_ref, dqkv_ref = _qkv_reference(qkv, dy, H, True)
    assert_close(y, y_ref, **FP32_TOL, name="y")
    assert_close(dqkv, dqkv_ref, **FP32_TOL, name="dqkv")


# ------------------------------------------------------------------------------------------------
# Load paths: fp16/bf16 through TMA descriptors (inputs TMA cannot read are copied first), fp32 pointers
# ------------------------------------------------------------------------------------------------
def test_tma_layout_rule(device):
    half = dict(device=device, dtype=torch.float16)
    x = torch.randn(2, 8, 3 * 2 * 16, **half)
    q, k, v = _model_views(x, 2)
    assert all(core.tma_ok(t) for t in (q, k, v))  # the model's views of the QKV projection: read in place
    assert core.tma_readable(q) is q
    assert core.tma_ok(torch.randn(1, 2, 5, 16, **half))
    assert core.tma_ok(torch.randn(1, 2, 5, 16, **half).as_strided((1, 2, 5, 16), (3, 80, 16, 1)))  # B = 1
    odd = [torch.randn(1, 2, 5, 32, **half)[..., ::2],  # stride 2 along D
           torch.randn(1, 2, 5, 17, **half)[..., 1:],  # rows not 16-byte aligned
           torch.randn(1 * 2 * 5 * 16 + 1, **half)[1:].view(1, 2, 5, 16),  # base not 16-byte aligned
           torch.randn(1, 1, 1, 16, **half).expand(1, 2, 5, 16)]  # stride 0
    for t in odd:
        assert not core.tma_ok(t)
        copy = core.tma_readable(t)
        assert core.tma_ok(copy) and torch.equal(copy, t)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32-pointers", "fp16-tma"])
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("T", [37, 128])
def test_strided_inputs_match_contiguous(T, causal, dtype, device):
    """q, k, v, do with stride 2 along D give exactly what their contiguous copies give: fp32 reads
    them through pointers, fp16 through TMA after a copy."""
    B, H, D = 1, 2, 32
    gen = torch.Generator().manual_seed(24)
    q, k, v, do = (torch.randn(B, H, T, 2 * D, generator=gen).to(device, dtype)[..., ::2] for _ in range(4))
    o, lse = flash_attention_fwd(q, k, v, causal, None)
    grads = flash_attention_bwd(do, q, k, v, o, lse, causal, None)
    qc, kc, vc, doc = (t.contiguous() for t in (q, k, v, do))
    o_c, lse_c = flash_attention_fwd(qc, kc, vc, causal, None)
    grads_c = flash_attention_bwd(doc, qc, kc, vc, o_c, lse_c, causal, None)
    assert_close(o, o_c, atol=0, rtol=0, name="o")
    assert_close(lse, lse_c, atol=0, rtol=0, name="lse")
    for name, a, b in zip(("dq", "dk", "dv"), grads, grads_c):
        assert_close(a, b, atol=0, rtol=0, name=name)
    if dtype == torch.float32:
        o_ref, *grads_ref = _reference(q, k, v, do, causal)
        assert_close(o, o_ref, **FP32_TOL, name="o vs reference")
        for name, a, b in zip(("dq", "dk", "dv"), grads, grads_ref):
            assert_close(a, b, **FP32_TOL, name=f"{name} vs reference")
    else:
        exact = _reference(q, k, v, do, causal, upcast=True)
        same_dtype = _reference(q, k, v, do, causal, upcast=False)
        for name, a, b, c in zip(("o", "dq", "dk", "dv"), (o, *grads), same_dtype, exact):
            assert_close_to_ref(a, b, c, name=f"{name} vs reference")


# ------------------------------------------------------------------------------------------------
# Autocast: the ops cast q/k/v (qkv) to the autocast dtype themselves, as SDPA under autocast does
# ------------------------------------------------------------------------------------------------
def _sdpa_qkv(qkv, n_head, causal):
    B, T, C3 = qkv.shape
    q, k, v = _model_views(qkv, n_head)
    y = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)
    return y.transpose(1, 2).reshape(B, T, C3 // 3)


def _run_under_autocast(fn, inputs, dy, dtype):
    """fn(*inputs) under CPU/CUDA autocast -> output and the grads of the (fp32) inputs."""
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    with torch.autocast(device_type=xs[0].device.type, dtype=dtype):
        y = fn(*xs)
    y.backward(dy.to(y.dtype))
    return y.detach(), [x.grad for x in xs]


def _check_autocast(ours, sdpa, reference, inputs, dy, dtype):
    y, grads = _run_under_autocast(ours, inputs, dy, dtype)
    y_sdpa, grads_sdpa = _run_under_autocast(sdpa, inputs, dy, dtype)
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    y_ref = reference(*xs)  # fp32 throughout
    y_ref.backward(dy)
    assert y.dtype == y_sdpa.dtype == dtype
    assert_close_to_ref(y, y_sdpa, y_ref, name="y")
    for i, (g, g_sdpa, x) in enumerate(zip(grads, grads_sdpa, xs)):
        assert g.dtype == g_sdpa.dtype == torch.float32
        assert_close_to_ref(g, g_sdpa, x.grad, name=f"grad {i}")


@pytest.mark.parametrize("causal", CAUSAL)
def test_autocast_fp16(causal, device):
    """CPU autocast fp16 (CUDA on a GPU): fp32 q, k, v in, fp16 out, fp32 grads; within 2x SDPA's error."""
    shape = (2, 2, 37, 32)
    q, k, v, do = _inputs(shape, torch.float32, device, seed=25)
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    _check_autocast(lambda q, k, v: flash_attention(q, k, v, causal=causal), sdpa,
                    lambda q, k, v: ref.flash_attention(q, k, v, causal), (q, k, v), do, torch.float16)


@pytest.mark.parametrize("causal", CAUSAL)
def test_autocast_qkv_fp16(causal, device):
    _check_qkv_autocast(2, 37, 2, 32, torch.float16, causal, device, seed=26)


def _check_qkv_autocast(B, T, H, D, dtype, causal, device, seed):
    """flash_attention_qkv on fp32 qkv under autocast(dtype) against SDPA under the same autocast.
    Returns qkv and dy."""
    qkv, dy = _qkv_inputs(B, T, H, D, torch.float32, device, seed=seed)
    _check_autocast(lambda x: flash_attention_qkv(x, H, causal=causal), lambda x: _sdpa_qkv(x, H, causal),
                    lambda x: ref.flash_attention_qkv(x, H, causal), (qkv,), dy, dtype)
    return qkv, dy


def test_autocast_already_cast_inputs(device):
    """Inputs already in the autocast dtype go through unchanged (no copy, same result as without autocast);
    mixed fp32/fp16 inputs are all cast, as autocast does for SDPA."""
    q, k, v, _ = _inputs((1, 2, 20, 16), torch.float16, device, seed=27)
    plain = flash_attention(q, k, v)
    with torch.autocast(device_type=q.device.type, dtype=torch.float16):
        cast = flash_attention(q, k, v)
        mixed = flash_attention(q.float(), k, v.float())
    assert cast.dtype == mixed.dtype == torch.float16
    assert_close(cast, plain, atol=0, rtol=0, name="already fp16")
    assert_close(mixed, plain, atol=0, rtol=0, name="mixed")
    with pytest.raises(TypeError, match="dtype"):
        flash_attention(q.float(), k, v)  # without autocast, mixed dtypes are an error


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def _bad_cases():
    f32 = dict(dtype=torch.float32)
    good = lambda *s: torch.randn(*s, **f32)  # noqa: E731
    return [
        pytest.param(lambda: (good(2, 8, 16), good(2, 8, 16), good(2, 8, 16)), {}, ValueError, "4-D", id="rank3"),
        pytest.param(lambda: (good(1, 2, 8, 16), good(1, 2, 9, 16), good(1, 2, 8, 16)), {}, ValueError,
                     "same shape", id="shape-mismatch"),
        pytest.param(lambda: (good(1, 2, 8, 48),) * 3, {}, ValueError, "head dim", id="D48"),
        pytest.param(lambda: (good(1, 2, 8, 256),) * 3, {}, ValueError, "head dim", id="D256"),
        pytest.param(lambda: (good(1, 2, 0, 16),) * 3, {}, ValueError, "empty", id="T0"),
        pytest.param(lambda: (torch.ones(1, 2, 8, 16, dtype=torch.int32),) * 3, {}, TypeError, "float32",
                     id="int-dtype"),
        pytest.param(lambda: (good(1, 2, 8, 16), good(1, 2, 8, 16).half(), good(1, 2, 8, 16)), {}, TypeError,
                     "dtype", id="mixed-dtype"),
        pytest.param(lambda: (good(1, 2, 8, 16), torch.empty(1, 2, 8, 16, device="meta"), good(1, 2, 8, 16)),
                     {}, ValueError, "same device", id="mixed-device"),
        pytest.param(lambda: (good(1, 2, 8, 16),) * 3, {"scale": "0.5"}, TypeError, "scale", id="scale-str"),
        pytest.param(lambda: (good(1, 2, 8, 16),) * 3, {"scale": float("inf")}, ValueError, "scale",
                     id="scale-inf"),
        pytest.param(lambda: (good(1, 2, 8, 16),) * 3, {"causal": "yes"}, TypeError, "causal", id="causal-str"),
    ]


@pytest.mark.parametrize("make, kwargs, exc, words", _bad_cases())
def test_bad_input_raises(make, kwargs, exc, words):
    q, k, v = make()
    with pytest.raises(exc, match=words) as info:
        flash_attention(q, k, v, **kwargs)
    assert str(info.value).startswith("flash_attention:")


def _bad_qkv_cases():
    good = lambda *s: torch.randn(*s)  # noqa: E731
    return [
        pytest.param(lambda: good(1, 2, 8, 96), 2, {}, ValueError, "3-D", id="rank4"),
        pytest.param(lambda: good(2, 8, 100), 2, {}, ValueError, "3 \\* n_head", id="not-divisible"),
        pytest.param(lambda: good(2, 8, 3 * 2 * 48), 2, {}, ValueError, "head dim", id="D48"),
        pytest.param(lambda: good(2, 0, 96), 2, {}, ValueError, "empty", id="T0"),
        pytest.param(lambda: good(2, 8, 96), 0, {}, TypeError, "n_head", id="n_head-0"),
        pytest.param(lambda: good(2, 8, 96), 2.0, {}, TypeError, "n_head", id="n_head-float"),
        pytest.param(lambda: good(2, 8, 96), True, {}, TypeError, "n_head", id="n_head-bool"),
        pytest.param(lambda: torch.ones(2, 8, 96, dtype=torch.int32), 2, {}, TypeError, "float32", id="int-dtype"),
        pytest.param(lambda: good(2, 8, 96), 2, {"causal": 1}, TypeError, "causal", id="causal-int"),
        pytest.param(lambda: good(2, 8, 96), 2, {"scale": float("nan")}, ValueError, "scale", id="scale-nan"),
    ]


@pytest.mark.parametrize("make, n_head, kwargs, exc, words", _bad_qkv_cases())
def test_bad_qkv_input_raises(make, n_head, kwargs, exc, words):
    with pytest.raises(exc, match=words) as info:
        flash_attention_qkv(make(), n_head, **kwargs)
    assert str(info.value).startswith("flash_attention_qkv:")


# ------------------------------------------------------------------------------------------------
# Custom-op registration and torch.compile
# ------------------------------------------------------------------------------------------------
def test_opcheck(device):
    q, k, v, do = _inputs((1, 2, 20, 16), torch.float32, device, seed=9)
    torch.library.opcheck(flash_attention_fwd, (q, k, v, True, 0.3))
    o, lse = flash_attention_fwd(q, k, v, True, 0.3)
    torch.library.opcheck(flash_attention_bwd, (do, q, k, v, o, lse, True, 0.3))

    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fq, fk, fv, fdo = (mode.from_tensor(t) for t in (q, k, v, do))
        fo, flse = flash_attention_fwd(fq, fk, fv, True, 0.3)
        grads = flash_attention_bwd(fdo, fq, fk, fv, fo, mode.from_tensor(lse), True, 0.3)
    assert fo.shape == o.shape and fo.stride() == o.stride() and fo.dtype == o.dtype
    assert flse.shape == lse.shape and flse.dtype == torch.float32
    for g, t in zip(grads, (q, k, v)):
        assert g.shape == t.shape and g.dtype == t.dtype


def test_opcheck_qkv(device):
    B, T, H, D = 1, 20, 2, 16
    qkv, dy = _qkv_inputs(B, T, H, D, torch.float32, device, seed=28)
    qkv = qkv.detach()
    torch.library.opcheck(flash_attention_qkv_fwd, (qkv, H, True, 0.3))
    y, lse = flash_attention_qkv_fwd(qkv, H, True, 0.3)
    torch.library.opcheck(flash_attention_qkv_bwd, (dy, qkv, y, lse, H, True, 0.3))

    from torch._subclasses.fake_tensor import FakeTensorMode
    with FakeTensorMode() as mode:
        fqkv, fdy = mode.from_tensor(qkv), mode.from_tensor(dy)
        fy, flse = flash_attention_qkv_fwd(fqkv, H, True, 0.3)
        fdqkv = flash_attention_qkv_bwd(fdy, fqkv, fy, mode.from_tensor(lse), H, True, 0.3)
    assert fy.shape == y.shape and fy.stride() == y.stride() and fy.dtype == y.dtype
    assert flse.shape == lse.shape and flse.dtype == torch.float32
    assert fdqkv.shape == qkv.shape and fdqkv.stride() == qkv.stride() and fdqkv.dtype == qkv.dtype


def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    q, k, v, do = _inputs((1, 2, 37, 32), torch.float32, device, seed=10, requires_grad=True)

    def step(q, k, v):
        return flash_attention(q, k, v, causal=True)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    o_eager = step(q, k, v)
    grads_eager = torch.autograd.grad(o_eager, (q, k, v), do)
    o_comp = compiled(q, k, v)
    grads_comp = torch.autograd.grad(o_comp, (q, k, v), do)
    assert_close(o_comp, o_eager, atol=0, rtol=0, name="o")
    for name, a, b in zip(("dq", "dk", "dv"), grads_comp, grads_eager):
        assert_close(a, b, atol=0, rtol=0, name=name)


def test_compile_fullgraph_qkv_under_autocast(device):
    """The model's path: c_attn output -> flash_attention_qkv -> c_proj input, compiled without graph
    breaks, under autocast (the op casts and turns autocast off around its launchers itself)."""
    torch._dynamo.reset()
    B, T, H, D = 1, 37, 2, 16
    qkv, dy = _qkv_inputs(B, T, H, D, torch.float32, device, seed=29)

    def step(x):
        with torch.autocast(device_type=x.device.type, dtype=torch.float16):
            return flash_attention_qkv(x, H, causal=True)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    y_eager = step(qkv)
    (g_eager,) = torch.autograd.grad(y_eager, (qkv,), dy.half())
    y_comp = compiled(qkv)
    (g_comp,) = torch.autograd.grad(y_comp, (qkv,), dy.half())
    assert y_comp.dtype == torch.float16 and g_comp.dtype == torch.float32
    assert_close(y_comp, y_eager, atol=0, rtol=0, name="y")
    assert_close(g_comp, g_eager, atol=0, rtol=0, name="dqkv")


# ------------------------------------------------------------------------------------------------
# GPU: GPT-2 sizes, bf16 (the interpreter mis-loads bf16)
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_gpt2_size_gpu(dtype, causal, device):
    _check_low_precision((16, 12, 1024, 64), causal, dtype, device, seed=11)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [pytest.param((1, 12, 4096, 64), id="B1-H12-T4096-D64"),
                                   pytest.param((2, 4, 1000, 128), id="B2-H4-T1000-D128"),
                                   pytest.param((3, 5, 77, 32), id="B3-H5-T77-D32")])
def test_long_and_odd_gpu_bf16(shape, device):
    _check_low_precision(shape, True, torch.bfloat16, device, seed=12)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("shape", [pytest.param((2, 4, 1024, 64), id="B2-H4-T1024-D64"),
                                   pytest.param((1, 2, 1000, 128), id="B1-H2-T1000-D128")])
def test_fp32_gpu_is_not_tf32(shape, causal, device):
    """fp32 on the GPU must use exact fp32 products (input_precision='ieee'): tf32 errors are ~1e-3."""
    q, k, v, do = _inputs(shape, torch.float32, device, seed=13, requires_grad=True)
    o = flash_attention(q, k, v, causal=causal)
    o.backward(do)
    o_ref, dq_ref, dk_ref, dv_ref = _reference(q, k, v, do, causal)
    # The interpreter with these GPU tiles measured <= 3e-6 at these shapes; tf32 would give ~1e-3.
    tol = dict(atol=2e-5, rtol=2e-5)
    assert_close(o, o_ref, **tol, name="o")
    for name, a, b in (("dq", q.grad, dq_ref), ("dk", k.grad, dk_ref), ("dv", v.grad, dv_ref)):
        assert_close(a, b, **tol, name=name)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", CAUSAL)
def test_qkv_gpt2_size_gpu_bf16(causal, device):
    _check_qkv_low_precision(4, 1024, 12, 64, torch.bfloat16, causal, device, seed=30)


@pytest.mark.gpu
@pytest.mark.parametrize("causal", CAUSAL)
def test_autocast_bf16_gpu(causal, device):
    """CUDA autocast bf16 (the interpreter computes bf16 wrongly, so bf16 autocast is checked here)."""
    B, T, H, D = 2, 300, 4, 64
    qkv, dy = _check_qkv_autocast(B, T, H, D, torch.bfloat16, causal, device, seed=31)
    q, k, v = (t.detach() for t in _model_views(qkv, H))
    do = dy.view(B, T, H, D).transpose(1, 2)
    sdpa = lambda q, k, v: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    _check_autocast(lambda q, k, v: flash_attention(q, k, v, causal=causal), sdpa,
                    lambda q, k, v: ref.flash_attention(q, k, v, causal), (q, k, v), do, torch.bfloat16)
