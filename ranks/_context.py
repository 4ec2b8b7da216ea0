"""Context: which device runs a model and how, in MindSpore Lite's shape.

Every setter validates its value where it is set, so a typo fails on the
line that made it, with the valid choices in the message. The mapping onto
ONNX Runtime (execution providers, session options) is in ``_session.py``.
"""

from __future__ import annotations

from ._errors import ConfigError

TARGETS = ("cpu", "gpu", "ascend")
CPU_PRECISION_MODES = ("enforce_fp32", "preferred_fp32", "preferred_fp16")
GPU_PRECISION_MODES = ("enforce_fp32", "preferred_fp32", "preferred_fp16")
ASCEND_PRECISION_MODES = ("enforce_fp32", "preferred_fp32", "enforce_fp16", "enforce_origin", "preferred_optimal")
GPU_PROVIDERS = ("", "tensorrt")
ASCEND_PROVIDERS = ("", "ge")
AFFINITY_MODES = {0: "no binding", 1: "big cores first", 2: "middle cores first"}


def _non_negative_int(owner: str, field: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{owner}.{field} must be an int >= 0, got {value!r} ({type(value).__name__})")
    if value < 0:
        raise ConfigError(f"{owner}.{field} must be an int >= 0, got {value}")
    return value


def _choice(owner: str, field: str, value, choices) -> str:
    if not isinstance(value, str) or value.lower() not in choices:
        raise ConfigError(f"{owner}.{field} must be one of {list(choices)}, got {value!r}")
    return value.lower()


class _Fields:
    """Attribute access only to declared fields, so a misspelt field is an error, not a silent no-op."""

    _owner = ""
    _fields: tuple[str, ...] = ()

    def __setattr__(self, name, value):
        if name.startswith("_") or name in self._fields or isinstance(getattr(type(self), name, None), property):
            object.__setattr__(self, name, value)
        else:
            raise ConfigError(f"{self._owner} has no setting {name!r}; its settings are {list(self._fields)}")

    def __repr__(self) -> str:
        body = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields)
        return f"{self._owner}({body})"


class CPUDeviceInfo(_Fields):
    _owner = "cpu"
    _fields = ("thread_num", "inter_op_parallel_num", "thread_affinity_mode", "thread_affinity_core_list", "precision_mode")

    def __init__(self):
        self._thread_num = 0
        self._inter_op_parallel_num = 0
        self._thread_affinity_mode = 0
        self._thread_affinity_core_list: list[int] = []
        self._precision_mode = "enforce_fp32"

    @property
    def thread_num(self) -> int:
        """Intra-op threads; 0 lets ONNX Runtime choose (one per core)."""
        return self._thread_num

    @thread_num.setter
    def thread_num(self, value):
        self._thread_num = _non_negative_int("cpu", "thread_num", value)

    @property
    def inter_op_parallel_num(self) -> int:
        """Operators run in parallel; 0 or 1 runs them in sequence."""
        return self._inter_op_parallel_num

    @inter_op_parallel_num.setter
    def inter_op_parallel_num(self, value):
        self._inter_op_parallel_num = _non_negative_int("cpu", "inter_op_parallel_num", value)

    @property
    def thread_affinity_mode(self) -> int:
        """0: no binding, 1: bind to the big (fastest) cores, 2: bind to the middle cores."""
        return self._thread_affinity_mode

    @thread_affinity_mode.setter
    def thread_affinity_mode(self, value):
        if isinstance(value, bool) or value not in AFFINITY_MODES:
            raise ConfigError(f"cpu.thread_affinity_mode must be one of {AFFINITY_MODES}, got {value!r}")
        self._thread_affinity_mode = value

    @property
    def thread_affinity_core_list(self) -> list[int]:
        """Cores to bind the threads to, in thread order; wins over thread_affinity_mode."""
        return list(self._thread_affinity_core_list)

    @thread_affinity_core_list.setter
    def thread_affinity_core_list(self, value):
        if value is None:
            value = []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"cpu.thread_affinity_core_list must be a list of core numbers, got {value!r}")
        cores = [_non_negative_int("cpu", "thread_affinity_core_list[]", core) for core in value]
        if len(set(cores)) != len(cores):
            raise ConfigError(f"cpu.thread_affinity_core_list has repeated cores: {cores}")
        self._thread_affinity_core_list = cores

    @property
    def precision_mode(self) -> str:
        return self._precision_mode

    @precision_mode.setter
    def precision_mode(self, value):
        self._precision_mode = _choice("cpu", "precision_mode", value, CPU_PRECISION_MODES)


