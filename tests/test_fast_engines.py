"""The compiled and TensorRT backends: what runs on a CPU (torch.compile, the ONNX export checked with
onnxruntime, and the startup errors where a backend's dependencies are missing)."""

from __future__ import annotations

import dataclasses
import importlib.util
import io
import os
import shutil
import time
from pathlib import Path
from typing import Any

import anyio
import numpy as np
import pytest
import torch
from PIL import Image

from actors.supervisor import serve
from engines.cache_files import entries, prune
from engines.compiled import cache_dir_for
from engines.eager import EagerEngine
from engines.exported import Runner, route_through
from engines.models import resolve_model
from engines.onnx_export import (
    UNET_INPUTS,
    ShapeRange,
    UNetForExport,
    VaeDecoderForExport,
    export_unet,
    export_vae_decoder,
    unet_example,
    vae_example,
)
from forge.cli import main
from forge.engine import Job
from forge.errors import ConfigError
from forge.requests import MAX_IMAGES
from tests.conftest import server_config
from tests.helpers import submit, wait_for_state
from tests.process import ServerProcess

pytestmark = pytest.mark.anyio


AOT_SERVER = {"backend": "compiled", "compile_scope": "aot", "cpu_threads": "1", "enable_ui": "false",
              "enable_mcp": "false"}  # fmt: skip


@pytest.fixture(scope="module")
def aot_server_data(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Path:
    """A data directory after a first start of an `aot` server, which built the tiny UNet's package (about a
    minute on a CPU) and compiled its VAE decoder. Tests copy it and start from there, as a restart would."""
    data = tmp_path_factory.mktemp("aot") / "data"
    log = data.parent / "server.log"

    async def first_start() -> None:
        server = ServerProcess(data, tiny_model, log, **AOT_SERVER)
        await server.start(ready_timeout_s=400)
        assert await server.terminate() == 0

    anyio.run(first_start)
    assert "UNet ahead-of-time package built" in log.read_text()
    return data


def _aot_package(data: Path) -> Path:
    (package,) = (cache_dir_for(data / "engine-cache" / "compiled", "cpu") / "aot").glob("*.pt2")
    return package


def _max_difference(a: object, b: object) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


def test_unet_and_vae_decoder_export_to_onnx_with_dynamic_batch_and_size(tiny_model: Path, tmp_path: Path) -> None:
    import onnxruntime
    import torch
    from diffusers import StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_model)
    shapes = ShapeRange(min_side=64, opt_side=64, max_side=128)
    unet_file = export_unet(pipe.unet, tmp_path / "unet" / "model.onnx", shapes)
    vae_file = export_vae_decoder(pipe.vae, tmp_path / "vae" / "model.onnx", shapes)
    unet = onnxruntime.InferenceSession(str(unet_file), providers=["CPUExecutionProvider"])
    vae = onnxruntime.InferenceSession(str(vae_file), providers=["CPUExecutionProvider"])
    for batch, side in ((2, 64), (3, 96), (1, 128)):  # other batch sizes and sizes than the export's example
        inputs = unet_example(pipe.unet, batch, side)
        with torch.no_grad():
            expected = UNetForExport(pipe.unet)(*inputs).numpy()
        (got,) = unet.run(None, {name: t.numpy() for name, t in zip(UNET_INPUTS, inputs, strict=True)})
        assert got.shape == (batch, 4, side // 8, side // 8)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)

        (latent,) = vae_example(pipe.vae, batch, side)
        with torch.no_grad():
            expected = VaeDecoderForExport(pipe.vae)(latent).numpy()
        (got,) = vae.run(None, {"latent": latent.numpy()})
        assert got.shape == (batch, 3, side, side)
        np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-4)


