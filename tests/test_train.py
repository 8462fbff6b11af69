"""train.py: the loss falls, resume is bit-exact, grad accumulation and DDP match one big batch,
NaN stops cleanly, Ctrl-C checkpoints, triton without the interpreter fails clearly, metrics and plot;
what a run prints (header, step lines, summary, --quiet, the progress bar); run-folder safety (one run
per folder, a lock, SIGTERM, resume checks, stale temps) and flag checks."""
import contextlib
import io
import json
import os
import re
import runpy
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2_triton import GPT, GPTConfig, sample, training
from gpt2_triton import data as gpt2_data
from gpt2_triton.checkpoint import (
    checkpoint_path,
    checkpoint_problem,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    newest_verified_checkpoint,
    save_checkpoint,
)
from gpt2_triton.data import prepare_documents, read_shard, write_shard
from gpt2_triton.training.metrics import (
    MetricsLog,
    cosine_lr,
    device_peak_flops,
    ema,
    ema_beta,
    loss_figure,
    mfu,
    read_metrics,
)
from gpt2_triton.training.report import Report, format_duration
from tests.helpers import disk_full, overwrite_tensor_bytes, run_where_unwritable

REPO = Path(__file__).resolve().parents[1]


def train_main(argv):
    """train.py's main(argv), run in this process (the script itself, not an import of it)."""
    return runpy.run_path(str(REPO / "train.py"))["main"](argv)


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
                    sample_every=0, checkpoint_every=10, data="synthetic", data_dir=str(data_dir), run_dir=str(run_dir),
                    device="cpu", plot=False)
    return training.make_config("demo", **{**settings, **overrides})


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """30 steps (the demo preset's --log-every 10), val every 10, samples at 15 and 30; (run folder,
    history, what it printed)."""
    run_dir = tmp_path_factory.mktemp("run")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        history = training.train(tiny_config(data_dir, run_dir, plot=True, sample_every=15, sample_count=1,
                                             sample_tokens=4))
    return run_dir, history, out.getvalue()


def test_loss_falls(trained):
    _, history, _ = trained
    losses = [r["loss"] for r in history]
    assert len(losses) == 30
    first, last = losses[0], sum(losses[-5:]) / 5
    assert first > 10.0, f"a fresh model should be near ln(50257) = 10.8; got {first}"
    assert last < first - 4.0, f"loss did not fall clearly: first {first:.3f}, last-5 mean {last:.3f}"


def test_metrics_plot_config_and_checkpoints(trained):
    run_dir, history, _ = trained
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
    assert samples[0]["text"][0].startswith("def ")  # the demo preset's prompt (its data is Python code)
    png = run_dir / "loss.png"
    assert png.is_file() and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    saved = json.loads((run_dir / "train_config.json").read_text())
    assert saved["total_batch"] == 4 * 32 and saved["dtype"] == "float32" and saved["compile"] is False
    # keep the last 2 of the checkpoints at 10, 20, 30; the last holds everything needed to resume
    assert [p.name for p in list_checkpoints(run_dir)] == ["ckpt_000020.pt", "ckpt_000030.pt"]
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert state["step"] == 30 and state["best_val_loss"] == min(r["val_loss"] for r in val_rows)
    assert {"model", "optimizer", "loader", "rng", "model_config", "train_config", "kernels"} <= set(state)


STEP_LINE = re.compile(r"step +(\d+)/30 \| loss (\S+) \| lr (\S+) \| norm (\S+) \| ([\d,]+) tok/s \| ([\d,]+) ms \| "
                       r"elapsed (\d+:\d\d) \| ETA (\d+:\d\d)")


def test_output_header_step_lines_and_summary(trained):
    run_dir, history, printed = trained
    lines = printed.splitlines()
    assert "{" not in printed and "config" not in lines[0]  # no config dump: it is in train_config.json
    n_params = GPT(GPTConfig.from_preset("gpt2", n_layer=2, n_head=2, n_embd=32, block_size=32,
                                         pad_vocab_to=128)).num_params()
    assert lines[0] == (f"GPT-2 training | preset demo | {n_params / 1e6:.3g}M parameters "
                        f"(2 layers, 2 heads, 32 wide, context 32)")
    assert lines[1].split() == "batch 128 tokens per step = 4 x 32 tokens x 1 micro-step".split()
    assert lines[2].split()[:6] == ["length", "steps", "1-30:", "3,840", "tokens", "="]
    assert lines[4].split() == "device cpu | fp32 | torch.compile off | kernels torch (auto)".split()
    assert lines[5].split() == ["run", str(run_dir), "(full", "config", "in", "train_config.json)"]
    from gpt2_triton.training.memory import memory_plan, plan_line
    plan = memory_plan(GPTConfig.from_preset("gpt2", n_layer=2, n_head=2, n_embd=32, block_size=32, pad_vocab_to=128),
                       4, 32, 1, amp=False, kernels="torch")
    assert lines[6] == "  " + plan_line(plan)  # a CPU: no device size, no refusal; MBs below 1 GB
    assert lines[6].startswith("  memory per process: params 6.5, ") and lines[6].endswith(" MB")
    # one line per --log-every 10 steps (and the first), each with the step's numbers as metrics.jsonl has them
    records = {r["step"]: r for r in read_metrics(run_dir / "metrics.jsonl", "train")}
    step_lines = [m for m in map(STEP_LINE.fullmatch, lines) if m]
    assert [int(m[1]) for m in step_lines] == [1, 10, 20, 30]
    assert not any(line.startswith("step") and "loss" in line and not STEP_LINE.fullmatch(line)
                   and "val loss" not in line for line in lines)
    for m in step_lines:
        r = records[int(m[1])]
        assert (m[2], m[3], m[4]) == (f"{r['loss']:.4f}", f"{r['lr']:.2e}", f"{r['grad_norm']:.3f}")
        assert (m[5], m[6]) == (f"{r['tokens_per_s']:,.0f}", f"{r['step_ms']:,.0f}")
    assert step_lines[-1][8] == "0:00" and "MFU" not in printed  # no MFU where the peak is unknown (CPU)
    vals = read_metrics(run_dir / "metrics.jsonl", "val")
    for r in vals:
        assert f"step {r['step']:>2}/30 | val loss {r['val_loss']:.4f} (best " in printed
    assert any(f"step 15/30 | sample 0: {quote}def " in printed for quote in "'\"")  # the demo's prompt, repr()
    assert f"step 30/30 | saved checkpoint {run_dir / 'ckpt_000030.pt'}" in printed
    # the closing summary: what ran, the losses, where everything is, and a sampling command that works
    summary = lines[lines.index(next(x for x in lines if x.startswith("done: "))):]
    assert re.fullmatch(r"done: steps 1-30 of 30 in \d+:\d\d \| 3,840 tokens \| [\d,]+ tok/s after the first step",
                        summary[0])
    losses = [r["loss"] for r in history]
    best = min(vals, key=lambda r: r["val_loss"])
    assert summary[1].split("  loss ")[1].strip() == (
        f"train {losses[-1]:.4f} (EMA {ema(losses, ema_beta(30))[-1]:.4f}) | val {vals[-1]['val_loss']:.4f} at step "
        f"30, best {best['val_loss']:.4f} at step {best['step']}")
    where = {line.split()[0]: line.split(None, 1)[1] for line in summary[3:]}
    checkpoint = run_dir / "ckpt_000030.pt"
    assert where == {"checkpoint": str(checkpoint), "metrics": str(run_dir / "metrics.jsonl"),
                     "plot": str(run_dir / "loss.png"), "sample": f"python -m gpt2_triton.sample --init {checkpoint}"}
    texts = sample.main(where["sample"].split()[3:] + ["--num-samples", "1", "--max-new-tokens", "2",
                                                          "--device", "cpu"])
    assert texts[0].startswith("Hello, I'm a language model,")


