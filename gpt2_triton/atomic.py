"""Atomic file writes and folder locks: nothing a user made is left half-written or written twice at once."""
import errno
import fcntl
import json
import os
import re
import secrets
import shutil
import signal
import socket
import threading
from contextlib import contextmanager
from pathlib import Path

# atomic_write's temp files (and temp_folder's folders): `.<name>.<8 hex>.tmp` beside `<name>`
TEMP_PATTERN = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{8}\.tmp$")
OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


class OutOfSpaceError(OSError):
    """A write failed because the file system (or the user's quota) is full."""


def _is_out_of_space(error: BaseException) -> bool:
    """An OSError ENOSPC/EDQUOT anywhere in the chain: torch.save reports a failed write as a RuntimeError
    ("unexpected pos") whose file's close then raises the OSError, or the other way round."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in OUT_OF_SPACE_ERRNOS:
            return True
        error = error.__cause__ or error.__context__
    return False


def _free_bytes(folder) -> float:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return float("inf")


def _size(nbytes: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:,.1f} {unit}"
    return f"{nbytes:.0f} bytes"


def out_of_space_error(path, needed_bytes: int | None = None) -> OutOfSpaceError:
    """The one-line error for a write of `path` that ran out of space: the folder, what it needed, what is free."""
    path = Path(path)
    free = _free_bytes(path.parent)
    needed = f"about {_size(needed_bytes)}" if needed_bytes else "more space"
    have = f" ({_size(free)} free)" if free != float("inf") else ""
    error = OutOfSpaceError(f"{path.parent} is out of space: writing {path.name} needs {needed}{have}; "
                            f"free some space and try again")
    error.errno = errno.ENOSPC
    return error


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
def atomic_write(path, mode="wb", size_hint: int | None = None):
    """Yield a temp file beside `path`; on success flush, fsync and os.replace it onto `path`.

    An exception at any point leaves the previous file at `path` intact and removes the temp file; a
    full disk becomes an OutOfSpaceError naming the folder and `size_hint` (the bytes the file needs).
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
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, Exception) and not isinstance(e, OutOfSpaceError) and (
                _is_out_of_space(e) or (size_hint and _free_bytes(path.parent) < size_hint)):
            raise out_of_space_error(path, size_hint) from None
        raise
    fsync_dir(path.parent)


def folder_write_problem(folder) -> str | None:
    """Why files cannot be created in `folder` (made when missing), or None: a path part that is a file,
    or a folder this process may not write (permissions, a read-only file system). Changes nothing."""
    folder = Path(folder)
    existing = folder
    while not existing.exists() and existing.parent != existing:  # the nearest part that exists
        existing = existing.parent
    if not existing.is_dir():
        return "not a folder" if existing == folder else f"{existing} is a file, not a folder"
    if not os.access(existing, os.W_OK | os.X_OK):
        where = "not writable" if existing == folder else f"cannot be created in {existing}"
        return f"{where}: permission denied or a read-only file system"
    return None


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


class DirLock:
    """flock on a folder itself (no file is created in it): shared by the processes that read it,
    exclusive for one that rewrites it. The kernel drops it when its holder dies, however it dies."""

    def __init__(self, folder):
        self.folder = Path(folder)
        self._fd = None

    def acquire(self, shared: bool = False) -> bool:
        """Take the lock without waiting; False when another holder excludes it."""
        if self._fd is not None:
            return True
        fd = os.open(self.folder, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return False
        self._fd = fd
        return True

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the last descriptor drops the flock
            self._fd = None


@contextmanager
def temp_folder(parent, name: str):
    """A new hidden folder `.<name>.<8 hex>.tmp` in `parent`, locked (DirLock) while this process builds
    it: `remove_stale_temp_folders` takes only those whose builder is gone. The caller renames it into
    place or lets the exit remove it (an exception, Ctrl-C, or SIGTERM under `sigterm_raises`)."""
    parent = Path(parent)
    parent.mkdir(parents=True, exist_ok=True)
    while True:
        tmp = parent / f".{name}.{secrets.token_hex(4)}.tmp"
        try:
            tmp.mkdir(mode=0o777)  # less the umask, like any folder the user creates
            break
        except FileExistsError:
            continue
    lock = DirLock(tmp)
    lock.acquire()
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed into place
        lock.release()


def remove_stale_temp_folders(parent, owns=lambda folder: True) -> list[Path]:
    """Delete `.<name>.<8 hex>.tmp` folders in `parent` whose builder is gone (their DirLock is free)
    and that `owns(folder)` says are ours; returns them."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    removed = []
    for folder in parent.iterdir():
        if not (TEMP_PATTERN.match(folder.name) and folder.is_dir() and not folder.is_symlink() and owns(folder)):
            continue
        lock = DirLock(folder)
        try:
            if not lock.acquire():
                continue  # its builder lives
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
        except OSError:
            continue
        finally:
            lock.release()
    return removed


@contextmanager
def sigterm_raises():
    """Within the block SIGTERM raises SystemExit(143) in the main thread, as Ctrl-C raises
    KeyboardInterrupt, so `finally` blocks remove temp files and folders before the process ends."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def write_json_atomic(path: Path, obj) -> None:
    """`obj` as indented JSON at `path`, written atomically (a temp file renamed over it)."""
    with atomic_write(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