async def test_a_pipeline_routed_through_its_exported_networks_makes_the_eager_images(
    tiny_model: Path, tmp_path: Path
) -> None:
    """What the TensorRT engine does with its engines, done with onnxruntime sessions on the CPU: the UNet
    and VAE decoder calls go to the exported networks (a batch of three rows, two jobs), and the torch
    copies of their weights are freed."""
    import onnxruntime
    import torch

    model = resolve_model(str(tiny_model), tiny_model.parent, 1)

    def job(prompt: str, seeds: list[int]) -> Job:
        return Job(model=model, prompt=prompt, negative_prompt="", width=64, height=64, seeds=seeds, steps=4,
                   guidance_scale=5.0, scheduler="euler_a")  # fmt: skip

    jobs = [job("a knight", [1, 2]), job("a wizard", [3])]
    eager = EagerEngine(model, "cpu")
    expected = eager.run_batch(jobs)

    routed = EagerEngine(model, "cpu")
    shapes = ShapeRange(min_side=64, opt_side=64, max_side=128)
    unet_file = export_unet(routed.pipe.unet, tmp_path / "unet" / "model.onnx", shapes)
    vae_file = export_vae_decoder(routed.pipe.vae, tmp_path / "vae" / "model.onnx", shapes)

    def runner(path: Path) -> Runner:
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [output.name for output in session.get_outputs()]

        def run(inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            outputs = session.run(names, {name: tensor.numpy() for name, tensor in inputs.items()})
            return {name: torch.from_numpy(array) for name, array in zip(names, outputs, strict=True)}

        return run

    route_through(routed.pipe, runner(unet_file), runner(vae_file))
    got = routed.run_batch(jobs)
    for want, have in zip(expected, got, strict=True):
        for a, b in zip(want.images, have.images, strict=True):
            assert int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()) <= 2
    unet_bytes = sum(p.numel() * p.element_size() for p in eager.pipe.unet.parameters())
    assert routed.memory_bytes() <= eager.memory_bytes() - unet_bytes


@pytest.mark.skipif(importlib.util.find_spec("torchao") is not None, reason="torchao is installed here")
async def test_quantising_without_torchao_stops_the_start_with_a_clear_error(tmp_path: Path, tiny_model: Path) -> None:
    config = server_config(tmp_path / "data", tiny_model, backend="compiled", quantize="int8")
    with pytest.raises(ConfigError) as raised, anyio.fail_after(60):
        await serve(config, shutdown=anyio.Event())
    assert raised.value.field == "quantize" and "torchao" in raised.value.message


def test_lora_slots_outside_a_regional_unquantised_engine_are_refused_at_start_naming_the_field() -> None:
    from engines.loader import BackendSettings, check_backend

    for settings in ({"quantize": "int8"}, {"compile_scope": "full"}):
        with pytest.raises(ConfigError) as refused:
            check_backend(BackendSettings(name="compiled", lora_rank=32, **settings))  # type: ignore[arg-type]
        assert refused.value.field == "lora_rank"


def test_quantising_an_ahead_of_time_unet_is_refused_at_start_naming_the_field() -> None:
    from engines.loader import BackendSettings, check_backend

    with pytest.raises(ConfigError) as raised:
        check_backend(BackendSettings(name="compiled", compile_scope="aot", quantize="fp8"))
    assert raised.value.field == "quantize" and "aot" in raised.value.message


async def _serve_once(server: ServerProcess, generation: dict[str, object], keep_running: bool = False) -> np.ndarray:
    """Start, make one image, stop cleanly (unless asked to keep it running); the image as an array."""
    import httpx

    await server.start(ready_timeout_s=400)
    try:
        async with httpx.AsyncClient(base_url=server.url, timeout=30) as client:
            view = await wait_for_state(client, (await submit(client, **generation))["id"], timeout_s=300)
            assert view["state"] == "succeeded", view["error"]
            png = (await client.get(view["images"][0]["url"])).content
    except BaseException:
        await server.terminate()
        raise
    if not keep_running:
        assert await server.terminate() == 0
    with Image.open(io.BytesIO(png)) as image:
        return np.asarray(image.convert("RGB"), dtype=np.int16)


