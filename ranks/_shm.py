"""Shared memory of the ranks: named segments and anonymous sealed files.

Named segments (``/dev/shm/orch_*``, for the communicators): plain
``shm_open``-style files mapped with ``mmap``, without
``multiprocessing.shared_memory`` (whose resource tracker would start an
extra process in every rank). The creator unlinks the name as soon as every
peer has attached, so the memory lives exactly as long as the mappings and
no name is left behind even when a rank is killed afterwards.

Anonymous sealed files (``memfd_create``, for read-only data published to
processes that find it later, e.g. shared weights): the file has no name in
any directory, so there is nothing to unlink and nothing to leak; other
processes open it through ``/proc/<pid>/fd/<fd>`` while the creator keeps
the fd open, and the kernel frees it when the last fd and mapping are gone.
Once written it is sealed against writes and resizes, so a reader can rely
on it never changing under its mappings.
"""

from __future__ import annotations

import fcntl
import mmap
import os
import secrets
from typing import Callable

SHM_DIR = "/dev/shm"
PREFIX = "orch_"


def shm_available() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def create(kind: str, size: int) -> tuple[str, mmap.mmap]:
    """A new zero-filled segment ``orch_<kind>_<random>`` of ``size`` bytes."""
    name = f"{PREFIX}{kind}_{os.getpid()}_{secrets.token_hex(6)}"
    path = os.path.join(SHM_DIR, name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    try:
        os.ftruncate(fd, max(size, 1))
        mapping = mmap.mmap(fd, max(size, 1))
    except BaseException:
        os.close(fd)
        unlink(name)
        raise
    os.close(fd)
    return name, mapping


def attach(name: str) -> mmap.mmap:
    """Map the existing segment ``name``; ``FileNotFoundError`` if it is gone."""
    if not name.startswith(PREFIX) or "/" in name:
        raise ValueError(f"not a segment of ours: {name!r}")
    fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR)
    try:
        return mmap.mmap(fd, os.fstat(fd).st_size)
    finally:
        os.close(fd)


def unlink(name: str) -> None:
    try:
        os.unlink(os.path.join(SHM_DIR, name))
    except FileNotFoundError:
        pass


_SEALS = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE


def create_sealed(name: str, size: int, fill: Callable[[int], None]) -> int:
    """An anonymous file (memfd) ``name`` of ``size`` bytes, written by ``fill(fd)`` and then sealed read-only.

    Returns the open fd; the memory lives while any fd or mapping of it does.
    ``fill`` must write with ``os.pwrite`` (a writable mapping would block the seal).
    """
    fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, max(size, 1))
        fill(fd)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, _SEALS)
    except BaseException:
        os.close(fd)
        raise
    return fd


def is_sealed(fd: int) -> bool:
    """True when ``fd`` is a file that can no longer be written or resized."""
    try:
        seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return False
    return seals & _SEALS == _SEALS


def write_all(fd: int, data, offset: int) -> None:
    """``os.pwrite`` until every byte of ``data`` (a buffer) is written at ``offset``."""
    view = memoryview(data).cast("B")
    while view:
        written = os.pwrite(fd, view, offset)
        view, offset = view[written:], offset + written


def map_readonly(fd: int) -> mmap.mmap:
    """The whole file behind ``fd``, mapped shared and read-only (the fd may be closed afterwards).

    The pages are mapped in at once (MAP_POPULATE): no fault on first use, and
    every process that maps the file shows its pages as shared from the start
    (a page mapped by one process alone counts in that process's USS, even
    when the file outlives it).
    """
    return mmap.mmap(fd, 0, flags=mmap.MAP_SHARED | mmap.MAP_POPULATE, prot=mmap.PROT_READ)


def peer_fd_path(pid: int, fd: int) -> str:
    return f"/proc/{pid}/fd/{fd}"


def open_peer_fd(pid: int, fd: int) -> int:
    """Open, read-only, the file that process ``pid`` holds as ``fd``.

    Raises ``ProcessLookupError`` when no process ``pid`` exists,
    ``FileNotFoundError`` when it has no such fd, ``PermissionError`` when the
    kernel refuses (another user's process).
    """
    if not os.path.isdir(f"/proc/{pid}"):
        raise ProcessLookupError(pid)
    try:
        return os.open(peer_fd_path(pid, fd), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        if _is_zombie(pid):  # exited, not yet reaped by its parent: its fds are gone with it
            raise ProcessLookupError(pid) from None
        raise


def _is_zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rpartition(")")[2].split()[0] in ("Z", "X")
    except (OSError, IndexError):
        return True
