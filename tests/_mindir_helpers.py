"""MINDIR files for the tests, written by MindSpore itself (tests/mindir_nets.py, in a child process).

MindSpore is the optional ``mindspore`` extra. Without it these tests skip on a developer's machine and
fail in CI (``CI`` set, as .ci/run runs), which installs the extra: no MINDIR test is skipped there.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, project_env

NETS = ROOT / "tests" / "mindir_nets.py"


def require_mindspore() -> None:
    if importlib.util.find_spec("mindspore") is not None:
        return
    message = "MindSpore is not installed: pip install -e '.[test,mindspore]'"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must run the MINDIR tests)", pytrace=False)
    pytest.skip(message)


def build_nets(tmp_path_factory) -> Path:
    """Every network of tests/mindir_nets.py, exported once per test session (about 5 s); tests copy what they change."""
    require_mindspore()
    folder = tmp_path_factory.getbasetemp() / "mindir_nets"
    done = folder / "done"
    if done.exists():
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    result = subprocess.run([sys.executable, str(NETS), str(folder)], cwd=folder, env={**project_env(), "GLOG_v": "3"},
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stdout + result.stderr
    done.touch()
    return folder


def fresh_copy(nets: Path, name: str, into: Path, as_name: str | None = None) -> Path:
    """A copy of ``nets/name`` in ``into``, with no conversion cached beside it yet."""
    into.mkdir(parents=True, exist_ok=True)
    target = into / (as_name or name)
    shutil.copyfile(nets / name, target)
    return target


def reference(nets: Path, name: str) -> dict[str, np.ndarray]:
    with np.load(nets / f"{name}.npz") as data:
        return dict(data)


def cache_files(mindir: Path) -> list[Path]:
    """The conversions cached beside ``mindir``."""
    folder = mindir.parent / ".orchestrator-cache"
    return sorted(folder.glob(f"{mindir.name}.*.onnx")) if folder.is_dir() else []
