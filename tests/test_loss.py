import importlib

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, assert_close_to_ref, error_stats

from gpt2_triton.kernels import reference
from gpt2_triton.kernels.loss import (
    cross_entropy,
    cross_entropy_bwd,
    cross_entropy_fwd,
    default_chunk_size,
    linear_cross_entropy,
    linear_cross_entropy_fwd,
)
from gpt2_triton.kernels.utils import (
    feature_failed,
    fp32_out_matmul_kind,
    is_interpreter,
    isolated_features,
    override_target,
)

IGNORE = -100
AUTOCAST_DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]

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


def _amp_loss_and_grads(fn, leaves, grad_loss, amp_dtype, device, *args, **kwargs):
    """fn's forward under autocast (device, amp_dtype), its backward after leaving it."""
    leaves = [t.detach().requires_grad_() for t in leaves]
    with torch.autocast(device_type=device, dtype=amp_dtype):
        loss = fn(*leaves, *args, **kwargs)
    return (loss, *torch.autograd.grad(loss, leaves, grad_loss))


def _assert_low_precision(ours, torch_same_dtype, ref, atol, name):
    """The 2x-PyTorch-error rule (tests/helpers.py). bf16 outputs written by a kernel under the
    interpreter: within one bf16 ulp of the reference instead, because the interpreter's fp32 -> bf16
    cast rounds toward zero (triton's interpreter `cast_impl`; 1024/1024 casts of randn matched
    truncation), where a GPU rounds to nearest. bf16 loads are exact there, so the fp32 math is tested."""
    if ours.dtype != torch.bfloat16 or not is_interpreter():
        assert_close_to_ref(ours, torch_same_dtype, ref, atol=atol, name=name)
        return
    a, r = ours.detach().double().cpu(), ref.detach().double().cpu()
    mag = torch.maximum(a.abs(), r.abs()).clamp(min=1e-30)
    ulp = torch.exp2(torch.floor(torch.log2(mag)) - 7)
    excess = (a - r).abs() - ulp * (1 + 1e-3) - atol
    assert excess.max().item() <= 0, f"{name}: bf16 (interpreter) {excess.max().item():.3e} past 1 ulp + {atol}"


def _ref64_ce(logits, targets, num_classes=None):
    return reference.cross_entropy(logits.double(), targets, IGNORE, num_classes=num_classes, upcast=False)


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
    loss, stats = cross_entropy_fwd(logits, targets, IGNORE)
    assert stats.dtype == torch.float32 and stats.shape == (num_rows, 2)
    assert torch.equal(stats[:, 0], logits.max(dim=1).values)
    assert_close(stats.sum(dim=1), torch.logsumexp(logits.double(), dim=1), atol=1e-5, rtol=1e-6, name="lse")
    loss_ref, grad_ref = _loss_and_grads(_ref64_ce, [logits], grad_loss.double(), targets)
    assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6, name="loss")
    grad = cross_entropy_bwd(grad_loss, logits, targets, stats, IGNORE)
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
    # new tensor, never written into the logits (in place, it would corrupt autograd where they are used).
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
    loss, stats = cross_entropy_fwd(logits, targets, IGNORE)
    grad = cross_entropy_bwd(grad_loss, logits, targets, stats, IGNORE)
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
        with pytest.raises(ValueError, match=r"cross_entropy: targets out of range \[0, num_classes\) = \[0, 10\)"):
            cross_entropy(logits, torch.tensor([1, 2, bad, 3], device=device))
    with pytest.raises(ValueError, match=r"cross_entropy: all tensors must be on the same device"):
        cross_entropy(logits, targets.to("meta"))
    for bad in (0, 11, 2.0, True):
        with pytest.raises(ValueError, match=r"cross_entropy: num_classes must be an int in \[1, V\] = \[1, 10\]"):
            cross_entropy(logits, targets, num_classes=bad)
    with pytest.raises(ValueError, match=r"cross_entropy: targets out of range \[0, num_classes\) = \[0, 9\)"):
        cross_entropy(logits, targets, num_classes=9)