def test_loss_plot_draws_what_metrics_jsonl_holds(trained):
    run_dir, _, _ = trained
    png = (run_dir / "loss.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and int.from_bytes(png[16:20], "big") >= 600  # width
    train, val = read_metrics(run_dir / "metrics.jsonl", "train"), read_metrics(run_dir / "metrics.jsonl", "val")
    fig = loss_figure(run_dir / "metrics.jsonl")
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    beta = ema_beta(len(train))
    assert set(lines) == {"train, per step", f"train, EMA (β = {beta:.2f})", "val", "lr"}
    steps = [r["step"] for r in train]
    assert list(lines["train, per step"].get_xdata()) == steps
    assert list(lines["train, per step"].get_ydata()) == [r["loss"] for r in train]
    assert lines["train, per step"].get_alpha() < 0.5  # raw: faint
    assert list(lines[f"train, EMA (β = {beta:.2f})"].get_ydata()) == ema([r["loss"] for r in train], beta)
    assert list(lines["val"].get_xdata()) == [r["step"] for r in val] == [0, 10, 20, 30]
    assert list(lines["val"].get_ydata()) == [r["val_loss"] for r in val]
    assert list(lines["lr"].get_xdata()) == steps and list(lines["lr"].get_ydata()) == [r["lr"] for r in train]


def test_loss_plot_adds_hellaswag_when_the_run_has_it(tmp_path):
    log = MetricsLog(tmp_path / "metrics.jsonl")
    for step in range(1, 41):
        log.log("train", step=step, loss=10.0 / step, lr=1e-3)
    log.log("hellaswag", step=20, acc=0.25, acc_norm=0.26, n=10)
    log.log("hellaswag", step=40, acc=0.27, acc_norm=0.29, n=10)
    fig = loss_figure(tmp_path / "metrics.jsonl")
    lines = {line.get_label(): line for ax in fig.axes for line in ax.get_lines()}
    assert list(lines["HellaSwag acc_norm"].get_xdata()) == [20, 40]
    assert list(lines["HellaSwag acc_norm"].get_ydata()) == [0.26, 0.29]
    assert "val" not in lines and [ax.get_title() for ax in fig.axes][-1] == "HellaSwag"


def test_ema_is_bias_corrected():
    assert ema([4.0, 4.0, 4.0], 0.9) == pytest.approx([4.0, 4.0, 4.0])  # starts at the first value, not at 0
    assert ema([0.0, 10.0], 0.5) == pytest.approx([0.0, 10 * 0.5 / 0.75])
    assert ema_beta(200) == pytest.approx(0.9) and ema_beta(10) == pytest.approx(0.8)
    assert ema_beta(10**6) == pytest.approx(0.99)


def test_quiet_prints_header_evaluations_checkpoints_and_summary_only(data_dir, tmp_path, capsys):
    training.train(tiny_config(data_dir, tmp_path, max_steps=4, val_every=2, checkpoint_every=0, sample_every=2,
                               sample_count=1, sample_tokens=2, quiet=True))
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].startswith("GPT-2 training | preset demo") and lines[-1].startswith("  sample      python -m")
    assert [line for line in lines if line.startswith("step")] == [
        line for line in lines if re.fullmatch(r"step \d/4 \| (val loss .*|saved checkpoint .*)", line)]
    assert sum("val loss" in line for line in lines) == 3 and "sample 0" not in out
    assert any(line.startswith("done: steps 1-4 of 4") for line in lines)


def test_log_every_and_quiet_are_flags_and_may_change_on_resume(data_dir, tmp_path, capsys):
    cfg = training.parse_config(cli_flags(data_dir, tmp_path, max_steps=4, val_every=0, checkpoint_every=0,
                                          sample_every=0) + ["--log-every", "3"])
    assert (cfg.log_every, cfg.quiet) == (3, False)
    training.train(cfg)
    steps = [line.split("|")[0].split()[1] for line in capsys.readouterr().out.splitlines() if "| loss " in line]
    assert steps == ["1/4", "3/4", "4/4"]  # the first, every 3rd, the last
    resumed = replace(cfg, resume="latest", max_steps=6, log_every=1, quiet=True)
    assert [r["step"] for r in training.train(resumed)] == [5, 6]
    assert "| loss " not in capsys.readouterr().out
    assert read_metrics(tmp_path / "metrics.jsonl", "resume")[0]["changed"] == {
        "max_steps": [4, 6], "lr_decay_steps": [4, 6], "log_every": [3, 1], "quiet": [False, True]}


def test_refused_run_prints_only_the_one_line_error(data_dir, tmp_path, capsys):
    flags = cli_flags(data_dir, tmp_path, max_steps=1, val_every=0, checkpoint_every=0)
    train_main(flags)
    capsys.readouterr()
    with pytest.raises(SystemExit, match="already holds a run") as excinfo:
        train_main(flags)
    assert capsys.readouterr().out == "" and "\n" not in str(excinfo.value.code)


def test_progress_bar_on_a_terminal_shows_the_step_fields(capsys):
    report = Report(enabled=True, log_every=100, bar=True)
    report.start(0, 4)
    for step in range(1, 5):
        report.step(dict(step=step, loss=5.0 - step, lr=1e-3, grad_norm=0.5, tokens_per_s=1234.0, step_ms=10.0,
                         mfu=0.4, peak_mem_mb=1.0))
        report.event(step, f"val loss {4.5 - step:.4f}")
    report.close()
    out, err = capsys.readouterr()
    assert "step 4/4 |" in err and "loss 1.0000 | lr 1.00e-03 | norm 0.500 | 1,234 tok/s | MFU 40.0%" in err
    assert [line.split(" | ")[:2] for line in out.splitlines()] == [  # lines: the first step, the last, events
        ["step 1/4", "loss 4.0000"], ["step 1/4", "val loss 3.5000"], ["step 2/4", "val loss 2.5000"],
        ["step 3/4", "val loss 1.5000"], ["step 4/4", "loss 1.0000"], ["step 4/4", "val loss 0.5000"]]
    assert format_duration(7) == "0:07" and format_duration(125) == "2:05" and format_duration(3723) == "1:02:03"


def test_resume_is_bit_exact(data_dir, tmp_path):
    """Run 8 steps; separately run 4 ("killed"), then resume to 8: the same losses, bit for bit."""
    common = dict(max_steps=8, lr_decay_steps=8, total_batch=2 * 4 * 32, val_every=3, checkpoint_every=100)
    full = training.train(tiny_config(data_dir, tmp_path / "full", **common))
    killed = training.train(tiny_config(data_dir, tmp_path / "split", **{**common, "max_steps": 4}))
    resumed = training.train(tiny_config(data_dir, tmp_path / "split", **common, resume="latest"))
    assert [r["loss"] for r in killed + resumed] == [r["loss"] for r in full]
    assert [r["grad_norm"] for r in killed + resumed] == [r["grad_norm"] for r in full]
    a = load_checkpoint(latest_checkpoint(tmp_path / "full"))["model"]
    b = load_checkpoint(latest_checkpoint(tmp_path / "split"))["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl", "train")]
    assert steps == list(range(1, 9))


def test_doc_mask_trains_resumes_exactly_and_stays_fixed(data_dir, tmp_path):
    """--doc-mask: the losses differ from attending across documents (the data has EOTs inside rows),
    resume is bit-exact, and a resume cannot switch it."""
    common = dict(max_steps=6, lr_decay_steps=6, val_every=3, checkpoint_every=100, doc_mask=True)
    full = training.train(tiny_config(data_dir, tmp_path / "full", **common))
    killed = training.train(tiny_config(data_dir, tmp_path / "split", **{**common, "max_steps": 3}))
    resumed = training.train(tiny_config(data_dir, tmp_path / "split", **common, resume="latest"))
    assert [r["loss"] for r in killed + resumed] == [r["loss"] for r in full]
    plain = training.train(tiny_config(data_dir, tmp_path / "plain", **{**common, "doc_mask": False}))
    assert [r["loss"] for r in plain] != [r["loss"] for r in full]
    val = [r["val_loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl", "val")]
    assert len(val) == 3 and all(np.isfinite(val))
    with pytest.raises(training.ConfigError, match=r"--doc-mask \(True in the checkpoint, False now\)"):
        training.train(tiny_config(data_dir, tmp_path / "split", **{**common, "max_steps": 9, "doc_mask": False},
                                   resume="latest"))


@pytest.mark.parametrize("recompute", ["gelu", "block"])
def test_recompute_trains_the_same_losses(data_dir, tmp_path, recompute):
    """Recomputing in backward what the forward computed gives the same bits: the same loss curve."""
    common = dict(max_steps=4, lr_decay_steps=4, val_every=100, checkpoint_every=100, doc_mask=True)
    plain = training.train(tiny_config(data_dir, tmp_path / "none", **common))
    runs = training.train(tiny_config(data_dir, tmp_path / recompute, recompute=recompute, **common))
    assert [r["loss"] for r in runs] == [r["loss"] for r in plain]
    assert [r["grad_norm"] for r in runs] == [r["grad_norm"] for r in plain]
    assert json.loads((tmp_path / recompute / "train_config.json").read_text())["recompute"] == recompute


