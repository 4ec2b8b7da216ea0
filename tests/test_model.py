import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import orchestrator as mslite
from ranks import ConfigError, InputError, ModelError, ModelNotFoundError

TOL = 1e-5  # same engine, same graph: outputs must agree to float32 rounding


def reference(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def build(path, **cpu):
    context = mslite.Context()
    for key, value in cpu.items():
        setattr(context.cpu, key, value)
    model = mslite.Model()
    model.build_from_file(path, mslite.ModelType.ONNX, context)
    return model


@pytest.mark.parametrize("name, shape", [("mlp", (3, 64)), ("transformer", (2, 5, 32)), ("image", (2, 3, 32, 32))])
def test_predict_matches_onnxruntime(sample, name, shape):
    path = sample(name)
    x = np.random.default_rng(1).standard_normal(shape, dtype=np.float32)
    model = build(path, thread_num=1)
    outputs = model.predict([x])
    expected = reference(path, {"x": x})
    assert [o.name for o in outputs] == [o.name for o in ort.InferenceSession(str(path)).get_outputs()]
    for got, want in zip(outputs, expected):
        np.testing.assert_allclose(got.get_data_to_numpy(), want, rtol=0, atol=TOL)
        assert got.element_num == want.size and got.data_size == want.nbytes


def test_add_model_with_tensors_dict_and_arrays(sample):
    model = build(sample("add"))
    x = np.arange(4, dtype=np.float32).reshape(2, 2)
    y = np.full((2, 2), 10, np.float32)
    inputs = model.get_inputs()
    assert [t.name for t in inputs] == ["x", "y"] and inputs[0].shape == [2, 2]
    inputs[0].set_data_from_numpy(x)
    inputs[1].set_data_from_numpy(y)
    for given in (inputs, [x, y], {"y": y, "x": x}):
        (z,) = model.predict(given)
        np.testing.assert_array_equal(z.get_data_to_numpy(), x + y)
        assert (z.name, z.data_size, z.element_num, z.shape) == ("z", 16, 4, [2, 2])


def test_external_data_model(sample):
    path = sample("mlp", external_data=True)
    assert path.with_name(path.name + ".data").stat().st_size > 60_000
    x = np.ones((2, 64), np.float32)
    np.testing.assert_allclose(build(path).predict([x])[0].get_data_to_numpy(), reference(path, {"x": x})[0], atol=TOL)


@pytest.mark.parametrize(
    "inputs, message",
    [
        (lambda: [np.ones((2, 2), np.float32)], "got 1 inputs, the model has 2: ['x', 'y']"),
        (lambda: {"x": np.ones((2, 2), np.float32), "w": np.ones((2, 2), np.float32)}, "unknown input name(s) ['w']"),
        (lambda: {"x": np.ones((2, 2), np.float32)}, "missing input(s) ['y']"),
        (lambda: [np.ones((2, 2), np.float64), np.ones((2, 2), np.float32)], "input 'x' has dtype float64, the model expects float32"),
        (lambda: [np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)], "input 'x': shape [2, 3] does not match [2, 2]"),
        (lambda: [np.ones((4,), np.float32), np.ones((2, 2), np.float32)], "input 'x': shape [4] has 1 dimensions, expected 2"),
        (lambda: "x", "inputs must be a list of Tensors or numpy arrays"),
        (lambda: [[1, 2], np.ones((2, 2), np.float32)], "input 'x' must be a Tensor or numpy array, got list"),
    ],
)
def test_bad_inputs(sample, inputs, message):
    model = build(sample("add"))
    with pytest.raises(InputError) as info:
        model.predict(inputs())
    assert message in str(info.value)


def test_empty_batch_and_dynamic_dims(sample):
    model = build(sample("mlp"))
    with pytest.raises(InputError, match=r"input 'x' is empty \(shape \[0, 64\]\)"):
        model.predict([np.ones((0, 64), np.float32)])
    with pytest.raises(InputError, match=r"does not match \[\?, 64\] \(dimension 1 must be 64\)"):
        model.predict([np.ones((3, 65), np.float32)])
    assert model.predict([np.ones((7, 64), np.float32)])[0].shape == [7, 64]


