"""HCCL rank tables (version 1.0): parse, validate, generate.

The format, as Ascend's HCCL reads it and MindSpore's ``hccl_tools.py`` writes it::

    {
        "version": "1.0",
        "server_count": "1",
        "server_list": [
            {
                "server_id": "10.155.111.140",
                "device": [
                    {"device_id": "0", "device_ip": "192.1.27.6", "rank_id": "0"},
                    {"device_id": "1", "device_ip": "192.2.27.6", "rank_id": "1"}
                ],
                "host_nic_ip": "reserve"
            }
        ],
        "status": "completed"
    }

What the fields mean, as HCCL defines them:

``server_id``
    the host's own address. Our zmq communicator listens on it: rank r on
    ``server_id : base_port + r``.
``device_ip``
    the NPU's own network address (from ``/etc/hccn.conf`` or ``hccn_tool``),
    on the NPU's NIC, not the host's. Parsed and kept (``RankDevice.device_ip``)
    but never used for our sockets. Optional: MindSpore Lite's own sample
    table has none.
``host_nic_ip``
    ``"reserve"`` in every table hccl_tools writes: a placeholder, never an
    address. Optional; when it holds an IP, that IP also marks the host.

Every value is a string, as HCCL writes them. A table is validated once, when
it is loaded; every error names the field, the server and what was expected.
Rank ids must be exactly 0..N-1 (no duplicates, no gaps), device ids unique
within a server, and ``server_count`` must equal the number of servers.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import socket
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from ._errors import RankTableError

SUPPORTED_VERSIONS = ("1.0",)

_TOP_FIELDS = ("version", "server_count", "server_list", "status")

HCCN_CONF = "/etc/hccn.conf"
"""Where Ascend hosts keep their NPUs' network settings (``address_N=IP`` per device N)."""

RESERVED_HOST_NIC_IP = "reserve"
"""What hccl_tools.py writes as ``host_nic_ip``: a placeholder, not an address."""


@dataclass(frozen=True)
class RankDevice:
    """One rank of a table: which device on which server.

    ``server_id`` is the host's address (where our communicator reaches the
    rank); ``device_ip`` is the NPU's own address, kept but not used for our
    sockets; ``host_nic_ip`` is as written in the table (often ``"reserve"``).
    """

    rank_id: int
    device_id: int
    server_id: str
    device_ip: str | None = None
    host_nic_ip: str | None = None

    @property
    def address(self) -> str:
        """Where a communicator reaches this rank: its host, ``server_id`` (never ``device_ip``)."""
        return self.server_id

    @property
    def host_nic_address(self) -> str | None:
        """``host_nic_ip`` when it is an address; None when absent, empty or ``"reserve"``."""
        return _host_nic_address(self.host_nic_ip)


def _host_nic_address(value: str | None) -> str | None:
    if value is None or value.strip() == "" or value.strip().lower() == RESERVED_HOST_NIC_IP:
        return None
    return value


