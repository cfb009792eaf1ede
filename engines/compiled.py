"""torch.compile backend: the eager pipeline with its UNet and VAE decoder compiled in place, whole
(`full`) or block by block (`regional`: far shorter compiles and restarts, no CUDA graphs), or with the UNet
compiled ahead of time (`aot`, engines/aot.py: a restart loads it without tracing or compiling) and the VAE
decoder regionally.

On CUDA: fused QKV projections, channels_last, and with `full`, CUDA graphs (mode reduce-overhead, one
graph recorded per shape seen; max-autotune is a setting away, but compiles for many minutes). Compiled kernels,
autotuning results and Triton binaries are kept under the data directory, so a restart on the same
machine and software compiles from the cache. Weights may be quantised (torchao) behind `quantize`; that
changes the numbers, so benchmarks report it apart.
"""

from __future__ import annotations

import logging
import os
import platform
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engines import aot
from engines.aot import AotReport
from engines.cache_files import mark_used
from engines.eager import EagerEngine
from engines.step_loop import OnDone
from forge.engine import GenerationResult, Job, ModelInfo
from forge.errors import ConfigError

log = logging.getLogger(__name__)

# More graphs per compiled function than the default 8 before dynamo runs it eagerly: static sizes on a CPU,
# the ResNet blocks' shapes under `regional`, and one more after each newly loaded LoRA (its adapters change
# the blocks). Graphs are never required to be whole (fullgraph=False): past the limit a request then runs
# eagerly instead of failing, which over a long life with many LoRAs can happen.
RECOMPILE_LIMIT = 64
QUANTIZATIONS = ("none", "int8", "fp8")
# The repeated blocks regional compilation compiles: attention and feed-forward, and the ResNet blocks whose
# group norms and activations fuse. Tracing SDXL's whole UNet with dynamic shapes took 35 s on a 2-core CPU
# (AOTAutograd another 200 s); these blocks, 7 s (and 16 s).
REGIONS = frozenset({"BasicTransformerBlock", "ResnetBlock2D"})


@dataclass(frozen=True)
class CompileOptions:
    cache_dir: Path
    mode: str = "auto"  # a torch.compile mode; auto: reduce-overhead (CUDA graphs) on CUDA, default elsewhere
    scope: str = "full"  # full | regional (see REGIONS) | aot (engines/aot.py)
    quantize: str = "none"  # none | int8 | fp8 (linear layers, via torchao)
    fuse_qkv: bool = True
    max_rows: int = 16  # the most UNet rows (two an image with guidance) one batch has: `aot` exports for these
    shapes: str = "dynamic"  # dynamic | padded (see padded_row_sizes)


def padded_row_sizes(max_rows: int) -> tuple[int, ...]:
    """The fixed row counts of `shapes = "padded"`: powers of two, and the most a batch has."""
    sizes = {1 << power for power in range(max_rows.bit_length()) if 1 << power < max_rows}
    return tuple(sorted(sizes | {max_rows}))


def cache_dir_for(root: Path, device: str) -> Path:
    """Compiled artefacts are only valid for one torch build and one kind of device."""
    kind = torch.cuda.get_device_name(device) if device.startswith("cuda") else platform.machine()
    name = f"torch-{torch.__version__}-{kind}".replace(" ", "_").replace("/", "_")
    return root / name


def use_cache_dir(path: Path) -> None:
    """Point inductor's and Triton's caches at `path` (read when each compile starts)."""
    path.mkdir(parents=True, exist_ok=True)
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(path / "inductor")
    os.environ["TRITON_CACHE_DIR"] = str(path / "triton")
    import torch._inductor.config as inductor

    inductor.fx_graph_cache = True
    inductor.autotune_local_cache = True


def check_quantization(quantize: str, scope: str = "full") -> None:
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


