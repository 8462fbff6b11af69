"""GPT(recompute="gelu" | "block"): the same loss and grads as recompute="none", fewer bytes kept for backward."""
import pytest
import torch

from gpt2_triton import GPT, GPTConfig
from tests.helpers import saved_bytes

CONFIG = GPTConfig.from_preset("tiny", vocab_size=97, block_size=32, n_embd=32, n_head=2, n_layer=2,
                               pad_vocab_to=64)
KERNELS = [pytest.param("torch", id="torch"), pytest.param("triton", id="triton")]


def loss_and_grads(kernels, recompute, idx, targets, doc_starts=None):
    torch.manual_seed(0)
    model = GPT(CONFIG, kernels=kernels, recompute=recompute)
    logits, loss = model(idx, targets, doc_starts=doc_starts)
    loss.backward()
    return logits, loss, {n: p.grad for n, p in model.named_parameters()}


def batch(T=19, documents=False):
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CONFIG.vocab_size, (2, T), generator=gen)
    targets = torch.randint(0, CONFIG.vocab_size, (2, T), generator=gen)
    targets[1, :5] = -100
    doc_starts = None
    if documents:
        doc_starts = torch.zeros((2, T), dtype=torch.bool)
        doc_starts[0, [0, 6, 7]] = doc_starts[1, [0, 11]] = True
    return idx, targets, doc_starts


@pytest.mark.parametrize("documents", [False, True], ids=["one-doc", "doc-mask"])
@pytest.mark.parametrize("recompute", ["gelu", "block"])
@pytest.mark.parametrize("kernels", KERNELS)
def test_same_loss_and_grads_bit_for_bit(kernels, recompute, documents):
    """What backward recomputes is the forward's own computation again: equal bits, not just close."""
    idx, targets, doc_starts = batch(documents=documents)
    want_logits, want_loss, want_grads = loss_and_grads(kernels, "none", idx, targets, doc_starts)
    logits, loss, grads = loss_and_grads(kernels, recompute, idx, targets, doc_starts)
    assert torch.equal(loss, want_loss)
    assert (logits is None) == (want_logits is None) and (logits is None or torch.equal(logits, want_logits))
    assert grads.keys() == want_grads.keys()
    for name, grad in grads.items():
        assert torch.equal(grad, want_grads[name]), name


def saved_activation_bytes(model, idx) -> int:
    """Bytes of the distinct storages autograd keeps from one forward of `model` on idx (targets = idx),
    parameters left out. The checkpoint of a Block keeps its inputs as saved tensors too, so they count."""
    return saved_bytes(model, idx, idx, leaves=list(model.parameters()))[1]


def per_layer_per_token(kernels, recompute, n_embd, T, B=2):
    """Saved bytes one more layer adds, per token: measured at n_layer 3 minus n_layer 2 (block mode's
    first Block has no pending MLP output to keep, so layer 2 onwards is the steady state)."""
    idx = torch.randint(0, 97, (B, T), generator=torch.Generator().manual_seed(0))
    sizes = []
    for n_layer in (2, 3):
        config = GPTConfig.from_preset("tiny", vocab_size=97, block_size=T, n_embd=n_embd, n_head=2,
                                       n_layer=n_layer, pad_vocab_to=64)
        torch.manual_seed(0)
        sizes.append(saved_activation_bytes(GPT(config, kernels=kernels, recompute=recompute), idx))
    extra = sizes[1] - sizes[0]
    assert extra % (B * T) == 0
    return extra // (B * T)


@pytest.mark.parametrize("kernels", KERNELS)
def test_saved_bytes_match_the_formula(kernels):
    """fp32, C = n_embd: gelu keeps 4C values fewer per token per layer (the c_fc output); block keeps 2C
    (the Block's inputs: the residual stream and the previous MLP's output not yet added)."""
    C, T, fp32 = 64, 32, 4
    none, gelu, block = (per_layer_per_token(kernels, mode, C, T) for mode in ("none", "gelu", "block"))
    assert none - gelu == 4 * C * fp32
    assert block == 2 * C * fp32
    assert none > block


@pytest.mark.parametrize("kernels", KERNELS)
def test_block_recompute_only_while_training_with_grad(kernels):
    """eval() runs the blocks plainly (the same tensors kept as without recompute), and so does generation
    (no grad, kv cache) in either mode."""
    torch.manual_seed(0)
    model = GPT(CONFIG, kernels=kernels, recompute="block")
    torch.manual_seed(0)
    plain = GPT(CONFIG, kernels=kernels)
    idx, _, _ = batch()
    assert saved_activation_bytes(model, idx) < saved_activation_bytes(plain, idx)
    model.eval()
    assert saved_activation_bytes(model, idx) == saved_activation_bytes(plain, idx)
    prompts = idx[:, :5]
    want = plain.generate(prompts, 3, temperature=0)
    assert torch.equal(model.generate(prompts, 3, temperature=0), want)
    model.train()
    assert torch.equal(model.generate(prompts, 3, temperature=0), want)


def test_bad_recompute_is_refused():
    with pytest.raises(ValueError, match=r"GPT: recompute must be one of \('none', 'gelu', 'block'\); got 'mlp'"):
        GPT(CONFIG, recompute="mlp")


@pytest.mark.parametrize("recompute", ["gelu", "block"])
@pytest.mark.parametrize("kernels", KERNELS)
def test_compiled_recompute_has_no_graph_breaks(kernels, recompute):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(CONFIG, kernels=kernels, recompute=recompute)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 16), generator=torch.Generator().manual_seed(2))
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    _, loss = torch.compile(model, backend="aot_eager", fullgraph=True)(idx, idx)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, eager_loss = model(idx, idx)
    eager_loss.backward()
    torch.testing.assert_close(loss, eager_loss, atol=1e-6, rtol=1e-6)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5, msg=name)
