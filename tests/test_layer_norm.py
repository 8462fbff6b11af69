import pytest
import torch

from kernels import reference
from kernels.layer_norm import MAX_FEAT_DIM, layer_norm, layer_norm_bwd, layer_norm_fwd
from helpers import assert_close, assert_close_to_ref

SHAPES = [
    pytest.param((1, 1), id="M1-N1"),
    pytest.param((3, 7), id="M3-N7"),
    pytest.param((17, 33), id="M17-N33"),
    pytest.param((2, 5, 768), id="B2-T5-N768"),
    pytest.param((4, 1000), id="M4-N1000"),
]


def _inputs(shape, dtype, device, param_dtype=None, seed=0):
    gen = torch.Generator().manual_seed(seed)
    n = shape[-1]
    param_dtype = param_dtype or dtype
    x = (torch.randn(shape, generator=gen) * 2 + 0.5).to(device=device, dtype=dtype)
    weight = (1 + 0.5 * torch.randn(n, generator=gen)).to(device=device, dtype=param_dtype)
    bias = (0.5 * torch.randn(n, generator=gen)).to(device=device, dtype=param_dtype)
    dy = torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
    return x, weight, bias, dy


def _ref64(x, weight, bias, dy):
    """The reference in fp64: the truth for the fp32 checks (at N=1, fp32 PyTorch leaves rounding noise
    where the exact dweight is 0)."""
    def ref(*a):
        return reference.layer_norm(*a, upcast=False)
    return _fwd_bwd(ref, x.double(), weight.double(), bias.double() if bias is not None else None, dy.double())


def _fwd_bwd(fn, x, weight, bias, dy, **kwargs):
    x, weight = x.detach().requires_grad_(), weight.detach().requires_grad_()
    bias = bias.detach().requires_grad_() if bias is not None else None
    y = fn(x, weight, bias, **kwargs)
    leaves = (x, weight) if bias is None else (x, weight, bias)
    return (y, *torch.autograd.grad(y, leaves, dy))


@pytest.mark.parametrize("shape", SHAPES)
def test_autograd_fp32(shape, device):
    x, weight, bias, dy = _inputs(shape, torch.float32, device)
    ours = _fwd_bwd(layer_norm, x, weight, bias, dy)
    ref = _ref64(x, weight, bias, dy)
    rows = x.numel() // shape[-1]
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), ours, ref):
        # dweight/dbias sum over rows: allow the tolerance to grow like sqrt(rows).
        atol = 1e-5 * (rows ** 0.5 if name in ("dweight", "dbias") else 1.0)
        assert a.dtype == torch.float32
        assert_close(a, e, atol=atol, rtol=1e-5, name=name)


