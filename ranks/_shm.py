"""Named shared-memory segments for the communicators (``/dev/shm/orch_*``).

Plain ``shm_open``-style files mapped with ``mmap``, without
``multiprocessing.shared_memory`` (whose resource tracker would start an
extra process in every rank). The creator unlinks the name as soon as every
peer has attached, so the memory lives exactly as long as the mappings and
no name is left behind even when a rank is killed afterwards.
"""

from __future__ import annotations

import mmap
import os
import secrets

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
