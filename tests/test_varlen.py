"""Variable-length and document-masked flash attention (kernels/attention/varlen.py) against dense-mask references
(kernels/reference.py) computed in fp64: forward, logsumexp and every gradient.

Under the interpreter the tiles are 32 x 16 (forward, dQ) and 16 x 32 (dK/dV), so lengths 16, 17, 32
and 33 end exactly on and just past tile edges.
"""
import pytest
import torch
from helpers import assert_close, assert_close_to_ref

from gpt2_triton.kernels import reference as ref
from gpt2_triton.kernels.attention import flash_attention_qkv, flash_attention_varlen
from gpt2_triton.kernels.attention.varlen import (
    flash_attention_qkv_documents_bwd,
    flash_attention_qkv_documents_fwd,
    flash_attention_varlen_bwd,
    flash_attention_varlen_fwd,
)
from gpt2_triton.kernels.utils import document_bounds, feature_failed, isolated_features, override_target

FP32_TOL = dict(atol=1e-5, rtol=1e-5)
CAUSAL = [pytest.param(True, id="causal"), pytest.param(False, id="full")]

# (lens_q, lens_k, seqused_k)
VARLEN_CASES = [
    pytest.param([1, 32, 33, 16, 17, 5], None, None, id="edges-and-length-1"),
    pytest.param([0, 7, 0, 20, 0], None, None, id="empty-sequences"),
    pytest.param([45], None, None, id="single-sequence"),
    pytest.param([1] * 6, None, None, id="one-token-each"),
    pytest.param([1, 5, 17], [9, 40, 33], None, id="q-shorter-than-k"),
    pytest.param([20, 3], [4, 3], None, id="q-longer-than-k"),
    pytest.param([3, 4], [0, 6], None, id="no-keys"),
    pytest.param([1, 1, 4], [32, 32, 32], [10, 0, 32], id="seqused_k"),
]


def _cu(lens, device):
    return torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=device)


def _varlen_inputs(lens_q, lens_k, H, D, dtype, device, seed):
    gen = torch.Generator().manual_seed(seed)
    total_q, total_k = sum(lens_q), sum(lens_k)
    q = torch.randn(total_q, H, D, generator=gen)
    k, v = (torch.randn(total_k, H, D, generator=gen) for _ in range(2))
    do = torch.randn(total_q, H, D, generator=gen)
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v, do))


def _grads(fn, inputs, do):
    xs = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*xs)
    return (out.detach(), *torch.autograd.grad(out, xs, do.to(out.dtype)))


def _varlen_reference(q, k, v, do, cu_q, cu_k, causal, used, dtype=torch.float64, scale=None):
    """(o, dq, dk, dv) of the dense-mask reference computed in `dtype` (fp64: exact; q's dtype: PyTorch's own)."""
    def fn(q, k, v):
        return ref.flash_attention_varlen(q, k, v, cu_q, cu_k, 0, 0, causal, scale, seqused_k=used, upcast=False)
    return _grads(fn, [t.to(dtype) for t in (q, k, v)], do.to(dtype))


def _reference_lse(q, k, cu_q, cu_k, causal, used):
    scores = torch.einsum("qhd,khd->hqk", q.double(), k.double()) / q.shape[-1] ** 0.5
    mask = ref.varlen_mask(cu_q, cu_k, causal, used)
    lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)  # (H, total_q); -inf: no key
    return lse.masked_fill(~mask.any(-1), float("inf"))  # the kernel's convention for a query without keys


