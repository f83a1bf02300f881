"""Noise schedules and samplers for the denoise loop."""

from lightx2v.schedule.samplers import (
    SAMPLER_NAMES,
    EulerFlowSampler,
    FlowSampler,
    FlowSchedule,
    UniPCFlowSampler,
    make_sampler,
)

__all__ = [
    "SAMPLER_NAMES",
    "EulerFlowSampler",
    "FlowSampler",
    "FlowSchedule",
    "UniPCFlowSampler",
    "make_sampler",
]