def test_cross_entropy_unchecked_bad_target_stays_in_bounds(device):
    # check_targets=False: no host sync; the kernel masks the target load, so no out-of-bounds read.
    logits = torch.randn(3, 10, device=device)
    loss = cross_entropy(logits, torch.tensor([1, 10**6, -5], device=device), check_targets=False)
    assert torch.isfinite(loss)


def test_cross_entropy_opcheck(device):
    logits, targets, grad_loss = _ce_inputs(3, 40, "some", torch.float32, device, seed=5)
    torch.library.opcheck(cross_entropy_fwd, (logits, targets, IGNORE))
    _, stats = cross_entropy_fwd(logits, targets, IGNORE)
    torch.library.opcheck(cross_entropy_bwd, (grad_loss, logits, targets, stats, IGNORE))
    torch.library.opcheck(cross_entropy_fwd, (logits, targets, IGNORE, 31))
    torch.library.opcheck(cross_entropy_bwd, (grad_loss, logits, targets, stats, IGNORE, 31))


def test_cross_entropy_torch_compile_matches_eager(device):
    logits, targets, grad_loss = _ce_inputs(5, 70, "some", torch.float32, device, seed=6)
    targets = targets.clamp(max=63).where(targets != IGNORE, IGNORE)
    compiled = torch.compile(lambda lg, t: cross_entropy(lg, t, check_targets=False, num_classes=64),
                             backend="aot_eager", fullgraph=True)
    ours = _loss_and_grads(compiled, [logits], grad_loss, targets)
    eager = _loss_and_grads(cross_entropy, [logits], grad_loss, targets, num_classes=64)
    for a, e in zip(ours, eager):
        assert torch.equal(a, e)


def _ce_ours_same_dtype_fp32(logits, targets, grad_loss):
    """(loss, grad) of ours, of PyTorch in the logits' dtype, and of the fp32 reference."""
    return (_loss_and_grads(cross_entropy, [logits], grad_loss, targets),
            _loss_and_grads(lambda *a: reference.cross_entropy(*a, upcast=False), [logits], grad_loss, targets),
            _loss_and_grads(reference.cross_entropy, [logits.float()], grad_loss, targets))


def test_cross_entropy_bf16(device):
    # bf16 on CPU too: the interpreter loads bf16 exactly (its stores truncate: _assert_low_precision).
    logits, targets, grad_loss = _ce_inputs(9, 1000, "some", torch.bfloat16, device, seed=12)
    (loss, grad), (loss16, grad16), (loss32, grad32) = _ce_ours_same_dtype_fp32(logits, targets, grad_loss)
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert_close_to_ref(loss, loss16, loss32, atol=1e-5, name="loss")
    _assert_low_precision(grad, grad16, grad32, atol=1e-8, name="grad_logits")


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
def test_cross_entropy_large_logits_vs_fp64(dtype, device):
    # Logits x10: softmax as exp((x - max) - log_norm) (PyTorch's log_softmax rounding). exp(x - lse)
    # rounded lse at its magnitude first: 4x PyTorch's fp32 error vs fp64 (rel RMS 5.8e-7 vs 1.4e-7 at
    # 21 x 32000), which this 2x rule rejects. fp16: PyTorch computes in fp16, we in fp32, so ours is the
    # closer one to fp64 (2.4e-4 vs 2.8e-4 rel RMS, loss 5e-7 vs 2e-2 off).
    gen = torch.Generator().manual_seed(13)
    logits = (10 * torch.randn(9, 3000, generator=gen)).to(device=device, dtype=dtype)
    targets = _targets(9, 3000, "some", gen, device)
    grad_loss = torch.tensor(1.0, device=device)
    loss, grad = _loss_and_grads(cross_entropy, [logits], grad_loss, targets)
    loss64, grad64 = _loss_and_grads(_ref64_ce, [logits.double()], grad_loss.double(), targets)
    loss_pt, grad_pt = _loss_and_grads(
        lambda a, t: F.cross_entropy(a, t, ignore_index=IGNORE), [logits], grad_loss, targets)
    assert_close_to_ref(loss, loss_pt, loss64, atol=1e-6, name="loss")
    assert_close_to_ref(grad, grad_pt, grad64, atol=0.0 if dtype == torch.float32 else 1e-7, name="grad_logits")
    if dtype == torch.float32:
        assert_close(grad, grad64, atol=1e-8, rtol=1e-6, name="grad_logits vs fp64")


