"""The model: parameter count, op switch, padded vocab, generation, bad input."""
import pytest
import torch

from gpt2_triton import GPT, GPTConfig
from gpt2_triton.model.ops import build_ops, resolve_kernels


def tiny(**overrides):
    return GPTConfig.from_preset("tiny", **overrides)


def test_gpt2_124m_parameter_count():
    model = GPT(GPTConfig.from_preset("gpt2"))
    assert model.num_params() == 124_439_808
    assert model.lm_head.weight is model.transformer.wte.weight


def test_padded_vocab_keeps_count_and_hides_padded_logits():
    model = GPT(GPTConfig.from_preset("gpt2", pad_vocab_to=128))
    assert model.config.padded_vocab_size == 50304
    assert model.transformer.wte.weight.shape == (50304, 768)
    assert model.num_params() == 124_439_808


@pytest.mark.parametrize("name,layers,heads,embd", [
    ("gpt2", 12, 12, 768), ("gpt2-medium", 24, 16, 1024), ("gpt2-large", 36, 20, 1280),
    ("gpt2-xl", 48, 25, 1600)])
def test_presets(name, layers, heads, embd):
    c = GPTConfig.from_preset(name)
    assert (c.n_layer, c.n_head, c.n_embd, c.block_size, c.vocab_size) == (layers, heads, embd, 1024, 50257)
    assert c.layer_norm_eps == 1e-5


def test_forward_shapes_and_loss():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=100, pad_vocab_to=64))
    idx = torch.randint(0, 100, (2, 9))
    logits = model(idx)
    assert logits.shape == (2, 9, 100)  # padded ids never reach the logits
    targets = torch.randint(0, 100, (2, 9))
    targets[0, :4] = -100
    out_logits, loss = model(idx, targets)
    expected = torch.nn.functional.cross_entropy(logits.view(-1, 100), targets.view(-1), ignore_index=-100)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(out_logits, logits)


def test_init_matches_gpt2_recipe():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", n_layer=8, n_embd=256, n_head=4))
    std = model.transformer.h[0].attn.c_attn.weight.std().item()
    proj_std = model.transformer.h[0].mlp.c_proj.weight.std().item()
    assert abs(std - 0.02) < 0.002
    assert abs(proj_std - 0.02 / 4) < 0.0005  # (2 * 8) ** -0.5 = 1/4
    assert model.transformer.h[0].attn.c_attn.bias.abs().sum() == 0


def test_state_dict_same_whichever_kernels():
    torch_model = GPT(tiny(), kernels="torch")
    mixed = GPT(tiny(), kernels={"attention": "torch", "layer_norm": "torch"})
    assert list(torch_model.state_dict()) == list(mixed.state_dict())
    assert [v.shape for v in torch_model.state_dict().values()] == [v.shape for v in mixed.state_dict().values()]


def test_resolve_kernels():
    assert resolve_kernels("torch") == {op: "torch" for op in ("layer_norm", "attention", "gelu_mlp", "cross_entropy",
                                                               "linear", "embedding")}
    mixed = resolve_kernels({"attention": "triton"})
    assert mixed["attention"] == "triton" and mixed["layer_norm"] == "torch"
    assert resolve_kernels({"linear_cross_entropy": "triton"})["cross_entropy"] == "triton"
    assert resolve_kernels("attention=triton,layer_norm=torch") == {**resolve_kernels("torch"), "attention": "triton"}
    with pytest.raises(ValueError, match="unknown op"):
        resolve_kernels({"softmax": "triton"})
    with pytest.raises(ValueError, match="must be one of"):
        resolve_kernels("cuda")
    with pytest.raises(ValueError, match="'torch' or 'triton'"):
        resolve_kernels({"attention": "cudnn"})


def test_build_ops_picks_triton_functions():
    ops = build_ops("triton")
    assert all(impl == "triton" for impl in ops.choice.values())
    for fn in (ops.layer_norm, ops.attention, ops.gelu_mlp, ops.cross_entropy, ops.linear_cross_entropy):
        fn = getattr(fn, "__wrapped__", fn)
        module = getattr(fn, "func", fn).__module__  # partials keep the kernel in .func
        assert module.startswith("gpt2_triton.kernels."), module
    assert ops.fused_lm_head_loss


