import threading

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import orchestrator as mslite
from orchestrator import write_sample_model
from ranks import ConfigError, ConfigTypeError, InputError, InputTypeError, ModelError, ModelNotFoundError

TOL = 1e-5  # same engine, same graph: outputs must agree to float32 rounding


def reference(path, feeds):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def reference_any_size(image_path, x):
    """ONNX Runtime on the sample image classifier with its height and width made free."""
    free = onnx.load(str(image_path))
    for dim in free.graph.input[0].type.tensor_type.shape.dim[2:]:
        dim.dim_param = "free"
    return ort.InferenceSession(free.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


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
    "inputs, message, builtin",
    [
        (lambda: [np.ones((2, 2), np.float32)], "got 1 inputs, the model has 2: ['x', 'y']", RuntimeError),
        (lambda: {"x": np.ones((2, 2), np.float32), "w": np.ones((2, 2), np.float32)}, "unknown input name(s) ['w']", RuntimeError),
        (lambda: {"x": np.ones((2, 2), np.float32)}, "missing input(s) ['y']", RuntimeError),
        (lambda: [np.ones((2, 2), np.float64), np.ones((2, 2), np.float32)], "input 'x' has dtype float64, the model expects float32", RuntimeError),
        (lambda: [np.ones((2, 3), np.float32), np.ones((2, 2), np.float32)],
         "input 'x': shape [2, 3] does not match [2, 2]: the array holds 6 float32 elements, the input takes 4", RuntimeError),
        (lambda: [np.ones((5,), np.float32), np.ones((2, 2), np.float32)], "input 'x': shape [5] does not match [2, 2]", RuntimeError),
        (lambda: "x", "inputs must be a list of Tensors or numpy arrays", TypeError),
        (lambda: [[1, 2], np.ones((2, 2), np.float32)], "input 'x' must be a Tensor or numpy array, got list", TypeError),
    ],
)
def test_bad_inputs(sample, inputs, message, builtin):
    model = build(sample("add"))
    with pytest.raises(InputError) as info:
        model.predict(inputs())
    assert message in str(info.value)
    assert isinstance(info.value, builtin)  # what MindSpore Lite raises, for ported except clauses


def test_fully_known_input_takes_an_array_of_another_rank_with_its_element_count(sample):
    model = build(sample("add"))
    x = np.arange(4, dtype=np.float32)
    (z,) = model.predict([x, np.ones((1, 2, 2), np.float32)])  # reshaped to [2, 2], as set_data_from_numpy does
    np.testing.assert_array_equal(z.get_data_to_numpy(), x.reshape(2, 2) + 1)


def test_empty_batch_and_dynamic_dims(sample):
    model = build(sample("mlp"))
    with pytest.raises(InputError, match=r"input 'x' is empty \(shape \[0, 64\]\)"):
        model.predict([np.ones((0, 64), np.float32)])
    with pytest.raises(InputError, match=r"does not match \[\?, 64\] \(dimension 1 must be 64\)"):
        model.predict([np.ones((3, 65), np.float32)])
    assert model.predict([np.ones((7, 64), np.float32)])[0].shape == [7, 64]


def test_set_data_checks_dtype_and_element_count_like_mindspore_lite(sample):
    model = build(sample("add"))
    tensor = model.get_inputs()[0]
    tensor.set_data_from_numpy(np.arange(4, dtype=np.float32))  # flat, as np.fromfile gives it
    assert tensor.shape == [2, 2] and tensor.get_data_to_numpy().shape == (2, 2)
    tensor.set_data_from_numpy(np.ones((1, 2, 2), np.float32))
    assert tensor.get_data_to_numpy().shape == (2, 2)
    with pytest.raises(RuntimeError, match=r"tensor 'x': shape \[1, 5\] does not match \[2, 2\]: the array holds 5 float32 "
                                           r"elements, the tensor takes 4") as info:
        tensor.set_data_from_numpy(np.ones((1, 5), np.float32))
    assert isinstance(info.value, InputError)
    with pytest.raises(RuntimeError, match=r"data type float64 does not match the tensor's float32 \(array: float64 \[2, 2\], "
                                           r"4 elements; tensor: float32 \[2, 2\], 4 elements\)"):
        tensor.set_data_from_numpy(np.ones((2, 2)))
    with pytest.raises(TypeError, match="takes a numpy.ndarray, got list"):
        tensor.set_data_from_numpy([[1.0, 2.0], [3.0, 4.0]])
    with pytest.raises(TypeError, match="numpy dtype complex64 is not supported"):
        tensor.set_data_from_numpy(np.ones((2, 2), np.complex64))


