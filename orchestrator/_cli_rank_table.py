"""``orchestrate rank-table ...``: write (or check) an HCCL version 1.0 rank table."""

from __future__ import annotations

import sys


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "rank-table",
        help="generate an HCCL rank table (or --check an existing one)",
        description=(
            "Generate an HCCL version 1.0 rank table: every --server gets the same --devices, "
            "ranks are numbered server by server in the order given. "
            "Example: orchestrate rank-table --devices 0,1 --server 127.0.0.1 -o rank_tables/local_2p.json"
        ),
    )
    parser.add_argument("--devices", help="comma-separated device ids on each server, e.g. 0,1")
    parser.add_argument(
        "--server",
        action="append",
        default=[],
        metavar="HOST",
        help="a server id (host name or IP); repeat for several servers",
    )
    parser.add_argument("--servers", help="comma-separated server ids (same as repeating --server)")
    parser.add_argument(
        "--device-ip",
        action="append",
        default=[],
        metavar="SERVER:DEVICE=IP",
        help="the IP of one device (default: the server id when it is an IP address)",
    )
    parser.add_argument("-o", "--output", help="file to write (default: print to stdout)")
    parser.add_argument("--check", metavar="TABLE", help="validate TABLE and print its ranks instead of generating")
    parser.set_defaults(func=_run)


def _parse_ints(text: str, what: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise SystemExit(f"orchestrate rank-table: {what} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise SystemExit(f"orchestrate rank-table: {what} is empty")
    return values


def _run(args) -> int:
    from ranks import RankTable, RankTableError, generate_rank_table

    if args.check:
        try:
            table = RankTable.load(args.check)
        except RankTableError as exc:
            print(f"orchestrate rank-table: {exc}", file=sys.stderr)
            return 1
        print(f"{table.source}: version {table.version}, {table.server_count} server(s), {table.world_size} rank(s)")
        for d in table.devices:
            print(f"  rank {d.rank_id}: server {d.server_id} device {d.device_id} address {d.address}")
        return 0

    if not args.devices:
        print("orchestrate rank-table: --devices is required (e.g. --devices 0,1)", file=sys.stderr)
        return 2
    servers = list(args.server)
    if args.servers:
        servers += [s.strip() for s in args.servers.split(",") if s.strip()]
    if not servers:
        print("orchestrate rank-table: give at least one --server HOST (or --servers h1,h2)", file=sys.stderr)
        return 2
    devices = _parse_ints(args.devices, "--devices")
    device_ips: dict[tuple[str, int], str] = {}
    for item in args.device_ip:
        try:
            key, ip = item.split("=", 1)
            server, device = key.rsplit(":", 1)
            device_ips[(server, int(device))] = ip
        except ValueError:
            print(f"orchestrate rank-table: --device-ip must look like SERVER:DEVICE=IP, got {item!r}", file=sys.stderr)
            return 2
    try:
        table = generate_rank_table([(s, devices) for s in servers], device_ips)
    except RankTableError as exc:
        print(f"orchestrate rank-table: {exc}", file=sys.stderr)
        return 1
    if args.output:
        table.dump(args.output)
        print(f"wrote {args.output}: {table.server_count} server(s), {table.world_size} rank(s)", file=sys.stderr)
    else:
        import json

        json.dump(table.to_dict(), sys.stdout, indent=4)
        sys.stdout.write("\n")
    return 0

