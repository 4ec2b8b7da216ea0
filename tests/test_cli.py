"""The command lines as a whole: --version, -np, both option spellings, one name per idea, exit codes 1 and 2."""

from __future__ import annotations

import argparse
import json
import os
import re
from importlib import metadata

import pytest

from tests._cli_helpers import error_lines, write_failing_model, write_unbuildable_model
from tests.conftest import ROOT, orchestrate_command, python_command, run_command

pytestmark = pytest.mark.cli

TABLES = ROOT / "rank_tables"


# -- 1. --version


@pytest.mark.parametrize("command", [
    orchestrate_command("--version"),
    python_command("-m", "ranks", "--version"),
    orchestrate_command("rank", "--version"),
], ids=["orchestrate", "python -m ranks", "orchestrate rank"])
def test_version_is_the_package_version(command):
    result = run_command(command, check=True)
    assert result.stdout == f"orchestrator {metadata.version('orchestrator')}\n"


def test_version_without_package_metadata_reads_pyproject(monkeypatch):
    import tomllib

    from ranks import _command_line

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)
    expected = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert _command_line.version() == expected


# -- 2. -np, as mpirun users type it (4. both spellings on the way)


@pytest.mark.multiprocess
def test_launch_mpi_takes_np_as_mpirun_does():
    result = run_command(orchestrate_command(
        "launch", "mpi", "-np", "2", "--print_command", "--stop_timeout", "5", "--", "python", "-c", "print('up')"))
    assert result.returncode == 0, result.stderr
    assert sorted(result.stdout.splitlines()) == ["[rank 0] up", "[rank 1] up"]
    assert re.search(r"orchestrate launch mpi: \S*mpirun -n 2 ", result.stderr), result.stderr


# -- 4. both spellings, generically; 5. one name per idea


def _parsers():
    """(name, parser) for python -m ranks and every orchestrate (sub-)command, nested ones too."""
    from orchestrator._cli import build_parser
    from ranks._rank_program import build_parser as rank_parser

    def walk(parser):
        yield parser.prog, parser
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                for sub in dict.fromkeys(action.choices.values()):
                    yield from walk(sub)

    yield "python -m ranks", rank_parser()
    yield from walk(build_parser())


def _other_spelling(option: str) -> str:
    body = option[2:]
    return "--" + (body.replace("_", "-") if "_" in body else body.replace("-", "_"))


def test_every_long_option_takes_both_spellings_and_help_shows_one():
    from ranks._command_line import SPELLING_NOTE

    checked = 0
    for prog, parser in _parsers():
        # The usage line and the options column; prose may quote the ranks' own flags (--config_file=INI).
        formatter = parser._get_formatter()
        shown = parser.format_usage() + " ".join(formatter._format_action_invocation(a) for a in parser._actions)
        if any(_other_spelling(o) != o for o in parser._option_string_actions if o.startswith("--")):
            assert SPELLING_NOTE in parser.format_help(), prog
        for option in [o for o in parser._option_string_actions if o.startswith("--")]:
            other = _other_spelling(option)
            if other == option:
                continue
            assert parser._respell([other]) == [option], (prog, other)
            assert parser._respell([f"{other}=v", "--", other]) == [f"{option}=v", "--", other], (prog, other)
            assert not re.search(re.escape(other) + r"(?![\w-])", shown), f"{prog} help shows {other}"
            checked += 1
    assert checked >= 20


def test_help_spells_options_snake_case_for_the_rank_program_and_dash_case_for_orchestrate():
    for prog, parser in _parsers():
        longs = [o[2:] for o in parser._option_string_actions if o.startswith("--")]
        wrong = [o for o in longs if ("-" in o if prog == "python -m ranks" else "_" in o)]
        assert not wrong, f"{prog}: {wrong}"


def test_one_name_per_idea_old_names_still_work():
    parsers = dict(_parsers())
    predict = parsers["orchestrate predict"]
    for spelling in ("--thread-num", "--thread_num", "--threads"):
        assert predict.parse_args(["--model-path", "m.onnx", spelling, "3"]).thread_num == 3
    for spelling in ("--model-path", "--model_path", "--model"):
        assert predict.parse_args([spelling, "m.onnx"]).model_path == ["m.onnx"]
    help_text = predict.format_help()
    assert "--threads" not in help_text and not re.search(r"--model(?![-_])", help_text)
    # the same idea has the same name in the per-rank program
    assert "--thread_num" in parsers["python -m ranks"]._option_string_actions
    assert "--model_path" in parsers["python -m ranks"]._option_string_actions
    table = parsers["orchestrate rank-table"]
    assert table.parse_args(["--servers", "a,b", "--server", "c"]).server == ["a,b", "c"]
    assert "--servers" not in table.format_help()
    shard = parsers["orchestrate shard"]
    assert shard.parse_args(["m.onnx", "--tp", "2", "-o", "d", "--quiet"]).progress is False
    assert shard.parse_args(["m.onnx", "--tp", "2", "-o", "d"]).progress is None


