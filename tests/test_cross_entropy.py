import pytest
import torch

from kernels import reference
from kernels.cross_entropy import (
    cross_entropy,
    cross_entropy_bwd,
    cross_entropy_fwd,
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_fwd,
)
from helpers import assert_close, assert_close_to_ref

IGNORE = -100

CE_CASES = [
    pytest.param(7, 97, "some", id="M7-V97-some-ignored"),
    pytest.param(5, 50257, "some", id="M5-V50257-some-ignored"),
    pytest.param(9, 1000, "some", id="M9-V1000-some-ignored"),
    pytest.param(9, 1000, "none", id="M9-V1000"),
    pytest.param(6, 300, "all", id="M6-V300-all-ignored"),
    pytest.param(1, 1000, "none", id="M1-V1000"),
]


def _targets(num_rows, vocab, ignored, gen, device):
    targets = torch.randint(0, vocab, (num_rows,), generator=gen)
    if ignored == "some":
        targets[::3] = IGNORE
    elif ignored == "all":
        targets[:] = IGNORE
    return targets.to(device)


def _ce_inputs(num_rows, vocab, ignored, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    logits = (3 * torch.randn(num_rows, vocab, generator=gen)).to(device=device, dtype=dtype)
    targets = _targets(num_rows, vocab, ignored, gen, device)
    grad_loss = torch.randn((), generator=gen).to(device)
    return logits, targets, grad_loss


def _loss_and_grads(fn, leaves, grad_loss, *args, **kwargs):
    leaves = [t.detach().requires_grad_() for t in leaves]
    loss = fn(*leaves, *args, **kwargs)
    return (loss, *torch.autograd.grad(loss, leaves, grad_loss))


def _ref64_ce(logits, targets):
    return reference.cross_entropy(logits.double(), targets, IGNORE, upcast=False)


# ---------------------------------------------------------------- cross_entropy


@pytest.mark.parametrize("num_rows, vocab, ignored", CE_CASES)
def test_cross_entropy_fp32(num_rows, vocab, ignored, device):
    logits, targets, grad_loss = _ce_inputs(num_rows, vocab, ignored, torch.float32, device)
    loss, grad = _loss_and_grads(cross_entropy, [logits], grad_loss, targets)
    loss_ref, grad_ref = _loss_and_grads(_ref64_ce, [logits], grad_loss.double(), targets)
    assert loss.dtype == torch.float32 and loss.shape == ()
    assert grad.dtype == torch.float32
    assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6, name="loss")
    assert_close(grad, grad_ref, atol=1e-7, rtol=1e-5, name="grad_logits")
    if ignored == "all":
        assert loss.item() == 0.0 and torch.count_nonzero(grad) == 0 and not grad.isnan().any()
    if ignored == "some":
        assert torch.count_nonzero(grad[targets == IGNORE]) == 0


@pytest.mark.parametrize("num_rows, vocab, ignored", CE_CASES)
def test_cross_entropy_launchers_fp32(num_rows, vocab, ignored, device):
    logits, targets, grad_loss = _ce_inputs(num_rows, vocab, ignored, torch.float32, device, seed=1)
    loss, lse = cross_entropy_fwd(logits, targets, IGNORE)
    assert lse.dtype == torch.float32 and lse.shape == (num_rows,)
    assert_close(lse, torch.logsumexp(logits.double(), dim=1), atol=1e-5, rtol=1e-6, name="lse")
    loss_ref, grad_ref = _loss_and_grads(_ref64_ce, [logits], grad_loss.double(), targets)
    assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6, name="loss")
    grad = cross_entropy_bwd(grad_loss, logits, targets, lse, IGNORE)
    assert_close(grad, grad_ref, atol=1e-7, rtol=1e-5, name="grad_logits")


