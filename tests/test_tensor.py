"""Tensor, TensorMeta and the enums as MindSpore Lite has them; errors that keep their builtin types across processes."""

import pickle

import numpy as np
import pytest

import orchestrator as mslite
from ranks import ConfigError, ConfigTypeError, InputError, InputTypeError, OrchestratorError
from ranks._remote_errors import pack_exception, unpack_exception


def test_enum_values_are_mindspore_lites():
    assert {m.name: m.value for m in mslite.DataType if m is not mslite.DataType.STRING} == {
        "UNKNOWN": 0, "BOOL": 30, "INT8": 32, "INT16": 33, "INT32": 34, "INT64": 35, "UINT8": 37, "UINT16": 38,
        "UINT32": 39, "UINT64": 40, "FLOAT16": 42, "FLOAT32": 43, "FLOAT64": 44, "INVALID": 2147483647,
    }
    assert len({m.value for m in mslite.DataType}) == len(mslite.DataType)  # our STRING collides with nothing
    assert {m.name: m.value for m in mslite.Format} == {
        "DEFAULT": -1, "NCHW": 0, "NHWC": 1, "NHWC4": 2, "HWKC": 3, "HWCK": 4, "KCHW": 5, "CKHW": 6, "KHWC": 7,
        "CHWK": 8, "HW": 9, "HW4": 10, "NC": 11, "NC4": 12, "NC4HW4": 13, "NCDHW": 15, "NWC": 16, "NCW": 17,
        "NDHWC": 18, "NC8HW8": 19,
    }
    assert (mslite.ModelType.MINDIR.value, mslite.ModelType.MINDIR_LITE.value, mslite.ModelType.ONNX.value) == (0, 4, 3)
    assert str(mslite.DataType.FLOAT32) == "DataType.FLOAT32" and str(mslite.Format.NCHW) == "Format.NCHW"
    assert mslite.DataType(43) is mslite.DataType.FLOAT32


@pytest.mark.parametrize("name", ["bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
                                  "float16", "float32", "float64"])
def test_numpy_mapping_round_trips(name):
    dtype = mslite.DataType.from_numpy(np.dtype(name))
    assert dtype.name == name.upper() and dtype.to_numpy() == np.dtype(name)


def test_numpy_mapping_edges():
    assert mslite.DataType.from_numpy(np.complex64) is mslite.DataType.UNKNOWN
    assert mslite.DataType.from_numpy(np.dtype("U3")) is mslite.DataType.STRING
    assert mslite.DataType.STRING.to_numpy() == np.dtype(object)
    for member in (mslite.DataType.UNKNOWN, mslite.DataType.INVALID):
        with pytest.raises(TypeError, match="has no numpy equivalent"):
            member.to_numpy()


def test_tensor_str_and_metadata():
    tensor = mslite.Tensor()
    tensor.name = "x"
    tensor.shape = [1, 3, 2, 2]
    tensor.dtype = mslite.DataType.FLOAT32
    tensor.format = mslite.Format.NCHW
    assert str(tensor) == (
        "name: x,\ndtype: DataType.FLOAT32,\nshape: [1, 3, 2, 2],\nformat: Format.NCHW,\nelement_num: 12,\n"
        "data_size: 48.\ndevice: None:-1."
    )
    assert "Tensor(name='x'" in repr(tensor)
    meta = mslite.TensorMeta("y", mslite.DataType.FLOAT32, [1, 3, 2, 2], mslite.Format.NCHW)
    assert str(meta) == "name: y,\ndtype: DataType.FLOAT32,\nshape: [1, 3, 2, 2],\nformat: Format.NCHW,\nelement_num: 12,\ndata_size: 48."
    free = mslite.TensorMeta("z", mslite.DataType.INT64, [-1, 4])
    assert (free.element_num, free.data_size, free.format) == (0, 0, mslite.Format.DEFAULT)


def test_tensor_constructor():
    x = np.arange(6, dtype=np.int32).reshape(2, 3)
    tensor = mslite.Tensor(x, shape=[2, 3], dtype=mslite.DataType.INT32)
    assert (tensor.shape, tensor.dtype, tensor.data_size) == ([2, 3], mslite.DataType.INT32, 24)
    copy = mslite.Tensor(tensor)
    assert copy.get_data_to_numpy() is not x and np.array_equal(copy.get_data_to_numpy(), x)
    empty = mslite.Tensor(shape=(1, 4), dtype=mslite.DataType.FLOAT16, name="h")
    assert (empty.shape, empty.element_num, empty.data_size, empty.has_data()) == ([1, 4], 4, 8, False)
    assert mslite.Tensor().dtype is mslite.DataType.FLOAT32


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: mslite.Tensor([1.0, 2.0]), "tensor must be a numpy.ndarray or a Tensor, got list"),
        (lambda: mslite.Tensor(shape=3), "Tensor shape must be a list or tuple of int, got int"),
        (lambda: mslite.Tensor(shape=[1, 2.0]), "Tensor shape must be a list or tuple of int, got float 2.0 at index 1"),
        (lambda: mslite.Tensor(shape=[1], dtype=np.float32), "Tensor dtype must be a DataType"),
        (lambda: mslite.Tensor(shape=[1], dtype="float32"), "Tensor dtype must be a DataType"),
        (lambda: mslite.Tensor(name=3), "Tensor name must be a str"),
        (lambda: mslite.Tensor(format="NCHW"), "Tensor format must be a Format"),
        (lambda: mslite.Tensor(np.ones((2, 3), np.float32), shape=[3, 2]), r"shape [3, 2] disagrees with the data's shape [2, 3]"),
        (lambda: mslite.Tensor(np.ones(2, np.float32), dtype=mslite.DataType.INT32), "dtype DataType.INT32 disagrees with the data's DataType.FLOAT32"),
        (lambda: mslite.Tensor(np.ones(2, np.complex64)), "numpy dtype complex64 is not supported"),
        (lambda: mslite.Tensor(device=0), "device must be a str or None"),
    ],
)
def test_tensor_constructor_type_errors(make, message):
    with pytest.raises(TypeError) as info:
        make()
    assert message in str(info.value) and isinstance(info.value, InputTypeError)


