"""gpt2_triton.kernels.embeddings: wte[idx] + wpe[pos] forward, grads added into the tables' .grad."""
import pytest
import torch
from helpers import assert_close

from gpt2_triton.kernels.embeddings import embedding, embedding_bwd, embedding_fwd


def _tables(V, P, N, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(V, N, generator=gen).to(device), torch.randn(P, N, generator=gen).to(device)


@pytest.mark.parametrize("B, T, P, N, id_dtype", [(1, 1, 1, 1, torch.int64), (3, 7, 9, 33, torch.int32),
                                                  (2, 16, 16, 768, torch.int64)],
                         ids=["B1-T1-N1", "B3-T7-P9-N33-int32", "B2-T16-N768"])
def test_forward_and_grads(B, T, P, N, id_dtype, device):
    wte, wpe = _tables(50, P, N, device)
    idx = torch.randint(0, 50, (B, T), generator=torch.Generator().manual_seed(1)).to(device, id_dtype)
    idx[0, 0] = idx[-1, -1]  # a repeated token: its rows' grads add up
    dy = torch.randn(B, T, N, generator=torch.Generator().manual_seed(2)).to(device)
    leaves = [t.clone().requires_grad_() for t in (wte, wpe)]
    out = embedding(idx, *leaves)
    grads = torch.autograd.grad(out, leaves, dy)
    ref = [t.double().requires_grad_() for t in (wte, wpe)]
    want = ref[0][idx.long()] + ref[1][:T]
    want_grads = torch.autograd.grad(want, ref, dy.double())
    assert_close(out, want, atol=1e-6, name="out")
    for name, g, w in zip(("dwte", "dwpe"), grads, want_grads):
        assert_close(g, w, atol=1e-5, name=name)


def test_positions_given_and_accumulation(device):
    """pos given (generation's packed tokens); two .backward() passes add into the same .grad tensors."""
    wte, wpe = (torch.nn.Parameter(t) for t in _tables(20, 8, 16, device, seed=3))
    idx = torch.tensor([3, 5, 3, 19], device=device)
    pos = torch.tensor([0, 1, 7, 0], device=device)
    dy = torch.randn(4, 16, generator=torch.Generator().manual_seed(4)).to(device)
    embedding(idx, wte, wpe, pos).backward(dy)
    grads = [wte.grad, wpe.grad]
    once = [g.clone() for g in grads]
    out = embedding(idx, wte, wpe, pos)
    out.backward(dy)
    assert_close(out, wte[idx] + wpe[pos], atol=1e-6, name="out")
    want_wte = torch.zeros(20, 16, device=device).index_add_(0, idx, dy)
    want_wpe = torch.zeros(8, 16, device=device).index_add_(0, pos, dy)
    for p, g, first, want in zip((wte, wpe), grads, once, (want_wte, want_wpe)):
        assert p.grad is g
        assert_close(first, want, atol=1e-6, name="one pass")
        assert_close(p.grad, 2 * want, atol=1e-6, name="two passes")


def test_errors(device):
    wte, wpe = _tables(10, 4, 8, device)
    idx = torch.zeros(2, 3, dtype=torch.long, device=device)
    with pytest.raises(TypeError, match=r"embedding: idx must be an int64 or int32 tensor; got torch.float32"):
        embedding(idx.float(), wte, wpe)
    with pytest.raises(ValueError, match=r"embedding: 5 positions exceed wpe's 4 rows"):
        embedding(torch.zeros(2, 5, dtype=torch.long, device=device), wte, wpe)
    with pytest.raises(ValueError, match=r"embedding: wte \(V, N\) and wpe \(P, N\) must share N"):
        embedding(idx, wte, wpe[:, :4])
    with pytest.raises(ValueError, match=r"embedding: pos must have idx's shape"):
        embedding(idx, wte, wpe, torch.zeros(3, dtype=torch.long, device=device))


def test_opcheck_and_compile(device):
    wte, wpe = _tables(10, 4, 8, device)
    idx = torch.randint(0, 10, (6,), generator=torch.Generator().manual_seed(5)).to(device)
    torch.library.opcheck(embedding_fwd, (idx, wte, wpe, 3))
    dout = torch.randn(6, 8, device=device)
    torch.library.opcheck(embedding_bwd, (dout, idx, 3, None, torch.zeros_like(wte), torch.zeros_like(wpe),
                                          (True, False)))
    compiled = torch.compile(embedding, backend="aot_eager", fullgraph=True)
    leaves = [t.clone().requires_grad_() for t in (wte, wpe)]
    out = compiled(idx.view(2, 3), *leaves)
    grads = torch.autograd.grad(out, leaves, dout.view(2, 3, 8))
    eager_leaves = [t.clone().requires_grad_() for t in (wte, wpe)]
    eager = embedding(idx.view(2, 3), *eager_leaves)
    for a, e in zip((out, *grads), (eager, *torch.autograd.grad(eager, eager_leaves, dout.view(2, 3, 8)))):
        assert torch.equal(a, e)
