"""The master side: the MindSpore Lite-style API, batch-split master, worker pool, slicing, serving."""

from ranks import *  # noqa: F401,F403  the single-process API is part of ours