def _paladin(tiny_model: Path) -> tuple[dict[str, object], Image.Image]:
    """A generation request, and eager's image for it."""
    model = resolve_model(str(tiny_model), tiny_model.parent, 1)
    eager = EagerEngine(model, "cpu").run(
        Job(model=model, prompt="a paladin", negative_prompt="", width=64, height=64, seeds=[5], steps=4,
            guidance_scale=5.0, scheduler="euler")
    ).images[0]  # fmt: skip
    return {"prompt": "a paladin", "seed": 5, "width": 64, "height": 64, "steps": 4, "guidance_scale": 5.0}, eager


def _compile_reports(log: Path) -> list[str]:
    lines = [line for line in log.read_text().splitlines() if "compile cache" in line]
    assert lines, "the engine reports how it compiled"
    return lines


async def test_compiled_backend_matches_eager_and_a_worker_starts_warm_from_an_exported_cache(
    tmp_path: Path, tiny_model: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A real server process on the compiled backend: its image equals eager's within a pixel level, and
    /metrics counts its compiles (none after warm-up). `chara-forge engine export-cache` writes what it compiled
    to one file; a worker whose engine cache holds only what `import-cache` put there starts without compiling
    or tracing anything: every block graph is loaded as it was compiled."""
    import httpx

    generation, eager = _paladin(tiny_model)
    data, log = tmp_path / "data", tmp_path / "server.log"
    settings = {"backend": "compiled", "cpu_threads": "1", "enable_ui": "false", "enable_mcp": "false"}
    exported = tmp_path / "compiled.tar.gz"
    for start in ("cold", "imported"):
        server = ServerProcess(data, tiny_model, log, **settings)
        compiled = await _serve_once(server, generation, keep_running=True)
        async with httpx.AsyncClient(base_url=server.url) as client:
            metrics = (await client.get("/metrics")).text
        assert await server.terminate() == 0
        assert _max_difference(compiled, eager) <= 2, start
        report = _compile_reports(log)[-1]
        warm = start == "imported"
        assert (" 0 graphs compiled" in report) == warm and (" 0 block graphs loaded" in report) != warm, report
        assert 'chara_forge_engine_recompiles_total{device="cpu",model="tiny-sdxl"} 0.0' in metrics
        assert ('chara_forge_engine_compiles_total{device="cpu",model="tiny-sdxl"} 0.0' in metrics) == warm
        if start == "cold":
            assert main(["engine", "--data-dir", str(data), "export-cache", str(exported)]) == 0
            shutil.rmtree(data / "engine-cache")
            assert main(["engine", "--data-dir", str(data), "import-cache", str(exported)]) == 0
            assert "imported into" in capsys.readouterr().err
    assert main(["engine", "--data-dir", str(data), "import-cache", str(tiny_model / "model_index.json")]) == 2
    assert "not an exported engine cache" in capsys.readouterr().err


async def test_a_restart_of_an_ahead_of_time_server_loads_its_unet_and_compiles_nothing(
    tmp_path: Path, tiny_model: Path, aot_server_data: Path
) -> None:
    """compile_scope = "aot": after the first start built the UNet's package, a restart loads it (no export,
    no compile) and finds the VAE decoder's graphs in the cache; its image equals eager's."""
    generation, eager = _paladin(tiny_model)
    data, log = tmp_path / "data", tmp_path / "server.log"
    shutil.copytree(aot_server_data, data)
    cache = data / "engine-cache"
    _age(cache, days=90)
    started = time.time()
    compiled = await _serve_once(ServerProcess(data, tiny_model, log, **AOT_SERVER), generation)
    assert _max_difference(compiled, eager) <= 2
    assert "UNet ahead-of-time package loaded" in log.read_text()
    assert "ahead-of-time package built" not in log.read_text()
    assert " 0 misses" in _compile_reports(log)[-1]
    # The start marked what it used, so pruning what has gone unused for a month keeps all of it.
    assert {entry.kind for entry in entries(cache)} == {"aot package", "compile cache"}
    assert all(entry.last_used >= started - 1 for entry in entries(cache))
    assert prune(cache, unused_for_s=30 * 86400) == []


def test_pruning_the_engine_cache_removes_only_what_went_unused(
    tmp_path: Path, aot_server_data: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`chara-forge cache prune`: a torch upgrade's leftover compile cache, a TensorRT engine of a model no
    longer served and what stopped builds left go; what a start used within the period stays."""
    data = tmp_path / "data"
    shutil.copytree(aot_server_data, data)
    cache = data / "engine-cache"
    (current,) = (cache / "compiled").iterdir()
    upgraded_from = cache / "compiled" / "torch-2.0.0-x86_64"
    shutil.copytree(current, upgraded_from)
    tensorrt = cache / "tensorrt"
    (tensorrt / "onnx" / "unet-0badc0de").mkdir(parents=True)
    (tensorrt / "onnx" / "unet-0badc0de" / "model.onnx").write_bytes(b"\0" * 4096)
    (tensorrt / "unet-0ldm0de1.plan").write_bytes(b"\0" * 8192)
    (tensorrt / "vae-decoder-5topped.plan.partial").write_bytes(b"\0" * 1024)
    _age(upgraded_from, days=90)
    _age(tensorrt, days=45)
    old = {upgraded_from, tensorrt / "onnx" / "unet-0badc0de", tensorrt / "unet-0ldm0de1.plan",
           tensorrt / "vae-decoder-5topped.plan.partial"}  # fmt: skip

    assert main(["cache", "--data-dir", str(data), "list"]) == 0
    listed = capsys.readouterr().out
    assert all(str(path) in listed for path in [*old, current]) and "tensorrt engine" in listed
    assert main(["cache", "--data-dir", str(data), "prune", "--unused-days", "30", "--dry-run"]) == 0
    assert "would be freed" in capsys.readouterr().err and all(path.exists() for path in old)
    assert main(["cache", "--data-dir", str(data), "prune", "--unused-days", "30"]) == 0
    assert not any(path.exists() for path in old)
    assert {entry.path for entry in entries(cache)} == {current, *(current / "aot").glob("*.pt2")}


