"""Seed 001's quick start and dynamic weight update, run as its document runs them."""

from __future__ import annotations

import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from _seed_run import copy_script, printed_outputs, run, whole_model_outputs
from orchestrator import write_sample_model

pytestmark = pytest.mark.cli


def test_quick_start_prints_the_whole_models_first_50_values(tmp_path):
    # A MobileNetV2-shaped classifier with batch 1, as MindSpore Lite's converted model has, fed from a
    # flat input.bin exactly as the seed feeds it.
    model = write_sample_model("image", tmp_path / "model" / "mobilenetv2.onnx", batch=1, size=224, classes=1000)
    x = np.random.default_rng(1).random((1, 3, 224, 224), dtype=np.float32)
    x.tofile(tmp_path / "model" / "input.bin")
    script = copy_script("seed001_quick_start.py", tmp_path)

    result = run([sys.executable, script.name], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    [(name, size, count, values)] = printed_outputs(result.stdout)
    assert (name, size, count) == ("probs", 4000, 1000)  # the seed prints "data size is:4000 ... num is:1000"
    expected = whole_model_outputs(model, {"x": x})["probs"].reshape(-1)[:50]
    assert len(values) == 50
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-7)


def _mlp_with_new_weight(tmp_path):
    unet = write_sample_model("mlp", tmp_path / "SD1.5" / "unet.onnx", width=64, hidden=128, layers=2)
    proto = onnx.load(str(unet))
    name = "layers.1.fc1.weight"  # a MatMul weight, as the seed's name list holds
    old = numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == name))
    new = np.random.default_rng(7).standard_normal(old.shape).astype(np.float32)
    np.save(tmp_path / "new_weight.npy", new)
    (tmp_path / "update_weight_name_list.txt").write_text(name + "\n")
    (tmp_path / "config.ini").write_text('[ascend_context]\nvariable_weights_file="update_weight_name_list.txt"\n')
    for init in proto.graph.initializer:
        if init.name == name:
            init.CopyFrom(numpy_helper.from_array(new, name))
    updated = tmp_path / "reference_updated.onnx"
    onnx.save(proto, str(updated))
    return unet, updated


def test_dynamic_weight_update_runs_on_the_new_weights(tmp_path):
    unet, updated = _mlp_with_new_weight(tmp_path)
    script = copy_script("seed001_update_weights.py", tmp_path)
    x = np.random.default_rng(2).standard_normal((3, 64)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    # The seed's script ends at update_weights; run it as it is, then predict with the model it built.
    probe = (
        "import runpy, numpy as np\n"
        f"ns = runpy.run_path({script.name!r})\n"
        "np.save('y.npy', ns['model'].predict([np.load('x.npy')])[0].get_data_to_numpy())\n"
    )
    result = run([sys.executable, "-c", probe], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    y = np.load(tmp_path / "y.npy")
    np.testing.assert_allclose(y, whole_model_outputs(updated, {"x": x})["y"], rtol=1e-5, atol=1e-5)
    assert not np.allclose(y, whole_model_outputs(unet, {"x": x})["y"], atol=1e-3)  # the weight did change