def test_grad_accumulation_equals_one_big_batch():
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=300, pad_vocab_to=64))
    x = torch.randint(0, 300, (8, 16))
    y = torch.randint(0, 300, (8, 16))

    def grads_with(k):
        model.zero_grad(set_to_none=True)
        batches = iter(zip(x.chunk(k), y.chunk(k)))
        loss = training.accumulate_gradients(model, lambda: next(batches), training.StepSettings(torch.device("cpu"),
                                                                                                  grad_accum=k))
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
    single = training.train(tiny_config(data_dir, tmp_path / "single", **args, val_steps=4))  # the 2 ranks' 2+2
    flags = ["--preset", "demo", "--n-layer", "2", "--n-head", "2", "--n-embd", "32", "--block-size", "32",
             "--seq-len", "32", "--micro-batch", "4", "--total-batch", str(2 * 4 * 32), "--max-steps", "2",
             "--warmup-steps", "3", "--max-lr", "1e-2", "--adam-eps", "1e-4", "--val-every", "2", "--val-steps", "2",
             "--hellaswag-every", "0", "--sample-every", "0", "--checkpoint-every", "100", "--device", "cpu",
             "--no-plot", "--data", "synthetic", "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "ddp")]
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

    def forward(self, idx, targets=None, **kwargs):
        logits, loss = real_forward(self, idx, targets, **kwargs)
        if self.training:
            calls["train"] += 1
            if calls["train"] == 6:
                loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(GPT, "forward", forward)
    cfg = tiny_config(data_dir, tmp_path, max_steps=20, checkpoint_every=2, val_every=0)
    with pytest.raises(training.NonFiniteError, match=r"step 6: loss is nan") as excinfo:
        training.train(cfg)
    assert "ckpt_000004.pt" in str(excinfo.value)  # names the last good checkpoint
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000002.pt", "ckpt_000004.pt"]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def signal_at_step(monkeypatch, step, signum):
    real_after_step = training.Trainer.after_step

    def after_step(self):
        real_after_step(self)
        if self.step == step:
            os.kill(os.getpid(), signum)  # as if the user pressed Ctrl-C (or a scheduler sent SIGTERM) now

    monkeypatch.setattr(training.Trainer, "after_step", after_step)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_signal_saves_the_completed_step_and_exits_nonzero(data_dir, tmp_path, monkeypatch, signum):
    signal_at_step(monkeypatch, 3, signum)
    handlers_before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    with pytest.raises(training.TrainingInterrupted) as excinfo:
        training.train(tiny_config(data_dir, tmp_path, max_steps=1000, checkpoint_every=0, val_every=0))
    assert [r["step"] for r in excinfo.value.history] == [1, 2, 3] and excinfo.value.signum == signum
    assert excinfo.value.exit_code == {signal.SIGINT: 130, signal.SIGTERM: 143}[signum]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000003.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 3
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == handlers_before  # restored


def cli_flags(data_dir, run_dir, **overrides):
    """tiny_config's settings as train.py flags."""
    settings = dict(preset="demo", n_layer=2, n_head=2, n_embd=32, block_size=32, seq_len=32, micro_batch=4,
                    max_steps=30, warmup_steps=3, max_lr=1e-2, val_every=10, val_steps=2, hellaswag_every=0,
                    sample_every=0, checkpoint_every=10, data="synthetic", data_dir=data_dir, run_dir=run_dir,
                    device="cpu", plot=False)
    flags = []
    for name, value in {**settings, **overrides}.items():
        flag = "--" + name.replace("_", "-")
        flags += ([flag] if value else ["--no-" + flag[2:]]) if isinstance(value, bool) else [flag, str(value)]
    return flags


def test_ctrl_c_exits_130_after_saving(data_dir, tmp_path, monkeypatch, capsys):
    signal_at_step(monkeypatch, 2, signal.SIGINT)
    with pytest.raises(SystemExit) as excinfo:
        train_main(cli_flags(data_dir, tmp_path, max_steps=1000, checkpoint_every=0, val_every=0))
    assert excinfo.value.code == 130
    assert "stopped by SIGINT after step 2; saved" in capsys.readouterr().err
    assert load_checkpoint(latest_checkpoint(tmp_path))["step"] == 2


def wait_for(condition, proc, timeout=180.0, what="the condition"):
    """Poll (no fixed sleep) until condition() holds; fail early if the process died."""
    deadline = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"process exited {proc.returncode} before {what}:\n{out[-3000:]}\n{err[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def train_steps(run_dir) -> list[int]:
    return [r["step"] for r in read_metrics(Path(run_dir) / "metrics.jsonl", "train")]


def test_live_run_locks_its_folder_and_sigterm_saves_and_exits_143(data_dir, tmp_path):
    run_dir = tmp_path / "run"
    flags = cli_flags(data_dir, run_dir, max_steps=100000, checkpoint_every=0, val_every=0)
    proc = subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 2, proc, what="2 training steps")
        shards = {p.name: p.read_bytes() for p in data_dir.glob("*.bin")}
        with pytest.raises(ValueError, match=f"prepare: {data_dir} is being read by a live train.py"):
            prepare_documents(synthetic_documents(), data_dir, source="synthetic", shard_tokens=500, workers=0,
                              verbose=False)  # the live run's data folder: never re-prepared under it
        assert {p.name: p.read_bytes() for p in data_dir.glob("*.bin")} == shards
        stale = run_dir / ".ckpt_000007.pt.0123abcd.tmp"  # a live save's temp file looks just like this
        stale.write_bytes(b"being written")
        for extra in ([], ["--resume"], ["--overwrite"]):
            with pytest.raises(SystemExit, match=rf"in use by another train.py \(pid {proc.pid} on") as excinfo:
                train_main(cli_flags(data_dir, run_dir, max_steps=5) + extra)
            assert "\n" not in str(excinfo.value.code)
        assert stale.exists()  # not swept: its writer may be alive
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-3000:]
    last = train_steps(run_dir)[-1]
    assert f"SIGTERM: saving step {last} and stopping" in out
    assert f"stopped by SIGTERM after step {last}; saved" in err and "Traceback" not in err
    assert [p.name for p in list_checkpoints(run_dir)] == [f"ckpt_{last:06d}.pt"]
    # The lock died with the process: the run resumes here, and the stale temp file is swept.
    history = training.train(tiny_config(data_dir, run_dir, max_steps=last + 1, checkpoint_every=0, val_every=0,
                                      resume="latest"))
    assert [r["step"] for r in history] == [last + 1] and not stale.exists()


