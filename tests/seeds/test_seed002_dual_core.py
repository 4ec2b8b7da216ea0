"""Seed 002's dual-core sample (its own Process + Pipe master), run as its document runs it."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from _seed_run import copy_script, run, whole_model_outputs

pytestmark = [pytest.mark.cli, pytest.mark.multiprocess]


def sd_like_model(batch: int) -> onnx.ModelProto:
    """A tiny stand-in for the seed's Stable Diffusion UNet: inputs sample, timestep, encoder_hidden_states."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((4, 4, 3, 3)).astype(np.float32) * 0.2, "conv.weight"),
        numpy_helper.from_array(rng.standard_normal((64, 4)).astype(np.float32) * 0.1, "proj.weight"),
        numpy_helper.from_array(np.array([batch, 4, 1, 1], np.int64), "proj.shape"),
    ]
    nodes = [
        helper.make_node("Conv", ["sample", "conv.weight"], ["h"], pads=[1, 1, 1, 1]),
        helper.make_node("MatMul", ["encoder_hidden_states", "proj.weight"], ["e"]),
        helper.make_node("ReduceMean", ["e"], ["e_mean"], axes=[1], keepdims=1),
        helper.make_node("Reshape", ["e_mean", "proj.shape"], ["e4"]),
        helper.make_node("Add", ["h", "e4"], ["he"]),
        helper.make_node("Add", ["he", "timestep"], ["out_sample"]),
    ]
    graph = helper.make_graph(
        nodes, "sd_like",
        [helper.make_tensor_value_info("sample", TensorProto.FLOAT, [batch, 4, 64, 64]),
         helper.make_tensor_value_info("timestep", TensorProto.FLOAT, [1]),
         helper.make_tensor_value_info("encoder_hidden_states", TensorProto.FLOAT, [batch, 77, 64])],
        [helper.make_tensor_value_info("out_sample", TensorProto.FLOAT, [batch, 4, 64, 64])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def test_dual_core_split_equals_the_batch_2_model(tmp_path):
    # The seed converts its model with half the batch (bs1) and splits a batch of 2 by hand.
    onnx.save(sd_like_model(1), str(tmp_path / "sd_bs1.onnx"))
    onnx.save(sd_like_model(2), str(tmp_path / "sd_bs2.onnx"))
    rng = np.random.default_rng(3)
    feeds = {
        "sample": rng.standard_normal((2, 4, 64, 64)).astype(np.float32),
        "timestep": np.array([0.25], np.float32),
        "encoder_hidden_states": rng.standard_normal((2, 77, 64)).astype(np.float32),
    }
    np.savez(tmp_path / "inputs.npz", **feeds)
    copy_script("seed002", tmp_path)

    result = run([sys.executable, "main.py"], cwd=tmp_path, timeout=60)

    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[:2] == ["Success to build model 0", "Success to build model 1"]
    # the two children print this at the same moment on one pipe: count it in the text, not per line
    assert result.stdout.count("Receive exit message  and start to exit") == 2
    assert lines[-1] == "=========== success ==========="
    expected = whole_model_outputs(tmp_path / "sd_bs2.onnx", feeds)["out_sample"]
    np.testing.assert_allclose(np.load(tmp_path / "result.npy"), expected, rtol=1e-5, atol=1e-5)
