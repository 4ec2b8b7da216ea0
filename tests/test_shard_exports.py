"""Tensor parallel on models as exporters write them: GPT-2, BERT and Llama from ``transformers``, exported by torch.

The fixtures (the ``.onnx`` and ``.npz`` files in ``tests/fixtures/``: models, fixed inputs, torch's outputs)
are written by ``tests/fixtures/make_exports.py``; these tests need neither torch nor transformers.
What a user of exported models cares about: Megatron's plan (two all-reduces per transformer block,
none gathered inside), about half the weights per rank at TP=2, and outputs equal to torch's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from orchestrator import ShardedModel, shard_model
from orchestrator._shard_check import SimulatedRanks

FIXTURES = Path(__file__).resolve().parent / "fixtures"
EXPORTS = sorted(p.stem for p in FIXTURES.glob("*.onnx")  # decoders with a cache (merged too): test_generate*
                 if "_cache_" not in p.stem and "_prefill_" not in p.stem and not p.stem.endswith("_merged"))
# The three ways of starting ranks run one export of each model (each launch costs seconds);
# every export is checked against torch's outputs in one process above.
LAUNCHED = ["bert_dynamo", "gpt2_dynamo", "llama_torchscript"]
LAYERS = 2  # every fixture has two transformer blocks
TOLERANCE = 1e-4


def _load(name: str) -> tuple[dict, dict]:
    with np.load(FIXTURES / f"{name}.npz") as saved:
        feeds = {k: saved[k] for k in saved.files if not k.startswith("expected.")}
        expected = {k[len("expected."):]: saved[k] for k in saved.files if k.startswith("expected.")}
    return feeds, expected


def _max_diff(got: dict, expected: dict) -> float:
    assert set(got) == set(expected)
    return max(float(np.max(np.abs(got[k].astype(np.float64) - v))) for k, v in expected.items())


def _producers(shard_path: Path) -> dict[str, onnx.NodeProto]:
    return {o: n for n in onnx.load(str(shard_path)).graph.node for o in n.output}


def test_the_fixtures_are_there():
    assert {"gpt2_dynamo", "gpt2_torchscript", "bert_dynamo", "bert_torchscript", "llama_dynamo",
            "llama_torchscript"} <= set(EXPORTS)


@pytest.mark.parametrize("name", EXPORTS)
def test_megatron_plan_and_torch_outputs_at_tp2(name, tmp_path):
    result = shard_model(FIXTURES / f"{name}.onnx", 2, tmp_path, progress=False)
    manifest = result.manifest
    ops = [c["op"] for c in manifest["collectives"]]
    # Per block: one all-reduce after the attention output projection, one after the MLP down projection;
    # one more for the token embedding split by vocabulary rows. Nothing gathered inside the blocks.
    assert ops.count("AllReduce") == 2 * LAYERS + 1, ops
    graph_outputs = [o.name for o in onnx.load(str(FIXTURES / f"{name}.onnx")).graph.output]
    gathers = [c for c in manifest["collectives"] if c["op"] == "AllGather"]
    if name.startswith("bert"):
        assert gathers == []
    else:  # the LM head is split by vocabulary, its logits gathered: the graph output, outside the blocks
        assert [c["output"] for c in gathers] == graph_outputs
    producers = _producers(result.shard_paths[0])
    kinds = sorted(producers[c["input"]].op_type for c in manifest["collectives"] if c["op"] == "AllReduce")
    assert kinds.count("Mul") == 1 and len([k for k in kinds if k in ("MatMul", "Gemm")]) == 2 * LAYERS, kinds
    # Attention on each rank's own heads (4 query heads -> 2 per rank).
    assert {(a["heads"], a["heads_per_rank"]) for a in manifest["attention"]} >= {(4, 2)}
    assert result.weight_fraction <= 0.55
    embedding = [w for w in manifest["weights"] if w["split"] == "vocabulary"]
    assert len(embedding) == 1 and embedding[0]["shard_shape"][0] == embedding[0]["shape"][0] // 2
    report = manifest["explain"]
    assert [layer["kind"] for layer in report["layers"]] == ["attention", "mlp"] * LAYERS
    assert report["ratio_to_megatron"] == pytest.approx(1.0)
    feeds, expected = _load(name)
    got = SimulatedRanks(result.shard_paths).run(feeds)
    assert _max_diff(got, expected) <= TOLERANCE


@pytest.mark.cli
def test_explain_says_what_was_paired_and_what_stays_whole(tmp_path):
    from conftest import orchestrate_command, run_command

    result = run_command(orchestrate_command("shard", str(FIXTURES / "gpt2_dynamo.onnx"), "--tp", "2", "-o",
                                             str(tmp_path), "--explain", "--no-progress"), timeout=120)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert ("  model.transformer.h.0.attn (attention, heads 4 -> 2 per rank): columns node_addmm (fused: 3 parts, "
            "each cut per head) -> rows node_addmm_1; AllReduce of 64 values per token") in lines
    assert "  model.transformer.h.1.mlp (mlp): columns node_addmm_6 -> rows node_addmm_7; AllReduce of 64 values per token" in lines
    assert any(line.startswith("  token embedding node_embedding: table model.lm_head.weight split by vocabulary rows "
                               "(512 -> 256 per rank)") for line in lines)
    assert any("model.transformer.wpe.weight" in line and "indexed by computed positions" in line for line in lines)
    assert any("bias of a row-parallel layer: added once, after the all-reduce" in line for line in lines)
    assert "  collectives per rank: 1 AllGather, 5 AllReduce" in lines
    # 4 all-reduces of 64 float32 per token in the blocks + 1 for the embedding: 5 x 2 x 1/2 x 256 bytes;
    # the logits gather: 1/2 x 512 x 4 bytes
    assert "  bytes each rank sends per token: 2304 (Megatron's minimum for this model: 2304; ratio 1.00)" in lines


def test_fused_qkv_is_cut_per_head_into_q_k_v_pieces(tmp_path):
    source = FIXTURES / "gpt2_dynamo.onnx"
    result = shard_model(source, 2, tmp_path, progress=False)
    weights = {w["name"]: w for w in result.manifest["weights"]}
    qkv = weights["model.transformer.h.0.attn.c_attn.weight"]
    assert (qkv["split"], qkv["parts"], qkv["shard_shape"]) == ("columns", 3, [64, 96])
    whole = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(source)).graph.initializer}
    w = whole["model.transformer.h.0.attn.c_attn.weight"]
    for rank, path in enumerate(result.shard_paths):
        piece = {t.name: onnx.numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}
        got = piece["model.transformer.h.0.attn.c_attn.weight"]
        # rank r: its two heads (32 columns) of Q, then of K, then of V
        want = np.concatenate([w[:, part * 64 + rank * 32: part * 64 + (rank + 1) * 32] for part in range(3)], axis=1)
        assert np.array_equal(got, want)
    assert weights["model.transformer.h.0.mlp.c_proj.weight"]["split"] == "rows"
    assert weights["model.transformer.wpe.weight"]["split"] == "replicated"


@pytest.mark.parametrize("name", ["llama_dynamo", "llama_torchscript"])
def test_grouped_query_attention_kv_heads_divided_or_kept_whole(name, tmp_path):
    source = FIXTURES / f"{name}.onnx"
    feeds, expected = _load(name)
    two = shard_model(source, 2, tmp_path / "tp2", progress=False)
    assert {(a["heads"], a["heads_per_rank"]) for a in two.manifest["attention"]} == {(4, 2), (2, 1)}
    assert not two.manifest["replicated_reasons"]
    # TP=4: 4 query heads divide, 2 key/value heads do not: K and V stay whole, each rank reads its part.
    four = shard_model(source, 4, tmp_path / "tp4", progress=False)
    assert {(a["heads"], a["heads_per_rank"]) for a in four.manifest["attention"]} == {(4, 1)}
    reasons = four.manifest["replicated_reasons"]
    assert len(reasons) == 2 * LAYERS  # k_proj and v_proj of every block
    assert all("does not divide the head count 2" in r for r in reasons.values())
    assert [c["op"] for c in four.manifest["collectives"]].count("AllReduce") == 2 * LAYERS + 1
    assert "AllGather" not in [c["op"] for c in four.manifest["collectives"][:-1]]
    got = SimulatedRanks(four.shard_paths).run(feeds)
    assert _max_diff(got, expected) <= TOLERANCE


# ---- the three ways to run shards, on the exported models, against torch's outputs ----

def _inputs_file(name: str, path: Path) -> Path:
    feeds, _expected = _load(name)
    np.savez(path, **feeds)
    return path


@pytest.fixture(scope="module")
def export_shards(tmp_path_factory):
    """name -> TP=2 shards of that fixture, sliced once for the three ways of running them."""
    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = shard_model(FIXTURES / f"{name}.onnx", 2, tmp_path_factory.mktemp(name), progress=False)
        return cache[name]

    return get


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", LAUNCHED)
def test_exported_model_under_mpirun(name, export_shards, tmp_path):
    pytest.importorskip("launchers._mpi")
    from conftest import orchestrate_command, run_command

    shards = export_shards(name)
    x = _inputs_file(name, tmp_path / "x.npz")
    out = tmp_path / "out{rank}.npz"
    result = run_command(orchestrate_command(
        "launch", "mpi", "-n", "2", "--", "python", "-m", "ranks", f"--model_path={shards.model_path}",
        f"--input={x}", f"--output={out}", "--thread_num=1", "--quiet",
    ), timeout=200)
    assert result.returncode == 0, result.stdout + result.stderr
    _feeds, expected = _load(name)
    for rank in range(2):
        with np.load(str(out).format(rank=rank)) as saved:
            assert _max_diff({k: saved[k] for k in saved.files}, expected) <= TOLERANCE


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", LAUNCHED)
def test_exported_model_from_a_rank_table(name, export_shards, tmp_path):
    pytest.importorskip("ranks._comm_zmq")
    from _shard_helpers import run_ranks_from_a_table

    shards = export_shards(name)
    x = _inputs_file(name, tmp_path / "x.npz")
    run_ranks_from_a_table(tmp_path, lambda rank, ini: [
        sys.executable, "-m", "ranks", f"--model_path={shards.model_path}", f"--device_id={rank}", f"--rank_id={rank}",
        f"--config_file={ini}", f"--input={x}", f"--output={tmp_path / f'out{rank}.npz'}", "--thread_num=1", "--quiet"])
    _feeds, expected = _load(name)
    for rank in range(2):
        with np.load(tmp_path / f"out{rank}.npz") as saved:
            assert _max_diff({k: saved[k] for k in saved.files}, expected) <= TOLERANCE


@pytest.mark.multiprocess
@pytest.mark.timeout(240)
@pytest.mark.parametrize("name", LAUNCHED)
def test_exported_model_from_python(name, export_shards):
    shards = export_shards(name)
    feeds, expected = _load(name)
    with ShardedModel(shards.model_path, backend="mpi", timeout=120) as model:
        assert _max_diff(model.predict(feeds), expected) <= TOLERANCE
        # the same ranks, another batch: the first row alone gives the first row of the outputs
        one = model.predict({k: v[:1] for k, v in feeds.items()})
        assert _max_diff(one, {k: v[:1] for k, v in expected.items()}) <= TOLERANCE

def test_vocabulary_that_tp_does_not_divide_keeps_embedding_and_head_whole(tmp_path):
    """GPT-2's 50257 tokens at --tp 2: the table and the LM head stay whole, the blocks are still cut."""
    from onnx import TensorProto, helper, numpy_helper

    from orchestrator._samples import save_model

    rng = np.random.default_rng(0)
    table = rng.standard_normal((7, 8)).astype(np.float32)
    w1, w2 = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 8)).astype(np.float32)
    head = rng.standard_normal((8, 7)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w1"], ["u"]),
         helper.make_node("Relu", ["u"], ["h"]), helper.make_node("MatMul", ["h", "w2"], ["m"]),
         helper.make_node("Add", ["e", "m"], ["r"]), helper.make_node("MatMul", ["r", "head"], ["logits"])],
        "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["b", "s", 7])],
        [numpy_helper.from_array(v, n) for n, v in (("table", table), ("w1", w1), ("w2", w2), ("head", head))])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save_model(model, tmp_path / "m.onnx")
    result = shard_model(tmp_path / "m.onnx", 2, tmp_path / "s", progress=False)
    split = {w["name"]: w["split"] for w in result.manifest["weights"]}
    assert split == {"table": "replicated", "w1": "columns", "w2": "rows", "head": "replicated"}
    assert "does not divide the hidden size 7" in "".join(result.manifest["replicated_reasons"].values())
    assert [c["op"] for c in result.manifest["collectives"]] == ["AllReduce"]
    ids = rng.integers(0, 7, (2, 5)).astype(np.int64)
    import onnxruntime as ort

    want = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"ids": ids})[0]
    got = SimulatedRanks(result.shard_paths).run({"ids": ids})["logits"]
    assert np.max(np.abs(got - want)) < 1e-5


