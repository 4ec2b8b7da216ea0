"""Tensor, TensorMeta, DataType and Format, as MindSpore Lite's Python API has them.

The enums carry MindSpore Lite's integer values (``DataType.FLOAT32.value``
is 43, as in MindSpore's C++ ``TypeId``); the mapping onto numpy and ONNX
Runtime types is in ``DataType.from_numpy``/``to_numpy`` and
``data_type_from_ort``, never in the values.

``set_data_from_numpy`` checks what MindSpore Lite checks (the dtype and the
amount of data), so a flat array read with ``np.fromfile`` fills a
``[1, 3, 224, 224]`` input as it does there:

* a tensor whose shape is fully known takes an array of its dtype with the
  same number of elements, reshaped to the tensor's shape, when the array is
  of another rank (a flat buffer) or differs only where sizes are 1; an array
  of the same rank with other sizes ([1, 3, 224, 224] for [1, 224, 224, 3])
  is refused: reshaping it would silently scramble a layout;
* a tensor with free (-1) dimensions takes an array of the same rank whose
  fixed dimensions match, and takes the array's shape;
* anything else is an error that names both the array and the tensor.

Errors are what MindSpore Lite raises: ``InputTypeError`` (a ``TypeError``)
for an argument of the wrong type, ``InputError`` (a ``RuntimeError`` and a
``ValueError``) for data of the wrong dtype or size.
"""

from __future__ import annotations

import enum
import math

import numpy as np

from ._errors import InputError, InputTypeError


class DataType(enum.Enum):
    """MindSpore Lite's data types, with its values (MindSpore's C++ ``TypeId``)."""

    UNKNOWN = 0
    BOOL = 30
    INT8 = 32
    INT16 = 33
    INT32 = 34
    INT64 = 35
    UINT8 = 37
    UINT16 = 38
    UINT32 = 39
    UINT64 = 40
    FLOAT16 = 42
    FLOAT32 = 43
    FLOAT64 = 44
    INVALID = 2147483647
    # Our addition, for ONNX string tensors (MindSpore Lite's Python API has no string type):
    # the value of MindSpore Lite's C++ DataType::kObjectTypeString, which no member above uses.
    STRING = 12

    @classmethod
    def from_numpy(cls, dtype) -> "DataType":
        """The DataType of a numpy dtype; ``UNKNOWN`` when there is none (complex, datetime, ...)."""
        found = _FROM_DTYPE.get(dtype)  # the hot path: an array's own dtype object
        if found is not None:
            return found
        dtype = np.dtype(dtype)
        if dtype.kind in ("U", "S", "O"):
            return cls.STRING
        return _FROM_NUMPY.get(dtype.name, cls.UNKNOWN)

    def to_numpy(self) -> np.dtype:
        """The numpy dtype of this DataType (``object`` for STRING); InputTypeError for UNKNOWN and INVALID."""
        dtype = _TO_DTYPE.get(self)
        if dtype is None:
            raise InputTypeError(f"{self} has no numpy equivalent")
        return dtype


_TO_NUMPY = {
    DataType.BOOL: "bool", DataType.INT8: "int8", DataType.INT16: "int16", DataType.INT32: "int32",
    DataType.INT64: "int64", DataType.UINT8: "uint8", DataType.UINT16: "uint16", DataType.UINT32: "uint32",
    DataType.UINT64: "uint64", DataType.FLOAT16: "float16", DataType.FLOAT32: "float32", DataType.FLOAT64: "float64",
    DataType.STRING: "object",
}
_FROM_NUMPY = {name: member for member, name in _TO_NUMPY.items() if member is not DataType.STRING}
# The same as dtype objects, so the per-call conversions are one dict lookup (no dtype parsing or naming).
_TO_DTYPE = {member: np.dtype(name) for member, name in _TO_NUMPY.items()}
_FROM_DTYPE = {np.dtype(name): member for name, member in _FROM_NUMPY.items()}

# ONNX Runtime's type strings ("tensor(float)") -> DataType.
_ORT_TYPES = {
    "tensor(bool)": DataType.BOOL, "tensor(int8)": DataType.INT8, "tensor(int16)": DataType.INT16,
    "tensor(int32)": DataType.INT32, "tensor(int64)": DataType.INT64, "tensor(uint8)": DataType.UINT8,
    "tensor(uint16)": DataType.UINT16, "tensor(uint32)": DataType.UINT32, "tensor(uint64)": DataType.UINT64,
    "tensor(float16)": DataType.FLOAT16, "tensor(float)": DataType.FLOAT32, "tensor(double)": DataType.FLOAT64,
    "tensor(string)": DataType.STRING,
}


def data_type_from_ort(type_string: str) -> DataType:
    return _ORT_TYPES.get(type_string, DataType.UNKNOWN)


