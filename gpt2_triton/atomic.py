"""Atomic file writes and folder locks: nothing a user made is left half-written or written twice at once."""
import fcntl
import os
import re
import secrets
import socket
from contextlib import contextmanager
from pathlib import Path

# atomic_write's temp files: `.<name>.<8 hex>.tmp` beside `<name>`
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")


def _create_temp(folder: Path, name: str) -> tuple[int, Path]:
    """A new temp file `.<name>.<random>.tmp` in `folder`, opened for writing. Mode 0o666 minus the
    umask, like any file the user creates (tempfile.mkstemp would make it 0600)."""
    while True:
        tmp = folder / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


@contextmanager
def atomic_write(path, mode="wb"):
    """Yield a temp file beside `path`; on success flush, fsync and os.replace it onto `path`.

    An exception at any point leaves the previous file at `path` intact and removes the temp file.
    A kill leaves the temp file (a dot-file, never mistaken for data or a checkpoint); whoever owns
    the folder removes it later with `remove_stale_temps`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _create_temp(path.parent, path.name)
    try:
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(folder) -> None:
    """Make renames in `folder` durable (where the platform lets us open a directory)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def remove_stale_temps(folder) -> list[Path]:
    """Delete atomic_write temp files in `folder` (left by killed writers); returns them.
    Only call this while holding the folder's FolderLock, so no live writer owns one of them."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    stale = [p for p in folder.iterdir() if p.is_file() and TEMP_PATTERN.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale


class FolderLock:
    """An exclusive lock on a folder: flock on a lock file inside it.

    The kernel drops a flock when its process dies, however it dies, so a crashed or killed owner
    never leaves the folder locked. The file records the owner (host and pid) for error messages.
    """

    def __init__(self, path):
        self.path = Path(path)
        self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, blocking: bool = False) -> bool:
        """Take the lock; False (without waiting, unless `blocking`) when another process holds it."""
        if self._fd is not None:
            return True
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            os.close(fd)
            return False
        except BaseException:
            os.close(fd)
            raise
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd
        return True

    def owner(self) -> str:
        """Who holds (or last held) the lock, as its lock file records it."""
        try:
            return self.path.read_text().strip() or "unknown process"
        except OSError:
            return "unknown process"

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self):
        self.acquire(blocking=True)
        return self

    def __exit__(self, *exc):
        self.release()
        return False