@pytest.mark.parametrize("num_rows, vocab, ignored", [
    pytest.param(7, 97, "some", id="M7-V97-some-ignored"),
    pytest.param(9, 1000, "some", id="M9-V1000-some-ignored"),
])
def test_cross_entropy_fp16(num_rows, vocab, ignored, device):
    logits, targets, grad_loss = _ce_inputs(num_rows, vocab, ignored, torch.float16, device, seed=2)
    loss, grad = _loss_and_grads(cross_entropy, [logits], grad_loss, targets)
    loss32, grad32 = _loss_and_grads(reference.cross_entropy, [logits.float()], grad_loss, targets)
    loss16, grad16 = _loss_and_grads(
        lambda *a: reference.cross_entropy(*a, upcast=False), [logits], grad_loss, targets)
    assert loss.dtype == torch.float32 and grad.dtype == torch.float16
    assert_close_to_ref(loss, loss16, loss32, atol=1e-5, name="loss")
    assert_close_to_ref(grad, grad16, grad32, atol=1e-5, name="grad_logits")


def test_cross_entropy_strided_logits_and_reuse(device):
    # A row-strided view (row stride != V), used elsewhere in the graph too: the gradient must be a
    # new tensor, never written into the logits (PITFALLS: in-place CE gradients corrupt autograd).
    gen = torch.Generator().manual_seed(3)
    base = torch.randn(8, 130, generator=gen).to(device)
    targets = _targets(8, 120, "some", gen, device)
    grad_loss = torch.tensor(0.7, device=device)

    def with_reuse(fn):
        def loss_fn(buffer):
            logits = buffer[:, 5:125]
            return fn(logits, targets) + (logits * logits).sum() * 1e-3
        return loss_fn

    before = base.clone()
    loss, grad = _loss_and_grads(with_reuse(cross_entropy), [base], grad_loss)
    loss_ref, grad_ref = _loss_and_grads(with_reuse(_ref64_ce), [base.double()], grad_loss.double())
    assert torch.equal(base, before)
    assert_close(loss, loss_ref, atol=1e-5, name="loss")
    assert_close(grad, grad_ref, atol=1e-6, name="grad")


def test_cross_entropy_launchers_do_not_mutate_inputs(device):
    logits, targets, grad_loss = _ce_inputs(4, 300, "some", torch.float32, device, seed=4)
    copies = [t.clone() for t in (logits, targets, grad_loss)]
    loss, lse = cross_entropy_fwd(logits, targets, IGNORE)
    grad = cross_entropy_bwd(grad_loss, logits, targets, lse, IGNORE)
    assert grad.data_ptr() != logits.data_ptr()
    for a, b in zip((logits, targets, grad_loss), copies):
        assert torch.equal(a, b)


def test_cross_entropy_errors(device):
    logits = torch.randn(4, 10, device=device)
    targets = torch.tensor([1, 2, IGNORE, 9], device=device)
    with pytest.raises(TypeError, match=r"cross_entropy: logits must be float32, float16 or bfloat16; got torch.int64"):
        cross_entropy(torch.ones(4, 10, dtype=torch.long, device=device), targets)
    with pytest.raises(ValueError, match=r"cross_entropy: logits must be 2-D \(M, V\); got shape \(2, 2, 10\)"):
        cross_entropy(logits.reshape(2, 2, 10), targets)
    with pytest.raises(ValueError, match=r"cross_entropy: targets must have shape \(M,\) = \(4,\); got \(3,\)"):
        cross_entropy(logits, targets[:3])
    with pytest.raises(TypeError, match=r"cross_entropy: targets must be int64 class indices; got torch.int32"):
        cross_entropy(logits, targets.int())
    for bad in (10, -1):
        with pytest.raises(ValueError, match=r"cross_entropy: targets out of range \[0, V\) = \[0, 10\)"):
            cross_entropy(logits, torch.tensor([1, 2, bad, 3], device=device))
    with pytest.raises(ValueError, match=r"cross_entropy: all tensors must be on the same device"):
        cross_entropy(logits, targets.to("meta"))


def test_cross_entropy_unchecked_bad_target_stays_in_bounds(device):
    # check_targets=False: no host sync; the kernel masks the target load, so no out-of-bounds read.
    logits = torch.randn(3, 10, device=device)
    loss = cross_entropy(logits, torch.tensor([1, 10**6, -5], device=device), check_targets=False)
    assert torch.isfinite(loss)


