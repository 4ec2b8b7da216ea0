"""Starting and watching child processes: the one supervisor, and the launchers built on it.

``Supervisor`` (``ProcessGroup``) starts, watches, reports and stops every set of child
processes in the project (ranks, ShardedModel's ranks, batch-split workers); ``MpiLauncher``
and ``RankTableLauncher`` run ranks through it.
"""

from ._errors import LaunchError, LaunchInterruptedError, LaunchTimeoutError, RankFailedError

from ._failures import RankExit, failure_error, format_report
from ._mpi import MpiLaunchConfig, MpiLauncher, build_mpirun_command, find_mpirun, mpi_flavor
from ._output import RankOutput
from ._supervisor import ProcessGroup, ProcessSpec, Supervisor, python_module
from ._rank_table_launcher import RankTableLaunchConfig, RankTableLauncher
