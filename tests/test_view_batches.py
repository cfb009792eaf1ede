"""An animation's or a sheet's views as one batch: jobs sharing ControlNet settings and references, each with its
own prompt and pose, run one UNet and one ControlNet call a step and get the images they get alone."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from actors.engine import run_images
from engines.eager import EagerEngine
from engines.models import tiny_info
from forge.engine import (
    ControlJob,
    ImageEdit,
    Job,
    ModelInfo,
    OutOfMemory,
    Reference,
    References,
    views_batch_key,
)
from tests.helpers import gradient_image, square_image

# One pixel level of 255: the batched UNet sums in another order than a lone one (as in test_batching).
PIXEL_TOLERANCE = 2
STEPS = 3
FRAMES = ("walk-6f-s-0", "walk-6f-s-2", "walk-6f-s-4")


def _max_difference(a: Any, b: Any) -> int:
    return int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max())


@pytest.fixture(scope="module")
def engine(tiny_model: Path) -> Iterator[EagerEngine]:
    engine = EagerEngine(tiny_info(tiny_model), "cpu")
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("view-images")
    paths = {"gradient": folder / "gradient.png", "square": folder / "square.png"}
    gradient_image(64).save(paths["gradient"])
    square_image(64).save(paths["square"])
    return {name: str(path) for name, path in paths.items()}


def pose(name: str, strength: float = 0.9) -> ControlJob:
    return ControlJob(type="openpose", image=None, pose=name, preprocess=False, strength=strength, start=0.0, end=1.0)


def references(info: ModelInfo, image: str, strength: float = 0.7) -> References:
    adapter = next(iter(info.ip_adapters))
    return References(
        adapter=adapter,
        source=info.ip_adapters[adapter],
        images=[Reference(image=image, strength=strength, mode="full", start=0.0, end=1.0)],
    )


def view(info: ModelInfo, prompt: str, controls: list[ControlJob], **fields: Any) -> Job:
    settings: dict[str, Any] = {"seeds": [7], "guidance_scale": 5.0, **fields}
    return Job(model=info, prompt=prompt, negative_prompt="blurry", width=64, height=64, steps=STEPS,
               scheduler="euler", controls=controls, **settings)  # fmt: skip


@contextmanager
def batch_sizes(*modules: Any) -> Iterator[list[list[int]]]:
    """The batch size of each forward call of each of `modules` within the block."""
    sizes: list[list[int]] = [[] for _ in modules]

    def counter(calls: list[int]) -> Any:
        def count(module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            calls.append((args[0] if args else kwargs["sample"]).shape[0])

        return count

    hooks = [
        module.register_forward_pre_hook(counter(calls), with_kwargs=True)
        for module, calls in zip(modules, sizes, strict=True)
    ]
    try:
        yield sizes
    finally:
        for hook in hooks:
            hook.remove()


def assert_each_as_alone(engine: EagerEngine, jobs: list[Job]) -> list[Any]:
    """Runs `jobs` as one batch, one UNet call and one call of each ControlNet a step for all rows, and each
    job alone: every row must be its job's solo image. Returns the batch's images."""
    controlnets = [engine._controlnet(control.type) for control in jobs[0].controls]
    with batch_sizes(engine.pipe.unet, *controlnets) as calls:
        together = engine.run_batch(jobs)
    rows = 2 * sum(len(job.seeds) for job in jobs)  # guided: an unconditional and a conditional row an image
    assert calls == [[rows] * STEPS for _ in range(1 + len(controlnets))]
    for job, result in zip(jobs, together, strict=True):
        alone = engine.run(job)
        assert len(result.images) == len(job.seeds)
        for image_alone, image_batched in zip(alone.images, result.images, strict=True):
            assert _max_difference(image_alone, image_batched) <= PIXEL_TOLERANCE, job.prompt
    return [image for result in together for image in result.images]


def test_views_with_their_own_poses_share_one_batch(engine: EagerEngine) -> None:
    info = engine.model
    prompts = ("a knight walking, front view", "a knight mid-stride", "a knight, walking cycle")
    jobs = [view(info, prompt, [pose(frame)]) for prompt, frame in zip(prompts, FRAMES, strict=True)]
    images = assert_each_as_alone(engine, jobs)
    # each row its own pose and prompt: three different pictures of one seed
    assert min(_max_difference(images[i], images[i - 1]) for i in range(3)) > 2 * PIXEL_TOLERANCE
    assert len({views_batch_key(job) for job in jobs}) == 1


def test_several_controlnets_and_several_seeds(engine: EagerEngine, images: dict[str, str]) -> None:
    """A MultiControlNet takes per-row images per ControlNet; a job of two seeds has its pose on both rows."""
    info = engine.model
    depth = ControlJob(type="depth", image=images["gradient"], pose=None, preprocess=False, strength=0.6, start=0.0,
                       end=0.8)  # fmt: skip
    jobs = [
        view(info, "a wizard", [pose("front"), depth], seeds=[3, 4]),
        view(info, "a wizard casting", [pose("cast"), depth]),
    ]
    assert_each_as_alone(engine, jobs)


@pytest.mark.parametrize("posed", [True, False], ids=["poses", "no-control"])
def test_views_sharing_references_share_one_batch(engine: EagerEngine, images: dict[str, str], posed: bool) -> None:
    info = engine.model
    shared = references(info, images["square"])
    # The tiny ControlNet's random residuals drown the reference's effect: here it guides the first step only.
    controls = [[dataclasses.replace(pose(frame), end=0.5)] if posed else [] for frame in FRAMES]
    jobs = [view(info, f"a dwarf smith, frame {index}", own, references=shared) for index, own in enumerate(controls)]
    batched = assert_each_as_alone(engine, jobs)
    plain = engine.run(dataclasses.replace(jobs[0], references=None)).images[0]
    assert _max_difference(batched[0], plain) > 2 * PIXEL_TOLERANCE  # the reference really acts in the batch


def test_views_with_their_own_guidance_scales_run_a_part_per_scale(engine: EagerEngine) -> None:
    """diffusers' ControlNet pipeline guides a batch by one scale: posed jobs of other scales run apart."""
    info = engine.model
    jobs = [view(info, "an elf", [pose(FRAMES[0])]), view(info, "an elf", [pose(FRAMES[1])], guidance_scale=7.5)]
    with batch_sizes(engine.pipe.unet) as calls:
        together = engine.run_batch(jobs)
    assert calls == [[2] * (2 * STEPS)]
    for job, result in zip(jobs, together, strict=True):
        assert _max_difference(engine.run(job).images[0], result.images[0]) <= PIXEL_TOLERANCE


