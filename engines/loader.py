"""Pick devices and construct the configured backend on each."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from engines.onnx_export import DEFAULT_SHAPES, ShapeRange
from forge.batching import BatchPolicy
from forge.config import Config
from forge.engine import Engine, ModelInfo
from forge.errors import ConfigError
from forge.requests import MAX_IMAGES

BACKENDS = ("eager", "compiled", "tensorrt")


def visible_devices(spec: str) -> list[str]:
    """`auto`: every visible CUDA device, else one CPU engine; otherwise a comma-separated list."""
    import torch

    if spec != "auto":
        devices = [d.strip() for d in spec.split(",") if d.strip()]
        for device in devices:
            if device.startswith("cuda") and not torch.cuda.is_available():
                raise ConfigError(f"device {device} requested but CUDA is not available", field="devices")
        return devices or ["cpu"]
    if torch.cuda.is_available():
        return [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    return ["cpu"]


def quiet_libraries() -> None:
    """diffusers and transformers print progress bars and advice on every load; keep the log readable."""
    import diffusers
    import transformers

    diffusers.utils.logging.set_verbosity_error()
    diffusers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def cpu_threads_for_serving(configured: int) -> int:
    if configured:
        return configured
    return max(1, (os.cpu_count() or 1) - 1)


@dataclass(frozen=True)
class BackendSettings:
    """Which backend builds engines, and its options. `cache_dir` holds compile caches and TensorRT engines."""

    name: str = "eager"
    cache_dir: Path = Path("data/engine-cache")
    compile_mode: str = "auto"
    quantize: str = "none"
    fuse_qkv: bool = True
    compile_scope: str = "regional"
    compiled_shapes: str = "padded"
    compile_warm_sizes: tuple[tuple[int, int], ...] = ()
    lora_rank: int = 0
    lora_slots: int = 4
    shapes: ShapeRange = DEFAULT_SHAPES


def backend_settings(config: Config, devices: list[str]) -> BackendSettings:
    rows = 2 * max(batch_policy(config, devices).max_images, MAX_IMAGES)  # two rows an image (CFG)
    return BackendSettings(
        name=config.backend,
        cache_dir=config.data_path / "engine-cache",
        compile_mode=config.compile_mode,
        compile_scope=config.compile_scope,
        quantize=config.quantize,
        fuse_qkv=config.fuse_qkv,
        compiled_shapes=config.compiled_shapes,
        compile_warm_sizes=tuple(_size(text) for text in config.compile_warm_sizes),
        lora_rank=config.lora_rank,
        lora_slots=config.max_loras,
        shapes=ShapeRange(
            max_batch=rows,
            min_side=config.tensorrt_min_side,
            opt_side=config.tensorrt_opt_side,
            max_side=config.tensorrt_max_side,
        ),
    )


def _size(text: str) -> tuple[int, int]:
    width, _, height = text.partition("x")
    return int(width), int(height)


def check_backend(settings: BackendSettings) -> None:
    """Fail at start, before anything is served, for a backend this machine cannot run."""
    if settings.name not in BACKENDS:
        raise ConfigError(f"unknown backend {settings.name!r}; choose one of {', '.join(BACKENDS)}", field="backend")
    if settings.name == "compiled":
        from engines.compiled import check_quantization

        if settings.lora_rank and settings.quantize != "none":
            # torchao would quantise the slots' own layers, which LoRAs are then copied into.
            raise ConfigError("lora_rank and quantize do not combine: choose one", field="lora_rank")
        if settings.lora_rank and settings.compile_scope != "regional":
            raise ConfigError("lora_rank needs compile_scope 'regional'", field="lora_rank")
        check_quantization(settings.quantize, settings.compile_scope)
    elif settings.quantize != "none":
        raise ConfigError("quantize applies to the compiled backend only", field="quantize")
    if settings.name == "tensorrt":
        from engines.tensorrt import require_tensorrt

        shapes = settings.shapes
        if not shapes.min_side <= shapes.opt_side <= shapes.max_side:
            raise ConfigError("tensorrt sides must be min <= opt <= max", field="tensorrt_opt_side")
        require_tensorrt()


GPU_MAX_BATCH = 8


def batch_policy(config: Config, devices: list[str]) -> BatchPolicy:
    """Batching as configured; by default on where every engine is a GPU, off on a CPU."""
    automatic = GPU_MAX_BATCH if all(device.startswith("cuda") for device in devices) else 1
    max_images = config.max_batch or automatic
    # Step-level where batches exist at all; TensorRT's engines take one timestep for the batch.
    step_level = config.batching == "step" and max_images > 1 and config.backend != "tensorrt"
    return BatchPolicy(max_images=max_images, max_wait_s=config.batch_wait_ms / 1000, step_level=step_level)


def prepare_thread(device: str, cpu_threads: int = 0) -> None:
    """Once, on the thread that will run the device's engines. cpu_threads: 0 leaves PyTorch's default."""
    quiet_libraries()
    if device.startswith("cpu") and cpu_threads:
        import torch

        torch.set_num_threads(cpu_threads)


def memory_budget(device: str, configured_gb: float) -> int:
    """Bytes the device's loaded models may take: as configured, else 80% of the GPU or half the RAM."""
    if configured_gb:
        return int(configured_gb * 1e9)
    if device.startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory * 0.8)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") * 0.5)


def load_engine(settings: BackendSettings, model: ModelInfo, device: str) -> Engine:
    """Load (not warm) one engine. Blocking: call from the device's thread."""
    check_backend(settings)
    if settings.name == "compiled":
        from engines.compiled import CompiledEngine, CompileOptions, cache_dir_for

        options = CompileOptions(
            cache_dir=cache_dir_for(settings.cache_dir / "compiled", device),
            mode=settings.compile_mode,
            scope=settings.compile_scope,
            quantize=settings.quantize,
            fuse_qkv=settings.fuse_qkv,
            max_rows=settings.shapes.max_batch,
            shapes=settings.compiled_shapes,
            warm_sizes=settings.compile_warm_sizes,
            lora_slots=settings.lora_slots,
            lora_rank=settings.lora_rank,
        )
        return CompiledEngine(model, device, options)
    if settings.name == "tensorrt":
        from engines.tensorrt import TensorRTEngine, TensorRTOptions

        return TensorRTEngine(model, device, TensorRTOptions(settings.cache_dir / "tensorrt", settings.shapes))
    from engines.eager import EagerEngine

    return EagerEngine(model, device)
