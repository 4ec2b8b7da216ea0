"""Tensor: a named, typed array in MindSpore Lite's shape.

Unlike MindSpore Lite, ``set_data_from_numpy`` checks the shape as well as
the dtype: an array whose shape disagrees with the tensor's fixed dimensions
is an error, not silently reinterpreted.
"""

from __future__ import annotations

import enum
import math

import numpy as np

from ._errors import InputError


class DataType(enum.Enum):
    UNKNOWN = "unknown"
    BOOL = "bool"
    INT8 = "int8"
    INT16 = "int16"
    INT32 = "int32"
    INT64 = "int64"
    UINT8 = "uint8"
    UINT16 = "uint16"
    UINT32 = "uint32"
    UINT64 = "uint64"
    FLOAT16 = "float16"
    FLOAT32 = "float32"
    FLOAT64 = "float64"
    STRING = "str"

    @classmethod
    def from_numpy(cls, dtype) -> "DataType":
        dtype = np.dtype(dtype)
        if dtype.kind in ("U", "S", "O"):
            return cls.STRING
        try:
            return cls(dtype.name)
        except ValueError:
            return cls.UNKNOWN

    def to_numpy(self) -> np.dtype:
        if self in (DataType.UNKNOWN,):
            raise InputError("tensor data type is unknown")
        return np.dtype(object if self is DataType.STRING else self.value)


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
    DEFAULT = "DEFAULT"
    NCHW = "NCHW"
    NHWC = "NHWC"
    NC = "NC"
    NCW = "NCW"
    NWC = "NWC"
    NCDHW = "NCDHW"


class Tensor:
    """A named array. ``shape`` may hold -1 for a dimension the model leaves free."""

    def __init__(self, tensor=None, shape=None, dtype=None, device=None, *, name: str = "", format: Format = Format.DEFAULT):
        if device not in (None, "cpu"):
            raise InputError(f"Tensor device must be None or 'cpu' here, got {device!r}; device memory is managed by the model's target")
        self._name = name
        self._format = format
        self._data: np.ndarray | None = None
        if isinstance(tensor, Tensor):
            self._name = name or tensor.name
            self._dtype = tensor.dtype
            self._shape = list(tensor.shape)
            self._format = tensor.format
            self._data = None if tensor._data is None else tensor._data.copy()
        elif tensor is not None:
            array = np.ascontiguousarray(tensor)
            self._dtype = DataType.from_numpy(array.dtype)
            self._shape = list(array.shape)
            self._data = array
        else:
            self._dtype = dtype if isinstance(dtype, DataType) else (DataType.FLOAT32 if dtype is None else DataType.from_numpy(dtype))
            self._shape = [int(d) for d in (shape or [])]

    # -- metadata ------------------------------------------------------------
    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str):
        self._name = str(value)

    @property
    def dtype(self) -> DataType:
        return self._dtype

    @property
    def shape(self) -> list[int]:
        return list(self._shape)

    @shape.setter
    def shape(self, value):
        value = [int(d) for d in value]
        if len(value) != len(self._shape) and self._shape:
            raise InputError(f"tensor {self._name!r}: new shape {value} has {len(value)} dimensions, expected {len(self._shape)}")
        self._shape = value
        if self._data is not None and list(self._data.shape) != value:
            self._data = None  # stale: the user is about to set data of the new shape

    @property
    def format(self) -> Format:
        return self._format

    @format.setter
    def format(self, value: Format):
        if not isinstance(value, Format):
            raise InputError(f"tensor format must be a Format (e.g. Format.NCHW), got {value!r}")
        self._format = value

    @property
    def element_num(self) -> int:
        """Number of elements; 0 while a dimension is still free (-1)."""
        if any(d < 0 for d in self._shape):
            return 0
        return math.prod(self._shape)

    @property
    def data_size(self) -> int:
        """Size of the data in bytes."""
        if self._data is not None:
            return int(self._data.nbytes)
        if self._dtype in (DataType.UNKNOWN, DataType.STRING):
            return 0
        return self.element_num * self._dtype.to_numpy().itemsize

    @property
    def device(self) -> str:
        return "cpu"

    # -- data ----------------------------------------------------------------
    def set_data_from_numpy(self, input_data: np.ndarray) -> None:
        """Copy ``input_data`` into the tensor; dtype and fixed dimensions must match."""
        if not isinstance(input_data, np.ndarray):
            raise InputError(f"tensor {self._name!r}: set_data_from_numpy takes a numpy.ndarray, got {type(input_data).__name__}")
        got = DataType.from_numpy(input_data.dtype)
        if got is not self._dtype:
            raise InputError(
                f"tensor {self._name!r}: data type {input_data.dtype} does not match the tensor's {self._dtype.value}"
            )
        check_shape(self._name, self._shape, input_data.shape)
        self._data = np.ascontiguousarray(input_data)
        self._shape = list(input_data.shape)

    def get_data_to_numpy(self) -> np.ndarray:
        """The tensor's data as a numpy array (the model's output buffer, not a copy)."""
        if self._data is None:
            raise InputError(f"tensor {self._name!r} holds no data yet: call set_data_from_numpy() or predict() first")
        return self._data

    def has_data(self) -> bool:
        return self._data is not None

    def __repr__(self) -> str:
        return (
            f"Tensor(name={self._name!r}, dtype={self._dtype.name}, shape={self._shape}, format={self._format.name}, "
            f"element_num={self.element_num}, data_size={self.data_size})"
        )


def check_shape(name: str, expected: list[int], got) -> None:
    """Raise InputError if ``got`` disagrees with ``expected`` (where -1 matches any size)."""
    got = list(got)
    if expected and len(got) != len(expected):
        raise InputError(
            f"input {name!r}: shape {got} has {len(got)} dimensions, expected {len(expected)} like {_spell(expected)}"
        )
    for axis, (want, have) in enumerate(zip(expected, got)):
        if want >= 0 and want != have:
            raise InputError(f"input {name!r}: shape {got} does not match {_spell(expected)} (dimension {axis} must be {want})")


def _spell(shape: list[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in shape) + "]"
