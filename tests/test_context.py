import numpy as np
import onnxruntime as ort
import pytest

import orchestrator as mslite
from ranks import ConfigError, ProviderError
from ranks._session import execution_providers, session_options


def test_defaults_target_cpu():
    context = mslite.Context()
    assert context.target == ["cpu"]
    assert context.cpu.thread_num == 0
    assert context.parallel.workers_num == 0


@pytest.mark.parametrize(
    "setter, message",
    [
        (lambda c: setattr(c.cpu, "thread_num", -1), "cpu.thread_num must be an int >= 0, got -1"),
        (lambda c: setattr(c.cpu, "thread_num", 1.5), "cpu.thread_num must be an int >= 0"),
        (lambda c: setattr(c.cpu, "inter_op_parallel_num", -2), "cpu.inter_op_parallel_num"),
        (lambda c: setattr(c.cpu, "thread_affinity_mode", 3), "cpu.thread_affinity_mode must be one of"),
        (lambda c: setattr(c.cpu, "thread_affinity_core_list", [0, 0]), "repeated cores"),
        (lambda c: setattr(c.cpu, "precision_mode", "fast"), "cpu.precision_mode must be one of ['enforce_fp32'"),
        (lambda c: setattr(c, "target", ["tpu"]), "Context.target must be one of ['cpu', 'gpu', 'ascend'], got 'tpu'"),
        (lambda c: setattr(c, "target", []), "Context.target must be a non-empty list"),
        (lambda c: setattr(c.gpu, "provider", "cuda"), "gpu.provider must be one of ['', 'tensorrt']"),
        (lambda c: setattr(c.gpu, "group_size", 0), "gpu.group_size must be an int >= 1, got 0"),
        (lambda c: setattr(c.ascend, "precision_mode", "fp8"), "ascend.precision_mode must be one of"),
        (lambda c: setattr(c.ascend, "provider", "acl"), "ascend.provider must be one of ['', 'ge']"),
        (lambda c: setattr(c.parallel, "workers_num", -1), "parallel.workers_num"),
        (lambda c: setattr(c.parallel, "config_info", {"a": {"b": 1}}), "parallel.config_info must be a dict of dicts of str"),
        (lambda c: setattr(c.cpu, "threads", 2), "cpu has no setting 'threads'"),
    ],
)
def test_invalid_values_fail_where_set(setter, message):
    context = mslite.Context()
    with pytest.raises(ConfigError) as info:
        setter(context)
    assert message in str(info.value)


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
