"""Cross-process weight sharing: one publisher, attachers that run on its pages, and every way an attach can fail."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

import orchestrator as mslite
from orchestrator import ConfigError, ModelError, save_model, write_sample_model
from ranks._session import session_options
from ranks._shared_weights import SharedWeights, make_handle
from tests._shared_weights_helpers import (
    Peer,
    PeerError,
    maps_shared_weights,
    new_shm_entries,
    processes_holding_shared_weights,
    shm_entries,
    wait_gone,
)


def unet_inputs(seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((1, 8, 168, 128)).astype(np.float32), np.array([int(rng.integers(0, 1000))], np.int32)]


def plain_outputs(path, inputs) -> list[np.ndarray]:
    model = mslite.Model()
    model.build_from_file(path, mslite.ModelType.ONNX)
    try:
        return [t.get_data_to_numpy() for t in model.predict(inputs)]
    finally:
        model.close()


def build(path, config_dict) -> mslite.Model:
    model = mslite.Model()
    model.build_from_file(path, mslite.ModelType.ONNX, mslite.Context(), config_dict=config_dict)
    return model


# -- in one process ------------------------------------------------------------
def test_current_pid_works_before_build_and_is_a_str():
    pid = mslite.Model().get_model_info("current_pid")
    assert pid == str(os.getpid())


def test_handle_needs_a_model_that_publishes(sample):
    with pytest.raises(ModelError, match="not built"):
        mslite.Model().get_model_info("shareable_weight_mem_handle")
    model = build(sample("unet"), None)
    with pytest.raises(ModelError, match="does not share its weights.*pids"):
        model.get_model_info("shareable_weight_mem_handle")


def test_publish_and_attach_in_one_process_run_like_a_plain_model(sample):
    path = sample("unet")
    inputs = unet_inputs()
    expected = plain_outputs(path, inputs)
    publisher = build(path, {"pids": "0, 1"})  # the publisher's own process may always attach
    handle = publisher.get_model_info("shareable_weight_mem_handle")
    assert isinstance(handle, str) and 0 < int(handle) < 2**63  # the seed keeps it in a ctypes.c_int64
    by_int = build(path, {"shared_mem_handle": int(handle)})
    by_section = build(path, {"ascend_context": {"shareable_weight_mem_handle": handle}})
    for model in (publisher, by_int, by_section):
        np.testing.assert_allclose(model.predict(inputs)[0].get_data_to_numpy(), expected[0], rtol=0, atol=1e-5)
    shared = by_int._shared_weights
    assert shared.publisher_pid == os.getpid() and not shared.is_publisher
    assert all(not a.flags.writeable for a in shared.arrays.values())  # mapped read-only
    del shared
    for model in (by_int, by_section, publisher):
        model.close()
    assert not maps_shared_weights(os.getpid())  # the last close unmapped the memory: the kernel frees it


def test_malformed_handles_and_pid_lists_are_config_errors(sample):
    path = sample("unet")
    for value in ("abc", "-5", "0", 1.5):
        with pytest.raises(ConfigError):
            build(path, {"shared_mem_handle": value})
    with pytest.raises(ConfigError, match="'x' is not a process id"):
        build(path, {"pids": "12, x"})
    with pytest.raises(ConfigError, match="is empty"):
        build(path, {"ascend_context": {"shareable_weight_pid_list": " "}})
    with pytest.raises(ConfigError, match="both.*not both"):
        build(path, {"ascend_context": {"shareable_weight_pid_list": "1", "shareable_weight_mem_handle": "5"}})


def test_weight_sharing_needs_the_cpu_target(sample):
    context = mslite.Context()
    context.target = ["gpu"]
    with pytest.raises(ConfigError, match=r"CPU here.*\['gpu'\]"):
        mslite.Model().build_from_file(sample("unet"), mslite.ModelType.ONNX, context, config_dict={"pids": "1"})


def test_handles_that_name_nothing_published_say_what_is_wrong(sample, tmp_path):
    path = sample("unet")
    with pytest.raises(ModelError, match="handle 12345 is not a handle: it would name process 0, fd 12345"):
        build(path, {"shared_mem_handle": "12345"})
    dead = _unused_pid()
    with pytest.raises(ModelError, match=f"is stale: no process {dead} is running; the publisher has exited"):
        build(path, {"shared_mem_handle": make_handle(dead, 9)})
    with open(tmp_path / "f.txt", "w") as handle:  # an fd of ours that is an ordinary file
        with pytest.raises(ModelError, match=r"is stale: process \d+ is running, but its fd \d+ is no longer published weights \(it is now '.*f\.txt', reused"):
            build(path, {"shared_mem_handle": make_handle(os.getpid(), handle.fileno())})
    with pytest.raises(ModelError, match=f"process {os.getpid()} is running but holds no fd 1000000"):
        build(path, {"shared_mem_handle": make_handle(os.getpid(), 1_000_000)})


def test_closing_the_publisher_makes_its_handle_stale(sample):
    path = sample("unet")
    publisher = build(path, {"pids": "1"})
    handle = publisher.get_model_info("shareable_weight_mem_handle")
    attached = build(path, {"shared_mem_handle": handle})
    publisher.close()
    with pytest.raises(ModelError, match=f"handle {handle} .* is stale"):
        build(path, {"shared_mem_handle": handle})
    inputs = unet_inputs(3)
    np.testing.assert_allclose(attached.predict(inputs)[0].get_data_to_numpy(), plain_outputs(path, inputs)[0], atol=1e-5)
    attached.close()
    assert not maps_shared_weights(os.getpid())


def test_a_different_model_file_is_refused(sample):
    publisher = build(sample("unet"), {"pids": "1"})
    handle = publisher.get_model_info("shareable_weight_mem_handle")
    try:
        with pytest.raises(ModelError, match=r"is not the model whose weights process \d+ shares.*in the publisher's model but not in this one"):
            build(sample("transformer"), {"shared_mem_handle": handle})
        with pytest.raises(ModelError, match=r"weight '[\w.]+' is float32\[[0-9, ]+\] here, float32\[[0-9, ]+\] in the publisher's"):
            build(sample("unet", channels=16), {"shared_mem_handle": handle})
        with pytest.raises(ModelError, match="same type and shape but other values"):
            build(sample("unet", seed=1), {"shared_mem_handle": handle})
    finally:
        publisher.close()


def test_update_weights_on_an_attached_model_replaces_only_its_own_copy(sample):
    path = sample("unet")
    publisher = build(path, {"pids": "1"})
    attached = build(path, {"shared_mem_handle": publisher.get_model_info("shareable_weight_mem_handle")})
    inputs = unet_inputs(4)
    before = publisher.predict(inputs)[0].get_data_to_numpy()
    weight = attached._shared_weights.arrays["conv_out.bias"]
    attached.update_weights({"conv_out.bias": weight + 1})
    np.testing.assert_allclose(attached.predict(inputs)[0].get_data_to_numpy(), before + 1, atol=1e-5)
    np.testing.assert_array_equal(publisher.predict(inputs)[0].get_data_to_numpy(), before)  # the shared pages are sealed
    attached.close()
    publisher.close()


def _conv_bn_and_transposed_weight_model(path: Path) -> Path:
    """Conv + BatchNormalization (ConvBNFusion would copy) and MatMul(Transpose(W)) (ConstantFolding would copy)."""
    rng = np.random.default_rng(0)
    c = 64  # conv.w: 6.9 KB, above the 4 KiB the check looks at
    inits = [
        numpy_helper.from_array(rng.standard_normal((c, 3, 3, 3)).astype(np.float32), "conv.w"),
        *(numpy_helper.from_array(v.astype(np.float32), n) for n, v in
          (("bn.s", np.ones(c)), ("bn.b", np.zeros(c)), ("bn.m", np.zeros(c)), ("bn.v", np.ones(c)))),
        numpy_helper.from_array(rng.standard_normal((256, c)).astype(np.float32), "fc.w"),
    ]
    nodes = [
        helper.make_node("Conv", ["x", "conv.w"], ["c"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c", "bn.s", "bn.b", "bn.m", "bn.v"], ["b"]),
        helper.make_node("GlobalAveragePool", ["b"], ["p"]),
        helper.make_node("Flatten", ["p"], ["f"]),
        helper.make_node("Transpose", ["fc.w"], ["fc.t"], perm=[1, 0]),
        helper.make_node("MatMul", ["f", "fc.t"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 16, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save_model(model, path)
    return path


def _weights_lost_to_optimization(path: Path, shared: SharedWeights | None) -> list[str]:
    """Weights of >= 4 KiB that ONNX Runtime's optimizers replaced (so copied) instead of running on in place."""
    big = [i.name for i in onnx.load(str(path)).graph.initializer if len(i.raw_data) >= 4096]
    with tempfile.TemporaryDirectory() as tmp:
        options = session_options(mslite.Context())
        options.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        if shared is None:
            ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        else:
            for name, value in shared.ort_values.items():
                options.add_initializer(name, value)
            shared.new_session(str(path), options, ["CPUExecutionProvider"])
        kept = {i.name for i in onnx.load(options.optimized_model_filepath, load_external_data=False).graph.initializer}
    return [name for name in big if name not in kept]