PAD_CASES = [
    pytest.param(7, 97, 128, id="M7-V97-pad128"),
    pytest.param(5, 300, 1100, id="M5-V300-pad1100"),  # whole V-blocks of padding (interpreter BLOCK_V 512)
    pytest.param(4, 512, 1100, id="M4-V512-pad1100"),  # classes end on a block boundary
    pytest.param(3, 50257, 50304, id="M3-V50257-pad50304"),
]


@pytest.mark.parametrize("num_rows, num_classes, padded", PAD_CASES)
def test_cross_entropy_padded_vocab(num_rows, num_classes, padded, device):
    # Padded columns hold huge values and NaN: masked to -inf, they change nothing and get zero grad.
    logits, targets, grad_loss = _ce_inputs(num_rows, padded, "some", torch.float32, device, seed=14)
    targets = targets.clamp(max=num_classes - 1).where(targets != IGNORE, IGNORE)
    logits[:, num_classes::2] = 1e4
    logits[:, num_classes + 1::2] = float("nan")
    loss, grad = _loss_and_grads(cross_entropy, [logits], grad_loss, targets, num_classes=num_classes)
    loss_ref, grad_ref = _loss_and_grads(
        _ref64_ce, [logits[:, :num_classes]], grad_loss.double(), targets)
    assert grad.shape == (num_rows, padded)
    assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6, name="loss")
    assert_close(grad[:, :num_classes], grad_ref, atol=1e-7, rtol=1e-5, name="grad_logits")
    assert torch.count_nonzero(grad[:, num_classes:]) == 0
    _, stats = cross_entropy_fwd(logits, targets, IGNORE, num_classes)
    assert_close(stats.sum(dim=1), torch.logsumexp(logits[:, :num_classes].double(), dim=1), atol=1e-5,
                 name="lse over the classes")


@pytest.mark.parametrize("amp_dtype", AUTOCAST_DTYPES)
@pytest.mark.parametrize("input_dtype", ["fp32", "amp"])
def test_cross_entropy_autocast(amp_dtype, input_dtype, device):
    # fp32 policy, as F.cross_entropy under autocast: fp32 math and loss, the grad in the logits' dtype.
    dtype = torch.float32 if input_dtype == "fp32" else amp_dtype
    logits, targets, grad_loss = _ce_inputs(9, 1000, "some", dtype, device, seed=15)
    ours = _amp_loss_and_grads(cross_entropy, [logits], grad_loss, amp_dtype, device, targets)
    torch_amp = _amp_loss_and_grads(
        lambda a, t: F.cross_entropy(a, t, ignore_index=IGNORE), [logits], grad_loss, amp_dtype, device, targets)
    ref = _loss_and_grads(_ref64_ce, [logits.double()], grad_loss.double(), targets)
    assert ours[0].dtype == torch_amp[0].dtype == torch.float32
    assert ours[1].dtype == torch_amp[1].dtype == dtype
    assert_close_to_ref(ours[0], torch_amp[0], ref[0], atol=1e-6, name="loss")
    _assert_low_precision(ours[1], torch_amp[1], ref[1], atol=1e-8, name="grad_logits")


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


def _ref64_lce(x, weight, targets, num_classes=None):
    return reference.linear_cross_entropy(x.double(), weight.double(), targets, IGNORE, num_classes=num_classes,
                                          upcast=False)


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


