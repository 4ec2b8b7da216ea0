"""``orchestrate predict`` as a user types it, and the dual-core example."""

from __future__ import annotations

import numpy as np
import pytest

from tests._batch_split_helpers import reference, write_timestep_model
from tests.conftest import ROOT, orchestrate_command, python_command, run_command

pytestmark = [pytest.mark.cli, pytest.mark.multiprocess]


def test_predict_splits_a_batch_from_a_file_and_saves_the_joined_outputs(sample, tmp_path):
    x = np.random.default_rng(0).standard_normal((5, 64), dtype=np.float32)
    np.savez(tmp_path / "x.npz", x=x)
    result = run_command(orchestrate_command(
        "predict", "--model", str(sample("mlp")), "--devices", "0,1", "--threads", "1",
        "--input", str(tmp_path / "x.npz"), "--output", str(tmp_path / "y.npz"),
    ), check=True)
    assert "split a batch of 5 over devices [0, 1] as [3, 2]" in result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "tensor's name is:y data size is:1280 tensor elements num is:320"
    assert lines[1].startswith("output data is: ")
    with np.load(tmp_path / "y.npz") as saved:
        np.testing.assert_allclose(saved["y"], reference(sample("mlp"), [x])[0], rtol=0, atol=1e-5)
    first = [float(v) for v in lines[1].split(": ", 1)[1].split()]
    np.testing.assert_allclose(first, reference(sample("mlp"), [x])[0].reshape(-1)[:50], rtol=1e-5, atol=1e-6)


def test_a_warning_is_one_line_like_the_errors(sample, tmp_path):
    import os

    if len(os.sched_getaffinity(0)) >= 6:
        pytest.skip("3 workers x 2 threads fit this machine: nothing to warn about")
    np.save(tmp_path / "x.npy", np.ones((3, 64), np.float32))
    result = run_command(orchestrate_command("predict", "--model", str(sample("mlp")), "--devices", "0,1,2",
                                             "--threads", "2", "--input", str(tmp_path / "x.npy"), "--quiet"), check=True)
    warning = [line for line in result.stderr.splitlines() if "warning" in line.lower()]
    assert len(warning) == 1 and warning[0].startswith("orchestrate predict: warning: 3 workers x 2 threads need 6 "
                                                       "cores, but only"), result.stderr


def test_predict_with_a_broadcast_input_and_default_ones(tmp_path):
    path = write_timestep_model(tmp_path / "timestep.onnx")
    np.save(tmp_path / "x.npy", np.full((3, 8), 2.0, np.float32))
    np.save(tmp_path / "t.npy", np.array(0.5, np.float32))
    result = run_command(orchestrate_command(
        "predict", "--model", str(path), "--devices", "0,1", "--broadcast", "t",
        "--input", str(tmp_path / "x.npy"), "--input", str(tmp_path / "t.npy"), "--output", str(tmp_path / "y.npz"),
    ), check=True)
    with np.load(tmp_path / "y.npz") as saved:
        np.testing.assert_allclose(saved["y"], np.full((3, 8), 1.5, np.float32))
    assert "as [2, 1]" in result.stderr
    # no inputs: ones, one row per device
    result = run_command(orchestrate_command("predict", "--model", str(path), "--devices", "0,1", "--broadcast", "t"),
                         check=True)
    assert "split a batch of 2 over devices [0, 1] as [1, 1]" in result.stderr
    assert "output data is: " + " ".join(["2.0"] * 16) in result.stdout


def test_predict_errors_are_one_clear_line(sample, tmp_path):
    result = run_command(orchestrate_command("predict", "--model", str(sample("mlp")), "--devices", "0,0"))
    assert result.returncode == 2
    assert "orchestrate predict: error: ConfigError: device_ids has repeated devices: [0, 0]" in result.stderr
    assert "Traceback" not in result.stderr
    result = run_command(orchestrate_command("predict", "--model", str(tmp_path / "none.onnx"), "--devices", "0,1"))
    assert result.returncode == 2 and "does not exist" in result.stderr
    result = run_command(orchestrate_command("predict", "--model", str(sample("mlp")), "--devices", "a,b"))
    assert result.returncode == 2
    assert "orchestrate predict: error: --devices must be comma-separated integers" in result.stderr


@pytest.mark.timeout(180)
def test_dual_core_example_runs(tmp_path):
    result = run_command(python_command(str(ROOT / "examples" / "dual_core_split.py"), "--size", "32", "--classes", "10"),
                         check=True, timeout=170)
    assert "joined outputs equal one process" in result.stdout


def test_predict_with_one_model_file_per_device(sample, tmp_path):
    from tests._batch_split_helpers import write_fixed_batch

    paths = [str(write_fixed_batch(sample("mlp"), tmp_path / f"mlp{i}.onnx", 1)) for i in range(2)]
    result = run_command(orchestrate_command("predict", "--model", paths[0], "--model", paths[1], "--devices", "0,1",
                                             "--output", str(tmp_path / "y.npz"), "--quiet"), check=True)
    assert "as [1, 1]" in result.stderr and result.stdout == ""
    with np.load(tmp_path / "y.npz") as saved:
        np.testing.assert_allclose(saved["y"], reference(sample("mlp"), [np.ones((2, 64), np.float32)])[0], atol=1e-5)
    result = run_command(orchestrate_command("predict", "--model", paths[0], "--model", paths[1], "--devices", "0,1",
                                             "--batch", "3"))
    assert result.returncode == 2 and "batch sizes that fit are [1, 2]" in result.stderr
