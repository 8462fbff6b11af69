"""gpt2_triton.kernels.projection: the attention projections on the vendor's matmul, weight grads in fp32 into .grad."""
import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_close_to_ref

from gpt2_triton.kernels.projection import linear, linear_bwd, linear_fwd


def _inputs(shape, n_out, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=gen).to(device)
    w = (torch.randn(n_out, shape[-1], generator=gen) / shape[-1] ** 0.5).to(device)
    b = torch.randn(n_out, generator=gen).to(device)
    dy = torch.randn(*shape[:-1], n_out, generator=gen).to(device)
    return x, w, b, dy


def _grads(fn, x, w, b, dy, amp=None, device="cpu"):
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in (x, w, b)]
    with torch.autocast(device, dtype=amp, enabled=amp is not None):
        y = fn(*leaves)
    return (y, *torch.autograd.grad(y, [t for t in leaves if t is not None], dy.to(y.dtype)))


@pytest.mark.parametrize("shape, n_out, bias", [((1, 1), 1, True), ((7, 33), 17, True), ((2, 5, 64), 96, False)],
                         ids=["M1-K1-N1", "M7-K33-N17", "B2-T5-K64-N96-nobias"])
def test_matches_f_linear_fp32(shape, n_out, bias, device):
    x, w, b, dy = _inputs(shape, n_out, device)
    b = b if bias else None
    ours = _grads(linear, x, w, b, dy)
    truth = _grads(F.linear, x.double(), w.double(), b.double() if bias else None, dy.double())
    for name, a, e in zip(("y", "dx", "dweight", "dbias"), ours, truth):
        assert a.dtype == torch.float32
        assert_close(a, e, atol=1e-5, rtol=1e-5, name=name)


@pytest.mark.parametrize("amp", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_autocast_fp32_master_weights(amp, device):
    """As F.linear under autocast: the product in the autocast dtype, x's grad in x's dtype; the weight
    grad summed in fp32 (not rounded to the autocast dtype as F.linear's is): at most PyTorch's error."""
    x, w, b, dy = _inputs((3, 9, 48), 40, device, seed=1)
    ours = _grads(linear, x, w, b, dy, amp, device)
    theirs = _grads(F.linear, x, w, b, dy, amp, device)
    truth = _grads(F.linear, x.double(), w.double(), b.double(), dy.to(amp).double())
    assert [t.dtype for t in ours] == [t.dtype for t in theirs] == [amp, torch.float32, torch.float32, torch.float32]
    for name, a, t, e in zip(("y", "dx", "dweight", "dbias"), ours, theirs, truth):
        assert_close_to_ref(a, t, e, factor=1.0 if name != "y" else 2.0, atol=1e-5, name=name)


def test_grads_accumulate_into_existing_grad(device):
    x, w, b, dy = _inputs((6, 24), 16, device, seed=2)
    w, b = torch.nn.Parameter(w), torch.nn.Parameter(b)
    with torch.autocast(device, dtype=torch.bfloat16):
        linear(x, w, b).backward(dy.bfloat16())
        once = [w.grad.clone(), b.grad.clone()]
        grads = [w.grad, b.grad]
        linear(x, w, b).backward(dy.bfloat16())
    for p, g, first in zip((w, b), grads, once):
        assert p.grad is g and p.grad.dtype == torch.float32
        assert_close(p.grad, 2 * first, atol=1e-5, name="accumulated")


def test_errors(device):
    x, w, b, _ = _inputs((4, 8), 3, device)
    with pytest.raises(ValueError, match=r"linear: x must be \(\.\.\., K\) and weight \(N, K\)"):
        linear(x, w.t(), b)
    with pytest.raises(ValueError, match=r"linear: bias must have shape \(N,\) = \(3,\)"):
        linear(x, w, b[:2])
    with pytest.raises(TypeError, match=r"linear: weight and bias must have x's dtype"):
        linear(x, w.half(), None)


def test_opcheck_and_compile(device):
    x, w, b, dy = _inputs((5, 16), 8, device, seed=3)
    torch.library.opcheck(linear_fwd, (x, w, b))
    torch.library.opcheck(linear_bwd, (dy, x, w, torch.zeros_like(w), torch.zeros_like(b), (True, False), True))
    compiled = torch.compile(linear, backend="aot_eager", fullgraph=True)
    for a, e in zip(_grads(compiled, x, w, b, dy), _grads(linear, x, w, b, dy)):
        assert torch.equal(a, e)