def test_bad_inputs_raise_clear_errors():
    model = GPT(tiny(vocab_size=100))
    with pytest.raises(ValueError, match="exceeds block_size"):
        model(torch.zeros(1, 65, dtype=torch.long))
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        model(torch.full((1, 4), 100))
    with pytest.raises(ValueError, match=r"outside \[0, 100\)"):
        model(torch.full((1, 4), -1))
    with pytest.raises(ValueError, match="int64"):
        model(torch.zeros(1, 4))
    with pytest.raises(ValueError, match=r"shape \(B, T\)"):
        model(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="targets shape"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.zeros(1, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="targets has ids outside"):
        model(torch.zeros(1, 4, dtype=torch.long), torch.full((1, 4), 100))
    with pytest.raises(ValueError, match="divisible"):
        GPTConfig(n_embd=10, n_head=3)
    with pytest.raises(ValueError, match="unknown preset"):
        GPTConfig.from_preset("gpt5")


def test_generate_deterministic_and_never_padded_ids():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=50, pad_vocab_to=64)).eval()
    with torch.no_grad():  # make the padded rows win if they ever reached sampling
        model.transformer.wte.weight[50:] = 10.0
    idx = torch.randint(0, 50, (3, 5))
    outs = [model.generate(idx, 80, temperature=1.0, top_k=None, generator=torch.Generator().manual_seed(7))
            for _ in range(2)]
    assert outs[0].shape == (3, 85)  # runs past block_size (64) by cropping the context
    assert torch.equal(outs[0], outs[1])
    assert torch.equal(outs[0][:, :5], idx)
    assert outs[0].max() < 50 and outs[0].min() >= 0
    other = model.generate(idx, 80, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other, outs[0])
    greedy = model.generate(idx, 3, temperature=0)
    with torch.no_grad():
        first = model(idx)[:, -1].argmax(-1)
    assert torch.equal(greedy[:, 5], first)
    top1 = model.generate(idx, 3, top_k=1, generator=torch.Generator().manual_seed(1))
    assert torch.equal(top1, greedy)


def test_generate_bad_args():
    model = GPT(tiny(vocab_size=50)).eval()
    idx = torch.zeros(1, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="temperature"):
        model.generate(idx, 1, temperature=-1)
    with pytest.raises(ValueError, match="top_k"):
        model.generate(idx, 1, top_k=0)


@pytest.mark.parametrize("prompt_len", [pytest.param(5, id="short-prompt"), pytest.param(20, id="prompt-past-block")])
def test_kv_cache_generate_equals_recompute(prompt_len):
    """Greedy and sampled output identical with and without the cache, running well past block_size (16)."""
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=50, block_size=16)).eval()
    idx = torch.randint(0, 50, (3, prompt_len), generator=torch.Generator().manual_seed(2))
    greedy = model.generate(idx, 30, temperature=0, use_cache=True)
    assert torch.equal(greedy, model.generate(idx, 30, temperature=0, use_cache=False))
    sampled = [model.generate(idx, 30, top_k=10, generator=torch.Generator().manual_seed(5), use_cache=cache)
               for cache in (True, False)]
    assert torch.equal(sampled[0], sampled[1])
    assert not torch.equal(sampled[0], greedy)  # the sampling path really ran


def test_kv_cache_steps_give_full_forward_logits():
    """Prefill then one-token steps give the logits of a full causal forward at every position."""
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=50, block_size=16)).eval()
    idx = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        full = model(idx)  # (B, T, V)
        cache = model.new_kv_cache(2)

        def step(chunk):  # (B, t) new tokens of both sequences -> (B, t, V)
            B, t = chunk.shape
            return model.logits(model.extend(chunk.flatten(), [t] * B, cache)).view(B, t, -1)
        steps = [step(idx[:, :6])]  # prefill 6
        steps.append(step(idx[:, 6:9]))  # a 3-token chunk
        steps += [step(idx[:, t:t + 1]) for t in range(9, 16)]
    assert cache.lengths == [16, 16]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match=r"16 cached \+ 1 new positions exceed block_size 16"):
        model.extend(idx[0, :1], [1, 0], cache)


