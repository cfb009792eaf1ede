"""Build a tiny SDXL-architecture pipeline with random weights and save it as a diffusers folder.

The folder is loaded with `StableDiffusionXLPipeline.from_pretrained`, the same path real weights take,
so everything downstream of loading is exercised without a model hub. Images it makes are noise.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

TINY_MODEL_NAME = "chara-forge/tiny-sdxl-random"
_FORMAT_VERSION = "1"
_MARKER = "chara_forge_tiny.json"

# SDXL's own noise schedule (stabilityai/stable-diffusion-xl-base-1.0 scheduler_config.json).
SDXL_SCHEDULER_CONFIG = {
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "interpolation_type": "linear",
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
    "use_karras_sigmas": False,
}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map from bytes to printable unicode symbols."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    printable += list(range(ord("®"), ord("ÿ") + 1))
    extra = (b for b in range(256) if b not in printable)
    mapping = {b: chr(b) for b in printable}
    for offset, b in enumerate(extra):
        mapping[b] = chr(256 + offset)
    return dict(sorted(mapping.items()))


def _byte_level_vocab(directory: Path) -> None:
    """Write a CLIP tokenizer whose vocabulary is the 256 byte symbols (with and without `</w>`)."""
    symbols = list(_bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"]
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (directory / "merges.txt").write_text("#version: 0.2\n")


BYTE_LEVEL_VOCAB_SIZE = 514  # 256 byte symbols, each with and without `</w>`, then start and end of text


def byte_level_tokenizer() -> Any:
    """A CLIP tokenizer that needs no downloaded vocabulary (start of text 512, end of text and padding 513)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as vocab_dir:
        _byte_level_vocab(Path(vocab_dir))
        return CLIPTokenizer(
            str(Path(vocab_dir) / "vocab.json"), str(Path(vocab_dir) / "merges.txt"), model_max_length=77
        )


def build_tiny_sdxl(target: Path, seed: int = 0) -> Path:
    """Create the tiny model under `target` (idempotent: an existing complete build is kept)."""
    marker = target / _MARKER
    if marker.exists() and json.loads(marker.read_text()).get("version") == _FORMAT_VERSION:
        return target

    import torch
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # 1. UNet: SDXL's block layout (text_time conditioning, linear projections) at toy width.
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=2,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 2),
        projection_class_embeddings_input_dim=80,  # 6 time ids * 8 + pooled text (32)
        cross_attention_dim=64,  # both text encoders' hidden states concatenated
        norm_num_groups=1,
    )
    # 2. VAE: four levels, so latents are 1/8 of the image side exactly as in SDXL.
    vae = AutoencoderKL(
        block_out_channels=(32, 32, 32, 32),
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        latent_channels=4,
        layers_per_block=1,
        norm_num_groups=8,
        sample_size=64,
        scaling_factor=0.13025,
    )
    # 3. Two CLIP text encoders over a byte-level vocabulary; then the folder.
    text_config = dict(
        bos_token_id=512,
        eos_token_id=513,
        pad_token_id=513,
        hidden_size=32,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=BYTE_LEVEL_VOCAB_SIZE,
        max_position_embeddings=77,
        hidden_act="gelu",
        projection_dim=32,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**text_config))
    identity = {"version": _FORMAT_VERSION, "name": TINY_MODEL_NAME}
    return save_sdxl_folder(
        target,
        unet=unet,
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        scheduler=EulerDiscreteScheduler(**SDXL_SCHEDULER_CONFIG),
        extra_files={_MARKER: json.dumps(identity)},
    )


def save_sdxl_folder(
    target: Path,
    *,
    unet: Any,
    vae: Any,
    text_encoder: Any,
    text_encoder_2: Any,
    scheduler: Any,
    extra_files: dict[str, str] | None = None,
) -> Path:
    """Assemble an SDXL pipeline around the byte-level tokenizer and save it as a standard diffusers folder,
    under a temporary name first so a half-written folder is never taken for a model."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer = byte_level_tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=vae,
        text_encoder=text_encoder,
        text_encoder_2=text_encoder_2,
        tokenizer=tokenizer,
        tokenizer_2=tokenizer,
        unet=unet,
        scheduler=scheduler,
    )
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipe.save_pretrained(tmp)
    for name, text in (extra_files or {}).items():
        (tmp / name).write_text(text)
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def is_tiny_model(path: Path) -> bool:
    return (path / _MARKER).exists()
