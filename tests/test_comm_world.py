"""Who a process is and which communicator it gets: in-process checks, then the example as a user runs it."""

from __future__ import annotations

import os

import numpy as np
import pytest

from ranks import (
    ConfigError,
    Identity,
    SingleCommunicator,
    ZmqCommunicator,
    create_communicator,
    export_torchrun_env,
    generate_rank_table,
    resolve_identity,
)
from ranks._world import choose_backend
from tests.comm_procs import ROOT, free_base_port, have_mpirun, run_mpi, run_ranks

LAUNCHER_VARS = ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK", "PMI_RANK", "PMI_SIZE",
                 "RANK", "WORLD_SIZE", "LOCAL_RANK", "ORCH_COMM_BACKEND")


@pytest.fixture
def clean_env(monkeypatch):
    for name in LAUNCHER_VARS:
        # setenv first, so monkeypatch restores the variable's absence too: export_torchrun_env sets
        # RANK/WORLD_SIZE/LOCAL_RANK behind its back, and they must not leak into later tests' ranks.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)
    return monkeypatch


def test_identity_alone(clean_env):
    assert resolve_identity() == Identity(0, 1, 0, 0, "single")


def test_identity_explicit_wins(clean_env):
    clean_env.setenv("RANK", "5")
    clean_env.setenv("WORLD_SIZE", "8")
    assert resolve_identity(rank_id=1, world_size=4, device_id=3) == Identity(1, 4, 3, 3, "explicit")


def test_identity_from_open_mpi_environment(clean_env):
    clean_env.setenv("OMPI_COMM_WORLD_RANK", "3")
    clean_env.setenv("OMPI_COMM_WORLD_SIZE", "4")
    clean_env.setenv("OMPI_COMM_WORLD_LOCAL_RANK", "1")
    clean_env.setenv("RANK", "0")  # mpirun outranks torchrun-style variables
    assert resolve_identity() == Identity(3, 4, 1, 1, "mpi")
    with pytest.raises(ConfigError, match="world size 2 was given, but mpirun started 4 processes"):
        resolve_identity(world_size=2)


def test_identity_from_torchrun_environment(clean_env):
    clean_env.setenv("RANK", "2")
    clean_env.setenv("WORLD_SIZE", "3")
    clean_env.setenv("LOCAL_RANK", "0")
    assert resolve_identity() == Identity(2, 3, 0, 0, "torchrun")
    assert resolve_identity(device_id=7).device_id == 7
    clean_env.delenv("WORLD_SIZE")
    with pytest.raises(ConfigError, match="RANK is set but WORLD_SIZE is not"):
        resolve_identity()


def test_identity_rejects_rank_outside_world(clean_env):
    with pytest.raises(ConfigError, match=r"rank 4 is outside 0..1 \(world size 2\)"):
        resolve_identity(rank_id=4, world_size=2)
    clean_env.setenv("RANK", "x")
    clean_env.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match="RANK='x' is not an integer"):
        resolve_identity()


