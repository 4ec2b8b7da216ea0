"""The zmq backend with real rank processes on 127.0.0.1: every verb and dtype, both paths, and failures."""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import zmq

from ranks import CommError, RankTable, ZmqCommunicator, generate_rank_table
from ranks import _shared_memory as shared_memory
from ranks._comm_zmq import _HEAD, _HELLO, _READY, _boot_id, _encode_header, _namespace
from ranks._rank_table import this_host_addresses
from tests.comm_procs import (
    ROOT, TESTS, assert_none_left, env_with_marker, free_base_port, orch_segments, run_ranks, write_local_table,
)

pytestmark = pytest.mark.multiprocess

CHECK = str(TESTS / "comm_check.py")
FAIL = str(TESTS / "comm_fail.py")
# As hccl_tools.py writes it: server_id 127.0.0.1, host_nic_ip "reserve", device_ip 192.1.27.6 / 192.2.27.6
# (NPU addresses, not addresses of this host).
HCCL_TABLE = ROOT / "rank_tables" / "hccl_2p_01_127.0.0.1.json"


@pytest.mark.timeout(150)
@pytest.mark.parametrize("n,path", [(2, "shm"), (3, "shm"), (2, "tcp"), (3, "tcp")])
def test_every_verb_and_dtype(tmp_path, n, path):
    before = orch_segments()
    table = write_local_table(tmp_path / "t.json", n)
    port = free_base_port(n)
    results, _ = run_ranks([[CHECK, "zmq", str(r), str(n), str(table), str(port), path] for r in range(n)], timeout=140)
    for rank, (code, out) in enumerate(results):
        assert code == 0, out
        assert f"CHECKED rank {rank} of {n}:" in out and f"backend zmq, path {path}" in out, out
    assert orch_segments() <= before, "a shared-memory segment outlived the ranks"


@pytest.mark.timeout(150)
def test_a_table_made_by_hccl_tools_unchanged_over_tcp():
    table = RankTable.load(HCCL_TABLE)
    assert not {d.device_ip for d in table.devices} & this_host_addresses()
    port = free_base_port(2)
    results, _ = run_ranks([[CHECK, "zmq", str(r), "2", str(HCCL_TABLE), str(port), "tcp"] for r in range(2)], timeout=140)
    for rank, (code, out) in enumerate(results):
        assert code == 0, out
        assert f"CHECKED rank {rank} of 2:" in out and "backend zmq, path tcp" in out, out


@pytest.mark.timeout(120)
def test_a_users_allreduce_script_with_a_table_made_by_hccl_tools(tmp_path):
    # The user's way in: an ini naming the table, one command per rank, the same-host path left to choose itself.
    before = orch_segments()
    ini = tmp_path / "config_file.ini"
    ini.write_text(f"[ascend_context]\nrank_table_file={HCCL_TABLE}\n[comm]\nbase_port={free_base_port(2)}\ntimeout=60\n")
    script = str(ROOT / "examples" / "allreduce.py")
    results, _ = run_ranks(
        [[script, "--rank_id", str(r), "--device_id", str(r), "--config_file", str(ini)] for r in range(2)], timeout=100
    )
    for rank, (code, out) in enumerate(results):
        assert code == 0, out
        assert f"rank {rank} of 2 (zmq, device {rank}): allreduce -> [3.0, 3.0, 3.0, 3.0] OK" in out, out
    assert orch_segments() <= before, "a shared-memory segment outlived the ranks"


def _fail_run(tmp_path, mode: str, path: str, timeout: float = 4.0, n: int = 2, bad: int = 1, absent: bool = False,
              wait_for=None):
    table = write_local_table(tmp_path / "t.json", n)
    port = free_base_port(n)
    commands = [[FAIL, mode, str(bad), "zmq", str(timeout), str(r), str(table), str(port), path] for r in range(n)]
    if absent:
        commands[bad] = None
    before = orch_segments()
    results, seconds = run_ranks(commands, timeout=60, wait_for=wait_for)
    assert orch_segments() <= before, "a shared-memory segment outlived the ranks"
    return results, seconds, port


