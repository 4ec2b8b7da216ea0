"""What a ModelParallelRunner runs: its ``[pool]`` options, and its workers, threads and cores.

``[pool]`` is this project's section (MindSpore Lite's runner has none); it is
read from ``context.parallel.config_info`` and ``context.parallel.config_path``
like every other section, and ``build_from_file``'s keyword arguments win
over it:

===============  ========================  ==============================================
key              default                   meaning
===============  ========================  ==============================================
queue_size       1000 (MindSpore Lite's)   requests that may wait for a worker; one more
                                           is refused at once (``PoolQueueFullError``)
timeout          ``ORCH_TIMEOUT`` (120 s)  seconds a request may take, queue wait included,
                                           before it is abandoned (``WorkerTimeoutError``)
share_weights    false                     all workers run on one copy of the weights
worker_type      thread                    ``thread`` (one ONNX Runtime session per worker
                                           thread) or ``process`` (one child process per
                                           worker, see ``_pool_processes``)
join_requests    1 (off)                   a free worker takes up to this many waiting
                                           requests of the same shapes at once and runs
                                           them as one batch (rows joined along dimension
                                           0, outputs split back); for models whose
                                           inputs all have a free dimension 0
===============  ========================  ==============================================

Workers and threads (``context.parallel.workers_num``, ``context.cpu.thread_num``;
``[cpu_context] thread_num`` in the config wins, as for a Model):

=================  =================  =============================================
workers_num        thread_num         the pool runs
=================  =================  =============================================
0                  0                  MindSpore Lite's default: threads = usable // 2
                                      (at most 8, at least 1), workers = usable // threads
0                  T                  usable // T workers (at least 1) of T threads
N                  0                  N workers of usable // N threads (at least 1)
N                  T                  N workers of T threads
=================  =================  =============================================

"usable" is ``ranks._cpu_limits.cpu_budget``: the CPU affinity capped by the
cgroup CPU quota. More threads than usable cores is a warning, with the numbers.

Cores: affinity mode 0 binds nothing. Modes 1 and 2 take that tier's cores and
give worker k the k-th run of ``threads`` of them (round-robin, with a warning,
when there are too few). A core list must hold workers x threads cores (with
``workers_num`` 0, its length decides the workers); worker k gets the slice
``[k*threads, (k+1)*threads)``, as in MindSpore Lite.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ranks._config_file import RankConfig
from ranks._context import Context
from ranks._cpu_limits import CpuBudget, cpu_budget
from ranks._env import check_timeout, default_timeout, parse_bool
from ranks._errors import ConfigError, ConfigTypeError
from ranks._session import cores_for_affinity_mode

POOL_SECTION = "pool"
DEFAULT_QUEUE_SIZE = 1000  # MindSpore Lite's kNumMaxTaskQueueSize
WORKER_TYPES = ("thread", "process")
POOL_KEYS = ("queue_size", "timeout", "share_weights", "worker_type", "join_requests")
MAX_DEFAULT_THREADS = 8  # MindSpore Lite's kDefaultThreadsNum
# The cpu keys the pool decides per worker; the rest of [cpu_context] reaches every worker as it is.
PER_WORKER_CPU_KEYS = ("thread_num", "thread_affinity_mode", "thread_affinity_core_list")


@dataclass
class PoolOptions:
    """The ``[pool]`` settings, validated."""

    queue_size: int = DEFAULT_QUEUE_SIZE
    timeout: float = 0.0  # 0: ORCH_TIMEOUT
    share_weights: bool = False
    worker_type: str = "thread"
    join_requests: int = 1
    source: str = "build_from_file"

    def __post_init__(self):
        where = self.source
        if isinstance(self.queue_size, bool) or not isinstance(self.queue_size, int):
            raise ConfigTypeError(f"{where}: queue_size must be an int >= 1, got {self.queue_size!r}")
        if self.queue_size < 1:
            raise ConfigError(f"{where}: queue_size must be at least 1, got {self.queue_size}")
        if isinstance(self.timeout, bool) or not isinstance(self.timeout, (int, float)):
            raise ConfigTypeError(f"{where}: timeout must be a number of seconds > 0, got {self.timeout!r}")
        self.timeout = default_timeout() if self.timeout == 0 else check_timeout(self.timeout, f"{where}: timeout")
        if not isinstance(self.share_weights, bool):
            raise ConfigTypeError(f"{where}: share_weights must be True or False, got {self.share_weights!r}")
        if not isinstance(self.worker_type, str) or self.worker_type.lower() not in WORKER_TYPES:
            raise ConfigError(f"{where}: worker_type must be one of {list(WORKER_TYPES)}, got {self.worker_type!r}")
        self.worker_type = self.worker_type.lower()
        if isinstance(self.join_requests, bool) or not isinstance(self.join_requests, int) or self.join_requests < 1:
            raise ConfigError(f"{where}: join_requests must be an int >= 1 (1: off), got {self.join_requests!r}")


def pool_options(config: RankConfig, **overrides) -> PoolOptions:
    """``[pool]`` of ``config``, then the keyword arguments that are not None."""
    section = config.extra.get(POOL_SECTION, {})
    where = f"{config.source}: [{POOL_SECTION}]"
    unknown = [key for key in section if key not in POOL_KEYS]
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known keys are {list(POOL_KEYS)}")
    values: dict = {}
    if "queue_size" in section:
        values["queue_size"] = _parse(where, "queue_size", section["queue_size"], int, "an integer >= 1")
    if "timeout" in section:
        values["timeout"] = check_timeout(_parse(where, "timeout", section["timeout"], float, "a number of seconds > 0"),
                                          f"{where} timeout")
    if "share_weights" in section:
        flag = parse_bool(section["share_weights"])
        if flag is None:
            raise ConfigError(f"{where} share_weights must be one of true/false/1/0/yes/no, got {section['share_weights']!r}")
        values["share_weights"] = flag
    if "worker_type" in section:
        values["worker_type"] = section["worker_type"].strip()
    if "join_requests" in section:
        values["join_requests"] = _parse(where, "join_requests", section["join_requests"], int, "an integer >= 1")
    given = {key: value for key, value in overrides.items() if value is not None}
    source = where if values and not given else ("build_from_file" if not values else f"{where} + build_from_file")
    return PoolOptions(**{**values, **given}, source=source)


def _parse(where: str, key: str, text: str, kind, what: str):
    try:
        return kind(text.strip())
    except ValueError:
        raise ConfigError(f"{where} {key} must be {what}, got {text!r}") from None


@dataclass(frozen=True)
class WorkerPlan:
    """Workers, threads per worker, each worker's cores ([] when not bound), and a warning to give."""

    workers: int
    threads: int
    cores: list[list[int]]
    budget: CpuBudget
    warning: str | None = None