def test_cross_entropy_opcheck(device):
    logits, targets, grad_loss = _ce_inputs(3, 40, "some", torch.float32, device, seed=5)
    torch.library.opcheck(cross_entropy_fwd, (logits, targets, IGNORE))
    _, lse = cross_entropy_fwd(logits, targets, IGNORE)
    torch.library.opcheck(cross_entropy_bwd, (grad_loss, logits, targets, lse, IGNORE))


def test_cross_entropy_torch_compile_matches_eager(device):
    logits, targets, grad_loss = _ce_inputs(5, 70, "some", torch.float32, device, seed=6)
    compiled = torch.compile(lambda lg, t: cross_entropy(lg, t, check_targets=False), backend="aot_eager",
                             fullgraph=True)
    ours = _loss_and_grads(compiled, [logits], grad_loss, targets)
    eager = _loss_and_grads(cross_entropy, [logits], grad_loss, targets)
    for a, e in zip(ours, eager):
        assert torch.equal(a, e)


# ---------------------------------------------------------------- linear_cross_entropy

LCE_CASES = [
    # chunk_size does not divide M, and V is not a multiple of the chunk either.
    pytest.param(37, 24, 97, 16, "some", id="M37-C24-V97-chunk16"),
    pytest.param(20, 8, 50, 7, "some", id="M20-C8-V50-chunk7"),
    pytest.param(9, 32, 1000, None, "none", id="M9-C32-V1000-default-chunk"),
    pytest.param(12, 16, 60, 5, "all", id="M12-C16-V60-chunk5-all-ignored"),
    pytest.param(1, 16, 60, 4, "none", id="M1-C16-V60"),
]


def _lce_inputs(num_rows, hidden, vocab, ignored, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_rows, hidden, generator=gen).to(device=device, dtype=dtype)
    weight = (torch.randn(vocab, hidden, generator=gen) / hidden ** 0.25).to(device=device, dtype=dtype)
    targets = _targets(num_rows, vocab, ignored, gen, device)
    grad_loss = torch.randn((), generator=gen).to(device)
    return x, weight, targets, grad_loss


def _ref64_lce(x, weight, targets):
    return reference.linear_cross_entropy(x.double(), weight.double(), targets, IGNORE, upcast=False)


@pytest.mark.parametrize("num_rows, hidden, vocab, chunk_size, ignored", LCE_CASES)
def test_linear_cross_entropy_fp32(num_rows, hidden, vocab, chunk_size, ignored, device):
    x, weight, targets, grad_loss = _lce_inputs(num_rows, hidden, vocab, ignored, torch.float32, device)
    loss, grad_x, grad_w = _loss_and_grads(
        linear_cross_entropy, [x, weight], grad_loss, targets, chunk_size=chunk_size)
    loss_ref, grad_x_ref, grad_w_ref = _loss_and_grads(_ref64_lce, [x, weight], grad_loss.double(), targets)
    assert loss.dtype == grad_x.dtype == grad_w.dtype == torch.float32
    assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6, name="loss")
    assert_close(grad_x, grad_x_ref, atol=1e-6, rtol=1e-5, name="grad_x")
    assert_close(grad_w, grad_w_ref, atol=1e-6, rtol=1e-5, name="grad_weight")
    if ignored == "all":
        assert loss.item() == 0.0 and torch.count_nonzero(grad_x) == 0 and torch.count_nonzero(grad_w) == 0


def test_linear_cross_entropy_launcher_and_no_grad(device):
    x, weight, targets, _ = _lce_inputs(37, 24, 97, "some", torch.float32, device, seed=1)
    loss_ref, grad_x_ref, grad_w_ref = _loss_and_grads(_ref64_lce, [x, weight], torch.tensor(1.0).double(), targets)
    loss, grad_x, grad_w = linear_cross_entropy_fwd(x, weight, targets, IGNORE, 16, True)
    assert_close(loss, loss_ref, atol=1e-5, name="loss")
    assert_close(grad_x, grad_x_ref, atol=1e-6, name="grad_x")
    assert_close(grad_w, grad_w_ref, atol=1e-6, name="grad_weight")
    loss_only, empty_x, empty_w = linear_cross_entropy_fwd(x, weight, targets, IGNORE, 16, False)
    assert empty_x.numel() == 0 and empty_w.numel() == 0
    assert_close(loss_only, loss_ref, atol=1e-5, name="loss (compute_grad=False)")
    with torch.no_grad():
        assert_close(linear_cross_entropy(x, weight, targets, chunk_size=8), loss_ref, atol=1e-5, name="no_grad loss")


