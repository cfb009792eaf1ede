"""The UNet compiled ahead of time with AOTInductor: exported once (torch.export, dynamic rows, size and prompt
length), compiled to a shared library kept under the cache directory, and at every later start loaded in
well under a second, with no tracing and no compiling: a restart is warm however large the UNet.

The package holds no weights. It reads the UNet's own parameters in place (user-managed constants), so the
module stays whole for LoRA adapters and anything else that runs it eagerly, no second copy of the weights
is made, and one package serves every checkpoint of the same architecture and dtype.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

from engines.cache_files import mark_used
from engines.onnx_export import UNetForExport, unet_call_inputs, unet_example

log = logging.getLogger(__name__)

# Bump when what is exported changes (inputs, dynamic dimensions, inductor settings): old packages are skipped.
_FORMAT = "2"
MAX_LATENT_SIDE = 4096 // 8  # requests take sides up to 4096 pixels
MAX_TOKENS = 77 * 8
# Latent sides start at two size factors (64 px for SDXL): at one, the innermost blocks see 1×1 maps, which
# export would otherwise specialise on.
MIN_SIDE_FACTORS = 2
# The plain call a diffusers pipeline makes; a call with anything else (ControlNet residuals, a timestep
# condition, attention kwargs) runs the module eagerly.
_EXPORTED_KWARGS = frozenset({"encoder_hidden_states", "added_cond_kwargs", "return_dict"})
_BUILDING = threading.Lock()


@dataclass(frozen=True)
class AotReport:
    path: Path
    built: bool  # False: loaded from an earlier start
    seconds: float

    def __str__(self) -> str:
        verb = "built" if self.built else "loaded"
        return f"UNet ahead-of-time package {verb} in {self.seconds:.1f} s ({self.path.name})"


def package_path(cache_dir: Path, unet: Any, max_rows: int, autotune: bool = False) -> Path:
    """The package's name follows everything it was compiled for: the architecture and the tensors it reads
    (names, shapes, strides, dtypes, so fused or unfused projections too), the device, the rows it takes and
    whether it was autotuned. The cache directory is already one per torch build and kind of device."""
    constants = _constants(UNetForExport(unet)).items()
    tensors = [(name, list(t.shape), list(t.stride()), str(t.dtype)) for name, t in constants]
    described = {
        "format": _FORMAT,
        "config": dict(unet.config),
        "tensors": tensors,
        "device": _device_of(unet).type,
        "max_rows": max_rows,
        "autotune": autotune,
    }
    digest = hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:20]
    return cache_dir / "aot" / f"unet-{digest}.pt2"


def install(unet: torch.nn.Module, cache_dir: Path, max_rows: int, autotune: bool = False) -> AotReport:
    """Build the package if this machine has none for this UNet, load it, and make it the UNet's compiled
    call: `unet(...)` then runs it (nn.Module calls `_compiled_call_impl` when set), while
    `engines.compiled.uncompiled` still switches back to the module for a while."""
    path = package_path(cache_dir, unet, max_rows, autotune)
    started = time.perf_counter()
    runner, built = None, False
    with _BUILDING:  # engines on several GPUs starting together: one builds, the others then load its package
        if path.exists():
            try:
                runner = load(path, unet)
            except Exception as exc:  # damaged, or written by a torch that reports the same version
                log.warning("%s could not be loaded (%s); building it again", path, exc)
                path.unlink()
        if runner is None:
            export_and_compile(unet, path, max_rows, autotune)
            runner, built = load(path, unet), True
    unet._compiled_call_impl = AotUNet(unet, runner, max_rows)
    mark_used(path)
    return AotReport(path, built, time.perf_counter() - started)


def export_unet(unet: torch.nn.Module, max_rows: int) -> torch.export.ExportedProgram:
    """The UNet's plain call as a graph over any rows up to `max_rows`, latent sides that are multiples of
    its size factor, and prompts up to MAX_TOKENS tokens."""
    from torch.export import Dim

    factor = _size_factor(unet)
    rows = Dim("rows", min=1, max=max_rows)
    most = MAX_LATENT_SIDE // factor
    side = {"min": MIN_SIDE_FACTORS, "max": most}
    latent = {0: rows, 2: factor * Dim("latent_h", **side), 3: factor * Dim("latent_w", **side)}
    tokens = Dim("tokens", min=1, max=MAX_TOKENS)
    dynamic = (latent, {0: rows}, {0: rows, 1: tokens}, {0: rows}, {0: rows})
    example = unet_example(unet, 2, 8 * factor * 4)
    with torch.inference_mode(False), torch.no_grad():
        return torch.export.export(UNetForExport(unet).eval(), example, dynamic_shapes=dynamic)


def export_and_compile(unet: torch.nn.Module, path: Path, max_rows: int, autotune: bool = False) -> None:
    """Minutes for SDXL on a GPU (with autotune, inductor's max_autotune, far longer), once per machine.
    Written under a temporary name, then renamed, so a start stopped halfway leaves nothing a later start
    would trust."""
    program = export_unet(unet, max_rows)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f"{path.stem}.{os.getpid()}-{threading.get_ident()}.partial.pt2")
    import torch._inductor.config as inductor

    # The build writes the machine's description into inductor's global `aot_inductor.metadata` and leaves it
    # there, which changes the cache key of everything compiled after it in this process (the VAE decoder's
    # graphs would then miss the cache at the next start): it gets a copy to write into.
    with inductor.patch({"aot_inductor.metadata": dict(inductor.aot_inductor.metadata)}):
        torch._inductor.aoti_compile_and_package(
            program,
            package_path=str(partial),
            inductor_configs={"aot_inductor.package_constants_in_so": False, "max_autotune": autotune},
        )
    os.replace(partial, path)


def load(path: Path, unet: torch.nn.Module) -> Any:
    """The compiled package, pointed at the UNet's own parameters (no copy; they must outlive it, which they
    do: it is reached only through the UNet)."""
    index = _device_of(unet).index
    runner = torch._inductor.aoti_load_package(str(path), device_index=-1 if index is None else index)
    constants = _constants(UNetForExport(unet))
    wanted = runner.get_constant_fqns()
    missing = [name for name in wanted if name not in constants]
    if missing:
        raise RuntimeError(f"{path} expects tensors the UNet does not have, e.g. {missing[:3]}")
    runner.load_constants({name: constants[name] for name in wanted}, check_full_update=True, user_managed=True)
    return runner


class AotUNet:
    """The UNet's call, answered by the package where it was exported for the call, else by the module."""

    def __init__(self, unet: torch.nn.Module, runner: Any, max_rows: int) -> None:
        self._unet: Any = unet
        self._runner = runner
        self._max_rows = max_rows
        self._factor = _size_factor(unet)
        self.package_calls = 0  # calls the package answered (the rest ran the module)

    def __call__(self, sample: torch.Tensor, timestep: Any, *args: Any, **kwargs: Any) -> Any:
        named = {"encoder_hidden_states": args[0], **kwargs} if len(args) == 1 else kwargs
        inputs = self._inputs(sample, timestep, named) if len(args) <= 1 else None
        if inputs is None:
            return self._unet._call_impl(sample, timestep, *args, **kwargs)
        out = self._runner(*inputs)
        self.package_calls += 1
        return UNet2DConditionOutput(sample=out) if named.get("return_dict", True) else (out,)

    def _inputs(self, sample: torch.Tensor, timestep: Any, kwargs: dict[str, Any]) -> tuple[torch.Tensor, ...] | None:
        extra = {name for name, value in kwargs.items() if value is not None} - _EXPORTED_KWARGS
        added = kwargs.get("added_cond_kwargs") or {}
        hidden = kwargs.get("encoder_hidden_states")
        if extra or set(added) != {"text_embeds", "time_ids"} or hidden is None or torch.is_grad_enabled():
            return None
        rows, _, height, width = sample.shape
        dtype = self._unet.dtype
        fits = (
            rows <= self._max_rows
            and height % self._factor == 0
            and width % self._factor == 0
            and MIN_SIDE_FACTORS * self._factor <= min(height, width)
            and max(height, width) <= MAX_LATENT_SIDE
            and hidden.shape[1] <= MAX_TOKENS
            and all(t.dtype == dtype and t.device == sample.device for t in (sample, hidden, *added.values()))
        )
        if not fits:
            return None
        # The package reads its inputs with the strides of the export's (contiguous) examples: a broadcast
        # timestep or a sliced batch would be read wrongly, not refused.
        return tuple(tensor.contiguous() for tensor in unet_call_inputs(sample, timestep, hidden, added))


def _size_factor(unet: torch.nn.Module) -> int:
    """Latent sides the export takes are multiples of this (diffusers' UNet resizes others on a path of
    its own)."""
    return int(2 ** getattr(unet, "num_upsamplers", 0))


def _constants(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = dict(module.named_parameters())
    tensors.update(module.named_buffers())
    return tensors


def _device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
