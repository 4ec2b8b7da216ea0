"""Context: which device runs a model and how, in MindSpore Lite's shape.

Every setting validates its value where it is set, so a typo fails on the
line that made it, with the valid choices in the message: a value of the
wrong type is a ``ConfigTypeError`` (a ``TypeError``), a bad value of the
right type a ``ConfigError`` (a ``ValueError``), as MindSpore Lite raises.
``str()`` of each part prints what MindSpore Lite prints. The mapping onto
ONNX Runtime (execution providers, session options) is in ``_session.py``.

``gpu.rank_id`` and ``gpu.group_size`` are read-only, as in MindSpore Lite,
where they come from MPI: here from the launcher (mpirun, or torchrun-style
``RANK``/``WORLD_SIZE``) through ``resolve_identity``; 0 and 1 alone.
"""

from __future__ import annotations

from ._errors import ConfigError, ConfigTypeError

TARGETS = ("cpu", "gpu", "ascend")
CPU_PRECISION_MODES = ("enforce_fp32", "preferred_fp32", "preferred_fp16")
GPU_PRECISION_MODES = ("enforce_fp32", "preferred_fp32", "preferred_fp16")
ASCEND_PRECISION_MODES = ("enforce_fp32", "preferred_fp32", "enforce_fp16", "enforce_origin", "preferred_optimal")
GPU_PROVIDERS = ("", "tensorrt")
ASCEND_PROVIDERS = ("", "ge")
AFFINITY_MODES = {0: "no binding", 1: "big cores first", 2: "middle cores first"}


def _non_negative_int(where: str, value, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{where} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise ConfigError(f"{where} must be an int >= {minimum}, got {value}")
    return value


def _choice(where: str, value, choices) -> str:
    if not isinstance(value, str):
        raise ConfigTypeError(f"{where} must be one of {list(choices)}, got {value!r} ({type(value).__name__})")
    if value.lower() not in choices:
        raise ConfigError(f"{where} must be one of {list(choices)}, got {value!r}")
    return value.lower()


def _core_list(where: str, value) -> list[int]:
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise ConfigTypeError(f"{where} must be a list of core numbers, got {value!r}")
    cores = [_non_negative_int(f"{where}[]", core) for core in value]
    if len(set(cores)) != len(cores):
        raise ConfigError(f"{where} has repeated cores: {cores}")
    return cores


def _affinity_mode(where: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigTypeError(f"{where} must be one of {AFFINITY_MODES}, got {value!r} ({type(value).__name__})")
    if value not in AFFINITY_MODES:
        raise ConfigError(f"{where} must be one of {AFFINITY_MODES}, got {value!r}")
    return value


def _config_info(where: str, value) -> dict[str, dict[str, str]]:
    if not isinstance(value, dict) or not all(
        isinstance(s, str) and isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())
        for s, v in value.items()
    ):
        raise ConfigTypeError(f"{where} must be a dict of dicts of str, like {{'section': {{'key': 'value'}}}}, got {value!r}")
    return {s: dict(v) for s, v in value.items()}


def _string(where: str, value) -> str:
    if not isinstance(value, str):
        raise ConfigTypeError(f"{where} must be a str, got {value!r}")
    return value


class Setting:
    """A validated field: ``Setting(default, check)`` where ``check(where, value)`` returns the value to keep."""

    def __init__(self, default, check, doc: str = ""):
        self.default, self.check, self.__doc__ = default, check, doc

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, owner=None):
        if obj is None:
            return self
        value = obj.__dict__.get(self.name, self.default)
        return value.copy() if isinstance(value, (list, dict)) else value

    def __set__(self, obj, value):
        obj.__dict__[self.name] = self.check(f"{obj._owner}.{self.name}", value)


def _int(minimum: int = 0):
    return lambda where, value: _non_negative_int(where, value, minimum)


def _one_of(choices):
    return lambda where, value: _choice(where, value, choices)


