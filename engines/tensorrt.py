"""TensorRT backend: the eager pipeline with its UNet and VAE decoder replaced by TensorRT engines.

Each network is exported to ONNX (dynamic batch and resolution), built into an engine with one
optimisation profile covering the configured range, and cached under the data directory by a key made
of the weights' digest, the shape range, the GPU and the TensorRT version, so a restart deserialises
instead of building. Execution binds torch tensors' device pointers: no copies through the host.

Weights are baked into an engine, so requests with LoRAs, ControlNet (which feeds the UNet extra inputs) or
seamless tiling (circular padding in the convolutions) are refused when they arrive (forge/resolve.py); the
checks here only back that up. The eager and compiled backends take them.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engines.cache_files import mark_used
from engines.digests import weights_digest
from engines.eager import EagerEngine
from engines.exported import route_through
from engines.onnx_export import (
    DEFAULT_SHAPES,
    UNET_INPUTS,
    VAE_INPUTS,
    ShapeRange,
    export_unet,
    export_vae_decoder,
)
from forge.engine import AssetError, GenerationResult, Job, ModelInfo
from forge.errors import ConfigError


def require_tensorrt() -> Any:
    """The tensorrt module, or a startup error that says how to get it."""
    try:
        import tensorrt
    except ImportError as exc:
        raise ConfigError(
            "backend 'tensorrt' needs NVIDIA TensorRT (10 or newer) for Python: pip install tensorrt from "
            f"NVIDIA's index (https://pypi.nvidia.com), or use the TensorRT container; it is not installed here: {exc}",
            field="backend",
        ) from exc
    return tensorrt


@dataclass(frozen=True)
class TensorRTOptions:
    cache_dir: Path
    shapes: ShapeRange = DEFAULT_SHAPES


def _weights(model: ModelInfo, component: str) -> Path:
    """What the component's engine is built from: its folder, the single checkpoint, or the hub snapshot."""
    if model.format == "single_file":
        return Path(model.path)
    folder = Path(model.path)
    if not folder.exists():
        from huggingface_hub import snapshot_download

        folder = Path(snapshot_download(model.path, local_files_only=True))
    return folder / component


