"""ranks/_shared_memory.py, the one home of shared memory: names, modes, owners, and every way a name goes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from ranks import _shared_memory as shm
from tests.conftest import project_env

MODES = ["memfd", "named"]


def _in_dev_shm(name: str) -> bool:
    return name in os.listdir("/dev/shm")


@pytest.mark.parametrize("mode", MODES)
def test_create_attach_unlink(mode):
    segment = shm.create("test", 10000, tag="t1", mode=mode)
    try:
        assert segment.mode == mode and segment.owner and segment.size == 10000
        assert segment.name.startswith(f"orch_test_{os.getpid()}_") and "_t1-" in segment.name
        assert ("@" in segment.handle) == (mode == "memfd")
        assert _in_dev_shm(segment.name) == (mode == "named")
        assert segment in shm.owned()
        assert [i.name for i in shm.segments(os.getpid()) if i.kind == "test"] == [segment.name]
        peer = shm.attach(segment.handle)
        peer.mmap[:5] = b"hello"
        assert segment.mmap[:5] == b"hello" and not peer.owner
        segment.unlink()
        # The name is gone; the mappings stay.
        assert segment not in shm.owned() and not _in_dev_shm(segment.name)
        assert [i.name for i in shm.segments(os.getpid()) if i.kind == "test"] == []
        with pytest.raises(FileNotFoundError):
            shm.attach(segment.handle)
        peer.mmap[5:6] = b"!"
        assert segment.mmap[:6] == b"hello!"
        peer.close()
    finally:
        segment.close()


def test_a_memfd_handle_names_one_segment_even_when_its_fd_number_comes_back():
    first = shm.create("test", 100, mode="memfd")
    handle = first.handle
    first.close()
    second = shm.create("test", 100, mode="memfd")  # very likely the same fd number
    try:
        with pytest.raises(FileNotFoundError):
            shm.attach(handle)
        assert shm.attach(second.handle).size == 100
    finally:
        second.close()


def test_bad_arguments():
    with pytest.raises(ValueError, match="kind must be lowercase letters"):
        shm.create("Zmq_1", 10)
    with pytest.raises(ValueError, match="mode must be one of"):
        shm.create("test", 10, mode="tmpfs")
    with pytest.raises(ValueError, match="not a segment of ours"):
        shm.attach("../etc/passwd")


def test_orch_shm_mode_is_checked(monkeypatch):
    monkeypatch.setenv("ORCH_SHM_MODE", "tmpfs")
    with pytest.raises(ValueError, match="ORCH_SHM_MODE must be one of auto, memfd, named"):
        shm.create("test", 10)
    monkeypatch.setenv("ORCH_SHM_MODE", "named")
    with shm.create("test", 10) as segment:
        assert segment.mode == "named"


def test_the_signal_handler_is_there_only_while_a_named_segment_is():
    before = signal.getsignal(signal.SIGTERM)
    with shm.create("test", 10, mode="memfd"):
        assert signal.getsignal(signal.SIGTERM) is before
    with shm.create("test", 10, mode="named"):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before


OWNER = textwrap.dedent("""
    import os, signal, sys, time
    from ranks import _shared_memory as shm

    how = sys.argv[1]
    if how == "ignore-hup":
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if how == "own-handler":
        signal.signal(signal.SIGTERM, lambda signum, frame: print("own handler ran", flush=True))
    if how == "dfl-int":
        signal.signal(signal.SIGINT, signal.SIG_DFL)
    segment = shm.create("test", 4096, mode="named")
    print(segment.name, flush=True)
    if how == "exit":
        sys.exit(0)
    if how == "raise":
        raise RuntimeError("an error nobody catches")
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        time.sleep(0.05)
    print("still here", os.path.exists("/dev/shm/" + segment.name), flush=True)
""")


def _owner(tmp_path, how: str) -> subprocess.Popen:
    script = tmp_path / "owner.py"
    script.write_text(OWNER)
    return subprocess.Popen([sys.executable, str(script), how], env=project_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("how", ["exit", "raise"])
def test_the_owner_unlinks_at_exit(tmp_path, how):
    proc = _owner(tmp_path, how)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == (0 if how == "exit" else 1), err
    assert not _in_dev_shm(out.split()[0])


@pytest.mark.parametrize("how,sig,code", [
    ("default", signal.SIGTERM, -signal.SIGTERM),
    ("default", signal.SIGHUP, -signal.SIGHUP),
    ("default", signal.SIGINT, -signal.SIGINT),  # Python's KeyboardInterrupt: atexit unlinks, then Python dies of SIGINT
    ("dfl-int", signal.SIGINT, -signal.SIGINT),  # SIGINT's default action: our handler unlinks
])
def test_the_owner_unlinks_when_a_signal_ends_it(tmp_path, how, sig, code):
    proc = _owner(tmp_path, how)
    name = proc.stdout.readline().strip()
    assert _in_dev_shm(name)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == code, err
    assert ("KeyboardInterrupt" in err) == (how == "default" and sig == signal.SIGINT), err
    assert not _in_dev_shm(name)


@pytest.mark.parametrize("how,sig", [("own-handler", signal.SIGTERM), ("ignore-hup", signal.SIGHUP)])
def test_a_handler_or_ignore_set_before_decides(tmp_path, how, sig):
    proc = _owner(tmp_path, how)
    name = proc.stdout.readline().strip()
    try:
        proc.send_signal(sig)
        if how == "own-handler":
            assert proc.stdout.readline() == "own handler ran\n"  # chained to it
        else:
            time.sleep(0.5)
        # The process goes on (its handler said so, or the signal is ignored), and so does its segment.
        assert proc.poll() is None and _in_dev_shm(name)
    finally:
        proc.kill()
        proc.communicate(timeout=30)
    assert shm.remove_stale([proc.pid]) == [name]


def _fake_name(pid: int, start: int, pidns: int) -> str:
    return f"orch_test_{pid}_{start:x}.{pidns:x}_fake-{os.urandom(6).hex()}"


def test_remove_stale_tells_dead_owners_from_live_and_foreign_ones():
    proc = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(proc.stdout)
    me, ns = os.getpid(), shm._pid_namespace()
    names = {
        "dead": _fake_name(dead_pid, 1, ns),
        "reused": _fake_name(me, shm._start_time(me) + 1, ns),  # our pid, another start time: a pid reused
        "alive": _fake_name(me, shm._start_time(me), ns),
        "foreign": _fake_name(dead_pid, 1, ns + 1),  # another pid namespace: its pids mean nothing here
    }
    for name in names.values():
        open(f"/dev/shm/{name}", "wb").close()
    try:
        states = {key: shm.owner_state(name) for key, name in names.items()}
        assert states == {"dead": "dead", "reused": "dead", "alive": "alive", "foreign": "unknown"}
        assert shm.remove_stale([12345678]) == []  # only the owners asked for
        assert sorted(shm.remove_stale()) == sorted([names["dead"], names["reused"]])
        assert _in_dev_shm(names["alive"]) and _in_dev_shm(names["foreign"])
    finally:
        for name in names.values():
            shm._unlink_name(name)


def test_the_listing_command(capsys):
    with shm.create("test", 10, mode="named") as named, shm.create("test", 10, mode="memfd") as memfd:
        assert shm.main(["--owner", str(os.getpid())]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert any(named.name in line and line.startswith("/dev/shm") and "owner alive" in line for line in lines), lines
    assert any(memfd.name in line and line.startswith("memfd") for line in lines), lines