class CompiledEngine(EagerEngine):
    def __init__(self, model: ModelInfo, device: str, options: CompileOptions) -> None:
        super().__init__(model, device)
        self.options = options
        use_cache_dir(options.cache_dir)
        mark_used(options.cache_dir)
        import torch._dynamo.config as dynamo

        # recompile_limit is the current name; cache_size_limit the older one, which still aliases it.
        setting = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, setting, max(getattr(dynamo, setting), RECOMPILE_LIMIT))
        pipe, cuda = self.pipe, device.startswith("cuda")
        self._fused = options.fuse_qkv and cuda
        if self._fused:
            pipe.fuse_qkv_projections()
        if cuda:
            _tune_inductor_for_diffusion()
            pipe.unet.to(memory_format=torch.channels_last)
            pipe.vae.to(memory_format=torch.channels_last)
        if options.quantize != "none":
            quantize_weights(pipe.unet, options.quantize)
        regional = options.scope in ("regional", "aot")
        mode = options.mode if options.mode != "auto" else ("reduce-overhead" if cuda and not regional else "default")
        # In place (nn.Module.compile): the pipeline, LoRA loading and memory accounting keep the same modules.
        # On GPUs, dynamic shapes: one graph serves every batch and image size (a batch of 3 or a portrait
        # image does not recompile in the middle of serving); CUDA graphs are still recorded per concrete
        # shape. On a CPU, where batching is off, a dynamic graph takes five times as long to compile, so
        # shapes start static and become dynamic at the first recompile (torch.compile's default).
        dynamic = True if cuda else None
        if options.shapes == "padded":
            # Step-level batches pad their rows to a few fixed counts, each compiled (and its CUDA graph
            # recorded) once as a static shape; request-level batches compile a graph per batch size.
            dynamic = False
            self.step_row_sizes = padded_row_sizes(options.max_rows)
        self.aot: AotReport | None = None
        if options.scope == "aot":
            autotune = options.mode.startswith("max-autotune")
            self.aot = aot.install(pipe.unet, options.cache_dir, options.max_rows, autotune)
            log.info("%s on %s: %s", model.id, device, self.aot)
        elif regional:
            compile_regions(pipe.unet, mode=mode, dynamic=dynamic)
        else:
            pipe.unet.compile(mode=mode, dynamic=dynamic)
        if regional:
            compile_regions(pipe.vae.decoder, mode=_without_cuda_graphs(mode), dynamic=dynamic)
        else:
            pipe.vae.decoder.compile(mode=_without_cuda_graphs(mode), dynamic=dynamic)

    def warm(self) -> None:
        """The first run compiles (or loads the compiled code from the cache); say which, and how long."""
        before = self.compile_statistics()
        started = time.perf_counter()
        super().warm()
        after = self.compile_statistics()
        hits, misses = (after[name] - before[name] for name in ("fxgraph_cache_hit", "fxgraph_cache_miss"))
        log.info(
            "%s on %s: compiled in %.1f s (compile cache: %d hits, %d misses, in %s)",
            self.model.id, self.device, time.perf_counter() - started, hits, misses, self.options.cache_dir,
        )  # fmt: skip

    def run_batch(self, jobs: Sequence[Job]) -> list[GenerationResult]:
        with self._unet_for(jobs[0]):
            return super().run_batch(jobs)

    def run_steps(
        self,
        jobs: Sequence[Job],
        on_done: OnDone,
        joiners: Callable[[int], list[Job]],
        max_images: int,
        on_step: Callable[[int], None] | None = None,
    ) -> None:
        with self._unet_for(jobs[0]):
            super().run_steps(jobs, on_done, joiners, max_images, on_step)

    @contextmanager
    def _unet_for(self, job: Job) -> Iterator[None]:
        """The compiled UNet, except for a job with LoRAs or reference images: a UNet with LoRA adapters (or an
        IP-Adapter attached) runs uncompiled, since dynamo would recompile it for every LoRA set, adapter
        weight and reference count, each time holding the device for as long as a cold compile."""
        if not job.loras and job.references is None:
            yield
            return
        if self._fused:
            # peft adapts to_q/to_k/to_v, which the fused projection bypasses: unfuse once, for good
            # (the compiled UNet recompiles once for that, at the next job without LoRAs).
            self.pipe.unfuse_qkv_projections()
            self._fused = False
        with uncompiled(self.pipe.unet):
            yield

    def compile_statistics(self) -> dict[str, Any]:
        """Inductor's cache hits and misses so far in this process (a warm start is all hits)."""
        from torch._dynamo.utils import counters

        inductor = counters["inductor"]
        return {
            "fxgraph_cache_hit": inductor["fxgraph_cache_hit"],
            "fxgraph_cache_miss": inductor["fxgraph_cache_miss"],
        }


@contextmanager
def uncompiled(module: torch.nn.Module) -> Iterator[None]:
    """Run `module` and its blocks eagerly for a while. Only this engine's own modules change, so another
    engine's thread keeps its compiled code (unlike torch.compiler.set_stance, which is process-wide)."""
    compiled = [(block, block._compiled_call_impl) for block in module.modules() if block._compiled_call_impl]
    for block, _ in compiled:
        block._compiled_call_impl = None
    try:
        yield
    finally:
        for block, call in compiled:
            block._compiled_call_impl = call


def compile_regions(module: torch.nn.Module, **options: Any) -> int:
    """Regional compilation: each block in REGIONS is compiled in place. Blocks of one class share their
    compiled code (parameters are graph inputs), so SDXL's 70 transformer blocks cost one compile per
    width, not one each. Returns how many blocks were compiled."""
    blocks = [block for block in module.modules() if type(block).__name__ in REGIONS]
    for block in blocks:
        block.compile(**options)
    return len(blocks)


def _without_cuda_graphs(mode: str) -> str:
    """The VAE decoder runs once an image, and SDXL's pipeline casts its weights to fp32 and back around each
    decode (force_upcast): recorded CUDA graphs would hold stale weight addresses and be recorded again."""
    return {"reduce-overhead": "default", "max-autotune": "max-autotune-no-cudagraphs"}.get(mode, mode)


def _tune_inductor_for_diffusion() -> None:
    """The settings diffusers' own guide to fast SDXL inference uses for UNet convolutions."""
    import torch._inductor.config as inductor

    inductor.conv_1x1_as_mm = True
    inductor.coordinate_descent_tuning = True
    inductor.epilogue_fusion = False
    inductor.coordinate_descent_check_all_directions = True
