"""The batch-split master with real spawned workers: results, splits, broadcast inputs, per-device models, threads."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest

from orchestrator import ConfigError, InputError, ModelNotFoundError, ParallelPredictor, WorkerError
from orchestrator._parallel_predictor import plan_cores, plan_slices
from tests._batch_split_helpers import (
    one_thread,
    process_alive,
    our_segments,
    reference,
    wait_until,
    worker_pids,
    write_fixed_batch,
    write_timestep_model,
)

pytestmark = pytest.mark.multiprocess


_shared: list[ParallelPredictor] = []


@pytest.fixture
def clean():
    """Every test leaves no worker process and no segment of ours behind (but the module's shared predictor's)."""
    yield
    gc.collect()
    keep_pids = {pid for p in _shared if not p.closed for pid in p.pids}
    assert wait_until(lambda: worker_pids() <= keep_pids, 10), "worker processes left behind"
    keep = {name for p in _shared if not p.closed for name in p.segment_names}
    assert set(our_segments()) <= keep


@pytest.fixture(scope="module")
def mlp_predictor(sample):
    with ParallelPredictor(sample("mlp"), device_ids=[0, 1], context=one_thread()) as predictor:
        _shared.append(predictor)
        yield predictor
    _shared.remove(predictor)
    assert our_segments() == []


# -- planning (no processes) ------------------------------------------------------
def test_plan_slices_uneven_and_small_batches():
    assert plan_slices(5, [None, None]) == [3, 2]
    assert plan_slices(4, [None, None]) == [2, 2]
    assert plan_slices(1, [None, None]) == [1, 0]
    assert plan_slices(7, [None, None, None]) == [3, 2, 2]
    assert plan_slices(2, [None, None, None]) == [1, 1, 0]


def test_plan_slices_fixed_batches():
    assert plan_slices(2, [1, 1]) == [1, 1]
    assert plan_slices(1, [1, 1]) == [1, 0]
    assert plan_slices(6, [4, 2]) == [4, 2]
    with pytest.raises(ValueError, match=r"batch sizes that fit are \[1, 2\]"):
        plan_slices(3, [1, 1])
    assert plan_slices(5, [2, None]) == [2, 3]
    with pytest.raises(ValueError, match="at least 2"):
        plan_slices(1, [2, None])


def test_plan_cores_disjoint_then_shared_with_a_warning():
    assert plan_cores(2, 1, [0, 1]) == ([[0], [1]], 1, None)
    assert plan_cores(2, 0, [0, 1, 2, 3]) == ([[0, 1], [2, 3]], 2, None)
    cores, threads, warning = plan_cores(3, 0, [0, 1])
    assert (cores, threads) == ([[0], [1], [0]], 1)
    assert "3 workers x 1 threads need 3 cores, but only 2" in warning
    cores, threads, warning = plan_cores(2, 2, [5])
    assert cores == [[5], [5]] and threads == 2 and "share cores" in warning


def test_wire_protocol_checks_version_and_kind():
    import json
    import socket

    from orchestrator import _protocol as proto

    frames = proto.encode(proto.PREDICT, 7, slot="orch_pp1_0_1_ab", inputs=[proto.TensorSpec("x", "<f4", (2, 3), 0, 24)])
    msg = proto.decode(frames, "worker for device 0")
    assert msg.kind == "PREDICT" and msg.id == 7 and msg["v"] == proto.VERSION and msg["slot"] == "orch_pp1_0_1_ab"
    assert msg["inputs"] == [proto.TensorSpec("x", "<f4", (2, 3), 0, 24)]  # TensorSpecs survive the JSON header
    with pytest.raises(ValueError, match="unknown message kind 'HELLO'"):
        proto.encode("HELLO")
    old = [b"REPLY", json.dumps({"v": 99, "kind": "REPLY", "id": 1}).encode()]
    with pytest.raises(WorkerError, match="worker for device 1 speaks worker protocol version 99, this side speaks 2"):
        proto.decode(old, "worker for device 1")
    with pytest.raises(WorkerError, match="not a message of the worker protocol"):
        proto.decode([b"REPLY", b"\x80pickle"], "worker for device 1")
    assert {"BUILD_FINISH", "PREDICT", "REPLY", "ERROR", "EXIT"} <= set(proto.KINDS)
    # the stream framing carries the same frames, arrays and errors included
    a, b = socket.socketpair()
    ours, theirs = proto.StreamChannel(a), proto.StreamChannel(b)
    try:
        x = np.arange(6, dtype=np.float32).reshape(2, 3)
        ours.send(proto.encode(proto.REPLY, 3, status=proto.OK, arrays={"y": x}))
        got = proto.decode(theirs.recv())
        assert got.status == "ok" and np.array_equal(got.arrays()["y"], x)
        try:
            raise InputError("bad rows")
        except InputError as exc:
            ours.send(proto.error_frames(3, exc, "worker for device 0"))
        got = proto.decode(theirs.recv())
        assert got.kind == proto.ERROR and got.status == proto.FAILED
        assert {"type", "message", "traceback", "who", "host", "pid", "where"} <= set(got["error"])
        error = proto.unpack_error(got)
        assert type(error) is InputError and "[worker for device 0 on host" in str(error)
        ours.close()
        with pytest.raises(EOFError):
            theirs.recv()
    finally:
        ours.close()
        theirs.close()


# -- results equal one device ----------------------------------------------------
def test_outputs_equal_one_process_for_any_batch(sample, mlp_predictor, clean):
    rng = np.random.default_rng(1)
    assert mlp_predictor.cores == [[0], [1]] or len({tuple(c) for c in mlp_predictor.cores}) == 2
    for batch in (1, 2, 5, 16, 33):
        x = rng.standard_normal((batch, 64), dtype=np.float32)
        out = mlp_predictor.predict({"x": x})
        assert [t.name for t in out] == ["y"]
        np.testing.assert_allclose(out[0].get_data_to_numpy(), reference(sample("mlp"), [x])[0], rtol=0, atol=1e-5)
    assert mlp_predictor.split_sizes(5) == [3, 2]
    assert mlp_predictor.split_sizes(1) == [1, 0]


def test_repeated_requests_reuse_segments_and_outputs_stay_valid(sample, mlp_predictor, clean):
    rng = np.random.default_rng(2)
    xs = [rng.standard_normal((8, 64), dtype=np.float32) for _ in range(8)]
    outs = [mlp_predictor.predict([x])[0].get_data_to_numpy() for x in xs]  # all held at once
    segments = set(our_segments())
    for x, out in zip(xs, outs):
        np.testing.assert_allclose(out, reference(sample("mlp"), [x])[0], rtol=0, atol=1e-5)
    del outs
    for x in xs:
        mlp_predictor.predict([x])
    # the slots and the pool of output blocks are reused, not made afresh per request
    assert set(our_segments()) == set(mlp_predictor.segment_names)
    assert len(set(our_segments()) - segments) <= 1
    assert len(mlp_predictor.segment_names) <= 2 + 4


def test_uneven_split_over_three_workers_warns_when_cores_are_shared(sample, clean):
    context = one_thread()
    context.cpu.thread_affinity_core_list = [sorted(__import__("os").sched_getaffinity(0))[0]]
    with pytest.warns(RuntimeWarning, match="share cores"):
        predictor = ParallelPredictor(sample("mlp"), device_ids=[0, 1, 2], context=context)
    with predictor:
        assert predictor.split_sizes(5) == [2, 2, 1]
        assert len({tuple(c) for c in predictor.cores}) == 1
        x = np.random.default_rng(3).standard_normal((5, 64), dtype=np.float32)
        np.testing.assert_allclose(predictor.predict([x])[0].get_data_to_numpy(), reference(sample("mlp"), [x])[0],
                                   rtol=0, atol=1e-5)


def test_broadcast_input_is_sent_whole_to_every_worker(tmp_path, clean):
    path = write_timestep_model(tmp_path / "timestep.onnx")
    x = np.arange(5 * 8, dtype=np.float32).reshape(5, 8)
    t = np.array(0.5, dtype=np.float32)
    with ParallelPredictor(path, device_ids=[0, 1], context=one_thread(), broadcast_inputs=["t"]) as predictor:
        out = predictor.predict({"x": x, "t": t})[0].get_data_to_numpy()
        np.testing.assert_allclose(out, x * 0.5 + 0.5, rtol=0, atol=1e-6)
        np.testing.assert_allclose(out, reference(path, [x, t])[0], rtol=0, atol=1e-6)
    with ParallelPredictor(path, device_ids=[0, 1], context=one_thread()) as predictor:
        with pytest.raises(InputError, match="scalar.*broadcast_inputs"):
            predictor.predict({"x": x, "t": t})
    with pytest.raises(ConfigError, match=r"broadcast_inputs names \['tt'\].*inputs are \['x', 't'\]"):
        ParallelPredictor(path, device_ids=[0, 1], context=one_thread(), broadcast_inputs=["tt"])


def test_per_device_fixed_batch_models(sample, tmp_path, clean):
    paths = [write_fixed_batch(sample("mlp"), tmp_path / f"mlp_b1_{i}.onnx", 1) for i in range(2)]
    rng = np.random.default_rng(4)
    with ParallelPredictor(model_paths=paths, device_ids=[0, 1], context=one_thread()) as predictor:
        for batch in (1, 2):
            x = rng.standard_normal((batch, 64), dtype=np.float32)
            np.testing.assert_allclose(predictor.predict([x])[0].get_data_to_numpy(),
                                       reference(sample("mlp"), [x])[0], rtol=0, atol=1e-5)
        with pytest.raises(InputError) as info:
            predictor.predict([rng.standard_normal((3, 64), dtype=np.float32)])
        text = str(info.value)
        assert "a batch of 3 cannot be split over devices [0, 1]" in text
        assert "fixed batch 1" in text and "batch sizes that fit are [1, 2]" in text
        # a refused batch leaves the predictor working
        x = rng.standard_normal((2, 64), dtype=np.float32)
        np.testing.assert_allclose(predictor.predict([x])[0].get_data_to_numpy(), reference(sample("mlp"), [x])[0],
                                   rtol=0, atol=1e-5)


def test_bad_arguments_are_refused_before_any_process_starts(sample, tmp_path, clean):
    with pytest.raises(ConfigError, match="repeated"):
        ParallelPredictor(sample("mlp"), device_ids=[0, 0])
    with pytest.raises(ConfigError, match="model_paths has 1 files for 2 devices"):
        ParallelPredictor(model_paths=[sample("mlp")], device_ids=[0, 1])
    with pytest.raises(ConfigError, match="either model_path"):
        ParallelPredictor(device_ids=[0, 1])
    with pytest.raises(ModelNotFoundError, match="missing.onnx does not exist"):
        ParallelPredictor(tmp_path / "missing.onnx", device_ids=[0, 1])


def test_bad_inputs_name_the_problem(mlp_predictor, clean):
    with pytest.raises(InputError, match="dtype float64, the model expects float32"):
        mlp_predictor.predict([np.ones((2, 64))])
    with pytest.raises(InputError, match=r"missing: \['x'\]"):
        mlp_predictor.predict({"z": np.ones((2, 64), np.float32)})
    with pytest.raises(InputError, match="empty"):
        mlp_predictor.predict([np.ones((0, 64), np.float32)])
    # input errors found by the model inside a worker come back with the worker's device
    with pytest.raises(InputError, match=r"input 'x': shape \[2, 63\] does not match \[\?, 64\]"):
        mlp_predictor.predict([np.ones((2, 63), np.float32)])
    x = np.ones((2, 64), np.float32)
    assert mlp_predictor.predict([x])[0].shape == [2, 64]


def test_concurrent_callers_get_their_own_results(sample, mlp_predictor, clean):
    rng = np.random.default_rng(5)
    jobs = {i: [rng.standard_normal((1 + (i + k) % 7, 64), dtype=np.float32) for k in range(6)] for i in range(4)}
    results: dict[int, list] = {}
    failures = []

    def caller(i):
        try:
            results[i] = [mlp_predictor.predict({"x": x})[0].get_data_to_numpy() for x in jobs[i]]
        except BaseException as exc:  # noqa: BLE001
            failures.append(exc)

    threads = [threading.Thread(target=caller, args=(i,)) for i in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures
    for i, xs in jobs.items():
        for x, out in zip(xs, results[i]):
            np.testing.assert_allclose(out, reference(sample("mlp"), [x])[0], rtol=0, atol=1e-5)


def test_close_is_idempotent_and_refuses_later_calls(sample, clean):
    predictor = ParallelPredictor(sample("mlp"), device_ids=[0, 1], context=one_thread())
    pids = predictor.pids
    predictor.predict([np.ones((3, 64), np.float32)])
    names = set(predictor.segment_names)
    assert len(names) >= 2 and names <= set(our_segments())
    predictor.close()
    predictor.close()
    assert predictor.closed
    with pytest.raises(WorkerError, match="closed; create a new ParallelPredictor"):
        predictor.predict([np.ones((3, 64), np.float32)])
    assert not names & set(our_segments())
    assert not any(process_alive(pid) for pid in pids)


def test_dropping_the_predictor_stops_its_workers(sample, clean):
    predictor = ParallelPredictor(sample("mlp"), device_ids=[0, 1], context=one_thread())
    out = predictor.predict([np.ones((4, 64), np.float32)])[0].get_data_to_numpy()
    pids, names = predictor.pids, set(predictor.segment_names)
    del predictor
    gc.collect()
    assert wait_until(lambda: not any(process_alive(pid) for pid in pids), 10)
    assert not names & set(our_segments())
    assert out.shape == (4, 64) and np.isfinite(out).all()  # outputs outlive the predictor


def test_outputs_with_free_dimensions_beyond_the_batch(sample, clean):
    """The transformer's output shape depends on the sequence: learned on the first request, grown into, reused."""
    path = sample("transformer")
    rng = np.random.default_rng(6)
    with ParallelPredictor(path, device_ids=[0, 1], context=one_thread()) as predictor:
        for batch, seq in ((3, 5), (3, 5), (4, 9), (5, 5), (1, 12)):
            x = rng.standard_normal((batch, seq, 32), dtype=np.float32)
            out = predictor.predict([x])[0].get_data_to_numpy()
            assert out.shape == (batch, seq, 32)
            np.testing.assert_allclose(out, reference(path, [x])[0], rtol=0, atol=1e-5)


