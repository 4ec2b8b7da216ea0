import sys
import textwrap

import numpy as np
import onnxruntime as ort
import pytest

import orchestrator as mslite
from conftest import run_command
from ranks import ConfigError, ConfigTypeError, ProviderError
from ranks._session import execution_providers, session_options


def test_defaults_target_cpu():
    context = mslite.Context()
    assert context.target == ["cpu"]
    assert context.cpu.thread_num == 0
    assert context.parallel.workers_num == 0


@pytest.mark.parametrize(
    "setter, message, builtin",
    [
        (lambda c: setattr(c.cpu, "thread_num", -1), "cpu.thread_num must be an int >= 0, got -1", ValueError),
        (lambda c: setattr(c.cpu, "thread_num", 1.5), "cpu.thread_num must be an int >= 0", TypeError),
        (lambda c: setattr(c.cpu, "thread_num", "2"), "cpu.thread_num must be an int >= 0", TypeError),
        (lambda c: setattr(c.cpu, "inter_op_parallel_num", -2), "cpu.inter_op_parallel_num", ValueError),
        (lambda c: setattr(c.cpu, "thread_affinity_mode", 3), "cpu.thread_affinity_mode must be one of", ValueError),
        (lambda c: setattr(c.cpu, "thread_affinity_mode", "1"), "cpu.thread_affinity_mode must be one of", TypeError),
        (lambda c: setattr(c.cpu, "thread_affinity_core_list", [0, 0]), "repeated cores", ValueError),
        (lambda c: setattr(c.cpu, "thread_affinity_core_list", "0,1"), "must be a list of core numbers", TypeError),
        (lambda c: setattr(c.cpu, "thread_affinity_core_list", [0, "1"]), "cpu.thread_affinity_core_list[]", TypeError),
        (lambda c: setattr(c.cpu, "precision_mode", "fast"), "cpu.precision_mode must be one of ['enforce_fp32'", ValueError),
        (lambda c: setattr(c.cpu, "precision_mode", 16), "cpu.precision_mode must be one of", TypeError),
        (lambda c: setattr(c, "target", ["tpu"]), "Context.target must be one of ['cpu', 'gpu', 'ascend'], got 'tpu'", ValueError),
        (lambda c: setattr(c, "target", []), "Context.target must be a non-empty list", ValueError),
        (lambda c: setattr(c, "target", 3), "Context.target must be a non-empty list", TypeError),
        (lambda c: setattr(c, "target", [3]), "Context.target must be one of", TypeError),
        (lambda c: setattr(c.gpu, "provider", "cuda"), "gpu.provider must be one of ['', 'tensorrt']", ValueError),
        (lambda c: setattr(c.gpu, "device_id", -1), "gpu.device_id must be an int >= 0, got -1", ValueError),
        (lambda c: setattr(c.ascend, "precision_mode", "fp8"), "ascend.precision_mode must be one of", ValueError),
        (lambda c: setattr(c.ascend, "provider", "acl"), "ascend.provider must be one of ['', 'ge']", ValueError),
        (lambda c: setattr(c.ascend, "rank_id", "0"), "ascend.rank_id must be an int >= 0", TypeError),
        (lambda c: setattr(c.parallel, "workers_num", -1), "parallel.workers_num", ValueError),
        (lambda c: setattr(c.parallel, "config_info", {"a": {"b": 1}}), "parallel.config_info must be a dict of dicts of str", TypeError),
        (lambda c: setattr(c.parallel, "config_path", None), "parallel.config_path must be a str", TypeError),
        (lambda c: setattr(c.cpu, "threads", 2), "cpu has no setting 'threads'", ValueError),
    ],
)
def test_invalid_values_fail_where_set(setter, message, builtin):
    context = mslite.Context()
    with pytest.raises(ConfigError) as info:
        setter(context)
    assert message in str(info.value)
    # What MindSpore Lite raises: TypeError for the wrong type, ValueError for a bad value.
    assert isinstance(info.value, builtin)
    assert isinstance(info.value, ConfigTypeError) == (builtin is TypeError)


def test_str_is_mindspore_lites():
    context = mslite.Context()
    assert str(context) == "target: ['cpu']."
    context.cpu.precision_mode = "enforce_fp32"
    context.cpu.thread_num = 2
    context.cpu.inter_op_parallel_num = 2
    context.cpu.thread_affinity_mode = 1
    context.cpu.thread_affinity_core_list = [0, 1]
    assert str(context.cpu) == (
        "device_type: DeviceType.kCPU,\nprecision_mode: enforce_fp32,\nthread_num: 2,\ninter_op_parallel_num: 2,\n"
        "thread_affinity_mode: 1,\nthread_affinity_core_list: [0, 1]."
    )
    context.gpu.precision_mode = "preferred_fp16"
    context.gpu.device_id = 2
    assert str(context.gpu) == (
        "device_type: DeviceType.kGPU,\nprecision_mode: preferred_fp16,\ndevice_id: 2,\nrank_id: 0,\ngroup_size: 1."
    )
    context.ascend.precision_mode = "enforce_fp32"
    context.ascend.device_id = 2
    context.ascend.provider = "ge"
    context.ascend.rank_id = 0
    assert str(context.ascend) == "device_type: DeviceType.kAscend,\nprecision_mode: enforce_fp32,\ndevice_id: 2.provider: ge.rank_id: 0."
    context.parallel.workers_num = 4
    context.parallel.config_info = {"model_file": {"mindir_path": "/home/user/model_graph.mindir"}}
    context.parallel.config_path = "/home/user/config.txt"
    assert str(context.parallel) == (
        "workers num: 4,\nconfig info: model_file: mindir_path /home/user/model_graph.mindir,\nconfig path: /home/user/config.txt."
    )
    assert "thread_num=2" in repr(context) and "rank_id=0, group_size=1" in repr(context)


