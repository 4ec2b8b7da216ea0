"""ModelParallelRunner: many client threads at once, its API as MindSpore Lite's, its [pool] options, shared weights."""

from __future__ import annotations

import threading

import numpy as np
import pytest

import orchestrator as mslite
from orchestrator import ConfigError, ConfigTypeError, InputError, ModelError, ModelNotFoundError, ModelParallelRunner
from tests._pool_helpers import reference, run_clients, slow_feeds, slow_model, two_in_two_out_model, uss, worker_threads


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return two_in_two_out_model(tmp_path_factory.mktemp("pool") / "pair.onnx")


def context_of(workers: int, threads: int = 1, **parallel) -> mslite.Context:
    context = mslite.Context()
    context.cpu.thread_num = threads
    context.parallel.workers_num = workers
    for key, value in parallel.items():
        setattr(context.parallel, key, value)
    return context


@pytest.mark.timeout(120)
@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_many_client_threads_each_get_their_own_replies(sample, worker_type):
    # 16 clients x 8 requests, every input distinct, on 2 workers: each reply must be its own request's,
    # equal to a single-threaded run of the same input (no lost, duplicated or swapped replies).
    path = sample("mlp")
    clients, per_client = 16, 8
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal((clients, per_client, 1, 64)).astype(np.float32)
    expected = reference(path, {"x": inputs.reshape(-1, 64)})[0].reshape(clients, per_client, 1, 64)
    replies = np.full_like(expected, np.nan)

    with ModelParallelRunner() as runner:
        runner.build_from_file(path, context_of(workers=2), worker_type=worker_type)

        def client(c: int) -> None:
            for k in range(per_client):
                tensors = runner.get_inputs()
                tensors[0].set_data_from_numpy(inputs[c, k])
                replies[c, k] = runner.predict(tensors)[0].get_data_to_numpy()

        errors = run_clients(clients, client)  # all at once
    assert not errors, errors
    np.testing.assert_allclose(replies, expected, rtol=1e-5, atol=1e-6)


def test_several_inputs_and_outputs_with_a_fixed_batch_of_one(pair):
    rng = np.random.default_rng(1)
    a = rng.standard_normal((1, 16)).astype(np.float32)
    b = rng.integers(-5, 5, (1, 4)).astype(np.int64)
    y, n = reference(pair, {"a": a, "b": b})
    with ModelParallelRunner() as runner:
        runner.build_from_file(pair, context_of(workers=2))
        assert [(t.name, t.dtype, t.shape) for t in runner.get_inputs()] == [
            ("a", mslite.DataType.FLOAT32, [1, 16]), ("b", mslite.DataType.INT64, [1, 4])]
        assert [(t.name, t.shape) for t in runner.get_outputs()] == [("y", [1, 8]), ("n", [1, 4])]

        tensors = runner.get_inputs()
        tensors[0].set_data_from_numpy(a.reshape(-1))  # flat, as the seeds fill from np.fromfile
        tensors[1].set_data_from_numpy(b)
        for given in (tensors, [a, b], {"b": b, "a": a}):
            out = runner.predict(given)
            assert [t.name for t in out] == ["y", "n"]
            np.testing.assert_allclose(out[0].get_data_to_numpy(), y, rtol=1e-6)
            np.testing.assert_array_equal(out[1].get_data_to_numpy(), n)

        filled = [mslite.Tensor(), mslite.Tensor()]
        assert runner.predict([a, b], filled) is filled  # MindSpore Lite's outputs= form: filled in place
        np.testing.assert_array_equal(filled[1].get_data_to_numpy(), n)
        assert [t.name for t in filled] == ["y", "n"]  # unnamed Tensors take the outputs' names
        named = [mslite.Tensor(name="mine"), mslite.Tensor()]
        assert [t.name for t in runner.predict([a, b], named)] == ["mine", "n"]  # a name given stays

        with pytest.raises(InputError, match="'b' has dtype float32"):
            runner.predict([a, b.astype(np.float32)])  # checked in the caller, before any queue
        with pytest.raises(InputError, match="got 1 inputs, the model has 2"):
            runner.predict([a])
        assert runner.get_inputs()[0] is not runner.get_inputs()[0]  # each caller fills its own


