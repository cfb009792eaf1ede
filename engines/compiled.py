"""torch.compile backend: the eager pipeline with its UNet compiled in place, block by block (`regional`, the
default: every transformer and ResNet block kind compiled once per shape and shared by all its copies, so a
cold start takes minutes less, and kept as files that a restart loads without tracing, engines/regions.py),
whole with its VAE decoder (`full`: CUDA graphs, reduce-overhead), or ahead of time (`aot`, engines/aot.py).

Shapes are static: every UNet call is padded (with copies of its last row, whose outputs are dropped) to one
of a few row counts (padded_row_sizes), each compiled at warm-up for the model's default size and the
configured warm sizes, so serving compiles nothing new. Compiled code is kept under the data directory, keyed
by torch, Triton and GPU (regional block graphs as files of their own, with torch's portable cache artifacts
beside them, `artifacts.bin`), and moves to a fresh machine so that it starts warm
(`chara-forge engine export-cache` / `import-cache`).

On CUDA: fused QKV projections (not with LoRA hotswap, whose adapters sit on the unfused projections) and
channels_last. Jobs with LoRAs stay compiled through LoRA hotswap (`lora_rank`); weights may be quantised
(torchao int8 or fp8) behind `quantize`, which changes the numbers, so benchmarks report it apart.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engines import aot
from engines.aot import AotReport
from engines.cache_files import mark_used
from engines.compile_watch import charged_to, counts_for
from engines.cuda_graphs import CudaGraphs
from engines.eager import EagerEngine
from engines.lora_slots import LoraSlots
from engines.onnx_export import timestep_per_row, unet_example
from engines.regions import FOLDER, CompiledRegions
from engines.step_loop import OnDone
from forge.engine import AssetError, GenerationResult, Job, LoraWeight, ModelInfo
from forge.errors import ConfigError

log = logging.getLogger(__name__)

# More graphs per compiled function than the default 8: every block shape at every padded row count and warm
# size is one graph of the same code. Graphs are never required to be whole (fullgraph=False): past the
# limit a call runs eagerly instead of failing.
RECOMPILE_LIMIT = 256
QUANTIZATIONS = ("none", "int8", "fp8")
# The repeated blocks regional compilation compiles: attention and feed-forward, and the ResNet blocks whose
# group norms and activations fuse. Tracing SDXL's whole UNet with dynamic shapes took 35 s on a 2-core CPU
# (AOTAutograd another 200 s); these blocks, 7 s (and 16 s).
REGIONS = frozenset({"BasicTransformerBlock", "ResnetBlock2D"})
ARTIFACTS = "artifacts.bin"


@dataclass(frozen=True)
class CompileOptions:
    cache_dir: Path
    mode: str = "auto"  # a torch.compile mode; auto: reduce-overhead (CUDA graphs) with `full` on CUDA, else default
    scope: str = "regional"  # regional (see REGIONS) | full | aot (engines/aot.py)
    quantize: str = "none"  # none | int8 | fp8 (linear layers, via torchao)
    fuse_qkv: bool = True
    max_rows: int = 16  # the most UNet rows (two an image with guidance) one batch has
    shapes: str = "padded"  # padded (see padded_row_sizes) | dynamic
    # Image sizes (width, height) compiled at warm-up besides the model's default size.
    warm_sizes: tuple[tuple[int, int], ...] = ()
    # LoRA hotswap (engines.lora_slots): this many LoRA slots of `lora_rank` compiled in; 0: LoRAs run uncompiled.
    lora_slots: int = 0
    lora_rank: int = 0


def padded_row_sizes(max_rows: int) -> tuple[int, ...]:
    """The fixed row counts of `shapes = "padded"`: powers of two, and the most a batch has."""
    sizes = {1 << power for power in range(max_rows.bit_length()) if 1 << power < max_rows}
    return tuple(sorted(sizes | {max_rows}))


def padded_rows(rows: int, sizes: Sequence[int]) -> int:
    """The smallest of `sizes` that holds `rows` (`rows` itself when none does)."""
    return min((size for size in sizes if size >= rows), default=rows)


def cache_dir_for(root: Path, device: str) -> Path:
    """Compiled artefacts are only valid for one torch build, one Triton and one kind of device."""
    kind = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.machine()
    name = f"torch-{torch.__version__}-triton-{_triton_version()}-{kind}".replace(" ", "_").replace("/", "_")
    return root / name


def _triton_version() -> str:
    try:
        from importlib.metadata import version

        return version("triton")
    except Exception:  # no Triton: CPU code only, from the C++ compiler
        return "none"


def use_cache_dir(path: Path) -> None:
    """Point inductor's and Triton's caches at `path` (read when each compile starts)."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = True
    inductor.autotune_local_cache = True


