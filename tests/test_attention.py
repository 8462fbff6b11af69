"""Flash attention (kernels/attention.py) against the fp32 reference (kernels/reference.py)."""
import math

import pytest
import torch

from helpers import assert_close, assert_close_to_ref
from kernels import reference as ref
from kernels.attention import flash_attention, flash_attention_bwd, flash_attention_fwd

SHAPES = [  # (B, H, T, D); T not a multiple of any block on purpose
    pytest.param((1, 1, 1, 16), id="B1-H1-T1-D16"),
    pytest.param((1, 1, 16, 16), id="B1-H1-T16-D16"),
    pytest.param((2, 3, 37, 32), id="B2-H3-T37-D32"),
    pytest.param((1, 2, 64, 64), id="B1-H2-T64-D64"),
    pytest.param((2, 2, 130, 64), id="B2-H2-T130-D64"),
    pytest.param((1, 1, 200, 128), id="B1-H1-T200-D128"),
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


@pytest.mark.parametrize("causal", CAUSAL)
def test_custom_scale_fp32(causal, device):
    shape, scale = (1, 2, 37, 32), 0.37
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


def test_bad_lse_raises(device):
    q, k, v, do = _inputs((1, 2, 8, 16), torch.float32, device)
    o, lse = flash_attention_fwd(q, k, v, True, None)
    with pytest.raises(ValueError, match="lse"):
        flash_attention_bwd(do, q, k, v, o, lse[:, :1], True, None)
    with pytest.raises(ValueError, match="shape"):
        flash_attention_bwd(do[..., :4, :], q, k, v, o, lse, True, None)


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
