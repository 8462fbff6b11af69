"""One comparison helper for every test: failures name the max abs error and the relative RMS error."""
import pytest
import torch


def error_stats(actual: torch.Tensor, expected: torch.Tensor):
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    diff = a - e
    max_abs = diff.abs().max().item() if diff.numel() else 0.0
    rel_rms = (diff.pow(2).mean().sqrt() / e.pow(2).mean().sqrt().clamp(min=1e-30)).item() if diff.numel() else 0.0
    return max_abs, rel_rms


def assert_close(actual, expected, atol=1e-5, rtol=1e-5, name="tensor"):
    """torch.testing.assert_close with a message that gives max abs and relative RMS error."""
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    max_abs, rel_rms = error_stats(actual, expected)
    torch.testing.assert_close(
        actual.detach().double().cpu(), expected.detach().double().cpu(), atol=atol, rtol=rtol,
        msg=lambda m: f"{name}: max abs err {max_abs:.3e}, rel RMS err {rel_rms:.3e}\n{m}")


def assert_close_to_ref(ours, torch_same_dtype, ref_fp32, factor=2.0, atol=1e-5, name="tensor"):
    """Low-precision rule: our error vs the fp32 reference is at most `factor`x PyTorch's own
    error in the same dtype, plus atol (max-abs and RMS both checked)."""
    assert ours.shape == ref_fp32.shape, f"{name}: shape {tuple(ours.shape)} != {tuple(ref_fp32.shape)}"
    ours_max, ours_rms = error_stats(ours, ref_fp32)
    torch_max, torch_rms = error_stats(torch_same_dtype, ref_fp32)
    msg = (f"{name}: ours max abs {ours_max:.3e} / rel RMS {ours_rms:.3e}; "
           f"PyTorch same dtype max abs {torch_max:.3e} / rel RMS {torch_rms:.3e}")
    assert ours_max <= factor * torch_max + atol, msg
    assert ours_rms <= factor * torch_rms + atol, msg


def require_sm90_compiler():
    """Skip the calling test module unless triton's NVIDIA backend and its ptxas are installed: they
    compile kernels for sm_90 without a GPU. Returns the triton module."""
    triton = pytest.importorskip("triton", reason="triton is not installed")
    pytest.importorskip("triton.backends.nvidia.compiler",
                        reason="triton's NVIDIA backend is not available: cannot compile for sm_90")
    from gpt2_triton.bench.static.native import ptxas_path
    if ptxas_path() is None:
        pytest.skip("ptxas (bundled with triton's NVIDIA backend) not found: cannot compile for sm_90",
                    allow_module_level=True)
    return triton


def overwrite_tensor_bytes(path, tensor, data: bytes) -> None:
    """Overwrite the start of `tensor`'s bytes inside the saved file `path` with `data`, as a disk or a
    careless tool would (torch's zip reader does not notice: tensors are stored uncompressed)."""
    from pathlib import Path
    raw = bytearray(Path(path).read_bytes())
    needle = tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
    at = raw.find(needle)
    assert at >= 0 and raw.find(needle, at + 1) < 0, "the tensor's bytes must occur once in the file"
    raw[at:at + len(data)] = data
    Path(path).write_bytes(bytes(raw))


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes were written, as on a full disk."""

    def __init__(self, f, room: int):
        self._f, self._room = f, room

    def write(self, data):
        import errno
        if len(data) > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= len(data)
        return self._f.write(data)

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()
        return False


def disk_full(monkeypatch, room: int = 0):
    """From now on every file gpt2_triton.atomic.atomic_write writes fails with ENOSPC after `room` bytes."""
    import os

    from gpt2_triton import atomic
    real_fdopen = os.fdopen

    def fdopen(fd, mode="r", *args, **kwargs):
        return _FullDisk(real_fdopen(fd, mode, *args, **kwargs), room)

    monkeypatch.setattr(atomic.os, "fdopen", fdopen)


def run_where_unwritable(folder, code: str, cwd, timeout: float = 300):
    """Run `python -c code` in a process that cannot write `folder` (which exists): for a normal user the
    folder loses its write bits; root, whom permission bits do not stop, runs it in a private mount
    namespace where `folder` is bind-mounted read-only (unshare). Skips where neither is possible."""
    import os
    import shutil
    import subprocess
    import sys
    if os.geteuid() != 0:
        os.chmod(folder, 0o555)
        try:
            return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                                  timeout=timeout)
        finally:
            os.chmod(folder, 0o755)
    mount = ["unshare", "-rm", "sh", "-c", 'mount --bind -o ro "$1" "$1" && shift && exec "$@"', "sh", str(folder)]
    probe = subprocess.run([*mount, "true"], capture_output=True, text=True) if shutil.which("unshare") else None
    if probe is None or probe.returncode != 0:
        pytest.skip("running as root, and no read-only bind mount is possible here (unshare -rm)")
    return subprocess.run([*mount, sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


def saved_bytes(fn, *args, leaves=(), amp=False):
    """(fn(*args), bytes of the distinct storages autograd keeps for backward): `leaves` (parameters) left out;
    amp: under CPU bf16 autocast."""
    skip = {t.untyped_storage().data_ptr() for t in leaves}
    kept = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            kept[storage.data_ptr()] = storage.nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out = fn(*args)
    return out, sum(kept.values())