class Format(enum.Enum):
    """MindSpore Lite's tensor formats, with its values."""

    DEFAULT = -1
    NCHW = 0
    NHWC = 1
    NHWC4 = 2
    HWKC = 3
    HWCK = 4
    KCHW = 5
    CKHW = 6
    KHWC = 7
    CHWK = 8
    HW = 9
    HW4 = 10
    NC = 11
    NC4 = 12
    NC4HW4 = 13
    NCDHW = 15
    NWC = 16
    NCW = 17
    NDHWC = 18
    NC8HW8 = 19


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def check_shape_argument(where: str, shape) -> list[int]:
    """``shape`` as a list of ints (-1 for a free dimension); InputTypeError for a non-list or non-int element."""
    if not isinstance(shape, (list, tuple)):
        raise InputTypeError(f"{where} must be a list or tuple of int, got {type(shape).__name__} {shape!r}")
    for index, dim in enumerate(shape):
        if not _is_int(dim):
            raise InputTypeError(f"{where} must be a list or tuple of int, got {type(dim).__name__} {dim!r} at index {index}")
    shape = [int(d) for d in shape]
    if any(d < -1 for d in shape):
        raise InputError(f"{where}: dimensions must be >= 0, or -1 for a free dimension; got {shape}")
    return shape


def _element_count(shape: list[int]) -> int:
    """Number of elements; 0 while a dimension is still free (-1)."""
    if any(d < 0 for d in shape):
        return 0
    return math.prod(shape)


def _nbytes(dtype: DataType, count: int) -> int:
    if dtype in (DataType.UNKNOWN, DataType.INVALID, DataType.STRING):
        return 0
    return count * dtype.to_numpy().itemsize


class TensorMeta:
    """What a model says about one of its outputs (``Model.get_outputs()``): no data, only the description."""

    def __init__(self, name: str, dtype: DataType, shape, format: "Format" = None):
        self._name = name
        self._dtype = dtype
        self._shape = [int(d) for d in shape]
        self._format = Format.DEFAULT if format is None else format

    name = property(lambda self: self._name)
    dtype = property(lambda self: self._dtype)
    format = property(lambda self: self._format)

    @property
    def shape(self) -> list[int]:
        """The shape, -1 for a dimension known only after predict."""
        return list(self._shape)

    @property
    def element_num(self) -> int:
        return _element_count(self._shape)

    @property
    def data_size(self) -> int:
        """Size of the data in bytes; 0 while a dimension is free."""
        return _nbytes(self._dtype, self.element_num)

    def __str__(self) -> str:
        return (
            f"name: {self.name},\ndtype: {self.dtype},\nshape: {self.shape},\nformat: {self.format},\n"
            f"element_num: {self.element_num},\ndata_size: {self.data_size}."
        )

    def __repr__(self) -> str:
        return f"TensorMeta(name={self._name!r}, dtype={self._dtype.name}, shape={self._shape}, format={self._format.name})"