@pytest.mark.parametrize("name", ["unet", "transformer", "mlp", "conv_bn_transposed"])
def test_shared_sessions_run_every_weight_in_place(sample, tmp_path, name):
    """The optimizers that would copy shared weights into private tensors are off for these graphs."""
    if name == "conv_bn_transposed":
        path = _conv_bn_and_transposed_weight_model(tmp_path / "m.onnx")
        # Without the shared-weights settings, ONNX Runtime does rewrite these weights: the check can see it.
        assert set(_weights_lost_to_optimization(path, None)) >= {"conv.w", "fc.w"}
    else:
        path = sample(name, **({"channels": 16, "bottleneck": 256} if name == "unet" else {}))
    shared = SharedWeights.publish(onnx.load(str(path)), path, [1])
    try:
        assert _weights_lost_to_optimization(path, shared) == []
    finally:
        shared.close()


def _unused_pid() -> int:
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 7
    while os.path.exists(f"/proc/{pid}"):
        pid -= 1
    return pid


# -- across processes ---------------------------------------------------------
@pytest.fixture
def peers():
    """Start Peers with peers(name, ...); every one is stopped at the end, and nothing may be left behind."""
    started: list[Peer] = []
    before = shm_entries()

    def start(name: str, threads: int = 1) -> Peer:
        peer = Peer(name, threads)
        started.append(peer)
        return peer

    yield start
    for peer in started:
        peer.stop()
    pids = [p.pid for p in started]
    assert wait_gone(pids) == [], "peer processes still running"
    assert not set(processes_holding_shared_weights()) & set(pids)
    assert new_shm_entries(before, pids) == []


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_publisher_and_two_attachers_match_a_plain_model_and_outlive_the_publisher(tmp_path, peers):
    path = write_sample_model("unet", tmp_path / "unet.onnx")  # the seed's model: ~4 MB of weights
    first, second = peers("attacher-1"), peers("attacher-2")
    publisher = peers("publisher")
    publisher.call("build", str(path), {"pids": f"{first.pid}, {second.pid}"})
    handle = publisher.call("handle")
    first.call("build", str(path), {"shared_mem_handle": int(handle)})
    second.call("build", str(path), {"ascend_context": {"shareable_weight_mem_handle": handle}})

    for seed, peer in enumerate((publisher, first, second)):
        inputs = unet_inputs(seed)
        np.testing.assert_allclose(peer.call("predict", inputs)[0], plain_outputs(path, inputs)[0], rtol=0, atol=1e-5)

    # The publisher closes its model: attachers keep running on the pages; the handle no longer attaches.
    publisher.call("close")
    assert not publisher.call("maps_shared_weights")
    inputs = unet_inputs(7)
    np.testing.assert_allclose(first.call("predict", inputs)[0], plain_outputs(path, inputs)[0], rtol=0, atol=1e-5)
    second.call("close")
    with pytest.raises(PeerError, match=f"is stale: process {publisher.pid} is running but holds no fd"):
        second.call("build", str(path), {"shared_mem_handle": handle})
    # ... and once the publisher has exited, the handle is stale for that reason.
    publisher.stop()
    with pytest.raises(PeerError, match=f"is stale: no process {publisher.pid} is running; the publisher has exited"):
        second.call("build", str(path), {"shared_mem_handle": handle})
    np.testing.assert_allclose(first.call("predict", inputs)[0], plain_outputs(path, inputs)[0], rtol=0, atol=1e-5)
    # The last user closes: no process holds the memory any more, so the kernel has freed it.
    first.call("close")
    assert not first.call("maps_shared_weights") and not second.call("maps_shared_weights")


