"""Checks and defaults that every launcher's config shares (program, time limits, report length)."""

from __future__ import annotations

from ranks import _env
from ranks._errors import ConfigError


def check_common_options(config) -> None:
    """Validate ``program``, ``timeout``, ``stop_timeout`` and fill the defaults from the environment."""
    if not config.program:
        raise ConfigError("no program to run: give it after --, e.g. -- python -m ranks --model_path=m.onnx")
    if config.timeout is not None and config.timeout <= 0:
        raise ConfigError(f"--timeout must be a positive number of seconds, got {config.timeout!r}")
    if config.stop_timeout is None:
        config.stop_timeout = _env.stop_timeout()
    if config.stop_timeout < 0:
        raise ConfigError(f"the stop timeout must be >= 0 seconds, got {config.stop_timeout!r}")
    if config.tail_lines is None:
        config.tail_lines = _env.LOG_TAIL_LINES.get_int() or 20
    config.program = list(config.program)
