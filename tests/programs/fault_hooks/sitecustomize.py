"""Fault injection for tests/test_fault_matrix.py, in every Python process whose PYTHONPATH holds this directory.

Inert unless ``FAULT_MATRIX_DIR`` is set. Then ``onnxruntime.InferenceSession.run`` and
``run_with_iobinding`` are wrapped: before each run, a file ``$FAULT_MATRIX_DIR/fault.<this pid>``
is looked for; when it is there it is removed (a fault fires once; ``raise`` at the first plain
``run``, failing every I/O-bound run before it), ``fired.<this pid>`` is written
with the time, and this process, inside a request, does what the file says:

    raise    raise RuntimeError (the model failing)
    exit0    os._exit(0)
    sigkill  SIGKILL itself
    sigsegv  SIGSEGV itself
    sigstop  SIGSTOP itself (a hang)

So a test picks its victim by pid (a ParallelPredictor worker, a ShardedModel rank) and the fault
happens mid-request, where the callers promise to notice it. The wrapper is installed when
onnxruntime is first imported; a process that never imports it is untouched.
"""

import os
import sys

_DIR = os.environ.get("FAULT_MATRIX_DIR")


def _fire(method: str) -> None:
    path = os.path.join(_DIR, f"fault.{os.getpid()}")
    try:
        with open(path) as f:
            kind = f.read().strip()
        # A model that raises fails on every path: ParallelPredictor's workers catch a failed I/O-bound
        # run and run the model again the plain way, so "raise" stays armed until a plain run.
        if kind != "raise" or method == "run":
            os.unlink(path)
    except OSError:
        return
    import signal
    import time

    with open(os.path.join(_DIR, f"fired.{os.getpid()}.tmp"), "w") as f:
        f.write(f"{kind} {time.time():.6f}\n")
    os.replace(os.path.join(_DIR, f"fired.{os.getpid()}.tmp"), os.path.join(_DIR, f"fired.{os.getpid()}"))
    if kind == "raise":
        raise RuntimeError(f"fault injected in pid {os.getpid()} (raise)")
    if kind == "exit0":
        os._exit(0)
    signum = {"sigkill": signal.SIGKILL, "sigsegv": signal.SIGSEGV, "sigstop": signal.SIGSTOP}[kind]
    os.kill(os.getpid(), signum)


def _patch(module) -> None:
    cls = module.InferenceSession
    for name in ("run", "run_with_iobinding"):
        original = getattr(cls, name)

        def wrapper(self, *args, __original=original, __name=name, **kwargs):
            _fire(__name)
            return __original(self, *args, **kwargs)

        setattr(cls, name, wrapper)


class _Finder:
    """Wraps onnxruntime's loader once, so the class is patched right after the package is executed."""

    @classmethod
    def find_spec(cls, name, path=None, target=None):
        if name != "onnxruntime":
            return None
        sys.meta_path.remove(cls)
        from importlib.machinery import PathFinder

        spec = PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if _DIR:
    sys.meta_path.insert(0, _Finder)