def find_worker(*parent_pids: int, rank: int) -> int:
    """The pid of torchrun's worker with RANK=rank (a child of one of parent_pids), from /proc."""
    for pid in (pid for parent in parent_pids for pid in children(parent)):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise LookupError(f"no worker with RANK={rank} under pid(s) {parent_pids}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_sigterm_to_one_ddp_rank_stops_every_rank_at_the_same_step(data_dir, tmp_path):
    run_dir = tmp_path / "ddp"
    flags = cli_flags(data_dir, run_dir, max_steps=100000, checkpoint_every=0, val_every=0,
                      total_batch=2 * 4 * 32)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train.py"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([*torchrun, *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 2, proc, what="2 DDP training steps")
        os.kill(find_worker(proc.pid, rank=1), signal.SIGTERM)  # rank 1 only; rank 0 never sees a signal
        out, err = proc.communicate(timeout=180)
    finally:
        proc.kill()
    last = train_steps(run_dir)[-1]
    assert out.count(f"stopped by SIGTERM after step {last}") + err.count(f"stopped by SIGTERM after step {last}") == 2
    state = load_checkpoint(latest_checkpoint(run_dir))
    assert state["step"] == last and len(state["loader"]) == 2 and len(list_checkpoints(run_dir)) == 1
    # A new run on the folder: rank 0 refuses, and rank 1 learns it and exits too (no hang at a barrier).
    again = subprocess.run([*torchrun, *cli_flags(data_dir, run_dir, max_steps=5, total_batch=2 * 4 * 32)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert again.returncode != 0
    assert (again.stdout + again.stderr).count(f"error: run folder {run_dir} already holds a run") == 2


def test_new_run_refuses_a_folder_that_holds_one(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, max_steps=2, checkpoint_every=0, val_every=0)
    first = training.train(cfg)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(training.ConfigError,
                       match=r"already holds a run \(up to ckpt_000002.pt.*--resume.*--overwrite"):
        training.train(cfg)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == before  # nothing touched
    with pytest.raises(training.ConfigError, match="pick one"):
        training.train(replace(cfg, overwrite=True, resume="latest"))
    history = training.train(replace(cfg, overwrite=True, max_steps=1, seed=7))  # starts over
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000001.pt"]
    rows = read_metrics(tmp_path / "metrics.jsonl", superseded=True)
    assert [r["step"] for r in rows] == [1] and rows[0]["loss"] == history[0]["loss"] != first[0]["loss"]
    assert json.loads((tmp_path / "train_config.json").read_text())["seed"] == 7


def test_resume_appends_metrics_and_redoes_lost_steps(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, max_steps=4, checkpoint_every=2, val_every=0, keep_checkpoints=5)
    first = training.train(cfg)
    (tmp_path / "ckpt_000004.pt").unlink()  # as if killed after step 4 was logged, before it was saved
    text_before = (tmp_path / "metrics.jsonl").read_text()
    again = training.train(replace(cfg, resume="latest"))
    assert (tmp_path / "metrics.jsonl").read_text().startswith(text_before)  # appended, never truncated
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", "train", superseded=True)] == [1, 2, 3, 4, 3, 4]
    effective = read_metrics(tmp_path / "metrics.jsonl", "train")
    assert [r["step"] for r in effective] == [1, 2, 3, 4]
    assert [r["loss"] for r in effective] == [r["loss"] for r in first[:2] + again]
    assert [r["loss"] for r in again] == [r["loss"] for r in first[2:]]  # bit-exact redo
    resumes = read_metrics(tmp_path / "metrics.jsonl", "resume")
    assert len(resumes) == 1 and resumes[0]["step"] == 2 and resumes[0]["checkpoint"].endswith("ckpt_000002.pt")


def test_resume_refuses_changed_settings_and_names_them(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, max_steps=2, checkpoint_every=0, val_every=0)
    training.train(cfg)
    saved_config = (tmp_path / "train_config.json").read_text()
    with pytest.raises(training.ConfigError, match=r"--seq-len \(32 in the checkpoint, 16 now\), "
                                               r"--micro-batch \(4 in the checkpoint, 2 now\), "
                                               r"--total-batch \(128 in the checkpoint, 32 now\)\. "
                                               r"A resumed run may change only --kernels, --data-dir, --max-steps, "
                                               r"--lr-decay-steps"):
        training.train(replace(cfg, resume="latest", max_steps=4, micro_batch=2, seq_len=16))
    with pytest.raises(training.ConfigError, match="holds another model: n_layer 2 \\(now 3\\)"):
        training.train(replace(cfg, resume="latest", max_steps=4, n_layer=3))
    with pytest.raises(training.ConfigError, match="is at step 2, and --max-steps is 2: nothing left"):
        training.train(replace(cfg, resume="latest"))
    save_checkpoint(tmp_path.parent / "other.pt", {"weights": torch.ones(2)})
    with pytest.raises(training.ConfigError, match="other.pt is not a training checkpoint .it lacks model, optimizer"):
        training.train(replace(cfg, resume=str(tmp_path.parent / "other.pt"), run_dir=str(tmp_path / "new")))
    assert (tmp_path / "train_config.json").read_text() == saved_config  # nothing rewritten
    history = training.train(replace(cfg, resume="latest", max_steps=3, val_every=3))  # allowed changes
    assert [r["step"] for r in history] == [3]
    assert read_metrics(tmp_path / "metrics.jsonl", "resume")[0]["changed"] == {
        "max_steps": [2, 3], "lr_decay_steps": [2, 3], "val_every": [0, 3]}


def test_resume_refuses_to_mix_two_runs(data_dir, tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    training.train(tiny_config(data_dir, a, max_steps=4, checkpoint_every=2, val_every=0))
    training.train(tiny_config(data_dir, b, max_steps=1, checkpoint_every=0, val_every=0))
    with pytest.raises(training.ConfigError, match="holds another run's history"):  # b's folder, a's checkpoint
        training.train(tiny_config(data_dir, b, max_steps=6, resume=str(a / "ckpt_000004.pt")))
    with pytest.raises(training.ConfigError, match="latest checkpoint: ckpt_000004.pt"):  # an older one of a's own
        training.train(tiny_config(data_dir, a, max_steps=6, resume=str(a / "ckpt_000002.pt")))
    history = training.train(tiny_config(data_dir, tmp_path / "fork", max_steps=5, val_every=0,
                                      resume=str(a / "ckpt_000002.pt")))  # a new folder may branch off
    assert [r["step"] for r in history] == [3, 4, 5]
    with pytest.raises(training.ConfigError, match="no ckpt_<step>.pt in .* start it over with --overwrite"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "metrics.jsonl").write_text("")
        training.train(tiny_config(data_dir, tmp_path / "c", resume="latest"))


def test_nonfinite_update_is_caught_before_it_is_saved(data_dir, tmp_path, monkeypatch):
    """Finite loss and grad norm, but the update itself makes a weight inf: it must not be saved."""
    real_step = torch.optim.AdamW.step
    calls = {"n": 0}

    def step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 6:
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = tiny_config(data_dir, tmp_path, max_steps=20, checkpoint_every=2, val_every=0)
    with pytest.raises(training.NonFiniteError, match=r"step 6: the update made the weights non-finite.*"
                                                   r"last good checkpoint: .*ckpt_000004.pt"):
        training.train(cfg)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000002.pt", "ckpt_000004.pt"]
    state = load_checkpoint(latest_checkpoint(tmp_path))
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_data_folder_of_another_dataset_is_refused_not_overwritten(data_dir, tmp_path):
    manifest = (data_dir / "manifest.json").read_bytes()
    with pytest.raises(training.ConfigError, match=r"holds 'synthetic' data, not 'pystdlib': pass --data synthetic"):
        training.train(tiny_config(data_dir, tmp_path, data="pystdlib"))
    assert (data_dir / "manifest.json").read_bytes() == manifest


def test_trains_on_an_llmc_shard_folder(tmp_path):
    rng = np.random.default_rng(0)
    llmc = tmp_path / "fineweb10B"
    llmc.mkdir()
    for name, n in (("fineweb_val_000000.bin", 2000), ("fineweb_train_000001.bin", 3000),
                    ("fineweb_train_000002.bin", 3000)):
        write_shard(llmc / name, rng.integers(0, 50256, n))  # llm.c's header and layout
    history = training.train(tiny_config(llmc, tmp_path / "run", data="fineweb-edu", max_steps=2, val_every=2,
                                      checkpoint_every=0))
    assert len(history) == 2 and sorted(p.name for p in llmc.iterdir()) == [
        "fineweb_train_000001.bin", "fineweb_train_000002.bin", "fineweb_val_000000.bin"]  # used as it is


BAD_FLAGS = [
    (["--total-batch", "-1024"], "--total-batch must be >= 1; got -1024"),
    (["--micro-batch", "0"], "--micro-batch must be >= 1; got 0"),
    (["--seq-len", "0"], "--seq-len must be >= 1; got 0"),
    (["--seq-len", "-8"], "--seq-len must be >= 1; got -8"),
    (["--val-steps", "0"], "--val-steps must be >= 1; got 0"),
    (["--max-steps", "0"], "--max-steps must be >= 1; got 0"),
    (["--max-lr", "nan"], "--max-lr must be a finite number; got nan"),
    (["--max-lr=-1e-3"], "--max-lr must be > 0; got -0.001"),
    (["--beta2", "1.0"], "--beta2 must be < 1; got 1.0"),
    (["--min-lr-ratio", "2"], "--min-lr-ratio must be <= 1; got 2.0"),
    (["--grad-clip", "0"], "--grad-clip must be > 0; got 0.0"),
    (["--keep-checkpoints", "0"], "--keep-checkpoints must be >= 1; got 0"),
    (["--warmup-steps", "-1"], "--warmup-steps must be >= 0; got -1"),
    (["--hellaswag-limit", "0"], "--hellaswag-limit must be >= 1; got 0"),
    (["--seed", "-3"], "--seed must be >= 0; got -3"),
    (["--peak-flops", "0"], "--peak-flops must be > 0; got 0.0"),
    (["--seq-len", "64"], "--seq-len 64 exceeds the model's block size 32"),
    (["--n-head", "3"], "n_embd (32) must be divisible by n_head (3)"),
    (["--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N; got 'tpu'"),
    (["--kernels", "attention=fast"], "op 'attention' must be 'torch' or 'triton'"),
    (["--resume", "nowhere.pt"], "--resume nowhere.pt: no such checkpoint file"),
    (["--total-batch", "100"], "--total-batch 100 must be a multiple of micro_batch x seq_len"),
    (["--run-dir", str(REPO / "train.py")], "train.py: not a folder"),
    (["--run-dir", str(REPO / "train.py" / "run")], f"train.py/run: {REPO / 'train.py'} is a file, not a folder"),
    (["--data-dir", str(REPO / "train.py" / "d")], f"train.py/d: {REPO / 'train.py'} is a file, not a folder"),
    (["--dist-timeout", "0"], "--dist-timeout must be > 0; got 0.0"),
]


@pytest.mark.parametrize("flags, message", BAD_FLAGS, ids=[" ".join(f).replace(str(REPO), "") for f, _ in BAD_FLAGS])
def test_bad_flags_are_one_line_errors_before_anything_is_written(tmp_path, flags, message):
    data_dir, run_dir = tmp_path / "data", tmp_path / "run"
    with pytest.raises(SystemExit) as excinfo:
        train_main(cli_flags(data_dir, run_dir) + flags)
    text = str(excinfo.value.code)
    assert text.startswith("error: ") and message in text and "\n" not in text
    assert not data_dir.exists() and not run_dir.exists()


def test_bad_flag_from_the_shell_exits_1_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "train.py", "--total-batch", "-1024", "--run-dir", str(tmp_path / "r")],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr == "error: --total-batch must be >= 1; got -1024\n"
    assert not (tmp_path / "r").exists()


def test_help_shows_what_each_flag_does():
    text = " ".join(training.build_parser().format_help().split())  # argparse wraps lines
    assert ("--micro-batch MICRO_BATCH sequences per forward pass, per process (>= 1; default 64; gpt2-774m: 32; "
            "gpt2-1558m: 16; demo: 8)") in text
    assert ("--max-lr MAX_LR peak learning rate (> 0; default 0.0006; gpt2-350m: 0.0003; gpt2-774m: 0.00025; "
            "demo: 0.003)") in text
    for f in fields(training.TrainConfig):
        assert f.metadata["help"].split(";")[0].split("(")[0].strip() in text, f.name


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only path")
def test_triton_on_cpu_without_interpreter_exits_clearly(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    data_dir = tmp_path / "never-prepared"
    with pytest.raises(SystemExit, match="TRITON_INTERPRET=1") as excinfo:
        train_main(["--preset", "demo", "--kernels", "attention=triton,layer_norm=torch",
                    "--data-dir", str(data_dir), "--run-dir", str(tmp_path / "run")])
    assert "Triton kernels (attention) need a CUDA GPU" in str(excinfo.value)  # names the triton ops only
    assert not data_dir.exists() and not (tmp_path / "run").exists()  # failed before any work


def test_kernels_auto_runs_triton_on_cuda_and_torch_on_cpu(monkeypatch):
    """The default on a GPU is our kernels (no preset turns them off); on a CPU torch (the interpreter is for
    tests, asked for with --kernels triton); --kernels torch is the opt-out. CUDA faked by its device type."""
    from gpt2_triton.training.config import PRESETS, kernel_choice, resolve_config
    assert training.TrainConfig().kernels == "auto" and not any("kernels" in p for p in PRESETS.values())
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = training.parse_config([])
    assert cfg.preset == "gpt2-124m" and cfg.kernels == "auto"
    assert kernel_choice(cfg, "cuda") == ("triton", {})
    assert resolve_config(cfg, torch.device("cuda"), 1).kernels == "triton"
    assert resolve_config(cfg, torch.device("cpu"), 1).kernels == "torch"
    assert kernel_choice(replace(cfg, kernels="torch"), "cuda") == ("torch", None)
    assert resolve_config(replace(cfg, kernels="torch"), torch.device("cuda"), 1).kernels == "torch"
    demo = training.make_config("demo", device="cpu")
    assert kernel_choice(demo, "cpu") == ("torch", {}) and kernel_choice(demo, "cuda") == ("triton", {})


def test_kernels_auto_falls_back_per_op_and_says_why(monkeypatch):
    from gpt2_triton.model import ops
    from gpt2_triton.training.config import kernel_choice
    from gpt2_triton.training.report import fallback_line, header_lines
    cfg = replace(training.make_config("demo", device="cpu"), n_head=16)  # head dim 128 / 16 = 8
    spec, fallbacks = kernel_choice(cfg, "cuda")
    assert fallbacks == {"attention": "head dim 8 is not one of (16, 32, 64, 128)"}
    assert spec == ("layer_norm=triton,attention=torch,gelu_mlp=triton,cross_entropy=triton,linear=triton,"
                    "embedding=triton")
    assert fallback_line(fallbacks) == ("kernels auto: torch for attention (head dim 8 is not one of "
                                        "(16, 32, 64, 128)), where Triton cannot run; Triton for the other ops")
    resolved = replace(cfg, kernels=spec, total_batch=1024, lr_decay_steps=200, run_dir="runs/demo")
    device_line = header_lines(resolved, 1, ops.resolve_kernels(spec), 1, 1, 10, kernels_auto=True)[4]
    assert device_line.endswith("| kernels layer_norm=triton, attention=torch, gelu_mlp=triton, "
                                "cross_entropy=triton, linear=triton, embedding=triton (auto)")
    assert header_lines(replace(resolved, kernels="triton"), 1, ops.resolve_kernels("triton"), 1, 1, 10,
                        kernels_auto=True)[4].endswith("| kernels triton (auto)")

    def no_gelu_mlp(op):
        if op == "gelu_mlp":
            raise ImportError("libtriton.so: cannot open shared object file")
        return {}
    monkeypatch.setattr(ops, "_load_triton", no_gelu_mlp)
    assert ops.auto_kernels(GPTConfig(), "cuda")[1] == {
        "gelu_mlp": "triton does not import (ImportError: libtriton.so: cannot open shared object file)"}


def test_kernels_auto_fallback_is_recorded_and_said_once(data_dir, tmp_path, monkeypatch, capsys):
    """A run whose Triton path is unusable on its GPU (faked: triton does not import, CUDA's choice on a CPU):
    every op runs torch, the one line says so, the header says auto, train_config.json and metrics.jsonl
    record the choice and the reasons."""
    from gpt2_triton.model import ops
    from gpt2_triton.training import config as config_module

    def no_triton(op):
        raise ImportError("no triton here")
    monkeypatch.setattr(ops, "_load_triton", no_triton)
    monkeypatch.setattr(config_module, "auto_kernels", lambda config, device_type: ops.auto_kernels(config, "cuda"))
    training.train(tiny_config(data_dir, tmp_path, max_steps=2, warmup_steps=1, val_every=0, checkpoint_every=0))
    lines = capsys.readouterr().out.splitlines()
    said = [line for line in lines if line.startswith("kernels auto:")]
    assert said == [f"kernels auto: torch for {', '.join(ops.OP_NAMES)} (triton does not import (ImportError: no "
                    f"triton here)), where Triton cannot run"]
    assert lines.index(said[0]) == 0 and lines[5].endswith("| kernels torch (auto)")
    assert json.loads((tmp_path / "train_config.json").read_text())["kernels"] == "torch"
    record = read_metrics(tmp_path / "metrics.jsonl", "kernels")[0]
    assert record["requested"] == "auto" and set(record["choice"].values()) == {"torch"}
    assert set(record["fallbacks"]) == set(ops.OP_NAMES)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_no_preset_names_the_device_flag_not_a_cuda_it_did_not_find(capsys):
    assert training.parse_config(["--device", "cuda"]).preset == "gpt2-124m"
    assert capsys.readouterr().out == "no --preset given: using 'gpt2-124m' (--device cuda)\n"
    training.parse_config([])
    assert capsys.readouterr().out == "no --preset given: using 'demo' (no CUDA)\n"


def test_a_prefix_of_a_flag_is_not_taken_for_it(capsys):
    with pytest.raises(SystemExit):
        training.parse_config(["--max-step", "5"])
    assert "unrecognized arguments: --max-step 5" in capsys.readouterr().err


def test_warmup_longer_than_the_run_is_warned_about_once(data_dir, tmp_path, capsys):
    from gpt2_triton.training.config import config_warnings
    assert config_warnings(tiny_config(data_dir, tmp_path, max_steps=30, warmup_steps=30)) == []
    training.train(tiny_config(data_dir, tmp_path, max_steps=2, warmup_steps=4, val_every=0, checkpoint_every=0))
    warned = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert warned == ["warning: --warmup-steps 4 exceeds --max-steps 2: the learning rate never reaches --max-lr "
                      "1.00e-02 (it ends at 5.00e-03, still warming up)"]


def test_config_file_overrides_the_preset_and_flags_override_it(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('preset = "demo"\nmicro_batch = 2\nmax-steps = 7\nmax_lr = 1\ncompile = false\n')
    cfg = training.parse_config(["--config", str(toml), "--max-steps", "9"])
    assert (cfg.preset, cfg.micro_batch, cfg.max_steps, cfg.max_lr, cfg.compile) == ("demo", 2, 9, 1, False)
    assert cfg.seq_len == 128  # the preset's, where the file says nothing
    for text, message in (("micro_batch = 2\nbatch = 3\n", r"'batch' is not a setting"),
                          ("micro_batch = \n", "not valid TOML"), ("micro_batch = -2\n", "--micro-batch must be >= 1")):
        toml.write_text(text)
        with pytest.raises(SystemExit, match=f"^error: .*{message}") as excinfo:
            train_main(["--config", str(toml), "--run-dir", str(tmp_path / "never")])
        assert "\n" not in str(excinfo.value.code) and not (tmp_path / "never").exists()
    with pytest.raises(SystemExit, match=r"^error: --config .*missing.toml: No such file"):
        train_main(["--config", str(tmp_path / "missing.toml")])


def test_a_runs_train_config_json_repeats_it(trained, tmp_path):
    run_dir, _, _ = trained
    saved = json.loads((run_dir / "train_config.json").read_text())
    again = training.parse_config(["--config", str(run_dir / "train_config.json"), "--run-dir", str(tmp_path)])
    assert {**saved, "run_dir": str(tmp_path)} == {f.name: getattr(again, f.name) for f in fields(again)}


def test_init_from_an_hf_folder_or_a_run_starts_a_new_run_from_its_weights(data_dir, tmp_path, capsys):
    """nanoGPT's init_from='gpt2', offline: a local save_pretrained folder (GPT-2's vocabulary, 1 layer) gives the
    model its shape and weights (a learning rate of 1e-12 leaves them as they were); the source is recorded; a
    run's folder is a source too, and the new run has its own folder and starts at step 1."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64))
    hf.save_pretrained(tmp_path / "hf")
    first = tiny_config(data_dir, tmp_path / "a", init=str(tmp_path / "hf"), max_steps=1, warmup_steps=1,
                        max_lr=1e-12, weight_decay=0, val_every=0, checkpoint_every=0)
    assert [r["step"] for r in training.train(first)] == [1]
    out = capsys.readouterr().out
    assert f"init: weights from {tmp_path / 'hf'}; a new run from step 1" in out
    assert "(1 layers, 2 heads, 32 wide, context 64)" in out.splitlines()[1]
    saved = json.loads((tmp_path / "a" / "train_config.json").read_text())
    assert saved["init"] == str(tmp_path / "hf") and (saved["n_layer"], saved["block_size"]) == (1, 64)
    record = read_metrics(tmp_path / "a" / "metrics.jsonl", "init")[0]
    assert record["source"] == str(tmp_path / "hf") and record["model_config"]["n_embd"] == 32
    state = load_checkpoint(latest_checkpoint(tmp_path / "a"))["model"]
    torch.testing.assert_close(state["transformer.wte.weight"][:50257], hf.transformer.wte.weight, atol=1e-9, rtol=0)
    torch.testing.assert_close(state["transformer.h.0.mlp.c_fc.weight"], hf.transformer.h[0].mlp.c_fc.weight.t(),
                               atol=1e-9, rtol=0)
    second = replace(first, init=str(tmp_path / "a"), run_dir=str(tmp_path / "b"), max_steps=2, max_lr=1e-2)
    assert [r["step"] for r in training.train(second)] == [1, 2]
    assert read_metrics(tmp_path / "b" / "metrics.jsonl", "init")[0]["source"] == str(tmp_path / "a")
    with pytest.raises(SystemExit, match=r"^error: --init .*nowhere: load_model: .*nowhere does not exist$"):
        train_main(["--init", str(tmp_path / "nowhere"), "--run-dir", str(tmp_path / "c")])
    assert not (tmp_path / "c").exists()


def test_larger_gpt2_presets_are_llm_c_recipes_that_resolve_on_8_gpus():
    from gpt2_triton.training.config import check_config, model_config_of, resolve_config
    expected = {  # llm.c run_gpt2_*.sh: model, -b, -d, -l, -q, -u, -x
        "gpt2-350m": ((24, 16, 1024), 64, 524288, 3e-4, 0.0, 700, 60000),
        "gpt2-774m": ((36, 20, 1280), 32, 524288, 2.5e-4, 0.0, 700, 286102),
        "gpt2-1558m": ((48, 25, 1600), 16, 1048576, 6e-4, 0.1, 700, 32000),
    }
    for preset, (shape, micro_batch, total, lr, final, warmup, steps) in expected.items():
        cfg = training.parse_config(["--preset", preset, "--device", "cpu"])
        check_config(cfg)
        m = model_config_of(cfg)
        assert (m.n_layer, m.n_head, m.n_embd, m.head_size, m.padded_vocab_size) == (*shape, 64, 50304)
        assert (cfg.micro_batch, cfg.seq_len, cfg.total_batch, cfg.max_lr, cfg.min_lr_ratio, cfg.warmup_steps,
                cfg.max_steps, cfg.weight_decay) == (micro_batch, 1024, total, lr, final, warmup, steps, 0.1)
        assert resolve_config(cfg, torch.device("cpu"), 8).total_batch == total  # whole micro-steps on 8 GPUs


def test_cli_overrides_preset_and_defaults():
    cfg = training.parse_config(["--preset", "gpt2-124m", "--micro-batch", "16", "--max-steps", "100",
                              "--no-compile", "--resume", "--kernels", "attention=triton"])
    assert cfg.preset == "gpt2-124m" and cfg.micro_batch == 16 and cfg.max_steps == 100
    assert cfg.compile is False and cfg.resume == "latest" and cfg.kernels == "attention=triton"
    assert (cfg.total_batch, cfg.max_lr, cfg.warmup_steps, cfg.data) == (524288, 6e-4, 715, "fineweb-edu")
    assert cfg.pad_vocab_to == 128 and (cfg.beta1, cfg.beta2, cfg.adam_eps) == (0.9, 0.95, 1e-8)
    assert training.parse_config(["--preset", "demo", "--resume", "runs/x/ckpt_000005.pt"]).resume.endswith("5.pt")
    default = training.parse_config([])
    assert default.preset == ("gpt2-124m" if torch.cuda.is_available() else "demo")
    with pytest.raises(SystemExit):
        training.parse_config(["--micro-batch", "many"])


def test_bad_total_batch_is_a_clear_error(data_dir, tmp_path):
    with pytest.raises(training.ConfigError, match="total-batch 100 must be a multiple of micro_batch x seq_len"):
        training.train(tiny_config(data_dir, tmp_path, total_batch=100))
    assert not any(tmp_path.iterdir())


def test_lr_schedule_and_mfu():
    lrs = [cosine_lr(s, 6e-4, 6e-5, 10, 100) for s in range(120)]
    assert lrs[0] == pytest.approx(6e-5) and lrs[9] == pytest.approx(6e-4)
    assert max(lrs) == pytest.approx(6e-4) and lrs[100] == lrs[119] == pytest.approx(6e-5)
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:]))  # non-increasing after warmup
    assert lrs[55] == pytest.approx((6e-4 + 6e-5) / 2)  # cosine midpoint
    assert device_peak_flops("cpu") is None and device_peak_flops("cpu", override=1e12) == 1e12
    assert mfu(1e9, 1e5, None) is None
    assert mfu(1e9, 1e5, 1e15, n_devices=2) == pytest.approx(0.05)


def test_metrics_log_survives_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    log.log("train", step=1, loss=5.0)
    with open(path, "a") as f:
        f.write('{"kind": "train", "step": 2, "lo')  # killed mid-write
    MetricsLog(path).log("resume", step=1, checkpoint="ckpt_000001.pt")
    MetricsLog(path).log("train", step=2, loss=4.0)
    assert [(r["kind"], r["step"]) for r in read_metrics(path)] == [("train", 1), ("resume", 1), ("train", 2)]
    assert path.read_text().count("\n") == 4  # the cut line was ended, not glued to the next record



def process_state(pid: int) -> str:
    """The state letter of /proc/<pid>/stat ("Z" once it has exited, "" once it is reaped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return ""


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the workers through /proc")
def test_a_frozen_ddp_rank_ends_the_run_within_dist_timeout(data_dir, tmp_path):
    """SIGSTOP on rank 1 of 2 (gloo): rank 0 gives up after --dist-timeout, says so in one line, and the last
    checkpoint stays good; rank 1, let go again, finds rank 0 gone and says so too. Gloo words rank 0's timeout
    as "Timed out waiting 3000ms" in a collective, or "Application timeout caused pair closure" when DDP's
    reducer meets it. The two ranks are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR, ...) but
    without its agent, whose teardown SIGTERM would race rank 1's own line on a loaded machine."""
    run_dir = tmp_path / "ddp"
    flags = cli_flags(data_dir, run_dir, max_steps=100000, checkpoint_every=2, val_every=0, total_batch=2 * 4 * 32,
                      dist_timeout=3)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port()),
           "WORLD_SIZE": "2"}
    ranks = [subprocess.Popen([sys.executable, "train.py", *flags], cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)})
             for r in range(2)]
    try:
        wait_for(lambda: len(train_steps(run_dir)) >= 3 and list_checkpoints(run_dir), ranks[0], what="3 DDP steps")
        os.kill(ranks[1].pid, signal.SIGSTOP)
        frozen_at = time.monotonic()
        try:
            wait_for(lambda: ranks[0].poll() is not None, ranks[1], timeout=60, what="rank 0 to give up")
            waited = time.monotonic() - frozen_at
        finally:
            os.kill(ranks[1].pid, signal.SIGCONT)
        outputs = [rank.communicate(timeout=120) for rank in ranks]
    finally:
        for rank in ranks:
            rank.kill()
    assert all(rank.returncode != 0 for rank in ranks) and 3 <= waited < 20, (waited, outputs[0][1][-3000:])
    for rank, causes in ((0, ("Timed out waiting 3000ms", "Application timeout caused pair closure")),
                         (1, ("Connection closed by peer",))):
        out, err = outputs[rank]
        said = [line for line in (out + err).splitlines() if line.startswith("error: rank")]
        assert len(said) == 1 and said[0].startswith(tuple(f"error: rank {rank}: a collective with the other "
                                                          f"processes failed ({cause}" for cause in causes)), \
            (rank, said, err[-3000:])
        assert "no answer within --dist-timeout 3 s) or died. Last good checkpoint: " in said[0]
    assert newest_verified_checkpoint(run_dir) == latest_checkpoint(run_dir)


def test_gloo_timeouts_and_lost_peers_are_collective_failures():
    from gpt2_triton.training.distributed import is_collective_failure
    for text in ("[../third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:81] Timed out waiting 3000ms for recv",
                 "Application timeout caused pair closure", "Connection closed by peer [127.0.0.1]:5000"):
        assert is_collective_failure(RuntimeError(text))
    assert not is_collective_failure(RuntimeError("CUDA out of memory")) and not is_collective_failure(ValueError())


def fresh_data(folder, **options):
    """The module's synthetic data, prepared into a folder of this test's own (to change or damage)."""
    return prepare_documents(synthetic_documents(), folder, source="synthetic", workers=0, verbose=False,
                             **{"shard_tokens": 1500, "val_every": 6, **options})


def test_resume_skips_a_changed_checkpoint_and_goes_on_from_the_newest_good_one(data_dir, tmp_path, capsys):
    """1024 weights of the newest checkpoint changed (finite values): a bare --resume says so, continues from
    the older good checkpoint and redoes the steps bit for bit; nothing good is pruned."""
    cfg = tiny_config(data_dir, tmp_path, max_steps=8, checkpoint_every=4, val_every=0)
    first = training.train(cfg)
    newest = checkpoint_path(tmp_path, 8)
    weight = load_checkpoint(newest)["model"]["transformer.h.0.mlp.c_fc.weight"]
    overwrite_tensor_bytes(newest, weight, (weight.reshape(-1)[:1024] * 1.5 + 0.01).numpy().tobytes())
    capsys.readouterr()
    again = training.train(replace(cfg, resume="latest"))
    out = capsys.readouterr().out
    assert "--resume: skipping ckpt_000008.pt: its contents do not match the checksum saved with it" in out
    assert "--resume: continuing from ckpt_000004.pt, the newest checkpoint that verifies" in out
    assert [r["loss"] for r in again] == [r["loss"] for r in first[4:]]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000004.pt", "ckpt_000008.pt"]
    assert checkpoint_problem(newest) is None  # step 8 saved again, whole


def test_a_corrupt_optimizer_state_is_never_the_last_good_checkpoint(data_dir, tmp_path, monkeypatch, capsys):
    """Random bytes in the newest checkpoint's optimizer state: the older checkpoint of the same run may be resumed
    by name, and a NaN stop then names only a file that verifies."""
    cfg = tiny_config(data_dir, tmp_path, max_steps=4, checkpoint_every=2, val_every=0)
    training.train(cfg)
    newest, older = checkpoint_path(tmp_path, 4), checkpoint_path(tmp_path, 2)
    exp_avg_sq = load_checkpoint(newest)["optimizer"]["state"][1]["exp_avg_sq"]
    overwrite_tensor_bytes(newest, exp_avg_sq, np.random.default_rng(0).bytes(4096))
    real_forward = GPT.forward

    def nan_forward(self, idx, targets=None, **kwargs):
        logits, loss = real_forward(self, idx, targets, **kwargs)
        return logits, (loss * float("nan") if self.training else loss)

    monkeypatch.setattr(GPT, "forward", nan_forward)
    with pytest.raises(training.NonFiniteError, match=r"step 3: loss is nan; stopped before the update; last good "
                                                      r"checkpoint: .*ckpt_000002.pt$"):
        training.train(replace(cfg, resume=str(older), max_steps=6))
    assert "--resume: skipping ckpt_000004.pt: its contents do not match the checksum" in capsys.readouterr().out
    monkeypatch.undo()
    assert [r["step"] for r in training.train(replace(cfg, resume="latest", max_steps=5))] == [3, 4, 5]


def test_resume_on_re_prepared_data_is_refused_and_names_it(tmp_path):
    data = fresh_data(tmp_path / "data")
    cfg = tiny_config(data, tmp_path / "run", max_steps=4, checkpoint_every=2, val_every=0)
    training.train(cfg)
    fresh_data(data, shard_tokens=700)  # the same source, other --shard-tokens: other tokens at each position
    with pytest.raises(training.ConfigError, match=rf"--resume: ckpt_000004.pt was trained on other data than {data} "
                                                   r"holds now \(then: train 7 shards, 9,650 tokens, val 2 shards, "
                                                   r"1,930 tokens; now: train 14 shards, .*; fingerprint \w+ vs \w+\)"):
        training.train(replace(cfg, resume="latest", max_steps=6))
    fresh_data(data)  # prepared again as before: the same fingerprint, the resume goes on
    assert [r["step"] for r in training.train(replace(cfg, resume="latest", max_steps=5))] == [5]


def damage_header(data):
    shard = data / gpt2_data.load_manifest(data)["splits"]["train"]["shards"][-1]["file"]
    raw = bytearray(shard.read_bytes())
    raw[0:4] = np.int32(7).tobytes()
    shard.write_bytes(bytes(raw))


def write_manifest(content):
    def damage(data):
        (data / "manifest.json").write_text(content)
    return damage


def point_outside(data):
    manifest = json.loads((data / "manifest.json").read_text())
    manifest["splits"]["train"]["shards"][0]["file"] = "../../secret.bin"
    (data / "manifest.json").write_text(json.dumps(manifest))


def another_datasets_shards(data):
    """Shards named like ours and a backup beside them, the manifest gone: not ours to prepare over."""
    (data / "manifest.json").unlink()
    write_shard(data / "train_backup.bin", np.arange(100))


@pytest.mark.parametrize("damage, message", [
    (damage_header, r"shard .*/train_\d{6}.bin: bad magic number 7 \(expected 20240520\)"),
    (write_manifest("[]"), r"manifest.json: not a manifest \(a JSON object with \"splits\"\)"),
    (write_manifest('{"format_version": 1}'), r"manifest.json: not a manifest"),
    (point_outside, r"train shard '../../secret.bin' is not a file name in .*; refusing a manifest that points "
                    r"outside"),
    (another_datasets_shards, r"holds files and no manifest.json, so it is not a data folder of ours "
                              r"\(train_000000.bin, train_000001.bin, train_000002.bin, ...\)"),
], ids=["bad-header", "manifest-list", "manifest-no-splits", "manifest-outside", "no-manifest"])
def test_bad_data_is_a_one_line_error_before_step_1(tmp_path, damage, message):
    data = fresh_data(tmp_path / "data")
    damage(data)
    before = {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()}
    with pytest.raises(SystemExit) as excinfo:
        train_main(cli_flags(data, tmp_path / "run", max_steps=3))
    text = str(excinfo.value.code)
    assert text.startswith("error: ") and re.search(message, text) and "\n" not in text, text
    assert not list_checkpoints(tmp_path / "run") and not (tmp_path / "run" / "metrics.jsonl").exists()
    assert {p.name: p.read_bytes() for p in data.iterdir() if p.is_file()} == before  # nothing prepared over it


def test_an_error_mid_run_saves_the_last_completed_step_first(tmp_path, capsys):
    """A token id >= the vocabulary in the second shard the run reads: found when the run reaches it; the step
    before is saved, the error is one line, and a resume redoes nothing twice."""
    data = fresh_data(tmp_path / "data")
    loader = gpt2_data.DataLoader(data, "train", 4, 32, seed=1337)
    second = loader.files[loader.shard_order(0)[1]]
    tokens = np.array(read_shard(second))
    tokens[-1] = 60000
    write_shard(second, tokens)
    with pytest.raises(SystemExit) as excinfo:
        train_main(cli_flags(data, tmp_path / "run", max_steps=30, checkpoint_every=0, val_every=0))
    text = str(excinfo.value.code)
    done = train_steps(tmp_path / "run")[-1]
    assert re.fullmatch(rf"error: shard {second}: token id 60000 >= vocab size 50257; not GPT-2 tokens \(prepare "
                        rf"the data again\) \(saved step {done} to .*ckpt_{done:06d}.pt; fix it and continue with "
                        rf"--resume\)", text), text
    assert 5 < done < 30 and [p.name for p in list_checkpoints(tmp_path / "run")] == [f"ckpt_{done:06d}.pt"]
    assert load_checkpoint(latest_checkpoint(tmp_path / "run"))["step"] == done


def test_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_previous_one(data_dir, tmp_path, monkeypatch):
    real_save = training.Trainer.save

    def save(self):
        if self.step == 4:
            disk_full(monkeypatch, room=10_000)
        return real_save(self)

    monkeypatch.setattr(training.Trainer, "save", save)
    with pytest.raises(SystemExit) as excinfo:
        train_main(cli_flags(data_dir, tmp_path, max_steps=6, checkpoint_every=2, val_every=0))
    assert re.fullmatch(rf"error: step 4: {tmp_path} is out of space: writing ckpt_000004.pt needs about [\d.]+ MB "
                        rf"\([\d.,]+ .B free\); free some space and try again; the previous checkpoints are intact "
                        rf"\(last good checkpoint: .*ckpt_000002.pt\)", str(excinfo.value.code)), excinfo.value.code
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".pt") or p.name.endswith(".tmp")] == [
        "ckpt_000002.pt"] and checkpoint_problem(tmp_path / "ckpt_000002.pt") is None


def test_a_val_split_smaller_than_a_batch_is_needed_only_to_validate(tmp_path):
    data = fresh_data(tmp_path / "data", val_every=1, val_tokens=250)  # val: the first document, < 8x32+1 tokens
    history = training.train(tiny_config(data, tmp_path / "run", micro_batch=8, max_steps=2, val_every=0,
                                         checkpoint_every=0))
    assert [r["step"] for r in history] == [1, 2]
    with pytest.raises(training.ConfigError, match="val split of .* fewer than one step needs"):
        training.train(tiny_config(data, tmp_path / "run2", micro_batch=8, max_steps=2, val_every=1))


def test_a_finished_run_survives_bytes_that_are_not_utf8_in_its_metrics(data_dir, tmp_path):
    cfg = tiny_config(data_dir, tmp_path, max_steps=2, checkpoint_every=0, val_every=0)
    training.train(cfg)
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"kind": "note", "text": "\xff\xfe"}\n\xff\n')  # an editor or a disk left these
    assert [r["step"] for r in training.train(replace(cfg, resume="latest", max_steps=3, plot=True))] == [3]
    assert (tmp_path / "loss.png").is_file()
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl", "train")] == [1, 2, 3]