def _age(root: Path, days: float) -> None:
    """Make `root` and everything under it look last used `days` ago."""
    then = time.time() - days * 86400
    for path in [root, *root.rglob("*")]:
        os.utime(path, (then, then))


def test_a_compiled_engine_compiles_nothing_after_warm_up_and_matches_eager(
    tmp_path: Path,
    tiny_model: Path,
    tiny_loras: dict[str, Path],
    compiled_cache: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The compiled backend's defaults (regional blocks, rows padded to 2, 4 or 8, the row dimension symbolic),
    restarted on the compile cache of a cold start with its settings: it loads the block graphs kept there and
    traces nothing, except the graphs whose files were damaged, which are compiled again. After warm-up a mixed load
    compiles nothing: request-level batches of one to three images, a step batch that a task joins and others
    leave with two samplers and two guidance scales, and a second image size named in the warm sizes; every
    image equals eager's and the padding rows change none. A request with a LoRA runs the UNet uncompiled
    (eager's image with that LoRA), so no LoRA set or weight waits for a compile; its adapters change the
    blocks, so the next request without a LoRA compiles them again, once, and that counts as a recompile."""
    import threading

    from engines.compiled import CompiledEngine
    from engines.regions import FOLDER
    from forge.engine import LoraWeight
    from tests.conftest import compiled_options

    model = resolve_model(str(tiny_model), tiny_model.parent, 1)
    base = Job(model=model, prompt="a paladin", negative_prompt="", width=64, height=64, seeds=[5], steps=4,
               guidance_scale=5.0, scheduler="euler")  # fmt: skip
    batches = [[base], [dataclasses.replace(base, seeds=[6, 7, 8])], [dataclasses.replace(base, width=96, seeds=[9])]]
    stepped = [dataclasses.replace(base, seeds=[6, 7]), dataclasses.replace(base, steps=3, scheduler="euler_a")]
    joiner = dataclasses.replace(base, steps=2, scheduler="dpmpp_2m", guidance_scale=7.0, seeds=[11])
    ink = LoraWeight(name="ink-lora", path=str(tiny_loras["ink-lora"]), weight=0.8)
    with_lora = dataclasses.replace(base, loras=[ink])
    eager = EagerEngine(model, "cpu")
    got: list[Image.Image] = []
    step_outcomes: list[tuple[Job, Any]] = []
    step_rows: list[int] = []
    counts: dict[str, tuple[int, int]] = {}
    cache = tmp_path / "cache"
    shutil.copytree(compiled_cache, cache)
    kept = sorted((cache / FOLDER).glob("*.bin"))
    damaged = [path for path in kept if "BasicTransformerBlock" in path.name]  # every UNet call meets them
    for path in damaged:
        path.write_bytes(b"damaged")
    loaded: list[int] = []
    files: list[int] = []

    def serve_in_order() -> None:  # on a thread that then ends, as an engine's does
        engine = CompiledEngine(model, "cpu", compiled_options(cache))
        counted = engine.compile_counts
        before = (counted.compiles, counted.recompiles)

        def since_start() -> tuple[int, int]:
            return counted.compiles - before[0], counted.recompiles - before[1]

        loaded.append(engine.regions.loaded if engine.regions else 0)
        engine.warm()
        counts["warm"] = since_start()
        files.append(len(list((cache / FOLDER).glob("*.bin"))))
        for batch in batches:
            got.extend(image for result in engine.run_batch(batch) for image in result.images)
        engine.pipe.unet.conv_in.register_forward_pre_hook(lambda module, args: step_rows.append(args[0].shape[0]))
        waiting = [joiner]
        engine.run_steps(stepped, lambda job, outcome: step_outcomes.append((job, outcome)),
                         lambda free: [waiting.pop()] if waiting and free else [], 8)  # fmt: skip
        counts["mixed"] = since_start()
        got.append(engine.run(with_lora).images[0])
        counts["lora"] = since_start()
        got.append(engine.run(base).images[0])
        counts["after_lora"] = since_start()

    worker = threading.Thread(target=serve_in_order)
    worker.start()
    worker.join()
    expected = [image for batch in batches for job in batch for image in eager.run(job).images]
    expected += [eager.run(with_lora).images[0], eager.run(base).images[0]]
    assert len(got) == len(expected) == 7
    for image, alone in zip(got, expected, strict=True):
        assert _max_difference(image, alone) <= 2
    assert _max_difference(expected[0], expected[-2]) > 2  # the LoRA does change the image
    for job, outcome in step_outcomes:
        for image, alone in zip(outcome.images, eager.run(job).images, strict=True):
            assert _max_difference(image, alone) <= 4
    assert sorted(job.scheduler for job, _ in step_outcomes) == ["dpmpp_2m", "euler", "euler_a"]
    assert 8 in step_rows and set(step_rows) <= {2, 4, 8}  # 4 + 2 + 2 rows padded to 8, and on as tasks leave
    assert damaged and loaded == [len(kept) - len(damaged)]
    assert "not loaded" in caplog.text and "removed" in caplog.text
    assert counts["warm"] == (len(damaged), 0)  # the damaged graphs, compiled again
    assert files == [len(kept)]
    assert counts["mixed"] == counts["lora"] == counts["warm"]  # nothing compiled after warm-up
    compiles_after, recompiles_after = counts["after_lora"]
    assert recompiles_after > 0 and compiles_after == len(damaged) + recompiles_after


def test_ahead_of_time_unet_matches_eager_and_serves_what_it_was_not_compiled_for(
    tmp_path: Path, tiny_model: Path, tiny_loras: dict[str, Path], aot_server_data: Path
) -> None:
    """compile_scope = "aot": an engine finds the UNet's package in its cache and loads it instead of building.
    Its images equal eager's, batched too. A LoRA request, a ControlNet request and sizes the package does not
    take run the module (eager's images), and the plain request after them is the package's again. A second
    engine on the same cache (a restart, or another device) does the same with the same package."""
    import threading

    from engines.aot import AotUNet
    from engines.compiled import CompiledEngine, CompileOptions
    from forge.engine import ControlJob, LoraWeight

    model = resolve_model(str(tiny_model), tiny_model.parent, 1)
    base = Job(model=model, prompt="a paladin", negative_prompt="", width=64, height=64, seeds=[5], steps=4,
               guidance_scale=5.0, scheduler="euler")  # fmt: skip
    pair = [dataclasses.replace(base, prompt="a knight", seeds=[1, 2]), dataclasses.replace(base, seeds=[3])]
    lora = dataclasses.replace(base, loras=[LoraWeight(name="ink-lora", path=str(tiny_loras["ink-lora"]), weight=0.8)])
    # Latent sides of 9 and 2: the export takes multiples of 2 from 4 (the tiny UNet's size factor is 2).
    odd, small = dataclasses.replace(base, width=72), dataclasses.replace(base, width=16)
    pose = ControlJob(type="openpose", image=None, pose="run", preprocess=False, strength=1, start=0, end=1)
    posed = dataclasses.replace(base, controls=[pose])  # the UNet call carries the ControlNet's residuals
    eager = EagerEngine(model, "cpu")
    alone = [eager.run(job).images for job in (base, lora, odd, small, posed)]
    expected = [*alone, alone[0], *(result.images for result in eager.run_batch(pair))]
    options = CompileOptions(cache_dir=tmp_path / "cache", scope="aot", max_rows=2 * MAX_IMAGES)
    package = _aot_package(aot_server_data)
    (options.cache_dir / "aot").mkdir(parents=True)
    shutil.copy(package, options.cache_dir / "aot")
    runs: list[tuple[CompiledEngine, list[list[Image.Image]], list[int]]] = []

    def start_and_serve() -> None:  # on a thread that then ends, as an engine's does
        engine = CompiledEngine(model, "cpu", options)
        unet_call = engine.pipe.unet._compiled_call_impl
        assert isinstance(unet_call, AotUNet)
        images, calls = [], []
        for job in (base, lora, odd, small, posed, base):
            images.append(engine.run(job).images)
            calls.append(unet_call.package_calls)
        images.extend(result.images for result in engine.run_batch(pair))
        calls.append(unet_call.package_calls)
        runs.append((engine, images, calls))

    for _ in range(2):  # a start, then a restart on the same cache
        worker = threading.Thread(target=start_and_serve)
        worker.start()
        worker.join()
    assert [engine.aot.built for engine, _, _ in runs if engine.aot] == [False, False]
    for _, images, calls in runs:
        for got, want in zip(images, expected, strict=True):
            assert max(_max_difference(a, b) for a, b in zip(got, want, strict=True)) <= 2
        steps = base.steps
        assert calls == [steps] * 5 + [2 * steps, 3 * steps]  # LoRA, sizes, ControlNet: the module ran
    assert min(_max_difference(expected[0][0], expected[i][0]) for i in (1, 4)) > 2  # LoRA and pose tell
    assert list((options.cache_dir / "aot").iterdir()) == [options.cache_dir / "aot" / package.name]


def test_a_damaged_ahead_of_time_package_is_built_again_instead_of_failing_the_start(
    tmp_path: Path, tiny_model: Path, aot_server_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A package cut short (as a full disk leaves it) is replaced by a new build, and the UNet then runs it.
    The build itself is the server fixture's (a minute here): its package stands in for the new one."""
    import torch

    from engines import aot

    model = resolve_model(str(tiny_model), tiny_model.parent, 1)
    unet = EagerEngine(model, "cpu").pipe.unet
    good = _aot_package(aot_server_data)
    path = aot.package_path(tmp_path / "cache", unet, 2 * MAX_IMAGES)
    assert path.name == good.name  # the server and an engine here name the same UNet's package alike
    path.parent.mkdir(parents=True)
    path.write_bytes(good.read_bytes()[:4096])
    builds: list[Path] = []

    def build(unet: object, target: Path, max_rows: int, autotune: bool = False) -> None:
        builds.append(target)
        shutil.copy(good, target)

    monkeypatch.setattr(aot, "export_and_compile", build)
    report = aot.install(unet, tmp_path / "cache", 2 * MAX_IMAGES)
    assert report.built and builds == [path]
    sample, timestep, hidden, text_embeds, time_ids = unet_example(unet, 2, 64)
    added = {"text_embeds": text_embeds, "time_ids": time_ids}
    with torch.no_grad():
        got = unet(sample, timestep, hidden, added_cond_kwargs=added).sample
        want = unet._call_impl(sample, timestep, hidden, added_cond_kwargs=added).sample
    assert unet._compiled_call_impl.package_calls == 1
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_engines_starting_together_build_one_ahead_of_time_package(
    tmp_path: Path, tiny_model: Path, aot_server_data: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two devices' engines starting at once with no package: one builds it, the other loads that build.
    (The build is the server fixture's package, copied in slowly, as a build takes a while.)"""
    import threading
    import time

    from engines import aot

    model = resolve_model(str(tiny_model), tiny_model.parent, 1)
    unets = [EagerEngine(model, "cpu").pipe.unet for _ in range(2)]
    builds: list[Path] = []

    def build(unet: object, target: Path, max_rows: int, autotune: bool = False) -> None:
        builds.append(target)
        time.sleep(0.5)
        shutil.copy(_aot_package(aot_server_data), target.parent / "partial")
        (target.parent / "partial").rename(target)

    monkeypatch.setattr(aot, "export_and_compile", build)
    (tmp_path / "cache" / "aot").mkdir(parents=True)
    reports: list[aot.AotReport] = []

    def start(unet: torch.nn.Module) -> None:
        reports.append(aot.install(unet, tmp_path / "cache", 2 * MAX_IMAGES))

    threads = [threading.Thread(target=start, args=(unet,)) for unet in unets]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(builds) == 1 and sorted(report.built for report in reports) == [False, True]


def test_requests_a_tensorrt_server_cannot_serve_are_refused_naming_the_field(
    tmp_path: Path, tiny_model: Path, tiny_loras: dict[str, Path]
) -> None:
    """Its engines bake in the weights and cover one range of sizes: LoRAs, ControlNet (a sheet's poses too), tiling
    and other sizes are refused when the request arrives (a 422 naming the field), instead of failing the task later."""

    from actors.supervisor import backend_limits, load_resources
    from forge.errors import InvalidRequest
    from forge.requests import GenerationRequest
    from forge.resolve import resolve_request
    from forge.validation import convert
    from tests.conftest import install_loras

    config = server_config(tmp_path / "data", tiny_model, backend="tensorrt", tensorrt_min_side=64,
                           tensorrt_max_side=128)  # fmt: skip
    install_loras(config.data_path, tiny_loras)
    resources = load_resources(config)
    assert resources.backend == backend_limits(config)
    model = resolve_model(str(tiny_model), tiny_model.parent, 1)

    def refusal(**fields: object) -> tuple[str | None, str | None]:
        request = convert({"prompt": "a knight", **fields}, GenerationRequest)
        with pytest.raises(InvalidRequest) as raised:
            resolve_request(request, model, resources)
        return raised.value.field, raised.value.rule

    assert refusal(loras=[{"name": "ink-lora", "weight": 0.8}]) == ("loras", "unsupported")
    assert refusal(control={"type": "openpose", "pose": "front"}) == ("control", "unsupported")
    assert refusal(views=[{"label": "front", "pose": "front"}]) == ("views[0]", "unsupported")  # a sheet's poses
    assert refusal(tiling="both") == ("tiling", "unsupported")  # circular padding is baked out of its engines
    assert refusal(width=256) == ("width", "range")
    assert resolve_request(convert({"prompt": "a knight", "width": 128}, GenerationRequest), model, resources)
    eager = dataclasses.replace(resources, backend=backend_limits(server_config(tmp_path, tiny_model)))
    request = convert({"prompt": "a knight", "loras": [{"name": "ink-lora", "weight": 0.8}]}, GenerationRequest)
    assert resolve_request(request, model, eager).loras


def _ranger(model: Any, loras: list[tuple[str, str, float]]) -> Job:
    from forge.engine import LoraWeight

    return Job(model=model, prompt="a ranger", negative_prompt="", width=64, height=64, seeds=[3], steps=3,
               guidance_scale=5.0, scheduler="euler",
               loras=[LoraWeight(name=name, path=path, weight=weight) for name, path, weight in loras])  # fmt: skip


def _serve_with_lora_slots(
    model_dir: str, cache: str, lora_sets: list[list[tuple[str, str, float]]]
) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    """In a process of its own, as a server's engine is: dynamo's caches are process-wide, and what other
    in-process tests compiled must not count as this engine's. Its images of _ranger with each LoRA set, and
    (compiles, recompiles) after warm-up and after the jobs."""
    import threading

    from engines.compiled import CompiledEngine, CompileOptions

    images: list[np.ndarray] = []
    counts: list[tuple[int, int]] = []

    def serve() -> None:  # on a thread of its own, as an engine's
        model = resolve_model(model_dir, Path(model_dir).parent, 1)
        options = CompileOptions(cache_dir=Path(cache), max_rows=4, lora_slots=2, lora_rank=4)
        engine = CompiledEngine(model, "cpu", options)
        engine.warm()
        counts.append((engine.compile_counts.compiles, engine.compile_counts.recompiles))
        for loras in lora_sets:
            images.append(np.asarray(engine.run(_ranger(model, loras)).images[0], dtype=np.int16))
        counts.append((engine.compile_counts.compiles, engine.compile_counts.recompiles))

    worker = threading.Thread(target=serve)
    worker.start()
    worker.join()
    return images, counts


def test_loras_swapped_into_a_compiled_engine_match_eager_and_compile_nothing(
    tmp_path: Path, tiny_model: Path, tiny_loras: dict[str, Path]
) -> None:
    """With lora_rank set, the compiled engine carries LoRA slots from warm-up on: requests with one LoRA, the
    same at another weight, another LoRA, two at once and none at all each get eager's image for that LoRA set,
    and nothing compiles after warm-up (the LoRAs are swapped into the compiled blocks in place)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    model = resolve_model(str(tiny_model), tiny_model.parent, 1)
    ink, glow = ((name, str(tiny_loras[name]), 0.8) for name in ("ink-lora", "glow-lora"))
    sets = [[ink], [(ink[0], ink[1], 0.3)], [glow], [ink, glow], []]
    eager = EagerEngine(model, "cpu")
    expected = [eager.run(_ranger(model, loras)).images[0] for loras in sets]
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        got, counts = pool.submit(_serve_with_lora_slots, str(tiny_model), str(tmp_path / "cache"), sets).result()
    assert len(got) == len(expected)
    for image, alone in zip(got, expected, strict=True):
        assert _max_difference(image, alone) <= 2
    assert _max_difference(expected[0], expected[1]) > 2 and _max_difference(expected[0], expected[2]) > 2
    (warm_compiles, _), after = counts
    assert warm_compiles > 0 and after == (warm_compiles, 0)