def test_a_shape_read_from_a_cut_tensor_for_anything_but_a_target_keeps_the_layer_whole(tmp_path):
    """Shape(u) of a cut u is this rank's shape: fed to ConstantOfShape it would make a tensor of the wrong size."""
    from onnx import TensorProto, helper, numpy_helper

    from orchestrator._samples import save_model

    rng = np.random.default_rng(1)
    w1, w2 = rng.standard_normal((8, 16)).astype(np.float32), rng.standard_normal((16, 8)).astype(np.float32)
    one = helper.make_tensor("one", TensorProto.FLOAT, [1], [1.0])
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w1"], ["u"]), helper.make_node("Shape", ["u"], ["s"]),
         helper.make_node("ConstantOfShape", ["s"], ["ones"], value=one),
         helper.make_node("Relu", ["u"], ["r"]), helper.make_node("Add", ["r", "ones"], ["h"]),
         helper.make_node("MatMul", ["h", "w2"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 8])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save_model(model, tmp_path / "m.onnx")
    result = shard_model(tmp_path / "m.onnx", 2, tmp_path / "s", allow_replicate=True, progress=False)
    reasons = result.manifest["replicated_reasons"]
    assert any("the shape value s differs per rank" in r for r in reasons.values()), reasons
    x = rng.standard_normal((3, 8)).astype(np.float32)
    import onnxruntime as ort

    want = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
    got = SimulatedRanks(result.shard_paths).run({"x": x})["y"]
    assert np.max(np.abs(got - want)) < 1e-5