@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", ["shm", "tcp"])
@pytest.mark.parametrize("mode", ["raise", "raise_in_with"])
def test_rank_that_raises(tmp_path, path, mode):
    results, seconds, port = _fail_run(tmp_path, mode, path, timeout=20)
    code, out = results[1]
    assert code != 0 and "ValueError: rank 1 raises on purpose" in out
    code, out = results[0]
    assert code == 3, out
    assert re.search(r"FAILED PeerLostError after -?\d+\.\d+ s: allreduce #[12] on rank 0 of 2: ", out), out
    assert "rank 1" in out
    # Promptly: far inside the 20 s timeout.
    assert float(re.search(r"after (-?\d+\.\d+) s", out).group(1)) < 5, out
    assert seconds < 15, seconds


@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", ["shm", "tcp"])
def test_rank_killed_with_sigkill(tmp_path, path):
    results, seconds, port = _fail_run(tmp_path, "kill", path, timeout=20)
    assert results[1][0] == -9
    code, out = results[0]
    assert code == 3, out
    # #1 when rank 1 died before ZeroMQ had sent its part of allreduce #1 (sends are queued).
    assert re.search(r"FAILED PeerLostError after -?\d+\.\d+ s: allreduce #[12] on rank 0 of 2: .*rank 1", out), out
    assert float(re.search(r"after (-?\d+\.\d+) s", out).group(1)) < 5, out
    assert seconds < 15, seconds


@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", ["shm", "tcp"])
def test_rank_that_hangs_times_out_with_names(tmp_path, path):
    results, seconds, port = _fail_run(tmp_path, "hang", path, timeout=3, n=3, bad=2, wait_for=[0, 1])
    for rank in (0, 1):
        code, out = results[rank]
        assert code == 3, out
        assert re.search(
            rf"FAILED CommTimeoutError after 3\.\d+ s: allreduce #2 on rank {rank} of 3 timed out after 3\.\d s waiting for .*rank 2", out
        ), out
        if path == "tcp":
            assert f"rank 2 at tcp://127.0.0.1:{port + 2}" in out, out
        else:
            assert "rank 2 (pid" in out and "it is in allreduce #1" in out, out
    assert results[2][0] == -9  # still asleep: the harness killed it once the others had failed


@pytest.mark.timeout(90)
def test_rank_that_never_starts(tmp_path):
    results, seconds, port = _fail_run(tmp_path, "raise", "shm", timeout=3, n=3, bad=1, absent=True)
    for rank in (0, 2):
        code, out = results[rank]
        assert code != 0, out
        assert re.search(
            rf"CommTimeoutError.*: joining \(waiting for every rank's hello\) on rank {rank} of 3 timed out after 3\.\d s "
            rf"waiting for rank 1 at tcp://127\.0\.0\.1:{port + 1}", out
        ), out


@pytest.mark.timeout(90)
@pytest.mark.parametrize("path", ["shm", "tcp"])
def test_ranks_calling_different_collectives(tmp_path, path):
    results, seconds, port = _fail_run(tmp_path, "mismatch", path, timeout=10)
    # Whichever rank notices first raises CommError; the other learns it from its ABORT message.
    for code, out in results:
        assert code == 3, out
        assert re.search(r"FAILED (CommError|PeerLostError)", out), out
        assert re.search(r"allreduce #2 on rank 0 of 2: rank 1 called allgather #2 instead|"
                         r"allgather #2 on rank 1 of 2: rank 0 called allreduce #2 instead", out), out
    assert seconds < 8


# -- in-process checks (one rank, or errors raised before any peer is needed) ----------------
def test_single_rank_table_works_in_process():
    table = generate_rank_table([("127.0.0.1", [0])])
    with ZmqCommunicator(0, table, base_port=free_base_port(1), timeout=5) as comm:
        assert (comm.rank, comm.size, comm.path) == (0, 1, "tcp")
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        assert np.array_equal(comm.allreduce(x, op="max"), x)
        assert np.array_equal(comm.allgather(x, axis=1), x)
        assert np.array_equal(comm.broadcast(x), x)
        comm.barrier()
        comm.send(x, 0, tag=4)
        assert np.array_equal(comm.recv(0, tag=4), x)
    with pytest.raises(CommError, match="closed"):
        comm.allreduce(x)


