"""HCCL rank tables: parsing, one test per validation error, the generator and its CLI."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ranks import RankDevice, RankTable, RankTableError, generate_rank_table
from ranks._rank_table import read_hccn_conf, this_host_addresses

ROOT = Path(__file__).resolve().parents[1]

GOOD = {
    "version": "1.0",
    "server_count": "2",
    "server_list": [
        {
            "server_id": "10.0.0.1",
            "device": [
                {"device_id": "0", "device_ip": "192.168.0.10", "rank_id": "0"},
                {"device_id": "1", "device_ip": "192.168.0.11", "rank_id": "1"},
            ],
            "host_nic_ip": "reserve",
        },
        {
            "server_id": "node-b",
            "device": [
                {"device_id": "0", "rank_id": "3"},
                {"device_id": "1", "rank_id": "2"},
            ],
            "host_nic_ip": "10.0.0.2",
        },
    ],
    "status": "completed",
}


def good():
    return copy.deepcopy(GOOD)


def test_parse_good_table():
    table = RankTable.from_dict(good())
    assert table.version == "1.0"
    assert table.server_count == 2
    assert table.world_size == 4
    assert [d.rank_id for d in table.devices] == [0, 1, 2, 3]
    assert table.device(0) == RankDevice(0, 0, "10.0.0.1", "192.168.0.10", "reserve")
    # The rank is reached at its host (server_id); device_ip is the NPU's own address, kept as read.
    assert table.device(0).address == "10.0.0.1" and table.device(0).device_ip == "192.168.0.10"
    assert table.device(0).host_nic_address is None  # "reserve" is a placeholder, not an address
    assert table.device(3) == RankDevice(3, 0, "node-b", None, "10.0.0.2")
    assert table.device(3).address == "node-b" and table.device(3).host_nic_address == "10.0.0.2"
    assert table.servers() == ["10.0.0.1", "node-b"]
    assert [d.rank_id for d in table.devices_on_server("node-b")] == [2, 3]
    assert table.source == "<dict>"
    with pytest.raises(RankTableError, match=r"no rank 4; it lists ranks 0\.\.3"):
        table.device(4)


def test_host_nic_ip_placeholders_are_not_addresses():
    for value in (None, "", "reserve", "RESERVE", " reserve "):
        assert RankDevice(0, 0, "h", None, value).host_nic_address is None, value
    assert RankDevice(0, 0, "h", None, "10.1.2.3").host_nic_address == "10.1.2.3"


def test_local_devices():
    table = RankTable.from_dict(good())
    assert [d.rank_id for d in table.local_devices(["node-b"])] == [2, 3]
    assert [d.rank_id for d in table.local_devices(["10.0.0.1"])] == [0, 1]  # server_id
    assert [d.rank_id for d in table.local_devices(["10.0.0.2"])] == [2, 3]  # host_nic_ip, when it is an address
    assert table.local_devices(["192.168.0.11"]) == []  # device_ip is the NPU's address, not the host's
    assert table.local_devices(["reserve"]) == []  # never an address
    assert table.local_devices(["elsewhere"]) == []
    for name in ("local_2p.json", "hccl_2p_01_127.0.0.1.json"):
        local = RankTable.load(ROOT / "rank_tables" / name)
        assert [d.rank_id for d in local.local_devices()] == [0, 1], name  # 127.0.0.1 is always this host


def test_shipped_tables_are_valid():
    sizes = {"local_2p.json": (1, 2), "local_4p.json": (1, 4), "two_hosts_2x2.json": (2, 4), "hccl_2p_01_127.0.0.1.json": (1, 2)}
    for name, (servers, ranks) in sizes.items():
        table = RankTable.load(ROOT / "rank_tables" / name)
        assert (table.server_count, table.world_size) == (servers, ranks), name
        raw = json.loads((ROOT / "rank_tables" / name).read_text())
        assert [s["host_nic_ip"] for s in raw["server_list"]] == ["reserve"] * servers, name
        assert table.to_dict() == raw, name
    assert set(sizes) == {p.name for p in (ROOT / "rank_tables").glob("*.json")}
    two = RankTable.load(ROOT / "rank_tables" / "two_hosts_2x2.json")
    # The namespaces' addresses are the servers' ids; the device_ips are NPU addresses the namespaces do not have.
    assert [d.address for d in two.devices] == ["10.77.0.1", "10.77.0.1", "10.77.0.2", "10.77.0.2"]
    assert not {d.device_ip for d in two.devices} & {"10.77.0.1", "10.77.0.2"}


def test_shipped_hccl_tools_table_is_byte_for_byte_what_hccl_tools_writes():
    path = ROOT / "rank_tables" / "hccl_2p_01_127.0.0.1.json"  # hccl_tools.py's own file name for it
    text = path.read_text()
    data = json.loads(text)
    assert text == json.dumps(data, indent=4)  # json.dump(table, f, indent=4), as hccl_tools.py does
    assert list(data) == ["version", "server_count", "server_list", "status"]
    assert [list(s) for s in data["server_list"]] == [["server_id", "device", "host_nic_ip"]]
    assert data["server_list"][0]["server_id"] == "127.0.0.1" and data["server_list"][0]["host_nic_ip"] == "reserve"
    devices = data["server_list"][0]["device"]
    assert [list(d) for d in devices] == [["device_id", "device_ip", "rank_id"]] * 2
    assert [d["device_ip"] for d in devices] == ["192.1.27.6", "192.2.27.6"]
    # The point of the example: NPU addresses that this host does not have.
    assert not {d["device_ip"] for d in devices} & this_host_addresses()


# -- one test per validation error ---------------------------------------------------
def _error(data, tmp_path=None) -> str:
    with pytest.raises(RankTableError) as info:
        RankTable.from_dict(data, source="t.json")
    return str(info.value)


def test_error_duplicate_rank_id():
    data = good()
    data["server_list"][1]["device"][0]["rank_id"] = "1"
    msg = _error(data)
    assert "t.json" in msg and "server 'node-b' device[0]" in msg
    assert "field 'rank_id' 1 is already used on server '10.0.0.1'" in msg


def test_error_missing_rank_id_gap():
    data = good()
    data["server_list"][1]["device"][0]["rank_id"] = "7"
    msg = _error(data)
    assert "field 'rank_id': ranks must be exactly 0..3 for 4 device(s); missing [3], out of range [7]" in msg


@pytest.mark.parametrize("server_id, problem", [
    ("999.1.1.1", "is not a valid IPv4 address"),
    ("10.0.0", "is not a valid IPv4 address"),
    ("not an ip!", "is not a valid host name (letters, digits, '-' and '_' in dot-separated labels)"),
    ("-node", "is not a valid host name (letters, digits, '-' and '_' in dot-separated labels)"),
])
def test_error_server_id_that_is_no_address(server_id, problem):
    """A typo fails when the table is read (`rank-table --check` too), not when a rank tries to reach it."""
    data = good()
    data["server_list"][0]["server_id"] = server_id
    msg = _error(data)
    assert f"server_list[0]: field 'server_id' {server_id!r} {problem}; expected a host name or IP address" in msg


def test_error_device_ip_that_is_no_address_or_is_another_devices():
    data = good()
    data["server_list"][0]["device"][1]["device_ip"] = "192.168.0.x"
    assert "server '10.0.0.1' device[1]: field 'device_ip' '192.168.0.x' is not an IP address" in _error(data)
    data = good()
    data["server_list"][0]["device"][1]["device_ip"] = data["server_list"][0]["device"][0]["device_ip"]
    assert ("server '10.0.0.1' device[1]: field 'device_ip' 192.168.0.10 is already device 0's on this server; "
            "each device has its own") in _error(data)


def test_error_duplicate_device_id_on_server():
    data = good()
    data["server_list"][0]["device"][1]["device_id"] = "0"
    msg = _error(data)
    assert "server '10.0.0.1' device[1]: field 'device_id' 0 appears twice on this server" in msg


def test_error_server_count_disagrees():
    data = good()
    data["server_count"] = "3"
    assert "field 'server_count' is 3 but 'server_list' has 2 server(s)" in _error(data)


def test_error_unknown_version():
    data = good()
    data["version"] = "2.0"
    assert "field 'version' is '2.0'; only version 1.0 is supported" in _error(data)


def test_error_non_string_value():
    data = good()
    data["server_list"][1]["device"][1]["device_id"] = 1
    msg = _error(data)
    assert "server 'node-b' device[1]: field 'device_id' must be a string" in msg and "got int 1" in msg
    data = good()
    data["server_count"] = 2
    assert "field 'server_count' must be a string" in _error(data)
    data = good()
    data["server_list"][0]["server_id"] = 5
    assert "server_list[0]: field 'server_id' must be a string" in _error(data)


def test_error_non_integer_string():
    data = good()
    data["server_list"][0]["device"][0]["rank_id"] = "zero"
    assert "server '10.0.0.1' device[0]: field 'rank_id' must be a non-negative integer written as a string, got 'zero'" in _error(data)


def test_error_missing_required_fields():
    for key in ("version", "server_count", "server_list", "status"):
        data = good()
        del data[key]
        assert f"missing required field {key!r}" in _error(data)
    data = good()
    del data["server_list"][1]["device"][0]["device_id"]
    assert "server 'node-b' device[0]: missing required field 'device_id'" in _error(data)
    data = good()
    del data["server_list"][0]["device"]
    assert "server '10.0.0.1' (server_list[0]): missing required field 'device'" in _error(data)
    data = good()
    del data["server_list"][1]["server_id"]
    assert "server_list[1]: missing required field 'server_id'" in _error(data)


def test_error_status_not_completed():
    data = good()
    data["status"] = "initializing"
    assert "field 'status' is 'initializing'; expected 'completed'" in _error(data)


def test_error_duplicate_server():
    data = good()
    data["server_list"][1]["server_id"] = "10.0.0.1"
    assert "server '10.0.0.1' (server_list[1]): field 'server_id' appears twice" in _error(data)


def test_error_empty_device_list():
    data = good()
    data["server_list"][1]["device"] = []
    assert "server 'node-b' (server_list[1]): field 'device' is empty" in _error(data)


def test_error_wrong_shapes():
    assert "the top level must be a JSON object, got list" in _error([])
    data = good()
    data["server_list"] = {}
    assert "field 'server_list' must be a list, got dict" in _error(data)


def test_error_bad_json_names_line_and_column(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('{\n  "version": "1.0"\n  "status": "completed"\n}\n')
    with pytest.raises(RankTableError) as info:
        RankTable.load(path)
    msg = str(info.value)
    assert str(path) in msg and "invalid JSON at line 3 column 3" in msg


def test_error_missing_file(tmp_path):
    with pytest.raises(RankTableError, match="nope.json: file not found"):
        RankTable.load(tmp_path / "nope.json")


def test_rank_table_error_is_value_error():
    with pytest.raises(ValueError):
        RankTable.from_dict({})


# -- generator and CLI ---------------------------------------------------------------
def test_generator_round_trip(tmp_path):
    table = generate_rank_table(
        [("10.1.0.1", [0, 1]), ("host-b", [2, 5])], {("host-b", 5): "10.2.0.9"}, hccn_conf=None
    )
    assert [(d.rank_id, d.server_id, d.device_id, d.address, d.device_ip) for d in table.devices] == [
        (0, "10.1.0.1", 0, "10.1.0.1", None),
        (1, "10.1.0.1", 1, "10.1.0.1", None),
        (2, "host-b", 2, "host-b", None),
        (3, "host-b", 5, "host-b", "10.2.0.9"),
    ]
    path = tmp_path / "t.json"
    table.dump(path)
    raw = json.loads(path.read_text())
    assert raw["server_count"] == "2" and raw["status"] == "completed" and raw["version"] == "1.0"
    assert raw["server_list"][1]["device"][1] == {"device_id": "5", "device_ip": "10.2.0.9", "rank_id": "3"}
    assert raw["server_list"][0]["device"][0] == {"device_id": "0", "rank_id": "0"}  # no device_ip known: none written
    again = RankTable.load(path)
    assert again.devices == table.devices and again.servers() == table.servers()
    assert again.to_dict() == table.to_dict()
    assert RankTable.from_dict(good()).to_dict() == GOOD


def test_generator_writes_what_hccl_tools_writes(tmp_path):
    table = generate_rank_table([("127.0.0.1", [0, 1])], {("127.0.0.1", 0): "192.1.27.6", ("127.0.0.1", 1): "192.2.27.6"},
                                hccn_conf=None)
    path = tmp_path / "t.json"
    table.dump(path)
    shipped = (ROOT / "rank_tables" / "hccl_2p_01_127.0.0.1.json").read_text()
    assert path.read_text() == shipped + "\n"  # same keys, same order, same strings; we end the file with a newline
    assert json.dumps(table.to_dict(), indent=4) == shipped


def test_generator_reads_hccn_conf(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text(
        "address_0=192.1.27.6\nnetmask_0=255.255.255.0\nnetdetect_0=192.1.27.1\n"
        "address_1=192.2.27.6\nnetmask_1=255.255.255.0\n  address_3 = 192.4.27.6 \n"
    )
    assert read_hccn_conf(conf) == {0: "192.1.27.6", 1: "192.2.27.6", 3: "192.4.27.6"}
    table = generate_rank_table([("127.0.0.1", [0, 1, 2])], hccn_conf=conf)
    assert [d.device_ip for d in table.devices] == ["192.1.27.6", "192.2.27.6", None]  # device 2 has no address_2
    # An explicit device IP wins over the file.
    table = generate_rank_table([("127.0.0.1", [0, 1])], {("127.0.0.1", 1): "10.9.9.9"}, hccn_conf=conf)
    assert [d.device_ip for d in table.devices] == ["192.1.27.6", "10.9.9.9"]
    # This host's hccn.conf describes this host's NPUs only: another server gets no device_ip from it.
    table = generate_rank_table([("127.0.0.1", [0]), ("192.0.2.250", [0])], hccn_conf=conf)
    assert [d.device_ip for d in table.devices] == ["192.1.27.6", None]
    assert [d.device_ip for d in generate_rank_table([("127.0.0.1", [0])], hccn_conf=None).devices] == [None]
    assert [d.device_ip for d in generate_rank_table([("127.0.0.1", [0])], hccn_conf=tmp_path / "absent").devices] == [None]


def test_malformed_hccn_conf_is_named(tmp_path):
    conf = tmp_path / "hccn.conf"
    conf.write_text("address_0=192.1.27.6\naddress_x=192.2.27.6\n")
    with pytest.raises(RankTableError, match=r"hccn.conf line 2: expected address_N=IP \(N a device id\), got 'address_x=192.2.27.6'"):
        generate_rank_table([("127.0.0.1", [0])], hccn_conf=conf)


def test_generator_rejects_duplicate_devices():
    with pytest.raises(RankTableError, match="'device_id' 1 appears twice"):
        generate_rank_table([("h", [1, 1])])


def _cli(*args, cwd=None):
    return subprocess.run(
        [sys.executable, "-m", "orchestrator._cli", "rank-table", *args],
        capture_output=True, text=True, timeout=60, cwd=cwd,
    )


@pytest.mark.cli
def test_cli_generates_the_shipped_tables(tmp_path):
    no_npus = tmp_path / "hccn.conf"
    no_npus.write_text("")  # so that the host's own /etc/hccn.conf, if any, plays no part
    out = tmp_path / "local_2p.json"
    result = _cli("--devices", "0,1", "--server", "127.0.0.1", "--hccn-conf", str(no_npus), "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert out.read_text() == (ROOT / "rank_tables" / "local_2p.json").read_text()
    result = _cli("--devices", "0,1", "--servers", "10.77.0.1,10.77.0.2", "--hccn-conf", str(no_npus),
                  "--device-ips", "10.77.0.1=0:192.1.27.6,1:192.2.27.6", "--device-ips", "10.77.0.2=0:192.1.27.7,1:192.2.27.7")
    assert result.returncode == 0, result.stderr
    assert result.stdout == (ROOT / "rank_tables" / "two_hosts_2x2.json").read_text()
    hccl = (ROOT / "rank_tables" / "hccl_2p_01_127.0.0.1.json").read_text()
    result = _cli("--devices", "0,1", "--server", "127.0.0.1", "--device-ips", "0:192.1.27.6,1:192.2.27.6")
    assert result.returncode == 0, result.stderr
    assert result.stdout == hccl + "\n"
    npus = tmp_path / "npus.conf"
    npus.write_text("address_0=192.1.27.6\nnetmask_0=255.255.0.0\naddress_1=192.2.27.6\n")
    result = _cli("--devices", "0,1", "--server", "127.0.0.1", "--hccn-conf", str(npus))
    assert result.returncode == 0, result.stderr
    assert result.stdout == hccl + "\n"


@pytest.mark.cli
def test_cli_device_ips_errors(tmp_path):
    result = _cli("--devices", "0,1", "--servers", "a,b", "--device-ips", "0:192.1.27.6")
    assert result.returncode == 2 and "names no server, but there are 2 servers; write SERVER=DEVICE:IP" in result.stderr
    result = _cli("--devices", "0", "--server", "a", "--device-ips", "c=0:192.1.27.6")
    assert result.returncode == 2 and "names server 'c', which is not among --server a" in result.stderr
    result = _cli("--devices", "0", "--server", "a", "--device-ips", "192.1.27.6")
    assert result.returncode == 2 and "--device-ips must look like DEVICE:IP,DEVICE:IP" in result.stderr
    result = _cli("--devices", "0", "--server", "a", "--device-ips", "0:999.1.1.1")
    assert result.returncode == 2 and "--device-ips '0:999.1.1.1': '999.1.1.1' is not an IP address" in result.stderr
    result = _cli("--devices", "0", "--server", "a", "--hccn-conf", str(tmp_path / "nope.conf"))
    assert result.returncode == 2 and "nope.conf' does not exist" in result.stderr


@pytest.mark.cli
def test_cli_check_and_errors(tmp_path):
    result = _cli("--check", str(ROOT / "rank_tables" / "local_4p.json"))
    assert result.returncode == 0 and "4 rank(s)" in result.stdout and "rank 3: server 127.0.0.1 device 3 device_ip -" in result.stdout
    result = _cli("--check", str(ROOT / "rank_tables" / "hccl_2p_01_127.0.0.1.json"))
    assert result.returncode == 0 and "rank 1: server 127.0.0.1 device 1 device_ip 192.2.27.6" in result.stdout
    bad = tmp_path / "bad.json"
    data = good()
    data["version"] = "0.9"
    bad.write_text(json.dumps(data))
    result = _cli("--check", str(bad))
    assert result.returncode == 2 and "field 'version' is '0.9'" in result.stderr  # malformed table: usage error
    result = _cli("--server", "h")
    assert result.returncode == 2 and "--devices is required" in result.stderr
    result = _cli("--devices", "0,x", "--server", "h")
    assert result.returncode == 2 and "--devices must be comma-separated integers" in result.stderr
    result = _cli("--devices", "0")
    assert result.returncode == 2 and "at least one --server" in result.stderr