def test_abbreviations_work_in_either_spelling_and_ambiguity_is_reported():
    parsers = dict(_parsers())
    ranks = parsers["python -m ranks"]
    assert ranks.parse_args(["--model-p", "m.onnx", "--thread-n", "2"]).thread_num == 2
    launch = parsers["orchestrate launch rank-table"]
    assert launch._respell(["--log_d", "x"]) == ["--log-dir", "x"]
    assert launch._respell(["--st"]) == ["--stop-timeout"]
    assert launch._respell(["--s"]) == ["--s"]  # --stop-timeout? --server? argparse says it is ambiguous
    result = run_command(orchestrate_command("launch", "rank-table", "t.json", "--s", "1", "--", "true"))
    assert result.returncode == 2 and "ambiguous option: --s could match --server, --stop-timeout" in result.stderr


def test_rank_program_runs_with_dash_case_flags(sample):
    result = run_command(python_command(
        "-m", "ranks", f"--model-path={sample('add')}", "--thread-num=1", "--device-id", "0", "--rank-id=0",
        "--world-size=1", "--target=cpu"), check=True)
    assert result.stdout.startswith("tensor's name is:z")


@pytest.mark.multiprocess
def test_predict_runs_with_snake_case_flags(sample, tmp_path):
    result = run_command(orchestrate_command(
        "predict", f"--model_path={sample('mlp')}", "--devices=0", "--thread_num", "1", "--quiet",
        "--output", str(tmp_path / "y.npz")), check=True)
    assert (tmp_path / "y.npz").is_file() and result.stdout == ""


def test_sample_and_rank_table_run_with_snake_case_flags(tmp_path):
    run_command(orchestrate_command("sample", "mlp", "--external_data", "--set", "width=8", "--set", "hidden=1024",
                                    "--no_progress", "-o", str(tmp_path / "m.onnx")), check=True)
    assert (tmp_path / "m.onnx.data").is_file()
    (tmp_path / "hccn.conf").write_text("address_0=192.1.27.6\n")
    run_command(orchestrate_command("rank-table", "--devices", "0", "--server", "127.0.0.1", "--hccn_conf",
                                    str(tmp_path / "hccn.conf"), "-o", str(tmp_path / "t.json")), check=True)
    assert '"device_ip": "192.1.27.6"' in (tmp_path / "t.json").read_text()
    result = run_command(orchestrate_command("rank-table", "--devices", "0", "--server", "10.77.0.1,10.77.0.2",
                                             "--server", "10.77.0.3"), check=True)
    assert [s["server_id"] for s in json.loads(result.stdout)["server_list"]] == ["10.77.0.1", "10.77.0.2", "10.77.0.3"]


# -- 3. exit codes: 2 for a usage error, 1 for a runtime error, in every command


@pytest.fixture
def ini(tmp_path):
    path = tmp_path / "config_file.ini"
    path.write_text(f"[ascend_context]\nrank_table_file={TABLES / 'local_2p.json'}\n")
    return path


@pytest.fixture
def files(tmp_path, sample, ini):
    bad_ini = tmp_path / "bad.ini"
    bad_ini.write_text("thread_num=2\n[cpu_context\n")
    bad_table = tmp_path / "bad_table.json"
    bad_table.write_text('{"version": "1.0", "server_list": [')
    garbage = tmp_path / "garbage.onnx"
    garbage.write_bytes(b"\x08\x07not an onnx model at all" * 10)
    return {
        "add": str(sample("add")), "mlp": str(sample("mlp")), "ini": str(ini), "bad_ini": str(bad_ini),
        "bad_table": str(bad_table), "garbage": str(garbage), "out": str(tmp_path / "out"),
        "fails": str(write_failing_model(tmp_path / "fails.onnx")),
        "unbuildable": str(write_unbuildable_model(tmp_path / "unbuildable.onnx")),
    }


