"""Progress bars of the long steps: on stderr, left on screen, shown by default only when stderr is a terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import termios

import pytest

from tests.conftest import orchestrate_command, project_env, run_command

pytestmark = pytest.mark.cli


def run_with_terminal_stderr(args: list[str], timeout: float = 120) -> tuple[int, str, str]:
    """Run with stderr on a pseudo-terminal (as in an interactive shell); returns (code, stdout, terminal text)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))  # a fresh pty is 0 columns wide
    try:
        proc = subprocess.Popen(args, env=project_env(), stdout=subprocess.PIPE, stderr=slave, text=True)
    finally:
        os.close(slave)
    chunks = []
    try:
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child side closed
                break
            if not data:
                break
            chunks.append(data)
        out = proc.stdout.read()
        code = proc.wait(timeout)
    finally:
        os.close(master)
        proc.kill()
        proc.stdout.close()
    return code, out, b"".join(chunks).decode(errors="replace")


SAMPLE = ["sample", "mlp", "--set", "width=64", "--set", "hidden=128"]


def test_sample_shows_a_bar_on_a_terminal_and_leaves_it(tmp_path):
    code, out, terminal = run_with_terminal_stderr(orchestrate_command(*SAMPLE, "-o", str(tmp_path / "m.onnx")))
    assert code == 0, terminal
    assert "sample mlp: 100%" in terminal.rstrip().splitlines()[-1].split("\r")[-1]  # left on screen when done
    assert out == f"wrote {tmp_path / 'm.onnx'}\n"


def test_no_bar_when_stderr_is_not_a_terminal_unless_forced(tmp_path):
    result = run_command(orchestrate_command(*SAMPLE, "-o", str(tmp_path / "m.onnx")), check=True)
    assert result.stderr == ""
    result = run_command(orchestrate_command(*SAMPLE, "-o", str(tmp_path / "m.onnx"), "--progress"), check=True)
    assert "sample mlp: 100%" in result.stderr


def test_no_progress_turns_the_bar_off_on_a_terminal(tmp_path):
    code, _, terminal = run_with_terminal_stderr(orchestrate_command(*SAMPLE, "-o", str(tmp_path / "m.onnx"),
                                                                     "--no-progress"))
    assert code == 0 and terminal == ""


def test_shard_and_its_check_show_their_bars(sample, tmp_path):
    model = sample("mlp")
    result = run_command(orchestrate_command("shard", str(model), "--tp", "2", "-o", str(tmp_path / "s"), "--check",
                                             "--progress"), check=True)
    assert f"shard {model.name} tp=2: 100%" in result.stderr
    assert f"check {model.name} tp=2: 100%|" in result.stderr and "5/5" in result.stderr
    assert result.stdout.splitlines()[-1].endswith(": ok")
    code, out, terminal = run_with_terminal_stderr(orchestrate_command(
        "shard", str(model), "--tp", "2", "-o", str(tmp_path / "q"), "--check", "--quiet"))
    assert code == 0 and terminal == "" and out.splitlines()[-1].endswith(": ok")


def test_write_sample_model_counts_every_weight_byte(tmp_path, capsys):
    from orchestrator import write_sample_model

    write_sample_model("transformer", tmp_path / "t.onnx", progress=True, d_model=32, heads=4, layers=2, ffn=64)
    # 2 layers x (4 attention 32x32 + 32x64 + 64x32) float32 weights, made then written
    total = 2 * 2 * (4 * 32 * 32 + 2 * 32 * 64) * 4
    err = capsys.readouterr().err
    assert "sample transformer: 100%" in err and f"{total // 1024}k/{total // 1024}k" in err
