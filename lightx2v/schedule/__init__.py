"""Noise schedules and samplers for the denoise loop (everything lives in samplers.py)."""

from lightx2v.schedule.samplers import *  # noqa: F403
from lightx2v.schedule.samplers import __all__  # noqa: F401
