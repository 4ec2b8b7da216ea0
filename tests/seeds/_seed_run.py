"""Running the seeds' own scripts as their documents run them, and reading what they print."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort

from conftest import project_env

SCRIPTS = Path(__file__).resolve().parent / "scripts"

_HEADER = re.compile(r"tensor's name is:(?P<name>\S*) data size is:(?P<size>\d+) tensor elements num is:(?P<num>\d+)")


def copy_script(name: str, into: Path) -> Path:
    """Copy ``scripts/name`` (a file or a folder's files) into ``into``; the path of the copy."""
    source = SCRIPTS / name
    if source.is_dir():
        for item in source.iterdir():
            if item.suffix == ".py":
                shutil.copy(item, into / item.name)
        return into
    return Path(shutil.copy(source, into / source.name))


def run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run a command the way the seed does, in ``cwd``, with the project importable; never hangs."""
    return subprocess.run(argv, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=timeout)


def printed_outputs(stdout: str) -> list[tuple[str, int, int, np.ndarray]]:
    """The seeds' two lines per output tensor -> [(name, data size, element count, values printed)]."""
    lines = stdout.splitlines()
    found = []
    for i, line in enumerate(lines):
        match = _HEADER.search(line)
        if match and i + 1 < len(lines) and lines[i + 1].startswith("output data is:"):
            values = np.array([float(v) for v in lines[i + 1].split(":", 1)[1].split()], np.float32)
            found.append((match["name"], int(match["size"]), int(match["num"]), values))
    return found


def whole_model_outputs(model_path: Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """One plain ONNX Runtime run of the unsliced model: the reference every seed's output is held to."""
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(None, feeds)))


_VALUES = re.compile(r"^output data is: ((?:\S+ ){5})$")


def check_parallel_runner_values(stdout: str, expected: np.ndarray, rtol: float = 0.0) -> None:
    """Seed 000's ``output data is:`` lines hold ``expected`` (exactly as float32, or within ``rtol``).

    The seed's client threads print a value per write(), so another thread's write can land inside a
    line: two values glued ("0.000970.00125", then the line is skipped) or a parallel id glued before a
    value ("1" "0.0011414": the value is read from the token's end). At least one line must come whole.
    """
    lines = [_VALUES.match(line).group(1).split() for line in stdout.splitlines() if _VALUES.match(line)]
    lines = [printed for printed in lines if all(_is_float(token) for token in printed)]
    assert lines, stdout
    for printed in lines:
        assert all(_printed_as(token, want, rtol) for token, want in zip(printed, expected)), (printed, expected)


def _printed_as(token: str, want: float, rtol: float) -> bool:
    for start in range(len(token)):  # str(np.float32) reads back as the same float32
        if _is_float(token[start:]) and np.isclose(np.float32(token[start:]), want, rtol=rtol, atol=rtol * 1e-3):
            return True
    return False


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.count(".") <= 1