def test_an_array_of_the_inputs_rank_in_another_arrangement_is_refused_not_scrambled(sample, tmp_path):
    """[1, 3, 32, 32] into a [1, 32, 32, 3] input holds the right number of elements, but reshaping it would feed
    the model a scrambled image and return wrong numbers without a word: refused, in set_data_from_numpy and in
    predict. A flat buffer, another rank, or sizes of 1 moved about (the same memory order) are still reshaped."""
    model = build(sample("add"))
    tensor = model.get_inputs()[0]  # [2, 2]
    with pytest.raises(InputError, match=r"tensor 'x': shape \[4, 1\] does not match \[2, 2\]: the same 4 elements in another "
                                         r"arrangement \(a layout such as NCHW given for NHWC\?\)\. An array of the tensor's "
                                         r"rank must have its shape: transpose it, or reshape it yourself"):
        tensor.set_data_from_numpy(np.ones((4, 1), np.float32))
    with pytest.raises(InputError, match=r"input 'x': shape \[1, 4\] does not match \[2, 2\]: the same 4 elements in another "
                                         r"arrangement .*An array of the input's rank must have its shape"):
        model.predict([np.ones((1, 4), np.float32), np.ones((2, 2), np.float32)])
    path = write_sample_model("image", tmp_path / "nhwc.onnx", batch=1, layout="NHWC", size=32, classes=10)
    nhwc = build(path)
    assert nhwc.get_inputs()[0].shape == [1, 32, 32, 3]
    nchw = np.random.default_rng(3).random((1, 3, 32, 32), dtype=np.float32)
    with pytest.raises(InputError, match=r"shape \[1, 3, 32, 32\] does not match \[1, 32, 32, 3\]: the same 3072 elements"):
        nhwc.predict([mslite.Tensor(nchw)])
    # What is still taken as raw data: a flat buffer, another rank, and sizes of 1 moved about.
    image = nchw.transpose(0, 2, 3, 1)
    expected = reference(path, {"x": image})[0]
    for given in (image.reshape(-1), image.reshape(32, 32, 3), image.reshape(32, 32, 3, 1)):
        np.testing.assert_allclose(nhwc.predict([given])[0].get_data_to_numpy(), expected, atol=TOL)


def test_set_data_with_free_dimensions_takes_the_arrays_shape(sample):
    tensor = build(sample("image")).get_inputs()[0]
    assert tensor.shape == [-1, 3, 32, 32]
    tensor.set_data_from_numpy(np.zeros((3, 3, 32, 32), np.float32))
    assert tensor.shape == [3, 3, 32, 32] and tensor.element_num == 3 * 3 * 32 * 32
    fresh = build(sample("image")).get_inputs()[0]
    with pytest.raises(InputError, match=r"tensor 'x': shape \[2, 3, 31, 32\] does not match \[\?, 3, 32, 32\] \(dimension 2 must be 32\)"):
        fresh.set_data_from_numpy(np.zeros((2, 3, 31, 32), np.float32))
    with pytest.raises(InputError, match=r"has 1 dimensions.*\(array: float32 \[3072\], 3072 elements\); with free dimensions the "
                                         r"array must have the same rank: reshape it, or resize the model"):
        fresh.set_data_from_numpy(np.zeros(3072, np.float32))