def test_linear_cross_entropy_chunk_size_independent(device):
    x, weight, targets, grad_loss = _lce_inputs(40, 16, 130, "some", torch.float32, device, seed=2)
    results = [_loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, targets, chunk_size=c)
               for c in (3, 16, 64)]
    for other in results[1:]:
        for name, a, e in zip(("loss", "grad_x", "grad_weight"), other, results[0]):
            assert_close(a, e, atol=1e-6, name=name)


def test_linear_cross_entropy_only_x_requires_grad(device):
    x, weight, targets, grad_loss = _lce_inputs(10, 16, 50, "some", torch.float32, device, seed=3)
    x = x.requires_grad_()
    loss = linear_cross_entropy(x, weight, targets, chunk_size=4)
    (grad_x,) = torch.autograd.grad(loss, [x], grad_loss)
    _, grad_x_ref, _ = _loss_and_grads(_ref64_lce, [x, weight], grad_loss.double(), targets)
    assert weight.grad is None
    assert_close(grad_x, grad_x_ref, atol=1e-6, name="grad_x")


@pytest.mark.parametrize("weight_dtype", [torch.float16, torch.float32], ids=["w-fp16", "w-fp32"])
def test_linear_cross_entropy_fp16(weight_dtype, device):
    x, weight, targets, grad_loss = _lce_inputs(37, 32, 300, "some", torch.float16, device, seed=4)
    weight = weight.to(weight_dtype)
    loss, grad_x, grad_w = _loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, targets, chunk_size=16)
    loss32, grad_x32, grad_w32 = _loss_and_grads(
        reference.linear_cross_entropy, [x.float(), weight.float()], grad_loss, targets)
    # PyTorch's own fp16 answer, through fp16 weights (what our matmuls use).
    loss16, grad_x16, grad_w16 = _loss_and_grads(
        lambda a, b, t: reference.linear_cross_entropy(a, b.half(), t, upcast=False), [x, weight], grad_loss, targets)
    assert loss.dtype == torch.float32 and grad_x.dtype == torch.float16 and grad_w.dtype == weight_dtype
    assert_close_to_ref(loss, loss16, loss32, atol=1e-5, name="loss")
    assert_close_to_ref(grad_x, grad_x16, grad_x32, atol=1e-5, name="grad_x")
    assert_close_to_ref(grad_w, grad_w16, grad_w32, atol=1e-5, name="grad_weight")


def test_default_chunk_size_rule():
    # chunk * V about M * C: next_power_of_2(cdiv(M, cdiv(V, C))), clamped to [16, 8192].
    assert default_chunk_size(16384, 50304, 768) == 256
    assert default_chunk_size(4096, 50304, 768) == 64
    assert default_chunk_size(10, 50304, 768) == 16
    assert default_chunk_size(10**6, 100, 768) == 8192
    assert default_chunk_size(1000, 768, 768) == 1024