def test_tensor_setters():
    tensor = mslite.Tensor(np.arange(6, dtype=np.float32))
    tensor.shape = (2, 3)  # same element count: the data follows
    assert tensor.get_data_to_numpy().shape == (2, 3)
    tensor.shape = [4, 4]  # data of another size is dropped, to be set anew
    assert not tensor.has_data() and tensor.element_num == 16
    for attribute, value, message in [
        ("shape", "2,3", "must be a list or tuple of int, got str"),
        ("shape", [2, None], "got NoneType None at index 1"),
        ("dtype", np.float32, "tensor dtype must be a DataType"),
        ("format", 0, "tensor format must be a Format"),
        ("name", None, "tensor name must be a str"),
    ]:
        with pytest.raises(TypeError, match=message):
            setattr(tensor, attribute, value)
    tensor.dtype = mslite.DataType.INT8
    tensor.set_data_from_numpy(np.zeros(16, np.int8))
    assert tensor.get_data_to_numpy().shape == (4, 4)


def test_errors_are_the_builtins_mindspore_lite_raises():
    assert issubclass(InputError, ValueError) and issubclass(InputError, RuntimeError)
    assert issubclass(ConfigError, ValueError) and issubclass(ConfigError, RuntimeError)
    assert issubclass(InputTypeError, InputError) and issubclass(InputTypeError, TypeError)
    assert issubclass(ConfigTypeError, ConfigError) and issubclass(ConfigTypeError, TypeError)
    assert issubclass(mslite.ModelError, RuntimeError) and issubclass(mslite.ModelNotFoundError, RuntimeError)


@pytest.mark.parametrize("cls", [InputTypeError, ConfigTypeError, InputError, ConfigError, mslite.RankTableError])
def test_errors_keep_their_type_across_processes(cls):
    assert type(pickle.loads(pickle.dumps(cls("boom")))) is cls
    try:
        raise cls("boom")
    except OrchestratorError as exc:
        packed = pack_exception(exc, "rank 1 of 2")
    back = unpack_exception(pickle.loads(pickle.dumps(packed)))
    assert type(back) is cls and str(back) == "[rank 1 of 2] boom"


def test_a_scalar_stays_zero_dimensional_through_a_model(tmp_path):
    """numpy's ascontiguousarray makes a 0-d array 1-d; a scalar must stay shape [] as ONNX Runtime gives it."""
    from onnx import TensorProto, helper, save

    scalar = mslite.Tensor(np.array(3.0, np.float32))
    assert scalar.shape == [] and scalar.get_data_to_numpy().shape == () and scalar.element_num == 1
    graph = helper.make_graph([helper.make_node("ReduceSum", ["x"], ["y"], keepdims=0)], "sum",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [])])
    save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(tmp_path / "sum.onnx"))
    model = mslite.Model()
    model.build_from_file(str(tmp_path / "sum.onnx"), mslite.ModelType.ONNX, mslite.Context())
    out = model.predict([mslite.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3))])[0]
    assert model.get_outputs()[0].shape == out.shape == [] and out.get_data_to_numpy().shape == ()
    assert out.get_data_to_numpy() == 15.0


def test_data_dropped_by_a_new_shape_or_dtype_is_said_so():
    tensor = mslite.Tensor(np.arange(6, dtype=np.float32).reshape(2, 3), name="x")
    tensor.shape = [3, 2]  # the same count: reshaped, kept
    assert tensor.get_data_to_numpy().shape == (3, 2)
    tensor.dtype = mslite.DataType.INT32
    with pytest.raises(InputError, match=r"tensor 'x' holds no data: its dtype was set to INT32 \(from FLOAT32\), "
                                         r"which dropped the data it held; call set_data_from_numpy\(\)"):
        tensor.get_data_to_numpy()
    tensor.set_data_from_numpy(np.zeros((3, 2), np.int32))
    tensor.shape = [4, 4]
    with pytest.raises(InputError, match=r"its shape was set to \[4, 4\] \(from \[3, 2\]; resize\(\) sets it too\)"):
        tensor.get_data_to_numpy()
    with pytest.raises(InputError, match="holds no data yet: call set_data_from_numpy"):
        mslite.Tensor(shape=[2], name="y").get_data_to_numpy()
