"""Generating tokens across 2 rank processes, each keeping its own heads' key/value cache.

The three ways to start ranks, on the exported decoders of ``tests/fixtures`` (``make_exports.py``),
against torch's greedy tokens and logits: ``ShardedModel.generate`` from Python, a rank program under
``orchestrate launch mpi``, the same program from a rank table (zmq); and ``orchestrate generate``. Each way
runs a plain decoder and Optimum's merged decoder (``*_merged``: an If on ``use_cache_branch``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import psutil
import pytest

from _shard_helpers import fixture_arrays
from orchestrator import ConfigError, ConfigTypeError, InputError, ShardedModel, shard_model

FIXTURES = Path(__file__).resolve().parent / "fixtures"
PROGRAM = Path(__file__).resolve().parent / "programs" / "generate_rank.py"
STEPS = 32
TOLERANCE = 1e-4

pytestmark = [pytest.mark.multiprocess, pytest.mark.timeout(240)]


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    made = {}

    def get(name: str):
        if name not in made:
            made[name] = shard_model(FIXTURES / f"{name}.onnx", 2, tmp_path_factory.mktemp(name), progress=False)
        return made[name]

    return get


def _one_step_with_a_past(name: str) -> tuple[dict, dict]:
    """Feeds of one decode step after a past of 4 positions, and the whole model's outputs for them."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(FIXTURES / f"{name}.onnx"), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    feeds = {"input_ids": rng.integers(0, 512, (2, 1)), "attention_mask": np.ones((2, 5), np.int64),
             "position_ids": np.full((2, 1), 4)}
    for arg in session.get_inputs()[3:]:
        if arg.name == "use_cache_branch":  # a merged decoder: its with-past branch
            feeds[arg.name] = np.array([True])
            continue
        feeds[arg.name] = rng.standard_normal((2, arg.shape[1], 4, arg.shape[3])).astype(np.float32)
    return feeds, dict(zip([o.name for o in session.get_outputs()], session.run(None, feeds)))


def _prompt_file(name: str, path: Path) -> Path:
    np.save(path, fixture_arrays(name)["prompt_ids"])
    return path


def _check_saved(path: Path, ref: dict) -> None:
    with np.load(path) as saved:
        assert saved["tokens"].tolist() == ref["tokens"][:, :STEPS].tolist()
        assert np.max(np.abs(saved["logits"] - ref["logits"][:, :STEPS])) <= TOLERANCE


@pytest.mark.parametrize("name", ["gpt2_cache_dynamo", "llama_cache_dynamo", "gpt2_merged"])
def test_sharded_model_generates_torchs_tokens(name, shards):
    ref = fixture_arrays(name)
    with ShardedModel(shards(name).model_path, backend="mpi", timeout=120) as model:
        pids = list(model.pids.values())
        got = model.generate(ref["prompt_ids"], STEPS, return_logits=True)
        assert got.steps == STEPS
        for row in range(2):
            assert got.tokens[row].tolist() == ref["tokens"][row, :STEPS].tolist()
            assert np.max(np.abs(got.logits[row] - ref["logits"][row, :STEPS])) <= TOLERANCE
        # The same ranks again: a fresh cache per request, one prompt, and a stop token.
        stop = int(ref["tokens"][0, 3])
        again = model.generate(ref["prompt_ids"][0], STEPS, stop_token=stop)
        end = list(ref["tokens"][0]).index(stop) + 1
        assert again.tokens[0].tolist() == ref["tokens"][0, :end].tolist()
        sampled = model.generate(ref["prompt_ids"], 8, temperature=0.8, seed=5)
        with pytest.raises(InputError, match=r"token id 512 is outside the vocabulary .*\(512 tokens: ids 0 to 511\)"):
            model.generate([1, 512], 4)
        if name == "llama_cache_dynamo":  # the caller refuses what the whole model would, the ranks serve on
            from tests.test_generate import BAD_REQUESTS

            for input_ids, options, text in BAD_REQUESTS:
                with pytest.raises(InputError) as info:
                    model.generate(input_ids, 2, **options)
                assert text in str(info.value), str(info.value)
        if name.startswith("gpt2"):  # a learned table of 128 positions (Llama's rotary positions have no limit)
            with pytest.raises(InputError, match=r"a prompt of 2 tokens and 128 new tokens need 129 positions; "
                                                 r".* holds 128: ask for at most 127 new tokens"):
                model.generate([1, 2], 128)
        # predict takes and gives the cache whole, as the unsliced model does (each rank slices its heads)
        feeds, want = _one_step_with_a_past(name)
        got = model.predict(feeds)
        assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in want.items()}
        assert max(float(np.max(np.abs(got[k] - want[k]))) for k in want) <= TOLERANCE
    from orchestrator import generate

    whole = generate(FIXTURES / f"{name}.onnx", ref["prompt_ids"], 8, temperature=0.8, seed=5)
    assert [t.tolist() for t in sampled.tokens] == [t.tolist() for t in whole.tokens]
    assert not [p for p in pids if _pid_running(p)]