def test_linear_cross_entropy_errors(device):
    x, weight = torch.randn(4, 8, device=device), torch.randn(10, 8, device=device)
    targets = torch.tensor([1, 2, IGNORE, 9], device=device)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: x \(M, C\) and weight \(V, C\) must share C"):
        linear_cross_entropy(x, torch.randn(10, 7, device=device), targets)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: x must be \(M, C\) and weight \(V, C\)"):
        linear_cross_entropy(x.reshape(2, 2, 8), weight, targets)
    with pytest.raises(TypeError, match=r"linear_cross_entropy: weight must be float32, float16 or bfloat16"):
        linear_cross_entropy(x, weight.long(), targets)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: targets must have shape \(M,\) = \(4,\)"):
        linear_cross_entropy(x, weight, targets[:2])
    with pytest.raises(ValueError, match=r"linear_cross_entropy: targets out of range \[0, V\) = \[0, 10\)"):
        linear_cross_entropy(x, weight, torch.tensor([1, 2, 10, 3], device=device))
    with pytest.raises(ValueError, match=r"linear_cross_entropy: chunk_size must be a positive int; got 0"):
        linear_cross_entropy(x, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: all tensors must be on the same device"):
        linear_cross_entropy(x, weight.to("meta"), targets)


def test_linear_cross_entropy_opcheck(device):
    x, weight, targets, _ = _lce_inputs(6, 16, 40, "some", torch.float32, device, seed=5)
    for compute_grad in (True, False):
        torch.library.opcheck(linear_cross_entropy_fwd, (x, weight, targets, IGNORE, 4, compute_grad))


def test_linear_cross_entropy_torch_compile_matches_eager(device):
    x, weight, targets, grad_loss = _lce_inputs(9, 16, 40, "some", torch.float32, device, seed=6)
    compiled = torch.compile(lambda a, b, t: linear_cross_entropy(a, b, t, chunk_size=4, check_targets=False),
                             backend="aot_eager", fullgraph=True)
    ours = _loss_and_grads(compiled, [x, weight], grad_loss, targets)
    eager = _loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, targets, chunk_size=4)
    for a, e in zip(ours, eager):
        assert torch.equal(a, e)


# ---------------------------------------------------------------- GPT-2 sizes (GPU)


@pytest.mark.gpu
def test_cross_entropy_gpt2_size_bf16(device):
    logits, targets, grad_loss = _ce_inputs(4096, 50304, "some", torch.bfloat16, device, seed=7)
    loss, grad = _loss_and_grads(cross_entropy, [logits], grad_loss, targets)
    loss32, grad32 = _loss_and_grads(reference.cross_entropy, [logits.float()], grad_loss, targets)
    loss16, grad16 = _loss_and_grads(
        lambda *a: reference.cross_entropy(*a, upcast=False), [logits], grad_loss, targets)
    assert_close_to_ref(loss, loss16, loss32, atol=1e-4, name="loss")
    assert_close_to_ref(grad, grad16, grad32, atol=1e-6, name="grad_logits")


@pytest.mark.gpu
def test_cross_entropy_fp32_gpu_no_host_sync(device):
    logits, targets, grad_loss = _ce_inputs(4096, 50304, "some", torch.float32, device, seed=8)
    loss_ref, grad_ref = _loss_and_grads(reference.cross_entropy, [logits], grad_loss, targets)
    logits = logits.detach().requires_grad_()
    _loss_and_grads(cross_entropy, [logits], grad_loss, targets)  # warm-up: compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync in forward/backward raises
    try:
        loss = cross_entropy(logits, targets, check_targets=False)
        (grad,) = torch.autograd.grad(loss, [logits], grad_loss)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert_close(loss, loss_ref, atol=1e-5, name="loss")
    assert_close(grad, grad_ref, atol=1e-8, rtol=1e-4, name="grad_logits")


@pytest.mark.gpu
def test_linear_cross_entropy_gpt2_size_bf16(device):
    x, weight, targets, grad_loss = _lce_inputs(4096, 768, 50304, "some", torch.bfloat16, device, seed=9)
    weight = weight.float()  # fp32 master weights with bf16 activations, as under autocast
    loss, grad_x, grad_w = _loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, targets)
    loss32, grad_x32, grad_w32 = _loss_and_grads(
        reference.linear_cross_entropy, [x.float(), weight.bfloat16().float()], grad_loss, targets)
    loss16, grad_x16, grad_w16 = _loss_and_grads(
        lambda a, b, t: reference.linear_cross_entropy(a, b.bfloat16(), t, upcast=False),
        [x, weight], grad_loss, targets)
    assert grad_w.dtype == torch.float32
    assert_close_to_ref(loss, loss16, loss32, atol=1e-4, name="loss")
    assert_close_to_ref(grad_x, grad_x16, grad_x32, atol=1e-6, name="grad_x")
    assert_close_to_ref(grad_w, grad_w16, grad_w32, atol=1e-6, name="grad_weight")
