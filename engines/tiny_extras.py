"""Tiny companions for the tiny SDXL model: ControlNets, a depth estimator and LoRAs, with random weights.

Each is saved in the format real weights come in and loaded through the same code path, so ControlNet,
depth and LoRA handling run end to end without a model hub. Like the tiny model, they make noise.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

CONTROL_TYPES = ("openpose", "depth", "canny")
_MARKER = "chara_forge_tiny.json"


def _built(target: Path) -> bool:
    return (target / _MARKER).exists()


def _finish(tmp: Path, target: Path, kind: str) -> Path:
    (tmp / _MARKER).write_text(json.dumps({"kind": kind}))
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)
    return target


def _partial(target: Path) -> Path:
    tmp = target.with_name(target.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


def build_tiny_controlnet(base: Path, target: Path, seed: int) -> Path:
    """A ControlNet shaped like the tiny UNet (as `ControlNetModel.from_unet` makes one).

    from_unet zeroes the output convolutions, as training starts; these get small random weights instead,
    so the control image visibly changes the result."""
    if _built(target):
        return target
    import torch
    from diffusers import ControlNetModel, UNet2DConditionModel

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    with torch.no_grad():
        for name, parameter in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
                parameter.normal_(0.0, 0.5)
    tmp = _partial(target)
    controlnet.save_pretrained(tmp)
    return _finish(tmp, target, "controlnet")


def build_tiny_depth_model(target: Path, seed: int = 0) -> Path:
    """A DPT depth estimator (transformers) at toy width, with its image processor."""
    if _built(target):
        return target
    import torch
    from transformers import DPTConfig, DPTForDepthEstimation
    from transformers.models.dpt.image_processing_pil_dpt import DPTImageProcessorPil

    torch.manual_seed(seed)
    config = DPTConfig(
        hidden_size=32,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=64,
        patch_size=8,
        neck_hidden_sizes=[8, 16, 32, 32],
        fusion_hidden_size=16,
        backbone_out_indices=[0, 1, 2, 3],
        head_in_index=-1,
    )
    tmp = _partial(target)
    DPTForDepthEstimation(config).save_pretrained(tmp)
    DPTImageProcessorPil(size={"height": 64, "width": 64}).save_pretrained(tmp)
    return _finish(tmp, target, "depth")


def build_tiny_lora(base: Path, target_file: Path, seed: int, rank: int = 4) -> Path:
    """A LoRA for the tiny UNet's attention, made with peft and saved as diffusers' LoRA file."""
    if target_file.exists():
        return target_file
    import torch
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    config = LoraConfig(
        r=rank, lora_alpha=rank, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]
    )
    unet.add_adapter(config)
    target_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = target_file.with_name(target_file.stem + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    StableDiffusionXLPipeline.save_lora_weights(tmp, unet_lora_layers=get_peft_model_state_dict(unet))
    (tmp / "pytorch_lora_weights.safetensors").rename(target_file)
    shutil.rmtree(tmp)
    return target_file


def build_tiny_embedding(target_file: Path, seed: int, vectors: int = 2, width: int = 32) -> Path:
    """An SDXL textual-inversion embedding for the tiny model, as A1111 and ComfyUI save them: one safetensors
    file with `clip_l` and `clip_g`, each (vectors, width) (the tiny encoders are both 32 wide). Its vectors
    are far larger than the tiny model's own token embeddings, so naming it visibly changes an image."""
    if target_file.exists():
        return target_file
    import torch
    from safetensors.torch import save_file

    generator = torch.Generator().manual_seed(seed)
    tensors = {key: torch.randn(vectors, width, generator=generator) for key in ("clip_l", "clip_g")}
    target_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = target_file.with_name(target_file.name + ".partial")
    save_file(tensors, str(tmp))
    tmp.rename(target_file)
    return target_file


def build_tiny_companions(base: Path) -> dict[str, Path]:
    """ControlNets of every type and a depth model beside the tiny model: {name: folder}."""
    found = {
        kind: build_tiny_controlnet(base, base.parent / f"{base.name}-controlnet-{kind}", seed)
        for seed, kind in enumerate(CONTROL_TYPES, start=1)
    }
    found["depth_model"] = build_tiny_depth_model(base.parent / f"{base.name}-depth")
    found[TINY_IP_ADAPTER] = build_tiny_ip_adapter(base, base.parent / f"{base.name}-ip-adapter")
    return found


def build_tiny_upscaler(target_file: Path, scale: int, seed: int = 0) -> Path:
    """An RRDBNet (ESRGAN / Real-ESRGAN's architecture) at toy width, saved as Real-ESRGAN's .pth files are:
    a state dict under `params_ema`. x2 models see a pixel-unshuffled input, as RealESRGAN_x2plus does."""
    if target_file.exists():
        return target_file
    import torch
    from spandrel.architectures.ESRGAN import ESRGAN

    torch.manual_seed(seed)
    model = ESRGAN(num_filters=8, num_blocks=1, scale=scale, shuffle_factor=2 if scale == 2 else None)
    target_file.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"params_ema": model.state_dict()}, target_file)
    return target_file


def build_tiny_segmenter(target_file: Path) -> Path:
    """An ONNX "segmentation" model in U^2-Net's input and output layout whose mask is the input's
    brightness: bright parts are the subject. Tests can predict exactly where the alpha must be."""
    if target_file.exists():
        return target_file
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("ReduceMean", ["input"], ["mask"], axes=[1], keepdims=1)],
        "brightness-mask",
        [helper.make_tensor_value_info("input", TensorProto.FLOAT, [1, 3, "height", "width"])],
        [helper.make_tensor_value_info("mask", TensorProto.FLOAT, [1, 1, "height", "width"])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    target_file.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, target_file)
    return target_file