def plan_workers(context: Context, config: RankConfig, budget: CpuBudget | None = None) -> WorkerPlan:
    """How many workers of how many threads, on which cores (see the module docstring)."""
    budget = budget or cpu_budget()
    usable = budget.usable
    workers = context.parallel.workers_num
    threads = _cpu_int(config, "thread_num", context.cpu.thread_num)
    mode = _cpu_int(config, "thread_affinity_mode", context.cpu.thread_affinity_mode)
    core_list = _core_list(config, context.cpu.thread_affinity_core_list)

    if core_list:
        if workers == 0:
            threads = threads or 1
            if len(core_list) % threads:
                raise ConfigError(
                    f"thread_affinity_core_list has {len(core_list)} cores, which is not a multiple of "
                    f"thread_num {threads}: with workers_num 0 the list must hold workers x threads cores"
                )
            workers = len(core_list) // threads
        threads = threads or max(1, len(core_list) // workers)
        if len(core_list) != workers * threads:
            raise ConfigError(
                f"thread_affinity_core_list must hold workers_num x thread_num = {workers} x {threads} = "
                f"{workers * threads} cores (worker k takes cores [k*{threads}, (k+1)*{threads})), got "
                f"{len(core_list)}: {core_list}"
            )
        allowed = list(budget.cores)
        outside = [c for c in core_list if c not in allowed]
        if outside:
            raise ConfigError(f"thread_affinity_core_list names cores {outside} this process may not run on; its cores are {allowed}")
        cores = [core_list[k * threads:(k + 1) * threads] for k in range(workers)]
    else:
        if workers == 0 and threads == 0:
            threads = max(1, min(MAX_DEFAULT_THREADS, usable // 2))
        if workers == 0:
            workers = max(1, usable // threads)
        if threads == 0:
            threads = max(1, usable // workers)
        cores = _bind(mode, workers, threads) if mode else [[] for _ in range(workers)]

    need = workers * threads
    warning = None
    if need > usable:
        warning = (
            f"{workers} workers x {threads} threads = {need} threads, but this process has {budget.describe()}: "
            f"the threads will take turns on the cores and every request will run slower; lower "
            f"context.parallel.workers_num or context.cpu.thread_num so that their product is at most {usable}"
        )
    elif any(len(set(c)) < len(c) for c in cores) or _shared_cores(cores):
        warning = (
            f"{workers} workers x {threads} threads are bound to {sorted({c for w in cores for c in w})}, fewer cores "
            f"than threads: workers share cores ({cores}) and slow each other down"
        )
    return WorkerPlan(workers, threads, cores, budget, warning)


def _bind(mode: int, workers: int, threads: int) -> list[list[int]]:
    """Worker k takes the k-th run of ``threads`` cores of the mode's tier, wrapping round when there are too few."""
    tier = cores_for_affinity_mode(mode)
    return [[tier[(k * threads + j) % len(tier)] for j in range(threads)] for k in range(workers)]


def _shared_cores(cores: list[list[int]]) -> bool:
    flat = [c for worker in cores for c in worker]
    return len(set(flat)) < len(flat)


def _cpu_int(config: RankConfig, key: str, default: int) -> int:
    text = config.sections.get("cpu_context", {}).get(key)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConfigError(f"{config.source}: [cpu_context] {key} must be an integer, got {text!r}") from None
    if value < 0:
        raise ConfigError(f"{config.source}: [cpu_context] {key} must be >= 0, got {value}")
    return value


def _core_list(config: RankConfig, default: list[int]) -> list[int]:
    text = config.sections.get("cpu_context", {}).get("thread_affinity_core_list")
    if text is None:
        return list(default)
    try:
        return [int(c) for c in text.split(",") if c.strip()]
    except ValueError:
        raise ConfigError(f"{config.source}: [cpu_context] thread_affinity_core_list must be core numbers "
                          f"separated by commas, got {text!r}") from None


def worker_config(config: RankConfig) -> RankConfig:
    """``config`` without the cpu keys the pool sets per worker (each worker gets its own threads and cores)."""
    sections = dict(config.sections)
    if "cpu_context" in sections:
        sections["cpu_context"] = {k: v for k, v in sections["cpu_context"].items() if k not in PER_WORKER_CPU_KEYS}
    return dataclasses.replace(config, sections=sections)