class _Settings:
    """Only declared settings may be set, so a misspelt one is an error, not a silent no-op."""

    _owner = ""

    @classmethod
    def _fields(cls) -> list[str]:
        return [name for name in dir(cls) if isinstance(getattr(cls, name, None), Setting)]

    def __setattr__(self, name, value):
        if not isinstance(getattr(type(self), name, None), (Setting, property)):
            raise ConfigError(f"{self._owner} has no setting {name!r}; its settings are {self._fields()}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        body = ", ".join(f"{f}={getattr(self, f)!r}" for f in self._fields())
        return f"{self._owner}({body})"


class CPUDeviceInfo(_Settings):
    _owner = "cpu"
    thread_num = Setting(0, _int(), "Intra-op threads; 0 lets ONNX Runtime choose (one per core).")
    inter_op_parallel_num = Setting(0, _int(), "Operators run in parallel; 0 or 1 runs them in sequence.")
    thread_affinity_mode = Setting(0, _affinity_mode, "0: no binding, 1: the big (fastest) cores, 2: the middle cores.")
    thread_affinity_core_list = Setting([], _core_list, "Cores for the threads, in thread order; wins over the mode.")
    precision_mode = Setting("enforce_fp32", _one_of(CPU_PRECISION_MODES))

    def __str__(self) -> str:
        return (
            f"device_type: DeviceType.kCPU,\nprecision_mode: {self.precision_mode},\nthread_num: {self.thread_num},\n"
            f"inter_op_parallel_num: {self.inter_op_parallel_num},\nthread_affinity_mode: {self.thread_affinity_mode},\n"
            f"thread_affinity_core_list: {self.thread_affinity_core_list}."
        )


def _read_only(name: str, what: str):
    def get(self) -> int:
        from ._world import resolve_identity

        identity = resolve_identity()
        return identity.rank if name == "rank_id" else identity.size

    def refuse(self, value):
        raise AttributeError(
            f"gpu.{name} is read-only: it is {what}, which comes from the launcher (mpirun, or RANK/WORLD_SIZE "
            f"as torchrun sets them), as in MindSpore Lite where it comes from MPI; start the process with "
            f"mpirun -n N instead of setting it"
        )

    return property(get, refuse, doc=f"Read-only: {what}, from the launcher (0 and 1 alone).")


class GPUDeviceInfo(_Settings):
    _owner = "gpu"
    device_id = Setting(0, _int())
    rank_id = _read_only("rank_id", "this process's rank")
    group_size = _read_only("group_size", "the number of ranks")
    provider = Setting("", _one_of(GPU_PROVIDERS), '"" for the CUDA execution provider, "tensorrt" for TensorRT.')
    precision_mode = Setting("enforce_fp32", _one_of(GPU_PRECISION_MODES))

    def __str__(self) -> str:
        return (
            f"device_type: DeviceType.kGPU,\nprecision_mode: {self.precision_mode},\ndevice_id: {self.device_id},\n"
            f"rank_id: {self.rank_id},\ngroup_size: {self.group_size}."
        )

    def __repr__(self) -> str:
        return super().__repr__()[:-1] + f", rank_id={self.rank_id}, group_size={self.group_size})"


class AscendDeviceInfo(_Settings):
    _owner = "ascend"
    device_id = Setting(0, _int())
    rank_id = Setting(0, _int())
    provider = Setting("", _one_of(ASCEND_PROVIDERS), '"" or "ge" (the graph engine, for distributed inference).')
    precision_mode = Setting("enforce_fp32", _one_of(ASCEND_PRECISION_MODES))

    def __str__(self) -> str:
        # MindSpore Lite's own format, odd separators included.
        return (
            f"device_type: DeviceType.kAscend,\nprecision_mode: {self.precision_mode},\ndevice_id: {self.device_id}."
            f"provider: {self.provider}.rank_id: {self.rank_id}."
        )


class ParallelConfig(_Settings):
    _owner = "parallel"
    workers_num = Setting(0, _int(), "Workers of a ModelParallelRunner; 0 picks a count from the usable cores (CPU affinity and cgroup quota).")
    config_info = Setting({}, _config_info, "{section: {key: value}} handed to every worker's model.")
    config_path = Setting("", _string, "A config_file.ini for every worker's model.")

    def __str__(self) -> str:
        # As MindSpore Lite prints config_info: "section: key value" per key.
        info = "".join(f"{section}: " + "".join(f"{k} {v}\n" for k, v in keys.items())
                       for section, keys in self.config_info.items()).rstrip("\n")
        return f"workers num: {self.workers_num},\nconfig info: {info},\nconfig path: {self.config_path}."


def _targets(where: str, value) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise ConfigTypeError(f"{where} must be a non-empty list of {list(TARGETS)}, got {value!r}")
    if not value:
        raise ConfigError(f"{where} must be a non-empty list of {list(TARGETS)}, got {value!r}")
    targets: list[str] = []
    for item in value:
        name = _choice(where, item, TARGETS)
        if name not in targets:
            targets.append(name)
    return targets


class Context(_Settings):
    """Where and how a model runs. ``Context()`` targets the CPU with default threads."""

    _owner = "Context"
    target = Setting(["cpu"], _targets, 'Devices in order of preference, from "cpu", "gpu", "ascend"; the CPU is always the last fallback.')

    def __init__(self):
        object.__setattr__(self, "_devices", (CPUDeviceInfo(), GPUDeviceInfo(), AscendDeviceInfo(), ParallelConfig()))

    cpu = property(lambda self: self._devices[0], doc="CPU threads, affinity and precision.")
    gpu = property(lambda self: self._devices[1], doc="GPU device, provider and precision.")
    ascend = property(lambda self: self._devices[2], doc="Ascend device, provider and precision.")
    parallel = property(lambda self: self._devices[3], doc="Worker-pool settings.")

    def __str__(self) -> str:
        return f"target: {self.target}."

    def __repr__(self) -> str:
        return f"Context(target={self.target!r}, {self.cpu!r}, {self.gpu!r}, {self.ascend!r}, {self.parallel!r})"
