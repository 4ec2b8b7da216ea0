"""The per-rank program as a user types it: python -m ranks / orchestrate rank."""

import io
import sys

import numpy as np
import onnxruntime as ort
import pytest

import ranks
from ranks._tensor_io import emit_outputs
from tests.conftest import orchestrate_command, python_command, run_command

pytestmark = pytest.mark.cli


def parse_outputs(stdout: str) -> dict[str, tuple[int, int, list[float]]]:
    """{name: (data size, element count, printed values)} from the seeds' print format."""
    lines = stdout.strip().splitlines()
    result = {}
    for header, data in zip(lines[::2], lines[1::2]):
        assert header.startswith("tensor's name is:"), header
        name = header.split("tensor's name is:")[1].split(" data size is:")[0]
        size = int(header.split("data size is:")[1].split(" ")[0])
        count = int(header.split("tensor elements num is:")[1])
        assert data.startswith("output data is: ")
        result[name] = (size, count, [float(v) for v in data[len("output data is: "):].split()])
    return result


def test_default_inputs_are_ones_and_format_matches_seeds(sample):
    path = sample("add")
    result = run_command(python_command("-m", "ranks", f"--model_path={path}"), check=True)
    assert result.stdout == "tensor's name is:z data size is:16 tensor elements num is:4\noutput data is: 2.0 2.0 2.0 2.0\n"


def test_npz_input_and_output_file(sample, tmp_path):
    path = sample("mlp")
    x = np.random.default_rng(0).standard_normal((3, 64), dtype=np.float32)
    np.savez(tmp_path / "in.npz", x=x)
    out = tmp_path / "out.npz"
    result = run_command(
        orchestrate_command("rank", f"--model_path={path}", "--input", str(tmp_path / "in.npz"), "--output", str(out)),
        check=True,
    )
    expected = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    size, count, values = parse_outputs(result.stdout)["y"]
    assert (size, count) == (expected.nbytes, expected.size)
    assert len(values) == 50
    np.testing.assert_allclose(values, expected.reshape(-1)[:50], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.load(out)["y"], expected, atol=1e-6)


def test_npy_and_bin_inputs(sample, tmp_path):
    path = sample("image")
    x = np.random.default_rng(0).random((1, 3, 32, 32), dtype=np.float32)
    np.save(tmp_path / "x.npy", x)
    x.tofile(tmp_path / "input.bin")
    expected = ort.InferenceSession(str(path)).run(None, {"x": x})[0]
    for file in ("x.npy", "input.bin"):
        out = tmp_path / f"{file}.npz"
        run_command(python_command("-m", "ranks", f"--model_path={path}", f"--input={tmp_path / file}", f"--output={out}", "--quiet"), check=True)
        np.testing.assert_allclose(np.load(out)["probs"], expected, atol=1e-6)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--model_path=/nonexistent/model.onnx"], "ModelNotFoundError: model file /nonexistent/model.onnx does not exist"),
        (["--input=/nonexistent.npy"], "input file /nonexistent.npy does not exist"),
    ],
)
def test_errors_exit_nonzero_with_one_clear_line(sample, extra, message):
    args = [f"--model_path={sample('add')}"] + extra
    result = run_command(python_command("-m", "ranks", *args))
    assert result.returncode == 2  # a file named on the command line that is not there: a usage error
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_wrong_input_shape_names_the_input(sample, tmp_path):
    np.save(tmp_path / "x.npy", np.ones((3, 3), np.float32))
    result = run_command(python_command("-m", "ranks", f"--model_path={sample('add')}", f"--input={tmp_path / 'x.npy'}"))
    assert result.returncode == 2
    assert "input 'x': shape [3, 3] does not match [2, 2]" in result.stderr


