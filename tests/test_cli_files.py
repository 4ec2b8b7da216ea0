"""Files named on the command line: inputs that are not what they claim, outputs that cannot be written, --batch."""

from __future__ import annotations

import numpy as np
import pytest

from tests._cli_helpers import error_lines
from tests.conftest import orchestrate_command, python_command, run_command

pytestmark = pytest.mark.cli


def _one_error_line(result, code: int = 2) -> str:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    lines = error_lines(result.stderr)
    assert len(lines) == 1, result.stderr
    return lines[0]


# -- inputs


@pytest.fixture
def garbage_npz(tmp_path):
    path = tmp_path / "garbage.npz"
    path.write_bytes(bytes(range(256)) * 4)
    return path


def test_rank_program_refuses_a_garbage_npz_in_one_line(sample, garbage_npz):
    result = run_command(python_command("-m", "ranks", f"--model_path={sample('add')}", f"--input={garbage_npz}"))
    line = _one_error_line(result)
    assert line == f"error: InputError: input file {garbage_npz} is not a valid .npz file (numpy.savez writes one)"
    assert "pickle" not in result.stderr and result.stdout == ""


@pytest.mark.multiprocess
def test_predict_refuses_a_garbage_npz_in_one_line(sample, garbage_npz):
    result = run_command(orchestrate_command("predict", "--model-path", str(sample("mlp")), "--devices", "0",
                                             "--input", str(garbage_npz)))
    line = _one_error_line(result)
    assert line == (f"orchestrate predict: error: InputError: input file {garbage_npz} is not a valid .npz file "
                    f"(numpy.savez writes one)")


def test_pickled_objects_in_an_npz_are_never_loaded(sample, tmp_path):
    path = tmp_path / "objects.npz"
    np.savez(path, x=np.array([{"a": 1}, None], dtype=object))
    result = run_command(python_command("-m", "ranks", f"--model_path={sample('add')}", f"--input={path}"))
    line = _one_error_line(result)
    assert line == (f"error: InputError: input file {path} holds Python objects (pickled data), which are never "
                    f"loaded; save plain numeric arrays")


def test_a_garbage_npy_and_a_truncated_npy_are_named(sample, tmp_path):
    garbage = tmp_path / "x.npy"
    garbage.write_text("x,y\n1,2\n")
    result = run_command(python_command("-m", "ranks", f"--model_path={sample('add')}", f"--input={garbage}"))
    assert _one_error_line(result).endswith(f"input file {garbage} is not a valid .npy file (numpy.save writes one)")
    truncated = tmp_path / "t.npy"
    np.save(truncated, np.ones((2, 2), np.float32))
    truncated.write_bytes(truncated.read_bytes()[:-5])
    result = run_command(python_command("-m", "ranks", f"--model_path={sample('add')}", f"--input={truncated}"))
    assert f"input file {truncated} is not a valid .npy file: " in _one_error_line(result)


# -- outputs: checked before the model runs; missing directories created; a parent that is a file refused


def test_rank_program_output_under_a_file_fails_before_the_model_runs(sample, tmp_path):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("not a directory")
    result = run_command(python_command("-m", "ranks", f"--model_path={sample('add')}",
                                        f"--output={blocker}/out.npz"))
    line = _one_error_line(result)
    assert line == f"error: cannot write --output {blocker}/out.npz: {blocker} is a file, not a directory"
    assert result.stdout == ""  # no outputs printed: the model never ran
    folder = tmp_path / "out.npz"
    folder.mkdir()
    result = run_command(python_command("-m", "ranks", f"--model_path={sample('add')}", f"--output={folder}"))
    assert _one_error_line(result) == f"error: cannot write --output {folder}: it is a directory; give a file name"


def test_rank_program_output_creates_missing_directories(sample, tmp_path):
    out = tmp_path / "new" / "dir" / "out{rank}.npz"
    run_command(python_command("-m", "ranks", f"--model_path={sample('add')}", f"--output={out}", "--quiet"), check=True)
    with np.load(tmp_path / "new" / "dir" / "out0.npz") as saved:
        np.testing.assert_array_equal(saved["z"], np.full((2, 2), 2.0, np.float32))


@pytest.mark.multiprocess
def test_predict_output_under_a_file_fails_before_any_worker_starts(sample, tmp_path):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("")
    result = run_command(orchestrate_command("predict", "--model-path", str(sample("mlp")), "--output",
                                             f"{blocker}/y.npz"))
    assert _one_error_line(result) == (f"orchestrate predict: error: cannot write --output {blocker}/y.npz: "
                                       f"{blocker} is a file, not a directory")
    assert "split a batch" not in result.stderr


@pytest.mark.parametrize("command", ["sample", "shard", "rank-table"])
def test_o_under_a_file_is_a_usage_error_and_missing_directories_are_created(command, sample, tmp_path):
    blocker = tmp_path / "somefile.txt"
    blocker.write_text("")
    argv = {
        "sample": lambda out: ["sample", "add", "-o", f"{out}/out.onnx"],
        "shard": lambda out: ["shard", str(sample("mlp")), "--tp", "2", "-o", f"{out}/shards"],
        "rank-table": lambda out: ["rank-table", "--devices", "0,1", "--server", "127.0.0.1", "-o", f"{out}/table.json"],
    }[command]
    result = run_command(orchestrate_command(*argv(blocker)))
    target = {"sample": "out.onnx", "shard": "shards", "rank-table": "table.json"}[command]
    assert _one_error_line(result) == (f"orchestrate {command}: error: cannot write -o {blocker}/{target}: "
                                       f"{blocker} is a file, not a directory")
    missing = tmp_path / "a" / "b"
    run_command(orchestrate_command(*argv(missing)), check=True)
    assert (missing / target).exists()


def test_a_command_that_fails_takes_back_the_directories_it_made(sample, tmp_path):
    kept = tmp_path / "kept"
    kept.mkdir()
    for out in (tmp_path / "made" / "shards", kept):
        result = run_command(orchestrate_command("shard", str(sample("transformer")), "--tp", "3", "-o", str(out)))
        assert "does not divide" in _one_error_line(result)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["kept"] and not list(kept.iterdir())  # yours stays

    result = run_command(orchestrate_command("shard", str(sample("transformer")), "--tp", "1", "-o", str(kept)))
    assert _one_error_line(result) == ("orchestrate shard: error: --tp 1 would leave the model whole: there is "
                                       "nothing to slice; give --tp 2 or more, or run the model itself (a Model, "
                                       "orchestrate predict)")


# -- 8. --batch


@pytest.mark.parametrize("batch", ["0", "-1", "two"])
def test_predict_batch_must_be_a_positive_integer(sample, batch):
    result = run_command(orchestrate_command("predict", "--model-path", str(sample("mlp")), "--batch", batch))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1].startswith("orchestrate predict: error: argument --batch: must be ")
    assert "split a batch" not in result.stderr