def test_export_torchrun_env(clean_env):
    export_torchrun_env(Identity(1, 2, 1, 5, "explicit"))
    assert (os.environ["RANK"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("1", "2", "1")


def test_backend_choice(clean_env):
    assert choose_backend() == "single"
    assert choose_backend(rank_table="t.json") == "zmq"
    clean_env.setenv("PMI_SIZE", "2")
    assert choose_backend(rank_table="t.json") == "mpi"  # launched by mpiexec wins over a table
    assert choose_backend("zmq") == "zmq"  # an explicit choice wins over everything
    clean_env.setenv("ORCH_COMM_BACKEND", "single")
    assert choose_backend() == "single"
    clean_env.setenv("ORCH_COMM_BACKEND", "nccl")
    with pytest.raises(ConfigError, match="ORCH_COMM_BACKEND='nccl' is not a communicator backend; use one of mpi, zmq, single"):
        choose_backend()
    with pytest.raises(ConfigError, match="backend='gloo' is not a communicator backend"):
        choose_backend("gloo")


def test_create_single_and_zmq_in_process(clean_env, tmp_path):
    comm = create_communicator(timeout=7)
    assert isinstance(comm, SingleCommunicator) and comm.timeout == 7
    table = tmp_path / "one.json"
    generate_rank_table([("127.0.0.1", [0])]).dump(table)
    ini = tmp_path / "comm.ini"
    ini.write_text(f"[ascend_context]\nrank_table_file={table.name}\n[comm]\ntimeout=9\nbase_port={free_base_port(1)}\n")
    with pytest.raises(ConfigError, match="the zmq backend needs this process's rank"):
        create_communicator(config_file=ini)
    with create_communicator(rank=0, config_file=ini) as comm:
        assert isinstance(comm, ZmqCommunicator) and comm.timeout == 9 and comm.size == 1
        assert comm.allreduce(np.ones(3))[0] == 1
    with pytest.raises(ConfigError, match="the zmq backend needs a rank table"):
        create_communicator("zmq", rank=0)
    with pytest.raises(ConfigError, match="size 3 was asked for, but rank table .* lists 1 ranks"):
        create_communicator(rank=0, size=3, rank_table=table)


EXAMPLE = str(ROOT / "examples" / "allreduce.py")


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
@pytest.mark.skipif(not have_mpirun(), reason="mpirun not found")
def test_example_under_mpirun():
    result, _, _ = run_mpi(2, EXAMPLE, timeout=80)
    assert result.returncode == 0, result.stdout
    for rank in range(2):
        assert f"rank {rank} of 2 (mpi, device {rank}): allreduce -> [3.0, 3.0, 3.0, 3.0] OK" in result.stdout


@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_example_from_a_rank_table(tmp_path):
    ini = tmp_path / "comm.ini"
    ini.write_text(
        f"[ascend_context]\nrank_table_file={ROOT / 'rank_tables' / 'local_2p.json'}\n"
        f"[comm]\nbase_port={free_base_port(2)}\ntimeout=30\n"
    )
    commands = [[EXAMPLE, "--rank_id", str(r), "--device_id", str(r), "--config_file", str(ini)] for r in range(2)]
    results, _ = run_ranks(commands, timeout=80)
    for rank, (code, out) in enumerate(results):
        assert code == 0, out
        assert f"rank {rank} of 2 (zmq, device {rank}): allreduce -> [3.0, 3.0, 3.0, 3.0] OK" in out


def test_result_pool_never_hands_out_memory_still_held():
    from ranks._comm_util import ResultPool

    pool = ResultPool(max_bytes=64 << 20)
    a = pool.empty((1 << 18,), np.float32)  # 1 MB: pooled
    a[:] = 1
    b = pool.empty((1 << 18,), np.float32)
    assert not np.shares_memory(a, b)  # a is held
    view = a[::2]
    del a
    c = pool.empty((1 << 18,), np.float32)
    assert not np.shares_memory(view, c)  # a view still holds the first buffer
    del view
    d = pool.empty((1 << 18,), np.float32)
    assert d.shape == (1 << 18,) and d.dtype == np.float32
    small = pool.empty((10,), np.float64)
    assert small.base is None  # below 1 MB: plain np.empty
    assert len(pool._buffers) <= ResultPool.MAX_BUFFERS
    held = [pool.empty((1 << 18,), np.float32) for _ in range(6)]  # more than the pool keeps: still distinct
    assert not any(np.shares_memory(x, y) for i, x in enumerate(held) for y in held[i + 1:])


def test_identity_from_a_rank_table(clean_env, tmp_path):
    table = generate_rank_table([("127.0.0.1", [4, 6]), ("10.0.0.2", [0, 1])])
    assert resolve_identity(rank_id=1, rank_table=table) == Identity(1, 4, 1, 6, "explicit")
    path = tmp_path / "t.json"
    table.dump(path)
    assert resolve_identity(rank_id=2, rank_table=path) == Identity(2, 4, 0, 0, "explicit")  # first on its server
    assert resolve_identity(rank_id=1, device_id=6, rank_table=path).device_id == 6  # the flag agrees
    # Another device than the table's: two ranks would claim one device, or peers look for it elsewhere.
    with pytest.raises(ConfigError, match=rf"device id 3 was given for rank 1, but rank table {path} gives rank 1 "
                                          rf"device 6 on server 127.0.0.1; pass --device_id 6 \(or leave it out\)"):
        resolve_identity(rank_id=1, device_id=3, rank_table=path)


@pytest.mark.cli
@pytest.mark.multiprocess
@pytest.mark.timeout(90)
def test_example_through_orchestrate_launch_rank_table(tmp_path):
    """The user story end to end: the launcher starts the table's ranks, they all-reduce over zmq."""
    import subprocess
    import sys

    from tests.comm_procs import assert_none_left, env_with_marker

    ini = tmp_path / "comm.ini"
    ini.write_text(
        f"[ascend_context]\nrank_table_file={ROOT / 'rank_tables' / 'local_2p.json'}\n"
        f"[comm]\nbase_port={free_base_port(2)}\ntimeout=30\n"
    )
    env, marker = env_with_marker()
    result = subprocess.run(
        [sys.executable, "-m", "orchestrator._cli", "launch", "rank-table", str(ROOT / "rank_tables" / "local_2p.json"),
         "--config_file", str(ini), "--", sys.executable, EXAMPLE],
        env=env, capture_output=True, text=True, timeout=80, cwd=ROOT,
    )
    assert_none_left(marker)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(2):
        assert f"[rank {rank}] rank {rank} of 2 (zmq, device {rank}): allreduce -> [3.0, 3.0, 3.0, 3.0] OK" in result.stdout


def test_ranks_exports_the_communicators_and_rank_tables():
    import ranks

    assert {
        "MpiCommunicator", "ZmqCommunicator", "SingleCommunicator", "Communicator", "create_communicator",
        "resolve_identity", "export_torchrun_env", "Identity", "RankTable", "RankDevice", "generate_rank_table",
    } <= set(dir(ranks))


def test_single_gathers_a_scalar_like_the_others():
    assert SingleCommunicator(timeout=1).allgather(np.float32(2.5)).shape == (1,)


def test_world_size_without_peers_is_refused_not_a_world_of_one(monkeypatch):
    # fault: RANK/WORLD_SIZE set (as the rank-table launcher and torchrun set them) used to give a silent world of one
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(ConfigError, match=r"RANK=1 and WORLD_SIZE=2 say this process is one of several ranks, but nothing says where its peers are"):
        create_communicator()
    with create_communicator(backend="single") as comm:  # asked for explicitly: fine
        assert comm.size == 1


def test_rank_table_file_variable_is_read(monkeypatch, tmp_path):
    from ranks import generate_rank_table

    table = tmp_path / "t.json"
    generate_rank_table([("127.0.0.1", [0])]).dump(table)
    monkeypatch.setenv("RANK_TABLE_FILE", str(table))
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("ORCH_BASE_PORT", str(free_base_port(1)))
    with create_communicator() as comm:
        assert (comm.backend, comm.rank, comm.size) == ("zmq", 0, 1)