@pytest.mark.parametrize("num_rows, hidden, num_classes, padded, ignored", [
    pytest.param(37, 24, 97, 97, "some", id="M37-C24-V97"),
    pytest.param(20, 40, 1100, 1100, "none", id="M20-C40-V1100-3splits"),  # K tail, several V-splits
    pytest.param(9, 16, 300, 320, "some", id="M9-C16-V300-pad320"),
    pytest.param(6, 16, 60, 60, "all", id="M6-C16-V60-all-ignored"),
])
def test_linear_cross_entropy_no_grad_fused(num_rows, hidden, num_classes, padded, ignored, device):
    # No grad: one fused kernel (matmul + online logsumexp), the logits never in memory.
    x, weight, targets, _ = _lce_inputs(num_rows, hidden, padded, ignored, torch.float32, device, seed=30)
    targets = targets.clamp(max=num_classes - 1).where(targets != IGNORE, IGNORE)
    weight[num_classes:] = 30.0
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, targets, num_classes=num_classes)
    loss_ref = _ref64_lce(x, weight, targets, num_classes)
    assert loss.dtype == torch.float32
    assert_close(loss, loss_ref, atol=1e-5, rtol=1e-6, name="loss")
    if ignored == "all":
        assert loss.item() == 0.0


def test_linear_cross_entropy_no_grad_empty_splits(device, monkeypatch):
    # More V-splits than the classes fill: the empty ones (max -inf, sum 0) drop out of the combine.
    ce = importlib.import_module("gpt2_triton.kernels.loss")
    monkeypatch.setattr(ce, "_lse_splits", lambda num_rows, num_classes: 8)
    x, weight, targets, _ = _lce_inputs(11, 16, 50, "some", torch.float32, device, seed=31)
    loss, _, _ = linear_cross_entropy_fwd(x, weight, targets, IGNORE, 11, False)
    assert_close(loss, _ref64_lce(x, weight, targets), atol=1e-5, rtol=1e-6, name="loss")


def test_linear_cross_entropy_no_grad_fp16(device):
    # fp16 tiles, fp32 accumulation; the logits are never rounded to fp16 here (PyTorch's are).
    x, weight, targets, _ = _lce_inputs(37, 32, 300, "some", torch.float16, device, seed=32)
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, targets)
        loss16 = reference.linear_cross_entropy(x, weight, targets, IGNORE, upcast=False)
    loss64 = _ref64_lce(x, weight, targets)
    assert_close_to_ref(loss, loss16, loss64, atol=1e-6, name="loss")


@pytest.mark.parametrize("amp_dtype", AUTOCAST_DTYPES)
def test_linear_cross_entropy_no_grad_autocast(amp_dtype, device):
    # Validation loss: fp32 x and weight under autocast without grad, vs F.linear + F.cross_entropy under
    # the same autocast. (bf16 under the interpreter takes the chunks: its bf16 tl.dot is not usable.)
    x, weight, targets, _ = _lce_inputs(64, 31, 123, "some", torch.float32, device, seed=34)
    with torch.no_grad(), torch.autocast(device, dtype=amp_dtype):
        loss = linear_cross_entropy(x, weight, targets)
        loss_amp = F.cross_entropy(F.linear(x, weight), targets, ignore_index=IGNORE)
    assert loss.dtype == torch.float32
    assert_close_to_ref(loss, loss_amp, _ref64_lce(x, weight, targets), atol=1e-6, name="loss")


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


def test_fp32_out_matmul_failures_fall_back_in_order(device):
    """addmm(out_dtype=float32), then mm(out_dtype=float32), then fp32 copies: each kind that fails is
    recorded once (CPU torch has neither kernel, so both fail for real there; on CUDA they are forced)
    and the grads are those of the fp32-copy path."""
    x, weight, targets, grad_loss = _lce_inputs(37, 32, 300, "some", torch.float16, device, seed=4)
    weight = weight.float()  # fp32 master weight: the chunks' products are summed into an fp32 grad
    want = _loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, targets, chunk_size=16)
    forced = ("fp32_out_addmm", "fp32_out_mm") if device == "cuda" else ()
    with isolated_features(), override_target(fp32_out_matmul_kind="addmm", fail_features=forced):
        with pytest.warns(RuntimeWarning, match="out_dtype=float32"):
            got = _loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, targets, chunk_size=16)
        assert feature_failed("fp32_out_addmm") and feature_failed("fp32_out_mm")
    for name, a, b in zip(("loss", "grad_x", "grad_weight"), got, want):
        assert_close(a, b, atol=1e-6, rtol=1e-5, name=name)