def test_bad_arguments_are_named():
    table = generate_rank_table([("127.0.0.1", [0])])
    with ZmqCommunicator(0, table, base_port=free_base_port(1), timeout=5) as comm:
        with pytest.raises(ValueError, match="allreduce op must be one of"):
            comm.allreduce(np.ones(2), op="mean")
        with pytest.raises(TypeError, match="allreduce on rank 0: dtype complex128 is not supported"):
            comm.allreduce(np.ones(2, complex))
        with pytest.raises(ValueError, match="allgather axis 2 is out of range for an array of 2 dimensions"):
            comm.allgather(np.ones((2, 2)), axis=2)
        with pytest.raises(ValueError, match=r"broadcast root must be a rank in 0..0, got 1"):
            comm.broadcast(np.ones(2), root=1)
        with pytest.raises(ValueError, match="send dest must be a rank"):
            comm.send(np.ones(2), 3)
    with pytest.raises(ValueError, match=r"rank \(rank table <generated> lists 1 ranks\) must be a rank in 0..0, got 1"):
        ZmqCommunicator(1, table, base_port=free_base_port(1), timeout=5)


def test_port_in_use_is_named():
    import socket

    port = free_base_port(1)
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 0)
        s.bind(("127.0.0.1", port))
        s.listen()
        with pytest.raises(CommError, match=rf"rank 0 of 1: cannot listen on tcp://127.0.0.1:{port} .*choose another base_port"):
            ZmqCommunicator(0, generate_rank_table([("127.0.0.1", [0])]), base_port=port, timeout=5)


def test_server_id_not_on_this_host_is_named(tmp_path):
    table = RankTable.from_dict({
        "version": "1.0", "server_count": "1", "status": "completed",
        "server_list": [{"server_id": "192.0.2.1", "device": [{"device_id": "0", "device_ip": "127.0.0.1", "rank_id": "0"}],
                         "host_nic_ip": "reserve"}],
    })
    with pytest.raises(CommError) as info:
        ZmqCommunicator(0, table, base_port=free_base_port(1), timeout=5)
    msg = str(info.value)
    # The rank, its server_id and this host's addresses; the device_ip (here an address of this host) is not used.
    assert re.search(r"rank 0 of 1: cannot listen on tcp://192\.0\.2\.1:\d+ .*rank 0's server_id '192\.0\.2\.1' "
                     r"is not an address of this host \(this host: 127\.0\.0\.1, ", msg), msg
    assert "start rank 0 on that server" in msg
    table = generate_rank_table([("no-such-host.invalid", [0])], hccn_conf=None)
    with pytest.raises(CommError, match=r"rank 0: cannot resolve its server_id 'no-such-host.invalid' .*this host's addresses are 127\.0\.0\.1"):
        ZmqCommunicator(0, table, base_port=free_base_port(1), timeout=5)


def test_device_ip_is_not_where_ranks_listen():
    # A real table's device_ip is the NPU's address, which this host does not have; the rank listens on server_id.
    table = generate_rank_table([("127.0.0.1", [0])], {("127.0.0.1", 0): "192.1.27.6"}, hccn_conf=None)
    assert table.device(0).device_ip == "192.1.27.6" and "192.1.27.6" not in this_host_addresses()
    port = free_base_port(1)
    with ZmqCommunicator(0, table, base_port=port, timeout=5) as comm:
        assert comm.endpoints == [f"tcp://127.0.0.1:{port}"]
        assert comm.allreduce(np.arange(3)).tolist() == [0, 1, 2]


def test_server_named_by_host_name():
    # The server id may be a name; it is resolved when binding and connecting.
    table = generate_rank_table([("localhost", [0])], hccn_conf=None)
    assert table.device(0).device_ip is None
    with ZmqCommunicator(0, table, base_port=free_base_port(1), timeout=5) as comm:
        assert comm.endpoints[0].startswith("tcp://localhost:")
        assert comm.allgather(np.arange(3)).tolist() == [0, 1, 2]


