"""Run a pipeline's UNet and VAE decoder through exported networks (TensorRT engines; onnxruntime in
tests) instead of PyTorch, keeping everything else of the diffusers pipeline as it is.

A runner takes the named inputs of engines/onnx_export.py as torch tensors and returns the named
outputs. The torch modules stay in the pipeline for their configs, which it reads, but their weights go
to the meta device: the runners hold their own.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from engines.onnx_export import UNET_INPUTS, unet_call_inputs

Runner = Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]


@dataclass(frozen=True)
class _Output:
    """Stands in for diffusers' output classes (`.sample`, and indexable like their tuples)."""

    sample: torch.Tensor

    def __getitem__(self, index: int) -> torch.Tensor:
        return (self.sample,)[index]


def route_through(pipe: Any, unet: Runner, vae_decoder: Runner) -> None:
    """From now on, `pipe`'s UNet calls and VAE decodes go to the runners."""

    def unet_forward(sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, **kwargs: Any) -> Any:
        values = unet_call_inputs(sample, timestep, encoder_hidden_states, kwargs["added_cond_kwargs"])
        out = unet(dict(zip(UNET_INPUTS, values, strict=True)))["noise_pred"].to(sample.dtype)
        return _Output(out) if kwargs.get("return_dict", True) else (out,)

    def vae_decode(latent: torch.Tensor, return_dict: bool = True, **_: Any) -> Any:
        image = vae_decoder({"latent": latent})["image"].to(latent.dtype)
        return _Output(image) if return_dict else (image,)

    pipe.unet.forward = unet_forward
    pipe.vae.decode = vae_decode
    for module in (pipe.unet, pipe.vae.decoder, pipe.vae.post_quant_conv):
        module.to("meta")
