"""SDXL base 1.0's architecture with random weights, saved as a diffusers folder (timings are real, images
are noise). The configs in bench/sdxl_arch are the real model's; the text encoders take the byte-level
tokenizer, so their vocabulary is 514 tokens instead of 49408 (an embedding lookup: no cost to speak of).
"""

from __future__ import annotations

import json
from pathlib import Path

ARCH = Path(__file__).with_name("sdxl_arch")
# Random weights at full scale overflow fp16 activations; halved they stay finite (as in the baseline probe).
WEIGHT_SCALE = 0.5
# The UNet at an eighth of its width (the text encoders, VAE and scheduler stay SDXL's): what the CPU test of
# this build runs, so the real configs are exercised without a full UNet on a CPU.
NARROW_UNET = {"block_out_channels": [32, 64, 128], "attention_head_dim": [1, 2, 4]}


def _config(name: str) -> dict[str, object]:
    config: dict[str, object] = json.loads((ARCH / f"{name}.json").read_text())
    return {key: value for key, value in config.items() if not key.startswith("_") and key != "architectures"}


def build_random_sdxl(target: Path, device: str, seed: int = 0, narrow_unet: bool = False) -> Path:
    """Build on `device` (fast on a GPU), save in fp16 to `target`, and return it."""
    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from engines.tiny import BYTE_LEVEL_VOCAB_SIZE, save_sdxl_folder

    if (target / "model_index.json").exists():
        return target
    # Random initialisation in fp16 is a GPU's; a CPU builds in fp32 and saves in fp16 like the GPU.
    build_dtype = torch.float16 if device.startswith("cuda") else torch.float32
    tokens = {"vocab_size": BYTE_LEVEL_VOCAB_SIZE, "bos_token_id": 512, "eos_token_id": 513, "pad_token_id": 513}
    torch.manual_seed(seed)
    with torch.device(device):
        unet = UNet2DConditionModel(**{**_config("unet"), **(NARROW_UNET if narrow_unet else {})}).to(build_dtype)
        vae = AutoencoderKL(**_config("vae")).to(build_dtype)
        text_encoder = CLIPTextModel(CLIPTextConfig(**{**_config("text_encoder"), **tokens})).to(build_dtype)
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**{**_config("text_encoder_2"), **tokens}))
    with torch.no_grad():
        for module in (unet, vae, text_encoder, text_encoder_2):
            for parameter in module.parameters():
                parameter.mul_(WEIGHT_SCALE)
            module.to(torch.float16)
    return save_sdxl_folder(
        target,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        scheduler=EulerDiscreteScheduler.from_config(_config("scheduler")),
    )
