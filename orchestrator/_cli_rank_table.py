"""``orchestrate rank-table ...``: write (or check) an HCCL version 1.0 rank table, as hccl_tools.py writes one."""

from __future__ import annotations

import ipaddress
import sys

from ranks._command_line import UsageError, prepare_output, split_list, write_failed


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rank-table",
        help="generate an HCCL rank table (or --check an existing one)",
        description=(
            "Generate an HCCL version 1.0 rank table in the shape MindSpore's hccl_tools.py writes: every --server "
            "(the host's address, where its ranks listen) gets the same --devices, ranks are numbered server by "
            "server in the order given, host_nic_ip is \"reserve\". A device's device_ip (its NPU's own address) "
            "comes from --device-ips, else from /etc/hccn.conf for a server that is this host, else is left out. "
            "Example: orchestrate rank-table --devices 0,1 --server 127.0.0.1 -o rank_table.json"
        ),
    )
    parser.add_argument("--devices", help="comma-separated device ids on each server, e.g. 0,1")
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="HOST",
        help="a server id: the host's IP address (or a name that resolves to it); for several servers repeat it "
             "or give them comma-separated",
    )
    parser.add_alias("--servers", "--server")  # its comma-separated twin, one name for one idea now
    parser.add_argument(
        "--device-ips",
        action="append",
        default=[],
        metavar="[SERVER=]DEVICE:IP,...",
        help=(
            "NPU addresses by device id, e.g. 0:192.1.27.6,1:192.2.27.6 (overrides /etc/hccn.conf); "
            "with several servers prefix each list with its server, e.g. 10.0.0.1=0:192.1.27.6, and repeat"
        ),
    )
    parser.add_argument(
        "--hccn-conf",
        metavar="PATH",
        help="read device_ip from PATH's address_N=IP lines (default: /etc/hccn.conf when it exists)",
    )
    parser.add_argument("-o", "--output", help="file to write, missing directories created (default: print to stdout)")
    parser.add_argument("--check", metavar="TABLE", help="validate TABLE and print its ranks instead of generating")
    parser.set_defaults(func=_run)


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise UsageError(f"{what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise UsageError(f"{what} is empty")
    return values


def _parse_device_ips(items: list[str], servers: list[str]) -> dict[tuple[str, int], str]:
    """``--device-ips`` values -> {(server_id, device_id): IP}; ``ValueError`` with the reason."""
    found: dict[tuple[str, int], str] = {}
    for item in items:
        server, sep, pairs = item.partition("=")
        if not sep:
            if len(servers) != 1:
                raise ValueError(
                    f"--device-ips {item!r} names no server, but there are {len(servers)} servers; "
                    f"write SERVER=DEVICE:IP,... (e.g. {servers[0]}={item})"
                )
            server, pairs = servers[0], item
        elif server not in servers:
            raise ValueError(f"--device-ips {item!r} names server {server!r}, which is not among --server {', '.join(servers)}")
        for pair in pairs.split(","):
            if not pair.strip():
                continue
            device, colon, ip = pair.strip().partition(":")
            if not colon or not device.strip().isdigit() or not ip.strip():
                raise ValueError(f"--device-ips must look like DEVICE:IP,DEVICE:IP (e.g. 0:192.1.27.6,1:192.2.27.6), got {pair!r}")
            try:
                ipaddress.ip_address(ip.strip())
            except ValueError:
                raise ValueError(f"--device-ips {pair.strip()!r}: {ip.strip()!r} is not an IP address "
                                 f"(e.g. 0:192.1.27.6)") from None
            found[(server, int(device))] = ip.strip()
    return found


def _run(args) -> int:
    """Errors go up to ``orchestrate``'s main: bad flags and malformed tables exit 2, a failed write 1."""
    import os

    from ranks import RankTable, generate_rank_table
    from ranks._rank_table import HCCN_CONF

    if args.check:
        table = RankTable.load(args.check)
        print(f"{table.source}: version {table.version}, {table.server_count} server(s), {table.world_size} rank(s)")
        for d in table.devices:
            print(f"  rank {d.rank_id}: server {d.server_id} device {d.device_id} device_ip {d.device_ip or '-'}")
        return 0

    if not args.devices:
        raise UsageError("--devices is required (e.g. --devices 0,1)")
    servers = split_list(args.server)
    if not servers:
        raise UsageError("give at least one --server HOST (or --server h1,h2)")
    devices = _parse_ints(args.devices, "--devices")
    try:
        device_ips = _parse_device_ips(args.device_ips, servers)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.hccn_conf is not None and not os.path.isfile(args.hccn_conf):
        raise UsageError(f"--hccn-conf {args.hccn_conf!r} does not exist")
    output = prepare_output(args.output, "-o") if args.output else None
    table = generate_rank_table(
        [(s, devices) for s in servers], device_ips, hccn_conf=args.hccn_conf if args.hccn_conf is not None else HCCN_CONF
    )
    if output is not None:
        try:
            table.dump(output)
        except OSError as exc:
            raise write_failed(output, "-o", exc) from None
        print(f"wrote {output}: {table.server_count} server(s), {table.world_size} rank(s)", file=sys.stderr)
    else:
        import json

        json.dump(table.to_dict(), sys.stdout, indent=4)
        sys.stdout.write("\n")
    return 0