def test_gpu_rank_and_group_size_are_read_only_and_come_from_the_launcher(monkeypatch):
    context = mslite.Context()
    assert (context.gpu.rank_id, context.gpu.group_size) == (0, 1)  # alone
    for name in ("rank_id", "group_size"):
        with pytest.raises(AttributeError, match=f"gpu.{name} is read-only: .* comes from the launcher"):
            setattr(context.gpu, name, 1)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")  # torchrun-style
    assert (context.gpu.rank_id, context.gpu.group_size) == (2, 4)
    context.gpu.device_id = context.gpu.rank_id  # seed 003
    assert context.gpu.device_id == 2
    context.ascend.rank_id = 3  # the ascend one stays settable, as in MindSpore Lite
    assert context.ascend.rank_id == 3


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_gpu_rank_and_group_size_under_mpirun(tmp_path):
    import os

    from launchers import find_mpirun

    script = tmp_path / "gpu_rank.py"
    script.write_text(textwrap.dedent("""
        import orchestrator as mslite
        context = mslite.Context()
        context.target = ["gpu"]
        context.gpu.device_id = context.gpu.rank_id   # seed 003's line
        print(f"rank_id {context.gpu.rank_id} group_size {context.gpu.group_size} device_id {context.gpu.device_id}", flush=True)
    """))
    root = ["--allow-run-as-root"] if os.geteuid() == 0 else []
    result = run_command([find_mpirun(), "-n", "2", *root, "--oversubscribe", sys.executable, str(script)], timeout=100)
    assert result.returncode == 0, result.stdout + result.stderr
    lines = sorted(line for line in result.stdout.splitlines() if line.startswith("rank_id"))
    assert lines == ["rank_id 0 group_size 2 device_id 0", "rank_id 1 group_size 2 device_id 1"], result.stdout


def test_target_is_case_insensitive_and_deduplicated():
    context = mslite.Context()
    context.target = ["GPU", "cpu", "gpu"]
    assert context.target == ["gpu", "cpu"]


def test_cpu_settings_map_to_session_options():
    context = mslite.Context()
    context.cpu.thread_num = 2
    context.cpu.inter_op_parallel_num = 2
    context.cpu.thread_affinity_core_list = [1, 0]
    options = session_options(context)
    assert options.intra_op_num_threads == 2
    assert options.inter_op_num_threads == 2
    assert options.execution_mode == ort.ExecutionMode.ORT_PARALLEL
    # One pool thread besides the caller, pinned to core 0 (ids are 1-based).
    assert options.get_session_config_entry("session.intra_op_thread_affinities") == "1"


def test_cores_the_machine_does_not_have_are_refused_when_the_session_is_made(tmp_path):
    import os

    from ranks import load_config

    beyond = os.cpu_count()
    context = mslite.Context()
    context.cpu.thread_affinity_core_list = [0, beyond]
    with pytest.raises(mslite.ConfigError, match=rf"cpu.thread_affinity_core_list names core\(s\) \[{beyond}\], "
                                                 rf"but this machine has {beyond} \(0 to {beyond - 1}\)"):
        session_options(context)
    ini = tmp_path / "config_file.ini"
    ini.write_text(f"[cpu_context]\nthread_num=2\nthread_affinity_core_list={beyond + 97},0\n")
    with pytest.raises(mslite.ConfigError, match=rf"{ini}: \[cpu_context\] thread_affinity_core_list names "
                                                 rf"core\(s\) \[{beyond + 97}\]"):
        session_options(mslite.Context(), load_config(ini))


@pytest.mark.parametrize(
    "target, provider",
    [("gpu", "CUDAExecutionProvider"), ("ascend", "CANNExecutionProvider")],
)
def test_missing_provider_names_it_and_lists_available(target, provider):
    if provider in ort.get_available_providers():
        pytest.skip(f"{provider} is installed here")
    context = mslite.Context()
    context.target = [target]
    with pytest.raises(ProviderError) as info:
        execution_providers(context)
    assert provider in str(info.value)
    assert "CPUExecutionProvider" in str(info.value)  # the list of what is available


def test_gpu_tensorrt_provider_requested():
    context = mslite.Context()
    context.target = ["gpu"]
    context.gpu.provider = "tensorrt"
    context.gpu.device_id = 1
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        assert execution_providers(context)[0] == ("TensorrtExecutionProvider", {"device_id": 1, "trt_fp16_enable": False})
    else:
        with pytest.raises(ProviderError, match="TensorrtExecutionProvider"):
            execution_providers(context)


def test_gpu_target_fails_at_build_time(sample):
    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("CUDA is installed here")
    context = mslite.Context()
    context.target = ["gpu"]
    model = mslite.Model()
    with pytest.raises(ProviderError, match="CUDAExecutionProvider"):
        model.build_from_file(sample("add"), mslite.ModelType.ONNX, context)
    with pytest.raises(mslite.ModelError, match="not built"):
        model.predict([np.ones((2, 2), np.float32)] * 2)
