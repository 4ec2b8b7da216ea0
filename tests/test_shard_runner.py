"""Running shards on stock ONNX Runtime: stages cut at collectives, collectives through a communicator."""

from __future__ import annotations

import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from _shard_helpers import ThreadGroup
from orchestrator import shard_model
from ranks import Model, ModelError, ModelNotFoundError, ShardError, SingleCommunicator, StagedRunner, resolve_shard_path
from ranks._staged_runner import cut_stages


def _whole(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0], session


@pytest.fixture(scope="module")
def mlp_shards(sample, tmp_path_factory):
    source = sample("mlp")
    return source, shard_model(source, 2, tmp_path_factory.mktemp("mlp_tp2"), progress=False)


def test_stages_are_cut_at_each_collective(mlp_shards):
    _, result = mlp_shards
    stages = cut_stages(onnx.load(str(result.shard_paths[0])))
    assert len(stages) == 3  # two layers: one all-reduce each
    assert [[c.op for c in s.collectives] for s in stages] == [["AllReduce"], ["AllReduce"], []]
    assert stages[0].inputs == ["x"]
    # the residual needs x again after the first all-reduce: it is fed to stage 1 as well
    assert "x" in stages[1].inputs and stages[1].outputs[-1] == stages[1].collectives[0].input


@pytest.mark.parametrize("name", ["mlp", "transformer"])
def test_two_ranks_on_threads_match_the_whole_model(sample, tmp_path, name):
    source = sample(name)
    result = shard_model(source, 2, tmp_path, progress=False)
    x = np.random.default_rng(0).standard_normal((3, 64) if name == "mlp" else (2, 5, 32)).astype(np.float32)
    expected, session = _whole(source, {"x": x})

    def rank(comm):
        runner = StagedRunner(resolve_shard_path(result.model_path, comm.rank, comm.size), comm)
        assert [(a.name, a.type, a.shape) for a in runner.get_inputs()] == [
            (a.name, a.type, a.shape) for a in session.get_inputs()
        ]
        assert [a.name for a in runner.get_outputs()] == ["y"]
        return runner.run(None, {"x": x})[0]

    outputs = ThreadGroup(2).run(rank)
    for out in outputs:
        assert out.shape == expected.shape
        assert np.max(np.abs(out - expected)) < 1e-5


def test_model_api_runs_a_shard_with_a_given_communicator(sample, tmp_path):
    pytest.importorskip("ranks._world")  # Model imports the communicator factory
    source = sample("transformer")
    result = shard_model(source, 2, tmp_path, progress=False)
    x = np.random.default_rng(2).standard_normal((1, 4, 32)).astype(np.float32)
    expected, _ = _whole(source, {"x": x})

    def rank(comm):
        model = Model()
        model.build_from_file(str(result.shard_paths[comm.rank]), communicator=comm)
        return model.predict([x])[0].get_data_to_numpy()

    for out in ThreadGroup(2).run(rank):
        assert np.max(np.abs(out - expected)) < 1e-5


def test_resize_of_a_shard_sets_free_dimensions_only(sample, tmp_path):
    result = shard_model(sample("transformer"), 2, tmp_path, progress=False)
    x = np.random.default_rng(3).standard_normal((2, 3, 32)).astype(np.float32)
    expected, _ = _whole(sample("transformer"), {"x": x})

    def rank(comm):
        model = Model()
        model.build_from_file(str(result.shard_paths[comm.rank]), communicator=comm)
        model.resize(model.get_inputs(), [[2, 3, 32]])  # batch and sequence are free in the shard too
        assert model.get_inputs()[0].shape == [2, 3, 32]
        with pytest.raises(ModelError, match=r"tensor-parallel shard, whose graph cannot be rebuilt .*input 'x' of shape "
                                             r"\[2, 3, 16\] \(was \[2, 3, 32\]\)\); only free dimensions can be set"):
            model.resize(model.get_inputs(), [[2, 3, 16]])
        return model.predict([x])[0].get_data_to_numpy()

    for out in ThreadGroup(2).run(rank):
        assert np.max(np.abs(out - expected)) < 1e-5