class Tensor:
    """A named array. ``shape`` may hold -1 for a dimension the model leaves free.

    ``Tensor(tensor=None, shape=None, dtype=None, device=None)`` as in MindSpore
    Lite: from a numpy array or another Tensor (``shape`` and ``dtype``, when
    given, must agree with it), or empty with ``shape`` and ``dtype``
    (FLOAT32 by default). ``name`` and ``format`` are our keyword additions.

    Raises:
        InputTypeError: an argument of the wrong type, or ``shape``/``dtype`` that
            disagree with ``tensor``.
    """

    def __init__(self, tensor=None, shape=None, dtype=None, device=None, *, name: str = "", format: Format = Format.DEFAULT):
        if device is not None and not isinstance(device, str):
            raise InputTypeError(f"Tensor device must be a str or None, got {type(device).__name__}")
        if device not in (None, "cpu"):
            raise InputError(f"Tensor device must be None or 'cpu' here, got {device!r}; device memory is managed by the model's target")
        if not isinstance(name, str):
            raise InputTypeError(f"Tensor name must be a str, got {type(name).__name__}")
        if not isinstance(format, Format):
            raise InputTypeError(f"Tensor format must be a Format (e.g. Format.NCHW), got {format!r}")
        if dtype is not None and not isinstance(dtype, DataType):
            raise InputTypeError(f"Tensor dtype must be a DataType (e.g. DataType.FLOAT32), got {dtype!r}")
        if shape is not None:
            shape = check_shape_argument("Tensor shape", shape)
        self._name = name
        self._format = format
        self._data: np.ndarray | None = None
        self._dropped = ""  # why the data went, when a new shape or dtype dropped it (said when it is asked for)
        if isinstance(tensor, Tensor):
            self._name = name or tensor.name
            self._dtype = tensor.dtype
            self._shape = list(tensor.shape)
            self._format = tensor.format if format is Format.DEFAULT else format
            self._data = None if tensor._data is None else tensor._data.copy()
        elif isinstance(tensor, np.ndarray):
            array = np.asarray(tensor, order="C")
            self._dtype = DataType.from_numpy(array.dtype)
            if self._dtype is DataType.UNKNOWN:
                raise InputTypeError(f"Tensor: numpy dtype {array.dtype} is not supported; use one of {sorted(_FROM_NUMPY)}")
            self._shape = list(array.shape)
            self._data = array
        elif tensor is not None:
            raise InputTypeError(f"Tensor: tensor must be a numpy.ndarray or a Tensor, got {type(tensor).__name__}")
        else:
            self._dtype = DataType.FLOAT32 if dtype is None else dtype
            self._shape = shape or []
        if tensor is not None:
            if shape is not None and shape != self._shape:
                raise InputTypeError(f"Tensor: shape {shape} disagrees with the data's shape {self._shape}")
            if dtype is not None and dtype is not self._dtype:
                raise InputTypeError(f"Tensor: dtype {dtype} disagrees with the data's {self._dtype}")

    # -- metadata ------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str):
        if not isinstance(value, str):
            raise InputTypeError(f"tensor name must be a str, got {type(value).__name__}")
        self._name = value

    @property
    def dtype(self) -> DataType:
        return self._dtype

    @dtype.setter
    def dtype(self, value: DataType):
        if not isinstance(value, DataType):
            raise InputTypeError(f"tensor dtype must be a DataType (e.g. DataType.FLOAT32), got {value!r}")
        if value is not self._dtype and self._data is not None:
            self._data = None  # stale: the user is about to set data of the new type
            self._dropped = f"its dtype was set to {value.name} (from {self._dtype.name})"
        self._dtype = value

    @property
    def shape(self) -> list[int]:
        return list(self._shape)

    @shape.setter
    def shape(self, value):
        value = check_shape_argument(f"tensor {self._name!r}: shape", value)
        if self._data is not None and list(self._data.shape) != value:
            if _element_count(value) == self._data.size and all(d >= 0 for d in value):
                self._data = self._data.reshape(value)
            else:
                self._data = None  # stale: the user is about to set data of the new shape
                self._dropped = f"its shape was set to {value} (from {self._shape}; resize() sets it too)"
        self._shape = value

    @property
    def format(self) -> Format:
        return self._format

    @format.setter
    def format(self, value: Format):
        if not isinstance(value, Format):
            raise InputTypeError(f"tensor format must be a Format (e.g. Format.NCHW), got {value!r}")
        self._format = value

    @property
    def element_num(self) -> int:
        """Number of elements; 0 while a dimension is still free (-1)."""
        return _element_count(self._shape)

    @property
    def data_size(self) -> int:
        """Size of the data in bytes."""
        if self._data is not None:
            return int(self._data.nbytes)
        return _nbytes(self._dtype, self.element_num)

    @property
    def device(self) -> str:
        return "cpu"

    # -- data ----------------------------------------------------------------
    def set_data_from_numpy(self, input_data: np.ndarray) -> None:
        """Copy ``input_data`` into the tensor (see the module docstring for which arrays fit).

        Raises:
            InputTypeError: not a numpy array, or a dtype MindSpore Lite has no type for.
            InputError: the dtype differs from the tensor's, or the amount of data does not fit its shape.
        """
        if not isinstance(input_data, np.ndarray):
            raise InputTypeError(f"tensor {self._name!r}: set_data_from_numpy takes a numpy.ndarray, got {type(input_data).__name__}")
        got = DataType.from_numpy(input_data.dtype)
        if got is DataType.UNKNOWN:
            raise InputTypeError(
                f"tensor {self._name!r}: numpy dtype {input_data.dtype} is not supported; use one of {sorted(_FROM_NUMPY)}"
            )
        if got is not self._dtype:
            raise InputError(
                f"tensor {self._name!r}: data type {input_data.dtype} does not match the tensor's {_numpy_name(self._dtype)} "
                f"(array: {describe_array(input_data)}; tensor: {_describe(self._dtype, self._shape)})"
            )
        array = fit_shape(f"tensor {self._name!r}", self._shape, input_data, "the tensor")
        self._data = np.asarray(array, order="C")
        self._dropped = ""
        self._shape = list(array.shape)

    def get_data_to_numpy(self) -> np.ndarray:
        """The tensor's data as a numpy array (the model's output buffer, not a copy)."""
        if self._data is None:
            if getattr(self, "_dropped", ""):
                raise InputError(f"tensor {self._name!r} holds no data: {self._dropped}, which dropped the data it "
                                 f"held; call set_data_from_numpy() with data of the new shape and type")
            raise InputError(f"tensor {self._name!r} holds no data yet: call set_data_from_numpy() or predict() first")
        return self._data

    def has_data(self) -> bool:
        return self._data is not None

    def __str__(self) -> str:
        # MindSpore Lite prints the device as "type:id"; a host tensor's is "None:-1".
        return (
            f"name: {self._name},\ndtype: {self._dtype},\nshape: {self.shape},\nformat: {self._format},\n"
            f"element_num: {self.element_num},\ndata_size: {self.data_size}.\ndevice: None:-1."
        )

    def __repr__(self) -> str:
        return (
            f"Tensor(name={self._name!r}, dtype={self._dtype.name}, shape={self._shape}, format={self._format.name}, "
            f"element_num={self.element_num}, data_size={self.data_size})"
        )