def test_train_sweeps_what_a_killed_prepare_left(tmp_path, capsys):
    data = fresh_data(tmp_path / "data")
    (data / ".staging-abc123").mkdir()
    (data / ".staging-abc123" / "train_000000.bin").write_bytes(b"half a shard")
    training.train(tiny_config(data, tmp_path / "run", max_steps=1, val_every=0))
    assert [p.name for p in data.iterdir() if p.name.startswith(".")] == [".prepare.lock"]
    assert f"removed 1 staging folder(s)/temp file(s) left in {data} by killed prepares" in capsys.readouterr().out


def test_sigterm_during_auto_prepare_removes_its_staging_folder(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(3):
        (corpus / f"{i}.txt").write_text(f"document {i} " * 50)
    data = tmp_path / "data"
    code = ("import runpy, time\n"
            "from gpt2_triton.data import pipeline\n"
            "real = pipeline.tokenize_document\n"
            "def slow(text):\n"
            "    print('tokenizing', flush=True); time.sleep(60); return real(text)\n"
            "pipeline.tokenize_document = slow\n"
            f"runpy.run_path('train.py')['main']({cli_flags(data, tmp_path / 'run', data=f'text:{corpus}')!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: any(p.name.startswith(".staging-") for p in data.iterdir()) if data.is_dir() else False,
                 proc, what="the staging folder")
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143, err[-2000:]
    assert [p.name for p in data.iterdir()] == [".prepare.lock"]


def test_unwritable_folders_are_one_line_errors_and_prepared_read_only_data_trains(data_dir, tmp_path):
    """--run-dir, --data-dir, prepare --out and export --out in a folder this process cannot write: each a one-line
    error before any work. A prepared data folder that is read-only is fine to train on."""
    ro = tmp_path / "ro"
    (ro / "empty").mkdir(parents=True)
    shutil.copytree(data_dir, ro / "prepared")
    save_checkpoint(tmp_path / "model.pt", {"model": GPT(GPTConfig.from_preset("tiny")).state_dict(),
                                            "model_config": GPTConfig.from_preset("tiny").to_dict()})
    w = tmp_path / "writable"
    cases = [
        ("run-dir", "train", cli_flags(data_dir, ro / "run", max_steps=1)),
        ("data-dir", "train", cli_flags(ro / "empty", w / "run1", max_steps=1)),
        ("prepare", "prepare", ["prepare", "pystdlib", "--out", str(ro / "prep")]),
        ("export", "export", ["--init", str(tmp_path / "model.pt"), "--out", str(ro / "hf")]),
        ("read-only data", "train", cli_flags(ro / "prepared", w / "run2", max_steps=1, val_every=0)),
    ]
    code = ("import json, runpy\n"
            "from gpt2_triton import data, export\n"
            "mains = {'train': runpy.run_path('train.py')['main'], 'prepare': data.main, 'export': export.main}\n"
            f"for name, tool, args in {cases!r}:\n"
            "    try:\n"
            "        mains[tool](args); code = 0\n"
            "    except SystemExit as e:\n"
            "        code = e.code\n"
            "    print('RESULT', json.dumps([name, code]), flush=True)\n")
    proc = run_where_unwritable(ro, code, cwd=REPO)
    results = dict(json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    denied = ": permission denied or a read-only file system"
    assert results == {
        "run-dir": f"error: --run-dir {ro / 'run'}: cannot be created in {ro}{denied}",
        "data-dir": f"error: data synthetic: prepare: output folder {ro / 'empty'}: not writable{denied}",
        "prepare": f"error: prepare: output folder {ro / 'prep'}: cannot be created in {ro}{denied}",
        "export": f"error: save_pretrained: --out {ro / 'hf'}: cannot be created in {ro}{denied}",
        "read-only data": 0,
    }, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(p.name for p in ro.iterdir()) == ["empty", "prepared"] and not list((ro / "empty").iterdir())



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def children(parent_pid: int) -> list[int]:
    """The pids whose parent is parent_pid, from /proc."""
    found = []
    for entry in Path("/proc").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):
            if entry.name.isdigit() and int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1]) == parent_pid:
                found.append(int(entry.name))
    return found


