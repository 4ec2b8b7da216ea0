"""``orchestrate launch mpi --hostfile`` across two hosts: network namespaces joined by a veth pair.

Each host has its own network namespace, address and hostname (UTS namespace). The launcher, and
so mpirun, runs on the first; mpirun starts its daemon on the second through an rsh agent
(``netns_helpers.write_rsh_agent``) where it would use ssh, and Open MPI's out-of-band channel and
its TCP transport are both kept on the veth subnet. No name resolution is needed: the agent maps
host names to namespaces, and the daemons and ranks find each other by the addresses they exchange.

Needs root, ``ip`` (iproute2), ``unshare`` and ``hostname``; skipped with the reason otherwise.
The namespaces are created per test with unique names and always deleted.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import re
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import orchestrate_command, run_command
from launch_helpers import PROGRAM, Background, leftovers, new_marker
from netns_helpers import Host, namespaces, skip_reason, veth_hosts, wait_until_empty, write_rsh_agent

pytestmark = [pytest.mark.multiprocess, pytest.mark.cli]

# Prints where the rank runs, then becomes the program: "$$" is the program's pid after exec.
# (The launcher turns only a FIRST word "python" into this interpreter, hence sys.executable.)
SAY_HOST = ["sh", "-c", 'echo "on host $(hostname) pid $$"; exec "$@"', "sh"]
_ON_HOST = re.compile(r"^\[rank (\d+)\] on host (\S+) pid (\d+)$", re.MULTILINE)


@dataclass
class TwoHosts:
    hosts: list[Host]
    hostfile: Path
    agent: Path
    subnet: str

    def launch(self, *args: str) -> list[str]:
        """``orchestrate launch mpi -n 2 --hostfile ...`` as typed on the first host, then ``args``."""
        return self.hosts[0].command(orchestrate_command(
            "launch", "mpi", "-n", "2", "--hostfile", str(self.hostfile),
            "--mca", "plm_rsh_agent", str(self.agent),
            "--mca", "oob_tcp_if_include", self.subnet,
            "--mca", "btl", "self,tcp",
            "--mca", "btl_tcp_if_include", self.subnet,
            *args,
        ))


@contextlib.contextmanager
def two_hosts(tmp_path: Path):
    """Two hosts, a hostfile naming them (one slot each) and the rsh agent; checks nothing is left after."""
    reason = skip_reason(hostnames=True)
    if reason:
        print(f"SKIPPED {__name__}: {reason}")
        pytest.skip(reason)
    with veth_hosts() as hosts:
        hostfile = tmp_path / "hostfile"
        hostfile.write_text("".join(f"{host.hostname} slots=1\n" for host in hosts))
        subnet = str(ipaddress.ip_interface(f"{hosts[0].address}/24").network)
        yield TwoHosts(hosts, hostfile, write_rsh_agent(tmp_path / "rsh_agent", hosts), subnet)
        left = wait_until_empty(hosts)
        assert not left, f"processes left on the hosts (mpirun, prted, ranks?): {left}"
    assert not {host.namespace for host in hosts} & namespaces()


def _segments_of(pids) -> list[str]:
    """/dev/shm files the ranks with these pids created (the names carry the creator's pid)."""
    return [name for name in os.listdir("/dev/shm") if any(f"_{pid}_" in name for pid in pids)]


def _ones_like_the_ranks(session) -> dict[str, np.ndarray]:
    # As ranks._rank_program.ones_for: free dimensions set to 1.
    dtypes = {"tensor(float)": np.float32, "tensor(int64)": np.int64, "tensor(int32)": np.int32}
    return {
        i.name: np.ones([d if isinstance(d, int) and d > 0 else 1 for d in i.shape], dtype=dtypes[i.type])
        for i in session.get_inputs()
    }


@pytest.mark.timeout(120)
def test_tensor_parallel_shards_on_two_hosts_match_the_whole_model(tmp_path):
    import onnxruntime as ort

    import orchestrator

    model = orchestrator.write_sample_model("transformer", tmp_path / "transformer.onnx", d_model=32, heads=4, layers=2, ffn=64)
    orchestrator.shard_model(model, 2, tmp_path / "shards", progress=False)
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    expected = dict(zip([o.name for o in session.get_outputs()], session.run(None, _ones_like_the_ranks(session))))

    with two_hosts(tmp_path) as cluster:
        a, b = cluster.hosts
        sent_before = {host: host.bytes_sent() for host in cluster.hosts}
        started = time.monotonic()
        result = run_command(cluster.launch(
            "--timeout", "60", "--stop-timeout", "3", "--",
            *SAY_HOST, sys.executable, "-m", "ranks", f"--model_path={tmp_path / 'shards' / 'transformer.onnx'}",
            f"--output={tmp_path / 'out{rank}.npz'}",
        ), cwd=tmp_path, timeout=90)
        seconds = time.monotonic() - started
        assert result.returncode == 0, result.stdout + result.stderr
        where = {int(rank): (host, int(pid)) for rank, host, pid in _ON_HOST.findall(result.stdout)}
        assert {rank: host for rank, (host, _) in where.items()} == {0: a.hostname, 1: b.hostname}, result.stdout
        for host in cluster.hosts:
            assert host.bytes_sent() > sent_before[host], f"nothing crossed the veth pair from {host.hostname}"
        pids = [pid for _, pid in where.values()]
    print(f"two-host TP=2 run took {seconds:.1f} s")

    for rank in range(2):
        with np.load(tmp_path / f"out{rank}.npz") as got:
            assert sorted(got.files) == sorted(expected)
            for name, want in expected.items():
                np.testing.assert_allclose(got[name], want, rtol=0, atol=1e-4, err_msg=f"rank {rank} output {name}")
    assert not _segments_of(pids)


def _remote_pid(host: Host, what: str, stdout: str) -> int:
    if what == "program":  # rank_program.py prints its pid
        return int(re.search(r"^\[rank 1\] hello from rank 1 of 2 pid (\d+)", stdout, re.MULTILINE).group(1))
    for pid in host.pids():  # the rank's wrapper, as an operator would find it on that host
        try:
            if b"_rank_wrapper.py" in Path(f"/proc/{pid}/cmdline").read_bytes():
                return pid
        except OSError:
            continue
    raise AssertionError(f"no rank wrapper runs on {host.hostname}")


@pytest.mark.timeout(120)
@pytest.mark.parametrize("what", ["program", "wrapper"])
def test_a_rank_killed_on_the_remote_host_is_reported_with_that_host(tmp_path, what):
    marker = new_marker()
    with two_hosts(tmp_path) as cluster:
        a, b = cluster.hosts
        launcher = Background(cluster.launch(
            "--timeout", "60", "--stop-timeout", "3", "--", "python", PROGRAM, "--others", "hang", "--marker", marker,
        ))
        try:
            launcher.wait_for("waits forever", count=2)
            pid = _remote_pid(b, what, launcher.stdout)
            assert pid in b.pids() and pid not in a.pids()
            killed = time.monotonic()
            os.kill(pid, signal.SIGKILL)
            code = launcher.finish(30)
            seconds = time.monotonic() - killed
        finally:
            launcher.kill()
        print(f"killed the remote {what}: the launcher ended {seconds:.2f} s later")
        if what == "program":
            # The rank's wrapper on the remote host saw it die and said so.
            assert code == 137, launcher.stderr
            assert re.search(
                rf"orchestrate launch mpi: rank 1 of 2 on host {b.hostname} \(pid {pid}\) failed: signal SIGKILL \(9\)",
                launcher.stderr,
            ), launcher.stderr
            # rank 0 is stopped either by the launcher or, first, by mpirun itself (which ends the job at once)
            assert re.search(r"ranks stopped (afterwards|by mpirun before they could report how they ended): 0 \(pid \d+", launcher.stderr), launcher.stderr
        else:
            # With its wrapper gone no record comes: the launcher names the silent rank and its host.
            assert code == 2, launcher.stderr
            assert re.search(rf"before they could report how they ended: 1 \(pid \d+ on host {b.hostname}\)",
                             launcher.stderr), launcher.stderr
        assert seconds < 10, f"the launcher took {seconds:.1f} s to end the job\n{launcher.stderr}"
    assert not leftovers(marker)
