"""The README's first command runs examples/demo.py: it must keep working, every step matching."""

import pytest

from tests.conftest import python_command, run_command, ROOT

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