def two_nodes(script, flags, rdzv_id):
    """`torchrun --nnodes 2` twice on this machine, one process per "node", meeting through c10d rendezvous."""
    port = free_port()
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes=2", "--nproc_per_node=1",
                "--rdzv_backend=c10d", f"--rdzv_endpoint=127.0.0.1:{port}", f"--rdzv_id={rdzv_id}"]
    return [subprocess.Popen([*torchrun, str(script), *flags], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}) for _ in range(2)]


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds torchrun's workers through /proc")
@pytest.mark.parametrize("shard,killed", [("none", "every process"), ("full", "every process"), ("none", "rank 1"),
                                          ("optimizer", "rank 1"), ("full", "rank 1")])
def test_two_nodes_train_checkpoint_are_killed_and_resume_exactly(data_dir, tmp_path, shard, killed):
    """Two "nodes" on localhost (c10d rendezvous, gloo): they train and checkpoint (one file under DDP and ZeRO-1, a
    sharded folder under FSDP2), then are killed -9 one step after a checkpoint: every process at once (power loss),
    or rank 1's worker alone while rank 0 waits for it in step 6's collectives, which then fail on rank 0 in one
    line and end both nodes. The resumed run redoes step 5 bit for bit, then goes on."""
    run_dir = tmp_path / "run"
    flags = cli_flags(data_dir, run_dir, max_steps=100000, checkpoint_every=4, val_every=0, total_batch=2 * 4 * 32,
                      shard=shard)
    held = "True" if killed == "every process" else "self.ctx.rank == 1"
    hold = tmp_path / "hold_after_step_5.py"  # train.py, but the held ranks stop moving after step 5
    hold.write_text("import runpy, sys, time\n"
                    "from gpt2_triton import training\n"
                    "real_after_step = training.Trainer.after_step\n"
                    "def after_step(self):\n"
                    "    real_after_step(self)\n"
                    f"    if self.step == 5 and {held}:\n"
                    "        time.sleep(600)\n"
                    "training.Trainer.after_step = after_step\n"
                    f"sys.argv[0] = {str(REPO / 'train.py')!r}\n"
                    "runpy.run_path(sys.argv[0], run_name='__main__')\n")
    nodes = two_nodes(hold, flags, f"killed-{shard}")
    try:
        wait_for(lambda: train_steps(run_dir)[-1:] == [5], nodes[0], what="step 5 on two nodes")
        if killed == "rank 1":
            os.kill(find_worker(*(node.pid for node in nodes), rank=1), signal.SIGKILL)
            outputs = [node.communicate(timeout=120) for node in nodes]  # no hang: rank 0 fails, both nodes end
    finally:
        for pid in [pid for node in nodes for pid in (node.pid, *children(node.pid))]:  # torchrun's worker and
            with contextlib.suppress(ProcessLookupError):                               # itself: power loss
                os.kill(pid, signal.SIGKILL)
        for node in nodes:
            node.communicate(timeout=60)
    checkpoint = run_dir / ("ckpt_000004." + ("dcp" if shard == "full" else "pt"))
    if killed == "rank 1":
        assert all(node.returncode != 0 for node in nodes)
        said = [line for out, err in outputs for line in (out + err).splitlines() if line.startswith("error: rank")]
        assert len(said) == 1 and said[0].startswith("error: rank 0: a collective with the other processes failed ("), \
            [err[-3000:] for _, err in outputs]
        assert said[0].endswith(f"Last good checkpoint: {checkpoint}; continue with --resume")
    assert latest_checkpoint(run_dir) == checkpoint
    state = load_checkpoint(checkpoint)
    assert state["step"] == 4 and state["world_size"] == 2 and len(state["loader"]) == 2
    lost = read_metrics(run_dir / "metrics.jsonl", "train")[-1]
    resumed = two_nodes(REPO / "train.py", cli_flags(data_dir, run_dir, max_steps=6, checkpoint_every=4, val_every=0,
                                                     total_batch=2 * 4 * 32, resume=True, shard=shard),
                        f"resumed-{shard}")
    outputs = [node.communicate(timeout=300) for node in resumed]
    assert [node.returncode for node in resumed] == [0, 0], outputs[0][1][-3000:] + outputs[1][1][-3000:]
    rows = read_metrics(run_dir / "metrics.jsonl", "train")
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert rows[4]["step"] == 5 and rows[4]["loss"] == lost["loss"] and rows[4]["grad_norm"] == lost["grad_norm"]
    assert load_checkpoint(latest_checkpoint(run_dir))["step"] == 6