def test_build_without_a_context_uses_the_default_parallel_settings(pair):
    from ranks._cpu_limits import cpu_budget

    usable = cpu_budget().usable
    runner = ModelParallelRunner()
    assert str(runner) == "model_path: ."
    with pytest.raises(ModelError, match="not built"):
        runner.predict([np.zeros((1, 16), np.float32), np.zeros((1, 4), np.int64)])
    runner.build_from_file(pair)
    try:
        assert str(runner) == f"model_path: {pair}."  # as MindSpore Lite prints it
        threads = max(1, min(8, usable // 2))  # MindSpore Lite's default
        assert (runner.workers_num, runner.thread_num) == (max(1, usable // threads), threads)
        assert len(worker_threads(runner)) == runner.workers_num
        assert runner.cores == [[] for _ in range(runner.workers_num)]  # mode 0: not bound
        assert runner.options.queue_size == 1000 and runner.options.timeout == 120.0
        assert not runner.options.share_weights and runner.options.worker_type == "thread"
    finally:
        runner.close()


def test_arguments_of_the_wrong_kind_are_refused_as_mindspore_lite_refuses_them(pair, tmp_path):
    runner = ModelParallelRunner()
    with pytest.raises(TypeError, match="model_path must be a str"):
        runner.build_from_file(42)
    with pytest.raises(TypeError, match="context must be a Context"):
        runner.build_from_file(pair, context="cpu")
    with pytest.raises(ModelNotFoundError) as caught:
        runner.build_from_file(tmp_path / "missing.onnx")
    assert isinstance(caught.value, RuntimeError) and isinstance(caught.value, FileNotFoundError)
    mindir = tmp_path / "net.mindir"
    mindir.write_bytes(b"\x08\x01MindSpore protobuf, not ONNX")
    with pytest.raises(ModelError, match="export the network to ONNX"):
        runner.build_from_file(mindir)


def test_pool_options_come_from_config_info_config_path_and_keywords(pair, tmp_path):
    ini = tmp_path / "pool.ini"
    ini.write_text("[pool]\nqueue_size = 7\ntimeout = 12.5\n")
    cases = [
        (context_of(1, config_info={"pool": {"queue_size": "64", "timeout": "30"}}), {}, (64, 30.0)),
        (context_of(1, config_path=str(ini)), {}, (7, 12.5)),
        (context_of(1, config_path=str(ini)), {"queue_size": 3}, (3, 12.5)),  # keywords win
    ]
    for context, keywords, (queue_size, timeout) in cases:
        with ModelParallelRunner() as runner:
            runner.build_from_file(pair, context, **keywords)
            assert (runner.options.queue_size, runner.options.timeout) == (queue_size, timeout)
            assert runner._queue.capacity == queue_size


@pytest.mark.parametrize("pool, message", [
    ({"queue_size": "0"}, "queue_size must be at least 1"),
    ({"queue_size": "many"}, "queue_size must be an integer"),
    ({"timeout": "-1"}, "timeout must be a number of seconds > 0"),
    ({"share_weights": "perhaps"}, "share_weights must be one of true/false"),
    ({"worker_type": "fiber"}, "worker_type must be one of"),
    ({"join_requests": "0"}, r"join_requests must be an int >= 1 \(1: off\), got 0"),
    ({"join_requests": "many"}, "join_requests must be an integer >= 1, got 'many'"),
    ({"queue_sise": "8"}, r"context.parallel.config_info: \[pool\]: unknown key\(s\) \[.queue_sise.\]; known keys are"),
])
def test_bad_pool_options_are_config_errors_that_name_the_key(pair, pool, message):
    with pytest.raises(ConfigError, match=message):
        ModelParallelRunner().build_from_file(pair, context_of(1, config_info={"pool": pool}))


@pytest.mark.multiprocess
def test_process_workers_from_the_config_run_several_inputs_and_outputs(pair):
    feeds = {"a": np.random.default_rng(4).standard_normal((1, 16)).astype(np.float32),
             "b": np.array([[1, 2, 3, 4]], np.int64)}
    expected = reference(pair, feeds)
    with ModelParallelRunner() as runner:
        runner.build_from_file(pair, context_of(2, config_info={"pool": {"worker_type": "process"}}))
        assert runner.options.worker_type == "process" and len(runner.worker_pids) == 2
        assert [(t.name, t.shape) for t in runner.get_outputs()] == [("y", [1, 8]), ("n", [1, 4])]
        for _ in range(4):
            y, n = runner.predict(feeds)
            np.testing.assert_allclose(y.get_data_to_numpy(), expected[0], rtol=1e-6)
            np.testing.assert_array_equal(n.get_data_to_numpy(), expected[1])


def test_the_config_reaches_every_workers_model(pair, tmp_path):
    # [cpu_context] input_shape and the weight-sharing keys of Model: the first shapes the inputs, the second is refused.
    with ModelParallelRunner() as runner:
        runner.build_from_file(pair, context_of(2, config_info={"cpu_context": {"input_shape": "a:1,16;b:1,4"}}))
        assert runner.get_inputs()[1].shape == [1, 4]
    with pytest.raises(ConfigError, match="share_weights = true"):
        ModelParallelRunner().build_from_file(pair, context_of(1, config_info={"ascend_context": {"shareable_weight_pid_list": "1"}}))
    with pytest.raises(ConfigTypeError):
        ModelParallelRunner().build_from_file(pair, queue_size="8")


@pytest.mark.timeout(120)
@pytest.mark.filterwarnings("ignore:4 workers x 1 threads:RuntimeWarning")  # on fewer than 4 cores: expected here
def test_shared_weights_give_the_same_replies_on_one_copy_of_the_weights(sample, tmp_path):
    # An MLP of 16 MiB of weights: four workers without sharing hold three more copies than one worker;
    # with sharing, the three extra workers add a small fraction of one copy.
    path = sample("mlp", width=512, hidden=2048, layers=2)
    weight_bytes = 2 * 2 * 512 * 2048 * 4
    x = np.random.default_rng(2).standard_normal((1, 512)).astype(np.float32)
    expected = reference(path, {"x": x})[0]

    def extra_uss(workers: int, share: bool) -> int:
        runner = ModelParallelRunner()
        before = uss()
        runner.build_from_file(path, context_of(workers), share_weights=share)
        for _ in range(2 * workers):  # every worker runs once (their activations are part of the cost)
            np.testing.assert_allclose(runner.predict([x])[0].get_data_to_numpy(), expected, rtol=1e-5, atol=1e-6)
        grown = uss() - before
        runner.close()
        del runner
        return grown

    extra_uss(1, True)  # ONNX Runtime's one-time allocations happen here, not in a measured build
    shared = extra_uss(4, True) - extra_uss(1, True)
    private = extra_uss(4, False) - extra_uss(1, False)
    # Each session keeps some state of its own (~0.3 MiB here); at 134 MB of weights the benchmark holds
    # the three extra workers to 0.10 x the weights, at this size 0.25 leaves room for that state.
    assert shared <= 0.25 * weight_bytes, f"3 extra workers on shared weights added {shared / 2**20:.1f} MiB"
    assert private >= 2.5 * weight_bytes, f"3 extra workers with their own weights added only {private / 2**20:.1f} MiB"


def test_shared_weights_with_a_slow_model_still_stop_and_fail_cleanly(tmp_path):
    path = slow_model(tmp_path / "slow.onnx")
    with ModelParallelRunner() as runner:
        runner.build_from_file(path, context_of(2), share_weights=True)
        feeds = slow_feeds(50, index=5, seed=4)
        # Prepacking off takes another MatMul path: equal to rounding.
        np.testing.assert_allclose(runner.predict(feeds)[0].get_data_to_numpy(), reference(path, feeds)[0], rtol=1e-5)
        with pytest.raises(ModelError, match="out of data bounds"):
            runner.predict(slow_feeds(1, index=64))


@pytest.mark.timeout(120)
@pytest.mark.parametrize("worker_type", ["thread", "process"])
def test_joined_requests_each_get_their_own_rows(sample, worker_type):
    # join_requests: a free worker runs up to 8 waiting requests of the same shapes as one batch. 16 clients
    # on 1 worker keep requests waiting, so batches form; each reply must still be its own request's rows.
    path = sample("mlp")
    clients, per_client = 16, 6
    rng = np.random.default_rng(7)
    rows = rng.integers(1, 4, size=(clients, per_client))  # requests of 1-3 rows join with each other
    inputs = [[rng.standard_normal((int(r), 64)).astype(np.float32) for r in client_rows] for client_rows in rows]
    replies: dict = {}
    joined = []
    with ModelParallelRunner() as runner:
        runner.build_from_file(path, context_of(workers=1), worker_type=worker_type, join_requests=8)
        assert runner.options.join_requests == 8
        original = runner._queue.take_joinable

        def counting(worker, first, limit, key):
            batch = original(worker, first, limit, key)
            joined.append(len(batch))
            return batch

        runner._queue.take_joinable = counting

        def client(c: int) -> None:
            for k in range(per_client):
                replies[c, k] = runner.predict([inputs[c][k]])[0].get_data_to_numpy()

        errors = run_clients(clients, client)
    assert not errors, errors
    assert max(joined) > 1, joined  # some requests did run joined
    for c in range(clients):
        for k in range(per_client):
            np.testing.assert_allclose(replies[c, k], reference(path, {"x": inputs[c][k]})[0], rtol=1e-5, atol=1e-6)


@pytest.mark.timeout(60)
def test_a_failing_member_of_a_joined_batch_fails_alone(sample, monkeypatch):
    path = sample("mlp")
    from orchestrator._pool_threads import ThreadEngine

    engine_run = ThreadEngine.run
    poisoned = np.full((1, 64), 7.0, np.float32)

    def run(self, request):
        # a model that fails on one row's values: any run holding that row fails
        if any(np.array_equal(row, poisoned[0]) for row in request.feeds["x"]):
            raise ModelError("running mlp.onnx failed: this row is poisoned")
        return engine_run(self, request)

    monkeypatch.setattr(ThreadEngine, "run", run)
    rng = np.random.default_rng(3)
    good = [rng.standard_normal((1, 64)).astype(np.float32) for _ in range(6)]
    results: dict = {}
    from orchestrator._pool_queue import RequestQueue

    gate = threading.Event()
    original = RequestQueue.take

    def gated_take(self, worker, *args):
        gate.wait(10)  # let every request queue up first, so that they are joined
        return original(self, worker, *args)

    monkeypatch.setattr(RequestQueue, "take", gated_take)
    with ModelParallelRunner() as runner:
        runner.build_from_file(path, context_of(1), join_requests=8)

        def call(key, x):
            try:
                results[key] = runner.predict([x])[0].get_data_to_numpy()
            except Exception as exc:  # noqa: BLE001
                results[key] = exc

        threads = [threading.Thread(target=call, args=(k, x)) for k, x in enumerate(good)]
        threads.append(threading.Thread(target=call, args=("bad", poisoned)))
        for thread in threads:
            thread.start()
        from tests._pool_helpers import wait_until

        wait_until(lambda: runner._queue.counts()[0] == len(threads), what="every request queued")
        gate.set()
        for thread in threads:
            thread.join(30)
    assert isinstance(results["bad"], ModelError) and "poisoned" in str(results["bad"])
    for k, x in enumerate(good):
        np.testing.assert_allclose(results[k], reference(path, {"x": x})[0], rtol=1e-5, atol=1e-6)


def test_join_requests_on_a_model_with_a_fixed_batch_is_off_and_options_say_so(sample, caplog):
    with caplog.at_level("WARNING", logger="orchestrator"), ModelParallelRunner() as runner:
        runner.build_from_file(sample("add"), context_of(1), join_requests=4)
        assert runner.options.join_requests == 1  # what was built, not what was asked
        x = np.ones((2, 2), np.float32)
        np.testing.assert_array_equal(runner.predict([x, x])[0].get_data_to_numpy(), x + x)
    assert any("join_requests=4 is off: the model's inputs" in r.getMessage() for r in caplog.records)