def test_generate_on_shards_of_a_model_without_a_cache_is_refused_and_the_ranks_serve_on(shards):
    from orchestrator import ModelError

    ref = fixture_arrays("gpt2_dynamo")
    with ShardedModel(shards("gpt2_dynamo").model_path, backend="zmq", timeout=120) as model:
        with pytest.raises(ModelError, match=r"gpt2_dynamo0\.onnx has no key/value cache inputs and outputs .*"
                                             r"export it with use_cache=True"):
            model.generate([[1, 2, 3]], 2)
        got = model.predict({"input_ids": ref["input_ids"]})  # the same ShardedModel still serves
        assert np.max(np.abs(got["logits"] - ref["expected.logits"])) <= TOLERANCE
    # A bad timeout is refused before any rank starts.
    for timeout, error, text in ((1e12, ConfigError, "at most 1e+07, got 1000000000000.0"),
                                 (float("nan"), ConfigError, "got nan"), ("abc", ConfigTypeError, "got 'abc'")):
        with pytest.raises(error) as info:
            ShardedModel(shards("gpt2_dynamo").model_path, backend="zmq", timeout=timeout)
        assert str(info.value).startswith("ShardedModel: timeout must be a number of seconds > 0") and text in str(info.value)


def test_sharded_model_with_a_separate_prefill_graph(shards, tmp_path):
    ref = fixture_arrays("gpt2_cache_dynamo")
    prefill = shard_model(FIXTURES / "gpt2_prefill_dynamo.onnx", 2, tmp_path, progress=False)
    with ShardedModel(shards("gpt2_cache_dynamo").model_path, backend="zmq", timeout=120,
                      prefill=prefill.model_path) as model:
        got = model.generate(ref["prompt_ids"], STEPS, return_logits=True)
    for row in range(2):
        assert got.tokens[row].tolist() == ref["tokens"][row, :STEPS].tolist()
        assert np.max(np.abs(got.logits[row] - ref["logits"][row, :STEPS])) <= TOLERANCE


@pytest.mark.cli
@pytest.mark.parametrize("name", ["gpt2_cache_dynamo", "gpt2_merged"])
def test_a_rank_program_generates_under_mpirun(name, shards, tmp_path):
    pytest.importorskip("launchers._mpi")
    from conftest import orchestrate_command, run_command

    prompt = _prompt_file(name, tmp_path / "prompt.npy")
    result = run_command(orchestrate_command(
        "launch", "mpi", "-n", "2", "--", sys.executable, str(PROGRAM), "--shards", str(shards(name).model_path),
        "--prompt-ids", str(prompt), "--max-new-tokens", str(STEPS), "--output", str(tmp_path / "out{rank}.npz"),
    ), timeout=200)
    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(2):
        _check_saved(tmp_path / f"out{rank}.npz", fixture_arrays(name))


@pytest.mark.cli
@pytest.mark.parametrize("name", ["llama_cache_dynamo", "llama_merged"])
def test_a_rank_program_generates_from_a_rank_table(name, shards, tmp_path):
    pytest.importorskip("ranks._comm_zmq")
    from _shard_helpers import run_ranks_from_a_table

    prompt = _prompt_file(name, tmp_path / "prompt.npy")
    run_ranks_from_a_table(tmp_path, lambda rank, ini: [
        sys.executable, str(PROGRAM), "--shards", str(shards(name).model_path), "--prompt-ids", str(prompt),
        "--max-new-tokens", str(STEPS), "--output", str(tmp_path / "out{rank}.npz"), f"--rank_id={rank}",
        f"--device_id={rank}", f"--config_file={ini}"])
    for rank in range(2):
        _check_saved(tmp_path / f"out{rank}.npz", fixture_arrays(name))