def test_tensor_shape_checked_unlike_mindspore_lite(sample):
    model = build(sample("add"))
    tensor = model.get_inputs()[0]
    with pytest.raises(InputError, match=r"shape \[1, 4\] does not match \[2, 2\]"):
        tensor.set_data_from_numpy(np.ones((1, 4), np.float32))
    with pytest.raises(InputError, match="data type float64 does not match the tensor's float32"):
        tensor.set_data_from_numpy(np.ones((2, 2)))


def test_resize_dynamic_batch(sample):
    model = build(sample("image"))
    inputs = model.get_inputs()
    assert inputs[0].shape == [-1, 3, 32, 32]
    model.resize(inputs, [[4, 3, 32, 32]])
    assert model.get_inputs()[0].shape == [4, 3, 32, 32]
    assert "x:4,3,32,32" == model.get_model_info("input_shape")
    assert model.get_model_info("dynamic_dims") == "x:0"
    with pytest.raises(InputError, match="dimension 1 must be 3"):
        model.resize(inputs, [[4, 1, 32, 32]])
    inputs[0].set_data_from_numpy(np.zeros((4, 3, 32, 32), np.float32))
    assert model.predict(inputs)[0].shape == [4, 10]


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "is empty"),
        (b"this is not a model at all" * 10, "is not a readable ONNX model"),
    ],
)
def test_bad_model_files(tmp_path, content, message):
    path = tmp_path / "bad.onnx"
    path.write_bytes(content)
    with pytest.raises(ModelError) as info:
        build(path)
    assert message in str(info.value) and str(path) in str(info.value)


def test_truncated_model(tmp_path, sample):
    data = sample("mlp").read_bytes()
    path = tmp_path / "truncated.onnx"
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelError, match="truncated"):
        build(path)


def test_missing_model_and_external_data(tmp_path, sample):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        build(tmp_path / "missing.onnx")
    src = sample("mlp", external_data=True)
    lonely = tmp_path / src.name
    lonely.write_bytes(src.read_bytes())  # without its .data file
    with pytest.raises(ModelError, match="ONNX Runtime could not build"):
        build(lonely)


def test_mindir_type_with_an_onnx_file_loads_it(sample):
    # Ported scripts keep mslite.ModelType.MINDIR and change only the path to an ONNX file.
    model = mslite.Model()
    model.build_from_file(str(sample("add")), mslite.ModelType.MINDIR)
    x = np.ones((2, 2), np.float32)
    assert np.array_equal(model.predict([x, x])[0].get_data_to_numpy(), x + x)


def test_mindir_file_refused_with_advice(tmp_path):
    fake = tmp_path / "net.mindir"
    fake.write_bytes(b"\x0a\x05mindir-not-onnx" * 8)
    with pytest.raises(ModelError, match=r"not an ONNX model, and MINDIR files .*export the network to ONNX"):
        mslite.Model().build_from_file(str(fake), mslite.ModelType.MINDIR)


def test_update_weights_in_place(sample):
    path = sample("mlp")
    model = build(path)
    x = np.ones((2, 64), np.float32)
    before = model.predict([x])[0].get_data_to_numpy().copy()
    proto = onnx.load(str(path))
    weight = next(i for i in proto.graph.initializer if i.name == "layers.1.fc2.bias")
    new = np.full(tuple(weight.dims), 0.5, np.float32)
    model.update_weights([[mslite.Tensor(new, name="layers.1.fc2.bias")]])
    after = model.predict([x])[0].get_data_to_numpy()
    old_bias = onnx.numpy_helper.to_array(weight)
    # The bias enters the output additively: the difference is exactly new - old.
    np.testing.assert_allclose(after - before, np.broadcast_to(new - old_bias, after.shape), atol=1e-5)
    with pytest.raises(InputError, match="has no weight named 'nope'"):
        model.update_weights({"nope": new})
    with pytest.raises(InputError, match=r"weight 'layers.1.fc2.bias' is float32\[3\], the model's is float32\[64\]"):
        model.update_weights({"layers.1.fc2.bias": np.ones(3, np.float32)})


