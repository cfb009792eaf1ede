"""Pick devices and construct the configured backend on each."""

from __future__ import annotations

import os

from forge.batching import BatchPolicy
from forge.config import Config
from forge.engine import Engine, ModelInfo
from forge.errors import ConfigError

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


def check_backend(backend: str) -> None:
    """Fail at start, before anything is served, for a backend this build cannot run."""
    if backend != "eager":
        if backend in BACKENDS:
            raise ConfigError(f"backend {backend!r} is not available in this build; use 'eager'", field="backend")
        raise ConfigError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}", field="backend")


GPU_MAX_BATCH = 8


def batch_policy(config: Config, devices: list[str]) -> BatchPolicy:
    """Batching as configured; by default on where every engine is a GPU, off on a CPU."""
    automatic = GPU_MAX_BATCH if all(device.startswith("cuda") for device in devices) else 1
    return BatchPolicy(max_images=config.max_batch or automatic, max_wait_s=config.batch_wait_ms / 1000)


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


def load_engine(backend: str, model: ModelInfo, device: str) -> Engine:
    """Load (not warm) one engine. Blocking: call from the device's thread."""
    check_backend(backend)
    from engines.eager import EagerEngine

    return EagerEngine(model, device)