def test_torch_kv_cache_builds_one_varlen_plan_per_step(monkeypatch):
    """The torch kernels' varlen attention takes its gather plan from the KV cache: built once per step for
    every layer, held by that cache (no process-wide state), and refused for other sizes."""
    from gpt2_triton.model import torch_ops
    built = []

    class CountedPlan(torch_ops.VarlenPlan):
        def __init__(self, *args):
            built.append(args)
            super().__init__(*args)
    monkeypatch.setattr(torch_ops, "VarlenPlan", CountedPlan)
    model = GPT(tiny(vocab_size=50, block_size=16, n_layer=3)).eval()
    assert model.ops.varlen_plan is CountedPlan
    cache = model.new_kv_cache(2)
    with torch.no_grad():
        model.extend(torch.arange(7), [4, 3], cache)
        model.extend(torch.arange(2), [1, 1], cache)
    assert len(built) == 2  # 2 steps x 3 layers, one plan per step
    q = torch.zeros(5, 2, 8)
    message = r"the plan is for \(total_q, total_k, causal\) \(2, 32, True\); got \(5, 32, True\)"
    with pytest.raises(ValueError, match=message):
        torch_ops.flash_attention_varlen(q, torch.zeros(32, 2, 8), torch.zeros(32, 2, 8), None, None, 1, 1,
                                         plan=cache.step["plan"])
    assert GPT(tiny(), kernels="triton").ops.varlen_plan is None


@pytest.mark.parametrize("use_cache", [True, False], ids=["kv-cache", "recompute"])
def test_generate_prompts_of_different_lengths_equal_each_alone(use_cache):
    """A list of prompts of lengths 1 .. 20 (some past block_size 16) gives each prompt the greedy tokens
    it gets alone; sampling draws one token per prompt per step."""
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=50, block_size=16)).eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 50, (n,), generator=gen) for n in (5, 1, 20, 11)]
    batch = model.generate(prompts, 12, temperature=0, use_cache=use_cache)
    assert [len(t) for t in batch] == [17, 13, 32, 23]
    for prompt, out in zip(prompts, batch):
        alone = model.generate(prompt[None], 12, temperature=0, use_cache=use_cache)[0]
        assert torch.equal(out, alone)
        assert torch.equal(out[:len(prompt)], prompt)
    as_lists = model.generate([p.tolist() for p in prompts], 12, temperature=0, use_cache=use_cache)
    assert all(torch.equal(a, b) for a, b in zip(as_lists, batch))
    sampled = model.generate(prompts, 5, generator=torch.Generator().manual_seed(1))
    assert [len(t) for t in sampled] == [10, 6, 25, 16]
    with pytest.raises(ValueError, match="prompt 1"):
        model.generate([[1, 2], []], 1)
    with pytest.raises(ValueError, match="prompt 0"):
        model.generate([[1, 50]], 1)


def test_document_mask_equals_separate_documents():
    """With doc_starts, each document of a packed row gets the logits it gets as a row of its own. Position
    embeddings stay those of the row, so they are zeroed here to make a later document comparable."""
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=50, block_size=16))
    with torch.no_grad():
        model.transformer.wpe.weight.zero_()
    gen = torch.Generator().manual_seed(4)
    idx = torch.randint(1, 50, (2, 12), generator=gen)
    idx[0, 5] = idx[1, 0] = idx[1, 9] = idx[1, 10] = 0  # documents begin at the 0s (and at position 0)
    logits = model(idx, doc_starts=idx == 0)
    for b, bounds in ((0, [(0, 5), (5, 12)]), (1, [(0, 9), (9, 10), (10, 12)])):
        for lo, hi in bounds:
            torch.testing.assert_close(logits[b, lo:hi], model(idx[b:b + 1, lo:hi])[0], atol=1e-5, rtol=1e-5)
    plain = model(idx)
    assert torch.allclose(logits[0, :5], plain[0, :5], atol=1e-5) and not torch.allclose(logits[0, 5:], plain[0, 5:])
    with pytest.raises(ValueError, match="doc_starts"):
        model(idx, doc_starts=(idx == 0).long())


def test_int32_ids_and_targets_same_loss():
    torch.manual_seed(0)
    model = GPT(tiny(vocab_size=100))
    idx = torch.randint(0, 100, (2, 9))
    targets = torch.randint(0, 100, (2, 9))
    targets[0, :3] = -100
    _, ref = model(idx, targets)
    _, loss = model(idx.int(), targets.int())
    torch.testing.assert_close(loss, ref, atol=0, rtol=0)
    with pytest.raises(ValueError, match=r"targets has ids outside \[0, 100\)"):
        model(idx.int(), torch.full((2, 9), 100, dtype=torch.int32))
    with pytest.raises(ValueError, match="int64"):
        model(idx.short())
