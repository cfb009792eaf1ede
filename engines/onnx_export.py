"""Export SDXL's UNet and VAE decoder to ONNX with dynamic batch and resolution, for TensorRT (or
onnxruntime) to build from. Inputs and outputs have fixed names, which the TensorRT runner binds by."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

UNET_INPUTS = ("sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids")
UNET_OUTPUTS = ("noise_pred",)
VAE_INPUTS = ("latent",)
VAE_OUTPUTS = ("image",)
OPSET = 18


class UNetForExport(torch.nn.Module):
    """The SDXL UNet with plain tensor inputs (no dicts) and one tensor out."""

    def __init__(self, unet: Any) -> None:
        super().__init__()
        self.unet = unet

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        text_embeds: torch.Tensor,
        time_ids: torch.Tensor,
    ) -> torch.Tensor:
        added = {"text_embeds": text_embeds, "time_ids": time_ids}
        return self.unet(  # type: ignore[no-any-return]
            sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added, return_dict=False
        )[0]


class VaeDecoderForExport(torch.nn.Module):
    """Latents (already divided by the scaling factor) to an image in [-1, 1]."""

    def __init__(self, vae: Any) -> None:
        super().__init__()
        self.vae = vae

    def forward(self, latent: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent, return_dict=False)[0]  # type: ignore[no-any-return]


@dataclass(frozen=True)
class ShapeRange:
    """Batch (UNet rows, so 2 per image with guidance) and image size in pixels that an export must take."""

    min_batch: int = 1
    opt_batch: int = 2
    max_batch: int = 16
    min_side: int = 512
    opt_side: int = 1024
    max_side: int = 1536


DEFAULT_SHAPES = ShapeRange()


def unet_call_inputs(
    sample: torch.Tensor, timestep: Any, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, ...]:
    """A diffusers pipeline's UNet call as UNET_INPUTS, in order. Its timestep (a number or a 0-d tensor)
    becomes one float32 a row, broadcast (stride 0): runners that read raw memory make it contiguous."""
    added = added_cond_kwargs
    timesteps = timestep_per_row(timestep, sample.shape[0], sample.device)
    return sample, timesteps, encoder_hidden_states, added["text_embeds"], added["time_ids"]


def timestep_per_row(timestep: Any, rows: int, device: torch.device) -> torch.Tensor:
    """A UNet call's timestep (a number, a 0-d tensor or one a row) as one float32 a row, broadcast (stride 0)."""
    return torch.as_tensor(timestep, device=device, dtype=torch.float32).reshape(-1).expand(rows)


def unet_example(unet: Any, batch: int, side: int, height: int | None = None) -> tuple[torch.Tensor, ...]:
    """Inputs of the shapes the UNet takes for `batch` rows of `side`² images (`side` wide, `height` high)."""
    config = unet.config
    dtype, device = unet.dtype, unet.device
    height = height or side
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    return (
        torch.randn(batch, config.in_channels, height // 8, side // 8, dtype=dtype, device=device),
        torch.full((batch,), 500.0, dtype=torch.float32, device=device),
        torch.randn(batch, 77, config.cross_attention_dim, dtype=dtype, device=device),
        torch.randn(batch, text_dim, dtype=dtype, device=device),
        torch.tensor([[height, side, 0, 0, height, side]] * batch, dtype=dtype, device=device),
    )


def vae_example(vae: Any, batch: int, side: int) -> tuple[torch.Tensor, ...]:
    latent = side // 8
    channels = vae.config.latent_channels
    return (torch.randn(batch, channels, latent, latent, dtype=vae.dtype, device=vae.device),)


def export_unet(unet: Any, path: Path, shapes: ShapeRange) -> Path:
    dynamic = {
        "sample": {0: "batch", 2: "height", 3: "width"},
        "timestep": {0: "batch"},
        "encoder_hidden_states": {0: "batch"},
        "text_embeds": {0: "batch"},
        "time_ids": {0: "batch"},
        "noise_pred": {0: "batch", 2: "height", 3: "width"},
    }
    example = unet_example(unet, shapes.opt_batch, shapes.opt_side)
    return _export(UNetForExport(unet), example, path, UNET_INPUTS, UNET_OUTPUTS, dynamic)


def export_vae_decoder(vae: Any, path: Path, shapes: ShapeRange) -> Path:
    dynamic = {"latent": {0: "batch", 2: "height", 3: "width"}, "image": {0: "batch", 2: "height", 3: "width"}}
    example = vae_example(vae, 1, shapes.opt_side)
    return _export(VaeDecoderForExport(vae), example, path, VAE_INPUTS, VAE_OUTPUTS, dynamic)


def _export(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    path: Path,
    inputs: tuple[str, ...],
    outputs: tuple[str, ...],
    dynamic: dict[str, dict[int, str]],
) -> Path:
    """TorchScript-based export (no onnxscript needed); weights over 2 GB go to external data beside `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter warns about tracing Python control flow it resolves
        torch.onnx.export(
            module.eval(),
            example,
            str(partial),
            input_names=list(inputs),
            output_names=list(outputs),
            dynamic_axes=dynamic,
            opset_version=OPSET,
            dynamo=False,
            do_constant_folding=True,
        )
    partial.rename(path)
    return path