# ------------------------------------------------------------------------------------------------
# flash_attention_varlen, fp32: launchers (with the logsumexp) and autograd
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("lens_q, lens_k, used", VARLEN_CASES)
def test_varlen_fp32(lens_q, lens_k, used, causal, device):
    lens_k = lens_k or lens_q
    D = 32 if len(lens_q) % 2 else 16
    q, k, v, do = _varlen_inputs(lens_q, lens_k, 2, D, torch.float32, device, seed=len(lens_q))
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    used = None if used is None else torch.tensor(used, dtype=torch.int32, device=device)
    max_q, max_k = max(lens_q), max(lens_k)

    o, lse = flash_attention_varlen_fwd(q, k, v, cu_q, cu_k, max_q, max_k, causal, None, used)
    expected = _varlen_reference(q, k, v, do, cu_q, cu_k, causal, used)
    assert o.dtype == lse.dtype == torch.float32 and lse.shape == (2, q.shape[0])
    assert_close(o, expected[0], **FP32_TOL, name="o")
    assert_close(lse, _reference_lse(q, k, cu_q, cu_k, causal, used), **FP32_TOL, name="lse")
    dq, dk, dv = flash_attention_varlen_bwd(do, q, k, v, o, lse, cu_q, cu_k, max_q, max_k, causal, None, used)
    for name, ours, exact in zip(("dq", "dk", "dv"), (dq, dk, dv), expected[1:]):
        assert_close(ours, exact, **FP32_TOL, name=name)

    got = _grads(lambda q, k, v: flash_attention_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal,
                                                         seqused_k=used), (q, k, v), do)
    for name, ours, exact in zip(("o", "dq", "dk", "dv"), got, expected):
        assert_close(ours, exact, **FP32_TOL, name=f"autograd {name}")


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_varlen_random_boundaries_fp32(seed, device):
    """Random lengths (zeros and ones included), different for q and k, causal."""
    gen = torch.Generator().manual_seed(100 + seed)
    n = int(torch.randint(1, 8, (1,), generator=gen))
    lens_k = torch.randint(0, 50, (n,), generator=gen)
    lens_k[torch.rand(n, generator=gen) < 0.3] = 1
    lens_q = torch.minimum(lens_k, torch.randint(0, 50, (n,), generator=gen))
    lens_q, lens_k = lens_q.tolist(), lens_k.tolist()
    q, k, v, do = _varlen_inputs(lens_q, lens_k, 3, 16, torch.float32, device, seed=seed)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    got = _grads(lambda q, k, v: flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)),
                 (q, k, v), do)
    expected = _varlen_reference(q, k, v, do, cu_q, cu_k, True, None)
    for name, ours, exact in zip(("o", "dq", "dk", "dv"), got, expected):
        assert_close(ours, exact, **FP32_TOL, name=f"{name} (lens_q {lens_q}, lens_k {lens_k})")


@pytest.mark.parametrize("scale", [0.37, -0.37, 0.0], ids=["pos", "neg", "zero"])
def test_varlen_custom_scale_fp32(scale, device):
    lens_q, lens_k = [3, 17], [9, 33]
    q, k, v, do = _varlen_inputs(lens_q, lens_k, 2, 16, torch.float32, device, seed=5)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    got = _grads(lambda q, k, v: flash_attention_varlen(q, k, v, cu_q, cu_k, 17, 33, scale=scale), (q, k, v), do)
    expected = _varlen_reference(q, k, v, do, cu_q, cu_k, True, None, scale=scale)
    for name, ours, exact in zip(("o", "dq", "dk", "dv"), got, expected):
        assert_close(ours, exact, **FP32_TOL, name=name)


def test_varlen_equals_one_call_per_sequence(device):
    """Each packed sequence gets exactly what flash_attention_varlen gives it alone (same tiles: bitwise)."""
    lens = [17, 1, 40]
    q, k, v, do = _varlen_inputs(lens, lens, 2, 16, torch.float32, device, seed=6)
    cu = _cu(lens, device)
    packed = flash_attention_varlen(q, k, v, cu, cu, 40, 40)
    for i, n in enumerate(lens):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        alone = flash_attention_varlen(q[rows], k[rows], v[rows], _cu([n], device), _cu([n], device), n, n)
        assert_close(packed[rows], alone, atol=0, rtol=0, name=f"sequence {i}")


