"""gpt2_triton.atomic: files get the umask's mode, stale temps are swept, a folder lock dies with its process."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from gpt2_triton.atomic import FolderLock, atomic_write, remove_stale_temps
from gpt2_triton.checkpoint import save_checkpoint
from gpt2_triton.data import prepare_documents, write_shard

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_written_files_follow_the_umask(tmp_path, umask_022):
    """Shards, manifests and checkpoints are 0644 under umask 022, like any file (mkstemp's 0600 is not)."""
    write_shard(tmp_path / "s.bin", np.arange(10))
    save_checkpoint(tmp_path / "ckpt_000001.pt", {"step": 1, "w": torch.ones(2)})
    out = prepare_documents(["a b c", "d e f", "g h"], tmp_path / "data", val_every=2, workers=1, verbose=False)
    paths = [tmp_path / "s.bin", tmp_path / "ckpt_000001.pt", out / "manifest.json", *out.glob("*.bin")]
    assert {oct(p.stat().st_mode & 0o777) for p in paths} == {oct(0o644)}
    os.umask(0o077)
    with atomic_write(tmp_path / "private.txt", "w") as f:
        f.write("x")
    assert (tmp_path / "private.txt").stat().st_mode & 0o777 == 0o600


def test_remove_stale_temps_only_takes_atomic_write_temps(tmp_path):
    with atomic_write(tmp_path / "kept.json", "w") as f:
        f.write("{}")
    stale = [tmp_path / ".ckpt_000009.pt.0123abcd.tmp", tmp_path / ".train_000001.bin.deadbeef.tmp"]
    others = [tmp_path / "ckpt_000001.pt", tmp_path / ".lock", tmp_path / "notes.tmp", tmp_path / ".x.tmp"]
    for p in stale + others:
        p.write_bytes(b"x")
    assert sorted(remove_stale_temps(tmp_path)) == sorted(stale)
    assert all(p.exists() for p in others) and not any(p.exists() for p in stale)
    assert remove_stale_temps(tmp_path / "missing") == []


def test_folder_lock_excludes_others_and_dies_with_its_process(tmp_path):
    path = tmp_path / ".lock"
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from gpt2_triton.atomic import FolderLock; lock = FolderLock(sys.argv[1]); "
                               "assert lock.acquire(); print('locked', flush=True); sys.stdin.read()", str(path)],
        cwd=REPO, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        lock = FolderLock(path)
        assert not lock.acquire() and not lock.held
        assert f"pid {holder.pid} on" in lock.owner()
        holder.kill()  # SIGKILL: no cleanup runs, the kernel drops the flock
        holder.wait(timeout=30)
        assert lock.acquire() and lock.held and f"pid {os.getpid()} on" in lock.owner()
        assert not FolderLock(path).acquire()  # a second open file in this process is refused too
        lock.release()
        with FolderLock(path) as again:
            assert again.held
    finally:
        holder.kill()
