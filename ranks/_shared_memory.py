"""The one home of shared memory: making, naming, owning, attaching, unlinking and sweeping segments.

Every segment the project shares between processes comes from here: the
zmq communicator's same-host group (layout in ``_comm_zmq_shm_group``), the
mpi communicator's per-host progress table (``_comm_mpi``) and the
batch-split master's slots and output blocks (layout in
``orchestrator._worker_memory``). Those modules own layouts; this one owns
lifetimes. ``multiprocessing.shared_memory`` and its undocumented resource
tracker are not used: the tracker is one more process per program that can
itself leak or complain, and this module's registry does its job.

Names
    ``orch_<kind>_<owner pid>_<start>.<pidns>_[<tag>-]<random>``, e.g.
    ``orch_zmq_4242_1f3a9.effffffc_5d0c9e3a1b7f`` or
    ``orch_pp_4242_1f3a9.effffffc_w0g1-9e3a1b7f5d0c``. ``kind`` says which
    user made it, the owner pid which process must unlink it. ``start`` (the
    owner's creation time in hundredths of a second, hex) and ``pidns`` (its pid
    namespace's inode, hex) let a sweep tell a dead owner from a reused pid,
    and leave alone a segment made in another pid namespace that shares this
    ``/dev/shm``. A memfd carries the same name (``/proc/<pid>/fd`` and
    ``/proc/<pid>/maps`` show ``/memfd:<name> (deleted)``).

Modes (``create(mode=...)``, default ``ORCH_SHM_MODE``: ``auto``)
    ``memfd``: an anonymous ``memfd_create`` file. A peer opens it through
    ``/proc/<owner pid>/fd/<fd>`` (the handle it is given is
    ``<name>@<pid>/<fd>``) and checks that the link names the segment. The
    owner holds that fd (read-only, which tells it from the fd its own
    mapping keeps) until it unlinks. Nothing ever appears in ``/dev/shm``;
    the kernel frees the memory with the last fd and mapping, so a SIGKILLed
    owner leaks nothing. Needs a ``/proc`` of the owner's pid namespace and
    peers allowed to open the owner's fds (same user with the owner
    dumpable, or root).
    ``named``: ``/dev/shm/<name>``, opened by name (the handle is the name).
    ``auto``: memfd where ``memfd_usable()``, named otherwise.

Users

====  ============================  =================================  ============================
kind  owner                         mode                               unlinks when
====  ============================  =================================  ============================
zmq   rank 0 (``_comm_zmq``)        memfd when every rank shares its   every rank's READY is in (a
                                    pid namespace, else named          few ms after the hellos)
mpi   local rank 0 (``_comm_mpi``)  memfd; named when a local rank     every local rank attached
                                    cannot open it                     (one node allreduce)
pp    the batch-split master        auto                               slot: replaced or closed;
      (``orchestrator.``                                               block: its request ends
      ``_worker_memory``)
====  ============================  =================================  ============================

Who unlinks when (the owner is the process that called ``create``)

=============================  ================================  ===========================
event                          named (``/dev/shm/<name>``)       memfd
=============================  ================================  ===========================
every peer has mapped it       owner ``unlink()``: name gone     owner ``unlink()``: fd closed
owner ``close()``; errors      ``close()`` unlinks and unmaps    the same
owner exits (return, raise)    ``atexit``: the registry          the kernel closes the fd
                               unlinks what is left
SIGTERM/HUP/INT, default act.  the handler unlinks, then the     the kernel closes the fd
                               default action (see below)
SIGKILL, a crash               left for a sweep: the next        the kernel frees it with the
                               ``create`` or zmq rank on this    last mapping: nothing to
                               host, a launcher's ``stop()``,    sweep
                               a batch-split worker whose
                               master died, ``remove_stale()``
=============================  ================================  ===========================

After ``unlink()`` the mapping stays valid in every process that has it; a
peer that tries to attach afterwards gets ``FileNotFoundError``.

Signals: while this process owns a named segment (and only then; and only
from the main thread, since Python allows no other), SIGTERM, SIGHUP and
SIGINT get a handler. When the handler it replaced is the default action it
unlinks every named segment this process owns, restores the default and
raises the signal again, so the process still dies of it. When the replaced
handler is a Python one (Python's own KeyboardInterrupt for SIGINT, a
launcher's) that one is called instead and decides: if it ends the process,
``atexit`` and the ``finally`` blocks unlink. Ignored signals stay ignored.
The handler is removed when the last named segment is unlinked, so a process
blocked in a long C call (where Python cannot run handlers) stays killable
by SIGTERM whenever it owns no name.
"""

