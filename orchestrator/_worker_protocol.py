"""Kept only for ``_shared_memory``'s import of ``TensorSpec``: the protocol lives in ``_protocol``.

(The shared-memory module is being moved to its new home by another change;
this file goes when that change imports ``TensorSpec`` from ``_protocol``.)
"""

from ._protocol import TensorSpec  # noqa: F401
