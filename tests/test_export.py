"""gpt2_triton.export.save_pretrained / python -m gpt2_triton.export: a folder transformers loads with equal
logits and loss; it never deletes what is not an earlier export, sweeps what killed exports left, and every
failure is one line."""
import io
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gpt2_triton import GPT, GPTConfig, export
from gpt2_triton.atomic import DirLock, FolderLock
from gpt2_triton.checkpoint import save_checkpoint
from gpt2_triton.export import save_pretrained
from gpt2_triton.hf import from_pretrained
from tests.helpers import disk_full

transformers = pytest.importorskip("transformers")
ROOT = Path(__file__).resolve().parent.parent
CONFIG = GPTConfig.from_preset("tiny", vocab_size=97, block_size=24, n_embd=32, n_head=2, n_layer=2,
                               pad_vocab_to=64)


def make_model(seed=0):
    torch.manual_seed(seed)
    return GPT(CONFIG).eval()


def test_transformers_loads_export_with_equal_logits_and_loss(tmp_path):
    model = make_model()
    out = save_pretrained(model, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "generation_config.json", "model.safetensors"]
    assert json.loads((out / "generation_config.json").read_text()) == {}  # a 97-token vocabulary has no EOT
    config = json.loads((out / "config.json").read_text())
    assert config["vocab_size"] == 97 and config["n_positions"] == 24 and config["model_type"] == "gpt2"
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    assert hf.transformer.wte.weight.shape == (97, 32)  # padded rows dropped
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied
    idx = torch.randint(0, 97, (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        hf_out = hf(idx, labels=idx)
        logits = model(idx)
        _, loss = model(idx[:, :-1], idx[:, 1:])
    torch.testing.assert_close(hf_out.logits, logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(hf_out.loss, loss, atol=1e-6, rtol=1e-6)
    back = from_pretrained(str(out)).eval()  # and our own loader reads it back
    with torch.no_grad():
        torch.testing.assert_close(back(idx), logits, atol=0, rtol=0)


def test_an_export_with_gpt2s_vocabulary_is_a_complete_hf_model_folder(tmp_path):
    """Tokenizer and generation config: AutoTokenizer gives GPT-2's ids, and the text-generation pipeline on the
    folder adds new tokens (greedy: the tokens our model's own generate picks)."""
    from gpt2_triton.tokenizer import get_encoding
    torch.manual_seed(0)
    model = GPT(GPTConfig.from_preset("tiny", vocab_size=50257, pad_vocab_to=64)).eval()
    out = save_pretrained(model, tmp_path / "hf")
    assert sorted(p.name for p in out.iterdir()) == sorted(export.EXPORT_FILES)
    assert json.loads((out / "generation_config.json").read_text()) == {
        "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256}
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    ids = tokenizer("Hello world")["input_ids"]
    assert ids == get_encoding().encode("Hello world") == [15496, 995]
    assert tokenizer.decode(ids) == "Hello world" and len(tokenizer) == 50257
    assert tokenizer.eos_token_id == 50256 and tokenizer.model_max_length == 64
    generator = transformers.pipeline("text-generation", model=str(out), device="cpu")
    text = generator("Hello world", max_new_tokens=5, do_sample=False)[0]["generated_text"]
    expected = model.generate(torch.tensor([ids]), 5, temperature=0)[0].tolist()
    assert text.startswith("Hello world") and len(tokenizer(text)["input_ids"]) > len(ids)
    assert text == get_encoding().decode(expected)
    reexported = save_pretrained(from_pretrained(str(out)), tmp_path / "again")  # our loader reads it back
    assert sorted(p.name for p in reexported.iterdir()) == sorted(export.EXPORT_FILES)


def test_safetensors_file_matches_the_format():
    safetensors_torch = pytest.importorskip("safetensors.torch")
    model = make_model()
    tensors = export.hf_state_dict(model, torch.bfloat16)
    buf = io.BytesIO()
    export.write_safetensors(buf, tensors)
    loaded = safetensors_torch.load(buf.getvalue())
    assert loaded.keys() == tensors.keys() and "lm_head.weight" not in loaded
    for name, t in tensors.items():
        assert loaded[name].dtype == torch.bfloat16 and torch.equal(loaded[name], t), name
    fc = model.transformer.h[1].mlp.c_fc.weight  # nn.Linear (out, in) -> Conv1D (in, out)
    assert torch.equal(loaded["transformer.h.1.mlp.c_fc.weight"], fc.t().to(torch.bfloat16))


def test_refuses_non_empty_dir_and_overwrites_when_asked(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    save_pretrained(make_model(0), out)  # an empty folder is fine
    with pytest.raises(FileExistsError, match="not empty"):
        save_pretrained(make_model(1), out)
    save_pretrained(make_model(1), out, overwrite=True)
    hf = transformers.GPT2LMHeadModel.from_pretrained(out)
    torch.testing.assert_close(hf.transformer.wpe.weight, make_model(1).transformer.wpe.weight)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temp or old folders left


def test_failed_export_leaves_previous_folder_intact(tmp_path, monkeypatch):
    out = save_pretrained(make_model(0), tmp_path / "hf")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def fail(f, tensors):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(export, "write_safetensors", fail)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(make_model(1), out, overwrite=True)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(make_model(1), tmp_path / "new")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_cli_exports_a_run_folder_without_transformers(tmp_path):
    model = make_model(2)
    run = tmp_path / "run"
    save_checkpoint(run / "ckpt_000010.pt", {"model": model.state_dict(), "model_config": CONFIG.to_dict(),
                                             "kernels": "torch"})
    out = tmp_path / "hf"
    code = ("import sys; sys.modules['transformers'] = None\n"  # importing transformers now fails
            "from gpt2_triton.export import main\n"
            f"main(['--init', {str(run)!r}, '--out', {str(out)!r}])\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "wrote" in result.stdout
    hf = transformers.GPT2LMHeadModel.from_pretrained(out).eval()
    idx = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(hf(idx).logits, model(idx), atol=1e-5, rtol=1e-5)
    with pytest.raises(SystemExit, match=r"^error: save_pretrained: .* is not empty; pass overwrite"):
        export.main(["--init", str(run), "--out", str(out)])


def folder_bytes(folder):
    return {p.name: p.read_bytes() for p in Path(folder).iterdir() if p.is_file()}


def make_run(run):
    """A run folder as train.py leaves it: a checkpoint, its config and metrics, the lock file."""
    save_checkpoint(run / "ckpt_000010.pt", {"model": make_model(2).state_dict(), "model_config": CONFIG.to_dict(),
                                             "kernels": "torch"})
    (run / "train_config.json").write_text("{}")
    (run / "metrics.jsonl").write_text('{"kind": "train", "step": 1, "loss": 5.0}\n')
    (run / ".lock").write_text("pid 1 on host\n")
    return run


def test_export_never_replaces_a_run_folder_or_its_source(tmp_path):
    run = make_run(tmp_path / "run")
    before = folder_bytes(run)
    for out, message in ((run, "is or contains the --init source"),
                         (tmp_path, "is or contains the --init source")):
        with pytest.raises(SystemExit, match=f"^error: save_pretrained: --out {out} {message}"):
            export.main(["--init", str(run), "--out", str(out), "--overwrite"])
    other = make_run(tmp_path / "other")  # another run's folder, not the source
    with pytest.raises(SystemExit, match=r"--overwrite replaces only an earlier export \(config.json, "
                                         r"generation_config.json, model.safetensors, vocab.json, merges.txt, "
                                         r"tokenizer_config.json\), but .*other also holds .lock, ckpt_000010.pt, "
                                         r"metrics.jsonl, train_config.json \(a run folder\); export into another"):
        export.main(["--init", str(run / "ckpt_000010.pt"), "--out", str(other), "--overwrite"])
    assert folder_bytes(run) == before and folder_bytes(other) == before


def test_export_never_replaces_a_live_run_folder(tmp_path):
    live = tmp_path / "live"
    lock = FolderLock(live / ".lock")  # what a running train.py holds
    assert lock.acquire()
    try:
        with pytest.raises(ValueError, match=r"also holds .lock \(a run folder\)"):
            save_pretrained(make_model(), live, overwrite=True)
        assert [p.name for p in live.iterdir()] == [".lock"]
    finally:
        lock.release()


def test_overwrite_refuses_a_folder_with_anything_but_an_export(tmp_path):
    out = save_pretrained(make_model(0), tmp_path / "hf")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="also holds notes.txt; export into another folder"):
        save_pretrained(make_model(1), out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine" and len(list(out.iterdir())) == 4


def test_export_sweeps_temp_folders_that_killed_exports_left(tmp_path):
    set_aside = save_pretrained(make_model(3), tmp_path / "gone")  # a replaced export whose kill came too early
    set_aside.rename(tmp_path / ".gone.44444444.old")
    stale = tmp_path / ".hf.0123abcd.tmp"  # a killed export's half-written folder
    stale.mkdir()
    (stale / "config.json").write_text("{}")
    (stale / ".model.safetensors.89abcdef.tmp").write_bytes(b"half")
    live = tmp_path / ".hf.11111111.tmp"  # another export, still writing
    live.mkdir()
    mine = tmp_path / ".hf.22222222.tmp"  # not an export's: a user's file inside
    mine.mkdir()
    (mine / "diary.txt").write_text("keep")
    other_export = tmp_path / ".other.33333333.tmp"  # another name's stale export in the same place
    other_export.mkdir()
    holder = DirLock(live)
    assert holder.acquire()
    try:
        save_pretrained(make_model(), tmp_path / "hf")
    finally:
        holder.release()
    assert sorted(p.name for p in tmp_path.iterdir()) == [".hf.11111111.tmp", ".hf.22222222.tmp", "gone", "hf"]
    assert (mine / "diary.txt").read_text() == "keep"
    torch.testing.assert_close(from_pretrained(str(tmp_path / "gone")).transformer.wpe.weight,
                               make_model(3).transformer.wpe.weight)  # put back where it was


def test_sigterm_during_export_removes_its_temp_folder(tmp_path):
    run = make_run(tmp_path / "run")
    code = ("import os, sys, time\n"
            "from gpt2_triton import export\n"
            "def slow(f, tensors):\n"
            "    f.write(b'partial'); f.flush(); print('writing', flush=True); time.sleep(60)\n"
            "export.write_safetensors = slow\n"
            f"export.main(['--init', {str(run)!r}, '--out', {str(tmp_path / 'hf')!r}])\n")
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        assert proc.stdout.readline() == "writing\n"
        assert any(p.name.startswith(".hf.") for p in tmp_path.iterdir())
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 143
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_full_disk_during_export_is_one_line_and_keeps_the_previous_export(tmp_path, monkeypatch):
    run = make_run(tmp_path / "run")
    out = save_pretrained(make_model(0), tmp_path / "hf")
    before = folder_bytes(out)
    disk_full(monkeypatch, room=4096)
    with pytest.raises(SystemExit, match=r"^error: .*/.hf.[0-9a-f]{8}.tmp is out of space: writing "
                                         r"model.safetensors needs about [\d.]+ kB \(.* free\); free some space"):
        export.main(["--init", str(run), "--out", str(out), "--overwrite"])
    monkeypatch.undo()
    assert folder_bytes(out) == before and sorted(p.name for p in tmp_path.iterdir()) == ["hf", "run"]


def test_out_under_a_file_and_corrupt_init_are_one_line_errors(tmp_path):
    run = make_run(tmp_path / "run")
    (tmp_path / "file").write_text("x")
    with pytest.raises(SystemExit, match=rf"^error: save_pretrained: --out {tmp_path}/file/hf: {tmp_path}/file is a "
                                         rf"file, not a folder$"):
        export.main(["--init", str(run), "--out", str(tmp_path / "file" / "hf")])
    (run / "ckpt_000010.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(SystemExit, match=r"^error: load_model: no checkpoint in .*run verifies: checkpoint "
                                         r".*ckpt_000010.pt is corrupt or not a checkpoint") as excinfo:
        export.main(["--init", str(run), "--out", str(tmp_path / "hf")])
    assert "\n" not in str(excinfo.value.code) and not (tmp_path / "hf").exists()
