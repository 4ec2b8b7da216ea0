"""Starting many rank processes (through mpirun, from a rank table, as local children) and watching them."""

from ranks._errors import LaunchError, LaunchInterruptedError, LaunchTimeoutError, RankFailedError

from ._failures import RankExit, failure_error, format_report
from ._mpi import MpiLaunchConfig, MpiLauncher, build_mpirun_command, find_mpirun, mpi_flavor
from ._output import RankOutput
from ._supervisor import ProcessGroup, ProcessSpec, Supervisor, python_module
from ._rank_table_launcher import RankTableLaunchConfig, RankTableLauncher