RANKS = ["python", "-m", "ranks"]
EXIT_CODE_CASES = {
    # usage errors: exit code 2
    "ranks bad value": (RANKS + ["--model_path={add}", "--thread_num=many"], 2, "argument --thread_num: must be an integer"),
    "ranks missing input": (RANKS + ["--model_path={add}", "--input={out}/x.npy"], 2, "out/x.npy does not exist"),
    "ranks malformed ini": (RANKS + ["--model_path={add}", "--config_file={bad_ini}"], 2, "ConfigError: "),
    "rank missing model": (["rank", "--model_path={out}/none.onnx"], 2, "ModelNotFoundError: "),
    "sample bad --set": (["sample", "mlp", "-o", "{out}/m.onnx", "--set", "depth=3"], 2, "--set 'depth=3': expected KEY=VALUE"),
    "sample bad --set word": (["sample", "image", "-o", "{out}/m.onnx", "--set", "layout=NCWH"], 2,
                              "layout must be 'NCHW' or 'NHWC', got 'NCWH'"),
    "sample bad flag": (["sample", "mlp", "-o", "{out}/m.onnx", "--colour"], 2, "unrecognized arguments: --colour"),
    "shard --tp 0": (["shard", "{mlp}", "--tp", "0", "-o", "{out}"], 2, "argument --tp: must be a positive integer, got 0"),
    "shard missing model": (["shard", "{out}/none.onnx", "--tp", "2", "-o", "{out}"], 2, "none.onnx does not exist"),
    "rank-table bad --devices": (["rank-table", "--devices", "0,x", "--server", "h"], 2, "--devices must be comma-separated"),
    "rank-table malformed table": (["rank-table", "--check", "{bad_table}"], 2, "RankTableError: rank table"),
    "predict --batch 0": (["predict", "--model-path", "{mlp}", "--batch", "0"], 2, "argument --batch: must be a positive integer"),
    "predict bad --devices": (["predict", "--model-path", "{mlp}", "--devices", "a,b"], 2, "--devices must be comma-separated"),
    "launch mpi -n 0": (["launch", "mpi", "-n", "0", "--", "true"], 2, "argument -n/-np/--np: must be a positive integer"),
    "launch rank-table malformed table": (["launch", "rank-table", "{bad_table}", "--config-file", "{ini}", "--", "true"],
                                          2, "rank table"),
    "launch rank-table no --config-file": (["launch", "rank-table", str(TABLES / "local_2p.json"), "--", "true"],
                                           2, "the following arguments are required: --config-file"),
    # runtime errors: exit code 1
    "ranks model fails": (RANKS + ["--model_path={fails}"], 1, "ModelError: running "),
    "rank model cannot build": (["rank", "--model_path={unbuildable}"], 1, "ModelError: ONNX Runtime could not build"),
    "sample disk full": (["sample", "add", "-o", "/dev/full"], 1, "writing -o /dev/full failed: No space left on device"),
    "shard corrupt model": (["shard", "{garbage}", "--tp", "2", "-o", "{out}"], 1, "is not a readable ONNX model"),
    "rank-table disk full": (["rank-table", "--devices", "0", "--server", "127.0.0.1", "-o", "/dev/full"], 1,
                             "writing -o /dev/full failed: No space left on device"),
    "predict model fails": (["predict", "--model-path", "{fails}", "--devices", "0"], 1, "ModelError: [worker for device 0"),
    "launch mpi rank fails": (["launch", "mpi", "-n", "2", "--", *RANKS, "--model_path={fails}"], 1,
                              "failed: exit code 1"),
    "launch rank-table rank fails": (["launch", "rank-table", str(TABLES / "local_2p.json"), "--config-file", "{ini}",
                                      "--", *RANKS, "--model_path={fails}"], 1, "failed: exit code 1"),
}


@pytest.mark.parametrize("case", list(EXIT_CODE_CASES))
def test_exit_code_2_for_usage_errors_1_for_runtime_errors(case, files):
    argv, code, message = EXIT_CODE_CASES[case]
    if "/dev/full" in argv and not os.path.exists("/dev/full"):
        pytest.skip("no /dev/full here")
    argv = [a.format(**files) for a in argv]
    command = python_command(*argv[1:]) if argv[0] == "python" else orchestrate_command(*argv)
    result = run_command(command, timeout=100)
    assert result.returncode == code, result.stderr
    assert message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    if code == 2 or not case.startswith("launch"):  # a launch's runtime error quotes the ranks' output too
        lines = error_lines(result.stderr)
        assert len(lines) == 1, result.stderr


def test_a_reader_that_stops_reading_ends_the_command_quietly(tmp_path):
    """``orchestrate shard ... | head -1``: once the reader has gone, no error line, status 141 (128 + SIGPIPE)
    as other command-line tools give; what the command wrote to disk stays."""
    import subprocess

    from conftest import project_env
    from orchestrator import write_sample_model

    model = write_sample_model("transformer", tmp_path / "t.onnx")
    reader, writer = os.pipe()
    os.close(reader)  # the reader is gone before the command writes its first line
    try:
        result = subprocess.run(orchestrate_command("shard", str(model), "--tp", "2", "-o", str(tmp_path / "s")),
                                stdout=writer, stderr=subprocess.PIPE, text=True, env=project_env(), timeout=120)
    finally:
        os.close(writer)
    assert (result.returncode, result.stderr) == (141, "")
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == ["t.manifest.json", "t0.onnx", "t1.onnx"]


def test_sample_takes_a_word_option_as_a_word(tmp_path):
    """``--set layout=NHWC``: seed 000's input layout, from the command line."""
    import onnx

    path = tmp_path / "nhwc.onnx"
    run_command(orchestrate_command("sample", "image", "-o", str(path), "--set", "layout=NHWC", "--set", "size=32"),
                check=True)
    dims = [d.dim_value or d.dim_param for d in onnx.load(path).graph.input[0].type.tensor_type.shape.dim]
    assert dims[1:] == [32, 32, 3]
