"""The one progress bar of the project's long steps (sampling a large model, slicing, checking shards).

tqdm on stderr, left on screen when done. ``enabled`` is tri-state:
None shows it only when stderr is a terminal (so logs and test output stay
clean), True always, False never.
"""

from __future__ import annotations

import sys


def progress_bar(total: int | None, desc: str, *, unit: str = "step", enabled: bool | None = None, **options):
    """A tqdm bar (``update(n)``, ``close()``, a context manager) that draws nothing when disabled.

    ``options`` go to tqdm (e.g. ``unit_scale=True`` for bytes).
    """
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, leave=True, file=sys.stderr, mininterval=0.5,
                disable=None if enabled is None else not enabled, **options)
