"""MINDIR models: converted to ONNX through MindSpore, once, and cached beside the file.

``converted_model_file(path)`` is what ``Model.build_from_file`` (and so the rank
program, the batch-split master's workers and the worker pool) calls: a MINDIR
file becomes the path of its ONNX conversion, anything else is returned as it is.

The conversion itself runs in a child process (``ranks._mindir_export``): MindSpore
is imported there, never in a rank or worker, which would otherwise keep its
runtime, threads and libraries for its whole life to read one file once.

Cache layout: ``DIR/.orchestrator-cache/NAME.mindir.KEY.onnx`` beside ``DIR/NAME.mindir``
(or in ``ORCH_MINDIR_CACHE`` when ``DIR`` cannot be written), where ``KEY`` is the
SHA-256 of the file's bytes and of the converter's version. The batch stays as the MINDIR
declares it (free when exported with ``None`` there), as MindSpore Lite would run the file: an unchanged file reuses
its conversion, a changed one gets a new one (and, beside the file, the stale one is
removed). Processes converting the same file at once take turns on a lock file
(``flock``); the winner writes to a temporary name and renames it into place, so a
reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import _env
from ._errors import ModelError, ModelNotFoundError
from ._log import get_logger
from ._mindir_export import ENCRYPTED_MAGIC, WORK_PREFIX, ConversionFailure, check_head

log = get_logger("mindir")

CONVERTER_VERSION = "1"  # part of the cache key: bump when the conversion's output changes
CACHE_DIR_NAME = ".orchestrator-cache"
INSTALL_HINT = "pip install 'orchestrator[mindspore]' (or: pip install mindspore)"
DEFAULT_TOLERANCE = 1e-4
LAUNCHER_PREFIXES = ("OMPI_", "PMIX_", "PMI_", "PRTE_", "MS_")
LAUNCHER_NAMES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "RANK_TABLE_FILE", "RANK_ID", "DEVICE_ID", "RANK_SIZE")


@dataclass
class Conversion:
    """What one conversion produced and how closely it matches MindSpore."""

    source: Path
    onnx_path: Path
    inputs: list = field(default_factory=list)  # [name, numpy dtype str, shape]
    outputs: list = field(default_factory=list)  # [name, shape with -1 for free dims]
    max_abs_diff: float = 0.0
    scale: float = 0.0  # largest |output| MindSpore computed: the tolerance is relative above 1
    dynamic_batch: bool = False
    static_reason: str = ""
    mindspore_version: str = ""
    seconds: float = 0.0
    collectives: int = 0  # AllReduce operators of a per-rank MINDIR, written as com.microsoft AllReduce

    def ok(self, tolerance: float = DEFAULT_TOLERANCE) -> bool:
        return self.max_abs_diff <= tolerance * max(1.0, self.scale)

    def summary(self) -> str:
        spell = lambda shape: "[" + ",".join("batch" if d == -1 else str(d) for d in shape) + "]"  # noqa: E731
        lines = [f"converted {self.source} -> {self.onnx_path} with MindSpore {self.mindspore_version} "
                 f"in {self.seconds:.1f} s"]
        import numpy as np

        lines += [f"input {name}: {np.dtype(dtype).name}{spell([-1] + shape[1:] if self.dynamic_batch else shape)}"
                  for name, dtype, shape in self.inputs]
        lines += [f"output {name}: {spell(shape)}" for name, shape in self.outputs]
        if self.collectives:
            lines.append(f"collectives: {self.collectives} AllReduce (one rank's piece of a sliced network; checked "
                         f"against MindSpore as a world of one)")
        lines.append("batch: free (checked against MindSpore at twice the export batch)" if self.dynamic_batch
                     else f"batch: fixed ({self.static_reason})")
        return "\n".join(lines)


def is_mindir_file(path: str | os.PathLike) -> bool:
    """True for a file to convert: MindSpore's MINDIR (plain or encrypted) by its first bytes, or a *.mindir that is not ONNX.

    An ONNX file starts with its ir_version (protobuf field 1, a varint: byte 0x08); a MINDIR
    with its ir_version string (field 1, length-delimited: 0x0a) followed by producer "MindSpore".
    """
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(64)
    except (IsADirectoryError, FileNotFoundError, PermissionError):
        return False
    if head[:1] == b"\x08":
        return False
    if head.startswith(ENCRYPTED_MAGIC) or (head[:1] == b"\x0a" and b"MindSpore" in head):
        return True
    return path.suffix.lower() == ".mindir"


def converted_model_file(path: str | os.PathLike, *, timeout: float | None = None) -> Path:
    """The file a model loader should build for ``path``: its cached ONNX conversion for a MINDIR file, else ``path``."""
    path = Path(path)
    if not path.is_file() or not is_mindir_file(path):
        return path
    return cached_conversion(path, timeout=timeout)


def cached_conversion(source: str | os.PathLike, *, timeout: float | None = None) -> Path:
    """The ONNX conversion of MINDIR ``source``, converted now unless an unchanged file was converted before.

    Raises ModelError naming the file (and MindSpore's operator, when it cannot export one)
    when it cannot be converted, when MindSpore is missing, or when the conversion's outputs
    differ from MindSpore's by more than the tolerance (then nothing is cached).
    """
    source = Path(source)
    if not source.is_file():
        raise ModelNotFoundError(f"MINDIR file {source} does not exist")
    key = _cache_key(source)
    folder, beside = _cache_folder(source)
    target = folder / f"{source.name}.{key}.onnx"
    if target.is_file():
        return target
    timeout = conversion_timeout() if timeout is None else timeout
    with _file_lock(folder / f"{source.name}.{key}.lock", timeout + 30, source):
        if target.is_file():  # another process converted it while this one waited
            return target
        for left in folder.glob(f".{target.name}.*.partial"):  # by a holder of this lock that was killed
            left.unlink(missing_ok=True)
        partial = folder / f".{target.name}.{os.getpid()}.partial"
        try:
            conversion = convert_mindir(source, partial, timeout=timeout, dynamic_batch="declared")
            if not conversion.ok():
                raise ModelError(
                    f"MINDIR file {source}: its ONNX conversion differs from MindSpore's output by "
                    f"{conversion.max_abs_diff:.3g} (tolerance {DEFAULT_TOLERANCE:g}); not cached"
                )
            os.replace(partial, target)
        finally:
            partial.unlink(missing_ok=True)
        log.info("%s: converted to %s (max abs difference %.3g)", source, target, conversion.max_abs_diff)
        if beside:  # a stale conversion of an earlier version of this very file
            stale = re.compile(re.escape(source.name) + r"\.[0-9a-f]{%d}\.onnx" % len(key))
            for old in folder.glob(f"{source.name}.*.onnx"):
                if old != target and stale.fullmatch(old.name):
                    old.unlink(missing_ok=True)
    return target


def convert_mindir(
    source: str | os.PathLike,
    output: str | os.PathLike,
    *,
    input_shapes: dict[str, list[int]] | None = None,
    seed: int = 0,
    tolerance: float = DEFAULT_TOLERANCE,
    dynamic_batch: bool | str = True,
    dec_key: bytes | None = None,
    dec_mode: str = "AES-GCM",
    timeout: float | None = None,
) -> Conversion:
    """Convert MINDIR ``source`` to ONNX ``output`` with MindSpore, in a child process, and check it.

    Args:
        input_shapes: {input name: shape} to export with (default: the file's, a free batch as 1).
        seed: of the random inputs both runtimes are fed for the check.
        tolerance: a free batch is kept only when the outputs at another batch are this close
            (relative above magnitude 1); the returned ``max_abs_diff`` is for the caller to judge.
        dynamic_batch: try to make dimension 0 free (kept only when checked); ``"declared"``: only
            when the MINDIR file declares it free (exported with ``Tensor(shape=[None, ...])``), as
            MindSpore Lite would run it. Cached conversions use ``"declared"``, so a seed's script that
            fills a batch-1 input from a flat buffer works as with MindSpore Lite.
        dec_key, dec_mode: for an encrypted MINDIR, as ``mindspore.load`` takes them (the plain file
            exists only in the child's temporary folder; cached conversions never decrypt).

    Raises:
        ModelNotFoundError: ``source`` does not exist.
        ModelError: MindSpore is not installed, or the file is not a (plain, whole) MINDIR,
            or MindSpore cannot export one of its operators (named), or the child failed.
    """
    source, output = Path(source), Path(output)
    if not source.is_file():
        raise ModelNotFoundError(f"MINDIR file {source} does not exist" if not source.exists()
                                 else f"MINDIR path {source} is not a file")
    with open(source, "rb") as f:
        head = f.read(16)
    try:
        check_head(head, have_key=bool(dec_key))  # no need to start MindSpore to say the file is empty or encrypted
    except ConversionFailure as exc:
        raise ModelError(f"MINDIR file {source}: {exc}") from None
    if head[:1] == b"\x08":  # ONNX's first field (is_mindir_file): said before asking for MindSpore
        raise ModelError(f"{source} is an ONNX model, not MINDIR: there is nothing to convert; load or run it as it is")
    if importlib.util.find_spec("mindspore") is None:
        raise ModelError(f"{source} is a MINDIR model; converting it to ONNX needs MindSpore, which is not "
                         f"installed: {INSTALL_HINT}")
    timeout = conversion_timeout() if timeout is None else timeout
    with tempfile.TemporaryDirectory(prefix=WORK_PREFIX) as work:
        request = {
            "source": str(source.absolute()), "output": str(output.absolute()),
            "input_shapes": input_shapes or {}, "seed": seed, "tolerance": tolerance,
            "dynamic_batch": dynamic_batch, "parent_pid": os.getpid(), "result": str(Path(work) / "result.json"),
            "dec_key_hex": dec_key.hex() if dec_key else "", "dec_mode": dec_mode,
        }
        request_file = Path(work) / "request.json"
        request_file.write_text(json.dumps(request))
        started = time.monotonic()
        try:
            # cwd: MindSpore writes rank_0/om/analyze_fail.ir where it runs when a graph fails to compile.
            child = subprocess.run([sys.executable, "-m", "ranks._mindir_export", str(request_file)], cwd=work,
                                   env=_child_env(), stdin=subprocess.DEVNULL, capture_output=True, text=True,
                                   timeout=timeout)
        except subprocess.TimeoutExpired:
            raise ModelError(f"converting MINDIR file {source} with MindSpore took longer than {timeout:g} s "
                             f"(ORCH_MINDIR_TIMEOUT); stopped") from None
        result_file = Path(request["result"])
        if not result_file.exists():
            tail = "\n".join(child.stderr.strip().splitlines()[-8:])
            raise ModelError(f"converting MINDIR file {source}: the MindSpore child process (pid {child.pid}) ended "
                             f"with exit code {child.returncode} after {time.monotonic() - started:.1f} s without a "
                             f"result; its last lines:\n{tail}")
        result = json.loads(result_file.read_text())
    if not result["ok"]:
        if result["kind"] == "usage":
            from ._errors import ConfigError

            raise ConfigError(f"MINDIR file {source}: {result['message']}")
        raise ModelError(f"MINDIR file {source}: {result['message']}")
    return Conversion(
        source=source, onnx_path=output, inputs=result["inputs"], outputs=result["outputs"],
        max_abs_diff=result["max_abs_diff"], scale=result["scale"], dynamic_batch=result["dynamic_batch"],
        static_reason=result["static_reason"], mindspore_version=result["mindspore_version"], seconds=result["seconds"],
        collectives=result["collectives"],
    )


def conversion_timeout() -> float:
    value = _env.MINDIR_TIMEOUT.get_float()
    if value is None or value <= 0:
        raise ValueError(f"ORCH_MINDIR_TIMEOUT must be a positive number of seconds, got {_env.MINDIR_TIMEOUT.get()!r}")
    return value


def _cache_key(source: Path) -> str:
    digest = hashlib.sha256(f"orchestrator-mindir-{CONVERTER_VERSION}\0".encode())
    with open(source, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()[:20]


def _cache_folder(source: Path) -> tuple[Path, bool]:
    """(folder, True) beside the file when it can be written there, else (ORCH_MINDIR_CACHE, False)."""
    beside = source.absolute().parent / CACHE_DIR_NAME
    try:
        beside.mkdir(exist_ok=True)
        if os.access(beside, os.W_OK | os.X_OK):
            return beside, True
    except OSError:
        pass
    folder = Path(_env.MINDIR_CACHE.get()).expanduser()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ModelError(f"cannot cache the ONNX conversion of {source}: {beside.parent} is not writable and "
                         f"neither is {folder} (ORCH_MINDIR_CACHE): {exc}") from None
    return folder, False


@contextlib.contextmanager
def _file_lock(path: Path, timeout: float, source: Path):
    """Hold an exclusive ``flock`` on ``path``, waiting at most ``timeout`` s; the lock file is removed on release.

    A waiter that got the lock checks the file it locked is still the one at ``path``: the
    previous holder unlinks it before unlocking, and a lock on an unlinked file guards nothing.
    """
    deadline = time.monotonic() + timeout
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    raise ModelError(f"waited {timeout:g} s for another process converting MINDIR file {source} "
                                     f"(lock {path}); remove the lock file if no conversion is running") from None
                time.sleep(0.1)
        try:
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def _child_env() -> dict[str, str]:
    # Without the launcher's variables: MindSpore reads mpirun's and torchrun's to join a world of its own.
    env = {k: v for k, v in os.environ.items() if not k.startswith(LAUNCHER_PREFIXES) and k not in LAUNCHER_NAMES}
    env.setdefault("GLOG_v", "3")  # MindSpore's own log: errors only (its warnings are about training and devices)
    # The child imports this package: a checkout that is not installed goes first on its path.
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    return env
