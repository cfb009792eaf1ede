"""Images of one task that differ from each other: prompt variations chosen per image, and the cells of a
prompt matrix (`grid`). Each becomes an ImageVariant of the spec, so the engine, metadata and infotext see
every image's own prompt and settings."""

from __future__ import annotations

import typing
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import msgspec

from forge.errors import InvalidRequest
from forge.prompt_syntax import check_weights
from forge.requests import (
    GenerationRequest,
    GenerationSpec,
    GridAxis,
    GridRequest,
    GridSpec,
    ImageVariant,
    VariationMode,
    work_of,
)
from forge.styles import Style, apply_styles

if TYPE_CHECKING:
    from forge.resolve import Resources

_REQUEST_TYPES = typing.get_type_hints(GenerationRequest, include_extras=True)
_SEARCH_AND_REPLACE = ("prompt", "negative_prompt")


def with_variations(spec: GenerationSpec, styles: Sequence[Style], resources: Resources) -> GenerationSpec:
    """The spec with each image's prompt variations chosen (by its seed, or in combinations); unchanged when
    its prompts have none. The negative prompt's variations are always picked by each image's seed. A sheet
    or an animation is one character: its views all get the first image's choices."""
    seeds = spec.seeds[:1] if spec.views else spec.seeds
    expand = resources.variations.expand
    prompts = expand(spec.prompt, spec.variations, seeds)
    negative_mode: VariationMode = "off" if spec.variations == "off" else "random"
    negatives = expand(spec.negative_prompt, negative_mode, seeds, field="negative_prompt")
    if set(prompts) == {spec.prompt} and set(negatives) == {spec.negative_prompt}:
        return spec
    if spec.views:
        prompts, negatives = prompts * len(spec.views), negatives * len(spec.views)
    variants = []
    for prompt, negative, seed in zip(prompts, negatives, spec.seeds, strict=True):
        _check_chosen(prompt, negative, resources)
        styled = apply_styles(styles, prompt, negative)
        variants.append(
            _variant_of(
                spec,
                prompt=prompt,
                negative_prompt=negative,
                styled_prompt=styled.prompt,
                styled_negative_prompt=styled.negative_prompt,
                seed=seed,
            )
        )
    return msgspec.structs.replace(spec, variants=variants)


def _check_chosen(prompt: str, negative: str, resources: Resources) -> None:
    """A chosen prompt passes the checks its template did: wildcard files bring words of their own."""
    limit = resources.max_prompt_chars
    for field, text in (("prompt", prompt), ("negative_prompt", negative)):
        if len(text) > limit:
            raise InvalidRequest(
                f"{field} is longer than {limit} characters once its variations are chosen", field=field,
                rule="max_length",
            )  # fmt: skip
        check_weights(text, field)
    if resources.prompt_filter is not None:
        resources.prompt_filter.check("prompt", prompt)


def grid_spec(
    request: GenerationRequest,
    grid: GridRequest,
    spec: GenerationSpec,
    resolve: Callable[[GenerationRequest], GenerationSpec],
    styles: Sequence[Style],
    resources: Resources,
) -> GenerationSpec:
    """A prompt matrix as one task: each cell is the request with its axes' values, resolved and checked as
    a request of its own (one image, the task's seed unless seed is an axis); cells go row by row."""
    if request.views or request.animation is not None:
        raise InvalidRequest(
            "a grid's images are its cells: it does not combine with views or an animation", field="grid",
            rule="conflict",
        )  # fmt: skip
    if request.num_images != 1:
        raise InvalidRequest("a grid makes one image per cell: leave num_images at 1", field="num_images", rule="grid")
    if request.variations == "combinatorial":
        raise InvalidRequest(
            "a grid's cells are its images; its prompt's variations are picked at random by each cell's seed",
            field="variations",
            rule="grid",
        )
    axes = [("x", grid.x)] + ([("y", grid.y)] if grid.y is not None else [])
    if grid.y is not None and grid.y.field == grid.x.field:
        raise InvalidRequest("the grid's two axes must be different fields", field="grid.y.field", rule="distinct")
    rows = range(len(grid.y.values)) if grid.y is not None else range(1)
    cells = []
    for row in rows:
        for column in range(len(grid.x.values)):
            where = list(zip(axes, (column, row), strict=False))
            changes: dict[str, Any] = {"seed": spec.seed}
            for (name, axis), index in where:
                changes |= _cell_change(request, axis, index, f"grid.{name}")
            try:
                cell = resolve(msgspec.structs.replace(request, grid=None, **changes))
            except InvalidRequest as exc:
                for (name, axis), index in where:
                    if exc.field == axis.field:
                        raise InvalidRequest(exc.message, field=f"grid.{name}.values[{index}]", rule=exc.rule) from exc
                raise
            cells.append(with_variations(cell, styles, resources))
    _check_budget(cells, resources)
    return msgspec.structs.replace(
        spec, num_images=len(cells), variants=[_variant_of(cell) for cell in cells], grid=GridSpec(x=grid.x, y=grid.y)
    )


def _cell_change(request: GenerationRequest, axis: GridAxis, index: int, where: str) -> dict[str, Any]:
    value = axis.values[index]
    if axis.field in _SEARCH_AND_REPLACE:
        text, search = getattr(request, axis.field), str(axis.values[0])
        if not search or search not in text:
            raise InvalidRequest(
                f"{where}.values[0] ({search!r}) is not in the {axis.field}: each value replaces it there",
                field=f"{where}.values[0]",
                rule="not_found",
            )
        return {axis.field: text.replace(search, str(value))}
    try:
        return {axis.field: msgspec.convert(value, _REQUEST_TYPES[axis.field], strict=False)}
    except msgspec.ValidationError as exc:
        raise InvalidRequest(
            f"{where}.values[{index}] is no {axis.field}: {exc}", field=f"{where}.values[{index}]", rule="type"
        ) from exc


def _check_budget(cells: list[GenerationSpec], resources: Resources) -> None:
    work = sum(work_of(cell.width, cell.height, cell.steps, cell.hires) for cell in cells)
    if resources.max_work and work > resources.max_work:
        raise InvalidRequest(
            f"the grid's {len(cells)} images are {work} pixel-steps, over this server's budget of "
            f"{resources.max_work} per request; ask for fewer values, steps or pixels",
            field="grid",
            rule="budget",
        )


def _variant_of(spec: GenerationSpec, **own: Any) -> ImageVariant:
    """An image of `spec` with `own` values; a spec that is one image (a grid's cell) as it is."""
    if not own and spec.variants:
        return spec.variants[0]
    return ImageVariant(**({name: getattr(spec, name) for name in ImageVariant.__struct_fields__} | own))