def test_varlen_strided_views_and_determinism(device):
    """Packed views of a (total, 3, H, D) buffer (as the model's QKV projection gives them) equal contiguous
    copies, and two runs give bitwise equal results and grads (no atomics)."""
    lens = [5, 33, 16]
    cu = _cu(lens, device)
    gen = torch.Generator().manual_seed(7)
    qkv = torch.randn(sum(lens), 3, 2, 16, generator=gen).to(device)
    do = torch.randn(sum(lens), 2, 16, generator=gen).to(device)
    views = qkv.unbind(1)
    runs = [_grads(lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, 33, 33), views, do) for _ in range(2)]
    copies = _grads(lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, 33, 33),
                    [t.contiguous() for t in views], do)
    for a, b, c in zip(*runs, copies):
        assert torch.equal(a, b)
        assert_close(a, c, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# fp16: within 2x PyTorch's own fp16 error (bf16 only on the GPU: the interpreter mis-computes it)
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("lens_q, lens_k", [pytest.param([1, 32, 33, 17], None, id="edges"),
                                            pytest.param([1, 5, 17], [9, 40, 33], id="q-shorter-than-k")])
def test_varlen_fp16(lens_q, lens_k, device):
    lens_k = lens_k or lens_q
    q, k, v, do = _varlen_inputs(lens_q, lens_k, 2, 32, torch.float16, device, seed=8)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    ours = _grads(lambda q, k, v: flash_attention_varlen(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k)),
                  (q, k, v), do)
    assert ours[0].dtype == torch.float16
    same_dtype = _varlen_reference(q, k, v, do, cu_q, cu_k, True, None, dtype=torch.float16)
    exact = _varlen_reference(q, k, v, do, cu_q, cu_k, True, None)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), ours, same_dtype, exact):
        assert_close_to_ref(a, b, c, name=name)


def test_tma_failure_falls_back_to_pointer_loads(device):
    """Where TMA fails in a process, the varlen and document kernels run on pointer loads (same results)."""
    lens = [1, 33, 17]
    q, k, v, do = _varlen_inputs(lens, lens, 2, 32, torch.float16, device, seed=20)
    cu = _cu(lens, device)
    with isolated_features(), override_target(fail_features=("tma",)):
        with pytest.warns(RuntimeWarning, match="TMA descriptors"):
            ours = _grads(lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, 33, 33), (q, k, v), do)
        assert "forced to fail" in feature_failed("tma")
    assert feature_failed("tma") is None
    same_dtype = _varlen_reference(q, k, v, do, cu, cu, True, None, dtype=torch.float16)
    exact = _varlen_reference(q, k, v, do, cu, cu, True, None)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), ours, same_dtype, exact):
        assert_close_to_ref(a, b, c, name=name)


def test_varlen_autocast_fp16(device):
    """fp32 inputs under autocast: fp16 out, fp32 grads, within 2x the reference's error under the same autocast."""
    lens = [3, 33, 10]
    q, k, v, do = _varlen_inputs(lens, lens, 2, 16, torch.float32, device, seed=9)
    cu = _cu(lens, device)

    def under_autocast(fn):
        def run(q, k, v):
            with torch.autocast(device_type=q.device.type, dtype=torch.float16):
                return fn(q, k, v)
        return _grads(run, (q, k, v), do)
    ours = under_autocast(lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, 33, 33))
    torch_fp16 = under_autocast(lambda q, k, v: ref.flash_attention_varlen(q.half(), k.half(), v.half(), cu, cu,
                                                                           33, 33, upcast=False))
    exact = _varlen_reference(q, k, v, do, cu, cu, True, None)
    assert ours[0].dtype == torch.float16 and all(g.dtype == torch.float32 for g in ours[1:])
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), ours, torch_fp16, exact):
        assert_close_to_ref(a, b, c, name=name)


# ------------------------------------------------------------------------------------------------
# Document masking through flash_attention_qkv
# ------------------------------------------------------------------------------------------------
def _starts(B, T, positions, device):
    starts = torch.zeros(B, T, dtype=torch.bool, device=device)
    for b, row in enumerate(positions):
        starts[b, row] = True
    return starts


def test_document_bounds(device):
    starts = _starts(2, 8, [[2, 4, 5], []], device)
    docs = document_bounds(starts)
    assert docs.dtype == torch.int32 and docs.shape == (2, 2, 8)
    assert docs[0].tolist() == [[0, 0, 2, 2, 4, 5, 5, 5], [2, 2, 4, 4, 5, 8, 8, 8]]
    assert docs[1].tolist() == [[0] * 8, [8] * 8]