def build_tiny_image_classifier(target: Path, flag_everything: bool) -> Path:
    """A ViT image classifier at toy width with labels `normal` and `nsfw`. Its head is set so that it
    calls every image `nsfw` (flag_everything) or `normal`, which makes filter tests deterministic."""
    if _built(target):
        return target
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessor

    config = ViTConfig(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
        num_labels=2,
        id2label={0: "normal", 1: "nsfw"},
        label2id={"normal": 0, "nsfw": 1},
    )
    model = ViTForImageClassification(config)
    with torch.no_grad():
        model.classifier.weight.zero_()
        model.classifier.bias.copy_(torch.tensor([0.0, 12.0] if flag_everything else [12.0, 0.0]))
    tmp = _partial(target)
    model.save_pretrained(tmp)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp)
    return _finish(tmp, target, "image-classifier")


TINY_IP_ADAPTER = "tiny-plus"
TINY_IP_WEIGHT = "sdxl_models/ip-adapter-plus_tiny.safetensors"


def build_tiny_ip_adapter(base: Path, target: Path, seed: int = 7) -> Path:
    """An IP-Adapter "plus" for the tiny UNet in h94/IP-Adapter's layout: a CLIP vision encoder at toy width in
    `sdxl_models/image_encoder` and one flat safetensors file of the original Resampler (`image_proj.*`) and
    per-cross-attention key/value projections (`ip_adapter.{1,3,5,...}.to_{k,v}_ip.weight`). diffusers'
    `load_ip_adapter` converts it exactly as it converts the real file."""
    if _built(target):
        return target
    import torch
    from diffusers import UNet2DConditionModel
    from safetensors.torch import save_file
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_pretrained(base / "unet")
    cross_dim = unet.config.cross_attention_dim
    encoder_config = CLIPVisionConfig(
        hidden_size=32,
        projection_dim=48,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=37,
        image_size=32,
        patch_size=8,
    )
    tmp = _partial(target)
    CLIPVisionModelWithProjection(encoder_config).save_pretrained(tmp / "sdxl_models" / "image_encoder")

    def weight(*shape: int, scale: float = 0.2) -> torch.Tensor:
        return torch.randn(*shape) * scale

    hidden, inner, queries, embed = 64, 64, 4, encoder_config.hidden_size  # one head of 64, as diffusers reads
    tensors: dict[str, torch.Tensor] = {
        "image_proj.latents": weight(1, queries, hidden, scale=hidden**-0.5),
        "image_proj.proj_in.weight": weight(hidden, embed),
        "image_proj.proj_in.bias": torch.zeros(hidden),
        "image_proj.proj_out.weight": weight(cross_dim, hidden),
        "image_proj.proj_out.bias": torch.zeros(cross_dim),
        "image_proj.norm_out.weight": torch.ones(cross_dim),
        "image_proj.norm_out.bias": torch.zeros(cross_dim),
    }
    for layer in range(4):  # diffusers builds the Resampler four blocks deep
        prefix = f"image_proj.layers.{layer}"
        for norm in ("0.norm1", "0.norm2", "1.0"):
            tensors[f"{prefix}.{norm}.weight"] = torch.ones(hidden)
            tensors[f"{prefix}.{norm}.bias"] = torch.zeros(hidden)
        tensors[f"{prefix}.0.to_q.weight"] = weight(inner, hidden)
        tensors[f"{prefix}.0.to_kv.weight"] = weight(2 * inner, hidden)
        tensors[f"{prefix}.0.to_out.weight"] = weight(hidden, inner)
        tensors[f"{prefix}.1.1.weight"] = weight(4 * hidden, hidden)
        tensors[f"{prefix}.1.3.weight"] = weight(hidden, 4 * hidden)
    key = 1
    for name in unet.attn_processors:
        if name.endswith("attn1.processor"):
            continue
        block = name.split(".")
        if block[0] == "mid_block":
            width = unet.config.block_out_channels[-1]
        elif block[0] == "up_blocks":
            width = list(reversed(unet.config.block_out_channels))[int(block[1])]
        else:
            width = unet.config.block_out_channels[int(block[1])]
        # Strong enough that a reference visibly changes the tiny model's image.
        tensors[f"ip_adapter.{key}.to_k_ip.weight"] = weight(width, cross_dim, scale=0.5)
        tensors[f"ip_adapter.{key}.to_v_ip.weight"] = weight(width, cross_dim, scale=0.5)
        key += 2
    save_file({name: tensor.contiguous() for name, tensor in tensors.items()}, str(tmp / TINY_IP_WEIGHT))
    return _finish(tmp, target, "ip-adapter")


def build_tiny_inpainting_unet(base: Path, target: Path, seed: int = 11) -> Path:
    """An inpainting checkpoint for the tiny model: its UNet with 9 input channels (latents, mask, masked
    image latents), with random weights, in a folder's unet/ as SDXL inpainting checkpoints ship it."""
    if _built(target):
        return target
    import torch
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    config = dict(UNet2DConditionModel.load_config(base / "unet"))
    config["in_channels"] = 9
    unet = UNet2DConditionModel.from_config(config)
    tmp = _partial(target)
    unet.save_pretrained(tmp / "unet")
    return _finish(tmp, target, "inpainting-unet")


def build_tiny_vae(base: Path, target: Path, seed: int = 13) -> Path:
    """A second VAE for the tiny model: its architecture, other random weights, saved as a diffusers folder
    (config.json beside the weights), as a VAE for `vaes` is shared."""
    if _built(target):
        return target
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL.from_config(AutoencoderKL.load_config(base / "vae"))
    tmp = _partial(target)
    vae.save_pretrained(tmp)
    return _finish(tmp, target, "vae")
