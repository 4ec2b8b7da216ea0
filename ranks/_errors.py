"""Exception types of one process: the base of every error of the project, and those of ``ranks``.

Every type derives from ``OrchestratorError`` and from the builtin a user's
``except`` clause would naturally name (``ValueError`` for bad input,
``TimeoutError`` for a wait that ran out, ``FileNotFoundError`` for a missing
model), so both styles of handling work. Each package owns its own errors under
this base: ``launchers._errors`` (launching ranks), ``orchestrator._errors``
(the master side's workers); ``orchestrator`` re-exports them all.

Scripts ported from MindSpore Lite catch what MindSpore Lite raises: a
``TypeError`` for an argument of the wrong type, a ``ValueError`` for a bad
value, a ``RuntimeError`` when building or running a model fails. So
``ConfigError`` and ``InputError`` are both ``ValueError`` and
``RuntimeError`` (MindSpore Lite raises either, depending on whether its
Python layer or its C++ core finds the problem), and their ``*TypeError``
subclasses are also ``TypeError``:

===================  ===========================================================
``ConfigTypeError``  a Context field, model_type, context, ... of the wrong type
``ConfigError``      a bad setting value, an unreadable or invalid config file
``InputTypeError``   a Tensor argument, an input or a shape of the wrong type
``InputError``       inputs that do not fit the model (count, name, dtype, shape)
``ModelError``       a model that cannot be built or run (``RuntimeError``)
===================  ===========================================================
"""

from __future__ import annotations


class OrchestratorError(Exception):
    """Base of every error raised by this project."""


class ConfigError(OrchestratorError, ValueError, RuntimeError):
    """An invalid setting: a Context field, an ini file, a flag."""


class ConfigTypeError(ConfigError, TypeError):
    """A setting or argument of the wrong type (a str where an int belongs, a model_type that is not a ModelType)."""


class RankTableError(ConfigError):
    """A malformed or inconsistent HCCL rank table."""


class ModelError(OrchestratorError, RuntimeError):
    """A model file that cannot be loaded or run."""


class ModelNotFoundError(ModelError, FileNotFoundError):
    """The model file does not exist."""


class InputError(OrchestratorError, ValueError, RuntimeError):
    """Inputs that do not match what the model expects."""


class InputTypeError(InputError, TypeError):
    """An input, tensor argument or shape of the wrong type (a list where an array belongs, a float dimension)."""


class ProviderError(OrchestratorError, RuntimeError):
    """A requested device whose execution provider is not available."""


class ShardError(OrchestratorError, ValueError):
    """A model that cannot be sliced as asked, or shards that do not belong together."""


class CommError(OrchestratorError, RuntimeError):
    """A collective or point-to-point operation that failed."""


class CommTimeoutError(CommError, TimeoutError):
    """A peer that did not answer within the timeout."""


class PortInUseError(CommError):
    """A port a communicator must listen on is taken by another process (a master may retry on other ports)."""


class PeerLostError(CommError, ConnectionError):
    """A peer that exited or closed its connection mid-operation."""


def ort_message(exc: Exception) -> str:
    """The human part of an ONNX Runtime error ("[ONNXRuntimeError] : 2 : INVALID_ARGUMENT : ..." prefix dropped)."""
    text = str(exc).strip()
    if text.startswith("[ONNXRuntimeError]"):
        text = text.split(" : ", 3)[-1]
    return text


def is_ort_error(exc: BaseException) -> bool:
    """One of ONNX Runtime's own exception types (``InvalidArgument``, ``Fail``, ...: plain Exceptions from its
    binding), which the caller says as a ModelError; any other exception keeps its type."""
    return type(exc).__module__.startswith("onnxruntime.")