def test_port_of_mindspore_lite_script(sample, tmp_path):
    """The import-swap script from the foundation issue, unchanged but for the import."""
    import shutil

    shutil.copy(sample("image"), tmp_path / "model.onnx")
    x = np.random.default_rng(2).random((1, 3, 32, 32), dtype=np.float32)
    x.tofile(tmp_path / "input.bin")
    script = tmp_path / "quick_start.py"
    script.write_text(
        "import numpy as np\n"
        "import orchestrator as mslite          # was: import mindspore_lite as mslite\n"
        "context = mslite.Context()\n"
        'context.target = ["cpu"]\n'
        "context.cpu.thread_num = 1\n"
        "context.cpu.thread_affinity_mode = 2\n"
        "model = mslite.Model()\n"
        'model.build_from_file("model.onnx", mslite.ModelType.ONNX, context)\n'
        "inputs = model.get_inputs()\n"
        'inputs[0].set_data_from_numpy(np.fromfile("input.bin", dtype=np.float32).reshape(inputs[0].shape))\n'
        "outputs = model.predict(inputs)\n"
        "for output in outputs:\n"
        "    print(output.name, output.data_size, output.element_num, output.get_data_to_numpy().flatten()[:5])\n"
    )
    result = run_command(python_command(str(script)), cwd=tmp_path, check=True)
    expected = ort.InferenceSession(str(tmp_path / "model.onnx")).run(None, {"x": x})[0]
    name, size, count, *values = result.stdout.replace("[", " ").replace("]", " ").split()
    assert (name, int(size), int(count)) == ("probs", 40, 10)
    np.testing.assert_allclose([float(v) for v in values], expected.reshape(-1)[:5], rtol=1e-5)


@pytest.fixture
def two_rank_shards(sample, tmp_path):
    from orchestrator import shard_model

    return shard_model(sample("mlp"), 2, tmp_path / "shards", progress=False)


@pytest.mark.parametrize("rank", ["2", "0"])
def test_shards_for_two_ranks_launched_with_three_say_so(two_rank_shards, rank):
    from tests._cli_helpers import error_lines, run_with_env

    model = two_rank_shards.model_path
    result = run_with_env(python_command("-m", "ranks", f"--model_path={model}"), {"RANK": rank, "WORLD_SIZE": "3"})
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [
        f"error: ShardError: the shards of {model} were made for 2 ranks ({two_rank_shards.manifest_path}), "
        f"but this launch has 3 ranks; re-run `orchestrate shard --tp 3` or launch 2 ranks"
    ]



def test_shards_run_by_a_lone_process_say_to_launch_their_ranks(two_rank_shards):
    from tests._cli_helpers import error_lines

    model = two_rank_shards.model_path
    result = run_command(python_command("-m", "ranks", f"--model_path={model}"))
    assert result.returncode == 2, result.stderr
    assert error_lines(result.stderr) == [
        f"error: ShardError: {two_rank_shards.shard_paths[0]} is one of 2 shards, but the communicator has 1 rank "
        f"(this process runs alone: launch 2 ranks with mpirun or a rank table)"
    ]


@pytest.mark.multiprocess
@pytest.mark.timeout(120)
def test_shards_for_two_ranks_under_a_three_rank_mpirun_say_so(two_rank_shards):
    result = run_command(orchestrate_command("launch", "mpi", "-n", "3", "--", "python", "-m", "ranks",
                                             f"--model_path={two_rank_shards.model_path}"), timeout=110)
    assert result.returncode == 2, result.stderr
    assert "were made for 2 ranks" in result.stderr and "but this launch has 3 ranks" in result.stderr
    assert "is missing" not in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("kind", ["unbuildable", "fails at run"])
def test_a_failing_model_prints_exactly_one_line_not_the_engines_log_too(tmp_path, kind):
    from tests._cli_helpers import write_failing_model, write_unbuildable_model

    path = (write_unbuildable_model if kind == "unbuildable" else write_failing_model)(tmp_path / "m.onnx")
    result = run_command(python_command("-m", "ranks", f"--model_path={path}"))
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ModelError: "), result.stderr
    assert "[E:onnxruntime" not in result.stderr and "\x1b[" not in result.stderr


def test_each_output_is_one_write_so_ranks_sharing_a_terminal_do_not_splice_lines(sample, monkeypatch):
    """With PYTHONUNBUFFERED=1 print() writes a text and its newline apart; two ranks on one terminal then
    interleave between the two. emit_outputs writes each tensor's lines, newline included, at once."""
    writes = []

    class Recorder(io.StringIO):
        def write(self, text):
            writes.append(text)
            return len(text)

    model = ranks.Model()
    model.build_from_file(str(sample("add")), ranks.ModelType.ONNX)
    outputs = model.predict([np.ones((2, 2), np.float32), np.ones((2, 2), np.float32)])
    monkeypatch.setattr(sys, "stdout", Recorder())
    emit_outputs(outputs, None)
    assert writes == ["tensor's name is:z data size is:16 tensor elements num is:4\noutput data is: 2.0 2.0 2.0 2.0\n"]
