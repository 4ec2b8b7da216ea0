"""Set what gRPC reads when it starts, before any module of the serving front imports it.

Fork handlers off (``ranks._env.GRPC_ENABLE_FORK_SUPPORT``): the serving
processes start children through the supervisor (cluster workers, batch-split
workers), which forks (not vfork: the children get a parent-death signal), and
with gRPC's fork handlers on a forked child restarts gRPC's poller on a
descriptor its ``exec`` preparation already closed and aborts before it runs
(grpc/grpc#43055: measured here, 11 of 150 children while a channel was busy;
0 of 150 with the handlers off). No child here uses gRPC before its ``exec``.
This package's ``__init__`` imports this module first, so it runs before any
``import grpc`` of ours; an application that started gRPC earlier keeps its setting.
"""

import os

from ranks import _env

os.environ.setdefault(_env.GRPC_ENABLE_FORK_SUPPORT.name, _env.GRPC_ENABLE_FORK_SUPPORT.default)