def load_artifacts(cache_dir: Path) -> bool:
    """Before compiling: torch's cache artifacts kept beside the cache (made here or imported), so a start on a
    machine that never compiled is warm. False when there are none."""
    path = cache_dir / ARTIFACTS
    if not path.exists():
        return False
    try:
        torch.compiler.load_cache_artifacts(path.read_bytes())
    except Exception as exc:  # another torch wrote them: compile cold, and save fresh ones after warm-up
        log.warning("cache artifacts in %s not loaded (%s): compiling", path, exc)
        return False
    return True


def save_artifacts(cache_dir: Path) -> None:
    """After warm-up: everything compiled so far in this process, as one portable file."""
    saved = torch.compiler.save_cache_artifacts()
    if saved is None:
        return
    data, _ = saved
    partial = cache_dir / f"{ARTIFACTS}.partial"
    partial.write_bytes(data)
    partial.replace(cache_dir / ARTIFACTS)


def check_quantization(quantize: str, scope: str = "regional") -> None:
    """At start: a quantisation that cannot run here stops the server with the reason."""
    if quantize not in QUANTIZATIONS:
        raise ConfigError(f"quantize must be one of {', '.join(QUANTIZATIONS)}", field="quantize")
    if quantize == "none":
        return
    if scope == "aot":
        # torchao's quantised weights are tensor subclasses, which the exported package cannot read in place.
        raise ConfigError("quantize needs compile_scope 'full' or 'regional', not 'aot'", field="quantize")
    try:
        import torchao  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"quantize={quantize!r} needs torchao (pip install 'chara-forge[fast]'): {exc}", field="quantize"
        ) from exc


def quantize_weights(module: torch.nn.Module, kind: str) -> None:
    """Linear layers to int8 or fp8 (per-row scales), activations quantised on the fly: the matrix products
    themselves run in 8 bits, which is where a compute-bound UNet gains."""
    from torchao.quantization import quantize_

    if kind == "int8":
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig

        quantize_(module, Int8DynamicActivationInt8WeightConfig())
    elif kind == "fp8":
        from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

        quantize_(module, Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()))