def test_seed_style_flat_input_after_resize(sample, tmp_path):
    """Seed 001: inputs[0].set_data_from_numpy(np.fromfile("input.bin", dtype=np.float32)) into a fixed-shape input."""
    path = sample("image")
    x = np.random.default_rng(4).random((1, 3, 32, 32), dtype=np.float32)
    x.tofile(tmp_path / "input.bin")
    model = build(path)
    model.resize(model.get_inputs(), [[1, 3, 32, 32]])
    inputs = model.get_inputs()
    inputs[0].set_data_from_numpy(np.fromfile(tmp_path / "input.bin", dtype=np.float32))
    outputs = model.predict(inputs)
    np.testing.assert_allclose(outputs[0].get_data_to_numpy(), reference(path, {"x": x})[0], atol=TOL)


def test_resize_dynamic_batch(sample):
    model = build(sample("image"))
    inputs = model.get_inputs()
    assert inputs[0].shape == [-1, 3, 32, 32]
    session = model._session
    model.resize(inputs, [[4, 3, 32, 32]])
    assert model._session is session  # only a free dimension was set: nothing to rebuild
    assert inputs[0].shape == model.get_inputs()[0].shape == [4, 3, 32, 32]
    assert "x:4,3,32,32" == model.get_model_info("input_shape")
    assert model.get_model_info("dynamic_dims") == "x:0"
    inputs[0].set_data_from_numpy(np.zeros((4, 3, 32, 32), np.float32))
    assert model.predict(inputs)[0].shape == [4, 10]
    # predict now takes the resized shape only, and says so
    with pytest.raises(InputError, match=r"input 'x': shape \[2, 3, 32, 32\] does not match \[4, 3, 32, 32\]: the array holds "
                                         r"6144 float32 elements, the input takes 12288"):
        model.predict([np.zeros((2, 3, 32, 32), np.float32)])
    model.resize(model.get_inputs(), [[4, 3, 32, 32]])  # the same shape: a no-op
    assert model._session is session


def test_resize_to_new_fixed_dimensions_rebuilds_the_session(sample):
    path = sample("image")
    model = build(path)
    model.resize(model.get_inputs(), [[2, 3, 48, 40]])  # the convolutions and the global pool take any size
    assert model.get_inputs()[0].shape == [2, 3, 48, 40]
    assert model.get_outputs()[0].shape == [2, 10]
    x = np.random.default_rng(6).standard_normal((2, 3, 48, 40), dtype=np.float32)
    np.testing.assert_allclose(model.predict([x])[0].get_data_to_numpy(), reference_any_size(path, x), atol=TOL)
    with pytest.raises(InputError, match=r"shape \[2, 3, 32, 32\] does not match \[2, 3, 48, 40\]"):
        model.predict([np.zeros((2, 3, 32, 32), np.float32)])
    # back within the file's own shapes: the original graph again
    model.resize(model.get_inputs(), [[1, 3, 32, 32]])
    assert model.get_outputs()[0].shape == [-1, 10] and model._resized_shapes is None
    x = x[:1, :, :32, :32].copy()
    np.testing.assert_allclose(model.predict([x])[0].get_data_to_numpy(), reference(path, {"x": x})[0], atol=TOL)


def test_resize_that_the_graph_cannot_take_keeps_the_old_session(sample):
    model = build(sample("image"))
    model.resize(model.get_inputs(), [[2, 3, 40, 40]])
    session = model._session
    # The first convolution's weights fix 3 channels: ONNX Runtime builds the graph but cannot run it.
    with pytest.raises(InputError, match=r"resize: the graph of image.onnx cannot take input 'x' of shape \[2, 1, 40, 40\] "
                                         r"\(was \[2, 3, 40, 40\]\): .*kernel channels.*The model keeps its previous shapes"):
        model.resize(model.get_inputs(), [[2, 1, 40, 40]])
    with pytest.raises(InputError, match=r"shape \[2, 3\] has 2 dimensions, the model's has 4 \(\[.*\], now \[2, 3, 40, 40\]\)"):
        model.resize(model.get_inputs(), [[2, 3]])
    mlp = build(sample("mlp"))
    with pytest.raises(InputError, match=r"cannot take input 'x' of shape \[2, 65\].*Incompatible dimensions for matrix multiplication"):
        mlp.resize(mlp.get_inputs(), [[2, 65]])  # ONNX Runtime refuses to build it
    assert model._session is session and model.get_inputs()[0].shape == [2, 3, 40, 40]
    assert model.predict([np.zeros((2, 3, 40, 40), np.float32)])[0].shape == [2, 10]
    assert mlp.predict([np.zeros((3, 64), np.float32)])[0].shape == [3, 64]


