"""A tiny GPT on Triton kernels gives the same loss and parameter grads as on the torch ops."""
import pytest
import torch
from helpers import assert_close

from gpt2_triton import GPT, GPTConfig

CONFIG = GPTConfig.from_preset("tiny", vocab_size=97, block_size=32, n_embd=32, n_head=2, n_layer=2,
                               pad_vocab_to=64)


def loss_and_grads(kernels, idx, targets, doc_starts=None):
    torch.manual_seed(0)
    model = GPT(CONFIG, kernels=kernels)
    logits, loss = model(idx, targets, doc_starts=doc_starts)
    loss.backward()
    return logits, loss, {n: p.grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("kernels", [
    pytest.param({"layer_norm": "triton", "cross_entropy": "triton"}, id="layer_norm+cross_entropy"),
    pytest.param({"attention": "triton"}, id="attention"),
    pytest.param({"gelu_mlp": "triton"}, id="gelu_mlp"),
    pytest.param("triton", id="all"),
])
def test_same_loss_and_grads_as_torch(kernels):
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 19), generator=gen)
    targets = torch.randint(0, CONFIG.vocab_size, (2, 19), generator=gen)
    targets[1, :5] = -100
    ref_logits, ref_loss, ref_grads = loss_and_grads("torch", idx, targets)
    logits, loss, grads = loss_and_grads(kernels, idx, targets)
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, name="loss")
    if logits is None:  # fused lm_head + cross-entropy never builds the logits
        assert GPT(CONFIG, kernels=kernels).ops.fused_lm_head_loss
    else:
        assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4, name="logits")
    assert ref_grads.keys() == grads.keys()
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], atol=2e-5, rtol=1e-4, name=f"grad {name}")
    assert grads["transformer.wte.weight"][CONFIG.vocab_size:].abs().sum() == 0  # padded rows untouched


def test_document_mask_same_loss_and_grads_as_torch():
    """doc_starts: our document-masked kernel and the torch set's dense-mask SDPA agree; both differ from
    attending across documents."""
    gen = torch.Generator().manual_seed(2)
    idx = torch.randint(1, CONFIG.vocab_size, (2, 19), generator=gen)
    idx[0, [4, 5, 17]] = idx[1, 16] = 0
    starts = idx == 0
    _, ref_loss, ref_grads = loss_and_grads("torch", idx, idx, starts)
    _, loss, grads = loss_and_grads({"attention": "triton"}, idx, idx, starts)
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, name="loss")
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], atol=2e-5, rtol=1e-4, name=f"grad {name}")
    assert abs(loss.item() - loss_and_grads("torch", idx, idx)[1].item()) > 1e-4


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "recompute"])
def test_generate_prompts_with_triton_kernels(use_cache):
    """Prefill and decode steps run flash_attention_varlen: prompts of different lengths (one past
    block_size 32) give the greedy tokens of the torch kernels, and each prompt's tokens alone."""
    torch.manual_seed(0)
    model = GPT(CONFIG, kernels="triton").eval()
    torch_model = GPT(CONFIG, kernels="torch").eval()
    torch_model.load_state_dict(model.state_dict())
    gen = torch.Generator().manual_seed(5)
    prompts = [torch.randint(0, CONFIG.vocab_size, (n,), generator=gen) for n in (3, 30, 1)]
    out = model.generate(prompts, 4, temperature=0, use_cache=use_cache)
    assert all(torch.equal(a, b) for a, b in zip(out, torch_model.generate(prompts, 4, temperature=0)))
    assert torch.equal(out[1], model.generate(prompts[1][None], 4, temperature=0, use_cache=use_cache)[0])


