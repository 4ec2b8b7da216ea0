"""Workers, threads and cores of a ModelParallelRunner: workers_num=0, cgroup quotas, oversubscription, affinity."""

from __future__ import annotations

import os
import warnings

import pytest

import orchestrator as mslite
from orchestrator import ConfigError, ModelParallelRunner
from orchestrator._pool_plan import plan_workers
from orchestrator._pool_threads import worker_session_options
from ranks._config_file import load_config
from ranks._cpu_limits import CpuBudget, cgroup_cpu_quota, cpu_budget
from tests._pool_helpers import two_in_two_out_model, worker_threads

CORES = sorted(os.sched_getaffinity(0))


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return two_in_two_out_model(tmp_path_factory.mktemp("plan") / "pair.onnx")


def context_of(workers=0, threads=0, mode=0, core_list=None, **cpu_config) -> mslite.Context:
    context = mslite.Context()
    context.parallel.workers_num = workers
    context.cpu.thread_num = threads
    context.cpu.thread_affinity_mode = mode
    if core_list is not None:
        context.cpu.thread_affinity_core_list = core_list
    if cpu_config:
        context.parallel.config_info = {"cpu_context": cpu_config}
    return context


def plan(context, usable: int):
    """The plan on a machine of ``usable`` cores numbered from 0."""
    config = load_config("", context.parallel.config_info)
    return plan_workers(context, config, CpuBudget(usable, tuple(range(usable)), None))


# -- usable cores --------------------------------------------------------------
def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota_of_this_cgroup_and_its_ancestors(tmp_path):
    self_cgroup = tmp_path / "proc_self_cgroup"
    write(self_cgroup, "0::/jobs/job7\n")
    write(tmp_path / "fs" / "cpu.max", "max 100000\n")
    write(tmp_path / "fs" / "jobs" / "cpu.max", "300000 100000\n")  # a parent's 3 CPUs
    write(tmp_path / "fs" / "jobs" / "job7" / "cpu.max", "150000 100000\n")  # this cgroup: 1.5 CPUs
    assert cgroup_cpu_quota(tmp_path / "fs", self_cgroup) == 1.5
    budget = cpu_budget(tmp_path / "fs", self_cgroup)
    assert budget.quota == 1.5 and budget.usable == 1  # rounded down: a half CPU is throttled, not run
    assert "a cgroup CPU quota of 1.5 CPUs" in budget.describe()


def test_cgroup_v2_without_a_quota_and_on_a_hybrid_host(tmp_path):
    self_cgroup = tmp_path / "cgroup"
    write(self_cgroup, "0::/\n")
    write(tmp_path / "fs" / "cpu.max", "max 100000\n")
    assert cgroup_cpu_quota(tmp_path / "fs", self_cgroup) is None
    write(tmp_path / "hybrid" / "unified" / "cpu.max", "100000 50000\n")
    assert cgroup_cpu_quota(tmp_path / "hybrid", self_cgroup) == 2.0


def test_cgroup_v1_quota_and_a_path_from_another_namespace(tmp_path):
    self_cgroup = tmp_path / "cgroup"
    write(self_cgroup, "4:memory:/x\n3:cpu,cpuacct:/docker/abc\n0::/\n")
    cpu = tmp_path / "fs" / "cpu,cpuacct"
    write(cpu / "cpu.cfs_quota_us", "-1\n")
    write(cpu / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path / "fs", self_cgroup) is None
    write(cpu / "docker" / "abc" / "cpu.cfs_quota_us", "50000\n")
    write(cpu / "docker" / "abc" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path / "fs", self_cgroup) == 0.5
    assert cpu_budget(tmp_path / "fs", self_cgroup).usable == 1  # at least one core
    # Inside a container the host's path is absent under the mount: the mount's own files apply.
    write(tmp_path / "ns" / "cpu" / "cpu.cfs_quota_us", "200000\n")
    write(tmp_path / "ns" / "cpu" / "cpu.cfs_period_us", "100000\n")
    assert cgroup_cpu_quota(tmp_path / "ns", self_cgroup) == 2.0


def test_no_cgroup_files_means_the_affinity_decides(tmp_path):
    budget = cpu_budget(tmp_path / "nothing", tmp_path / "nothing" / "cgroup")
    assert budget == CpuBudget(len(CORES), tuple(CORES), None)


# -- workers and threads -----------------------------------------------------------
@pytest.mark.parametrize("workers, threads, usable, expected", [
    (0, 0, 2, (2, 1)),    # MindSpore Lite's default: threads usable // 2, workers usable // threads
    (0, 0, 8, (2, 4)),
    (0, 0, 32, (4, 8)),   # at most 8 threads by default
    (0, 1, 6, (6, 1)),    # workers_num 0: as many workers as fit
    (0, 4, 2, (1, 4)),    # at least one
    (3, 0, 12, (3, 4)),   # threads: the cores shared out
    (3, 0, 2, (3, 1)),
    (2, 3, 16, (2, 3)),
])
def test_workers_and_threads(workers, threads, usable, expected):
    result = plan(context_of(workers, threads), usable)
    assert (result.workers, result.threads) == expected
    assert result.cores == [[]] * result.workers