DOCUMENT_CASES = [  # (B, T, document starts per row)
    pytest.param(2, 70, [[3, 16, 17, 32, 33, 48, 69], []], id="edges-length-1-and-single"),
    pytest.param(1, 40, [list(range(40))], id="one-token-each"),
    pytest.param(3, 33, [[1], [32], [10, 11, 12]], id="T33"),
]


def _qkv_reference(qkv, H, causal, docs, dy, dtype=torch.float64):
    return _grads(lambda x: ref.flash_attention_qkv(x, H, causal, documents=docs, upcast=False),
                  (qkv.to(dtype),), dy.to(dtype))


@pytest.mark.parametrize("causal", CAUSAL)
@pytest.mark.parametrize("B, T, positions", DOCUMENT_CASES)
def test_documents_fp32(B, T, positions, causal, device):
    H, D = 2, 16
    gen = torch.Generator().manual_seed(T)
    qkv = torch.randn(B, T, 3 * H * D, generator=gen).to(device)
    dy = torch.randn(B, T, H * D, generator=gen).to(device)
    docs = document_bounds(_starts(B, T, positions, device))
    got = _grads(lambda x: flash_attention_qkv(x, H, causal, documents=docs), (qkv,), dy)
    expected = _qkv_reference(qkv, H, causal, docs, dy)
    assert_close(got[0], expected[0], **FP32_TOL, name="y")
    assert_close(got[1], expected[1], **FP32_TOL, name="dqkv")

    y, lse = flash_attention_qkv_documents_fwd(qkv, docs, H, causal, None)
    assert_close(y, expected[0], **FP32_TOL, name="launcher y")
    assert lse.shape == (H, B * T) and torch.isfinite(lse).all()
    dqkv = flash_attention_qkv_documents_bwd(dy, qkv, docs, y, lse, H, causal, None)
    assert_close(dqkv, expected[1], **FP32_TOL, name="launcher dqkv")


def test_documents_fp16(device):
    B, T, H, D = 2, 50, 2, 32
    gen = torch.Generator().manual_seed(11)
    qkv = torch.randn(B, T, 3 * H * D, generator=gen).half().to(device)
    dy = torch.randn(B, T, H * D, generator=gen).half().to(device)
    docs = document_bounds(_starts(B, T, [[5, 32, 33], [17]], device))
    ours = _grads(lambda x: flash_attention_qkv(x, H, documents=docs), (qkv,), dy)
    same_dtype = _qkv_reference(qkv, H, True, docs, dy, dtype=torch.float16)
    exact = _qkv_reference(qkv, H, True, docs, dy)
    for name, a, b, c in zip(("y", "dqkv"), ours, same_dtype, exact):
        assert_close_to_ref(a, b, c, name=name)


def test_one_document_per_row_equals_plain_attention(device):
    """Without document starts, the masked kernels compute what flash_attention_qkv computes."""
    B, T, H, D = 2, 37, 2, 16
    qkv = torch.randn(B, T, 3 * H * D, generator=torch.Generator().manual_seed(12)).to(device)
    docs = document_bounds(torch.zeros(B, T, dtype=torch.bool, device=device))
    assert_close(flash_attention_qkv(qkv, H, documents=docs), flash_attention_qkv(qkv, H), **FP32_TOL)


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------
def _good(total_q=6, total_k=6):
    q = torch.randn(total_q, 2, 16)
    k, v = torch.randn(total_k, 2, 16), torch.randn(total_k, 2, 16)
    return q, k, v


def _i32(*values):
    return torch.tensor(values, dtype=torch.int32)


