"""``config_file.ini`` and ``config_dict``: parsed once into a RankConfig.

Sections, as MindSpore Lite uses them, plus this project's ``[comm]``:

================  ==========================================================
section           keys
================  ==========================================================
[ascend_context]  rank_table_file, device_id, rank_id, provider, precision_mode, input_shape, dynamic_dims,
                  variable_weights_file, variable_weights_list,
                  shareable_weight_pid_list, shareable_weight_mem_handle (``_shared_weights``)
[gpu_context]     device_id, provider, precision_mode, input_shape, dynamic_dims
[cpu_context]     thread_num, inter_op_parallel_num, thread_affinity_mode, thread_affinity_core_list,
                  precision_mode, allow_spinning, input_shape, dynamic_dims
[comm]            backend (mpi | zmq | single), timeout (seconds), base_port, rank_table_file,
                  mpi_arrival_check (true | false: the mpi backend's fast mode, see the README)
================  ==========================================================

MindSpore Lite documents more keys and sections than mean anything on ONNX
Runtime (Ascend graph-engine tuning, TensorRT caches, ...). Those are
accepted with one warning line each saying they have no effect here, so a
config written for MindSpore Lite loads as it is; a key that neither we nor
MindSpore Lite know stays an error naming the key, the section and the file.
Other unknown sections are kept (``RankConfig.extra``) and handed on.
Values may be quoted (``variable_weights_file="names.txt"``), as MindSpore
Lite's documents write them.
``config_dict`` also takes MindSpore Lite's flat weight-sharing keys:
``{"pids": "pid1, pid2"}`` and ``{"shared_mem_handle": handle}`` mean
``[ascend_context] shareable_weight_pid_list`` and ``shareable_weight_mem_handle``.
Relative paths inside the file (``rank_table_file``) are resolved against the
file's own directory, so a rank can be started from any working directory.
"""

from __future__ import annotations

import configparser
import difflib
import os
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import ConfigError
from ._log import get_logger

log = get_logger("config")

KNOWN_SECTIONS: dict[str, tuple[str, ...]] = {
    "ascend_context": (
        "rank_table_file", "device_id", "rank_id", "provider", "precision_mode", "input_shape", "dynamic_dims",
        "variable_weights_file", "variable_weights_list",
        "shareable_weight_pid_list", "shareable_weight_mem_handle",
    ),
    "gpu_context": ("device_id", "provider", "precision_mode", "input_shape", "dynamic_dims"),
    "cpu_context": (
        "thread_num", "inter_op_parallel_num", "thread_affinity_mode", "thread_affinity_core_list",
        "precision_mode", "allow_spinning", "input_shape", "dynamic_dims",
    ),
    "comm": ("backend", "timeout", "base_port", "rank_table_file", "mpi_arrival_check"),
}
COMM_BACKENDS = ("mpi", "zmq", "single")
# config_dict's flat (section-less) keys, as MindSpore Lite's weight-sharing examples write them.
FLAT_KEYS = {
    "pids": ("ascend_context", "shareable_weight_pid_list"),
    "shared_mem_handle": ("ascend_context", "shareable_weight_mem_handle"),
}

# Keys MindSpore Lite documents for its config files that have no meaning on ONNX Runtime:
# accepted with a warning. (Its converter and Ascend runtime documents, [ascend_context] and
# [gpu_context] tables.)
MINDSPORE_LITE_ONLY_KEYS: dict[str, tuple[str, ...]] = {
    "ascend_context": (
        "input_format", "op_select_impl_mode", "output_type", "fusion_switch_config_file_path",
        "insert_op_config_file_path", "buffer_optimize", "aoe_mode", "plugin_custom_ops", "custom_fusion_pattern",
        "enable_ge_cache", "ge_graph_key", "dynamic_batch_size", "dynamic_image_size", "provider_options",
    ),
    "gpu_context": ("opt_dims", "serialize_path"),
    "cpu_context": (),
}
# Whole sections MindSpore Lite reads that mean nothing here (graph-engine options, TensorRT
# caches, mixed-precision plans, thread-pool sharing, weight locations of MINDIR buffers).
MINDSPORE_LITE_ONLY_SECTIONS = (
    "execution_plan", "ms_cache", "model_file", "weight", "shared_thread_pool", "ge_global_options",
    "ge_session_options", "ge_graph_options", "acl_option_cfg_param", "inner_common",
)
# Sections other packages read from RankConfig.extra: [pool] (orchestrator's worker pool, _pool_plan).
OTHER_SECTIONS = ("pool",)
# Values that name files, resolved against the ini file's directory.
PATH_KEYS = ("rank_table_file", "variable_weights_file")


