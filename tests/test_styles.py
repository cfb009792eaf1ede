"""Style files: the shipped set, loading errors that name file and field, stacking, and styles over REST."""

from __future__ import annotations

import io
import json
from pathlib import Path

import msgspec
import pytest
import yaml
from PIL import Image

from actors.encoding import read_parameters
from actors.supervisor import load_resources
from forge.config import load_config
from forge.infotext import parse_infotext
from forge.requests import ControlRequest
from forge.styles import (
    BUILTIN_STYLES_DIR,
    Style,
    StyleDefaults,
    StyleError,
    StyleLora,
    StyleRegistry,
    apply_styles,
    load_style_file,
)
from tests.conftest import RunningServer, server_config, start_server
from tests.helpers import submit, wait_for_state

GAME_STYLES = {
    "anime", "cartoon", "pixel-art", "realistic-portrait", "chibi", "isometric", "low-poly", "dark-fantasy-rpg",
    "sci-fi-armor", "watercolor", "cel-shaded", "splash-art", "character-sheet", "sprite", "comic", "none",
}  # fmt: skip
LORA_SLOTS = {"anime-character-lora", "pixel-art-lora", "cartoon-character-lora", "realistic-portrait-lora"}

FULL_STYLE = Style(
    name="heroic",
    description="Heroic fantasy",
    prompt="epic {prompt}, golden hour",
    negative_prompt="blurry",
    loras=[StyleLora(name="hero-lora", weight=0.7, hub="someone/hero-lora", weight_name="hero.safetensors")],
    defaults=StyleDefaults(size="portrait", steps=20, guidance_scale=6.5, scheduler="dpmpp_2m_karras"),
    control=ControlRequest(type="openpose", pose="attack", strength=0.6, start=0.1, end=0.9),
)


def test_shipped_styles_cover_game_looks_and_lora_slots() -> None:
    registry = StyleRegistry.load([BUILTIN_STYLES_DIR])
    assert set(registry.names()) >= GAME_STYLES | LORA_SLOTS
    assert registry.names()[0] == "none"
    for name in LORA_SLOTS:
        style = registry.get(name)
        assert style is not None and [lora.name for lora in style.loras] == [name]
    assert all(style.description for style in registry.all())


def _without_none(value: object) -> object:
    """TOML has no null: leave unset fields out, as a person writing the file would."""
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


@pytest.mark.parametrize("suffix", [".toml", ".yaml"])
def test_style_files_round_trip(tmp_path: Path, suffix: str) -> None:
    raw = _without_none(msgspec.to_builtins(FULL_STYLE))
    path = tmp_path / f"heroic{suffix}"
    path.write_text(yaml.safe_dump(raw) if suffix == ".yaml" else msgspec.toml.encode(raw).decode())
    assert load_style_file(path) == FULL_STYLE


def test_file_name_is_the_default_style_name(tmp_path: Path) -> None:
    (tmp_path / "grim.toml").write_text('description = "Grim"\nprompt = "grim {prompt}"\n')
    assert load_style_file(tmp_path / "grim.toml").name == "grim"


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        ('description = "x"\n[[loras]]\nname = "a"\nweight = "strong"\n', "$.loras[0].weight"),
        ('description = "x"\nprompt = "no placeholder"\n', "field `prompt` must contain {prompt}"),
        ('description = "x"\ncolour = "red"\n', "unknown field `colour`"),
        ('prompt = "{prompt}"\n', "missing required field `description`"),
        ('description = "x"\n[defaults]\nsize = "huge"\n', "$.defaults.size"),
        ('description = "x"\n[control]\ntype = "scribble"\n', "$.control.type"),
        ('description = "x\n', "cannot be parsed"),
    ],
)
def test_invalid_style_file_names_file_and_field(tmp_path: Path, content: str, expected: str) -> None:
    path = tmp_path / "broken.toml"
    path.write_text(content)
    with pytest.raises(StyleError) as caught:
        load_style_file(path)
    assert str(path) in caught.value.message and expected in caught.value.message


def test_a_bad_style_file_stops_the_server_at_start(tmp_path: Path) -> None:
    (tmp_path / "styles").mkdir()
    (tmp_path / "styles" / "oops.yaml").write_text("description: x\nloras: 3\n")
    config = load_config(None, environ={}, overrides={"styles_dir": str(tmp_path / "styles")})
    with pytest.raises(StyleError, match=r"oops\.yaml.*\$\.loras"):
        load_resources(config)


