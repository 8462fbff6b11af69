"""Gradient accumulation with the fused backwards writing into .grad: k micro-steps of the training step give
the grads of the torch kernels (fp32, bf16 autocast), the .grad tensors are written in place, and 2 gloo DDP
processes (no_sync on all but the last micro-step, both bucket layouts) give one process's grads."""
import copy
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_close, error_stats

from gpt2_triton import GPT, GPTConfig
from gpt2_triton.kernels.utils import is_interpreter
from gpt2_triton.training.step import StepSettings, accumulate_gradients

REPO = Path(__file__).resolve().parents[1]
CONFIG = GPTConfig.from_preset("tiny", vocab_size=97, block_size=16, n_embd=32, n_head=2, n_layer=2,
                               pad_vocab_to=64)
K = 3  # micro-steps


def _batches(seed=0, k=K, batch=2):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, CONFIG.vocab_size, (k * batch, CONFIG.block_size), generator=gen)
    y = torch.randint(0, CONFIG.vocab_size, (k * batch, CONFIG.block_size), generator=gen)
    return list(zip(x.chunk(k), y.chunk(k)))


def _accumulate(kernels, amp_dtype=None, dtype=torch.float32, seed=0):
    """(loss, {name: grad}, {name: the .grad object after each micro-step}) of K accumulated micro-steps."""
    torch.manual_seed(0)
    model = GPT(CONFIG, kernels=kernels).to(dtype)
    batches = iter(_batches(seed))
    seen = {}

    def next_batch():
        for n, p in model.named_parameters():
            if p.grad is not None:
                seen.setdefault(n, set()).add(id(p.grad))
        return next(batches)
    loss = accumulate_gradients(model, next_batch, StepSettings(torch.device("cpu"), amp_dtype, grad_accum=K))
    return loss, {n: p.grad.clone() for n, p in model.named_parameters()}, seen


def test_fp32_grads_equal_the_torch_kernels_and_stay_in_place():
    loss, grads, seen = _accumulate("triton")
    ref_loss, ref_grads, _ = _accumulate("torch")
    assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6, name="loss")
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        assert g.dtype == torch.float32
        assert_close(g, ref_grads[name], atol=3e-5, rtol=1e-4, name=name)
        assert len(seen[name]) == 1, f"{name}: .grad replaced between micro-steps"
    assert grads["transformer.wte.weight"][CONFIG.vocab_size:].abs().sum() == 0  # padded rows: no gradient


def test_low_precision_autocast_grads_within_the_suites_rule():
    """Half-precision autocast, fp32 master weights: our accumulated grads' error against fp64 is within 2x
    the torch kernels' own error under the same autocast. fp16 under the interpreter, whose tl.dot on bf16
    tiles is wrong (the attention kernels' grads come out ~1e12 off there: measured), bf16 on a GPU."""
    amp = torch.float16 if is_interpreter() else torch.bfloat16
    _, grads, _ = _accumulate("triton", amp)
    _, torch_grads, _ = _accumulate("torch", amp)
    _, truth, _ = _accumulate("torch", None, torch.float64)
    factor = 2.0
    for name, g in grads.items():
        ours, theirs = error_stats(g, truth[name]), error_stats(torch_grads[name], truth[name])
        assert g.dtype == torch.float32, name
        assert ours[1] <= factor * theirs[1] + 1e-6, f"{name}: rel RMS {ours[1]:.3e} vs PyTorch's {theirs[1]:.3e}"


def test_weight_casts_follow_optimizer_steps_and_loaded_weights():
    """One half-precision copy per version of each weight: after optimizer.step() and after load_state_dict (what
    a resume does) the next micro-steps use the new values, bit for bit as a model built from them."""
    amp = torch.float16 if is_interpreter() else torch.bfloat16

    def step(model, opt, seed):
        model.zero_grad(set_to_none=True)
        batches = iter(_batches(seed, k=2))
        loss = accumulate_gradients(model, lambda: next(batches), StepSettings(torch.device("cpu"), amp, grad_accum=2))
        opt.step()
        return loss.item()

    torch.manual_seed(0)
    model = GPT(CONFIG, kernels="triton")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    step(model, opt, 0)
    state = copy.deepcopy((model.state_dict(), opt.state_dict()))  # a checkpoint: not views of live tensors
    losses = [step(model, opt, s) for s in (1, 2)]  # the casts made at seed 0 are stale from here on

    resumed = GPT(CONFIG, kernels="triton")
    resumed.load_state_dict(state[0])
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    resumed_opt.load_state_dict(state[1])
    assert [step(resumed, resumed_opt, s) for s in (1, 2)] == losses
    model.load_state_dict(resumed.state_dict())  # into a model whose casts are of other values
    assert step(model, opt, 3) == step(resumed, resumed_opt, 3)


DDP_SCRIPT = """
import os, sys, torch, torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
sys.path.insert(0, {tests!r})
from test_grad_accumulation import CONFIG, _batches
from gpt2_triton import GPT
from gpt2_triton.training.step import StepSettings, accumulate_gradients
dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = DDP(GPT(CONFIG, kernels="triton"), gradient_as_bucket_view={bucket_view})
mine = iter(_batches(k=4)[2 * rank: 2 * rank + 2])  # rank r: micro-batches 2r, 2r + 1 of the 4
for step in range(2):  # twice: zero_grad(set_to_none) between, as train_step does
    model.zero_grad(set_to_none=True)
    accumulate_gradients(model, lambda: next(mine), StepSettings(torch.device("cpu"), grad_accum=2))
    mine = iter(_batches(k=4)[2 * rank: 2 * rank + 2])
if rank == 0:
    torch.save({{n: p.grad for n, p in model.module.named_parameters()}}, {out!r})
dist.destroy_process_group()
"""


@pytest.mark.slow
@pytest.mark.parametrize("bucket_view", [False, True], ids=["bucket-copy", "bucket-view"])
def test_ddp_two_processes_equal_one(bucket_view, tmp_path):
    """torchrun, 2 gloo processes x 2 micro-steps (the first under no_sync) == 1 process x 4 micro-steps."""
    out = tmp_path / "grads.pt"
    script = tmp_path / "ddp.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(tests=str(REPO / "tests"), bucket_view=bucket_view,
                                                        out=str(out))))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": os.environ.get("TRITON_INTERPRET", "1"),
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp = torch.load(out)
    torch.manual_seed(0)
    model = GPT(CONFIG, kernels="triton")
    batches = iter(_batches(k=4))
    accumulate_gradients(model, lambda: next(batches), StepSettings(torch.device("cpu"), grad_accum=4))
    for name, p in model.named_parameters():
        assert_close(ddp[name], p.grad, atol=2e-6, rtol=1e-5, name=name)