from __future__ import annotations

import atexit
import ctypes
import fcntl
import mmap
import os
import re
import secrets
import shutil
import signal
import threading
from typing import Callable
from dataclasses import dataclass

from ._env import SHM_MODE

SHM_DIR = "/dev/shm"
PREFIX = "orch_"
MODES = ("auto", "memfd", "named")
_NAME = re.compile(r"^orch_([a-z]+)_(\d+)_([0-9a-f]+)\.([0-9a-f]+)_([A-Za-z0-9]+-)?([0-9a-f]+)$")
_WORD = re.compile(r"^[A-Za-z0-9]*$")
_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP", "SIGINT") if hasattr(signal, name))


# -- who we are ------------------------------------------------------------------
def _process_state(pid: int) -> tuple[bool, int | None]:
    """(runs code, start stamp) of ``pid``: (False, None) when there is no such process or it is a zombie.

    The start stamp is psutil's creation time in hundredths of a second: the
    same for the same process every time it is read, different for a reused pid.
    """
    import psutil

    try:
        process = psutil.Process(pid)
        if process.status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD):
            return False, None
        return True, round(process.create_time() * 100)
    except psutil.NoSuchProcess:
        return False, None


def _start_time(pid: int) -> int | None:
    return _process_state(pid)[1]


def _pid_namespace() -> int:
    try:
        link = os.readlink("/proc/self/ns/pid")  # "pid:[4026531836]"
        return int(link[link.index("[") + 1 : -1])
    except (OSError, ValueError):
        return 0


_stamp_of: dict[int, str] = {}  # pid -> "<start>.<pidns>", computed once per process (and again after a fork)


def _own_stamp() -> str:
    pid = os.getpid()
    stamp = _stamp_of.get(pid)
    if stamp is None:
        stamp = _stamp_of[pid] = f"{_start_time(pid) or 0:x}.{_pid_namespace():x}"
    return stamp


# -- what this process can do ------------------------------------------------------
_memfd_ok: dict[int, bool] = {}


def _dumpable() -> bool:
    """Whether processes of our user may open our /proc/<pid>/fd (prctl PR_GET_DUMPABLE)."""
    if os.geteuid() == 0:
        return True  # root's peers (root) may open any process's fds
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(3, 0, 0, 0, 0) == 1  # PR_GET_DUMPABLE
    except (OSError, AttributeError):
        return False


def memfd_usable() -> bool:
    """True when a memfd of this process can be opened by a peer through /proc/<our pid>/fd/<fd>."""
    pid = os.getpid()
    known = _memfd_ok.get(pid)
    if known is not None:
        return known
    ok = False
    if hasattr(os, "memfd_create"):
        try:
            fd = os.memfd_create("orch_probe", os.MFD_CLOEXEC)
        except OSError:
            fd = -1
        if fd >= 0:
            try:
                # Through our pid as peers see it: a /proc of another pid namespace fails here.
                peer = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
                try:
                    ok = os.readlink(f"/proc/self/fd/{peer}") == "/memfd:orch_probe (deleted)"
                finally:
                    os.close(peer)
            except OSError:
                ok = False
            finally:
                os.close(fd)
    ok = ok and _dumpable()
    _memfd_ok[pid] = ok
    return ok


def named_usable() -> bool:
    return os.path.isdir(SHM_DIR) and os.access(SHM_DIR, os.W_OK)


def available() -> bool:
    """True when this process can make a segment in some mode."""
    return memfd_usable() or named_usable()


def default_mode() -> str:
    mode = (SHM_MODE.get() or "auto").strip().lower()
    if mode not in MODES:
        raise ValueError(f"ORCH_SHM_MODE must be one of {', '.join(MODES)}, got {SHM_MODE.get()!r}")
    return mode