@pytest.mark.cli
@pytest.mark.parametrize("name", ["llama_cache_dynamo", "gpt2_merged"])
def test_orchestrate_generate_prints_and_saves_the_new_ids(name, shards, tmp_path):
    from conftest import orchestrate_command, run_command

    ref = fixture_arrays(name)
    prompt = _prompt_file(name, tmp_path / "prompt.npy")
    want = [f"generated: {' '.join(str(t) for t in ref['tokens'][row, :STEPS])}" for row in range(2)]
    whole = run_command(orchestrate_command("generate", str(FIXTURES / f"{name}.onnx"), "--prompt-ids", str(prompt),
                                            "--max-new-tokens", str(STEPS)), timeout=120)
    assert whole.returncode == 0, whole.stderr
    assert whole.stdout.splitlines() == want
    out = tmp_path / "new_ids.npy"
    sharded = run_command(orchestrate_command("generate", str(shards(name).model_path), "--prompt-ids", str(prompt),
                                              "--max-new-tokens", str(STEPS), "--tp", "2", "--backend", "zmq",
                                              "--output", str(out)), timeout=120)
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stdout.splitlines() == want
    assert np.load(out).tolist() == ref["tokens"][:, :STEPS].tolist()
    wrong = run_command(orchestrate_command("generate", str(shards(name).model_path), "--prompt-ids", str(prompt),
                                            "--max-new-tokens", "4", "--tp", "4"), timeout=60)
    assert wrong.returncode == 2
    assert "tp=4, but the shards of" in wrong.stderr and "were made for 2 ranks" in wrong.stderr


@pytest.mark.cli
def test_orchestrate_generate_refuses_before_slicing_and_names_the_users_file(tmp_path):
    from conftest import orchestrate_command, run_command

    prompt = _prompt_file("gpt2_cache_dynamo", tmp_path / "prompt.npy")  # prompts of 8 and 5 tokens
    for model, steps, code, expected in [
        ("gpt2_cache_dynamo.onnx", 200, 2, "a prompt of 8 tokens and 200 new tokens need 207 positions; "
                                        f"{FIXTURES / 'gpt2_cache_dynamo.onnx'} holds 128: ask for at most 121"),
        ("gpt2_dynamo.onnx", 4, 1, f"{FIXTURES / 'gpt2_dynamo.onnx'} has no key/value cache inputs and outputs"),
    ]:
        result = run_command(orchestrate_command("generate", str(FIXTURES / model), "--prompt-ids", str(prompt),
                                                 "--max-new-tokens", str(steps), "--tp", "2"), timeout=60)
        assert result.returncode == code and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr and "orch-generate" not in result.stderr
    # --tp that does not divide the heads: refused with the shard command's advice, which generate takes too
    replicated = run_command(orchestrate_command("generate", str(FIXTURES / "gpt2_cache_dynamo.onnx"), "--prompt-ids",
                                                 str(prompt), "--max-new-tokens", "8", "--tp", "3"), timeout=60)
    assert replicated.returncode == 2 and "or --allow-replicate to keep it whole" in replicated.stderr
    replicated = run_command(orchestrate_command("generate", str(FIXTURES / "gpt2_cache_dynamo.onnx"), "--prompt-ids",
                                                 str(prompt), "--max-new-tokens", "8", "--tp", "3",
                                                 "--allow-replicate"), timeout=120)
    assert replicated.returncode == 0, replicated.stderr
    ref = fixture_arrays("gpt2_cache_dynamo")
    assert replicated.stdout.splitlines() == [f"generated: {' '.join(str(t) for t in ref['tokens'][row, :8])}"
                                              for row in range(2)]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("signum, code", [(15, 143), (2, 130)])
def test_orchestrate_generate_stopped_by_a_signal_says_so_and_leaves_nothing(signum, code, tmp_path):
    """SIGTERM or Ctrl-C while `orchestrate generate MODEL --tp 2` runs: its ranks are stopped, its scratch
    shards removed, one line says why, and the status is the shell's for the signal."""
    import os
    import subprocess
    import time

    from conftest import orchestrate_command, project_env

    prompt = _prompt_file("llama_cache_dynamo", tmp_path / "prompt.npy")
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    env = {**project_env(), "TMPDIR": str(scratch)}
    proc = subprocess.Popen(orchestrate_command("generate", str(FIXTURES / "llama_cache_dynamo.onnx"), "--tp", "2",
                                                "--prompt-ids", str(prompt), "--max-new-tokens", "1000000"),
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not [c for c in psutil.Process(proc.pid).children(recursive=True) if "_sharded_worker" in " ".join(c.cmdline())]:
            assert proc.poll() is None and time.monotonic() < deadline, "the ranks did not start"
            time.sleep(0.1)
        ranks = psutil.Process(proc.pid).children(recursive=True)
        time.sleep(1.0)  # generating
        os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == code, err
    assert err.strip().splitlines()[-1] == f"orchestrate generate: interrupted by {'SIGTERM' if signum == 15 else 'SIGINT'}", err
    assert "Traceback" not in err, err
    # the slicing's scratch directory went with it (.ses: onnxruntime's session id file, shared by every process)
    assert [p.name for p in scratch.iterdir() if p.name != ".ses"] == []
    assert not [p for p in ranks if _running(p)]


def _pid_running(pid: int) -> bool:
    try:
        return _running(psutil.Process(pid))
    except psutil.NoSuchProcess:
        return False


def _running(process: psutil.Process) -> bool:
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # gone between the two questions
        return False
