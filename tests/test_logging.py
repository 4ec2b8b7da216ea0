"""ORCH_LOG_LEVEL: the project's loggers say what they do when asked, and nothing but warnings otherwise."""

from __future__ import annotations

import subprocess
import sys

from conftest import project_env

SCRIPT = (
    "import numpy as np, orchestrator as mslite\n"
    "m = mslite.Model(); m.build_from_file({path!r}, mslite.ModelType.ONNX)\n"
    "print('OUT', m.predict([np.ones((2, 2), np.float32)] * 2)[0].get_data_to_numpy().sum())\n"
)


def _run(path, level):
    env = project_env()
    env.pop("ORCH_LOG_LEVEL", None)
    if level is not None:
        env["ORCH_LOG_LEVEL"] = level
    return subprocess.run([sys.executable, "-c", SCRIPT.format(path=str(path))], env=env, capture_output=True,
                          text=True, timeout=60)


def test_info_level_says_what_was_built_with_pid_and_host(sample):
    result = _run(sample("add"), "INFO")
    assert result.returncode == 0, result.stderr
    assert "OUT 8.0" in result.stdout
    assert "[orchestrator.model pid " in result.stderr and "INFO: built " in result.stderr, result.stderr


def test_default_level_is_quiet(sample):
    result = _run(sample("add"), None)
    assert result.returncode == 0 and result.stderr == "", result.stderr


def test_a_bad_level_is_one_warning_line(sample):
    result = _run(sample("add"), "LOUD")
    assert result.returncode == 0, result.stderr
    assert result.stderr.strip().splitlines() == [
        "ORCH_LOG_LEVEL='LOUD' is not a logging level (DEBUG, INFO, WARNING, ERROR); using WARNING"
    ]
