"""``config_file.ini`` and ``config_dict``: parsed once into a RankConfig.

Sections, as MindSpore Lite uses them, plus this project's ``[comm]``:

================  ==========================================================
section           keys
================  ==========================================================
[ascend_context]  rank_table_file, device_id, rank_id, provider, precision_mode, input_shape, dynamic_dims
[gpu_context]     device_id, provider, precision_mode, input_shape, dynamic_dims
[cpu_context]     thread_num, inter_op_parallel_num, thread_affinity_mode, thread_affinity_core_list,
                  precision_mode, allow_spinning, input_shape, dynamic_dims
[comm]            backend (mpi | zmq | single), timeout (seconds), base_port, rank_table_file,
                  mpi_arrival_check (true | false: the mpi backend's fast mode, docs/README_comm_fast.md)
================  ==========================================================

Unknown sections are kept (``RankConfig.extra``) and handed on; an unknown
key in a known section is an error naming the key, the section and the file.
Relative paths inside the file (``rank_table_file``) are resolved against the
file's own directory, so a rank can be started from any working directory.
"""

from __future__ import annotations

import configparser
import os
from dataclasses import dataclass, field
from pathlib import Path

from ._errors import ConfigError

KNOWN_SECTIONS: dict[str, tuple[str, ...]] = {
    "ascend_context": ("rank_table_file", "device_id", "rank_id", "provider", "precision_mode", "input_shape", "dynamic_dims"),
    "gpu_context": ("device_id", "provider", "precision_mode", "input_shape", "dynamic_dims"),
    "cpu_context": (
        "thread_num", "inter_op_parallel_num", "thread_affinity_mode", "thread_affinity_core_list",
        "precision_mode", "allow_spinning", "input_shape", "dynamic_dims",
    ),
    "comm": ("backend", "timeout", "base_port", "rank_table_file", "mpi_arrival_check"),
}
COMM_BACKENDS = ("mpi", "zmq", "single")


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


def load_config(config_path: str | os.PathLike | None = "", config_dict: dict | None = None) -> RankConfig:
    """Parse ``config_path`` (may be empty) and overlay ``config_dict`` ({section: {key: value}})."""
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
            sections[name] = dict(parser.items(name))
        base_dir = path.resolve().parent
    if config_dict:
        if not isinstance(config_dict, dict):
            raise ConfigError(f"config_dict must be a dict of {{section: {{key: value}}}}, got {type(config_dict).__name__}")
        for name, values in config_dict.items():
            if not isinstance(values, dict):
                raise ConfigError(f"config_dict[{name!r}] must be a dict of key: value, got {values!r}")
            for key, value in values.items():
                if not isinstance(key, str) or not isinstance(value, str):
                    raise ConfigError(f"config_dict[{name!r}]: keys and values must be str, got {key!r}: {value!r}")
            sections.setdefault(name, {}).update(values)
        source = f"{source} + config_dict" if config_path else "config_dict"
    return _validate(sections, source, base_dir)


def _validate(sections: dict[str, dict[str, str]], source: str, base_dir: Path) -> RankConfig:
    config = RankConfig(source=source)
    for name, values in sections.items():
        known = KNOWN_SECTIONS.get(name)
        if known is None:
            config.extra[name] = values
            continue
        for key in values:
            if key not in known:
                raise ConfigError(f"{source}: unknown key {key!r} in section [{name}]; known keys are {list(known)}")
        config.sections[name] = values

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

    for section in ("comm", "ascend_context"):
        table = config.sections.get(section, {}).get("rank_table_file")
        if table:
            path = Path(table)
            config.rank_table_file = str(path if path.is_absolute() else (base_dir / path))
            break

    for section in ("cpu_context", "gpu_context", "ascend_context"):
        spec = config.sections.get(section, {}).get("input_shape")
        if spec:
            config.input_shapes.update(parse_input_shape(spec, f"{source}: [{section}] input_shape"))
    return config


def parse_input_shape(spec: str, where: str) -> dict[str, list[int]]:
    """``"x:1,3,224,224;y:1,10"`` -> {"x": [1, 3, 224, 224], "y": [1, 10]}."""
    shapes: dict[str, list[int]] = {}
    for part in filter(None, (p.strip() for p in spec.split(";"))):
        name, sep, dims = part.rpartition(":")
        try:
            if not sep or not name:
                raise ValueError
            shapes[name.strip()] = [int(d) for d in dims.split(",")]
        except ValueError:
            raise ConfigError(f"{where}: {part!r} is not NAME:D1,D2,... (e.g. x:1,3,224,224)") from None
    return shapes
