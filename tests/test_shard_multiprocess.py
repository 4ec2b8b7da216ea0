"""Shards in real rank processes: mpirun, local zmq ranks, failures that must not hang or leak processes."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from orchestrator import ShardedModel, run_sharded, shard_model
from orchestrator import WorkerError
from ranks import ConfigError, InputError

pytestmark = [pytest.mark.multiprocess]


def _expected(path, x):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def _children(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(entry.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    return stat.exists() and stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def transformer_shards(sample, tmp_path_factory):
    source = sample("transformer")
    return source, shard_model(source, 2, tmp_path_factory.mktemp("tr_tp2"), progress=False)


@pytest.mark.timeout(240)
def test_mpi_ranks_match_the_whole_model(sample, transformer_shards, tmp_path):
    source, result = transformer_shards
    x = np.random.default_rng(0).standard_normal((2, 6, 32)).astype(np.float32)
    with ShardedModel(result.model_path, backend="mpi", timeout=120) as model:
        assert model.inputs == ["x"] and model.outputs == ["y"]
        for batch in (x, x[:1]):  # dynamic batch and several requests on the same ranks
            out = model.predict({"x": batch})["y"]
            assert np.max(np.abs(out - _expected(source, batch))) < 1e-5
        # callers on several threads: one request in flight at a time, each gets its own answer
        from concurrent.futures import ThreadPoolExecutor

        batches = [np.random.default_rng(10 + i).standard_normal((1, 4, 32)).astype(np.float32) for i in range(4)]
        with ThreadPoolExecutor(4) as pool:
            outs = list(pool.map(lambda b: model.predict({"x": b})["y"], batches))
        for b, out in zip(batches, outs):
            assert np.max(np.abs(out - _expected(source, b))) < 1e-5
        pids = list(model.pids.values()) + list(model._job.launcher.pids.values())
    assert len(pids) == 3 and not any(_alive(p) for p in pids)  # 2 ranks and mpirun
    # one call, on the MLP, by directory
    mlp = sample("mlp")
    shards = shard_model(mlp, 2, tmp_path / "mlp", progress=False)
    xm = np.random.default_rng(1).standard_normal((5, 64)).astype(np.float32)
    out = run_sharded(shards.model_path.parent, [xm], backend="mpi")["y"]
    assert np.max(np.abs(out - _expected(mlp, xm))) < 1e-5


@pytest.mark.timeout(240)
def test_a_rank_error_reaches_the_caller_and_stops_the_job(transformer_shards):
    _, result = transformer_shards
    model = ShardedModel(result.model_path, backend="mpi", timeout=60)
    try:
        with pytest.raises(InputError, match=r"rank \d of 2 on host .*missing input\(s\) \['x'\]"):
            # predict() checks inputs in the caller; sent past that check, the ranks themselves fail.
            model._request({"wrong": np.ones((1, 2, 32), np.float32)})
        assert not any(_alive(p) for p in list(model.pids.values()) + list(model._job.launcher.pids.values()))
        with pytest.raises(WorkerError, match="closed"):
            model.predict({"x": np.ones((1, 2, 32), np.float32)})
    finally:
        model.close()


@pytest.mark.timeout(240)
def test_a_rank_that_dies_is_reported_without_a_hang(transformer_shards):
    _, result = transformer_shards
    model = ShardedModel(result.model_path, backend="mpi", timeout=60)
    try:
        mpirun = model._job.launcher.pids[-1]
        wrappers = _children(mpirun)
        ranks = [p for w in wrappers for p in _children(w) if b"_sharded_worker" in Path(f"/proc/{p}/cmdline").read_bytes()]
        assert len(ranks) == 2
        victim = next(p for p in ranks if b"OMPI_COMM_WORLD_RANK=1\0" in Path(f"/proc/{p}/environ").read_bytes())
        os.kill(victim, signal.SIGKILL)
        start = time.monotonic()
        # The launchers' report: the first failed rank, its host and pid, how it ended.
        with pytest.raises(WorkerError, match=rf"rank 1 of 2 on host .* \(pid {victim}\) failed: signal SIGKILL"):
            model.predict({"x": np.ones((1, 2, 32), np.float32)})
        assert time.monotonic() - start < 60
    finally:
        model.close()
    assert not any(_alive(p) for p in ranks + wrappers + [mpirun])


def test_tp_that_does_not_match_the_shards(transformer_shards):
    _, result = transformer_shards
    with pytest.raises(ConfigError, match=r"tp=4, but the shards of .*transformer.onnx were made for 2 ranks"):
        ShardedModel(result.model_path, tp=4)


@pytest.mark.timeout(240)
def test_zmq_ranks_from_python(sample, tmp_path):
    pytest.importorskip("ranks._comm_zmq")
    source = sample("mlp")
    shards = shard_model(source, 2, tmp_path, progress=False)
    x = np.random.default_rng(3).standard_normal((3, 64)).astype(np.float32)
    with ShardedModel(shards.model_path, backend="zmq", timeout=120) as model:
        out = model.predict([x])["y"]
        launcher = model._job.launcher
    assert np.max(np.abs(out - _expected(source, x))) < 1e-5
    assert [(e.rank, e.exitcode) for e in launcher.exits()] == [(0, 0), (1, 0)]  # they left on EXIT


@pytest.mark.cli
@pytest.mark.timeout(300)
def test_command_line_launch_mpi_python_m_ranks(sample, tmp_path):
    pytest.importorskip("launchers._mpi")
    pytest.importorskip("ranks._world")  # the per-rank program builds its communicator there
    from conftest import orchestrate_command, run_command

    source = sample("transformer")
    shards = shard_model(source, 2, tmp_path / "shards", progress=False)
    x = np.random.default_rng(4).standard_normal((2, 3, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    out = tmp_path / "out{rank}.npz"
    result = run_command(orchestrate_command(
        "launch", "mpi", "-n", "2", "--", "python", "-m", "ranks", f"--model_path={shards.model_path}",
        f"--input={tmp_path / 'x.npy'}", f"--output={out}", "--thread_num=1",
    ), timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "output data is:" in result.stdout
    for rank in range(2):
        with np.load(str(out).format(rank=rank)) as saved:
            assert np.max(np.abs(saved["y"] - _expected(source, x))) < 1e-5


@pytest.mark.cli
@pytest.mark.timeout(300)
def test_command_line_one_command_per_rank_with_a_rank_table(sample, tmp_path):
    pytest.importorskip("ranks._comm_zmq")
    import sys

    from _shard_helpers import run_ranks_from_a_table

    source = sample("mlp")
    shards = shard_model(source, 2, tmp_path / "shards", progress=False)
    x = np.random.default_rng(5).standard_normal((2, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    run_ranks_from_a_table(tmp_path, lambda rank, ini: [
        sys.executable, "-m", "ranks", f"--model_path={shards.model_path}", f"--device_id={rank}", f"--rank_id={rank}",
        f"--config_file={ini}", f"--input={tmp_path / 'x.npy'}", f"--output={tmp_path / f'out{rank}.npz'}",
        "--thread_num=1", "--quiet"], timeout=240)
    for rank in range(2):
        with np.load(tmp_path / f"out{rank}.npz") as saved:
            assert np.max(np.abs(saved["y"] - _expected(source, x))) < 1e-5


@pytest.mark.timeout(240)
def test_four_mpi_ranks(sample, tmp_path):
    source = sample("transformer")  # 4 heads: one per rank
    shards = shard_model(source, 4, tmp_path, progress=False)
    x = np.random.default_rng(6).standard_normal((1, 5, 32)).astype(np.float32)
    out = run_sharded(shards.model_path, {"x": x}, backend="mpi", timeout=120)["y"]
    assert np.max(np.abs(out - _expected(source, x))) < 1e-5


@pytest.mark.timeout(120)
def test_a_user_error_on_one_mpi_rank_ends_the_job_at_once(tmp_path):
    """Shards of two slicing runs: the rank that notices must not leave its peer waiting out the timeout."""
    from orchestrator import write_sample_model
    from tests.conftest import orchestrate_command, run_command

    opts = {"d_model": 32, "heads": 4, "layers": 1, "ffn": 64}
    a = shard_model(write_sample_model("transformer", tmp_path / "a" / "t.onnx", **opts), 2, tmp_path / "sa", progress=False)
    b = shard_model(write_sample_model("transformer", tmp_path / "b" / "t.onnx", seed=1, **opts), 2, tmp_path / "sb", progress=False)
    (tmp_path / "sa" / "t1.onnx").write_bytes((tmp_path / "sb" / "t1.onnx").read_bytes())
    assert a.model_path.name == b.model_path.name
    started = time.monotonic()
    result = run_command(orchestrate_command("launch", "mpi", "-n", "2", "--", "python", "-m", "ranks",
                                             f"--model_path={a.model_path}"), timeout=100)
    assert result.returncode != 0
    assert time.monotonic() - started < 60  # the communicator's timeout is 120 s
    assert "orchestrate launch mpi: rank 1 of 2" in result.stderr
    assert "mixes files of different `orchestrate shard` runs" in result.stderr


@pytest.mark.timeout(180)
def test_bad_inputs_fail_in_the_caller_and_the_ranks_stay_up(sample, tmp_path):
    source = sample("mlp")
    shards = shard_model(source, 2, tmp_path, progress=False)
    x = np.random.default_rng(4).standard_normal((2, 64)).astype(np.float32)
    bad_inputs = (
        ({"x": np.ones((2, 3), np.float32)}, r"input 'x': shape \[2, 3\] does not match \[\?, 64\]"),
        ({"x": x.astype(np.float64)}, "input 'x' has dtype float64, the model expects float32"),
        ({"z": x}, r"unknown input name\(s\) \['z'\]"),
        ({"x": x, "z": x}, r"unknown input name\(s\) \['z'\]"),
        ({"x": np.ones((0, 64), np.float32)}, "is empty"),
    )
    with ShardedModel(shards.model_path, backend="mpi", timeout=120) as model:
        for bad, message in bad_inputs:
            with pytest.raises(InputError, match=message):
                model.predict(bad)
        out = model.predict({"x": x})["y"]
        # after a call whose inputs were taken as they were (a repeat of their dtypes and shapes skips the
        # full check), every bad input is still refused, and another batch size still runs
        for bad, message in bad_inputs:
            with pytest.raises(InputError, match=message):
                model.predict(bad)
        again = model.predict({"x": x})["y"]
        three = model.predict({"x": x[:1].repeat(3, axis=0)})["y"]
    assert np.max(np.abs(out - _expected(source, x))) < 1e-5
    np.testing.assert_array_equal(again, out)
    assert np.max(np.abs(three - _expected(source, x[:1].repeat(3, axis=0)))) < 1e-5
