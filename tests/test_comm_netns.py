"""The zmq backend across two network namespaces joined by a veth pair: two "hosts", two ranks each.

Addressed by ``rank_tables/two_hosts_2x2.json``: each namespace's address is its server's
``server_id`` (10.77.0.1 and 10.77.0.2), where its ranks listen; the ``device_ip`` entries are
NPU addresses that neither namespace has, as in a real HCCL table. Needs root and ``ip``
(iproute2); skipped with the reason otherwise. The namespaces are created by the test and
always deleted; no traffic leaves them.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import subprocess

import pytest

from ranks import RankTable
from tests.comm_procs import ROOT, TESTS, free_base_port, run_ranks

pytestmark = pytest.mark.multiprocess

TABLE = ROOT / "rank_tables" / "two_hosts_2x2.json"


def _ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def _skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    probe = f"orchprobe{secrets.token_hex(3)}"
    result = _ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace here: {result.stderr.strip()}"
    _ip("netns", "del", probe, check=False)
    return None


@pytest.fixture
def two_hosts():
    reason = _skip_reason()
    if reason:
        print(f"SKIPPED test_comm_netns: {reason}")
        pytest.skip(reason)
    tag = secrets.token_hex(3)
    table = RankTable.load(TABLE)
    addresses = table.servers()  # server_id: ["10.77.0.1", "10.77.0.2"]
    names = [f"orch{tag}a", f"orch{tag}b"]
    links = [f"ov{tag}a", f"ov{tag}b"]
    try:
        for ns in names:
            _ip("netns", "add", ns)
        _ip("link", "add", links[0], "type", "veth", "peer", "name", links[1])
        for ns, link, address in zip(names, links, addresses):
            _ip("link", "set", link, "netns", ns)
            _ip("-n", ns, "addr", "add", f"{address}/24", "dev", link)
            _ip("-n", ns, "link", "set", link, "up")
            _ip("-n", ns, "link", "set", "lo", "up")
        yield dict(zip(addresses, names)), dict(zip(names, links))
    finally:
        for ns in names:
            _ip("netns", "del", ns, check=False)  # takes its end of the veth pair with it
        _ip("link", "del", links[0], check=False)


def _bytes_sent(ns: str, link: str) -> int:
    out = _ip("-n", ns, "-s", "link", "show", link).stdout
    # the line after "TX:" holds bytes first
    lines = out.splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("TX:"):
            return int(lines[i + 1].split()[0])
    raise AssertionError(out)


@pytest.mark.timeout(150)
def test_zmq_across_two_namespaces(two_hosts):
    namespace_of, link_of = two_hosts
    table = RankTable.load(TABLE)
    assert not {d.device_ip for d in table.devices} & set(namespace_of)  # the sockets cannot be using device_ip
    port = free_base_port(table.world_size)  # the namespaces are empty; any port works there
    sent_before = {ns: _bytes_sent(ns, link) for ns, link in link_of.items()}
    prefix = [["ip", "netns", "exec", namespace_of[d.server_id]] for d in table.devices]
    commands = [
        [str(TESTS / "comm_check.py"), "zmq", str(r), str(table.world_size), str(TABLE), str(port), "auto"]
        for r in range(table.world_size)
    ]
    results, seconds = run_ranks(commands, timeout=140, prefix=prefix)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank}:\n{out}"
        assert re.search(rf"CHECKED rank {rank} of 4: \d+ cases, backend zmq, path tcp", out), out
    for ns, link in link_of.items():
        # Real traffic crossed the veth pair: at least the large arrays, both ways.
        assert _bytes_sent(ns, link) - sent_before[ns] > 3_000_000, ns
