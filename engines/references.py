"""Reference images through IP-Adapter: adapters loaded once per pipeline with diffusers' `load_ip_adapter`,
attached to the UNet only while a job with references runs, image embeddings cached per image, and each
reference's strength, mode and step range applied per attention block and per step.

Attaching only for such jobs keeps every other job on the UNet exactly as it was (no zero-scale image
embeddings to pass, compiled graphs untouched), and lets references of one job differ in strength, mode and
steps with ONE adapter loaded: each reference is its own image of that adapter, scaled per block through
diffusers' per-image scales (which need a mask per image: an all-ones one here).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from PIL import Image

from engines.loading import LOADING
from forge.engine import AssetError, Reference, References

EMBEDDING_CACHE_SIZE = 32  # reference images whose embeddings stay on the device


def mode_blocks(unet: Any) -> dict[str, str | None]:
    """The attention a mode acts through, as a processor-name prefix (None: every block). InstantStyle's
    findings for SDXL, by position so that any UNet of this layout has them: style lives in the first
    up block's second attention, composition in the last down block's second attention."""
    down = [index for index, block in enumerate(unet.down_blocks) if hasattr(block, "attentions")]
    up = [index for index, block in enumerate(unet.up_blocks) if hasattr(block, "attentions")]
    return {
        "full": None,
        "style": f"up_blocks.{up[0]}.attentions.1.",
        "composition": f"down_blocks.{down[-1]}.attentions.1.",
    }


class ReferenceAdapters:
    """One pipeline's IP-Adapter: loaded on first use (another adapter replaces it), detached between jobs."""

    def __init__(self, pipe: Any, low_cpu_mem_usage: bool) -> None:
        self.pipe = pipe
        self._low_cpu_mem_usage = low_cpu_mem_usage
        self._loaded: str | None = None
        self._processors: dict[str, Any] = {}
        self._projection: Any = None
        self._embeddings: OrderedDict[tuple[str, str], tuple[torch.Tensor, torch.Tensor]] = OrderedDict()

    @contextmanager
    def attached(
        self, references: References, *, guided: bool, steps: int, width: int, height: int
    ) -> Iterator[dict[str, Any]]:
        """Within the block the UNet has the adapter and the pipeline call takes the returned arguments;
        call `at_step` from the step callback so each reference acts on its own steps (of `steps` run). The
        arguments are one row's, for a batch of any size: diffusers' SDXL pipelines repeat the embeddings for
        every row (`prepare_ip_adapter_image_embeds` is given the batch size) and the masks broadcast."""
        self._load(references)
        unet = self.pipe.unet
        plain = dict(unet.attn_processors)
        self._attach()
        self._blocks = mode_blocks(unet)
        self._references = references.images
        self._steps = steps
        try:
            self.at_step(0)
            yield {
                "ip_adapter_image_embeds": [self._embeds(references, guided)],
                "cross_attention_kwargs": {"ip_adapter_masks": [self._masks(len(references.images), width, height)]},
            }
        finally:
            self._detach(plain)

    def at_step(self, step: int) -> None:
        """Each attention block's scale for each reference at `step`: its strength where its mode acts and
        while it is within its steps, else 0 (diffusers skips a block whose scales are all 0)."""
        for name, processor in self._processors.items():
            if not hasattr(processor, "scale"):
                continue
            processor.scale = [
                [
                    reference.strength
                    if reference.active(step, self._steps) and self._acts_in(reference, name)
                    else 0.0
                    for reference in self._references
                ]
            ]

    def _acts_in(self, reference: Reference, processor_name: str) -> bool:
        prefix = self._blocks[reference.mode]
        return prefix is None or processor_name.startswith(prefix)

    def _load(self, references: References) -> None:
        if self._loaded == references.adapter:
            return
        pipe, source = self.pipe, references.source
        plain = dict(pipe.unet.attn_processors)
        if self._loaded is not None:  # diffusers' unload expects the adapter in place; ours go back after it
            self._attach()
            pipe.unload_ip_adapter()
            self._detach(plain)
            self._loaded, self._processors, self._projection = None, {}, None
            self._embeddings.clear()
        try:
            with LOADING:
                pipe.load_ip_adapter(
                    source.source,
                    subfolder=source.subfolder,
                    weight_name=source.file_name,
                    image_encoder_folder=source.image_encoder,
                    low_cpu_mem_usage=self._low_cpu_mem_usage,
                )
        except Exception as exc:
            self._detach(plain)
            raise AssetError(
                "ip_adapter_unavailable", f"the IP-Adapter {references.adapter!r} failed to load: {exc}"
            ) from exc
        self._processors = dict(pipe.unet.attn_processors)  # the projection's own attention included
        self._projection = pipe.unet.encoder_hid_proj
        self._detach(plain)
        self._loaded = references.adapter

    def _attach(self) -> None:
        unet = self.pipe.unet
        unet.encoder_hid_proj = self._projection
        unet.register_to_config(encoder_hid_dim_type="ip_image_proj")
        unet.set_attn_processor(dict(self._processors))  # diffusers empties the dict it is given

    def _detach(self, plain: dict[str, Any]) -> None:
        unet = self.pipe.unet
        unet.encoder_hid_proj = None
        unet.register_to_config(encoder_hid_dim_type=None)
        unet.set_attn_processor({name: plain[name] for name in unet.attn_processors})

    def _embeds(self, references: References, guided: bool) -> torch.Tensor:
        """[negative rows, then positive rows] x references x tokens x width, as diffusers takes them."""
        pairs = [self._embedding(references.adapter, reference.image) for reference in references.images]
        positive = torch.stack([pair[0] for pair in pairs], dim=1)
        if not guided:
            return positive
        return torch.cat([torch.stack([pair[1] for pair in pairs], dim=1), positive])

    def _embedding(self, adapter: str, image_file: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The image's embedding and its unconditional twin, computed once per image and adapter."""
        key = (adapter, image_file)
        if key in self._embeddings:
            self._embeddings.move_to_end(key)
            return self._embeddings[key]
        from diffusers.models.embeddings import ImageProjection

        pipe = self.pipe
        plus = not isinstance(self._projection.image_projection_layers[0], ImageProjection)
        with Image.open(image_file) as opened:
            image = opened.convert("RGB")
        with torch.inference_mode():
            positive, negative = pipe.encode_image(image, pipe._execution_device, 1, output_hidden_states=plus)
        self._embeddings[key] = (positive, negative)
        while len(self._embeddings) > EMBEDDING_CACHE_SIZE:
            self._embeddings.popitem(last=False)
        return positive, negative

    def _masks(self, count: int, width: int, height: int) -> torch.Tensor:
        """Per-image scales in diffusers go with masks; all ones let each reference act everywhere. The
        mask's aspect follows the latents', so diffusers' downsampling fills every query."""
        scale = self.pipe.vae_scale_factor
        return torch.ones(1, count, max(height // scale, 1), max(width // scale, 1))

    def memory_modules(self) -> list[Any]:
        """What the adapter holds while detached (the image encoder is a pipeline component already)."""
        if self._projection is None:
            return []
        return [*(p for p in self._processors.values() if isinstance(p, torch.nn.Module)), self._projection]
