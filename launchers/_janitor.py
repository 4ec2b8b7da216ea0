"""The supervisor's watchdog: cleans up after a parent that died without cleaning up itself.

    python -I -S .../launchers/_janitor.py --parent PID

Run by file path with the standard library only (it starts in milliseconds),
in its own session and WITHOUT a parent-death signal: its job starts when its
parent is gone. The parent (``Supervisor``) keeps the write end of the
janitor's stdin and tells it, one line each::

    group PGID     a process group to sweep if the parent dies
    path PATH      a file or directory tree to remove if the parent dies
    release        the parent stopped its children and cleans up itself: exit, touch nothing

State machine::

    WATCHING --"release"--------------------------------------------> exit 0, nothing done
    WATCHING --EOF on stdin, or the parent pid changed (it died)--> SWEEPING
    SWEEPING: SIGTERM + SIGCONT to every group, up to GRACE seconds for the
              members to leave, SIGKILL to what is left; remove every path and the
              parent's named shared-memory segments (/dev/shm/orch_<kind>_<parent pid>_*,
              named as ranks._shared_memory names them) -> exit 0

EOF alone means the parent died: a parent that ends normally says
``release`` first. (The parent's children already carry a parent-death signal;
the sweep catches what that does not reach: their own children, and the
parent's files such as a temporary directory.)
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import sys
import time

GRACE = 2.0
POLL_SECONDS = 0.5


def _members(pgid: int) -> bool:
    """True while process group ``pgid`` has a live (not zombie) member."""
    try:
        entries = os.listdir("/proc")
    except OSError:
        try:
            os.killpg(pgid, 0)
            return True
        except OSError:
            return False
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read().decode("ascii", "replace")
        except OSError:
            continue
        fields = stat[stat.rfind(")") + 2:].split()
        if len(fields) >= 3 and fields[2] == str(pgid) and fields[0] not in ("Z", "X"):
            return True
    return False


def _signal(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except OSError:
        pass


def _owned_segments(parent: int) -> list[str]:
    """The parent's named segments and directories in /dev/shm (the owner pid is in the name)."""
    try:
        names = os.listdir("/dev/shm")
    except OSError:
        return []
    found = []
    for name in names:
        parts = name.split("_")
        if len(parts) > 3 and parts[0] == "orch" and parts[1].isalpha() and parts[2] == str(parent):
            found.append(os.path.join("/dev/shm", name))
    return found


def sweep(groups: list[int], paths: list[str]) -> None:
    live = [g for g in groups if _members(g)]
    for pgid in live:
        _signal(pgid, signal.SIGTERM)
        _signal(pgid, signal.SIGCONT)  # a stopped member acts on SIGTERM only once continued
    deadline = time.monotonic() + GRACE
    while live and time.monotonic() < deadline:
        time.sleep(0.05)
        live = [g for g in live if _members(g)]
    for pgid in live:
        _signal(pgid, signal.SIGKILL)
    for path in paths:
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        else:
            try:
                os.unlink(path)
            except OSError:
                pass


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] != "--parent":
        sys.stderr.write("usage: _janitor.py --parent PID\n")
        return 2
    parent = int(argv[1])
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the parent's job is not for us
    groups: list[int] = []
    paths: list[str] = []
    pending = b""
    stdin = sys.stdin.buffer.raw if hasattr(sys.stdin.buffer, "raw") else sys.stdin.buffer
    fd = stdin.fileno()
    while True:
        if os.getppid() != parent:
            break  # the parent died and we were handed to another reaper; its pipe may still be held open
        ready, _, _ = select.select([fd], [], [], POLL_SECONDS)
        if not ready:
            continue
        chunk = os.read(fd, 65536)
        if not chunk:
            break
        pending += chunk
        while b"\n" in pending:
            line, pending = pending.split(b"\n", 1)
            word, _, value = line.decode("utf-8", "surrogateescape").partition(" ")
            if word == "release":
                return 0
            if word == "group" and value.strip().isdigit():
                groups.append(int(value))
            elif word == "path" and value:
                paths.append(value)
    # The children (killed by their parent-death signal) cannot remove the dead parent's segments.
    sweep(groups, paths + _owned_segments(parent))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