def test_get_model_info_and_outputs(sample):
    model = build(sample("image"))
    assert "producer" not in model.get_model_info("user_info")
    assert model.get_outputs()[0].name == "probs" and model.get_outputs()[0].shape == [-1, 10]
    with pytest.raises(mslite.ConfigError, match="valid keys are"):
        model.get_model_info("nope")


def test_predict_from_many_threads(sample):
    model = build(sample("mlp"), thread_num=1)
    rng = np.random.default_rng(3)
    batches = [rng.standard_normal((i + 1, 64), dtype=np.float32) for i in range(8)]
    expected = [reference(sample("mlp"), {"x": b})[0] for b in batches]
    errors, results = [], {}

    def worker(i):
        try:
            for _ in range(5):
                results[i] = model.predict([batches[i]])[0].get_data_to_numpy()
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    for i, want in enumerate(expected):
        np.testing.assert_allclose(results[i], want, atol=TOL)


def test_input_shape_from_config(sample, tmp_path):
    ini = tmp_path / "c.ini"
    ini.write_text("[cpu_context]\ninput_shape=x:4,3,32,32\n")
    model = mslite.Model()
    model.build_from_file(sample("image"), mslite.ModelType.ONNX, mslite.Context(), config_path=str(ini))
    assert model.get_inputs()[0].shape == [4, 3, 32, 32]
    ini.write_text("[cpu_context]\ninput_shape=img:4,3,32,32\n")
    with pytest.raises(mslite.ConfigError, match="input_shape names 'img', but the model's inputs are \\['x'\\]"):
        mslite.Model().build_from_file(sample("image"), mslite.ModelType.ONNX, mslite.Context(), config_path=str(ini))


def test_predict_into_writes_callers_buffers(sample):
    path = sample("mlp")
    model = build(path)
    x = np.random.default_rng(5).standard_normal((3, 64), dtype=np.float32)
    out = np.zeros((3, 64), np.float32)
    model.predict_into({"x": x}, {"y": out})
    np.testing.assert_allclose(out, reference(path, {"x": x})[0], atol=TOL)
    with pytest.raises(ModelError, match="into the given buffers failed"):
        model.predict_into({"x": x}, {"y": np.zeros((2, 64), np.float32)})
    with pytest.raises(InputError, match="must name every model output"):
        model.predict_into({"x": x}, {"z": out})


def test_update_weights_unnamed_tensors_follow_the_variable_weights_file(sample, tmp_path):
    path = sample("mlp")
    (tmp_path / "names.txt").write_text("layers.1.fc2.bias\n")
    ini = tmp_path / "config.ini"
    ini.write_text("[ascend_context]\nvariable_weights_file=names.txt\n")
    model = mslite.Model()
    model.build_from_file(str(path), mslite.ModelType.ONNX, mslite.Context(), str(ini))
    x = np.ones((2, 64), np.float32)
    before = model.predict([x])[0].get_data_to_numpy().copy()
    model.update_weights([[mslite.Tensor(np.full(64, 0.5, np.float32))]])
    after = model.predict([x])[0].get_data_to_numpy()
    assert not np.allclose(before, after)
    with pytest.raises(InputError, match=r"\['layers.0.fc1.bias'\] not among the weights variable_weights_file lets change"):
        model.update_weights([[mslite.Tensor(np.zeros(128, np.float32), name="layers.0.fc1.bias")]])
    with pytest.raises(InputError, match="got 2 tensors, but variable_weights_file names only 1"):
        model.update_weights([[mslite.Tensor(np.zeros(64, np.float32)), mslite.Tensor(np.zeros(64, np.float32))]])


def test_variable_weights_that_the_model_lacks_fail_at_build(sample, tmp_path):
    (tmp_path / "names.txt").write_text("no.such.weight\n")
    ini = tmp_path / "config.ini"
    ini.write_text("[ascend_context]\nvariable_weights_file=names.txt\n")
    with pytest.raises(ConfigError, match=r"variable weights \['no.such.weight'\] are not weights of"):
        mslite.Model().build_from_file(str(sample("mlp")), mslite.ModelType.ONNX, mslite.Context(), str(ini))