def test_default_chunk_size_rule():
    # Chunk logits: a quarter of the (M, V) logits, within [1, 8] x the fp32 grad_weight (V*C*4 bytes);
    # even chunks rounded up to 64 rows. GPT-2 in bf16: B=4 -> 3 chunks, B=16 -> 4, B=64 -> 6.
    assert default_chunk_size(4096, 50304, 768) == 1408
    assert default_chunk_size(16384, 50304, 768) == 4096
    assert default_chunk_size(65536, 50304, 768) == 10944
    assert default_chunk_size(16384, 50304, 768, elem_size=4) == 4096
    assert default_chunk_size(1024, 50304, 768) == 1024  # evaluation-sized M: one chunk
    assert default_chunk_size(10, 97, 16) == 10
    for num_rows in (1, 100, 1000, 3000, 5000, 20000, 100000):
        for vocab, hidden, elem in ((50304, 768, 2), (128256, 4096, 2), (1000, 64, 4)):
            chunk = default_chunk_size(num_rows, vocab, hidden, elem)
            assert 1 <= chunk <= num_rows
            grad_weight_bytes = vocab * hidden * 4
            budget = min(max(num_rows * vocab * elem / 4, grad_weight_bytes), 8 * grad_weight_bytes)
            assert chunk * vocab * elem <= budget * 1.5 + 64 * vocab * elem, (num_rows, vocab, hidden)
            if num_rows > chunk:  # not smaller than the budget allows (up to the even split)
                assert -(-num_rows // chunk) <= -(-num_rows * vocab * elem // int(budget)), (num_rows, vocab)


@pytest.mark.parametrize("amp_dtype", AUTOCAST_DTYPES)
def test_linear_cross_entropy_autocast_fp32_inputs(amp_dtype, device):
    # Issue reproduction: x (64, 31) fp32, w (123, 31) fp32 under autocast raised "Expected out tensor to
    # have dtype BFloat16" at the fp32 grad-weight sum. As F.linear + F.cross_entropy under autocast:
    # products in the autocast dtype, loss fp32, grads in the inputs' dtype (fp32).
    x, weight, targets, grad_loss = _lce_inputs(64, 31, 123, "some", torch.float32, device, seed=20)
    ours = _amp_loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, amp_dtype, device, targets,
                               chunk_size=16)
    torch_amp = _amp_loss_and_grads(
        lambda a, b, t: F.cross_entropy(F.linear(a, b), t, ignore_index=IGNORE),
        [x, weight], grad_loss, amp_dtype, device, targets)
    ref = _loss_and_grads(_ref64_lce, [x, weight], grad_loss.double(), targets)
    for name, a, b in zip(("loss", "grad_x", "grad_weight"), ours, torch_amp):
        assert a.dtype == b.dtype == torch.float32, name
    for name, a, b, r in zip(("loss", "grad_x", "grad_weight"), ours, torch_amp, ref):
        assert_close_to_ref(a, b, r, atol=1e-6, name=name)
    # Already-cast activations (what a caller that casts itself passes) give the same numbers.
    cast = _amp_loss_and_grads(linear_cross_entropy, [x.to(amp_dtype), weight], grad_loss, amp_dtype, device,
                               targets, chunk_size=16)
    assert torch.equal(cast[0], ours[0]) and torch.equal(cast[2], ours[2])
    assert torch.equal(cast[1].float(), ours[1])


