"""Launching the ranks a rank table lists for this host, the way the seeds' shell samples do.

For each local device: ``PROGRAM ARGS --device_id=D --rank_id=R --config_file=INI``
with ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` exported, all watched by one
``Supervisor`` (first failure reported, the others stopped).

On a multi-host table, run the same command on every host: each starts only
its own ranks (``--server`` names this host's ``server_id`` when its names
and addresses do not match the table's).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from ranks import _env
from ranks._config_file import load_config
from ranks._errors import ConfigError

from ._errors import LaunchError
from ranks._rank_table import RankDevice, RankTable, this_host_addresses

from ._failures import RankExit
from ._output import RankOutput
from ._launch_options import check_common_options
from ._supervisor import ProcessSpec, Supervisor, resolve_program


@dataclass
class RankTableLaunchConfig:
    """``orchestrate launch rank-table`` as data.

    ``rank_table``: HCCL JSON. ``config_file``: the ini each rank gets as
    ``--config_file`` (checked here as the ranks will read it, and any
    ``rank_table_file`` it names must exist). ``program``: the
    command before the appended flags. ``servers``: which ``server_id``(s) of
    the table are this host (default: matched by this host's names and
    addresses). ``log_dir``, ``timeout``, ``stop_timeout``: as for mpirun.
    """

    rank_table: str
    config_file: str
    program: Sequence[str]
    servers: Sequence[str] | None = None
    log_dir: str | None = None
    timeout: float | None = None
    stop_timeout: float | None = None
    tail_lines: int | None = None
    console: bool = True

    def __post_init__(self):
        check_common_options(self)
        if not Path(self.config_file).is_file():
            raise ConfigError(f"--config_file {self.config_file!r} does not exist")
        check_config_file(self.config_file)
        if self.servers is not None:
            self.servers = list(self.servers)


def check_config_file(path: str) -> None:
    """Read the ini as every rank will, so a mistake in it fails once, here, before any rank starts.

    Raises ``ConfigError`` naming the file (and line or key) when it does not
    parse, or when the ``rank_table_file`` it names does not exist. Its
    warnings (MindSpore Lite keys without effect) are left to the ranks.
    """
    logger = logging.getLogger("ranks.config")
    was_disabled, logger.disabled = logger.disabled, True
    try:
        config = load_config(path)
    finally:
        logger.disabled = was_disabled
    table = config.rank_table_file
    if table and not Path(table).is_file():
        raise ConfigError(f"{path}: rank_table_file {table} does not exist")


def rank_specs(table: RankTable, devices: Sequence[RankDevice], config: RankTableLaunchConfig) -> list[ProcessSpec]:
    """One ``ProcessSpec`` per local device: the seeds' flags appended, torchrun's variables exported."""
    program = resolve_program(config.program)
    config_file = os.path.abspath(config.config_file)
    specs = []
    for local_rank, device in enumerate(devices):
        argv = program + [
            f"--device_id={device.device_id}",
            f"--rank_id={device.rank_id}",
            f"--config_file={config_file}",
        ]
        env = {
            _env.RANK.name: str(device.rank_id),
            _env.WORLD_SIZE.name: str(table.world_size),
            _env.LOCAL_RANK.name: str(local_rank),
            # HCCL's own variable: create_communicator() in the rank's program finds its peers through it.
            _env.RANK_TABLE_FILE.name: os.path.abspath(config.rank_table),
        }
        specs.append(ProcessSpec(device.rank_id, argv, env=env))
    return specs


class RankTableLauncher:
    """Starts this host's ranks of ``config.rank_table`` and watches them.

    Raises ``RankTableError`` for a bad table, ``LaunchError`` when the
    table lists nothing for this host; ``run()`` then behaves as
    ``Supervisor.run`` (``RankFailedError``, ``LaunchTimeoutError``,
    ``LaunchInterruptedError``), leaving nothing running.
    """

    def __init__(self, config: RankTableLaunchConfig, *, stdout=None, stderr=None):
        self.config = config
        self.table = RankTable.load(config.rank_table)
        self.devices = self.table.local_devices(config.servers)
        if not self.devices:
            mine = sorted(config.servers) if config.servers is not None else sorted(this_host_addresses())
            raise LaunchError(
                f"rank table {config.rank_table} lists no device for this host: it has servers "
                f"{', '.join(self.table.servers())}, this host is {', '.join(mine)}. "
                f"Run it on one of those servers, or name this host's server_id with --server"
            )
        self.specs = rank_specs(self.table, self.devices, config)
        self.output = RankOutput(
            config.log_dir, stdout=stdout, stderr=stderr, tail_lines=config.tail_lines, console=config.console
        )
        self.group = Supervisor(
            self.specs, output=self.output, stop_timeout=config.stop_timeout, world_size=self.table.world_size
        )

    def run(self) -> list[RankExit]:
        return self.group.run(self.config.timeout)