# -- segments ----------------------------------------------------------------------
class Segment:
    """One mapped segment. ``mmap`` is the mapping (numpy views it with ``np.frombuffer``/``np.ndarray``).

    ``handle`` is what a peer passes to ``attach``. ``owner`` is True in the
    process that created it (registered here, unlinked by the rules in the
    module docstring); attached segments are only unmapped.
    """

    def __init__(self, name: str, handle: str, mode: str, mapping: mmap.mmap, *, owner: bool, fd: int | None = None):
        self.name = name
        self.handle = handle
        self.mode = mode
        self.mmap = mapping
        self.size = len(mapping)
        self.owner = owner
        self.owner_pid = os.getpid() if owner else _owner_pid(name)
        self._fd = fd  # memfd mode, owner: the fd peers open through /proc; closing it is the unlink
        self.linked = owner

    def unlink(self) -> None:
        """Owner: make the segment unreachable for new peers (name removed / fd closed); mappings stay. Idempotent."""
        if not self.owner or not self.linked:
            return
        self.linked = False
        _registry.pop(self.name, None)
        try:
            if self._fd is not None:
                fd, self._fd = self._fd, None
                os.close(fd)
            elif os.getpid() == self.owner_pid:
                _unlink_name(self.name)
        finally:
            if self.mode == "named":
                _named_count_changed()

    def close(self) -> None:
        """Unmap (an array still viewing the memory keeps it until it goes) and, for the owner, unlink."""
        try:
            self.unlink()
        finally:
            try:
                self.mmap.close()
            except BufferError:
                pass  # a caller's array views it; the mapping goes with the last such array

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Segment({self.handle!r}, {self.size} bytes, {self.mode}, {'owner' if self.owner else 'attached'})"