@pytest.mark.parametrize("amp_dtype", AUTOCAST_DTYPES)
def test_linear_cross_entropy_autocast_low_precision_inputs(amp_dtype, device):
    # x and weight already in the autocast dtype (gpt2_triton.model.ops casts both today): grads in that dtype.
    x, weight, targets, grad_loss = _lce_inputs(37, 32, 300, "some", amp_dtype, device, seed=21)
    ours = _amp_loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, amp_dtype, device, targets,
                               chunk_size=16)
    torch_amp = _amp_loss_and_grads(
        lambda a, b, t: F.cross_entropy(F.linear(a, b), t, ignore_index=IGNORE),
        [x, weight], grad_loss, amp_dtype, device, targets)
    ref = _loss_and_grads(_ref64_lce, [x.double(), weight.double()], grad_loss.double(), targets)
    assert ours[0].dtype == torch.float32 and ours[1].dtype == ours[2].dtype == amp_dtype
    for name, a, b, r in zip(("loss", "grad_x"), ours, torch_amp, ref):
        assert_close_to_ref(a, b, r, atol=1e-6, name=name)
    # grad_weight: the fp32 sum over the chunks, scaled and rounded to bf16 once by a kernel's store, which
    # under the interpreter rounds toward zero (measured here: 1.9x PyTorch's max error, 2.1x its RMS error)
    factor = 3.0 if is_interpreter() and amp_dtype == torch.bfloat16 else 2.0
    assert_close_to_ref(ours[2], torch_amp[2], ref[2], factor=factor, atol=1e-6, name="grad_weight")


def test_linear_cross_entropy_grad_weight_summed_in_fp32(device):
    # fp32 master weight, bf16 products under autocast, 9 chunks: grad_weight is the fp32 sum of the
    # chunks' bf16 products (never rounded to bf16), so it equals the one-chunk result up to fp32
    # summation order. Summing bf16-rounded partials, as before, is ~1e-3 off: the check can tell.
    x, weight, targets, grad_loss = _lce_inputs(72, 16, 50, "none", torch.float32, device, seed=22)
    chunked = _amp_loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, torch.bfloat16, device, targets,
                                  chunk_size=8)
    whole = _amp_loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, torch.bfloat16, device, targets,
                                chunk_size=72)
    assert chunked[2].dtype == torch.float32
    atol = 1e-6 * whole[2].abs().max().item()
    assert_close(chunked[2], whole[2], atol=atol, rtol=1e-5, name="grad_weight, 9 chunks vs 1")
    # The same chunks summed after rounding each partial to bf16:
    xb, wb = x.bfloat16(), weight.bfloat16()
    probs = torch.softmax((xb @ wb.T).float(), dim=1)
    dlogits = ((probs - F.one_hot(targets, 50).float()) * grad_loss / 72).bfloat16()
    rounded = sum((dlogits[i:i + 8].T @ xb[i:i + 8]).float() for i in range(0, 72, 8))
    max_ours, _ = error_stats(chunked[2], whole[2])
    max_rounded, _ = error_stats(rounded, whole[2])
    assert max_rounded > 20 * max(max_ours, 1e-12), (max_ours, max_rounded)