def test_stacked_styles_nest_templates_and_merge_the_rest() -> None:
    first = Style(
        name="a",
        description="a",
        prompt="pixel {prompt}",
        negative_prompt="blur",
        loras=[StyleLora(name="x", weight=0.5)],
        defaults=StyleDefaults(size="square", steps=12),
    )
    second = Style(
        name="b",
        description="b",
        prompt="{prompt}, chibi",
        negative_prompt="gore",
        loras=[StyleLora(name="x", weight=0.9), StyleLora(name="y")],
        defaults=StyleDefaults(steps=20),
    )
    styled = apply_styles([first, second], "a cat", "dogs")
    assert styled.prompt == "pixel a cat, chibi"
    assert styled.negative_prompt == "dogs, blur, gore"
    assert [(lora.name, lora.weight) for lora in styled.loras] == [("x", 0.9), ("y", 1.0)]
    assert styled.defaults == StyleDefaults(size="square", steps=20)


@pytest.mark.anyio
async def test_styles_over_rest_apply_stack_and_record(server: RunningServer) -> None:
    listing = (await server.client.get("/v1/styles")).json()["items"]
    by_name = {style["name"]: style for style in listing}
    assert set(by_name) >= GAME_STYLES | LORA_SLOTS
    assert by_name["anime"]["available"] is True
    assert by_name["anime-character-lora"]["available"] is False
    assert by_name["anime-character-lora"]["missing"] == ["LoRA anime-character-lora"]

    view = await wait_for_state(
        server.client, (await submit(server.client, prompt="a fox ranger", style=["pixel-art", "chibi"], seed=5))["id"]
    )
    assert view["state"] == "succeeded", view["error"]
    spec = view["request"]
    assert spec["styles"] == ["pixel-art", "chibi"] and spec["prompt"] == "a fox ranger"
    assert spec["styled_prompt"].startswith("chibi pixel art sprite of a fox ranger")
    assert "smooth gradients" in spec["styled_negative_prompt"]
    assert spec["width"] == spec["height"]  # pixel-art's square default
    response = await server.client.get(view["images"][0]["url"])
    with Image.open(io.BytesIO(response.content)) as image:
        prompt, negative, params = parse_infotext(read_parameters(image) or "")
    assert prompt == spec["styled_prompt"] and negative == spec["styled_negative_prompt"]
    assert params["Styles"] == "pixel-art, chibi"


@pytest.mark.anyio
async def test_style_defaults_yield_to_the_request(server: RunningServer) -> None:
    wide = await submit(server.client, style="splash-art")
    assert wide["request"]["width"] > wide["request"]["height"]
    explicit = await submit(server.client, style="splash-art", width=64, height=128)
    assert (explicit["request"]["width"], explicit["request"]["height"]) == (64, 128)


STYLE_ERRORS: list[tuple[object, str, str, str]] = [
    ("no-such-style", "style", "unknown_style", "GET /v1/styles"),
    ("anime-character-lora", "style", "lora_missing", "anime-character-lora.safetensors"),
    (["anime", "nope"], "style", "unknown_style", "nope"),
    (["anime"] * 9, "style", "max_length", ""),
]


@pytest.mark.anyio
async def test_style_errors(server: RunningServer) -> None:
    for style, field, rule, text in STYLE_ERRORS:
        response = await server.client.post("/v1/generations", json={"prompt": "x", "style": style})
        assert response.status_code == 422, (style, response.text)
        error = response.json()["error"]
        assert (error["field"], error["rule"]) == (field, rule), (style, error)
        assert text in error["message"]


@pytest.mark.anyio
async def test_a_user_style_folder_adds_and_replaces_styles(tmp_path: Path, tiny_model: Path) -> None:
    folder = tmp_path / "my-styles"
    folder.mkdir()
    (folder / "anime.toml").write_text('description = "House anime"\nprompt = "house anime {prompt}"\n')
    (folder / "mascot.yaml").write_text(json.dumps({"description": "Our mascot", "prompt": "mascot {prompt}"}))
    config = server_config(tmp_path / "data", tiny_model, styles_dir=str(folder))
    async for running in start_server(config):
        listing = {s["name"]: s for s in (await running.client.get("/v1/styles")).json()["items"]}
        assert listing["anime"]["description"] == "House anime" and "mascot" in listing
        task = await submit(running.client, prompt="owl", style="mascot")
        assert task["request"]["styled_prompt"] == "mascot owl"