def test_world_size_that_does_not_match_the_communicator(mlp_shards):
    _, result = mlp_shards
    with pytest.raises(ShardError, match=r"mlp0.onnx is one of 2 shards, but the communicator has 1 rank \(this "
                                         r"process runs alone: launch 2 ranks with mpirun or a rank table\)"):
        StagedRunner(result.shard_paths[0], SingleCommunicator())


def test_rank_that_loads_another_ranks_shard(mlp_shards):
    _, result = mlp_shards
    with pytest.raises(ShardError, match=r"mlp0.onnx is the shard of rank 0, but it was loaded by rank 1"):
        ThreadGroup(2).run(lambda comm: StagedRunner(result.shard_paths[0], comm))


def test_shards_of_different_slicing_runs_are_refused(sample, tmp_path):
    a = shard_model(sample("mlp"), 2, tmp_path / "a", progress=False)
    b = shard_model(sample("mlp", seed=1), 2, tmp_path / "b", progress=False)
    # Across ranks: each rank's directory is consistent, but the runs differ.
    with pytest.raises(ShardError, match="different slicing runs"):
        ThreadGroup(2).run(lambda comm: StagedRunner((a if comm.rank == 0 else b).shard_paths[comm.rank], comm))
    # In one directory: a shard copied over from another run does not match the manifest.
    shutil.copy(b.shard_paths[1], a.shard_paths[1])
    with pytest.raises(ShardError, match=r"mlp1.onnx comes from slicing run .* but .*mlp.manifest.json describes run"):
        ThreadGroup(2).run(lambda comm: StagedRunner(a.shard_paths[comm.rank], comm))


def test_resolve_shard_path(mlp_shards, tmp_path):
    source, result = mlp_shards
    assert resolve_shard_path(source, 1, 2) == source  # an existing file is used as it is
    assert resolve_shard_path(result.model_path, 1, 2) == result.shard_paths[1]
    with pytest.raises(ShardError, match=r"made for 2 ranks .*mlp.manifest.json.*this launch has 4 ranks"):
        resolve_shard_path(result.model_path, 0, 4)
    copy = tmp_path / "copy"
    shutil.copytree(result.model_path.parent, copy)
    (copy / "mlp1.onnx").unlink()
    with pytest.raises(ModelNotFoundError, match=r"rank 1's shard .*mlp1.onnx is missing \(listed in .*mlp.manifest.json\)"):
        resolve_shard_path(copy / "mlp.onnx", 1, 2)
    with pytest.raises(ModelNotFoundError, match=r"model file .*other.onnx does not exist, nor does rank 0's shard .*other0.onnx"):
        resolve_shard_path(copy / "other.onnx", 0, 2)
    # A process on its own (no launcher) is told only that its file is missing: shards are not its business.
    for alone in (1, None):
        with pytest.raises(ModelNotFoundError) as info:
            resolve_shard_path(copy / "other.onnx", 0, alone)
        assert str(info.value) == f"model file {copy / 'other.onnx'} does not exist"


def test_missing_input_is_a_clear_error(mlp_shards):
    _, result = mlp_shards

    def rank(comm):
        return StagedRunner(result.shard_paths[comm.rank], comm).run(None, {"nope": np.ones((1, 64), np.float32)})

    with pytest.raises(Exception, match=r"missing input\(s\) \['x'\]"):
        ThreadGroup(2).run(rank)


def test_other_contrib_ops_run_in_their_stage(tmp_path):
    """A shard may hold other com.microsoft ops (e.g. Gelu from an optimizer); they stay runnable."""
    from onnx import helper, numpy_helper

    from _shard_helpers import fvi, weights
    from orchestrator import check_shards
    from orchestrator._samples import save_model

    w1, w2 = weights(8, (16, 32), (32, 16))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["u"]),
        helper.make_node("Gelu", ["u"], ["h"], domain="com.microsoft"),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [fvi("x", ["b", 16])], [fvi("y", ["b", 16])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    save_model(model, tmp_path / "m.onnx")
    result = shard_model(tmp_path / "m.onnx", 2, tmp_path / "s", progress=False)
    # Not elementwise to the slicer (another domain): the cut is gathered before it, still exact.
    assert [w["split"] for w in result.manifest["weights"]] == ["columns", "columns"]
    assert check_shards(tmp_path / "m.onnx", result.model_path).max_abs_diff < 1e-5