def test_views_that_differ_in_shared_settings_are_refused(engine: EagerEngine, images: dict[str, str]) -> None:
    info = engine.model
    base = view(info, "a bard", [pose(FRAMES[0])], references=references(info, images["square"]))
    edit = ImageEdit(init_image=images["gradient"], strength=0.5)
    others = {
        "strength": dataclasses.replace(base, controls=[pose(FRAMES[1], strength=0.5)]),
        "controls": dataclasses.replace(base, controls=[pose(FRAMES[1]), pose(FRAMES[2])]),
        "no control": dataclasses.replace(base, controls=[]),
        "reference image": dataclasses.replace(base, references=references(info, images["gradient"])),
        "reference strength": dataclasses.replace(base, references=references(info, images["square"], 0.3)),
        "no references": dataclasses.replace(base, references=None),
        "init image": dataclasses.replace(base, image_edit=edit),
    }
    for name, other in others.items():
        assert views_batch_key(other) != views_batch_key(base), name
        with pytest.raises(ValueError):
            engine.run_batch([base, other])
    with pytest.raises(ValueError, match="init image"):
        engine.run_batch([dataclasses.replace(base, image_edit=edit), dataclasses.replace(base, image_edit=edit)])
    # another pose and prompt only: one batch
    assert views_batch_key(dataclasses.replace(base, prompt="a bard, 2", controls=[pose(FRAMES[1])])) == (
        views_batch_key(base)
    )


class _RowLimit:
    """The engine on a device with room for `rows` rows a batch: a larger batch runs out of memory, as CUDA's
    allocator would make it."""

    def __init__(self, engine: EagerEngine, rows: int) -> None:
        self.engine, self.rows = engine, rows
        self.asked: list[int] = []

    def run_batch(self, jobs: Any) -> Any:
        self.asked.append(len(jobs))
        if len(jobs) > self.rows:
            raise OutOfMemory(f"{len(jobs)} rows do not fit")
        return self.engine.run_batch(jobs)


def test_an_animation_larger_than_the_device_runs_in_the_largest_batches_that_fit(engine: EagerEngine) -> None:
    """A task's frames run as one batch where the device allows, else in halves (and so on): the images are
    the same either way."""
    info = engine.model
    frames = [view(info, f"a knight, frame {k}", [pose(f"walk-6f-s-{k}")]) for k in range(5)]
    whole = dataclasses.replace(frames[0], views=frames)
    roomy, tight = _RowLimit(engine, 5), _RowLimit(engine, 2)
    at_once = run_images(roomy, whole)  # type: ignore[arg-type]
    in_parts = run_images(tight, whole)  # type: ignore[arg-type]
    assert roomy.asked == [5] and tight.asked == [5, 3, 2, 2, 1]
    assert len(in_parts.images) == 5
    for batched, parted in zip(at_once.images, in_parts.images, strict=True):
        assert _max_difference(batched, parted) <= PIXEL_TOLERANCE