def test_an_error_in_evaluation_saves_the_step_it_came_after(data_dir, tmp_path, monkeypatch, capsys):
    real_validate = training.Trainer.validate

    def validate(self):
        if self.step == 3:
            raise RuntimeError("evaluation broke")
        return real_validate(self)

    monkeypatch.setattr(training.Trainer, "validate", validate)
    with pytest.raises(RuntimeError, match="evaluation broke"):  # not ours to explain: the traceback stays
        training.train(tiny_config(data_dir, tmp_path, max_steps=10, val_every=3, checkpoint_every=0))
    assert f"error after step 3 (saved step 3 to {checkpoint_path(tmp_path, 3)}" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt_000003.pt"]
    monkeypatch.undo()
    assert [r["step"] for r in training.train(tiny_config(data_dir, tmp_path, max_steps=4, val_every=3,
                                                          checkpoint_every=0, resume="latest"))] == [4]


def test_every_field_declares_its_resume_policy():
    """What --resume does with each TrainConfig field is declared on the field, next to its help and bounds."""
    from dataclasses import fields

    from gpt2_triton.training.config import RESUME_POLICIES, TrainConfig, fields_resumed, opt
    policies = {f.name: f.metadata.get("resume") for f in fields(TrainConfig)}
    assert all(p in RESUME_POLICIES for p in policies.values()), {k: p for k, p in policies.items()
                                                                   if p not in RESUME_POLICIES}
    assert fields_resumed("model")[0] == "model" and "n_layer" in fields_resumed("model")
    assert {"max_steps", "kernels", "log_to", "sample_prompt"} <= set(fields_resumed("may_change"))
    assert {"max_lr", "seed", "micro_batch", "init"} <= set(fields_resumed("fixed"))
    assert {"preset", "run_dir", "resume", "overwrite"} == set(fields_resumed("ignored"))
    with pytest.raises(ValueError, match="resume must be one of model, fixed, may_change, ignored; got 'maybe'"):
        opt(1, "a field", resume="maybe")


def test_resume_problems():
    from gpt2_triton.training.config import resume_problems
    saved = {"max_lr": 6e-4, "max_steps": 10, "seed": 1, "run_dir": "a", "n_layer": 2, "removed_since": 3}
    assert resume_problems(saved, {**saved, "max_steps": 20, "run_dir": "b", "added_since": 1}) == (
        None, {"max_steps": (10, 20)})
    problem, _ = resume_problems(saved, {**saved, "max_lr": 1e-3, "seed": 2}, "ckpt_000010.pt")
    assert problem.startswith("this run differs from ckpt_000010.pt in --max-lr (0.0006 in the checkpoint, 0.001 "
                              "now), --seed (1 in the checkpoint, 2 now). A resumed run may change only --kernels")
