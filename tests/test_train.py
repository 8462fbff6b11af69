"""train.py: the loss falls, resume is bit-exact, grad accumulation and DDP match one big batch,
NaN stops cleanly, Ctrl-C checkpoints, triton without the interpreter fails clearly, metrics and plot."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2 import GPT, GPTConfig
from gpt2.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint
from gpt2.data import prepare_documents
from gpt2.train_utils import cosine_lr, device_peak_flops, mfu, read_metrics

import train  # a script at the repo root: pyproject's pytest `pythonpath` puts the root on sys.path

REPO = Path(__file__).resolve().parents[1]
TRAIN_FIELDS = {"step", "loss", "lr", "grad_norm", "tokens_per_s", "step_ms", "mfu", "peak_mem_mb"}


def synthetic_documents(n_docs=60):
    """Small, learnable text: repeated code-like lines with a few varying words."""
    names = ["alpha", "beta", "gamma", "delta", "omega"]
    for i in range(n_docs):
        lines = [f"def {names[(i + j) % 5]}_{j}(x):\n    return x + {j % 7}\n" for j in range(12)]
        yield "".join(lines)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("data")
    return prepare_documents(synthetic_documents(), out, source="synthetic", shard_tokens=1500,
                             val_every=6, workers=0, verbose=False)


def tiny_config(data_dir, run_dir, **overrides):
    settings = dict(n_layer=2, n_head=2, n_embd=32, block_size=32, seq_len=32, micro_batch=4, total_batch=None,
                    max_steps=30, warmup_steps=3, max_lr=1e-2, val_every=10, val_steps=2, hellaswag_every=0,
                    sample_every=0, checkpoint_every=10, data_dir=str(data_dir), run_dir=str(run_dir),
                    device="cpu", plot=False)
    return train.make_config("demo", **{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("run")
    history = train.train(tiny_config(data_dir, run_dir, plot=True, sample_every=15, sample_count=1,
                                      sample_tokens=4))
    return run_dir, history


def test_loss_falls(trained):
    _, history = trained
    losses = [r["loss"] for r in history]
    assert len(losses) == 30
    first, last = losses[0], sum(losses[-5:]) / 5
    assert first > 10.0, f"a fresh model should be near ln(50257) = 10.8; got {first}"
    assert last < first - 4.0, f"loss did not fall clearly: first {first:.3f}, last-5 mean {last:.3f}"


def test_metrics_plot_config_and_checkpoints(trained):
    run_dir, history = trained
    rows = read_metrics(run_dir / "metrics.jsonl")
    train_rows = [r for r in rows if r["kind"] == "train"]
    assert [r["step"] for r in train_rows] == list(range(1, 31))
    for r in train_rows:
        assert TRAIN_FIELDS <= set(r), f"missing fields {TRAIN_FIELDS - set(r)}"
        assert r["mfu"] is None and r["peak_mem_mb"] > 0 and r["tokens_per_s"] > 0 and r["step_ms"] > 0
    assert [r["loss"] for r in train_rows] == [r["loss"] for r in history]
    val_rows = [r for r in rows if r["kind"] == "val"]
    assert [r["step"] for r in val_rows] == [0, 10, 20, 30]
    assert val_rows[-1]["val_loss"] < val_rows[0]["val_loss"] - 2.0
    samples = [r for r in rows if r["kind"] == "sample"]
    assert [r["step"] for r in samples] == [15, 30]
    assert samples[0]["text"][0].startswith(train.SAMPLE_PROMPT)
    png = run_dir / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert saved["total_batch"] == 4 * 32 and saved["dtype"] == "float32" and saved["compile"] is False
    # keep the last 2 of the checkpoints at 10, 20, 30; the last holds everything needed to resume
    assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt_000020.pt", "ckpt_000030.pt"]
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert state["step"] == 30 and state["best_val_loss"] == min(r["val_loss"] for r in val_rows)
    assert {"model", "optimizer", "loader", "rng", "model_config", "train_config", "kernels"} <= set(state)


def test_resume_is_bit_exact(data_dir, tmp_path):
    """Run 8 steps; separately run 4 ("killed"), then resume to 8: the same losses, bit for bit."""
    common = dict(max_steps=8, lr_decay_steps=8, total_batch=2 * 4 * 32, val_every=3, checkpoint_every=100)
    full = train.train(tiny_config(data_dir, tmp_path / "full", **common))
    killed = train.train(tiny_config(data_dir, tmp_path / "split", **{**common, "max_steps": 4}))
    resumed = train.train(tiny_config(data_dir, tmp_path / "split", **common, resume="latest"))
    assert [r["loss"] for r in killed + resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in killed + resumed] == [r["grad_norm"] for r in full]
    a = load_checkpoint(latest_checkpoint(tmp_path / "full"))["model"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "split"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl", "train")]
    assert steps == list(range(1, 9))


def test_grad_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=300, pad_vocab_to=64))
    x = torch.randint(0, 300, (8, 16))
    y = torch.randint(0, 300, (8, 16))

    def grads_with(k):
        model.zero_grad(set_to_none=True)
        batches = iter(zip(x.chunk(k), y.chunk(k)))
        loss = train.accumulate_gradients(model, lambda: next(batches), k, torch.device("cpu"))
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss_1, grads_1 = grads_with(1)
    loss_4, grads_4 = grads_with(4)
    torch.testing.assert_close(loss_4, loss_1, atol=1e-6, rtol=1e-6)
    for name in grads_1:
        torch.testing.assert_close(grads_4[name], grads_1[name], atol=1e-6, rtol=1e-5, msg=name)


def test_ddp_two_processes_match_single_process(data_dir, tmp_path):
    """torchrun, 2 gloo processes, 1 micro-step each == 1 process with 2 micro-steps: same weights.

    adam_eps 1e-4 keeps Adam's update Lipschitz in the gradient (|d update / d grad| <= lr / eps), so
    the fp32 rounding differences of summing grads in another order stay ~1e-6 in the weights; with
    eps 1e-8 a parameter whose grad is ~1e-9 can move by up to lr on either side."""
    args = dict(max_steps=2, total_batch=2 * 4 * 32, val_every=2, checkpoint_every=100, adam_eps=1e-4)
    single = train.train(tiny_config(data_dir, tmp_path / "single", **args, val_steps=4))  # the 2 ranks' 2+2
    flags = ["--preset", "demo", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
             "--seq-len", "32", "--micro-batch", "4", "--total-batch", str(2 * 4 * 32), "--max-steps", "2",
             "--warmup-steps", "3", "--max-lr", "1e-2", "--adam-eps", "1e-4", "--val-every", "2", "--val-steps", "2",
             "--hellaswag-every", "0", "--sample-every", "0", "--checkpoint-every", "100", "--device", "cpu",
             "--no-plot", "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                           "train.py", *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    ddp_state = load_checkpoint(latest_checkpoint(tmp_path / "ddp"))
    assert ddp_state["world_size"] == 2 and len(ddp_state["loader"]) == 2
    single_state = load_checkpoint(latest_checkpoint(tmp_path / "single"))
    for k, v in single_state["model"].items():
        torch.testing.assert_close(ddp_state["model"][k], v, atol=2e-6, rtol=1e-5, msg=k)
    ddp_losses = [r["loss"] for r in read_metrics(tmp_path / "ddp" / "metrics.jsonl", "train")]
    assert ddp_losses == pytest.approx([r["loss"] for r in single], abs=1e-5)  # all-reduced across ranks
    ddp_val = read_metrics(tmp_path / "ddp" / "metrics.jsonl", "val")[-1]["val_loss"]
    single_val = read_metrics(tmp_path / "single" / "metrics.jsonl", "val")[-1]["val_loss"]
    assert ddp_val == pytest.approx(single_val, abs=1e-5)  # all-reduced over the ranks' val windows


def test_nan_loss_stops_and_keeps_last_good_checkpoint(data_dir, tmp_path, monkeypatch):
    real_forward = GPT.forward
    calls = {"train": 0}

    def forward(self, idx, targets=None):
        logits, loss = real_forward(self, idx, targets)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 6:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    cfg = tiny_config(data_dir, tmp_path, max_steps=20, checkpoint_every=2, val_every=0)
    with pytest.raises(train.NonFiniteError, match=r"step 6: loss is nan") as excinfo:
        train.train(cfg)
    assert "ckpt_000004.pt" in str(excinfo.value)  # names the last good checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000002.pt", "ckpt_000004.pt"]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_ctrl_c_saves_the_completed_step(data_dir, tmp_path, monkeypatch):
    real_after_step = train.Trainer.after_step

    def after_step(self):
        real_after_step(self)
        if self.step == 3:
            os.kill(os.getpid(), signal.SIGINT)  # as if the user pressed Ctrl-C during step 3

    monkeypatch.setattr(train.Trainer, "after_step", after_step)
    handler_before = signal.getsignal(signal.SIGINT)
    history = train.train(tiny_config(data_dir, tmp_path, max_steps=1000, checkpoint_every=0, val_every=0))
    assert [r["step"] for r in history] == [1, 2, 3]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000003.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 3
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_triton_on_cpu_without_interpreter_exits_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    data_dir = tmp_path / "never-prepared"
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1") as excinfo:
        train.main(["--preset", "demo", "--kernels", "attention=triton,layer_norm=torch",
                    "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "run")])
    assert "Triton kernels (attention) need a CUDA GPU" in str(excinfo.value)  # names the triton ops only
    assert not data_dir.exists() and not (tmp_path / "run").exists()  # failed before any work


def test_cli_overrides_preset_and_defaults():
    cfg = train.parse_config(["--preset", "gpt2-124m", "--micro-batch", "16", "--max-steps", "100",
                              "--no-compile", "--resume", "--kernels", "attention=triton"])
    assert cfg.preset == "gpt2-124m" and cfg.micro_batch == 16 and cfg.max_steps == 100
    assert cfg.compile is False and cfg.resume == "latest" and cfg.kernels == "attention=triton"
    assert (cfg.total_batch, cfg.max_lr, cfg.warmup_steps, cfg.data) == (524288, 6e-4, 715, "fineweb-edu")
    assert cfg.pad_vocab_to == 128 and (cfg.beta1, cfg.beta2, cfg.adam_eps) == (0.9, 0.95, 1e-8)
    assert train.parse_config(["--preset", "demo", "--resume", "runs/x/ckpt_000005.pt"]).resume.endswith("5.pt")
    default = train.parse_config([])
    assert default.preset == ("gpt2-124m" if torch.cuda.is_available() else "demo")
    with pytest.raises(SystemExit):
        train.parse_config(["--micro-batch", "many"])


def test_bad_total_batch_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(ValueError, match="total_batch 100 must be a multiple of micro_batch x seq_len"):
        train.train(tiny_config(data_dir, tmp_path, total_batch=100))


def test_lr_schedule_and_mfu():
    lrs = [cosine_lr(s, 6e-4, 6e-5, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(6e-5) and lrs[9] == pytest.approx(6e-4)
    assert max(lrs) == pytest.approx(6e-4) and lrs[100] == lrs[119] == pytest.approx(6e-5)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warmup
    assert lrs[55] == pytest.approx((6e-4 + 6e-5) / 2)  # cosine midpoint
    assert device_peak_flops("cpu") is None and device_peak_flops("cpu", override=1e12) == 1e12
    assert mfu(1e9, 1e5, None) is None
    assert mfu(1e9, 1e5, 1e15, n_devices=2) == pytest.approx(0.05)