def test_several_outputs_of_several_dtypes_and_strided_inputs(tmp_path, clean):
    from tests._batch_split_helpers import write_three_outputs_model

    path = write_three_outputs_model(tmp_path / "three.onnx")
    rng = np.random.default_rng(7)
    with ParallelPredictor(path, device_ids=[0, 1], context=one_thread()) as predictor:
        for batch in (5, 5, 3, 5, 1, 8):  # repeats take the in-place path, new batches too
            wide = rng.uniform(-50, 50, size=(batch, 8)).astype(np.float32)
            x = wide[:, ::2]  # not contiguous
            y, z, n = (t.get_data_to_numpy() for t in predictor.predict([x]))
            np.testing.assert_array_equal(y, x + 1)
            np.testing.assert_array_equal(z, np.concatenate([x, x], axis=1) * 2)
            assert n.dtype == np.int64
            np.testing.assert_array_equal(n, reference(path, [np.ascontiguousarray(x)])[2])


def test_close_from_another_thread_while_requests_run(sample, clean):
    predictor = ParallelPredictor(sample("mlp"), device_ids=[0, 1], context=one_thread())
    x = np.ones((16, 64), np.float32)
    errors = []

    def caller():
        try:
            while True:
                predictor.predict([x])
        except WorkerError as exc:
            errors.append(exc)

    thread = threading.Thread(target=caller)
    thread.start()
    time.sleep(0.5)
    predictor.close()
    thread.join(30)
    assert not thread.is_alive()
    assert len(errors) == 1 and "closed" in str(errors[0])


def test_shape_errors_name_the_callers_shape(tmp_path):
    from orchestrator import InputError, ParallelPredictor, write_sample_model

    path = write_sample_model("mlp", tmp_path / "m.onnx", width=64, hidden=128, layers=1)
    with ParallelPredictor(path, device_ids=[0, 1]) as predictor:
        with pytest.raises(InputError, match=r"input 'x': shape \[5, 63\] does not match \[\?, 64\]"):
            predictor.predict({"x": np.ones((5, 63), np.float32)})
        assert predictor.predict({"x": np.ones((5, 64), np.float32)})[0].shape == [5, 64]
