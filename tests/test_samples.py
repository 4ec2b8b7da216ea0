import hashlib

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from orchestrator import SAMPLE_MODELS, write_sample_model


@pytest.mark.parametrize("name", sorted(SAMPLE_MODELS))
def test_deterministic_from_seed(tmp_path, name):
    from tests.conftest import SMALL

    a = write_sample_model(name, tmp_path / "a.onnx", **SMALL[name])
    b = write_sample_model(name, tmp_path / "b.onnx", **SMALL[name])
    assert hashlib.sha256(a.read_bytes()).digest() == hashlib.sha256(b.read_bytes()).digest()
    onnx.checker.check_model(str(a))


def test_seed_changes_weights(tmp_path):
    a = write_sample_model("mlp", tmp_path / "a.onnx", width=8, hidden=16, layers=1, seed=0)
    b = write_sample_model("mlp", tmp_path / "b.onnx", width=8, hidden=16, layers=1, seed=1)
    assert a.read_bytes() != b.read_bytes()


def test_external_data_gives_same_outputs(tmp_path):
    inline = write_sample_model("transformer", tmp_path / "t.onnx", d_model=32, heads=4, layers=1, ffn=64)
    external = write_sample_model("transformer", tmp_path / "te.onnx", external_data=True, d_model=32, heads=4, layers=1, ffn=64)
    assert external.stat().st_size < inline.stat().st_size / 4
    x = np.random.default_rng(0).standard_normal((2, 7, 32), dtype=np.float32)
    a = ort.InferenceSession(str(inline)).run(None, {"x": x})[0]
    b = ort.InferenceSession(str(external)).run(None, {"x": x})[0]
    np.testing.assert_array_equal(a, b)


def test_transformer_is_causal(tmp_path):
    path = write_sample_model("transformer", tmp_path / "t.onnx", d_model=32, heads=4, layers=2, ffn=64)
    session = ort.InferenceSession(str(path))
    x = np.random.default_rng(0).standard_normal((1, 6, 32), dtype=np.float32)
    y = x.copy()
    y[:, 4:] = np.random.default_rng(1).standard_normal((1, 2, 32))  # later positions must not change earlier outputs
    a, b = (session.run(None, {"x": v})[0] for v in (x, y))
    np.testing.assert_allclose(a[:, :4], b[:, :4], atol=1e-5)
    assert np.abs(a[:, 4:] - b[:, 4:]).max() > 1e-3


def test_unknown_sample_and_bad_sizes(tmp_path):
    with pytest.raises(ValueError, match="unknown sample model 'vgg'"):
        write_sample_model("vgg", tmp_path / "v.onnx")
    with pytest.raises(ValueError, match="d_model \\(30\\) must be a multiple of heads \\(4\\)"):
        write_sample_model("transformer", tmp_path / "t.onnx", d_model=30, heads=4)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        write_sample_model("mlp", tmp_path / "m.onnx", width=0)
