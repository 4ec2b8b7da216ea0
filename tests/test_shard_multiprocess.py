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
from ranks import ConfigError, InputError, WorkerError

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
        procs = list(model._procs)
    assert all(p.poll() is not None for p in procs)
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
            model.predict({"wrong": np.ones((1, 2, 32), np.float32)})
        assert all(p.poll() is not None for p in model._procs)
        with pytest.raises(WorkerError, match="closed"):
            model.predict({"x": np.ones((1, 2, 32), np.float32)})
    finally:
        model.close()


@pytest.mark.timeout(240)
def test_a_rank_that_dies_is_reported_without_a_hang(transformer_shards):
    _, result = transformer_shards
    model = ShardedModel(result.model_path, backend="mpi", timeout=60)
    try:
        mpirun = model._procs[0].pid
        ranks = [p for p in _children(mpirun) if "python" in Path(f"/proc/{p}/cmdline").read_text()]
        assert len(ranks) == 2
        os.kill(ranks[1], signal.SIGKILL)
        start = time.monotonic()
        with pytest.raises(WorkerError, match=r"exited with|no answer"):
            model.predict({"x": np.ones((1, 2, 32), np.float32)})
        assert time.monotonic() - start < 60
    finally:
        model.close()
    assert not any(_alive(p) for p in ranks + [mpirun])


def test_tp_that_does_not_match_the_shards(transformer_shards):
    _, result = transformer_shards
    with pytest.raises(ConfigError, match=r"tp=4, but the shards of .*transformer.onnx were made for 2 ranks"):
        ShardedModel(result.model_path, tp=4)