class RowPadding:
    """Pads every UNet call's rows up to one of `sizes` and drops the padding's outputs, so compiled blocks
    meet a few static shapes whatever a batch holds (request-level batches and step batches alike). Rows are
    independent in the UNet, so the padding changes no row's output."""

    def __init__(self, unet: torch.nn.Module, sizes: Sequence[int]) -> None:
        self.sizes = tuple(sizes)
        self.enabled = True
        self._rows = 0
        unet.register_forward_pre_hook(self._pad, with_kwargs=True)
        unet.register_forward_hook(self._crop, with_kwargs=True)

    def _pad(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        rows = int(args[0].shape[0])
        padded = padded_rows(rows, self.sizes) if self.enabled else rows
        self._rows = rows
        # The pipeline passes one timestep for the batch (an integer or float tensor by sampler), the step loop
        # one float a row: as one float a row, every caller meets the same compiled code and CUDA graph.
        if len(args) > 1:
            args = (args[0], timestep_per_row(args[1], rows, args[0].device).contiguous(), *args[2:])
        # Keyword arguments in one order, without those left at None (every such default of the UNet is None).
        kwargs = {key: kwargs[key] for key in sorted(kwargs) if kwargs[key] is not None}
        if padded == rows:
            return args, kwargs
        return _pad_tree(args, rows, padded), _pad_tree(kwargs, rows, padded)

    def _crop(self, module: Any, args: Any, kwargs: Any, output: Any) -> Any:
        rows = self._rows
        if isinstance(output, tuple):
            return (output[0][:rows], *output[1:])
        output.sample = output.sample[:rows]
        return output


def _pad_tree(value: Any, rows: int, padded: int) -> Any:
    """Every tensor in `value` (nested in lists, tuples and dicts) whose first dimension is `rows`, padded with
    copies of its last row to `padded`."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 0 or value.shape[0] != rows:
            return value
        return torch.cat([value, value[-1:].expand(padded - rows, *value.shape[1:])])
    if isinstance(value, dict):
        return {key: _pad_tree(item, rows, padded) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_pad_tree(item, rows, padded) for item in value)
    return value


class CompiledEngine(EagerEngine):
    def __init__(self, model: ModelInfo, device: str, options: CompileOptions) -> None:
        super().__init__(model, device)
        self.options = options
        self.compile_counts = counts_for(device, model.id)
        self.compile_counts.warmed = False
        use_cache_dir(options.cache_dir)
        mark_used(options.cache_dir)
        self.artifacts_loaded = load_artifacts(options.cache_dir)
        import torch._dynamo.config as dynamo

        # recompile_limit is the current name; cache_size_limit the older one, which still aliases it.
        setting = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, setting, max(getattr(dynamo, setting), RECOMPILE_LIMIT))
        pipe, cuda = self.pipe, device.startswith("cuda")
        # peft adapts to_q/to_k/to_v, which a fused projection bypasses: no fusing where LoRAs are swapped in.
        self._fused = options.fuse_qkv and cuda and not options.lora_rank
        if self._fused:
            pipe.fuse_qkv_projections()
        self.slots = LoraSlots(pipe, options.lora_slots, options.lora_rank) if options.lora_rank else None
        if cuda:
            _tune_inductor_for_diffusion(autotune=options.mode.startswith("max-autotune"))
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if options.quantize != "none":
            quantize_weights(pipe.unet, options.quantize)
        regional = options.scope in ("regional", "aot")
        mode = options.mode if options.mode != "auto" else ("reduce-overhead" if cuda and not regional else "default")
        # In place (nn.Module.compile): the pipeline, LoRA loading and memory accounting keep the same modules.
        padded = options.shapes == "padded" and options.scope != "aot"  # an aot package takes any row count
        self.padding = RowPadding(pipe.unet, padded_row_sizes(options.max_rows)) if padded else None
        dynamic = True if cuda else None  # unpadded: one graph with symbolic sizes
        self.aot: AotReport | None = None
        self.regions: CompiledRegions | None = None
        if options.scope == "aot":
            autotune = options.mode.startswith("max-autotune")
            self.aot = aot.install(pipe.unet, options.cache_dir, options.max_rows, autotune)
            log.info("%s on %s: %s", model.id, device, self.aot)
            self.regions = self._compile_regions(pipe.vae.decoder, mode, dynamic=dynamic)
        elif regional:
            # Padded: every block shape compiles once with symbolic rows, not once per row count.
            self.regions = self._compile_regions(pipe.unet, mode, dynamic=None if padded else dynamic, rows=padded)
        else:
            # Padded: each row count a static graph (and CUDA graph, with reduce-overhead).
            pipe.unet.compile(mode=mode, dynamic=False if padded else dynamic)
            # The decoder runs once an image: worth a whole-graph compile only where the UNet gets one too.
            pipe.vae.decoder.compile(mode=_without_cuda_graphs(mode), dynamic=False if padded else dynamic)
        self.graphs = CudaGraphs(pipe.unet) if cuda and options.scope == "regional" and padded else None

    def _compile_regions(
        self, module: torch.nn.Module, mode: str, dynamic: bool | None, rows: bool = False
    ) -> CompiledRegions:
        """Regional compilation (see REGIONS), the block graphs kept as files in the cache (engines.regions).
        Without CUDA graphs inside blocks: on CUDA the whole UNet call is one graph (engines.cuda_graphs)."""
        import torch._inductor

        options = torch._inductor.list_mode_options(_without_cuda_graphs(mode))
        ahead_of_time = self.options.quantize == "none"  # see engines.regions
        counts = self.compile_counts
        return CompiledRegions(module, REGIONS, self.options.cache_dir / FOLDER, counts.count_compile, rows, dynamic,
                               options, ahead_of_time)  # fmt: skip

    def warm(self) -> None:
        """Compile (or load from the cache) every shape serving meets: a pipeline run at the default size, then
        one UNet call per padded row count at each warm size. Say which, and how long; then keep the cache
        artifacts for the next start."""
        before, compiled_before = self.compile_statistics(), self.compile_counts.compiles
        started = time.perf_counter()
        with charged_to(self.compile_counts):
            super().warm()
            if self.padding is not None:
                side = self.model.default_size
                # With guidance every image is two rows: one row comes only from unguided requests.
                guided = self.model.default_guidance > 1
                for width, height in dict.fromkeys(((side, side), *self.options.warm_sizes)):
                    for rows in self.padding.sizes[1 if guided else 0 :]:
                        _unet_call(self.pipe.unet, rows, width, height)
        self.compile_counts.warmed = True
        after = self.compile_statistics()
        hits, misses = (after[name] - before[name] for name in ("fxgraph_cache_hit", "fxgraph_cache_miss"))
        compiled = self.compile_counts.compiles - compiled_before
        if misses or compiled or not (self.options.cache_dir / ARTIFACTS).exists():
            save_artifacts(self.options.cache_dir)
        loaded = self.regions.loaded if self.regions is not None else 0
        log.info(
            "%s on %s: warm in %.1f s: %d block graphs loaded, %d graphs compiled (compile cache: %d hits, %d misses,"
            " in %s%s)",
            self.model.id, self.device, time.perf_counter() - started, loaded, compiled, hits, misses,
            self.options.cache_dir, ", artifacts loaded" if self.artifacts_loaded else "",
        )  # fmt: skip

    def run_batch(self, jobs: Sequence[Job]) -> list[GenerationResult]:
        with charged_to(self.compile_counts), self._unet_for(jobs[0]):
            return super().run_batch(jobs)

    def run_steps(
        self,
        jobs: Sequence[Job],
        on_done: OnDone,
        joiners: Callable[[int], list[Job]],
        max_images: int,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        with charged_to(self.compile_counts), self._unet_for(jobs[0]):
            super().run_steps(jobs, on_done, joiners, max_images, on_step)

    def _activate_loras(self, loras: list[LoraWeight]) -> None:
        """LoRAs the slots take are swapped into them; others load as adapters of their own (run uncompiled)."""
        if self.slots is None or self.slots.takes(loras) is not None:
            if self.slots is not None:
                self.slots.displaced()
            super()._activate_loras(loras)
            return
        try:
            self.slots.activate(loras)
        except (OSError, ValueError, KeyError, RuntimeError) as exc:
            names = ", ".join(f"{lora.name} ({lora.path})" for lora in loras)
            raise AssetError("lora_invalid", f"could not apply LoRA {names}: {exc}") from exc

    @contextmanager
    def _unet_for(self, job: Job) -> Iterator[None]:
        """The compiled UNet, except for a job with reference images or LoRAs the slots cannot take: a UNet with
        an IP-Adapter attached or LoRA adapters of its own runs uncompiled, since dynamo would recompile it for
        every LoRA set, adapter weight and reference count, each time holding the device for as long as a cold
        compile. Seamless tiles run the UNet and the VAE uncompiled too (eagerly, as the eager engine runs them):
        their convolutions pad circularly for the job only (engines.tiling), which compiled code would have to be
        compiled again for, and again back."""
        slotted = self.slots is not None and self.slots.takes(job.loras) is None
        adapted = job.references is not None or (bool(job.loras) and not slotted)
        tiled = job.tiling != "none"
        if not adapted and not tiled:
            yield
            return
        if adapted and self._fused:
            # peft adapts to_q/to_k/to_v, which the fused projection bypasses: unfuse once, for good
            # (the compiled UNet recompiles once for that, at the next job without LoRAs).
            self.pipe.unfuse_qkv_projections()
            self._fused = False
        with (
            uncompiled(self.pipe.unet, self.padding, self.graphs),
            uncompiled(self.pipe.vae) if tiled else nullcontext(),
        ):
            yield

    def compile_statistics(self) -> dict[str, Any]:
        """Inductor's cache hits and misses so far in this process (a warm start is all hits); this engine's own
        compiles and recompiles are in `compile_counts`."""
        from torch._dynamo.utils import counters

        inductor = counters["inductor"]
        return {
            "fxgraph_cache_hit": inductor["fxgraph_cache_hit"],
            "fxgraph_cache_miss": inductor["fxgraph_cache_miss"],
        }


def _unet_call(unet: Any, rows: int, width: int, height: int) -> None:
    """One UNet call of `rows` rows at an image size: what warm-up compiles each shape with."""
    sample, timesteps, hidden, text_embeds, time_ids = unet_example(unet, rows, width, height)
    cond = unet.config.time_cond_proj_dim
    timestep_cond = torch.zeros(rows, cond, device=unet.device, dtype=unet.dtype) if cond else None
    with torch.no_grad():  # as the pipeline and the step loop call it (inference tensors would recompile)
        unet(sample, timesteps, encoder_hidden_states=hidden, timestep_cond=timestep_cond,
             added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}, return_dict=False)  # fmt: skip


@contextmanager
def uncompiled(module: torch.nn.Module, *switches: RowPadding | CudaGraphs | None) -> Iterator[None]:
    """Run `module` and its blocks eagerly, with `switches` (padding, CUDA graphs) off, for a while. Only this
    engine's own modules change, so another engine's thread keeps its compiled code (unlike
    torch.compiler.set_stance, which is process-wide)."""
    compiled = [(block, block._compiled_call_impl) for block in module.modules() if block._compiled_call_impl]
    for block, _ in compiled:
        block._compiled_call_impl = None
    present = [switch for switch in switches if switch is not None]
    for switch in present:
        switch.enabled = False
    try:
        yield
    finally:
        for block, call in compiled:
            block._compiled_call_impl = call
        for switch in present:
            switch.enabled = True


def _without_cuda_graphs(mode: str) -> str:
    """The VAE decoder runs once an image, and SDXL's pipeline casts its weights to fp32 and back around each
    decode (force_upcast): recorded CUDA graphs would hold stale weight addresses and be recorded again."""
    return {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)


def _tune_inductor_for_diffusion(autotune: bool) -> None:
    """The settings diffusers' own guide to fast SDXL inference uses for UNet convolutions. Its coordinate-descent
    tuning multiplies compile time (a cold start went past six minutes with it): only with a max-autotune
    mode, which asks for long compiles."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_tuning = autotune
    inductor.coordinate_descent_check_all_directions = autotune