@pytest.mark.parametrize("num_rows, hidden, num_classes, padded, chunk_size", [
    pytest.param(37, 24, 97, 128, 16, id="M37-C24-V97-pad128-chunk16"),
    pytest.param(9, 16, 300, 1100, None, id="M9-C16-V300-pad1100-default-chunk"),
])
def test_linear_cross_entropy_padded_vocab(num_rows, hidden, num_classes, padded, chunk_size, device):
    # Padded weight rows (large, so unmasked they would dominate): no effect, zero gradient.
    x, weight, targets, grad_loss = _lce_inputs(num_rows, hidden, padded, "some", torch.float32, device, seed=23)
    targets = targets.clamp(max=num_classes - 1).where(targets != IGNORE, IGNORE)
    weight[num_classes:] = 30.0
    loss, grad_x, grad_w = _loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, targets,
                                           chunk_size=chunk_size, num_classes=num_classes)
    ref = _loss_and_grads(_ref64_lce, [x, weight], grad_loss.double(), targets, num_classes)
    assert grad_w.shape == (padded, hidden)
    assert_close(loss, ref[0], atol=1e-5, rtol=1e-6, name="loss")
    assert_close(grad_x, ref[1], atol=1e-6, rtol=1e-5, name="grad_x")
    assert_close(grad_w, ref[2], atol=1e-6, rtol=1e-5, name="grad_weight")
    assert torch.count_nonzero(grad_w[num_classes:]) == 0


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
    with pytest.raises(ValueError, match=r"linear_cross_entropy: targets out of range \[0, num_classes\) = \[0, 10\)"):
        linear_cross_entropy(x, weight, torch.tensor([1, 2, 10, 3], device=device))
    with pytest.raises(ValueError, match=r"linear_cross_entropy: chunk_size must be a positive int; got 0"):
        linear_cross_entropy(x, weight, targets, chunk_size=0)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: all tensors must be on the same device"):
        linear_cross_entropy(x, weight.to("meta"), targets)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: num_classes must be an int in \[1, V\] = \[1, 10\]"):
        linear_cross_entropy(x, weight, targets, num_classes=0)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: targets out of range \[0, num_classes\) = \[0, 9\)"):
        linear_cross_entropy(x, weight, targets, num_classes=9)
    with pytest.raises(ValueError, match=r"linear_cross_entropy: chunk_size must be a positive int; got 2.5"):
        linear_cross_entropy(x, weight, targets, chunk_size=2.5)


def test_linear_cross_entropy_opcheck(device):
    x, weight, targets, _ = _lce_inputs(6, 16, 40, "some", torch.float32, device, seed=5)
    for compute_grad in (True, False):
        torch.library.opcheck(linear_cross_entropy_fwd, (x, weight, targets, IGNORE, 4, compute_grad))
        torch.library.opcheck(linear_cross_entropy_fwd, (x, weight, targets, IGNORE, 4, compute_grad, 33))


def test_linear_cross_entropy_torch_compile_matches_eager(device):
    x, weight, targets, grad_loss = _lce_inputs(9, 16, 40, "some", torch.float32, device, seed=6)
    targets = targets.clamp(max=32).where(targets != IGNORE, IGNORE)
    compiled = torch.compile(
        lambda a, b, t: linear_cross_entropy(a, b, t, chunk_size=4, check_targets=False, num_classes=33),
        backend="aot_eager", fullgraph=True)
    ours = _loss_and_grads(compiled, [x, weight], grad_loss, targets)
    eager = _loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, targets, chunk_size=4, num_classes=33)
    for a, e in zip(ours, eager):
        assert torch.equal(a, e)


# ---------------------------------------------------------------- GPT-2 sizes (GPU)


@pytest.mark.gpu
def test_cross_entropy_gpt2_size_bf16(device):
    logits, targets, grad_loss = _ce_inputs(4096, 50304, "some", torch.bfloat16, device, seed=7)
    (loss, grad), (loss16, grad16), (loss32, grad32) = _ce_ours_same_dtype_fp32(logits, targets, grad_loss)
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


@pytest.mark.gpu
def test_cross_entropy_gpt2_padded_vocab_bf16(device):
    # The model's call: logits over the padded 50304 rows of lm_head, 50257 classes.
    logits, targets, grad_loss = _ce_inputs(4096, 50304, "some", torch.bfloat16, device, seed=24)
    targets = targets.clamp(max=50256).where(targets != IGNORE, IGNORE)
    loss, grad = _loss_and_grads(cross_entropy, [logits], grad_loss, targets, num_classes=50257)
    real = logits[:, :50257]
    loss32, grad32 = _loss_and_grads(reference.cross_entropy, [real.float()], grad_loss, targets)
    loss16, grad16 = _loss_and_grads(
        lambda *a: reference.cross_entropy(*a, upcast=False), [real], grad_loss, targets)
    assert_close_to_ref(loss, loss16, loss32, atol=1e-4, name="loss")
    assert_close_to_ref(grad[:, :50257], grad16, grad32, atol=1e-6, name="grad_logits")
    assert torch.count_nonzero(grad[:, 50257:]) == 0


