"""What a ``servable_config.py`` declares while it is loaded, and which servable a method runs for.

Loading: ``collecting()`` makes a fresh ``Declarations`` current while the
config file runs; ``register.declare_servable`` and ``register.register_method``
write into it. Config files load one at a time (a lock), because the file
calls module-level functions with no handle to pass.

Running: a method function runs with ``running(servable, deadline)`` current,
so ``register.call_servable`` inside it reaches that servable's model.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
from dataclasses import dataclass, field
from typing import Callable

from ._errors import ServableConfigError

MODEL_FORMATS = ("ONNX", "MINDIR")  # a MindIR file is converted to ONNX through MindSpore, once (ranks._mindir)


@dataclass(frozen=True)
class ServableDeclaration:
    servable_file: str
    model_format: str
    with_batch_dim: bool
    options: object = None
    without_batch_dim_inputs: tuple[int, ...] = ()


@dataclass(frozen=True)
class MethodDef:
    name: str
    fn: Callable
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


@dataclass
class Declarations:
    source: str = ""
    servable: ServableDeclaration | None = None
    methods: dict[str, MethodDef] = field(default_factory=dict)


_LOADING = threading.Lock()
_CURRENT: Declarations | None = None
_RUNNING: contextvars.ContextVar = contextvars.ContextVar("serving_servable", default=None)


@contextlib.contextmanager
def collecting(source: str):
    """Make a fresh ``Declarations`` current while ``source`` (a servable_config.py) runs."""
    global _CURRENT
    with _LOADING:
        _CURRENT = Declarations(source=source)
        try:
            yield _CURRENT
        finally:
            _CURRENT = None


def current(what: str) -> Declarations:
    if _CURRENT is None:
        raise ServableConfigError(f"register.{what} belongs in a servable_config.py, which the server loads "
                                  f"(worker.start_servable_in_master / worker.start_servable); it was called outside one")
    return _CURRENT


def method_def(fn: Callable, output_names) -> MethodDef:
    """A method from its function: inputs are its parameters, in order; outputs as registered."""
    if isinstance(output_names, str):
        output_names = [output_names]
    try:
        output_names = tuple(output_names)
    except TypeError:
        raise ServableConfigError(f"register_method: output_names must be a list of str, got {output_names!r}") from None
    if not output_names or not all(isinstance(n, str) and n for n in output_names):
        raise ServableConfigError(f"register_method: output_names must be a non-empty list of str, got {list(output_names)}")
    if len(set(output_names)) != len(output_names):
        raise ServableConfigError(f"register_method: output_names has repeated names: {list(output_names)}")
    params = inspect.signature(fn).parameters.values()
    bad = [p.name for p in params if p.kind not in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if bad:
        raise ServableConfigError(f"method {fn.__name__}: parameters {bad} are not plain positional parameters; "
                                  f"each input of a method is one named parameter")
    inputs = tuple(p.name for p in inspect.signature(fn).parameters.values())
    return MethodDef(fn.__name__, fn, inputs, output_names)


@contextlib.contextmanager
def running(servable, deadline: float):
    token = _RUNNING.set((servable, deadline))
    try:
        yield
    finally:
        _RUNNING.reset(token)


def running_servable(what: str):
    """(servable, deadline) of the method running in this thread."""
    value = _RUNNING.get()
    if value is None:
        raise ServableConfigError(f"register.{what} runs inside a registered method while the server serves a "
                                  f"request; it was called outside one")
    return value
