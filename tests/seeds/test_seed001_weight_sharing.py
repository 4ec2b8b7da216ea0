"""Seed 001's cross-process weight sharing ("进程间权重共享"): its three-process example, run as the document runs it.

The script (scripts/seed001_weight_sharing.py) is the seed's, changed only where
marked. Its three processes print to one stdout and their prints interleave, so
the test gives each process the script forks its own output file through a
``sitecustomize`` hook (harness, not script: the hook only redirects fds 1 and 2
in each forked child). The seed feeds random inputs, so this test checks that
every process ran and printed a finite [1, 8, 168, 128] result; that shared
weights compute what the plain model computes is tests/test_shared_weights.py's job.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from _seed_run import copy_script
from conftest import project_env
from orchestrator import write_sample_model
from tests._shared_weights_helpers import new_shm_entries, processes_holding_shared_weights, shm_entries, wait_gone

pytestmark = pytest.mark.cli

SITECUSTOMIZE = '''\
# Test harness for tests/seeds/test_seed001_weight_sharing.py (not part of the seed): each process
# forked from the seed's script writes to its own files, <dir>/<pid>.out and <pid>.err.
import os

def _own_output():
    directory = os.environ["SEED_OUTPUT_DIR"]
    pid = os.getpid()
    for fd, suffix in ((1, "out"), (2, "err")):
        target = os.open(os.path.join(directory, f"{pid}.{suffix}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(target, fd)
        os.close(target)

if os.environ.get("SEED_OUTPUT_DIR"):
    os.register_at_fork(after_in_child=_own_output)
'''

RESULT = re.compile(r"share  (?P<index>\d)   \[array\((?P<array>.*?shape=\(1, 8, 168, 128\), dtype=float32)\)\]", re.S)


@pytest.mark.timeout(300)
def test_three_processes_share_one_copy_of_the_weights(tmp_path):
    write_sample_model("unet", tmp_path / "unet.onnx")  # the script's model_path1 = "./unet.onnx"
    script = copy_script("seed001_weight_sharing.py", tmp_path)
    harness, outputs = tmp_path / "harness", tmp_path / "outputs"
    harness.mkdir()
    outputs.mkdir()
    (harness / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = project_env()
    env["PYTHONPATH"] = str(harness) + os.pathsep + env["PYTHONPATH"]
    env["SEED_OUTPUT_DIR"] = str(outputs)
    shm_before = shm_entries()

    result = subprocess.run([sys.executable, script.name], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)

    printed = {int(p.stem): p.read_text() for p in outputs.glob("*.out")}
    errors = {int(p.stem): p.read_text() for p in outputs.glob("*.err")}
    assert result.returncode == 0, f"{result.stderr}\n{errors}"
    assert len(printed) == 3, f"expected the script's three processes, got output from {sorted(printed)}: {errors}"
    by_index = {}
    for pid, text in printed.items():
        [index] = re.findall(r"^index: (\d)$", text, re.M)
        by_index[int(index)] = (pid, text)
        match = RESULT.search(text)
        assert match and match["index"] == index, f"process {pid} printed no result:\n{text[:2000]}\n{errors[pid]}"
        assert not re.search(r"\b(nan|inf)\b", match["array"]), f"process {pid} printed non-finite values"
        assert re.search(rf"^share  {index} spend time: [0-9.e-]+ s$", text, re.M)
    assert sorted(by_index) == [0, 1, 2]

    publisher_pid, publisher_text = by_index[0]
    [handle] = re.findall(r"^shareable handle: (\d+)$", publisher_text, re.M)
    assert int(handle) >> 32 == publisher_pid  # the handle names the publisher (pid << 32 | fd)
    assert f"str of pids: 0, {by_index[1][0]}, {by_index[2][0]}" in publisher_text
    for index in (1, 2):
        pid, text = by_index[index]
        assert f"pid: {pid}\n" in text  # get_model_info("current_pid") is the process's own pid
        assert f"sub process sharehandle: {handle}\n" in text

    pids = sorted(printed)
    assert wait_gone(pids) == []
    assert not set(processes_holding_shared_weights()) & set(pids)
    assert new_shm_entries(shm_before, pids + [os.getpid()]) == []
