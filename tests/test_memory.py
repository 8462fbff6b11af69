"""memory_plan against what a model allocates on a CPU: parameter, gradient and AdamW-state tensor bytes, and
the activations autograd saves (counted through saved_tensors_hooks); plan_problem's refusal."""
import pytest
import torch

from gpt2_triton.model.config import GPTConfig
from gpt2_triton.model.gpt import GPT
from gpt2_triton.training.memory import memory_plan, plan_line, plan_problem, plan_table, zero_partition
from tests.helpers import saved_bytes

CONFIGS = [  # (GPTConfig, micro_batch, seq_len)
    (GPTConfig(block_size=64, vocab_size=96, n_layer=2, n_head=2, n_embd=32), 2, 32),
    (GPTConfig(block_size=128, vocab_size=300, n_layer=3, n_head=4, n_embd=64, pad_vocab_to=128), 2, 64),
    (GPTConfig(block_size=64, vocab_size=512, n_layer=4, n_head=3, n_embd=96), 1, 48),
]


def model_saved_bytes(model, idx, amp):
    """(bytes autograd keeps from one forward on idx, parameters left out; the loss)."""
    (_, loss), kept = saved_bytes(model, idx, idx, leaves=list(model.parameters()), amp=amp)
    return kept, loss


def tensor_bytes(tensors):
    return sum(t.numel() * t.element_size() for t in tensors)


def within(planned, measured, rel=0.02):  # measured: exact but for torch bf16 C64-L3 (+0.75%); the issue asks 10%
    assert abs(planned - measured) <= rel * measured, (planned, measured)


@pytest.mark.parametrize("config, micro_batch, seq_len", CONFIGS, ids=["C32-L2", "C64-L3-pad128", "C96-L4-H3"])
@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_plan_matches_allocations_torch_kernels(config, micro_batch, seq_len, amp):
    torch.manual_seed(0)
    model = GPT(config, kernels="torch")
    plan = memory_plan(config, micro_batch, seq_len, amp=amp, kernels="torch")
    assert plan.params == tensor_bytes(model.parameters())
    idx = torch.randint(0, config.vocab_size, (micro_batch, seq_len))
    activations, loss = model_saved_bytes(model, idx, amp)
    within(plan.activations, activations)
    loss.backward()
    assert plan.grads == tensor_bytes(p.grad for p in model.parameters())
    optimizer = model.configure_optimizer(0.1, 1e-3, fused=False)
    optimizer.step()
    state = [t for s in optimizer.state.values() for k, t in s.items() if k != "step"]
    assert plan.adamw == tensor_bytes(state)


@pytest.mark.parametrize("amp", [False, True], ids=["fp32", "bf16"])
def test_plan_matches_saved_activations_triton_kernels(amp):
    config, micro_batch, seq_len = CONFIGS[0]
    torch.manual_seed(0)
    model = GPT(config, kernels="triton")
    idx = torch.randint(0, config.vocab_size, (micro_batch, seq_len))
    within(memory_plan(config, micro_batch, seq_len, amp=amp, kernels="triton").activations,
           model_saved_bytes(model, idx, amp)[0])


def test_sharding_divides_state_and_recompute_shrinks_activations():
    xl = GPTConfig.from_preset("gpt2-xl", pad_vocab_to=128)
    none = memory_plan(xl, 16, 1024, 8, "none")
    zero1 = memory_plan(xl, 16, 1024, 8, "optimizer")
    full = memory_plan(xl, 16, 1024, 8, "full")
    # ZeRO-1 shares whole parameters: the largest share (8 bytes of AdamW state per element) is about an eighth
    assert (zero1.params, zero1.grads, zero1.adamw) == (none.params, none.grads, 8 * zero_partition(xl, 8))
    assert -(-none.adamw // 8) < zero1.adamw < 1.001 * none.adamw / 8
    assert (full.params, full.grads, full.adamw) == (-(-none.params // 8), -(-none.grads // 8), -(-none.adamw // 8))
    small = GPTConfig.from_preset("gpt2", pad_vocab_to=128)  # its (50304, 768) embedding is 31 % of it
    assert zero_partition(small, 8) == 50304 * 768
    assert none.workspace == zero1.workspace == 0 and full.workspace == 2 * (12 * 1600 ** 2 + 13 * 1600)
    assert 2.1e6 < none.activations / (16 * 1024) < 2.3e6  # bytes per token
    gelu, block = (memory_plan(xl, 16, 1024, 8, "none", r).activations for r in ("gelu", "block"))
    assert gelu == none.activations - 16 * 1024 * 48 * 4 * 1600 * 2
    assert block < gelu < none.activations and block < none.activations / 3
    assert plan_line(full, 80 * 10**9) == ("memory per GPU: params 0.8, grads 0.8, AdamW 1.6, activations 35.8, "
                                           "workspace 0.1 = 39.0 GB of 80.0")


def test_refusal_names_the_cheapest_fix():
    xl = GPTConfig.from_preset("gpt2-xl", pad_vocab_to=128)
    assert plan_problem(memory_plan(xl, 16, 1024, 8, "none"), 80 * 10**9) is None
    assert plan_problem(memory_plan(xl, 16, 1024, 8, "none"), 55 * 10**9) == (
        "memory: this run needs 60.7 GB per GPU (params 6.2, grads 6.2, AdamW 12.5, activations 35.8, workspace "
        "0.0) and the GPU has 55.0 GB: run it with --shard optimizer (49.8 GB)")
    assert plan_problem(memory_plan(xl, 16, 1024, 1, "none"), 40 * 10**9).endswith(
        "run it with --micro-batch 4 (x4 the accumulation steps, the same tokens per step) (34.1 GB)")
    assert plan_problem(memory_plan(xl, 1, 1024, 1, "none"), 26 * 10**9).endswith(
        "run it with --recompute block (25.9 GB)")
    assert plan_problem(memory_plan(xl, 1, 1024, 1, "none"), 20 * 10**9).endswith(
        "the GPU has 20.0 GB, and no --micro-batch, --shard or --recompute fits it: use more GPUs or a smaller model")


def test_docs_table_is_the_generated_one():
    from pathlib import Path
    assert plan_table() in (Path(__file__).parents[1] / "docs" / "training.md").read_text()
