"""The slicing tool: shards give the whole model's numbers, the manifest says what was split, bad input fails clearly."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from _shard_helpers import fvi, make_model, weights
from conftest import orchestrate_command, run_command
from orchestrator import check_shards, shard_model
from orchestrator._samples import save_model
from ranks import ModelNotFoundError, ShardError


def _init(path, name):
    model = onnx.load(str(path))
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}.get(name)


def _ops(path):
    return [n.op_type for n in onnx.load(str(path), load_external_data=False).graph.node]


@pytest.mark.parametrize("name,tp", [("mlp", 2), ("mlp", 4), ("transformer", 2), ("transformer", 4)])
def test_shards_match_the_whole_model(sample, tmp_path, name, tp):
    source = sample(name)
    result = shard_model(source, tp, tmp_path / "shards", progress=False)
    assert [p.name for p in result.shard_paths] == [f"{name}{r}.onnx" for r in range(tp)]
    for path in result.shard_paths:
        onnx.checker.check_model(str(path))
        model = onnx.load(str(path))
        assert any(o.domain == "com.microsoft" and o.version == 1 for o in model.opset_import)
    check = check_shards(source, result.model_path, seed=1)
    assert check.max_abs_diff < 1e-5, check.per_output
    layers = 2
    ops = _ops(result.shard_paths[0])
    if name == "mlp":
        assert ops.count("AllReduce") == layers and "AllGather" not in ops
        assert _init(result.shard_paths[1], "layers.0.fc1.weight").shape == (64, 128 // tp)
        assert _init(result.shard_paths[1], "layers.0.fc2.weight").shape == (128 // tp, 64)
    else:
        # one all-reduce after the attention output projection and one after the MLP, per layer
        assert ops.count("AllReduce") == 2 * layers and "AllGather" not in ops
        heads = {a["heads_per_rank"] for a in result.manifest["attention"]}
        assert heads == {4 // tp} and len(result.manifest["attention"]) == 3 * layers
    # weights per rank: about 1/tp of the whole (biases of the row-parallel layers and norms stay whole)
    assert result.weight_fraction <= 1 / tp + 0.03
    assert result.weight_fraction >= 1 / tp


def test_manifest_records_every_weight_and_the_source(sample, tmp_path):
    source = sample("mlp")
    result = shard_model(source, 2, tmp_path, progress=False)
    manifest = json.loads(result.manifest_path.read_text())
    assert result.manifest_path.name == "mlp.manifest.json"
    assert manifest["format"] == "orchestrator.shard/1" and manifest["world_size"] == 2
    assert manifest["source"]["sha256"] == hashlib.sha256(source.read_bytes()).hexdigest()
    assert [s["file"] for s in manifest["shards"]] == ["mlp0.onnx", "mlp1.onnx"]
    split = {w["name"]: (w["split"], w["shard_shape"]) for w in manifest["weights"]}
    assert split["layers.0.fc1.weight"] == ("columns", [64, 64])
    assert split["layers.0.fc1.bias"] == ("columns", [64])
    assert split["layers.0.fc2.weight"] == ("rows", [64, 64])
    assert split["layers.0.fc2.bias"] == ("replicated", [64])  # added once, after the all-reduce
    assert {c["op"] for c in manifest["collectives"]} == {"AllReduce"}
    for rank, path in enumerate(result.shard_paths):
        meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
        assert meta["orchestrator.shard.id"] == manifest["shard_id"]
        assert meta["orchestrator.shard.rank"] == str(rank)
        assert meta["orchestrator.shard.world_size"] == "2"
    total = sum(s["weight_bytes"] for s in manifest["shards"])
    whole = manifest["weight_bytes_whole"]
    assert whole < total < whole * 1.05  # only the small replicated biases are counted twice


def test_shared_head_shape_constant_gets_a_per_rank_copy(sample, tmp_path):
    result = shard_model(sample("transformer"), 2, tmp_path, progress=False)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(result.shard_paths[0])).graph.initializer}
    assert inits["shape.split_heads.rank_local"].tolist() == [0, 0, 2, 8]
    assert inits["shape.merge_heads.rank_local"].tolist() == [0, 0, 16]
    assert "shape.split_heads" not in inits  # nothing whole reads it any more


def test_constant_shared_by_split_and_whole_paths_keeps_both(tmp_path):
    wq, wo = weights(3, (32, 32), (32, 32))
    nodes = [
        helper.make_node("MatMul", ["x", "wq"], ["q"]),
        helper.make_node("Reshape", ["q", "heads"], ["qh"]),
        helper.make_node("Transpose", ["qh"], ["qt"], perm=[0, 2, 1, 3]),
        helper.make_node("Transpose", ["qt"], ["qb"], perm=[0, 2, 1, 3]),
        helper.make_node("Reshape", ["qb", "merge"], ["qm"]),
        helper.make_node("MatMul", ["qm", "wo"], ["o"]),
        helper.make_node("Reshape", ["x", "heads"], ["xh"]),  # the same constant on a whole tensor
        helper.make_node("Reshape", ["xh", "merge"], ["xm"]),
        helper.make_node("Add", ["o", "xm"], ["y"]),
    ]
    model = make_model(nodes, [fvi("x", ["b", "s", 32])], [fvi("y", ["b", "s", 32])], {
        "wq": wq, "wo": wo, "heads": np.array([0, 0, 4, 8], np.int64), "merge": np.array([0, 0, 32], np.int64),
    })
    save_model(model, tmp_path / "m.onnx")
    result = shard_model(tmp_path / "m.onnx", 2, tmp_path / "s", progress=False)
    inits = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(result.shard_paths[1])).graph.initializer}
    assert inits["heads"].tolist() == [0, 0, 4, 8] and inits["heads.rank_local"].tolist() == [0, 0, 2, 8]
    assert inits["merge"].tolist() == [0, 0, 32] and inits["merge.rank_local"].tolist() == [0, 0, 16]
    assert check_shards(tmp_path / "m.onnx", result.model_path).max_abs_diff < 1e-5


def test_column_split_needed_whole_gets_an_all_gather(tmp_path):
    w1, w2 = weights(4, (16, 32), (32, 16))
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["u"]),
        helper.make_node("Relu", ["u"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
        helper.make_node("ReduceMax", ["h"], ["hmax"], axes=[-1], keepdims=1),  # needs all of h
    ]
    model = make_model(nodes, [fvi("x", ["b", 16])], [fvi("y", ["b", 16]), fvi("h", ["b", 32]), fvi("hmax", ["b", 1])],
                       {"w1": w1, "w2": w2})
    save_model(model, tmp_path / "m.onnx")
    result = shard_model(tmp_path / "m.onnx", 2, tmp_path / "s", progress=False)
    shard = onnx.load(str(result.shard_paths[0]))
    gathers = [n for n in shard.graph.node if n.op_type == "AllGather"]
    assert len(gathers) == 1  # h is gathered once, for the graph output and the ReduceMax
    attrs = {a.name: helper.get_attribute_value(a) for a in gathers[0].attribute}
    assert attrs == {"group_size": 2, "axis": 1} and gathers[0].domain == "com.microsoft"
    assert _ops(result.shard_paths[0]).count("AllReduce") == 1
    check = check_shards(tmp_path / "m.onnx", result.model_path)
    assert set(check.per_output) == {"y", "h", "hmax"} and check.max_abs_diff < 1e-5


def test_gemm_layers_with_transposed_weights_and_scaled_bias(tmp_path):
    w1, w2 = weights(5, (32, 16), (32, 16))
    nodes = [
        helper.make_node("Gemm", ["x", "w1", "b1"], ["u"], transB=1),
        helper.make_node("Tanh", ["u"], ["h"]),
        helper.make_node("Gemm", ["h", "w2", "b2"], ["y"], alpha=2.0, beta=0.5),
    ]
    model = make_model(nodes, [fvi("x", ["b", 16])], [fvi("y", ["b", 16])], {
        "w1": w1, "b1": np.linspace(-1, 1, 32, dtype=np.float32), "w2": w2, "b2": np.ones(16, np.float32),
    })
    save_model(model, tmp_path / "m.onnx")
    result = shard_model(tmp_path / "m.onnx", 2, tmp_path / "s", progress=False)
    split = {w["name"]: w["split"] for w in result.manifest["weights"]}
    assert split == {"w1": "columns", "b1": "columns", "w2": "rows", "b2": "replicated"}
    assert _init(result.shard_paths[0], "w1").shape == (16, 16)  # transB: output columns are axis 0
    assert check_shards(tmp_path / "m.onnx", result.model_path).max_abs_diff < 1e-5


def test_weight_used_split_and_whole_is_kept_in_both_forms(tmp_path):
    (w,) = weights(6, (16, 16))
    nodes = [
        helper.make_node("MatMul", ["x", "w"], ["u"]),
        helper.make_node("Relu", ["u"], ["h"]),
        helper.make_node("MatMul", ["h", "w"], ["y0"]),
        helper.make_node("ReduceSum", ["w"], ["wsum"], keepdims=0),
        helper.make_node("Add", ["y0", "wsum"], ["y"]),
    ]
    model = make_model(nodes, [fvi("x", ["b", 16])], [fvi("y", ["b"])], {"w": w}, opset=11)
    save_model(model, tmp_path / "m.onnx")
    result = shard_model(tmp_path / "m.onnx", 2, tmp_path / "s", progress=False)
    (entry,) = result.manifest["weights"]
    assert entry["split"] == "mixed" and entry["copies"] == [0, 1]
    assert check_shards(tmp_path / "m.onnx", result.model_path).max_abs_diff < 1e-5


def test_external_data_mirrors_the_source_or_follows_the_flag(sample, tmp_path):
    source = sample("mlp", external_data=True)
    result = shard_model(source, 2, tmp_path / "a", progress=True)
    assert result.manifest["external_data"] is True
    assert all(p.with_name(p.name + ".data").stat().st_size > 1000 for p in result.shard_paths)
    assert check_shards(source, result.model_path).max_abs_diff < 1e-5
    inline = shard_model(source, 2, tmp_path / "b", external_data=False, progress=False)
    assert not any(p.with_name(p.name + ".data").exists() for p in inline.shard_paths)
    assert check_shards(source, inline.model_path).max_abs_diff < 1e-5


def test_nothing_to_split_is_an_error_unless_replication_is_allowed(sample, tmp_path):
    with pytest.raises(ShardError, match="nothing to split in .*add.onnx.*--allow-replicate"):
        shard_model(sample("add"), 2, tmp_path / "a", progress=False)
    result = shard_model(sample("add"), 2, tmp_path / "b", allow_replicate=True, progress=False)
    assert [w["split"] for w in result.manifest["weights"]] == []
    assert "AllReduce" not in _ops(result.shard_paths[1])
    assert check_shards(sample("add"), result.model_path).max_abs_diff == 0


def test_tp_that_does_not_divide_the_hidden_size_names_both_numbers(sample, tmp_path):
    with pytest.raises(ShardError, match=r"degree 3 does not divide the hidden size 128"):
        shard_model(sample("mlp"), 3, tmp_path, progress=False)


def test_tp_that_does_not_divide_the_head_count_names_both_numbers(sample, tmp_path):
    source = sample("transformer", d_model=48, heads=6, layers=1, ffn=96)
    with pytest.raises(ShardError, match=r"degree 4 does not divide the head count 6"):
        shard_model(source, 4, tmp_path / "a", progress=False)
    # With replication allowed the attention stays whole and the rest is still split, correctly.
    result = shard_model(source, 4, tmp_path / "b", allow_replicate=True, progress=False)
    split = {w["name"]: w["split"] for w in result.manifest["weights"]}
    assert split["layers.0.attn.q_proj.weight"] == "replicated"
    assert split["layers.0.mlp.fc1.weight"] == "columns"
    assert any("head count 6" in r for r in result.manifest["replicated_reasons"].values())
    assert check_shards(source, result.model_path).max_abs_diff < 1e-5


def test_bad_arguments(sample, tmp_path):
    with pytest.raises(ShardError, match="positive integer, got 0"):
        shard_model(sample("mlp"), 0, tmp_path, progress=False)
    with pytest.raises(ModelNotFoundError, match="nope.onnx does not exist"):
        shard_model(tmp_path / "nope.onnx", 2, tmp_path, progress=False)


def test_check_notices_a_corrupted_shard(sample, tmp_path):
    source = sample("mlp")
    result = shard_model(source, 2, tmp_path, progress=False)
    model = onnx.load(str(result.shard_paths[1]))
    for t in model.graph.initializer:
        if t.name == "layers.1.fc2.weight":
            t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t) * 1.01, t.name))
    onnx.save(model, str(result.shard_paths[1]))
    assert check_shards(source, result.model_path).max_abs_diff > 1e-3


@pytest.mark.cli
def test_command_line_shard_and_check(sample, tmp_path):
    source = sample("transformer")
    out = run_command(orchestrate_command("shard", str(source), "--tp", "2", "-o", str(tmp_path / "s"), "--check"))
    assert out.returncode == 0, out.stderr
    assert "heads 4 -> 2 per rank" in out.stdout
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("check: 2 shards")][0]
    assert float(line.split("max abs difference ")[1].split()[0]) < 1e-4 and line.endswith(": ok")
    strict = run_command(orchestrate_command("shard", str(sample("mlp")), "--tp", "2", "-o", str(tmp_path / "m"),
                                             "--check", "--tolerance", "1e-12"))
    assert strict.returncode == 1 and "FAILED" in strict.stdout
    bad = run_command(orchestrate_command("shard", str(sample("add")), "--tp", "2", "-o", str(tmp_path / "a")))
    assert bad.returncode == 2 and "nothing to split" in bad.stderr and "Traceback" not in bad.stderr


def test_split_read_inside_a_subgraph_stays_whole(tmp_path):
    w1, w2 = weights(7, (16, 32), (32, 16))
    then_graph = helper.make_graph([helper.make_node("Identity", ["h"], ["t_out"])], "then", [], [fvi("t_out", ["b", 32])])
    else_graph = helper.make_graph([helper.make_node("Neg", ["h"], ["e_out"])], "else", [], [fvi("e_out", ["b", 32])])
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["u"]),
        helper.make_node("Relu", ["u"], ["h"]),
        helper.make_node("MatMul", ["h", "w2"], ["y"]),
        helper.make_node("If", ["flag"], ["z"], then_branch=then_graph, else_branch=else_graph),
    ]
    model = make_model(
        nodes, [fvi("x", ["b", 16]), helper.make_tensor_value_info("flag", onnx.TensorProto.BOOL, [])],
        [fvi("y", ["b", 16]), fvi("z", ["b", 32])], {"w1": w1, "w2": w2},
    )
    save_model(model, tmp_path / "m.onnx")
    result = shard_model(tmp_path / "m.onnx", 2, tmp_path / "s", progress=False)
    split = {w["name"]: w["split"] for w in result.manifest["weights"]}
    # h is read inside the If: the layer making it stays whole; the next one is cut and gathered.
    assert split == {"w1": "replicated", "w2": "columns"}
    assert "h is read inside a subgraph" in next(iter(result.manifest["replicated_reasons"].values()))
    flags = set()
    for seed in range(6):  # random flags: both branches
        check = check_shards(tmp_path / "m.onnx", result.model_path, seed=seed)
        flags.add(bool(check.feeds["flag"]))
        assert check.max_abs_diff < 1e-5
    assert flags == {True, False}


def test_an_if_on_a_graph_input_is_sliced_branch_by_branch(tmp_path):
    """The merged-decoder layout built by code: the main graph is one If on a bool input, its branches read the
    weights from the main graph; branch outputs named otherwise than the If's, a branch-local constant. Each
    branch gets its Megatron pair (one AllReduce), the shard keeps the If, and both branches equal the model."""
    import onnxruntime as ort

    from orchestrator._shard_check import SimulatedRanks

    w1, w2 = weights(3, (16, 32), (32, 16))
    scale = numpy_helper.from_array(np.linspace(0.5, 1.5, 16).astype(np.float32), "scale")
    then_graph = helper.make_graph([
        helper.make_node("MatMul", ["x", "w1"], ["u_t"]), helper.make_node("Relu", ["u_t"], ["h_t"]),
        helper.make_node("MatMul", ["h_t", "w2"], ["y_then"]),
    ], "with_past", [], [fvi("y_then", ["b", 16])])
    else_graph = helper.make_graph([
        helper.make_node("MatMul", ["x", "w1"], ["u_e"]), helper.make_node("Sigmoid", ["u_e"], ["h_e"]),
        helper.make_node("MatMul", ["h_e", "w2"], ["y_raw"]), helper.make_node("Mul", ["y_raw", "scale"], ["y_else"]),
    ], "no_past", [], [fvi("y_else", ["b", 16])], [scale])
    model = make_model(
        [helper.make_node("If", ["pick"], ["y"], name="merged_if", then_branch=then_graph, else_branch=else_graph)],
        [fvi("x", ["b", 16]), helper.make_tensor_value_info("pick", onnx.TensorProto.BOOL, [1])],
        [fvi("y", ["b", 16])], {"w1": w1, "w2": w2},
    )
    save_model(model, tmp_path / "m.onnx")
    result = shard_model(tmp_path / "m.onnx", 2, tmp_path / "s", progress=False)
    split = {w["name"]: w["split"] for w in result.manifest["weights"]}
    assert (split["w1"], split["w2"]) == ("columns", "rows")
    assert sorted((c["branch"], c["op"]) for c in result.manifest["collectives"]) == [
        ("else_branch", "AllReduce"), ("then_branch", "AllReduce")]
    shard = onnx.load(str(result.shard_paths[0]))
    assert [n.op_type for n in shard.graph.node] == ["If"]
    assert {t.name for t in shard.graph.initializer} >= {"w1", "w2"}  # one copy per rank, read by both branches
    whole = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    ranks = SimulatedRanks(result.shard_paths)
    x = np.random.default_rng(0).standard_normal((3, 16)).astype(np.float32)
    outs = []
    for pick in (True, False):
        feeds = {"x": x, "pick": np.array([pick])}
        want = whole.run(None, feeds)[0]
        got = ranks.run(feeds)["y"]
        assert np.max(np.abs(got - want)) < 1e-5, pick
        outs.append(want)
    assert np.max(np.abs(outs[0] - outs[1])) > 0.1  # the two branches differ: each was really run
