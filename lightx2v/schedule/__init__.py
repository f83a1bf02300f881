"""Noise schedules and samplers for the denoise loop."""

from lightx2v.schedule.samplers import (
    DISTILL_SHIFT,
    DISTILL_STEP_LISTS,
    SAMPLER_NAMES,
    DistillFlowSampler,
    EulerFlowSampler,
    FlowSampler,
    FlowSchedule,
    UniPCFlowSampler,
    distill_settings,
    is_step_distilled,
    make_sampler,
)

__all__ = [
    "DISTILL_SHIFT",
    "DISTILL_STEP_LISTS",
    "SAMPLER_NAMES",
    "DistillFlowSampler",
    "EulerFlowSampler",
    "FlowSampler",
    "FlowSchedule",
    "UniPCFlowSampler",
    "distill_settings",
    "is_step_distilled",
    "make_sampler",
]
