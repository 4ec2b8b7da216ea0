"""Context (and config file) -> ONNX Runtime session options and execution providers.

==========  ==============================================================
target      ONNX Runtime
==========  ==============================================================
cpu         CPUExecutionProvider; thread_num -> intra_op_num_threads,
            inter_op_parallel_num > 1 -> ORT_PARALLEL with that many inter-op
            threads, affinity -> session.intra_op_thread_affinities
gpu         CUDAExecutionProvider {device_id} ("tensorrt": TensorrtExecutionProvider
            {device_id, trt_fp16_enable}), CPU fallback after it
ascend      CANNExecutionProvider {device_id, precision_mode}, CPU fallback after it
==========  ==============================================================
"""

from __future__ import annotations

import os

import onnxruntime as ort

from ._config_file import RankConfig
from ._context import Context
from ._env import parse_bool
from ._errors import ConfigError, ProviderError

# MindSpore Lite's Ascend precision modes -> the CANN provider's names.
_CANN_PRECISION = {
    "enforce_fp32": "force_fp32",
    "preferred_fp32": "allow_fp32_to_fp16",
    "enforce_fp16": "force_fp16",
    "enforce_origin": "must_keep_origin_dtype",
    "preferred_optimal": "allow_mix_precision",
}


def usable_cores() -> list[int]:
    """Cores this process may run on, in order."""
    return sorted(os.sched_getaffinity(0))


def _max_freq(core: int) -> int:
    try:
        with open(f"/sys/devices/system/cpu/cpu{core}/cpufreq/cpuinfo_max_freq") as handle:
            return int(handle.read().strip())
    except (OSError, ValueError):
        return 0


def cores_for_affinity_mode(mode: int) -> list[int]:
    """Mode 1: the fastest tier of cores; mode 2: the next tier (all cores when they are all alike)."""
    cores = usable_cores()
    if mode == 0:
        return cores
    tiers = sorted({_max_freq(c) for c in cores}, reverse=True)
    tier = tiers[0] if mode == 1 or len(tiers) == 1 else tiers[1]
    return [c for c in cores if _max_freq(c) == tier]


def session_options(context: Context, config: RankConfig | None = None, *, allow_spinning: bool | None = None) -> ort.SessionOptions:
    """Session options for ``context``; the ini's [cpu_context] overrides the Context's cpu fields."""
    cpu = context.cpu
    section = config.sections.get("cpu_context", {}) if config else {}
    threads = _int_setting(config, "cpu_context", "thread_num", cpu.thread_num)
    inter_op = _int_setting(config, "cpu_context", "inter_op_parallel_num", cpu.inter_op_parallel_num)
    mode = _int_setting(config, "cpu_context", "thread_affinity_mode", cpu.thread_affinity_mode)
    core_list = cpu.thread_affinity_core_list
    if "thread_affinity_core_list" in section:
        text = section["thread_affinity_core_list"]
        try:
            core_list = [int(c) for c in text.split(",") if c.strip()]
        except ValueError:
            raise ConfigError(f"{config.source}: [cpu_context] thread_affinity_core_list must be core numbers "
                              f"separated by commas, got {text!r}") from None
    if "allow_spinning" in section:
        allow_spinning = parse_bool(section["allow_spinning"])  # a valid word: checked when the file was read

    options = ort.SessionOptions()
    # Fatal only: the engine's errors reach the user as our exceptions; its own
    # coloured log line would repeat each one on stderr.
    options.log_severity_level = 4
    options.intra_op_num_threads = threads
    if inter_op > 1:
        options.execution_mode = ort.ExecutionMode.ORT_PARALLEL
        options.inter_op_num_threads = inter_op
    if allow_spinning is not None:
        options.add_session_config_entry("session.intra_op.allow_spinning", "1" if allow_spinning else "0")

    machine = os.cpu_count() or 1
    if any(core >= machine for core in core_list):
        where = (f"{config.source}: [cpu_context] thread_affinity_core_list" if "thread_affinity_core_list" in section
                 else "cpu.thread_affinity_core_list")
        raise ConfigError(f"{where} names core(s) {[c for c in core_list if c >= machine]}, but this machine has "
                          f"{machine} (0 to {machine - 1})")
    cores = core_list or (cores_for_affinity_mode(mode) if mode else [])
    if cores and threads > 1:
        # ONNX Runtime pins the pool's threads (thread_num - 1 of them; the
        # calling thread is the application's). Ids are 1-based logical processors.
        pool = [cores[(i + 1) % len(cores)] + 1 for i in range(threads - 1)]
        options.add_session_config_entry("session.intra_op_thread_affinities", ";".join(map(str, pool)))
    return options


def _int_setting(config: RankConfig | None, section: str, key: str, default: int) -> int:
    """An int from the config file's ``[section] key``, else ``default``; ConfigError (a RuntimeError too) when it is not one."""
    text = config.sections.get(section, {}).get(key) if config else None
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise ConfigError(f"{config.source}: [{section}] {key} must be an integer, got {text!r}") from None


def execution_providers(context: Context, config: RankConfig | None = None) -> list:
    """The provider list for ``context.target``, CPU last; a missing provider is a ProviderError."""
    available = ort.get_available_providers()
    providers: list = []
    for target in context.target:
        if target == "gpu":
            gpu = context.gpu
            section = config.sections.get("gpu_context", {}) if config else {}
            device_id = _int_setting(config, "gpu_context", "device_id", gpu.device_id)
            provider = section.get("provider", gpu.provider)
            fp16 = section.get("precision_mode", gpu.precision_mode) == "preferred_fp16"
            if provider == "tensorrt":
                providers.append(_require("TensorrtExecutionProvider", "gpu (provider tensorrt)", available,
                                          {"device_id": device_id, "trt_fp16_enable": fp16}))
            else:
                providers.append(_require("CUDAExecutionProvider", "gpu", available, {"device_id": device_id}))
        elif target == "ascend":
            ascend = context.ascend
            section = config.sections.get("ascend_context", {}) if config else {}
            device_id = _int_setting(config, "ascend_context", "device_id", ascend.device_id)
            precision = section.get("precision_mode", ascend.precision_mode)
            if precision not in _CANN_PRECISION:
                raise ConfigError(f"[ascend_context] precision_mode must be one of {list(_CANN_PRECISION)}, got {precision!r}")
            providers.append(_require("CANNExecutionProvider", "ascend", available,
                                      {"device_id": device_id, "precision_mode": _CANN_PRECISION[precision]}))
    providers.append("CPUExecutionProvider")
    return providers


def _require(name: str, target: str, available: list[str], options: dict):
    if name not in available:
        raise ProviderError(
            f"target {target!r} needs ONNX Runtime's {name}, which this onnxruntime does not have; "
            f"available providers: {available}. Install an onnxruntime build with it "
            f"(e.g. onnxruntime-gpu for CUDA/TensorRT, onnxruntime-cann for Ascend) or run on the CPU: context.target = ['cpu'] (--target cpu on orchestrate's commands)."
        )
    return (name, options)