def test_resize_model_with_external_data(sample, tmp_path, monkeypatch):
    path = sample("image", external_data=True)
    assert path.with_name(path.name + ".data").exists()
    model = build(path)
    monkeypatch.chdir(tmp_path)  # the weights are found beside the model, not in the working directory
    model.resize(model.get_inputs(), [[3, 3, 40, 36]])
    assert model._resized_shapes == {"x": [3, 3, 40, 36]}
    x = np.random.default_rng(7).standard_normal((3, 3, 40, 36), dtype=np.float32)
    np.testing.assert_allclose(model.predict([x])[0].get_data_to_numpy(), reference_any_size(path, x), atol=TOL)


def test_resize_argument_errors(sample):
    model = build(sample("add"))
    inputs = model.get_inputs()
    with pytest.raises(ValueError, match="got 2 inputs and 1 shapes"):
        model.resize(inputs, [[2, 2]])
    with pytest.raises(TypeError, match="dims must be a list"):
        model.resize(inputs, ((2, 2), (2, 2)))
    with pytest.raises(TypeError, match=r"dims\[1\] must be a list or tuple of int, got float 2.0 at index 0"):
        model.resize(inputs, [[2, 2], [2.0, 2]])
    with pytest.raises(TypeError, match="inputs must be Tensors, got ndarray at index 0"):
        model.resize([np.ones((2, 2))], [[2, 2]])
    with pytest.raises(InputError, match=r"shape \[4\] has 1 dimensions, the model's has 2"):
        model.resize(inputs[:1], [[4]])
    with pytest.raises(InputError, match="every dimension must be positive"):
        model.resize(inputs[:1], [[0, 2]])
    with pytest.raises(InputError, match=r"cannot take input 'y' of shape \[3, 2\] \(was \[2, 2\]\)"):
        model.resize(inputs[1:], [[3, 2]])  # one input of several may be resized; [2, 2] + [3, 2] does not broadcast
    with pytest.raises(InputError, match="the model has no input named 'nope'"):
        model.resize([mslite.Tensor(name="nope")], [[2, 2]])


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


def test_a_file_neither_onnx_nor_mindir_refused_with_advice(tmp_path):
    # (MINDIR files are converted: tests/test_mindir*.py.) A .ms file of MindSpore Lite's converter is neither.
    fake = tmp_path / "net.ms"
    fake.write_bytes(b"\x1c\x00\x00\x00MSL2 flatbuffer, not ONNX" * 8)
    with pytest.raises(ModelError, match=r"neither an ONNX model nor a MINDIR file .*export the network to ONNX"):
        mslite.Model().build_from_file(str(fake), mslite.ModelType.MINDIR_LITE)
    empty = tmp_path / "net.ms"
    empty.write_bytes(b"")
    with pytest.raises(ModelError, match=rf"model file {empty} is empty; expected a MINDIR file written by MindSpore"):
        mslite.Model().build_from_file(str(empty), mslite.ModelType.MINDIR)


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


def _with_variable_weights(path, tmp_path, names: list[str]):
    """The model built with a config.ini whose variable_weights_file lists ``names``, as seed 001 sets it up."""
    (tmp_path / "names.txt").write_text("".join(f"{name}\n" for name in names))
    ini = tmp_path / "config.ini"
    ini.write_text("[ascend_context]\nvariable_weights_file=names.txt\n")
    model = mslite.Model()
    model.build_from_file(str(path), mslite.ModelType.ONNX, mslite.Context(), str(ini))
    return model


