"""``from orchestrator.serving.worker import register``: the same module as ``orchestrator.serving.register``."""

from orchestrator.serving.register import *  # noqa: F401,F403  (MindSpore Serving's import path)
from orchestrator.serving.register import __all__  # noqa: F401