def test_compiled_model_with_triton_kernels_has_no_graph_breaks():
    """The kernels are registered custom ops: dynamo traces the whole model in one graph."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = GPT(CONFIG, kernels="triton")
    idx = torch.randint(0, CONFIG.vocab_size, (2, 16))
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    _, loss = compiled(idx, idx)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    _, eager_loss = model(idx, idx)
    eager_loss.backward()
    assert_close(loss, eager_loss, atol=1e-6, rtol=1e-6, name="compiled loss")
    for name, p in model.named_parameters():
        assert_close(grads[name], p.grad, atol=1e-6, rtol=1e-5, name=f"compiled grad {name}")


@pytest.mark.gpu
def test_compiled_model_on_gpu_equals_eager():
    torch._dynamo.reset()
    torch.manual_seed(0)
    config = GPTConfig.from_preset("gpt2", n_layer=2, pad_vocab_to=128)
    model = GPT(config, kernels="triton").cuda()
    idx = torch.randint(0, config.vocab_size, (4, 256), device="cuda")
    explanation = torch._dynamo.explain(model)(idx, idx)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    with torch.autocast("cuda", dtype=torch.bfloat16):
        _, eager_loss = model(idx, idx)
        _, compiled_loss = torch.compile(model)(idx, idx)
    assert_close(compiled_loss, eager_loss, atol=1e-3, rtol=1e-3, name="compiled loss")


@pytest.mark.slow
def test_kv_cache_generate_with_triton_kernels_equals_recompute():
    """Prefill and decode steps run our varlen attention on the cache; greedy output equals recomputing
    the whole window each step, past block_size (16) too."""
    torch.manual_seed(0)
    config = GPTConfig.from_preset("tiny", vocab_size=97, block_size=16, n_embd=32, n_head=2, n_layer=2)
    model = GPT(config, kernels="triton").eval()
    idx = torch.randint(0, config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(3))
    cached = model.generate(idx, 9, temperature=0, use_cache=True)  # 6 cached steps, then 2 past the window
    assert torch.equal(cached, model.generate(idx, 9, temperature=0, use_cache=False))
    torch_model = GPT(config, kernels="torch").eval()
    torch_model.load_state_dict(model.state_dict())
    assert torch.equal(cached, torch_model.generate(idx, 9, temperature=0, use_cache=True))


@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_int32_ids_and_targets(kernels):
    """int32 ids/targets are accepted and give the int64 loss and grads with either kernel set."""
    gen = torch.Generator().manual_seed(1)
    idx = torch.randint(0, CONFIG.vocab_size, (2, 11), generator=gen)
    targets = torch.randint(0, CONFIG.vocab_size, (2, 11), generator=gen)
    targets[0, :4] = -100
    _, ref_loss, ref_grads = loss_and_grads(kernels, idx, targets)
    _, loss, grads = loss_and_grads(kernels, idx.int(), targets.int())
    assert_close(loss, ref_loss, atol=0, rtol=0, name="int32 loss")
    for name, grad in grads.items():
        assert_close(grad, ref_grads[name], atol=0, rtol=0, name=f"int32 grad {name}")
    with pytest.raises(ValueError, match="targets has ids outside"):
        GPT(CONFIG, kernels=kernels)(idx.int(), torch.full((2, 11), CONFIG.vocab_size, dtype=torch.int32))


@pytest.mark.gpu
def test_id_checks_do_not_sync_on_gpu():
    """On CUDA the id-range checks are device-side asserts: a forward with targets never syncs."""
    torch.manual_seed(0)
    model = GPT(CONFIG, kernels="triton").cuda()
    idx = torch.randint(0, CONFIG.vocab_size, (2, 16), device="cuda")
    model(idx, idx)  # warm-up: autotuning may sync
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        _, loss = model(idx, idx)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.isfinite(loss)


@pytest.mark.gpu
def test_document_mask_flex_attention_on_gpu():
    """On CUDA the torch kernels mask documents with FlexAttention's block mask: same loss and grads as our
    document-masked kernel."""
    gen = torch.Generator().manual_seed(6)
    idx = torch.randint(1, CONFIG.vocab_size, (4, 32), generator=gen)
    idx[:, [3, 17, 18]] = 0
    idx, starts = idx.cuda(), (idx == 0).cuda()
    results = []
    for kernels in ("torch", {"attention": "triton"}):
        torch.manual_seed(0)
        model = GPT(CONFIG, kernels=kernels).cuda()
        _, loss = model(idx, idx, doc_starts=starts)
        loss.backward()
        results.append((loss, {n: p.grad for n, p in model.named_parameters()}))
    assert_close(results[1][0], results[0][0], atol=1e-4, rtol=1e-4, name="loss")
    for name, grad in results[1][1].items():
        assert_close(grad, results[0][1][name], atol=1e-4, rtol=1e-3, name=f"grad {name}")