BAD_VARLEN = [  # (make -> (args, kwargs), exception, words)
    pytest.param(lambda: ((*_good(), _i32(0, 6).long(), _i32(0, 6), 6, 6), {}), TypeError, "int32", id="int64"),
    pytest.param(lambda: ((*_good(), _i32(1, 6), _i32(0, 6), 6, 6), {}), ValueError, "start at 0", id="start"),
    pytest.param(lambda: ((*_good(), _i32(0, 4, 2, 6), _i32(0, 2, 4, 6), 6, 6), {}), ValueError,
                 "non-decreasing", id="decreasing"),
    pytest.param(lambda: ((*_good(), _i32(0, 5), _i32(0, 6), 6, 6), {}), ValueError, "end at total_q",
                 id="last-entry"),
    pytest.param(lambda: ((*_good(), _i32(0, 3, 6), _i32(0, 6), 6, 6), {}), ValueError, r"shape \(3,\)",
                 id="counts-disagree"),
    pytest.param(lambda: ((*_good(), _i32(0, 2, 6), _i32(0, 2, 6), 3, 6), {}), ValueError, "max_seqlen_q",
                 id="max-seqlen-small"),
    pytest.param(lambda: ((*_good(), _i32(0, 6), _i32(0, 6), 6, 6), {"seqused_k": _i32(7)}), ValueError,
                 "seqused_k", id="seqused-too-long"),
    pytest.param(lambda: ((*_good(), _i32(0, 6), _i32(0, 6), 6.0, 6), {}), TypeError, "max_seqlen_q",
                 id="max-seqlen-float"),
    pytest.param(lambda: ((*_good(), [0, 6], _i32(0, 6), 6, 6), {}), TypeError, "cu_seqlens_q", id="list"),
    pytest.param(lambda: ((torch.randn(6, 2, 48), torch.randn(6, 2, 48), torch.randn(6, 2, 48), _i32(0, 6),
                           _i32(0, 6), 6, 6), {}), ValueError, "head dim", id="D48"),
    pytest.param(lambda: ((torch.randn(6, 2, 16), torch.randn(6, 3, 16), torch.randn(6, 3, 16), _i32(0, 6),
                           _i32(0, 6), 6, 6), {}), ValueError, "share H and D", id="heads-differ"),
    pytest.param(lambda: ((torch.randn(1, 6, 2, 16), *_good()[1:], _i32(0, 6), _i32(0, 6), 6, 6), {}),
                 ValueError, "3-D", id="4-D"),
    pytest.param(lambda: ((*_good(), _i32(0, 6), _i32(0, 6), 6, 6), {"causal": 1}), TypeError, "causal",
                 id="causal-int"),
]


@pytest.mark.parametrize("make, exc, words", BAD_VARLEN)
def test_bad_varlen_input_raises(make, exc, words):
    args, kwargs = make()
    with pytest.raises(exc, match=words) as info:
        flash_attention_varlen(*args, **kwargs)
    assert str(info.value).startswith("flash_attention_varlen:")


def test_bad_seqlens_on_a_gpu_are_one_device_assert():
    """Where checks run on the device (a GPU), bad cu_seqlens values raise through one asynchronous
    device-side assert (its message lists every rule) instead of a host sync; on CPU tensors torch's
    assert raises at once."""
    q, k, v = _good()
    with override_target(interpreter=True, device_type="cuda"), \
            pytest.raises(RuntimeError, match="bad cu_seqlens: cu_seqlens_q must start at 0; .*non-decreasing"):
        flash_attention_varlen(q, k, v, _i32(0, 4, 2, 6), _i32(0, 2, 4, 6), 6, 6)


def test_bad_documents_raise():
    qkv = torch.randn(2, 8, 96)
    docs = document_bounds(torch.zeros(2, 8, dtype=torch.bool))
    for bad, words in ((docs.long(), "int32"), (docs[:1], r"\(2, 2, 8\)"), ([[0]], "torch.Tensor")):
        with pytest.raises((TypeError, ValueError), match=words) as info:
            flash_attention_qkv(qkv, 2, documents=bad)
        assert str(info.value).startswith("flash_attention_qkv:")


