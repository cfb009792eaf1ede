"""Write a diffusers SDXL folder as one original-layout (LDM) checkpoint file, as A1111 and civitai share
them, so the single-file loader is tested on a real layout. UNet and VAE only: text encoders missing from
a checkpoint come from the config folder."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
UNET_FIXED = {
    "time_embedding.linear_1": "time_embed.0",
    "time_embedding.linear_2": "time_embed.2",
    "add_embedding.linear_1": "label_emb.0.0",
    "add_embedding.linear_2": "label_emb.0.2",
    "conv_in": "input_blocks.0.0",
    "conv_norm_out": "out.0",
    "conv_out": "out.2",
}
RESNET_NAMES = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
VAE_ATTENTION_NAMES = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_leading(rest: str, names: dict[str, str]) -> str:
    head, _, tail = rest.partition(".")
    if rest.startswith("to_out.0."):
        head, tail = "to_out.0", rest.removeprefix("to_out.0.")
    return f"{names.get(head, head)}.{tail}"


def unet_key(key: str, per_block: int, up_attention_blocks: set[int]) -> str:
    for new, old in UNET_FIXED.items():
        if key.startswith(new + "."):
            return old + key[len(new) :]
    if m := re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = 1 + block * (per_block + 1) + layer
        return f"input_blocks.{index}.0.{_rename_leading(rest, RESNET_NAMES)}" if kind == "resnets" else (
            f"input_blocks.{index}.1.{rest}")  # fmt: skip
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", key):
        return f"input_blocks.{1 + int(m[1]) * (per_block + 1) + per_block}.0.op.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", key):
        return f"middle_block.{2 * int(m[1])}.{_rename_leading(m[2], RESNET_NAMES)}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", key):
        return f"middle_block.1.{m[1]}"
    if m := re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key):
        block, kind, layer, rest = int(m[1]), m[2], int(m[3]), m[4]
        index = block * (per_block + 1) + layer
        return f"output_blocks.{index}.0.{_rename_leading(rest, RESNET_NAMES)}" if kind == "resnets" else (
            f"output_blocks.{index}.1.{rest}")  # fmt: skip
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", key):
        block = int(m[1])
        slot = 2 if block in up_attention_blocks else 1
        return f"output_blocks.{block * (per_block + 1) + per_block}.{slot}.conv.{m[2]}"
    raise KeyError(key)


def vae_key(key: str, up_blocks: int) -> str:
    side, _, rest = key.partition(".")
    if m := re.match(r"(down|up)_blocks\.(\d+)\.resnets\.(\d+)\.(.*)", rest):
        index = int(m[2]) if m[1] == "down" else up_blocks - 1 - int(m[2])
        return f"{side}.{m[1]}.{index}.block.{m[3]}.{m[4].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"down_blocks\.(\d+)\.downsamplers\.0\.conv\.(.*)", rest):
        return f"{side}.down.{m[1]}.downsample.conv.{m[2]}"
    if m := re.match(r"up_blocks\.(\d+)\.upsamplers\.0\.conv\.(.*)", rest):
        return f"{side}.up.{up_blocks - 1 - int(m[1])}.upsample.conv.{m[2]}"
    if m := re.match(r"mid_block\.resnets\.(\d+)\.(.*)", rest):
        return f"{side}.mid.block_{int(m[1]) + 1}.{m[2].replace('conv_shortcut', 'nin_shortcut')}"
    if m := re.match(r"mid_block\.attentions\.0\.(.*)", rest):
        return f"{side}.mid.attn_1.{_rename_leading(m[1], VAE_ATTENTION_NAMES)}"
    if rest.startswith("conv_norm_out."):
        return f"{side}.norm_out.{rest.removeprefix('conv_norm_out.')}"
    return key  # conv_in, conv_out, quant_conv and post_quant_conv keep their names


def ldm_vae_state(vae_folder: Path) -> dict[str, torch.Tensor]:
    """A diffusers VAE's weights under the original (LDM) names, as a single VAE file holds them."""
    up_blocks = len(json.loads((vae_folder / "config.json").read_text())["up_block_types"])
    state = {}
    for key, tensor in load_file(vae_folder / "diffusion_pytorch_model.safetensors").items():
        ldm = vae_key(key, up_blocks)
        if ".mid.attn_1." in ldm and ldm.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor[:, :, None, None]  # attention projections are 1x1 convolutions there
        state[ldm] = tensor.contiguous()
    return state


def write_ldm_checkpoint(diffusers_folder: Path, target: Path, *, v_pred: bool = False, ztsnr: bool = False) -> Path:
    """`v_pred` / `ztsnr`: the keys v-prediction and zero-terminal-SNR checkpoints carry (empty tensors, as
    the ones A1111 and ComfyUI read)."""
    unet_config = json.loads((diffusers_folder / "unet" / "config.json").read_text())
    per_block = unet_config["layers_per_block"]
    up_attention = {i for i, kind in enumerate(unet_config["up_block_types"]) if "CrossAttn" in kind}
    state: dict[str, torch.Tensor] = {}
    for key, tensor in load_file(diffusers_folder / "unet" / "diffusion_pytorch_model.safetensors").items():
        state[UNET_PREFIX + unet_key(key, per_block, up_attention)] = tensor
    for key, tensor in ldm_vae_state(diffusers_folder / "vae").items():
        state[VAE_PREFIX + key] = tensor
    for key, wanted in (("v_pred", v_pred), ("ztsnr", ztsnr)):
        if wanted:
            state[key] = torch.tensor([])
    save_file(state, target)
    return target
