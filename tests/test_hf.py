"""HF GPT-2: its weights loaded into our GPT, and a transformers GPT2LMHeadModel patched onto our kernels."""
import pytest
import torch
from helpers import assert_close, assert_close_to_ref

from gpt2_triton.hf import applied_kernels, apply_kernels, from_pretrained, kernels_applied, remove_kernels

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=48, vocab_size=300,
                                     bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    path = tmp_path_factory.mktemp("hf_gpt2")
    model.save_pretrained(path)
    return path, model


def test_logits_and_loss_match_hf(hf_dir):
    path, hf = hf_dir
    ours = from_pretrained(str(path)).eval()
    assert ours.config.n_layer == 2 and ours.config.vocab_size == 300 and ours.config.block_size == 48
    idx = torch.randint(0, 300, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_out = hf(idx, labels=idx)
        logits = ours(idx)
        _, loss = ours(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(logits, hf_out.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, hf_out.loss, atol=1e-6, rtol=1e-6)


def test_padded_vocab_load(hf_dir):
    path, hf = hf_dir
    ours = from_pretrained(str(path), pad_vocab_to=64).eval()
    assert ours.transformer.wte.weight.shape[0] == 320
    idx = torch.randint(0, 300, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(ours(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


# --- our kernels inside a transformers GPT2LMHeadModel -----------------------------------------------
OPS = ("layer_norm", "attention", "gelu_mlp", "cross_entropy")


def hf_pair(dropout=0.0, seed=0, **overrides):
    """A tiny random GPT2LMHeadModel and an identical copy to patch."""
    torch.manual_seed(seed)
    fields = dict(n_layer=2, n_head=2, n_embd=32, n_positions=32, vocab_size=97, bos_token_id=0, eos_token_id=0,
                  pad_token_id=0, attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout)
    config = transformers.GPT2Config(**{**fields, **overrides})
    ref = transformers.GPT2LMHeadModel(config)
    model = transformers.GPT2LMHeadModel(config)
    model.load_state_dict(ref.state_dict())
    return ref, model


def count_kernel_attention(model, varlen=None):
    """Wrap the flash attention each attention module calls; returns the list of query lengths (B, H, T, D).
    varlen: a list that gets the total query count of each varlen-kernel call (packed (total, H, D))."""
    calls = []
    for m in model.modules():
        if hasattr(m, "_gpt2_triton_attention"):
            inner = m._gpt2_triton_attention
            m._gpt2_triton_attention = (
                lambda q, k, v, inner=inner, **kw: calls.append(q.shape[2]) or inner(q, k, v, **kw))
            if varlen is not None:
                inner_varlen = m._gpt2_triton_attention_varlen
                m._gpt2_triton_attention_varlen = (
                    lambda q, *args, inner=inner_varlen, **kw: varlen.append(q.shape[0]) or inner(q, *args, **kw))
    return calls


def batch(B=2, T=19, seed=1):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, 97, (B, T), generator=gen)
    labels = idx.clone()
    labels[1, :5] = -100
    return idx, labels


@pytest.mark.slow
@pytest.mark.parametrize("kernels", [
    pytest.param("triton", id="all"),
    pytest.param({"attention": "triton"}, id="attention"),
    pytest.param({"layer_norm": "triton", "gelu_mlp": "triton"}, id="layer_norm+gelu_mlp"),
    pytest.param({"cross_entropy": "triton"}, id="cross_entropy"),
])
def test_patched_hf_same_loss_and_grads(kernels):
    from gpt2_triton.model.ops import resolve_kernels
    ref, model = hf_pair()
    apply_kernels(model, kernels)
    choice = resolve_kernels(kernels)
    assert applied_kernels(model) == {op: "triton" if choice[op] == "triton" else "hf" for op in OPS}
    calls = count_kernel_attention(model)
    idx, labels = batch()
    ref_out = ref.train()(idx, labels=labels)
    out = model.train()(idx, labels=labels)
    ref_out.loss.backward()
    out.loss.backward()
    assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=1e-5, name="loss")
    assert (out.logits is None) == (choice["cross_entropy"] == "triton")  # fused lm_head + CE in train mode
    assert len(calls) == (2 if choice["attention"] == "triton" else 0)  # one per layer
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, ref_params[name].grad, atol=2e-5, rtol=1e-4, name=f"grad {name}")
    with torch.no_grad():  # eval mode: logits are built, the loss is ours on them
        ref_eval, out_eval = ref.eval()(idx, labels=labels), model.eval()(idx, labels=labels)
    assert_close(out_eval.logits, ref_eval.logits, atol=1e-5, rtol=1e-5, name="eval logits")
    assert_close(out_eval.loss, ref_eval.loss, atol=1e-5, rtol=1e-5, name="eval loss")


@pytest.mark.slow
def test_patched_hf_generate_padding_and_loss_kwargs():
    ref, model = hf_pair()
    ref.eval(), apply_kernels(model.eval())
    varlen = []
    calls = count_kernel_attention(model, varlen)
    idx, labels = batch(T=6)
    greedy = dict(max_new_tokens=6, do_sample=False)
    out = model.generate(idx, attention_mask=torch.ones_like(idx), **greedy)
    assert torch.equal(out, ref.generate(idx, attention_mask=torch.ones_like(idx), **greedy))
    assert calls == [6, 6]  # the prefill ran the dense kernel, the 5 one-token decode steps the varlen one
    assert varlen == [2] * 10
    calls.clear(), varlen.clear()
    mask = torch.ones_like(idx)
    mask[0, :2] = 0  # left padding: unpadded, 4 + 6 real queries through the varlen kernel
    padded = model.generate(idx, attention_mask=mask, **greedy)
    assert torch.equal(padded, ref.generate(idx, attention_mask=mask, **greedy))
    assert calls == [] and varlen == [10, 10] + [2] * 10
    n = torch.tensor(40)  # Trainer's num_items_in_batch with gradient accumulation
    model.train(), ref.train()
    loss = model(idx, labels=labels, num_items_in_batch=n).loss
    assert_close(loss, ref(idx, labels=labels, num_items_in_batch=n).loss, atol=1e-6, rtol=1e-5, name="loss")
    as_tuple = model(idx, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and as_tuple[0].shape == ()
    with pytest.raises(ValueError, match=r"labels has ids outside \[0, 97\)"):
        model(idx, labels=torch.full_like(idx, 97))


def _real(x, keep):
    """The rows of x (B, T, ...) at real (non-padding) positions."""
    return x[keep.bool()]


@pytest.mark.slow
@pytest.mark.parametrize("side", ["left", "right"])
def test_patched_hf_padding_runs_varlen_kernel(side):
    """Padding zeros in attention_mask: unpad -> varlen kernel -> repad. Loss, every grad and the logits
    at real positions equal the unpatched model's (padding positions are never read by a real token)."""
    ref, model = hf_pair()
    apply_kernels(model)
    varlen = []
    calls = count_kernel_attention(model, varlen)
    idx, labels = batch(B=3, T=13)
    mask = torch.ones_like(idx)
    pads = {"left": (slice(0, 4), slice(0, 12)), "right": (slice(9, 13), slice(1, 13))}[side]
    mask[0, pads[0]] = 0
    mask[2, pads[1]] = 0  # a single real token
    labels = labels.masked_fill(mask == 0, -100)
    ref_out = ref.train()(idx, attention_mask=mask, labels=labels)
    out = model.train()(idx, attention_mask=mask, labels=labels)
    ref_out.loss.backward()
    out.loss.backward()
    assert calls == [] and varlen == [int(mask.sum())] * 2
    assert_close(out.loss, ref_out.loss, atol=1e-5, rtol=1e-5, name="loss")
    ref_params = dict(ref.named_parameters())
    for name, p in model.named_parameters():
        assert_close(p.grad, ref_params[name].grad, atol=2e-5, rtol=1e-4, name=f"grad {name}")
    with torch.no_grad():
        logits, ref_logits = model.eval()(idx, attention_mask=mask).logits, ref.eval()(idx, attention_mask=mask).logits
    assert_close(_real(logits, mask), _real(ref_logits, mask), atol=1e-5, rtol=1e-5, name="logits")


@pytest.mark.slow
def test_patched_hf_packed_sequences_run_varlen_kernel():
    """Sequences packed in one row, position_ids restarting at each: the varlen kernel, no attention across
    sequences; logits and grads equal the unpatched model's (which masks through SDPA). HF detects packing
    only without a cache (use_cache=False); with one, both models attend across the sequences."""
    ref, model = hf_pair()
    apply_kernels(model)
    varlen = []
    count_kernel_attention(model, varlen)
    lengths = [5, 1, 9, 4]
    idx = torch.randint(0, 97, (1, sum(lengths)), generator=torch.Generator().manual_seed(3))
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    ref_out = ref.eval()(idx, position_ids=position_ids, use_cache=False)
    out = model.eval()(idx, position_ids=position_ids, use_cache=False)
    assert varlen == [sum(lengths)] * 2
    assert_close(out.logits, ref_out.logits, atol=1e-5, rtol=1e-5, name="packed logits")
    first = ref.eval()(idx[:, :5]).logits  # the first sequence alone
    assert_close(out.logits[:, :5], first, atol=1e-5, rtol=1e-5, name="first sequence alone")
    grads = [torch.autograd.grad(m(idx, position_ids=position_ids, use_cache=False).logits.square().sum(),
                                 m.transformer.wte.weight)[0] for m in (ref, model)]
    assert_close(grads[1], grads[0], atol=1e-4, rtol=1e-4, name="grad wte")


@pytest.mark.slow
def test_patched_hf_other_masks_fall_back():
    """A 4-D mask that is not causal attention within sequences runs HF's SDPA."""
    ref, model = hf_pair()
    apply_kernels(model.eval())
    varlen = []
    calls = count_kernel_attention(model, varlen)
    idx = batch(T=8)[0][:1]
    custom = torch.ones(1, 1, 8, 8, dtype=torch.bool)  # bidirectional
    with torch.no_grad():
        assert_close(model(idx, attention_mask=custom).logits, ref.eval()(idx, attention_mask=custom).logits,
                     atol=1e-5, rtol=1e-5, name="custom-mask logits")
    assert calls == [] and varlen == []


@pytest.mark.slow
def test_patched_hf_dropout_in_train_mode_falls_back_for_attention():
    """attn_pdrop > 0 in train mode: attention runs HF's SDPA (with dropout); under one seed the loss
    equals the unpatched model's, since every dropout draws the same random numbers in the same order."""
    ref, model = hf_pair(dropout=0.1)
    apply_kernels(model)
    calls = count_kernel_attention(model)
    idx, labels = batch()
    torch.manual_seed(5)
    ref_loss = ref.train()(idx, labels=labels).loss
    torch.manual_seed(5)
    loss = model.train()(idx, labels=labels).loss
    assert calls == []
    assert_close(loss, ref_loss, atol=1e-5, rtol=1e-5, name="loss with dropout")
    with torch.no_grad():
        model.eval()(idx)
    assert calls == [19, 19]  # eval mode: dropout is off and the kernel runs


def test_remove_kernels_and_context_restore_hf_code():
    ref, model = hf_pair()
    implementation = model.config._attn_implementation
    idx, _ = batch()
    with kernels_applied(model, {"attention": "triton", "layer_norm": "triton"}):
        assert model.config._attn_implementation == "gpt2_triton"
        assert "forward" in vars(model.transformer.ln_f)
    assert model.config._attn_implementation == implementation
    assert applied_kernels(model) == {op: "hf" for op in OPS}
    assert not any("forward" in vars(m) or hasattr(m, "_gpt2_triton_attention") for m in model.modules())
    apply_kernels(model, "triton")
    apply_kernels(model, {"gelu_mlp": "triton"})  # re-applying replaces the previous choice
    assert applied_kernels(model) == {"layer_norm": "hf", "attention": "hf", "gelu_mlp": "triton",
                                      "cross_entropy": "hf"}
    remove_kernels(remove_kernels(model))  # idempotent
    with torch.no_grad():
        assert torch.equal(model.eval()(idx).logits, ref.eval()(idx).logits)


def test_kernels_that_cannot_apply_leave_hf_code():
    _, exact_gelu = hf_pair(activation_function="gelu")  # not GPT-2's tanh GELU
    assert applied_kernels(apply_kernels(exact_gelu))["gelu_mlp"] == "hf"
    _, head_dim_24 = hf_pair(n_embd=48)  # head dim 24: not a flash-attention size
    assert applied_kernels(apply_kernels(head_dim_24))["attention"] == "hf"
    with pytest.raises(TypeError, match="GPT2LMHeadModel"):
        apply_kernels(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="unknown op"):
        apply_kernels(hf_pair()[1], {"softmax": "triton"})


@pytest.mark.slow
def test_patched_hf_under_fp16_autocast():
    """Under autocast the patched model is as close to the fp32 model as HF's own fp16 autocast run
    (bf16 is not testable in the interpreter)."""
    ref, model = hf_pair()
    half = transformers.GPT2LMHeadModel(ref.config)
    half.load_state_dict(ref.state_dict())
    apply_kernels(model)
    idx, labels = batch()
    ref.train()(idx, labels=labels).loss.backward()
    with torch.autocast("cpu", dtype=torch.float16):
        half_loss = half.train()(idx, labels=labels).loss
        loss = model.train()(idx, labels=labels).loss
    half_loss.backward()
    loss.backward()
    fp32_loss = ref(idx, labels=labels).loss.detach()
    assert_close_to_ref(loss, half_loss, fp32_loss, atol=1e-5, name="fp16 autocast loss")
    ref_params, half_params = dict(ref.named_parameters()), dict(half.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32, name
        assert_close_to_ref(p.grad, half_params[name].grad, ref_params[name].grad, atol=1e-6, name=f"grad {name}")


@pytest.mark.gpu
def test_patched_hf_bf16_autocast_on_gpu():
    """GPT-2-sized heads and T on CUDA under bf16 autocast: the patched model is as close to the fp32
    model as HF's own bf16 autocast run (loss and every grad)."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=12, n_embd=768, n_positions=1024, attn_pdrop=0.0,
                                     resid_pdrop=0.0, embd_pdrop=0.0)
    ref = transformers.GPT2LMHeadModel(config).cuda().train()
    half, model = (transformers.GPT2LMHeadModel(config).cuda().train() for _ in range(2))
    half.load_state_dict(ref.state_dict())
    model.load_state_dict(ref.state_dict())
    apply_kernels(model)
    idx = torch.randint(0, config.vocab_size, (4, 256), device="cuda")
    fp32_loss = ref(idx, labels=idx).loss
    fp32_loss.backward()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        half_loss = half(idx, labels=idx).loss
        loss = model(idx, labels=idx).loss
    half_loss.backward()
    loss.backward()
    assert_close_to_ref(loss, half_loss, fp32_loss.detach(), atol=1e-3, name="bf16 loss")
    ref_params, half_params = dict(ref.named_parameters()), dict(half.named_parameters())
    for name, p in model.named_parameters():
        assert_close_to_ref(p.grad, half_params[name].grad, ref_params[name].grad, atol=1e-5, name=f"grad {name}")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_triton_on_a_cpu_model_without_the_interpreter_is_refused_up_front(hf_dir, monkeypatch):
    path, _ = hf_dir
    model = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"^apply_kernels: the model is on cpu: Triton kernels \(layer_norm, "
                                           r"attention, .*\) need a CUDA GPU.*TRITON_INTERPRET=1") as excinfo:
        apply_kernels(model, "triton")
    assert "\n" not in str(excinfo.value)
    assert applied_kernels(model) == applied_kernels(transformers.GPT2LMHeadModel(model.config))  # untouched
    assert apply_kernels(model, "torch") is model


def test_gpt_from_pretrained_is_the_hf_loader(hf_dir):
    from gpt2_triton import GPT
    path, _ = hf_dir
    torch.manual_seed(0)
    ours = GPT.from_pretrained(str(path), pad_vocab_to=64)
    torch.manual_seed(0)  # the padded rows are drawn at random
    direct = from_pretrained(str(path), pad_vocab_to=64)
    assert ours.config == direct.config and ours.config.padded_vocab_size == 320
    assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), direct.state_dict().values()))
