"""The zmq backend across two network namespaces joined by a veth pair: two "hosts", two ranks each.

Addressed by ``rank_tables/two_hosts_2x2.json``: each namespace's address is its server's
``server_id`` (10.77.0.1 and 10.77.0.2), where its ranks listen; the ``device_ip`` entries are
NPU addresses that neither namespace has, as in a real HCCL table. Needs root and ``ip``
(iproute2); skipped with the reason otherwise. The namespaces are created by the test and
always deleted; no traffic leaves them.
"""

from __future__ import annotations

import re

import pytest

from netns_helpers import skip_reason, veth_hosts
from ranks import RankTable
from tests.comm_procs import ROOT, TESTS, free_base_port, run_ranks

pytestmark = pytest.mark.multiprocess

TABLE = ROOT / "rank_tables" / "two_hosts_2x2.json"


@pytest.fixture
def two_hosts():
    reason = skip_reason()
    if reason:
        print(f"SKIPPED test_comm_netns: {reason}")
        pytest.skip(reason)
    addresses = RankTable.load(TABLE).servers()  # server_id: ["10.77.0.1", "10.77.0.2"]
    with veth_hosts(addresses) as hosts:
        yield {host.address: host for host in hosts}


@pytest.mark.timeout(150)
def test_zmq_across_two_namespaces(two_hosts):
    host_at = two_hosts
    table = RankTable.load(TABLE)
    assert not {d.device_ip for d in table.devices} & set(host_at)  # the sockets cannot be using device_ip
    port = free_base_port(table.world_size)  # the namespaces are empty; any port works there
    sent_before = {host: host.bytes_sent() for host in host_at.values()}
    prefix = [["ip", "netns", "exec", host_at[d.server_id].namespace] for d in table.devices]
    commands = [
        [str(TESTS / "comm_check.py"), "zmq", str(r), str(table.world_size), str(TABLE), str(port), "auto"]
        for r in range(table.world_size)
    ]
    results, seconds = run_ranks(commands, timeout=140, prefix=prefix)
    for rank, (code, out) in enumerate(results):
        assert code == 0, f"rank {rank}:\n{out}"
        assert re.search(rf"CHECKED rank {rank} of 4: \d+ cases, backend zmq, path tcp", out), out
    for host, before in sent_before.items():
        # Real traffic crossed the veth pair: at least the large arrays, both ways.
        assert host.bytes_sent() - before > 3_000_000, host.namespace
