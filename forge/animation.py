"""An animation request as the sheet it is: one view per frame and direction, each with its pose template,
all from one seed, packed a row per direction; and a check of what it does not combine with."""

from __future__ import annotations

import msgspec

from engines.animation_poses import ACTION_WORDS, DIRECTION_WORDS, DIRECTIONS, frame_name
from engines.poses import is_pose
from forge.errors import InvalidRequest
from forge.requests import (
    AnimationRequest,
    GenerationRequest,
    PostprocessRequest,
    ResizeRequest,
    SpriteSheetRequest,
    ViewRequest,
)


def directions(animation: AnimationRequest) -> tuple[str, ...]:
    return DIRECTIONS[animation.directions]


def animation_views(animation: AnimationRequest) -> list[ViewRequest]:
    """Direction by direction (the sheet's rows), frame by frame; labels `DIRECTION-INDEX`."""
    views = []
    frames = animation.frame_count
    for direction in directions(animation):
        for index in range(frames):
            if isinstance(animation.action, list):
                pose, words = animation.action[index], ""
            else:
                pose = frame_name(animation.action, frames, direction, index)
                words = f"{ACTION_WORDS[animation.action]}, {DIRECTION_WORDS[direction]}"
            views.append(ViewRequest(label=f"{direction}-{index}", prompt=words, pose=pose))
    return views


def check_animation(animation: AnimationRequest) -> None:
    if isinstance(animation.action, list):
        if animation.directions != 1:
            raise InvalidRequest(
                "a list of pose templates is one direction; for 4 or 8 use a built-in action",
                field="animation.directions",
                rule="invalid",
            )
        if animation.frames is not None and animation.frames != len(animation.action):
            raise InvalidRequest(
                f"frames is {animation.frames} but {len(animation.action)} templates were given",
                field="animation.frames",
                rule="invalid",
            )
        for index, name in enumerate(animation.action):
            if not is_pose(name):
                raise InvalidRequest(
                    f"unknown pose template {name!r} (GET /v1/poses)", field=f"animation.action[{index}]", rule="enum"
                )


def with_animation(request: GenerationRequest) -> GenerationRequest:
    """The request as a sheet of its animation's frames: views, and a sprite sheet a row per direction (with
    the frames scaled into their cells when `frame_size` is given)."""
    animation = request.animation
    if animation is None:
        return request
    check_animation(animation)
    for field, given in (
        ("views", request.views or None),
        ("control", request.control),
        ("init_image", request.init_image),
        ("hires", request.hires),
    ):
        if given is not None:
            raise InvalidRequest(f"an animation does not combine with {field}", field=field, rule="exclusive")
    if request.num_images != 1:
        raise InvalidRequest("an animation makes one image per frame", field="num_images", rule="exclusive")
    postprocess = request.postprocess or PostprocessRequest()
    if animation.frame_size is not None:
        if postprocess.resize is not None:
            raise InvalidRequest(
                "give animation.frame_size or postprocess.resize, not both",
                field="postprocess.resize",
                rule="exclusive",
            )
        size = animation.frame_size
        postprocess = msgspec.structs.replace(postprocess, resize=ResizeRequest(width=size, height=size, mode="pad"))
    padding = postprocess.sprite_sheet.padding if postprocess.sprite_sheet else 0
    sheet = SpriteSheetRequest(columns=animation.frame_count, padding=padding)
    postprocess = msgspec.structs.replace(postprocess, sprite_sheet=sheet)
    return msgspec.structs.replace(request, views=animation_views(animation), postprocess=postprocess)