def engine_key(component: Path, shapes: ShapeRange, device: str, trt_version: str, memo_dir: Path) -> str:
    parts = {
        "weights": weights_digest(component, memo_dir),
        "shapes": asdict(shapes),
        "gpu": torch.cuda.get_device_name(device),
        "capability": torch.cuda.get_device_capability(device),
        "tensorrt": trt_version,
        "torch": torch.__version__,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def build_engine(trt: Any, onnx_path: Path, plan_path: Path, profile: dict[str, tuple[tuple[int, ...], ...]]) -> None:
    """Parse the ONNX file and build an engine with one optimisation profile (min, opt, max per input).

    Strongly typed: each layer runs in the precision the export gave it (fp16 UNet, fp32 VAE where it must
    be). TensorRT 11 builds nothing else (its FP16 builder flag is gone); on 10.x the flag asks for it."""
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly_typed = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    network = builder.create_network(0 if strongly_typed is None else 1 << int(strongly_typed))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        raise RuntimeError(f"TensorRT could not parse {onnx_path}: {errors}")
    config = builder.create_builder_config()
    optimisation = builder.create_optimization_profile()
    for name, (smallest, typical, largest) in profile.items():
        optimisation.set_shape(name, smallest, typical, largest)
    config.add_optimization_profile(optimisation)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise RuntimeError(f"TensorRT failed to build an engine from {onnx_path}")
    partial = plan_path.with_name(plan_path.name + ".partial")
    partial.write_bytes(bytes(plan))
    partial.rename(plan_path)


class TensorRTRunner:
    """One deserialised engine; call with named CUDA tensors, get named CUDA tensors back."""

    def __init__(self, trt: Any, plan_path: Path, device: str) -> None:
        self.device = torch.device(device)
        runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
        self.engine = runtime.deserialize_cuda_engine(plan_path.read_bytes())
        self.context = self.engine.create_execution_context()
        names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.outputs = [n for n in names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        self.dtypes = {n: _torch_dtype(trt, self.engine.get_tensor_dtype(n)) for n in names}

    def __call__(self, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        keep = []  # inputs converted here must outlive the asynchronous execution
        for name, tensor in inputs.items():
            bound = tensor.to(self.device, self.dtypes[name]).contiguous()
            keep.append(bound)
            self.context.set_input_shape(name, tuple(bound.shape))
            self.context.set_tensor_address(name, bound.data_ptr())
        results = {}
        for name in self.outputs:
            shape = tuple(self.context.get_tensor_shape(name))
            results[name] = torch.empty(shape, dtype=self.dtypes[name], device=self.device)
            self.context.set_tensor_address(name, results[name].data_ptr())
        stream = torch.cuda.current_stream(self.device)
        if not self.context.execute_async_v3(stream.cuda_stream):
            raise RuntimeError("TensorRT execution failed")
        stream.synchronize()
        del keep
        return results


_DTYPES = {"FLOAT": torch.float32, "HALF": torch.float16, "BF16": torch.bfloat16, "INT32": torch.int32,
           "INT64": torch.int64, "BOOL": torch.bool}  # fmt: skip


def _torch_dtype(trt: Any, dtype: Any) -> torch.dtype:
    by_trt = {getattr(trt.DataType, name): torch_dtype for name, torch_dtype in _DTYPES.items()
              if hasattr(trt.DataType, name)}  # fmt: skip
    return by_trt[dtype]


def unet_profile(unet: Any, shapes: ShapeRange) -> dict[str, tuple[tuple[int, ...], ...]]:
    config = unet.config
    text_dim = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
    channels, context = config.in_channels, config.cross_attention_dim
    ranges = [(shapes.min_batch, shapes.min_side), (shapes.opt_batch, shapes.opt_side)]
    ranges.append((shapes.max_batch, shapes.max_side))

    def shapes_at(batch: int, side: int) -> list[tuple[int, ...]]:
        return [(batch, channels, side // 8, side // 8), (batch,), (batch, 77, context), (batch, text_dim), (batch, 6)]

    per_range = [shapes_at(batch, side) for batch, side in ranges]
    return {name: tuple(r[index] for r in per_range) for index, name in enumerate(UNET_INPUTS)}


def vae_profile(vae: Any, shapes: ShapeRange) -> dict[str, tuple[tuple[int, ...], ...]]:
    channels = vae.config.latent_channels
    images = (1, 1, max(1, shapes.max_batch // 2))
    sides = (shapes.min_side, shapes.opt_side, shapes.max_side)
    return {VAE_INPUTS[0]: tuple((b, channels, s // 8, s // 8) for b, s in zip(images, sides, strict=True))}


class TensorRTEngine(EagerEngine):
    def __init__(self, model: ModelInfo, device: str, options: TensorRTOptions) -> None:
        trt = require_tensorrt()
        if not device.startswith("cuda"):
            raise ConfigError(f"backend 'tensorrt' runs on CUDA devices only, not {device}", field="devices")
        super().__init__(model, device)
        # Its UNet engine is built for 77 tokens: prompts past one chunk are cut there, as diffusers cuts them.
        self.prompts.max_chunks = 1
        self.options = options
        pipe, shapes = self.pipe, options.shapes
        if pipe.vae.config.force_upcast:  # SDXL's VAE overflows in fp16: its engine runs in fp32 (TF32)
            pipe.vae.to(torch.float32)
        unet_plan = self._plan(
            trt, "unet", _weights(model, "unet"), lambda onnx: export_unet(pipe.unet, onnx, shapes),
            unet_profile(pipe.unet, shapes), precision=str(pipe.unet.dtype),
        )  # fmt: skip
        vae_plan = self._plan(
            trt, "vae-decoder", _weights(model, "vae"), lambda onnx: export_vae_decoder(pipe.vae, onnx, shapes),
            vae_profile(pipe.vae, shapes), precision=str(pipe.vae.dtype),
        )  # fmt: skip
        self._unet = TensorRTRunner(trt, unet_plan, device)
        self._vae = TensorRTRunner(trt, vae_plan, device)
        route_through(pipe, self._unet, self._vae)

    def _plan(self, trt: Any, name: str, weights: Path, export: Any, profile: Any, *, precision: str) -> Path:
        """The cached engine for this network, exported and built first when there is none."""
        versions = f"{trt.__version__}-{precision}"
        key = engine_key(weights, self.options.shapes, self.device, versions, self.options.cache_dir / "digests")
        plan = self.options.cache_dir / f"{name}-{key}.plan"
        if not plan.exists():
            onnx = self.options.cache_dir / "onnx" / f"{name}-{key}" / "model.onnx"
            if not onnx.exists():
                export(onnx)
            build_engine(trt, onnx, plan, profile)
            # The export is the weights once more (5 GB for SDXL's UNet) and no later start reads it: the
            # same key finds the engine, and another key (weights, sizes, versions) exports anew.
            shutil.rmtree(onnx.parent)
        mark_used(plan)
        return plan

    def run_batch(self, jobs: Sequence[Job]) -> list[GenerationResult]:
        if jobs[0].loras:
            raise AssetError("lora_unsupported", "the tensorrt backend bakes weights into its engine; LoRAs need "
                             "the eager or compiled backend")  # fmt: skip
        if jobs[0].controls:
            raise AssetError("control_unsupported", "ControlNet needs the eager or compiled backend")
        if jobs[0].tiling != "none":
            raise AssetError("tiling_unsupported", "the tensorrt backend bakes its convolutions' padding into its "
                             "engines; seamless tiles need the eager or compiled backend")  # fmt: skip
        shapes, job = self.options.shapes, jobs[0]
        if not all(shapes.min_side <= side <= shapes.max_side for side in (job.width, job.height)):
            raise AssetError("size_unsupported", f"this server's TensorRT engines take {shapes.min_side} to "
                             f"{shapes.max_side} pixels a side, not {job.width}x{job.height}")  # fmt: skip
        return super().run_batch(jobs)

    def memory_bytes(self) -> int:
        engines = sum(int(runner.engine.device_memory_size_v2) for runner in (self._unet, self._vae))
        return super().memory_bytes() + engines