# -- a rank stopped in the handshake leaves no shared memory ------------------------------
def _start_rank_0(tmp_path, n: int, mode: str):
    """Rank 0 of ``n`` in its own process (the others are left to the test); returns (process, port, marker)."""
    table = write_local_table(tmp_path / "t.json", n)
    port = free_base_port(n)
    env, marker = env_with_marker()
    env["ORCH_SHM_MODE"] = mode
    code = f"from ranks import ZmqCommunicator; ZmqCommunicator(0, {str(table)!r}, base_port={port}, timeout=60)"
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:  # listening: it is in the handshake
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            break
        except OSError:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0]
            time.sleep(0.05)
    return proc, port, marker


def _stop(proc, sig) -> None:
    proc.send_signal(sig)
    try:
        proc.wait(10)  # promptly: no handler of ours stands between a waiting rank and SIGTERM
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
    assert proc.returncode == -sig, proc.returncode


def _segments_of(pid: int) -> list[str]:
    return [info.name for info in shared_memory.segments(pid)]


def _next_rank_starts(port: int) -> None:
    """Another rank on this host starts (a one-rank job is enough): it sweeps what dead ranks left."""
    code = (f"from ranks import ZmqCommunicator, generate_rank_table; "
            f"ZmqCommunicator(0, generate_rank_table([('127.0.0.1', [0])]), base_port={port}, timeout=5).close()")
    env, marker = env_with_marker()
    subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, check=True, timeout=60)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["auto", "named"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_rank_stopped_while_waiting_for_a_peer_leaves_no_segment(tmp_path, sig, mode):
    # The peer never comes (a missing shard, a port in use, Ctrl-C to the launcher): rank 0 waits for its hello.
    proc, port, marker = _start_rank_0(tmp_path, 2, mode)
    try:
        time.sleep(0.3)
        assert _segments_of(proc.pid) == []  # nothing is made before every rank has said hello
        _stop(proc, sig)
        assert _segments_of(proc.pid) == []
        assert not [n for n in orch_segments() if n.startswith(f"orch_zmq_{proc.pid}_")]
    finally:
        assert_none_left(marker)


class _FakeRank1:
    """Rank 1 of 2 made by hand: says hello, takes rank 0's ready (with the segment), then never answers."""

    def __init__(self, port: int):
        self.ctx = zmq.Context()
        self.router = self.ctx.socket(zmq.ROUTER)
        self.router.bind(f"tcp://127.0.0.1:{port + 1}")
        self.dealer = self.ctx.socket(zmq.DEALER)
        self.dealer.setsockopt(zmq.ROUTING_ID, b"1")
        self.dealer.connect(f"tcp://127.0.0.1:{port}")
        hello = {"rank": 1, "size": 2, "host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
                 "mnt_ns": _namespace("mnt"), "pid_ns": _namespace("pid"), "chunk": 1 << 20, "base_port": port}
        self.dealer.send_multipart([_encode_header(_HELLO, 0, None, 0), json.dumps(hello).encode()])

    def offered_segment(self, timeout: float = 20) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.router.poll(100):
                frames = self.router.recv_multipart()
                if _HEAD.unpack_from(frames[1])[1] == _READY:
                    ready = json.loads(frames[2])
                    assert ready["shm"], ready
                    return ready["segment"]
        raise AssertionError("rank 0 sent no ready")

    def close(self) -> None:
        self.ctx.destroy(linger=0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("mode", ["memfd", "named"])
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_rank_0_stopped_while_its_segment_waits_for_the_peers(tmp_path, sig, mode):
    # The one window a segment exists before its name goes: after every hello, before every ready.
    proc, port, marker = _start_rank_0(tmp_path, 2, mode)
    peer = _FakeRank1(port)
    try:
        handle = peer.offered_segment()
        name = handle.partition("@")[0]
        assert name.startswith(f"orch_zmq_{proc.pid}_")
        assert _segments_of(proc.pid) == [name]
        assert ("@" in handle) == (mode == "memfd")
        assert (name in os.listdir("/dev/shm")) == (mode == "named")
        _stop(proc, sig)
        if mode == "named" and sig == signal.SIGKILL:
            assert name in os.listdir("/dev/shm")  # SIGKILL cannot be caught: the name outlives its owner ...
            _next_rank_starts(free_base_port(1))  # ... until the next rank on this host sweeps it
        assert name not in os.listdir("/dev/shm")
        assert _segments_of(proc.pid) == []
    finally:
        peer.close()
        assert_none_left(marker)