def test_update_weights_unnamed_tensors_follow_the_variable_weights_file(sample, tmp_path):
    model = _with_variable_weights(sample("mlp"), tmp_path, ["layers.1.fc2.bias"])
    x = np.ones((2, 64), np.float32)
    before = model.predict([x])[0].get_data_to_numpy().copy()
    model.update_weights([[mslite.Tensor(np.full(64, 0.5, np.float32))]])
    after = model.predict([x])[0].get_data_to_numpy()
    assert not np.allclose(before, after)
    with pytest.raises(InputError, match=r"\['layers.0.fc1.bias'\] not among the weights variable_weights_file lets change"):
        model.update_weights([[mslite.Tensor(np.zeros(128, np.float32), name="layers.0.fc1.bias")]])
    with pytest.raises(InputError, match="got 2 tensors, but variable_weights_file names only 1"):
        model.update_weights([[mslite.Tensor(np.zeros(64, np.float32)), mslite.Tensor(np.zeros(64, np.float32))]])


def test_update_weights_by_position_needs_one_tensor_per_listed_name(sample, tmp_path):
    """Fewer unnamed tensors than variable_weights_file lists would silently change the first weights listed,
    maybe not the ones meant: refused, and nothing changes. Named tensors may update any subset."""
    model = _with_variable_weights(sample("mlp"), tmp_path, ["layers.0.fc2.bias", "layers.1.fc2.bias"])
    x = np.ones((2, 64), np.float32)
    before = model.predict([x])[0].get_data_to_numpy().copy()
    with pytest.raises(InputError, match=r"got 1 tensors \(1 unnamed\), but variable_weights_file names 2 weights "
                                         r"\['layers.0.fc2.bias', 'layers.1.fc2.bias'\]: unnamed tensors are matched to "
                                         r"those names in order, so give one per name, or name each tensor"):
        model.update_weights([[mslite.Tensor(np.full(64, 0.5, np.float32))]])
    np.testing.assert_array_equal(model.predict([x])[0].get_data_to_numpy(), before)
    model.update_weights([[mslite.Tensor(np.full(64, 0.5, np.float32), name="layers.1.fc2.bias")]])
    assert not np.allclose(model.predict([x])[0].get_data_to_numpy(), before)


def test_variable_weights_that_the_model_lacks_fail_at_build(sample, tmp_path):
    (tmp_path / "names.txt").write_text("no.such.weight\n")
    ini = tmp_path / "config.ini"
    ini.write_text("[ascend_context]\nvariable_weights_file=names.txt\n")
    with pytest.raises(ConfigError, match=r"variable weights \['no.such.weight'\] are not weights of"):
        mslite.Model().build_from_file(str(sample("mlp")), mslite.ModelType.ONNX, mslite.Context(), str(ini))


def test_get_inputs_gives_each_caller_its_own_tensors(sample):
    model = build(sample("add"), thread_num=1)
    a, b = model.get_inputs(), model.get_inputs()
    assert a is not b and a[0] is not b[0]
    a[0].set_data_from_numpy(np.ones((2, 2), np.float32))
    assert not b[0].has_data() and not model.get_inputs()[0].has_data()
    errors, results = [], {}

    def worker(i):  # the seeds' thread body: get_inputs, set_data_from_numpy, predict
        try:
            for _ in range(20):
                inputs = model.get_inputs()
                inputs[0].set_data_from_numpy(np.full((2, 2), i, np.float32))
                inputs[1].set_data_from_numpy(np.full((2, 2), i, np.float32))
                value = model.predict(inputs)[0].get_data_to_numpy()
                if not np.array_equal(value, np.full((2, 2), 2 * i, np.float32)):
                    results[i] = value
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and not results


def test_get_outputs_are_tensor_metas(sample):
    model = build(sample("add"))
    (meta,) = model.get_outputs()
    assert isinstance(meta, mslite.TensorMeta) and not isinstance(meta, mslite.Tensor)
    assert (meta.name, meta.dtype, meta.shape, meta.format, meta.element_num, meta.data_size) == (
        "z", mslite.DataType.FLOAT32, [2, 2], mslite.Format.DEFAULT, 4, 16)
    assert str(meta).endswith("element_num: 4,\ndata_size: 16.")


def test_model_str(sample):
    model = mslite.Model()
    assert str(model) == "model_path: ."
    path = sample("add")
    model.build_from_file(str(path), mslite.ModelType.ONNX, mslite.Context())
    assert str(model) == f"model_path: {path}."