@pytest.mark.multiprocess
def test_a_process_not_in_the_whitelist_is_refused(sample, peers):
    path = sample("unet")
    listed, stranger = peers("listed"), peers("stranger")
    publisher = peers("publisher")
    publisher.call("build", str(path), {"pids": f"0, {listed.pid}"})
    handle = publisher.call("handle")
    listed.call("build", str(path), {"shared_mem_handle": handle})
    with pytest.raises(PeerError, match=rf"process {stranger.pid} may not attach .* allows only processes \[0, {listed.pid}\]") as info:
        stranger.call("build", str(path), {"shared_mem_handle": handle})
    assert info.value.kind == "ModelError"


@pytest.mark.multiprocess
@pytest.mark.timeout(300)
def test_an_attached_process_adds_far_less_memory_than_the_weights(tmp_path, peers, sample):
    # One 1024x4096 and one 4096x1024 MatMul weight (32 MiB) at batch 1: the weights dominate, activations are tiny.
    path = write_sample_model("mlp", tmp_path / "mlp.onnx", width=1024, hidden=4096, layers=1)
    weight_bytes = sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer)
    assert weight_bytes >= 32 * 2**20
    small = sample("mlp")
    attacher, plain = peers("attacher"), peers("plain")
    publisher = peers("publisher")
    for peer in (attacher, plain):
        peer.call("warm_up", str(small))
    publisher.call("build", str(path), {"pids": str(attacher.pid)})
    attacher.call("build", str(path), {"shared_mem_handle": publisher.call("handle")})
    plain.call("build", str(path), None)
    x = np.random.default_rng(0).standard_normal((1, 1024)).astype(np.float32)
    a, b = attacher.call("predict", [x])[0], plain.call("predict", [x])[0]
    np.testing.assert_allclose(a, b, rtol=0, atol=1e-4)
    shared_extra, plain_extra = attacher.call("extra_uss"), plain.call("extra_uss")
    print(f"\nweights {weight_bytes / 2**20:.1f} MiB; extra USS: attached {shared_extra / 2**20:.1f} MiB, "
          f"plain {plain_extra / 2**20:.1f} MiB")
    assert shared_extra < 0.25 * weight_bytes
    assert plain_extra > 0.75 * weight_bytes  # the measurement does see weights when they are private