def create(kind: str, size: int, *, tag: str = "", mode: str | None = None) -> Segment:
    """A new zero-filled segment of ``size`` bytes owned by this process.

    ``kind``: lowercase letters naming the user (``zmq``, ``mpi``, ``pp``);
    ``tag``: letters and digits put before the random part (``<tag>-``), to
    tell a user's segments apart when reading names. ``mode``: ``auto``,
    ``memfd`` or ``named`` (default ``ORCH_SHM_MODE``). Raises OSError when
    the segment cannot be made (``/dev/shm`` full or missing, no memfd).
    """
    if not re.fullmatch(r"[a-z]+", kind) or not _WORD.match(tag):
        raise ValueError(f"kind must be lowercase letters and tag letters and digits, got {kind!r}, {tag!r}")
    mode = default_mode() if mode is None else mode
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "auto":
        mode = "memfd" if memfd_usable() else "named"
    _once_per_process()
    size = max(int(size), 1)
    name = f"{PREFIX}{kind}_{os.getpid()}_{_own_stamp()}_{tag + '-' if tag else ''}{secrets.token_hex(6)}"
    if mode == "memfd":
        fd = os.memfd_create(name, os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            mapping = mmap.mmap(fd, size)  # keeps a read-write dup of fd for itself
            # The fd peers open: a second, read-only open, so that /proc/<pid>/fdinfo tells it from the
            # mapping's own fd (``segments``); a peer's open through /proc is read-write all the same.
            handle_fd = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
        finally:
            os.close(fd)
        segment = Segment(name, f"{name}@{os.getpid()}/{handle_fd}", mode, mapping, owner=True, fd=handle_fd)
        _registry[name] = segment
        return segment
    fd = os.open(os.path.join(SHM_DIR, name), os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_CLOEXEC, 0o600)
    try:
        os.ftruncate(fd, size)
        segment = Segment(name, name, mode, mmap.mmap(fd, size), owner=True)
        _registry[name] = segment
        _named_count_changed()
    except BaseException:
        _registry.pop(name, None)
        _unlink_name(name)
        raise
    finally:
        os.close(fd)
    return segment


def attach(handle: str) -> Segment:
    """Map the segment a peer's ``create`` made; ``FileNotFoundError`` once it is unlinked (or its owner gone).

    Raises ``PermissionError`` when this process may not open it, ValueError
    for a handle that is not one of ours.
    """
    name, _, where = handle.partition("@")
    if not _NAME.match(name):
        raise ValueError(f"not a segment of ours: {handle!r}")
    if where:
        pid, _, fd_text = where.partition("/")
        if not (pid.isdigit() and fd_text.isdigit()):
            raise ValueError(f"not a segment of ours: {handle!r}")
        fd = os.open(f"/proc/{pid}/fd/{fd_text}", os.O_RDWR | os.O_CLOEXEC)
        mode = "memfd"
        try:
            # The owner may have closed that fd and opened another file under the same number.
            if os.readlink(f"/proc/self/fd/{fd}") != f"/memfd:{name} (deleted)":
                raise FileNotFoundError(f"segment {name} is gone: fd {fd_text} of pid {pid} is another file now")
        except BaseException:
            os.close(fd)
            raise
    else:
        fd = os.open(os.path.join(SHM_DIR, name), os.O_RDWR | os.O_CLOEXEC)
        mode = "named"
    try:
        return Segment(name, handle, mode, mmap.mmap(fd, os.fstat(fd).st_size), owner=False)
    finally:
        os.close(fd)


def remove(handle: str) -> None:
    """Remove a named segment's name whatever its owner (for a process whose owner died); a memfd needs nothing."""
    name = handle.partition("@")[0]
    if "@" not in handle and _NAME.match(name):
        _unlink_name(name)


def owned() -> list[Segment]:
    """The segments this process has made and not yet unlinked."""
    return [s for s in list(_registry.values()) if s.owner_pid == os.getpid()]


def _unlink_name(name: str) -> None:
    path = os.path.join(SHM_DIR, name)
    try:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            os.unlink(path)
    except FileNotFoundError:
        pass


def make_directory(kind: str) -> str:
    """A new directory ``/dev/shm/orch_<kind>_<pid>_...`` owned by this process; its path.

    For shared-memory files that a library we start makes itself (Open MPI's
    backing files, told where by ``--mca btl_sm_backing_directory``): they
    land in a directory named like our segments, so it goes with them: removed
    by ``remove_directory``, at exit, on the handled signals, and swept as a
    dead owner's when this process is SIGKILLed.
    """
    if not re.fullmatch(r"[a-z]+", kind):
        raise ValueError(f"kind must be lowercase letters, got {kind!r}")
    _once_per_process()
    name = f"{PREFIX}{kind}_{os.getpid()}_{_own_stamp()}_{secrets.token_hex(6)}"
    os.mkdir(os.path.join(SHM_DIR, name), 0o700)
    _directories[name] = os.getpid()
    _named_count_changed()
    return os.path.join(SHM_DIR, name)


def remove_directory(path: str) -> None:
    """Remove a directory of ``make_directory`` with everything in it; calling it twice is harmless."""
    name = os.path.basename(path)
    _directories.pop(name, None)
    _unlink_name(name)
    _named_count_changed()


def _owned_directories() -> list[str]:
    return [name for name, pid in list(_directories.items()) if pid == os.getpid()]


# -- the registry, and what runs at exit and on signals ----------------------------------
_registry: dict[str, Segment] = {}
_directories: dict[str, int] = {}  # name -> owner pid (a forked child inherits the dict, not the ownership)
_started_in: set[int] = set()
_swept_in: set[int] = set()
_previous_handlers: dict[int, object] = {}


def sweep_once() -> None:
    """``remove_stale()`` once per process: what SIGKILLed owners on this host left (a rank calls it as it starts)."""
    pid = os.getpid()
    if pid in _swept_in:
        return
    _swept_in.add(pid)
    try:
        remove_stale()
    except OSError:
        pass


def _once_per_process() -> None:
    pid = os.getpid()
    if pid not in _started_in:
        _started_in.add(pid)
        atexit.register(_unlink_all)
    sweep_once()


def _unlink_all() -> None:
    for segment in owned():
        try:
            segment.unlink()
        except OSError:
            pass
    for name in _owned_directories():
        _unlink_name(name)


def _named_count_changed() -> None:
    """Guard SIGTERM/SIGHUP/SIGINT while we own a named segment, and only then."""
    if threading.current_thread() is not threading.main_thread():
        return  # Python installs handlers only from the main thread; atexit and sweeps still cover this process
    if any(s.mode == "named" for s in owned()) or _owned_directories():
        for signum in _SIGNALS:
            current = signal.getsignal(signum)
            if current is _on_signal or current is signal.SIG_IGN or current is None:
                continue  # ours already; ignored stays ignored; None: set outside Python, not ours to replace
            _previous_handlers[signum] = current
            signal.signal(signum, _on_signal)
    else:
        for signum, previous in list(_previous_handlers.items()):
            if signal.getsignal(signum) is _on_signal:
                signal.signal(signum, previous)
            del _previous_handlers[signum]


def _on_signal(signum, frame) -> None:
    previous = _previous_handlers.get(signum, signal.SIG_DFL)
    if callable(previous):
        previous(signum, frame)  # its call; if it ends the process, atexit and finally blocks unlink
        return
    for segment in owned():
        if segment.mode == "named":
            _unlink_name(segment.name)
    for name in _owned_directories():
        _unlink_name(name)
    signal.signal(signum, signal.SIG_DFL)
    signal.raise_signal(signum)


# -- listing and sweeping ---------------------------------------------------------
@dataclass(frozen=True)
class SegmentInfo:
    name: str
    kind: str
    owner_pid: int
    owner: str  # "alive", "dead", or "unknown" (made in another pid namespace, or not named by our scheme)
    where: str  # "/dev/shm" or "memfd"


def _owner_pid(name: str) -> int:
    match = _NAME.match(name)
    return int(match.group(2)) if match else 0


def owner_state(name: str) -> str:
    """"alive", "dead" or "unknown" for the process that made segment ``name``."""
    match = _NAME.match(name)
    if not match:
        return "unknown"
    pid, start, pidns = int(match.group(2)), int(match.group(3), 16), int(match.group(4), 16)
    if pidns != _pid_namespace():
        return "unknown"  # its pid means nothing here
    runs, started = _process_state(pid)
    if not runs:
        return "dead"  # gone, or a zombie (it runs no more code)
    return "alive" if started == start else "dead"  # else: the pid was reused


def _memfds(pid: int) -> list[str]:
    names = []
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return names
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("/memfd:" + PREFIX) and link.endswith(" (deleted)") and _read_only(pid, fd):
            names.append(link[len("/memfd:") : -len(" (deleted)")])
    return names


def _read_only(pid: int, fd: str) -> bool:
    """Whether fd is opened read-only: an owner's handle fd, not a mapping's own (read-write) fd."""
    try:
        with open(f"/proc/{pid}/fdinfo/{fd}") as f:
            for line in f:
                if line.startswith("flags:"):
                    return int(line.split()[1], 8) & os.O_ACCMODE == os.O_RDONLY
    except (OSError, ValueError):
        pass
    return False


def segments(owner: int | None = None) -> list[SegmentInfo]:
    """Our segments that a peer could still attach: names in /dev/shm, and memfds whose owner still holds the handle fd.

    ``owner``: only those of this pid (then only its fds are read for memfds;
    otherwise every process's are).
    """
    found: dict[str, str] = {}
    try:
        for name in os.listdir(SHM_DIR):
            if name.startswith(PREFIX):
                found[name] = "/dev/shm"
    except OSError:
        pass
    pids = [owner] if owner is not None else [int(p) for p in os.listdir("/proc") if p.isdigit()]
    for pid in pids:
        for name in _memfds(pid):
            if _owner_pid(name) == pid:
                found.setdefault(name, "memfd")
    infos = []
    for name, where in sorted(found.items()):
        match = _NAME.match(name)
        pid = int(match.group(2)) if match else 0
        if owner is not None and pid != owner:
            continue
        state = "alive" if where == "memfd" else owner_state(name)
        infos.append(SegmentInfo(name, match.group(1) if match else "", pid, state, where))
    return infos


def remove_stale(owners=None) -> list[str]:
    """Unlink the /dev/shm segments whose owner is dead (optionally only of the pids in ``owners``); their names.

    A segment whose owner runs, or was made in another pid namespace, is left
    alone. memfd segments never need this: the kernel frees them.
    """
    wanted = None if owners is None else {int(p) for p in owners}
    removed = []
    try:
        names = [n for n in os.listdir(SHM_DIR) if n.startswith(PREFIX)]
    except OSError:
        return removed
    for name in names:
        pid = _owner_pid(name)
        if not pid or (wanted is not None and pid not in wanted):
            continue
        if owner_state(name) == "dead":
            _unlink_name(name)
            removed.append(name)
    return removed


def main(argv=None) -> int:
    """List our segments on this host with their owners; ``--remove-stale`` removes those of dead owners.

    Meant for an operator's command (``orchestrate`` can wire it as a subcommand).
    """
    import argparse

    parser = argparse.ArgumentParser(description="Shared-memory segments of the orchestrator on this host.")
    parser.add_argument("--remove-stale", action="store_true", help="unlink /dev/shm segments whose owner is dead")
    parser.add_argument("--owner", type=int, help="only the segments of this pid")
    args = parser.parse_args(argv)
    for info in segments(args.owner):
        print(f"{info.where:9} {info.kind:4} pid {info.owner_pid:<8} owner {info.owner:7} {info.name}")
    if args.remove_stale:
        for name in remove_stale(None if args.owner is None else [args.owner]):
            print(f"removed {name}")
    return 0


# --- sealed files: read-only data published once (shared weights) ------------------------------
# An anonymous memfd written once and then sealed against writes and resizes, so a reader can rely
# on it never changing under its mappings; other processes open it through /proc/<pid>/fd/<fd>
# while the creator keeps the fd open, and the kernel frees it with the last fd and mapping.

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
    import psutil

    try:
        return psutil.Process(pid).status() in (psutil.STATUS_ZOMBIE, psutil.STATUS_DEAD)
    except psutil.NoSuchProcess:
        return True
