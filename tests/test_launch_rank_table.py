"""``orchestrate launch rank-table``: one process per local rank of a rank table, watched like the seeds' run.sh."""

from __future__ import annotations

import re
import signal
import sys

import pytest

from conftest import ROOT, orchestrate_command, run_command
from launch_helpers import (
    PROGRAM, ZMQ_PROGRAM, Background, leftovers, new_marker, orch_dirs, pids_in, private_tmp, shm_segments_of,
)
from launchers import RankTableLaunchConfig, RankTableLauncher
from launchers import LaunchError
from ranks import ConfigError, RankTableError, free_base_port

TABLES = ROOT / "rank_tables"


@pytest.fixture
def ini(tmp_path):
    path = tmp_path / "config_file.ini"
    path.write_text(f"[ascend_context]\nrank_table_file={TABLES / 'local_2p.json'}\n")
    return path


def test_each_local_rank_gets_the_seed_flags_and_torchrun_variables(ini):
    launcher = RankTableLauncher(RankTableLaunchConfig(str(TABLES / "two_hosts_2x2.json"), str(ini),
                                                       ["python", "prog.py", "--x"], servers=["10.77.0.2"]))
    assert [(s.rank, list(s.argv), dict(s.env)) for s in launcher.specs] == [
        (rank, [sys.executable, "prog.py", "--x", f"--device_id={device}", f"--rank_id={rank}", f"--config_file={ini}"],
         {"RANK": str(rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(local),
          "RANK_TABLE_FILE": str(TABLES / "two_hosts_2x2.json")})
        for local, (rank, device) in enumerate([(2, 0), (3, 1)])
    ]


def test_a_table_without_this_host_says_which_servers_it_has(ini):
    with pytest.raises(LaunchError, match=r"lists no device for this host: it has servers 10\.77\.0\.1, 10\.77\.0\.2"):
        RankTableLauncher(RankTableLaunchConfig(str(TABLES / "two_hosts_2x2.json"), str(ini), ["p"]))


def test_bad_inputs_are_named(tmp_path, ini):
    with pytest.raises(ConfigError, match="--config_file '.*nope.ini' does not exist"):
        RankTableLaunchConfig(str(TABLES / "local_2p.json"), str(tmp_path / "nope.ini"), ["p"])
    with pytest.raises(ConfigError, match="no program to run"):
        RankTableLaunchConfig(str(TABLES / "local_2p.json"), str(ini), [])
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(RankTableError, match="invalid JSON"):
        RankTableLauncher(RankTableLaunchConfig(str(bad), str(ini), ["p"]))


@pytest.fixture
def zmq_ini(tmp_path):
    path = tmp_path / "zmq.ini"
    path.write_text(f"[ascend_context]\nrank_table_file={TABLES / 'local_2p.json'}\n"
                    f"[comm]\nbase_port={free_base_port(2)}\ntimeout=30\n")
    return path


BAD_INIS = {
    "malformed": ("rank_table_file = x.json\n[ascend_context]\n", r"comes before any \[section\] header"),
    "missing table": ("[ascend_context]\nrank_table_file = nowhere/table.json\n",
                      r"rank_table_file .*nowhere/table\.json.* does not exist"),
    "bad value": ("[comm]\nbase_port = many\n", r"\[comm\] base_port must be an integer"),
}


@pytest.mark.parametrize("kind", BAD_INIS)
def test_the_ini_is_checked_before_any_rank_starts(tmp_path, kind):
    text, message = BAD_INIS[kind]
    bad = tmp_path / "config_file.ini"
    bad.write_text(text)
    with pytest.raises(ConfigError, match=message):
        RankTableLaunchConfig(str(TABLES / "local_2p.json"), str(bad), ["p"])


@pytest.mark.cli
@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", ["malformed", "missing table"])
def test_a_bad_ini_fails_in_one_line_with_exit_code_2_and_starts_nothing(tmp_path, kind):
    text, message = BAD_INIS[kind]
    bad = tmp_path / "config_file.ini"
    bad.write_text(text)
    marker = new_marker()
    result = run_command(orchestrate_command(
        "launch", "rank-table", str(TABLES / "local_2p.json"), "--config_file", str(bad), "--",
        "python", PROGRAM, "--others", "hang", "--marker", marker,
    ), timeout=30)
    assert result.returncode == 2, result.stderr
    assert result.stdout == ""
    [line] = result.stderr.splitlines()  # no rank ran: no "[rank N]" line
    assert line.startswith("orchestrate launch rank-table: error: ") and re.search(message, line), line
    assert not leftovers(marker)


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_two_local_ranks_run_with_their_flags_and_logs(tmp_path, ini):
    marker = new_marker()
    result = run_command(orchestrate_command(
        "launch", "rank-table", str(TABLES / "local_2p.json"), "--config_file", str(ini), "--log-dir", str(tmp_path / "logs"),
        "--", "python", PROGRAM, "--marker", marker,
    ))
    assert result.returncode == 0, result.stderr
    for r in range(2):
        line = f"[rank {r}] hello from rank {r} of 2 pid "
        assert any(l.startswith(line) and l.endswith(f"device {r} config {ini} local_rank {r}")
                   for l in result.stdout.splitlines()), result.stdout
        assert f"[rank {r}] rank {r} says hi on stderr" in result.stderr
        assert f"rank {r} done" in (tmp_path / "logs" / f"rank_{r}.log").read_text()
    assert not leftovers(marker)


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_one_failing_rank_stops_the_rest_and_sets_the_exit_code(ini):
    marker = new_marker()
    result = run_command(orchestrate_command(
        "launch", "rank-table", str(TABLES / "local_4p.json"), "--config_file", str(ini), "--",
        "python", PROGRAM, "--bad-rank", "2", "--bad", "raise", "--others", "hang", "--delay", "0.5", "--marker", marker,
    ))
    assert result.returncode == 1, result.stderr
    report = result.stderr[result.stderr.index("orchestrate launch rank-table: "):]
    assert re.match(r"orchestrate launch rank-table: rank 2 of 4 on host \S+ \(pid \d+\) failed: exit code 1\n", report), report
    assert "    | RuntimeError: rank 2 broke on purpose" in report
    assert "ranks stopped afterwards: 0 (pid" in report and "3 (pid" in report
    assert not leftovers(marker)


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_the_two_host_table_starts_only_this_servers_ranks(ini):
    result = run_command(orchestrate_command(
        "launch", "rank-table", str(TABLES / "two_hosts_2x2.json"), "--config_file", str(ini), "--server", "10.77.0.2",
        "--", "python", PROGRAM,
    ))
    assert result.returncode == 0, result.stderr
    hellos = sorted(l.split(" pid ")[0] for l in result.stdout.splitlines() if "hello" in l)
    assert hellos == ["[rank 2] hello from rank 2 of 4", "[rank 3] hello from rank 3 of 4"]


@pytest.mark.cli
def test_cli_errors_exit_2_with_the_reason(tmp_path, ini):
    result = run_command(orchestrate_command(
        "launch", "rank-table", str(TABLES / "two_hosts_2x2.json"), "--config_file", str(ini), "--", "true"))
    assert result.returncode == 2
    assert "orchestrate launch rank-table: error: rank table" in result.stderr and "--server" in result.stderr
    result = run_command(orchestrate_command(
        "launch", "rank-table", str(TABLES / "local_2p.json"), "--config_file", str(tmp_path / "x.ini"), "--", "true"))
    assert result.returncode == 2 and "x.ini' does not exist" in result.stderr


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(180)
def test_the_per_rank_program_runs_under_the_rank_table_launcher(sample, ini):
    model = sample("mlp")
    result = run_command(orchestrate_command(
        "launch", "rank-table", str(TABLES / "local_2p.json"), "--config_file", str(ini), "--",
        "python", "-m", "ranks", f"--model_path={model}",
    ))
    assert result.returncode == 0, result.stderr
    for r in range(2):
        assert f"[rank {r}] tensor's name is:y data size is:256 tensor elements num is:64" in result.stdout.splitlines()
    result = run_command(orchestrate_command(
        "launch", "rank-table", str(TABLES / "local_2p.json"), "--config_file", str(ini), "--",
        "python", "-m", "ranks", f"--model_path={model}.missing",
    ))
    assert result.returncode == 2  # each rank's own code: a missing model file is a usage error
    assert f"    | error: ModelNotFoundError: model file {model}.missing does not exist" in result.stderr


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_a_second_ctrl_c_does_not_wait_out_the_stop_deadline(ini):
    import time

    marker = new_marker()
    launcher = Background(orchestrate_command(
        "launch", "rank-table", str(TABLES / "local_2p.json"), "--config_file", str(ini), "--stop-timeout", "60", "--",
        "python", PROGRAM, "--others", "ignore-term", "--marker", marker,
    ))
    try:
        launcher.wait_for("waits forever", count=2)
        launcher.interrupt(signal.SIGINT)
        time.sleep(1.0)
        assert launcher.proc.poll() is None  # the ranks ignore SIGTERM: it waits for the deadline
        started = time.monotonic()
        launcher.interrupt(signal.SIGINT)
        assert launcher.finish(30) == 130, launcher.stderr
        assert time.monotonic() - started < 20
    finally:
        launcher.kill()
    assert not leftovers(marker)


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_a_program_that_calls_create_communicator_joins_its_peers(tmp_path, ini, monkeypatch):
    # The launcher exports HCCL's RANK_TABLE_FILE: create_communicator() with no arguments finds the peers
    # (it used to give each rank a silent world of one).
    monkeypatch.setenv("ORCH_BASE_PORT", str(free_base_port(2)))
    program = tmp_path / "join.py"
    program.write_text(
        "import numpy as np\nfrom ranks import create_communicator\n"
        "with create_communicator() as comm:\n"
        "    print('JOINED', comm.backend, comm.rank, comm.size, comm.allreduce(np.ones(2, np.float32))[0], flush=True)\n"
    )
    result = run_command(orchestrate_command(
        "launch", "rank-table", str(TABLES / "local_2p.json"), "--config_file", str(ini), "--", "python", str(program),
    ))
    assert result.returncode == 0, result.stderr
    for r in range(2):
        assert f"[rank {r}] JOINED zmq {r} 2 2.0" in result.stdout, result.stdout


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_the_root_cause_is_the_rank_that_failed_first_not_the_peer_it_took_down(zmq_ini, tmp_path, monkeypatch):
    # rank 1 fails and aborts its communicator; rank 0, waiting in allreduce, fails at once with
    # PeerLostError and exits BEFORE rank 1 (which takes 0.5 s to exit, as a rank freeing models does)
    import time

    tmpdir = private_tmp(monkeypatch, tmp_path)
    marker = new_marker()
    started = time.monotonic()
    result = run_command(orchestrate_command(
        "launch", "rank-table", str(TABLES / "local_2p.json"), "--config_file", str(zmq_ini), "--stop-timeout", "5", "--",
        "python", ZMQ_PROGRAM, "--bad-rank", "1", "--slow-exit", "0.5", "--marker", marker,
    ), timeout=60)
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    assert took < 20, took
    report = result.stderr[result.stderr.index("orchestrate launch rank-table: "):]
    assert re.match(r"orchestrate launch rank-table: rank 1 of 2 on host \S+ \(pid \d+\) failed \(first of 2 failed "
                    r"ranks\): exit code 1\n  at .*; last line of its output:\n"
                    r"    \| error: ShardError: rank 1 was given another rank's shard \(on purpose\)\n", report), report
    assert re.search(r"\nwhat followed \(the other ranks that failed; those that lost a peer come last\):\n  rank 0 on host \S+ \(pid \d+\) failed: "
                     r"exit code 1 at .*: error: PeerLostError: allreduce #2 on rank 0 of 2", report), report
    assert "ranks stopped afterwards" not in report
    # each error line once on the console and once in the report
    assert result.stderr.count("error: ShardError") == 2 and result.stderr.count("error: PeerLostError") == 2
    assert not leftovers(marker)
    assert not shm_segments_of(pids_in(result.stdout.splitlines(), "connected"))
    assert not orch_dirs(tmpdir)


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(180)
def test_python_m_ranks_with_a_wrong_shard_names_it_once_as_the_root_cause(sample, tmp_path, monkeypatch, zmq_ini):
    import shutil

    from orchestrator import shard_model

    tmpdir = private_tmp(monkeypatch, tmp_path)
    shards = tmp_path / "shards"
    shard_model(sample("mlp"), 2, shards, progress=False)
    shutil.copy(shards / "mlp0.onnx", shards / "mlp1.onnx")  # rank 1 gets rank 0's shard
    result = run_command(orchestrate_command(
        "launch", "rank-table", str(TABLES / "local_2p.json"), "--config_file", str(zmq_ini), "--",
        "python", "-m", "ranks", f"--model_path={shards / 'mlp.onnx'}",
    ), timeout=120)
    assert result.returncode == 2, result.stderr  # a ShardError is a usage error (exit code 2), passed through
    line = f"error: ShardError: {shards / 'mlp1.onnx'} is the shard of rank 0, but it was loaded by rank 1"
    assert result.stderr.count(f"[rank 1] {line}") == 1, result.stderr  # the rank printed it once
    report = result.stderr[result.stderr.index("orchestrate launch rank-table: "):]
    assert re.match(r"orchestrate launch rank-table: rank 1 of 2 on host \S+ \(pid \d+\) failed", report), report
    assert report.count(line) == 1, report
    assert not orch_dirs(tmpdir)