@pytest.mark.parametrize("shape", SHAPES)
def test_launchers_fp32(shape, device):
    x, weight, bias, dy = _inputs(shape, torch.float32, device, seed=1)
    x2d, dy2d = x.reshape(-1, shape[-1]), dy.reshape(-1, shape[-1])
    y, mean, rstd = layer_norm_fwd(x2d, weight, bias, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32
    x64 = x2d.double()
    assert_close(mean, x64.mean(1), atol=1e-5, name="mean")
    assert_close(rstd, (x64.var(1, unbiased=False) + 1e-5).rsqrt(), atol=1e-5, rtol=1e-5, name="rstd")
    y_ref, dx_ref, dw_ref, db_ref = _ref64(x2d, weight, bias, dy2d)
    assert_close(y, y_ref, name="y")
    dx, dweight, dbias = layer_norm_bwd(dy2d, x2d, weight, mean, rstd)
    rows = x2d.shape[0]
    assert_close(dx, dx_ref, name="dx")
    assert_close(dweight, dw_ref, atol=1e-5 * rows ** 0.5, name="dweight")
    assert_close(dbias, db_ref, atol=1e-5 * rows ** 0.5, name="dbias")


@pytest.mark.parametrize("param_dtype", [torch.float16, torch.float32], ids=["w-fp16", "w-fp32"])
@pytest.mark.parametrize("shape", [pytest.param((17, 33), id="M17-N33"), pytest.param((2, 5, 768), id="B2-T5-N768")])
def test_autograd_fp16(shape, param_dtype, device):
    x, weight, bias, dy = _inputs(shape, torch.float16, device, param_dtype=param_dtype, seed=2)
    ours = _fwd_bwd(layer_norm, x, weight, bias, dy)
    # fp32 truth, and PyTorch's own fp16 result (fp16 params there: it cannot mix dtypes)
    ref32 = _fwd_bwd(reference.layer_norm, x.float(), weight.float(), bias.float(), dy.float())
    torch16 = _fwd_bwd(lambda *a: reference.layer_norm(*a, upcast=False), x, weight.half(), bias.half(), dy)
    assert ours[0].dtype == torch.float16
    assert ours[2].dtype == ours[3].dtype == param_dtype
    for name, a, t, e in zip(("y", "dx", "dweight", "dbias"), ours, torch16, ref32):
        assert_close_to_ref(a, t, e, atol=1e-4, name=name)


def test_no_bias_and_strided_input(device):
    # Rows of a wider buffer (row stride != N) and a transposed view (last-dim stride != 1).
    base = torch.randn(6, 50, device=device)
    weight = torch.randn(40, device=device)
    for x in (base[:, 5:45], torch.randn(40, 6, device=device).T):
        dy = torch.randn(x.shape, device=device)
        ours = _fwd_bwd(layer_norm, x, weight, None, dy)
        ref = _ref64(x, weight, None, dy)
        for name, a, e in zip(("y", "dx", "dweight"), ours, ref):
            assert_close(a, e, atol=2e-5, name=name)


def test_weight_grads_deterministic(device):
    x, weight, bias, dy = _inputs((67, 300), torch.float32, device, seed=3)
    y, mean, rstd = layer_norm_fwd(x, weight, bias, 1e-5)
    first = layer_norm_bwd(dy, x, weight, mean, rstd)
    second = layer_norm_bwd(dy, x, weight, mean, rstd)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_launchers_do_not_mutate_inputs(device):
    x, weight, bias, dy = _inputs((5, 64), torch.float32, device, seed=4)
    copies = [t.clone() for t in (x, weight, bias, dy)]
    y, mean, rstd = layer_norm_fwd(x, weight, bias, 1e-5)
    layer_norm_bwd(dy, x, weight, mean, rstd)
    for a, b in zip((x, weight, bias, dy), copies):
        assert torch.equal(a, b)


def test_errors(device):
    x = torch.randn(4, 8, device=device)
    w, b = torch.ones(8, device=device), torch.zeros(8, device=device)
    with pytest.raises(ValueError, match=r"layer_norm: weight must have shape \(N,\) = \(8,\)"):
        layer_norm(x, torch.ones(7, device=device), b)
    with pytest.raises(ValueError, match=r"layer_norm: bias must have shape"):
        layer_norm(x, w, torch.zeros(4, 2, device=device))
    with pytest.raises(TypeError, match=r"layer_norm: x must be float32, float16 or bfloat16; got torch.int64"):
        layer_norm(torch.ones(4, 8, dtype=torch.long, device=device), w, b)
    with pytest.raises(TypeError, match=r"layer_norm: weight must be float32"):
        layer_norm(x, torch.ones(8, dtype=torch.int32, device=device), b)
    with pytest.raises(ValueError, match=r"layer_norm: feature dim N must be in \[1, 16384\]; got N=16385"):
        n = MAX_FEAT_DIM + 1
        layer_norm(torch.randn(1, n, device=device), torch.ones(n, device=device), torch.zeros(n, device=device))
    with pytest.raises(ValueError, match=r"layer_norm: x must have at least one dim"):
        layer_norm(torch.tensor(1.0, device=device), w, b)
    with pytest.raises(ValueError, match=r"layer_norm: all tensors must be on the same device"):
        layer_norm(x, torch.ones(8, device="meta"), b)


def test_supports_large_feature_dim(device):
    x, weight, bias, dy = _inputs((2, 8192), torch.float32, device, seed=5)
    ours = _fwd_bwd(layer_norm, x, weight, bias, dy)
    ref = _ref64(x, weight, bias, dy)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), ours, ref):
        assert_close(a, e, atol=2e-5, name=name)


def test_opcheck(device):
    x, weight, bias, dy = _inputs((3, 40), torch.float32, device, seed=6)
    torch.library.opcheck(layer_norm_fwd, (x, weight, bias, 1e-5))
    torch.library.opcheck(layer_norm_fwd, (x, weight, None, 1e-5))
    _, mean, rstd = layer_norm_fwd(x, weight, bias, 1e-5)
    torch.library.opcheck(layer_norm_bwd, (dy, x, weight, mean, rstd))


def test_torch_compile_matches_eager(device):
    x, weight, bias, dy = _inputs((3, 5, 40), torch.float32, device, seed=7)
    compiled = torch.compile(layer_norm, backend="aot_eager", fullgraph=True)
    ours = _fwd_bwd(compiled, x, weight, bias, dy)
    eager = _fwd_bwd(layer_norm, x, weight, bias, dy)
    for a, e in zip(ours, eager):
        assert torch.equal(a, e)


@pytest.mark.gpu
@pytest.mark.parametrize("feat_dim", [768, 1024, 1600])
def test_gpt2_size_bf16(feat_dim, device):
    x, weight, bias, dy = _inputs((16384, feat_dim), torch.bfloat16, device, param_dtype=torch.float32, seed=8)
    ours = _fwd_bwd(layer_norm, x, weight, bias, dy)
    ref32 = _fwd_bwd(reference.layer_norm, x.float(), weight, bias, dy.float())
    torch16 = _fwd_bwd(lambda *a: reference.layer_norm(*a, upcast=False), x, weight.bfloat16(), bias.bfloat16(), dy)
    for name, a, t, e in zip(("y", "dx", "dweight", "dbias"), ours, torch16, ref32):
        assert_close_to_ref(a, t, e, atol=1e-2, name=name)
    # Same inputs, bit-identical weight grads.
    again = _fwd_bwd(layer_norm, x, weight, bias, dy)
    assert torch.equal(ours[2], again[2]) and torch.equal(ours[3], again[3])


@pytest.mark.gpu
def test_gpt2_size_fp32(device):
    x, weight, bias, dy = _inputs((16384, 768), torch.float32, device, seed=9)
    ours = _fwd_bwd(layer_norm, x, weight, bias, dy)
    ref = _ref64(x, weight, bias, dy)
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), ours, ref):
        atol = 1e-5 * (128 if name in ("dweight", "dbias") else 1)  # sums over 16384 rows
        assert_close(a, e, atol=atol, rtol=1e-5, name=name)