# ------------------------------------------------------------------------------------------------
# Custom ops and torch.compile
# ------------------------------------------------------------------------------------------------
def test_opcheck(device):
    lens_q, lens_k = [3, 17], [9, 17]
    q, k, v, do = _varlen_inputs(lens_q, lens_k, 2, 16, torch.float32, device, seed=13)
    cu_q, cu_k = _cu(lens_q, device), _cu(lens_k, device)
    args = (cu_q, cu_k, 17, 17, True, 0.3, None)
    torch.library.opcheck(flash_attention_varlen_fwd, (q, k, v, *args))
    o, lse = flash_attention_varlen_fwd(q, k, v, *args)
    torch.library.opcheck(flash_attention_varlen_bwd, (do, q, k, v, o, lse, *args))

    qkv = torch.randn(2, 20, 96, generator=torch.Generator().manual_seed(14)).to(device)
    docs = document_bounds(_starts(2, 20, [[4], [17]], device))
    torch.library.opcheck(flash_attention_qkv_documents_fwd, (qkv, docs, 2, True, 0.3))
    y, lse = flash_attention_qkv_documents_fwd(qkv, docs, 2, True, 0.3)
    torch.library.opcheck(flash_attention_qkv_documents_bwd, (torch.randn_like(y), qkv, docs, y, lse, 2, True, 0.3))


def test_compile_fullgraph_matches_eager(device):
    torch._dynamo.reset()
    B, T, H, D = 2, 37, 2, 16
    qkv = torch.randn(B, T, 3 * H * D, generator=torch.Generator().manual_seed(15)).to(device)
    dy = torch.randn(B, T, H * D, generator=torch.Generator().manual_seed(16)).to(device)
    ids = torch.zeros(B, T, dtype=torch.int64, device=device)
    ids[0, 9] = ids[1, 30] = 1

    def step(x, ids):  # documents derived on the device, inside the graph
        return flash_attention_qkv(x, H, documents=document_bounds(ids == 1))

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    eager = _grads(lambda x: step(x, ids), (qkv,), dy)
    comp = _grads(lambda x: compiled(x, ids), (qkv,), dy)
    for a, b in zip(comp, eager):
        assert_close(a, b, atol=0, rtol=0)


# ------------------------------------------------------------------------------------------------
# GPU: GPT-2 sizes, bf16
# ------------------------------------------------------------------------------------------------
def _pystdlib_like_lengths(total, gen):
    """Document lengths drawn until they fill `total` tokens (log-normal, median ~300 tokens)."""
    lens = []
    while sum(lens) < total:
        lens.append(max(1, int(torch.empty(1).log_normal_(5.7, 1.3, generator=gen))))
    lens[-1] -= sum(lens) - total
    return lens


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_varlen_gpt2_size_gpu(dtype, device):
    gen = torch.Generator().manual_seed(17)
    lens = _pystdlib_like_lengths(16 * 1024, gen)
    q, k, v, do = _varlen_inputs(lens, lens, 12, 64, dtype, device, seed=18)
    cu = _cu(lens, device)
    ours = _grads(lambda q, k, v: flash_attention_varlen(q, k, v, cu, cu, max(lens), max(lens)), (q, k, v), do)
    same_dtype = _varlen_reference(q, k, v, do, cu, cu, True, None, dtype=dtype)
    exact = _varlen_reference(q, k, v, do, cu, cu, True, None, dtype=torch.float32)
    for name, a, b, c in zip(("o", "dq", "dk", "dv"), ours, same_dtype, exact):
        assert_close_to_ref(a, b, c, name=name)


@pytest.mark.gpu
def test_documents_gpt2_size_gpu_bf16(device):
    B, T, H, D = 4, 1024, 12, 64
    gen = torch.Generator().manual_seed(19)
    qkv = torch.randn(B, T, 3 * H * D, generator=gen).to(device, torch.bfloat16)
    dy = torch.randn(B, T, H * D, generator=gen).to(device, torch.bfloat16)
    starts = torch.rand(B, T, generator=gen) < 1 / 300
    docs = document_bounds(starts.to(device))
    ours = _grads(lambda x: flash_attention_qkv(x, H, documents=docs), (qkv,), dy)
    same_dtype = _qkv_reference(qkv, H, True, docs, dy, dtype=torch.bfloat16)
    exact = _qkv_reference(qkv, H, True, docs, dy, dtype=torch.float32)
    for name, a, b, c in zip(("y", "dqkv"), ours, same_dtype, exact):
        assert_close_to_ref(a, b, c, name=name)