def _numpy_name(dtype: DataType) -> str:
    name = _TO_NUMPY.get(dtype)
    return "str" if dtype is DataType.STRING else (name or dtype.name.lower())


def _describe(dtype: DataType, shape: list[int]) -> str:
    free = any(d < 0 for d in shape)
    return f"{_numpy_name(dtype)} {_spell(shape)}, " + ("free dimensions" if free else f"{_element_count(shape)} elements")


def describe_array(array: np.ndarray) -> str:
    return f"{array.dtype} {list(array.shape)}, {array.size} elements"


def fit_shape(what: str, expected: list[int], array: np.ndarray, owner: str = "the input") -> np.ndarray:
    """``array`` fitted to ``expected`` by the Tensor rule (see the module docstring), or InputError naming both.

    ``what`` starts the message ("input 'x'", "tensor 'x'"); ``owner`` names the other side in it.
    An empty ``expected`` (no shape known yet) takes any array as it is.
    """
    if not expected:
        return array
    if all(d >= 0 for d in expected):
        wanted = math.prod(expected)
        if array.size == wanted:
            if list(array.shape) == expected:
                return array
            if array.ndim == len(expected) and _without_ones(array.shape) != _without_ones(expected):
                # Same rank, other sizes: a layout mistake (NCHW for NHWC), which a reshape would turn into wrong
                # numbers without a word. Only a flat buffer or an array of another rank is taken as raw data.
                raise InputError(
                    f"{what}: shape {list(array.shape)} does not match {_spell(expected)}: the same {wanted} elements "
                    f"in another arrangement (a layout such as NCHW given for NHWC?). An array of {owner}'s rank must "
                    f"have its shape: transpose it, or reshape it yourself if its memory order is already right"
                )
            return array.reshape(expected)
        raise InputError(
            f"{what}: shape {list(array.shape)} does not match {_spell(expected)}: the array holds {array.size} "
            f"{array.dtype} elements, {owner} takes {wanted} (an array of any shape with {wanted} elements is reshaped)"
        )
    try:
        check_shape("", expected, array.shape, what=what)
    except InputError as exc:
        hint = "" if array.ndim == len(expected) else (
            "; with free dimensions the array must have the same rank: reshape it, or resize the model to a fixed shape"
        )
        raise InputError(f"{exc} (array: {describe_array(array)}){hint}") from None
    return array


def _without_ones(shape) -> list[int]:
    """The sizes other than 1, in order: two shapes that agree on these hold their elements in the same order."""
    return [int(d) for d in shape if d != 1]


def check_shape(name: str, expected: list[int], got, *, what: str | None = None) -> None:
    """Raise InputError if ``got`` disagrees with ``expected`` (where -1 matches any size)."""
    what = what or f"input {name!r}"
    got = list(got)
    if expected and len(got) != len(expected):
        raise InputError(
            f"{what}: shape {got} has {len(got)} dimensions, expected {len(expected)} like {_spell(expected)}"
        )
    for axis, (want, have) in enumerate(zip(expected, got)):
        if want >= 0 and want != have:
            raise InputError(f"{what}: shape {got} does not match {_spell(expected)} (dimension {axis} must be {want})")


def _spell(shape: list[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"


def output_tensors(names, arrays, outputs=None) -> list:
    """The Tensors ``predict`` returns: new ones named ``names``, or the caller's ``outputs`` filled in place."""
    if outputs is None:
        return [Tensor(array, name=name) for name, array in zip(names, arrays)]
    if len(outputs) != len(arrays):
        raise InputError(f"predict: got {len(outputs)} output tensors, the model has {len(arrays)} outputs")
    for tensor, name, array in zip(outputs, names, arrays):
        tensor._name = tensor._name or name  # an unnamed Tensor() takes the output's name, as a returned one has
        tensor._dtype = DataType.from_numpy(array.dtype)
        tensor._shape = list(array.shape)
        tensor._data = array
        tensor._dropped = ""
    return outputs
