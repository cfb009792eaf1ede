"""Sampler names clients use, the diffusers scheduler behind each, and AUTOMATIC1111's names for them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplerSpec:
    class_name: str
    options: dict[str, Any]
    a1111_sampler: str
    a1111_schedule: str | None = None


SAMPLERS: dict[str, SamplerSpec] = {
    "euler": SamplerSpec("EulerDiscreteScheduler", {}, "Euler"),
    "euler_a": SamplerSpec("EulerAncestralDiscreteScheduler", {}, "Euler a"),
    "dpmpp_2m": SamplerSpec("DPMSolverMultistepScheduler", {"use_karras_sigmas": False}, "DPM++ 2M"),
    "dpmpp_2m_karras": SamplerSpec("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}, "DPM++ 2M", "Karras"),
    "unipc": SamplerSpec("UniPCMultistepScheduler", {}, "UniPC"),
    "ddim": SamplerSpec("DDIMScheduler", {}, "DDIM"),
}


def make_scheduler(name: str, base_config: Any) -> Any:
    """A fresh scheduler instance: schedulers keep state between steps, so never share one across jobs."""
    import diffusers

    spec = SAMPLERS[name]
    cls = getattr(diffusers, spec.class_name)
    return cls.from_config(base_config, **spec.options)