@pytest.mark.gpu
def test_linear_cross_entropy_fp32_out_products_gpu(device):
    # CUDA path of the fp32 dW sum (addmm/mm with out_dtype=float32 where torch has it): bf16 products,
    # fp32 sum, so 4 chunks equal 1 chunk up to fp32 summation order, under CUDA autocast like the model.
    kind = fp32_out_matmul_kind(torch.device(device))
    assert kind in ("addmm", "mm", "upcast")
    x, weight, targets, grad_loss = _lce_inputs(4096, 768, 50304, "some", torch.float32, device, seed=25)
    targets = targets.clamp(max=50256).where(targets != IGNORE, IGNORE)
    runs = [_amp_loss_and_grads(linear_cross_entropy, [x, weight], grad_loss, torch.bfloat16, device, targets,
                                chunk_size=c, num_classes=50257) for c in (1024, 4096)]
    assert runs[0][2].dtype == torch.float32
    assert_close(runs[0][2], runs[1][2], atol=1e-9, rtol=1e-4, name=f"grad_weight 4 chunks vs 1 ({kind})")
    torch_amp = _amp_loss_and_grads(
        lambda a, b, t: F.cross_entropy(F.linear(a, b[:50257]), t, ignore_index=IGNORE),
        [x, weight], grad_loss, torch.bfloat16, device, targets)
    ref = _loss_and_grads(
        lambda a, b, t: reference.linear_cross_entropy(a, b, t, IGNORE, num_classes=50257),
        [x.bfloat16().float(), weight.bfloat16().float()], grad_loss, targets)
    for name, a, b, r in zip(("loss", "grad_x", "grad_weight"), runs[0], torch_amp, ref):
        assert_close_to_ref(a, b, r, atol=1e-6, name=name)


@pytest.mark.gpu
def test_linear_cross_entropy_no_grad_gpt2_size_bf16(device):
    # bf16 tl.dot is tested here only: the interpreter multiplies bf16 tiles as their uint16 storage.
    x, weight, targets, _ = _lce_inputs(4096, 768, 50304, "some", torch.bfloat16, device, seed=33)
    targets = targets.clamp(max=50256).where(targets != IGNORE, IGNORE)
    with torch.no_grad():
        loss = linear_cross_entropy(x, weight, targets, num_classes=50257)
        loss16 = reference.linear_cross_entropy(x, weight, targets, IGNORE, num_classes=50257, upcast=False)
        loss32 = reference.linear_cross_entropy(x, weight, targets, IGNORE, num_classes=50257)
    assert_close_to_ref(loss, loss16, loss32, atol=1e-4, name="loss")


def test_linear_cross_entropy_weight_grad_accumulates_into_grad(device):
    """Gradient accumulation as the training step does it, (loss / k).backward() per micro-step: the
    weight's gradient is scaled by the upstream 1/k and added into the same .grad by one pass, equal to
    the reference's sum of the micro-steps; torch.autograd.grad leaves .grad alone."""
    x, weight, targets, _ = _lce_inputs(37, 32, 300, "some", torch.float32, device, seed=30)
    weight = torch.nn.Parameter(weight)
    for _ in range(3):
        (linear_cross_entropy(x, weight, targets, chunk_size=16) / 4).backward()
    grad = weight.grad
    ref_w = weight.detach().double().requires_grad_()
    (want,) = torch.autograd.grad(_ref64_lce(x.double(), ref_w, targets) * 0.75, ref_w)
    assert_close(weight.grad, want, atol=1e-6, rtol=1e-5, name="3 x (loss / 4)")
    (fresh,) = torch.autograd.grad(linear_cross_entropy(x, weight, targets, chunk_size=16), weight)
    assert weight.grad is grad
    assert_close(weight.grad, want, atol=1e-6, rtol=1e-5, name="untouched by autograd.grad")
    assert_close(fresh, want / 0.75, atol=1e-6, rtol=1e-5, name="autograd.grad")
