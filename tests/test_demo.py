"""The README's first command runs examples/demo.py: it must keep working, every step matching."""

import subprocess

import pytest

from tests.conftest import project_env, python_command, run_command, ROOT

pytestmark = pytest.mark.cli


@pytest.mark.timeout(600)
def test_demo_runs_every_step_and_matches(tmp_path):
    result = run_command(python_command(str(ROOT / "examples" / "demo.py"), "--workdir", str(tmp_path)), timeout=560)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    out = result.stdout
    assert "demo finished: every step matched the unsliced model" in out
    for step in ("=== 1.", "=== 2a.", "=== 2b.", "=== 3a.", "=== 3b.", "=== 3c.", "=== 4."):
        assert step in out
    # Each tensor-parallel way reports the largest difference for both sample models on every rank.
    assert out.count("(ok, tolerance 0.0001)") >= 4 + 4 + 6
    assert "MISMATCH" not in out and "FAILED" not in out
    assert "allreduce -> [3.0, 3.0, 3.0, 3.0] OK" in out


def test_demo_writes_where_orch_demo_dir_says(tmp_path):
    """ORCH_DEMO_DIR (declared in ranks/_env.py) is where the demo's files go when --workdir is not given."""
    env = {**project_env(), "ORCH_DEMO_DIR": str(tmp_path)}
    result = subprocess.run(python_command(str(ROOT / "examples" / "demo.py"), "--quick"), env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert (tmp_path / "image.onnx").is_file()