def test_decryption_arguments(sample):
    path = sample("add")
    model = mslite.Model()
    model.build_from_file(path, mslite.ModelType.ONNX, None, "", None, None, "AES-CBC", 4)  # positional, as MindSpore Lite
    with pytest.raises(RuntimeError, match="encrypted models are not supported by this runtime .* Decrypt the model first") as info:
        model.build_from_file(path, mslite.ModelType.ONNX, dec_key=b"0123456789abcdef")
    assert isinstance(info.value, ModelError)
    for kwargs, error, message in [
        ({"dec_key": "0123456789abcdef"}, TypeError, "dec_key must be bytes, got str"),
        ({"dec_mode": 1}, TypeError, "dec_mode must be a str"),
        ({"dec_mode": ""}, ValueError, "dec_mode must not be empty"),
        ({"dec_num_parallel": 1.0}, TypeError, "dec_num_parallel must be an int"),
        ({"dec_num_parallel": 65}, ValueError, r"dec_num_parallel must be in 0..64, got 65"),
        ({"dec_num_parallel": -1}, ValueError, r"dec_num_parallel must be in 0..64, got -1"),
    ]:
        with pytest.raises(error, match=message):
            mslite.Model().build_from_file(path, mslite.ModelType.ONNX, **kwargs)


def test_build_errors_are_the_builtins_mindspore_lite_raises(sample, tmp_path):
    path = sample("add")
    with pytest.raises(RuntimeError, match="does not exist"):
        mslite.Model().build_from_file(tmp_path / "missing.onnx", mslite.ModelType.ONNX)
    (tmp_path / "bad.onnx").write_bytes(b"not a model" * 20)
    with pytest.raises(RuntimeError, match="is not a readable ONNX model"):
        mslite.Model().build_from_file(tmp_path / "bad.onnx", mslite.ModelType.ONNX)
    with pytest.raises(RuntimeError) as info:
        mslite.Model().build_from_file(path, mslite.ModelType.ONNX, mslite.Context(), config_path=str(tmp_path / "none.ini"))
    assert isinstance(info.value, ConfigError)
    (tmp_path / "bad.ini").write_text("[cpu_context]\nthread_num=two\n")
    with pytest.raises(RuntimeError, match=r"bad.ini: \[cpu_context\] thread_num must be an integer, got 'two'"):
        mslite.Model().build_from_file(path, mslite.ModelType.ONNX, mslite.Context(), config_path=str(tmp_path / "bad.ini"))
    with pytest.raises(TypeError, match="model_type must be a ModelType") as info:
        mslite.Model().build_from_file(path, 3)
    assert isinstance(info.value, ConfigTypeError)
    with pytest.raises(TypeError, match="context must be a Context, got dict"):
        mslite.Model().build_from_file(path, mslite.ModelType.ONNX, {"target": "cpu"})


def test_predict_type_errors(sample):
    model = build(sample("add"))
    x = np.ones((2, 2), np.float32)
    with pytest.raises(InputTypeError, match="outputs must be a list of Tensors"):
        model.predict([x, x], outputs=[np.empty((2, 2), np.float32)])
    with pytest.raises(RuntimeError, match="holds no data yet"):
        model.predict(model.get_inputs())


def test_update_weights_reaches_weights_that_onnx_runtime_folds(tmp_path):
    # ONNX Runtime folds Transpose(W) at build from the file's W; an updated W must not be ignored.
    from onnx import TensorProto, helper, numpy_helper

    w = np.arange(6, dtype=np.float32).reshape(2, 3)
    graph = helper.make_graph(
        [helper.make_node("Transpose", ["W"], ["WT"]), helper.make_node("MatMul", ["x", "WT"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 2])],
        [numpy_helper.from_array(w, "W")],
    )
    path = tmp_path / "folded.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    model = build(path)
    x = np.ones((1, 3), np.float32)
    assert np.array_equal(model.predict([x])[0].get_data_to_numpy(), x @ w.T)
    new = np.full((2, 3), 2.0, np.float32)
    model.update_weights({"W": new})
    assert np.array_equal(model.predict([x])[0].get_data_to_numpy(), x @ new.T)
