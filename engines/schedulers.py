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


def family_options(prediction: str, zero_snr: bool) -> dict[str, Any]:
    """What a model family asks of every sampler. Zero terminal SNR (Lin et al. 2023) rescales the betas so the
    last timestep is pure noise, and needs trailing timestep spacing so sampling starts there; each diffusers
    scheduler here takes both (and clamps the last alpha_cumprod to 2**-24, so sigma stays finite)."""
    options: dict[str, Any] = {
        "prediction_type": "v_prediction" if prediction == "v" else "epsilon",
        "rescale_betas_zero_snr": zero_snr,
    }
    if zero_snr:
        options["timestep_spacing"] = "trailing"
    return options


def make_scheduler(name: str, base_config: Any, prediction: str = "epsilon", zero_snr: bool = False) -> Any:
    """A fresh scheduler instance: schedulers keep state between steps, so never share one across jobs. The
    model's family (`prediction`, `zero_snr`) overrides what its scheduler config says."""
    import diffusers

    spec = SAMPLERS[name]
    cls = getattr(diffusers, spec.class_name)
    return cls.from_config(base_config, **spec.options, **family_options(prediction, zero_snr))