class GPUDeviceInfo(_Fields):
    _owner = "gpu"
    _fields = ("device_id", "rank_id", "group_size", "provider", "precision_mode")

    def __init__(self):
        self._device_id = 0
        self._rank_id = 0
        self._group_size = 1
        self._provider = ""
        self._precision_mode = "enforce_fp32"

    @property
    def device_id(self) -> int:
        return self._device_id

    @device_id.setter
    def device_id(self, value):
        self._device_id = _non_negative_int("gpu", "device_id", value)

    @property
    def rank_id(self) -> int:
        return self._rank_id

    @rank_id.setter
    def rank_id(self, value):
        self._rank_id = _non_negative_int("gpu", "rank_id", value)

    @property
    def group_size(self) -> int:
        return self._group_size

    @group_size.setter
    def group_size(self, value):
        value = _non_negative_int("gpu", "group_size", value)
        if value == 0:
            raise ConfigError("gpu.group_size must be at least 1, got 0")
        self._group_size = value

    @property
    def provider(self) -> str:
        """"" for the CUDA execution provider, "tensorrt" for TensorRT."""
        return self._provider

    @provider.setter
    def provider(self, value):
        self._provider = _choice("gpu", "provider", value, GPU_PROVIDERS)

    @property
    def precision_mode(self) -> str:
        return self._precision_mode

    @precision_mode.setter
    def precision_mode(self, value):
        self._precision_mode = _choice("gpu", "precision_mode", value, GPU_PRECISION_MODES)


class AscendDeviceInfo(_Fields):
    _owner = "ascend"
    _fields = ("device_id", "rank_id", "provider", "precision_mode")

    def __init__(self):
        self._device_id = 0
        self._rank_id = 0
        self._provider = ""
        self._precision_mode = "enforce_fp32"

    @property
    def device_id(self) -> int:
        return self._device_id

    @device_id.setter
    def device_id(self, value):
        self._device_id = _non_negative_int("ascend", "device_id", value)

    @property
    def rank_id(self) -> int:
        return self._rank_id

    @rank_id.setter
    def rank_id(self, value):
        self._rank_id = _non_negative_int("ascend", "rank_id", value)

    @property
    def provider(self) -> str:
        return self._provider

    @provider.setter
    def provider(self, value):
        self._provider = _choice("ascend", "provider", value, ASCEND_PROVIDERS)

    @property
    def precision_mode(self) -> str:
        return self._precision_mode

    @precision_mode.setter
    def precision_mode(self, value):
        self._precision_mode = _choice("ascend", "precision_mode", value, ASCEND_PRECISION_MODES)


class ParallelConfig(_Fields):
    _owner = "parallel"
    _fields = ("workers_num", "config_info", "config_path")

    def __init__(self):
        self._workers_num = 0
        self._config_info: dict[str, dict[str, str]] = {}
        self._config_path = ""

    @property
    def workers_num(self) -> int:
        """Workers of a ModelParallelRunner; 0 picks cores // cpu.thread_num."""
        return self._workers_num

    @workers_num.setter
    def workers_num(self, value):
        self._workers_num = _non_negative_int("parallel", "workers_num", value)

    @property
    def config_info(self) -> dict[str, dict[str, str]]:
        return {section: dict(values) for section, values in self._config_info.items()}

    @config_info.setter
    def config_info(self, value):
        if not isinstance(value, dict) or not all(
            isinstance(s, str) and isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
            for s, v in value.items()
        ):
            raise ConfigError(f"parallel.config_info must be a dict of dicts of str, like {{'section': {{'key': 'value'}}}}, got {value!r}")
        self._config_info = {s: dict(v) for s, v in value.items()}

    @property
    def config_path(self) -> str:
        return self._config_path

    @config_path.setter
    def config_path(self, value):
        if not isinstance(value, str):
            raise ConfigError(f"parallel.config_path must be a str, got {value!r}")
        self._config_path = value


class Context(_Fields):
    """Where and how a model runs. ``Context()`` targets the CPU with default threads."""

    _owner = "Context"
    _fields = ("target", "cpu", "gpu", "ascend", "parallel")

    def __init__(self):
        self._target = ["cpu"]
        self._cpu = CPUDeviceInfo()
        self._gpu = GPUDeviceInfo()
        self._ascend = AscendDeviceInfo()
        self._parallel = ParallelConfig()

    @property
    def target(self) -> list[str]:
        """Devices in order of preference, from "cpu", "gpu", "ascend"; the CPU is always the last fallback."""
        return list(self._target)

    @target.setter
    def target(self, value):
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, (list, tuple)) or not value:
            raise ConfigError(f"Context.target must be a non-empty list of {list(TARGETS)}, got {value!r}")
        targets = []
        for item in value:
            name = _choice("Context", "target", item, TARGETS)
            if name not in targets:
                targets.append(name)
        self._target = targets

    @property
    def cpu(self) -> CPUDeviceInfo:
        return self._cpu

    @property
    def gpu(self) -> GPUDeviceInfo:
        return self._gpu

    @property
    def ascend(self) -> AscendDeviceInfo:
        return self._ascend

    @property
    def parallel(self) -> ParallelConfig:
        return self._parallel

    def __repr__(self) -> str:
        return f"Context(target={self._target!r}, {self._cpu!r}, {self._gpu!r}, {self._ascend!r}, {self._parallel!r})"
