"""The seeds' flows from MINDIR files that MindSpore exports in the test (tests/mindir_nets.py).

- seed 000: the concurrent-inference script, unchanged but for its import, on ``./model/mobilenetv2.mindir``;
- seed 002: a batch split over 2 workers (``ParallelPredictor``), both converting the same file at once;
- a MINDIR model converted, sliced with ``orchestrate shard`` and run under ``orchestrate launch mpi``;
- seed 003: per-rank MINDIR files (``mlp_tp0.mindir``, ``mlp_tp1.mindir``, each rank's piece of an MLP with
  MindSpore's AllReduce, exported by MindSpore) run by ``python -m ranks --model_path=mlp_tp.mindir`` under
  mpirun, and by the seed's own main.py under mpirun, equal to the unsliced MLP.
References are the MindSpore networks' own outputs; float32 through two runtimes, compared within 1e-5.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest

from _mindir_helpers import build_nets, cache_files, fresh_copy, reference
from seeds._seed_run import check_parallel_runner_values
from conftest import ROOT, orchestrate_command, project_env, run_command
from launchers import find_mpirun
from orchestrator import Context, ParallelPredictor

TOL = 1e-5
SCRIPTS = ROOT / "tests" / "seeds" / "scripts"
LAUNCH = ("launch", "mpi", "-n", "2", "--stop-timeout", "5", "--")


@pytest.fixture(scope="module")
def nets(tmp_path_factory):
    return build_nets(tmp_path_factory)


def one_thread() -> Context:
    context = Context()
    context.cpu.thread_num = 1
    return context


@pytest.mark.cli
def test_seed000_script_runs_on_a_mindir_classifier(nets, tmp_path):
    model = fresh_copy(nets, "classifier.mindir", tmp_path / "model", as_name="mobilenetv2.mindir")
    ref = reference(nets, "classifier")
    ref["x1"].tofile(model.parent / "input.bin")  # the seed reads a flat float32 input.bin
    script = (SCRIPTS / "seed000_parallel_runner.py").read_text()
    script, restored = re.subn(r'model_path="./model/mobilenetv2.onnx", context=context\)  # changed: .*',
                               'model_path="./model/mobilenetv2.mindir", context=context)', script)
    assert restored == 1
    (tmp_path / "quick_start_parallel_python.py").write_text(script)  # now only the import differs from the seed

    result = run_command([sys.executable, "quick_start_parallel_python.py"], cwd=tmp_path)

    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert out.count("parallel id: ") == 10 and out.count("output data is:") == 10, out
    assert len(re.findall(r"tensor name is:\S+ tensor size is:4000 tensor elements num is:1000", out)) == 10, out
    check_parallel_runner_values(out, ref["y1"].reshape(-1)[:5], rtol=TOL)
    assert len(cache_files(model)) == 1


@pytest.mark.multiprocess
def test_seed002_batch_split_over_two_workers(nets, tmp_path):
    ref = reference(nets, "classifier")
    # As seed 002 converts its model: a batch of 1 per worker, a batch of 2 split 1 + 1.
    fixed = fresh_copy(nets, "classifier.mindir", tmp_path / "fixed")
    with ParallelPredictor(fixed, device_ids=[0, 1], context=one_thread()) as predictor:
        out = predictor.predict([ref["x5"][:2]])[0].get_data_to_numpy()
    np.testing.assert_allclose(out, ref["y5"][:2], atol=TOL)
    assert len(cache_files(fixed)) == 1  # the two workers converted it once

    # Exported with a free batch (Tensor(shape=[None, ...])): any batch splits, 5 as 3 + 2.
    free = fresh_copy(nets, "classifier_dyn.mindir", tmp_path / "free")
    with ParallelPredictor(free, device_ids=[0, 1], context=one_thread()) as predictor:
        out = predictor.predict([ref["x5"]])[0].get_data_to_numpy()
    np.testing.assert_allclose(out, ref["y5"], atol=TOL)


@pytest.mark.cli
@pytest.mark.multiprocess
def test_converted_sharded_and_run_under_mpirun(nets, tmp_path):
    ref = reference(nets, "mlp")
    np.save(tmp_path / "x.npy", ref["x4"])
    assert run_command(orchestrate_command("convert", str(nets / "mlp.mindir"), "-o", "mlp.onnx"), cwd=tmp_path,
                       check=True)
    run_command(orchestrate_command("shard", "mlp.onnx", "--tp", "2", "-o", "shards"), cwd=tmp_path, check=True)

    result = run_command(orchestrate_command(*LAUNCH, "python", "-m", "ranks", "--model_path=shards/mlp.onnx",
                                             "--input", "x.npy", "--output", "out{rank}.npz", "--quiet"), cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(2):
        with np.load(tmp_path / f"out{rank}.npz") as out:
            np.testing.assert_allclose(next(iter(out.values())), ref["y4"], atol=TOL)


@pytest.mark.cli
def test_shard_takes_a_whole_mindir_file(nets, tmp_path):
    path = fresh_copy(nets, "mlp.mindir", tmp_path)
    result = run_command(orchestrate_command("shard", str(path), "--tp", "2", "-o", str(tmp_path / "shards"), "--check"))
    assert result.returncode == 0, result.stderr
    assert "check: 2 shards vs whole model: max abs difference" in result.stdout and result.stdout.rstrip().endswith("ok")
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["mlp.manifest.json", "mlp0.onnx", "mlp1.onnx"]
    assert json.loads((tmp_path / "shards" / "mlp.manifest.json").read_text())["world_size"] == 2


@pytest.mark.cli
@pytest.mark.multiprocess
def test_seed003_per_rank_mindir_files_under_mpirun(nets, tmp_path):
    for rank in range(2):
        fresh_copy(nets, f"mlp_tp{rank}.mindir", tmp_path)
    ref = reference(nets, "mlp_tp")
    np.save(tmp_path / "x.npy", ref["x"])

    # run.sh: mpirun -n $RANK_SIZE python3 ./main.py --model_path=/your/path/to/Matmul.mindir
    result = run_command(orchestrate_command(*LAUNCH, "python", "-m", "ranks", "--model_path=mlp_tp.mindir",
                                             "--input", "x.npy", "--output", "out{rank}.npz"), cwd=tmp_path)

    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(2):
        with np.load(tmp_path / f"out{rank}.npz") as out:
            np.testing.assert_allclose(next(iter(out.values())), ref["y"], atol=TOL)  # the unsliced MLP
        assert f"[rank {rank}] tensor's name is:" in result.stdout


@pytest.mark.cli
@pytest.mark.multiprocess
def test_seed003_main_py_under_mpirun_on_per_rank_mindir_files(nets, tmp_path):
    for rank in range(2):
        fresh_copy(nets, f"mlp_tp{rank}.mindir", tmp_path, as_name=f"Matmul{rank}.mindir")
    expected = reference(nets, "mlp_tp")["y_ones"].reshape(-1)
    script = tmp_path / "main.py"
    script.write_text((SCRIPTS / "seed003_gpu_main.py").read_text())

    # run.sh: mpirun -n $RANK_SIZE python3 ./main.py --model_path=/your/path/to/Matmul.mindir
    argv = [find_mpirun(), "-n", "2", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none", "--tag-output",
            sys.executable, "main.py", f"--model_path={tmp_path / 'Matmul.mindir'}"]
    result = subprocess.run(argv, cwd=tmp_path, env=project_env(), capture_output=True, text=True, timeout=120)

    assert result.returncode == 0, result.stdout + result.stderr
    for rank in range(2):
        lines = [line.split(f",{rank}]<stdout>: ", 1)[1] for line in result.stdout.splitlines()
                 if f",{rank}]<stdout>: " in line]
        header = next(i for i, line in enumerate(lines) if line.startswith("tensor's name is:"))
        assert lines[header].endswith(f"data size is:{expected.nbytes} tensor elements num is:{expected.size}")
        printed = np.array(lines[header + 1].split(":", 1)[1].split(), np.float32)
        np.testing.assert_allclose(printed, expected[:10], atol=TOL)  # rank r's piece + allreduce = the whole MLP