def test_workers_num_zero_follows_a_cgroup_quota(pair, monkeypatch):
    import orchestrator._pool_plan as pool_plan

    monkeypatch.setattr(pool_plan, "cpu_budget", lambda: CpuBudget(1, tuple(CORES), 1.0))
    context = mslite.Context()
    context.cpu.thread_num = 1
    with ModelParallelRunner() as runner:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # one worker of one thread fits one core: no warning
            runner.build_from_file(pair, context)
        assert runner.workers_num == 1


def test_more_threads_than_usable_cores_is_a_warning_with_the_numbers(pair):
    usable = cpu_budget().usable
    with ModelParallelRunner() as runner:
        with pytest.warns(RuntimeWarning) as caught:
            runner.build_from_file(pair, context_of(workers=usable + 1, threads=1))
        message = str(caught[0].message)
        assert f"{usable + 1} workers x 1 threads = {usable + 1} threads" in message
        assert f"{usable} usable cores" in message and f"at most {usable}" in message
        assert runner.workers_num == usable + 1  # a warning, not a refusal
    assert plan(context_of(2, 2), 4).warning is None
    assert plan(context_of(2, 3), 4).warning.startswith("2 workers x 3 threads = 6 threads, but this process has 4 usable cores")


# -- cores ---------------------------------------------------------------------------
def test_a_core_list_gives_worker_k_slice_k():
    assert plan(context_of(2, 2, core_list=[3, 2, 1, 0]), 8).cores == [[3, 2], [1, 0]]
    assert plan(context_of(4, 1, core_list=[0, 2, 4, 6]), 8).cores == [[0], [2], [4], [6]]
    # The same cores for two workers (possible from a config file): allowed, and said.
    shared = plan(context_of(2, 1, thread_affinity_core_list="5,5"), 8)
    assert shared.cores == [[5], [5]] and "share cores" in shared.warning


def test_core_list_length_and_cores_are_checked():
    with pytest.raises(ConfigError, match=r"must hold workers_num x thread_num = 2 x 2 = 4 cores .* got 3"):
        plan(context_of(2, 2, core_list=[0, 1, 2]), 8)
    with pytest.raises(ConfigError, match=r"names cores \[9\] this process may not run on"):
        plan(context_of(1, 1, core_list=[9]), 8)
    derived = plan(context_of(0, 2, core_list=[0, 1, 2, 3, 4, 5]), 8)  # workers_num 0: the list decides
    assert derived.workers == 3 and derived.cores == [[0, 1], [2, 3], [4, 5]]
    with pytest.raises(ConfigError, match="not a multiple of thread_num 2"):
        plan(context_of(0, 2, core_list=[0, 1, 2]), 8)


def test_the_config_file_core_list_wins_as_for_a_model():
    assert plan(context_of(1, 1, core_list=[0], thread_affinity_core_list="3"), 8).cores == [[3]]


@pytest.mark.parametrize("mode", [1, 2])
def test_affinity_modes_one_and_two_bind_each_worker_to_its_cores(mode, monkeypatch):
    import orchestrator._pool_plan as pool_plan

    tiers = {1: [4, 5, 6, 7], 2: [0, 1, 2, 3]}  # big cores, middle cores
    monkeypatch.setattr(pool_plan, "cores_for_affinity_mode", lambda m: tiers[m])
    result = plan(context_of(2, 2, mode=mode), 8)
    assert result.cores == [tiers[mode][:2], tiers[mode][2:]]
    result = plan(context_of(3, 2, mode=mode), 8)  # 6 threads on a tier of 4: round-robin, and said
    assert result.cores[2] == tiers[mode][:2] and "share cores" in result.warning


def test_worker_session_options_pin_the_pool_threads_to_the_workers_other_cores(monkeypatch):
    import ranks._session

    monkeypatch.setattr(ranks._session.os, "cpu_count", lambda: 8)  # as on the 8-core machine the plans above take
    options = worker_session_options(mslite.Context(), load_config(), 3, [4, 5, 6])
    # ONNX Runtime pins the pool's 2 threads (ids 1-based); the worker thread itself takes core 4.
    assert options.get_session_config_entry("session.intra_op_thread_affinities") == "6;7"
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.get_session_config_entry("session.inter_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 3


@pytest.mark.skipif(len(CORES) < 2, reason="needs two cores")
@pytest.mark.parametrize("mode", [0, 1, 2, "list"])
def test_each_worker_thread_runs_on_its_cores(pair, mode):
    import numpy as np

    context = context_of(2, 1, core_list=[CORES[1], CORES[0]]) if mode == "list" else context_of(2, 1, mode=mode)
    with ModelParallelRunner() as runner:
        runner.build_from_file(pair, context)
        a, b = np.ones((1, 16), np.float32), np.ones((1, 4), np.int64)
        for _ in range(4):
            runner.predict([a, b])
        threads = sorted(worker_threads(runner), key=lambda t: t.name)
        pinned = [os.sched_getaffinity(t.native_id) for t in threads]
        if mode == "list":
            assert runner.cores == [[CORES[1]], [CORES[0]]] and pinned == [{CORES[1]}, {CORES[0]}]
        elif mode == 0:
            assert runner.cores == [[], []] and pinned == [set(CORES), set(CORES)]
        else:
            assert pinned == [{c[0]} for c in runner.cores] and all(runner.cores)