@dataclass
class RankTable:
    """A validated rank table; ``devices`` sorted by rank id."""

    version: str
    server_count: int
    status: str
    devices: list[RankDevice]
    source: str = "<dict>"
    _server_order: list[str] = field(default_factory=list, repr=False)
    # rank ids of each server in file order, so that to_dict() writes the file back as it was
    _file_order: dict[str, list[int]] = field(default_factory=dict, repr=False)

    # -- construction ----------------------------------------------------------
    @classmethod
    def load(cls, path: str | os.PathLike) -> "RankTable":
        """Read and validate the table at ``path``; raises ``RankTableError``."""
        path = os.fspath(path)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except FileNotFoundError:
            raise RankTableError(f"rank table {path}: file not found") from None
        except OSError as exc:
            raise RankTableError(f"rank table {path}: cannot read it ({exc})") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise RankTableError(
                f"rank table {path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            ) from None
        return cls.from_dict(data, source=path)

    @classmethod
    def from_dict(cls, data, source: str = "<dict>") -> "RankTable":
        """Validate an already-parsed table; raises ``RankTableError``."""
        return _parse(data, source)

    # -- queries ---------------------------------------------------------------
    @property
    def world_size(self) -> int:
        return len(self.devices)

    def device(self, rank_id: int) -> RankDevice:
        """The device of ``rank_id``; ``RankTableError`` when the table has no such rank."""
        if not isinstance(rank_id, int) or not 0 <= rank_id < len(self.devices):
            raise RankTableError(
                f"rank table {self.source}: no rank {rank_id!r}; it lists ranks 0..{len(self.devices) - 1}"
            )
        return self.devices[rank_id]

    def servers(self) -> list[str]:
        """Server ids in file order."""
        return list(self._server_order)

    def devices_on_server(self, server_id: str) -> list[RankDevice]:
        """The devices of ``server_id`` in rank order (empty when the server is not listed)."""
        return [d for d in self.devices if d.server_id == server_id]

    def local_devices(self, host_addresses: Iterable[str] | None = None) -> list[RankDevice]:
        """Devices that belong to this host, in rank order.

        A device is local when its ``server_id`` (or its ``host_nic_ip``, when
        that is an address rather than ``"reserve"``) is one of
        ``host_addresses`` (default: this host's names and IP addresses, plus
        ``127.0.0.1`` and ``localhost``). ``device_ip`` plays no part: it is
        the NPU's address, not the host's.
        """
        addresses = set(host_addresses) if host_addresses is not None else this_host_addresses()
        return [d for d in self.devices if d.server_id in addresses or d.host_nic_address in addresses]

    # -- output ----------------------------------------------------------------
    def to_dict(self) -> dict:
        """The table in HCCL's JSON shape, every value a string, keys in hccl_tools.py's order."""
        server_list = []
        for server_id in self._server_order:
            order = self._file_order.get(server_id)
            if order is None:
                devices = self.devices_on_server(server_id)
            else:
                devices = [self.devices[r] for r in order]
            entry: dict = {"server_id": server_id, "device": []}
            for d in devices:
                dev = {"device_id": str(d.device_id)}
                if d.device_ip is not None:
                    dev["device_ip"] = d.device_ip
                dev["rank_id"] = str(d.rank_id)
                entry["device"].append(dev)
            host_nic = next((d.host_nic_ip for d in devices if d.host_nic_ip is not None), None)
            if host_nic is not None:
                entry["host_nic_ip"] = host_nic
            server_list.append(entry)
        return {
            "version": self.version,
            "server_count": str(self.server_count),
            "server_list": server_list,
            "status": self.status,
        }

    def dump(self, path: str | os.PathLike) -> None:
        """Write the table as indented JSON to ``path``."""
        with open(path, "w", encoding="utf-8") as f:
            json.dump(self.to_dict(), f, indent=4)
            f.write("\n")


def this_host_addresses() -> set[str]:
    """Names and IP addresses by which this host knows itself (loopback included)."""
    names = {"127.0.0.1", "localhost", "::1"}
    for name in (socket.gethostname(), socket.getfqdn()):
        if not name:
            continue
        names.add(name)
        try:
            for info in socket.getaddrinfo(name, None):
                names.add(info[4][0])
        except OSError:
            pass
    names |= _interface_addresses()
    return names


def _interface_addresses() -> set[str]:
    """IPv4 and IPv6 addresses of this host's interfaces (inside a network namespace: its own)."""
    import psutil

    return {
        address.address.split("%", 1)[0]  # an IPv6 link-local address carries its interface: fe80::1%eth0
        for addresses in psutil.net_if_addrs().values()
        for address in addresses
        if address.family in (socket.AF_INET, socket.AF_INET6)
    }


def read_hccn_conf(path: str | os.PathLike = HCCN_CONF) -> dict[int, str]:
    """The NPU addresses in an ``/etc/hccn.conf``: {device id: IP} from its ``address_N=IP`` lines.

    Other lines (``netmask_N``, ``gateway_N``, ...) are ignored, as hccl_tools.py
    ignores them. Raises ``OSError`` when the file cannot be read and
    ``RankTableError`` for an ``address_`` line that is not ``address_N=IP``.
    """
    path = os.fspath(path)
    found: dict[int, str] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            text = line.strip()
            if not text.startswith("address_"):
                continue
            key, sep, value = text.partition("=")
            device = key[len("address_"):].strip()
            value = value.strip()
            if not sep or not device.isdigit() or not value:
                raise RankTableError(f"{path} line {number}: expected address_N=IP (N a device id), got {text!r}")
            found[int(device)] = value
    return found


def generate_rank_table(
    servers: Sequence[tuple[str, Sequence[int]]],
    device_ips: dict[tuple[str, int], str] | None = None,
    *,
    hccn_conf: str | os.PathLike | None = HCCN_CONF,
    host_nic_ips: dict[str, str] | None = None,
) -> RankTable:
    """A table for ``servers`` = [(server_id, [device ids]), ...], ranks numbered in order.

    Written as hccl_tools.py writes one: ``host_nic_ip`` is ``"reserve"``
    (``host_nic_ips`` maps server_id to something else), and a device's
    ``device_ip`` (its NPU's address) comes from ``device_ips``, a map
    (server_id, device_id) -> IP, else, for a server that is this host, from
    ``hccn_conf`` (default ``/etc/hccn.conf``, read when it exists; None: not
    read); with neither, the device has no ``device_ip``. ``server_id`` is
    written as given: it must be the host's address (or a name that resolves
    to it), since that is where the ranks listen.
    Raises ``RankTableError`` for a table that does not validate or an
    unreadable or malformed ``hccn_conf``.
    """
    device_ips = device_ips or {}
    host_nic_ips = host_nic_ips or {}
    from_conf: dict[int, str] = {}
    if hccn_conf is not None and os.path.exists(hccn_conf):
        try:
            from_conf = read_hccn_conf(hccn_conf)
        except OSError as exc:
            raise RankTableError(f"cannot read {os.fspath(hccn_conf)}: {exc}") from None
    local = this_host_addresses() if from_conf else set()
    server_list = []
    rank = 0
    for server_id, device_ids in servers:
        devices = []
        for device_id in device_ids:
            dev = {"device_id": str(device_id)}
            ip = device_ips.get((server_id, int(device_id)))
            if ip is None and server_id in local:
                ip = from_conf.get(int(device_id))
            if ip is not None:
                dev["device_ip"] = ip
            dev["rank_id"] = str(rank)
            rank += 1
            devices.append(dev)
        server_list.append(
            {"server_id": server_id, "device": devices, "host_nic_ip": host_nic_ips.get(server_id, RESERVED_HOST_NIC_IP)}
        )
    data = {
        "version": "1.0",
        "server_count": str(len(server_list)),
        "server_list": server_list,
        "status": "completed",
    }
    return RankTable.from_dict(data, source="<generated>")


# -- validation ------------------------------------------------------------------
def _fail(source: str, where: str, message: str) -> RankTableError:
    return RankTableError(f"rank table {source}: {where}{message}")


def _string(source: str, where: str, obj: dict, key: str, required: bool = True) -> str | None:
    if key not in obj:
        if required:
            raise _fail(source, where, f"missing required field {key!r}")
        return None
    value = obj[key]
    if not isinstance(value, str):
        raise _fail(
            source, where, f"field {key!r} must be a string (HCCL writes every value quoted), got {type(value).__name__} {value!r}"
        )
    return value


def _int_string(source: str, where: str, obj: dict, key: str) -> int:
    text = _string(source, where, obj, key)
    assert text is not None
    stripped = text.strip()
    if not stripped.isdigit():
        raise _fail(source, where, f"field {key!r} must be a non-negative integer written as a string, got {text!r}")
    return int(stripped)


_HOST_LABEL = re.compile(r"[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?")


def _address_problem(text: str) -> str:
    """What is wrong with ``text`` as a host name or IP address ("" when nothing): checked when the table is
    read, so that a typo fails there and not when a rank tries to reach it."""
    try:
        ipaddress.ip_address(text)
        return ""
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", text):
        return "is not a valid IPv4 address"
    if len(text) > 253 or not all(_HOST_LABEL.fullmatch(label) for label in text.rstrip(".").split(".")):
        return "is not a valid host name (letters, digits, '-' and '_' in dot-separated labels)"
    return ""


def _parse(data, source: str) -> RankTable:
    if not isinstance(data, dict):
        raise _fail(source, "", f"the top level must be a JSON object, got {type(data).__name__}")
    for key in _TOP_FIELDS:
        if key not in data:
            raise _fail(source, "", f"missing required field {key!r}")

    version = _string(source, "", data, "version")
    if version not in SUPPORTED_VERSIONS:
        raise _fail(source, "", f"field 'version' is {version!r}; only version {' or '.join(SUPPORTED_VERSIONS)} is supported")
    status = _string(source, "", data, "status")
    if status != "completed":
        raise _fail(source, "", f"field 'status' is {status!r}; expected 'completed' (a table still being assembled cannot be used)")
    server_count = _int_string(source, "", data, "server_count")

    server_list = data["server_list"]
    if not isinstance(server_list, list):
        raise _fail(source, "", f"field 'server_list' must be a list, got {type(server_list).__name__}")
    if server_count != len(server_list):
        raise _fail(
            source,
            "",
            f"field 'server_count' is {server_count} but 'server_list' has {len(server_list)} server(s)",
        )

    devices: list[RankDevice] = []
    server_order: list[str] = []
    rank_owner: dict[int, str] = {}
    for index, server in enumerate(server_list):
        where = f"server_list[{index}]: "
        if not isinstance(server, dict):
            raise _fail(source, where, f"must be an object, got {type(server).__name__}")
        server_id = _string(source, where, server, "server_id")
        assert server_id is not None
        if not server_id:
            raise _fail(source, where, "field 'server_id' is empty; expected a host name or IP address")
        problem = _address_problem(server_id)
        if problem:
            raise _fail(source, where, f"field 'server_id' {server_id!r} {problem}; expected a host name or IP address")
        where = f"server {server_id!r} (server_list[{index}]): "
        if server_id in server_order:
            raise _fail(source, where, "field 'server_id' appears twice; each server must be listed once")
        server_order.append(server_id)
        host_nic_ip = _string(source, where, server, "host_nic_ip", required=False)
        if "device" not in server:
            raise _fail(source, where, "missing required field 'device'")
        device_list = server["device"]
        if not isinstance(device_list, list):
            raise _fail(source, where, f"field 'device' must be a list, got {type(device_list).__name__}")
        if not device_list:
            raise _fail(source, where, "field 'device' is empty; expected at least one device")
        seen_devices: set[int] = set()
        seen_ips: dict[str, int] = {}
        for dev_index, dev in enumerate(device_list):
            dwhere = f"server {server_id!r} device[{dev_index}]: "
            if not isinstance(dev, dict):
                raise _fail(source, dwhere, f"must be an object, got {type(dev).__name__}")
            device_id = _int_string(source, dwhere, dev, "device_id")
            rank_id = _int_string(source, dwhere, dev, "rank_id")
            device_ip = _string(source, dwhere, dev, "device_ip", required=False)
            if device_ip == "":
                raise _fail(source, dwhere, "field 'device_ip' is empty; omit it or give an IP address")
            if device_ip is not None:
                try:
                    ipaddress.ip_address(device_ip)
                except ValueError:
                    raise _fail(source, dwhere, f"field 'device_ip' {device_ip!r} is not an IP address") from None
                if device_ip in seen_ips:
                    raise _fail(source, dwhere, f"field 'device_ip' {device_ip} is already device {seen_ips[device_ip]}'s "
                                                f"on this server; each device has its own")
                seen_ips[device_ip] = device_id
            if device_id in seen_devices:
                raise _fail(source, dwhere, f"field 'device_id' {device_id} appears twice on this server; device ids must be unique per server")
            seen_devices.add(device_id)
            if rank_id in rank_owner:
                raise _fail(
                    source,
                    dwhere,
                    f"field 'rank_id' {rank_id} is already used on server {rank_owner[rank_id]!r}; rank ids must be unique",
                )
            rank_owner[rank_id] = server_id
            devices.append(RankDevice(rank_id, device_id, server_id, device_ip, host_nic_ip))

    expected = set(range(len(devices)))
    missing = sorted(expected - set(rank_owner))
    if missing:
        extra = sorted(set(rank_owner) - expected)
        raise _fail(
            source,
            "",
            f"field 'rank_id': ranks must be exactly 0..{len(devices) - 1} for {len(devices)} device(s); "
            f"missing {missing}" + (f", out of range {extra}" if extra else ""),
        )
    file_order = {s: [d.rank_id for d in devices if d.server_id == s] for s in server_order}
    devices.sort(key=lambda d: d.rank_id)
    return RankTable(
        version=version,
        server_count=server_count,
        status=status,
        devices=devices,
        source=source,
        _server_order=server_order,
        _file_order=file_order,
    )