@dataclass
class CommConfig:
    backend: str | None = None
    timeout: float | None = None
    base_port: int | None = None
    mpi_arrival_check: bool | None = None  # None: ORCH_MPI_ARRIVAL_CHECK (default true)


@dataclass
class RankConfig:
    """What a config file (and/or config_dict) says, validated."""

    source: str = "<none>"
    sections: dict[str, dict[str, str]] = field(default_factory=dict)
    extra: dict[str, dict[str, str]] = field(default_factory=dict)
    comm: CommConfig = field(default_factory=CommConfig)
    rank_table_file: str | None = None
    input_shapes: dict[str, list[int]] = field(default_factory=dict)
    rank_id: int | None = None  # [ascend_context] rank_id
    device_id: int | None = None  # [ascend_context] device_id
    variable_weights: list[str] | None = None  # weights update_weights may replace, in order

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        return self.sections.get(section, {}).get(key, default)

    def get_int(self, section: str, key: str) -> int | None:
        value = self.get(section, key)
        if value is None:
            return None
        try:
            return int(value)
        except ValueError:
            raise ConfigError(f"{self.source}: [{section}] {key} must be an integer, got {value!r}") from None


def load_config(config_path: str | os.PathLike | None = "", config_dict: dict | None = None, *,
                dict_name: str = "config_dict") -> RankConfig:
    """Parse ``config_path`` (may be empty) and overlay ``config_dict`` ({section: {key: value}}); errors call the
    dict ``dict_name`` (``context.parallel.config_info`` for a runner's)."""
    sections: dict[str, dict[str, str]] = {}
    base_dir = Path.cwd()
    source = "<none>"
    if config_path:
        path = Path(config_path)
        source = str(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        # Inline "; comment" after a value is allowed, as in the README's examples.
        parser = configparser.ConfigParser(interpolation=None, strict=True, inline_comment_prefixes=(";", "#"))
        parser.optionxform = str  # keys are case-sensitive, as MindSpore Lite reads them
        try:
            with open(path, encoding="utf-8") as handle:
                parser.read_file(handle)
        except configparser.MissingSectionHeaderError as exc:
            raise ConfigError(
                f"{path}: line {exc.lineno}: {exc.line.strip()!r} comes before any [section] header; "
                f"expected sections like [ascend_context] or [comm]"
            ) from None
        except configparser.Error as exc:
            raise ConfigError(f"{path}: not a valid ini file: {exc.message}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path}: not a text ini file ({exc})") from None
        for name in parser.sections():
            sections[name] = {key: _unquote(value) for key, value in parser.items(name)}
        base_dir = path.resolve().parent
    if config_dict:
        if not isinstance(config_dict, dict):
            raise ConfigError(f"{dict_name} must be a dict of {{section: {{key: value}}}}, got {type(config_dict).__name__}")
        for name, values in config_dict.items():
            if name in FLAT_KEYS and not isinstance(values, dict):
                section, key = FLAT_KEYS[name]
                sections.setdefault(section, {})[key] = _flat_value(name, values)
                continue
            if not isinstance(values, dict):
                raise ConfigError(f"{dict_name}[{name!r}] must be a dict of key: value, got {values!r}")
            for key, value in values.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise ConfigError(f"{dict_name}[{name!r}]: keys and values must be str, got {key!r}: {value!r}")
            sections.setdefault(name, {}).update(values)
        source = f"{source} + {dict_name}" if config_path else dict_name
    return _validate(sections, source, base_dir)


def _unquote(value: str) -> str:
    value = value.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "\"'":
        return value[1:-1]
    return value


def _flat_value(name: str, value) -> str:
    """A flat key's value as the ini would hold it: ints and lists of ints become "1, 2"."""
    if isinstance(value, (list, tuple)):
        value = ", ".join(str(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise ConfigError(f"config_dict[{name!r}] must be a str or int, got {value!r}")
    return str(value)


_WARNED: set[tuple] = set()  # (source, message, args) already logged by this process


def _warn_once(source: str, message: str, *args) -> None:
    """Log a warning about ``source`` once per process: a file read twice (``python -m ranks`` reads the rank
    table's name from it, then builds the model with it) must not repeat its lines."""
    key = (source, message, args)
    if key not in _WARNED:
        _WARNED.add(key)
        log.warning(message, source, *args)


def _validate(sections: dict[str, dict[str, str]], source: str, base_dir: Path) -> RankConfig:
    config = RankConfig(source=source)
    for name, values in sections.items():
        known = KNOWN_SECTIONS.get(name)
        if known is None:
            if name in MINDSPORE_LITE_ONLY_SECTIONS:
                _warn_once(source, "%s: section [%s] is MindSpore Lite's and has no effect on ONNX Runtime; ignored", name)
            elif name not in OTHER_SECTIONS:
                ours = sorted([*KNOWN_SECTIONS, *OTHER_SECTIONS])
                close = difflib.get_close_matches(name, [*ours, *MINDSPORE_LITE_ONLY_SECTIONS], n=1)
                _warn_once(source, "%s: section [%s] is read by nothing here (ours: %s; MindSpore Lite's own are "
                           "accepted and ignored); ignored%s", name, ", ".join(ours),
                           f" (did you mean [{close[0]}]?)" if close else "")
            config.extra[name] = values
            continue
        kept = {}
        for key, value in values.items():
            if key in known:
                kept[key] = value
            elif key in MINDSPORE_LITE_ONLY_KEYS.get(name, ()):
                _warn_once(source, "%s: [%s] %s is a MindSpore Lite option with no effect on ONNX Runtime; ignored", name, key)
            else:
                also = MINDSPORE_LITE_ONLY_KEYS.get(name, ())
                raise ConfigError(
                    f"{source}: unknown key {key!r} in section [{name}]; known keys are {list(known)}"
                    + (f" (also accepted, without effect here: {list(also)})" if also else "")
                )
        config.sections[name] = kept

    comm = config.sections.get("comm", {})
    backend = comm.get("backend")
    if backend is not None:
        if backend.lower() not in COMM_BACKENDS:
            raise ConfigError(f"{source}: [comm] backend must be one of {list(COMM_BACKENDS)}, got {backend!r}")
        config.comm.backend = backend.lower()
    if "timeout" in comm:
        try:
            config.comm.timeout = float(comm["timeout"])
        except ValueError:
            config.comm.timeout = -1.0
        if not config.comm.timeout > 0:
            raise ConfigError(f"{source}: [comm] timeout must be a positive number of seconds, got {comm['timeout']!r}")
    if "base_port" in comm:
        port = config.get_int("comm", "base_port")
        if not 1 <= port <= 65535:
            raise ConfigError(f"{source}: [comm] base_port must be a TCP port 1..65535, got {port}")
        config.comm.base_port = port

    if "mpi_arrival_check" in comm:
        from ._env import parse_bool

        flag = parse_bool(comm["mpi_arrival_check"])
        if flag is None:
            raise ConfigError(
                f"{source}: [comm] mpi_arrival_check must be one of true/false/1/0/yes/no, got {comm['mpi_arrival_check']!r}"
            )
        config.comm.mpi_arrival_check = flag

    for section in config.sections.values():
        for key in PATH_KEYS:
            if section.get(key):
                path = Path(section[key])
                section[key] = str(path if path.is_absolute() else (base_dir / path))
    for section in ("comm", "ascend_context"):
        table = config.sections.get(section, {}).get("rank_table_file")
        if table:
            config.rank_table_file = table
            break
    config.rank_id = config.get_int("ascend_context", "rank_id")
    config.device_id = config.get_int("ascend_context", "device_id")
    config.variable_weights = _variable_weights(config)

    _check_device_settings(config)
    for section in ("cpu_context", "gpu_context", "ascend_context"):
        spec = config.sections.get(section, {}).get("input_shape")
        if spec:
            config.input_shapes.update(parse_input_shape(spec, f"{source}: [{section}] input_shape"))
    return config


def _check_device_settings(config: RankConfig) -> None:
    """[cpu_context], [gpu_context] and [ascend_context] values, checked by the rules of the Context's own
    settings (``cpu.thread_num = -3`` and ``thread_num=-3`` in a file fail alike, naming the file)."""
    from ._context import AscendDeviceInfo, CPUDeviceInfo, GPUDeviceInfo, Setting
    from ._context import _non_negative_int as non_negative
    from ._env import parse_bool

    for section, info in (("cpu_context", CPUDeviceInfo), ("gpu_context", GPUDeviceInfo),
                          ("ascend_context", AscendDeviceInfo)):
        for key, text in config.sections.get(section, {}).items():
            where = f"{config.source}: [{section}] {key}"
            setting = info.__dict__.get(key)
            if key == "allow_spinning" and parse_bool(text) is None:
                raise ConfigError(f"{where} must be one of true/false/1/0/yes/no, got {text!r}")
            if not isinstance(setting, Setting):
                continue
            if isinstance(setting.default, bool) or not isinstance(setting.default, (int, list)):
                setting.check(where, text)
                continue
            try:
                value = [int(c) for c in text.split(",") if c.strip()] if isinstance(setting.default, list) else int(text)
            except ValueError:
                what = "core numbers separated by commas" if isinstance(setting.default, list) else "an integer"
                raise ConfigError(f"{where} must be {what}, got {text!r}") from None
            if isinstance(value, list):
                # (a core named twice is allowed here: a pool's workers may share cores, and are told so)
                [non_negative(f"{where}[]", core) for core in value]
            else:
                setting.check(where, value)


def _variable_weights(config: RankConfig) -> list[str] | None:
    """The weight names of ``variable_weights_file`` (one per line) or ``variable_weights_list`` (comma-separated)."""
    names: list[str] | None = None
    listed = config.get("ascend_context", "variable_weights_list")
    if listed:
        names = [n.strip() for n in listed.split(",") if n.strip()]
    path = config.get("ascend_context", "variable_weights_file")
    if path:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(
                f"{config.source}: [ascend_context] variable_weights_file {path} cannot be read "
                f"({exc.strerror or exc}); expected a text file with one weight name per line"
            ) from None
        names = (names or []) + [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
        if not names:
            raise ConfigError(f"{config.source}: [ascend_context] variable_weights_file {path} names no weights")
    if names is not None and len(set(names)) != len(names):
        repeated = sorted({n for n in names if names.count(n) > 1})
        raise ConfigError(f"{config.source}: the variable weights name {repeated} more than once")
    return names


def parse_input_shape(spec: str, where: str) -> dict[str, list[int]]:
    """``"x:1,3,224,224;y:1,10"`` (or MindSpore Lite's ``"x:[1,3,224,224]"``) -> {"x": [1, 3, 224, 224], ...}."""
    shapes: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, dims = part.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            dims = dims.strip()
            if dims.startswith("[") and dims.endswith("]"):
                dims = dims[1:-1]
            shapes[name.strip()] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise ConfigError(f"{where}: {part!r} is not NAME:D1,D2,... (e.g. x:1,3,224,224)") from None
    return shapes
