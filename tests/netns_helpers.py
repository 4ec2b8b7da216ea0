"""Two "hosts" on one machine for the multi-host tests: network namespaces joined by a veth pair.

Each host is a network namespace with one end of the pair and a private address on a /24 that
exists nowhere else. Commands run on a host through ``Host.command``: in its network namespace
and, for Open MPI, in a UTS namespace of its own with the host's name (without it both hosts
report the same hostname and Open MPI treats them as one node). ``write_rsh_agent`` writes what
mpirun's ``plm_rsh_agent`` runs instead of ssh to start its daemon on the other host.

Needs root, ``ip`` (iproute2), and for host names ``unshare`` (util-linux) and ``hostname``;
``skip_reason`` says which is missing. ``veth_hosts`` always deletes its namespaces, after
killing whatever still runs in them; no traffic leaves them.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import secrets
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

# Runs the rest of the command line with the host name given as $0, in the new UTS namespace.
_SET_HOSTNAME = 'hostname "$0" && exec "$@"'


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30, check=check)


def skip_reason(*, hostnames: bool = False) -> str | None:
    """Why two hosts cannot be built here (None when they can); ``hostnames``: each with its own name too."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "the ip command (iproute2) is not installed"
    if hostnames:
        for tool, package in (("unshare", "util-linux"), ("hostname", "hostname")):
            if shutil.which(tool) is None:
                return f"the {tool} command ({package}) is not installed"
    probe = f"orchprobe{secrets.token_hex(3)}"
    result = ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace here: {result.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    if hostnames:
        result = subprocess.run(["unshare", "--uts", "sh", "-c", _SET_HOSTNAME, "orchprobe", "true"],
                                capture_output=True, text=True, timeout=30)
        if result.returncode != 0:
            return f"cannot give a process a hostname of its own (unshare --uts): {result.stderr.strip()}"
    return None


@dataclass(frozen=True)
class Host:
    """One "host": a network namespace, its end of the veth pair, its address and its name."""

    namespace: str
    link: str
    address: str
    hostname: str

    def command(self, argv: Sequence[str]) -> list[str]:
        """``argv`` run on this host: in its network namespace, under its own hostname (a new UTS namespace)."""
        return ["ip", "netns", "exec", self.namespace, "unshare", "--uts",
                "sh", "-c", _SET_HOSTNAME, self.hostname, *argv]

    def pids(self) -> list[int]:
        """Processes running in this host's network namespace."""
        out = ip("netns", "pids", self.namespace, check=False).stdout
        return [int(word) for word in out.split() if word.isdigit()]

    def bytes_sent(self) -> int:
        out = ip("-n", self.namespace, "-s", "link", "show", self.link).stdout
        lines = out.splitlines()
        for i, line in enumerate(lines):
            if line.strip().startswith("TX:"):  # the line after it holds bytes first
                return int(lines[i + 1].split()[0])
        raise AssertionError(out)


def namespaces() -> set[str]:
    """Names ``ip netns list`` shows."""
    return {line.split()[0] for line in ip("netns", "list", check=False).stdout.splitlines() if line.strip()}


def free_subnet() -> ipaddress.IPv4Network:
    """A random 10.x.y.0/24 that no interface of this machine's own namespace is on."""
    taken = []
    for line in ip("-o", "-4", "addr", "show", check=False).stdout.splitlines():
        words = line.split()
        if "inet" in words:
            taken.append(ipaddress.ip_interface(words[words.index("inet") + 1]).network)
    while True:
        subnet = ipaddress.ip_network(f"10.{secrets.randbelow(150) + 100}.{secrets.randbelow(255)}.0/24")
        if not any(subnet.overlaps(other) for other in taken):
            return subnet


@contextlib.contextmanager
def veth_hosts(addresses: Sequence[str] | None = None) -> Iterator[list[Host]]:
    """Two hosts joined by a veth pair, at ``addresses`` (default: .1 and .2 of ``free_subnet()``), on a /24.

    Names are unique per call: namespaces ``orch<tag>a``/``b``, hostnames
    ``orchhosta<tag>``/``b``. On the way out, whatever still runs in either
    namespace is killed, then both are deleted (which takes the pair with them).
    """
    if addresses is None:
        subnet = free_subnet()
        addresses = [str(subnet.network_address + 1), str(subnet.network_address + 2)]
    tag = secrets.token_hex(3)
    hosts = [
        Host(namespace=f"orch{tag}{side}", link=f"ov{tag}{side}", address=address, hostname=f"orchhost{side}{tag}")
        for side, address in zip("ab", addresses)
    ]
    try:
        for host in hosts:
            ip("netns", "add", host.namespace)
        ip("link", "add", hosts[0].link, "type", "veth", "peer", "name", hosts[1].link)
        for host in hosts:
            ip("link", "set", host.link, "netns", host.namespace)
            ip("-n", host.namespace, "addr", "add", f"{host.address}/24", "dev", host.link)
            ip("-n", host.namespace, "link", "set", host.link, "up")
            ip("-n", host.namespace, "link", "set", "lo", "up")
        yield hosts
    finally:
        kill_everything_in(hosts)
        for host in hosts:
            ip("netns", "del", host.namespace, check=False)
        ip("link", "del", hosts[0].link, check=False)


def kill_everything_in(hosts: Sequence[Host], wait: float = 5.0) -> list[int]:
    """SIGKILL every process in the hosts' namespaces; returns the pids that were there."""
    found = sorted({pid for host in hosts for pid in host.pids()})
    for pid in found:
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    deadline = time.monotonic() + wait
    while any(host.pids() for host in hosts) and time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def wait_until_empty(hosts: Sequence[Host], wait: float = 5.0) -> dict[str, list[str]]:
    """``{hostname: ["pid command line", ...]}`` of processes still in the namespaces after ``wait`` s."""
    deadline = time.monotonic() + wait
    while True:
        left = {host.hostname: [_describe(pid) for pid in host.pids()] for host in hosts}
        left = {name: pids for name, pids in left.items() if pids}
        if not left or time.monotonic() >= deadline:
            return left
        time.sleep(0.1)


def _describe(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f"{pid} " + f.read().replace(b"\0", b" ").decode("utf-8", "replace").strip()
    except OSError:
        return str(pid)


def write_rsh_agent(path: Path, hosts: Sequence[Host]) -> Path:
    """An executable script for Open MPI's ``plm_rsh_agent``: ``AGENT HOST COMMAND...`` runs COMMAND on HOST.

    mpirun calls its agent as it would call ssh: options it may add for ssh, the
    host name, then the remote command line as words to be joined and run by a
    shell. The agent runs that line in the host's namespaces under the host's name.
    """
    cases = "\n".join(f"    {host.hostname}|{host.address}) ns={host.namespace}; name={host.hostname} ;;" for host in hosts)
    path.write_text(f"""#!/bin/sh
# Open MPI rsh agent for the test's namespaces: as ssh, but into a namespace on this machine.
while [ $# -gt 0 ]; do case "$1" in -*) shift ;; *) break ;; esac; done
host=$1; shift
case "$host" in
{cases}
    *) echo "rsh agent: unknown host $host" >&2; exit 255 ;;
esac
exec ip netns exec "$ns" unshare --uts sh -c 'hostname "$0" && exec sh -c "$*"' "$name" "$@"
""")
    path.chmod(0o755)
    return path
