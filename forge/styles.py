"""Styles: a named look (prompt template, negative prompt, LoRAs, defaults) read from TOML or YAML files.

Styles stack: each one's template wraps the prompt the previous one produced, negative prompts add up,
LoRAs add up (a later weight for the same LoRA wins), and a later style's defaults win.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Annotated

import msgspec
from msgspec import Meta

from forge.errors import ConfigError
from forge.requests import ControlRequest, LoraRequest, Name, PostprocessRequest, SchedulerName

PLACEHOLDER = "{prompt}"
NO_STYLE = "none"
BUILTIN_STYLES_DIR = Path(__file__).resolve().parent.parent / "configs" / "styles"
SizePreset = Annotated[str, Meta(pattern="^(square|portrait|landscape)$")]


class StyleLora(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A LoRA slot: the file `<name>.safetensors` in the LoRA folder, or `hub` (a repo id) when it is reachable."""

    name: Name
    weight: Annotated[float, Meta(ge=-4, le=4)] = 1.0
    hub: Annotated[str, Meta(pattern=r"^[\w.-]+/[\w.-]+$")] | None = None
    weight_name: str | None = None


class StyleDefaults(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Used where the request leaves a field out. Sizes are presets, so they fit every model's range."""

    size: SizePreset | None = None
    steps: Annotated[int, Meta(ge=1, le=150)] | None = None
    guidance_scale: Annotated[float, Meta(ge=0, le=30)] | None = None
    scheduler: SchedulerName | None = None


class Style(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    name: Name
    description: Annotated[str, Meta(min_length=1, max_length=500)]
    prompt: Annotated[str, Meta(max_length=2000)] = PLACEHOLDER
    negative_prompt: Annotated[str, Meta(max_length=2000)] = ""
    loras: list[StyleLora] = []
    defaults: StyleDefaults = StyleDefaults()
    control: ControlRequest | None = None
    postprocess: PostprocessRequest | None = None


class StyleError(ConfigError):
    """A style file that cannot be used; the message names the file and the field."""


def _read(path: Path) -> object:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".toml":
        return tomllib.loads(text)
    import yaml

    return yaml.safe_load(text)


def load_style_file(path: Path) -> Style:
    try:
        raw = _read(path)
    except Exception as exc:  # TOML and YAML parsers raise their own types; both mean "not readable"
        raise StyleError(f"style file {path}: cannot be parsed: {exc}", field=str(path)) from exc
    if isinstance(raw, dict):
        raw.setdefault("name", path.stem)
    try:
        style = msgspec.convert(raw, Style)
    except msgspec.ValidationError as exc:
        raise StyleError(f"style file {path}: {exc}", field=str(path)) from exc
    if PLACEHOLDER not in style.prompt:
        raise StyleError(f"style file {path}: field `prompt` must contain {PLACEHOLDER}", field=str(path))
    return style


def style_files(directory: Path) -> list[Path]:
    patterns = ("*.toml", "*.yaml", "*.yml")
    return sorted(path for pattern in patterns for path in directory.glob(pattern))


class StyleRegistry:
    """Every known style by name; files in later folders replace same-named styles from earlier ones."""

    def __init__(self, styles: Iterable[Style]) -> None:
        self._styles = {style.name: style for style in styles}
        self._styles.setdefault(NO_STYLE, Style(name=NO_STYLE, description="No style: the prompt as written."))

    @classmethod
    def load(cls, directories: Sequence[Path]) -> StyleRegistry:
        styles: list[Style] = []
        for directory in directories:
            if not directory.is_dir():
                raise StyleError(f"style folder {directory} does not exist", field="styles_dir")
            styles.extend(load_style_file(path) for path in style_files(directory))
        return cls(styles)

    def names(self) -> list[str]:
        return sorted(self._styles, key=lambda name: (name != NO_STYLE, name))

    def get(self, name: str) -> Style | None:
        return self._styles.get(name)

    def all(self) -> list[Style]:
        return [self._styles[name] for name in self.names()]


class StyledPrompt(msgspec.Struct, frozen=True, kw_only=True):
    prompt: str
    negative_prompt: str
    loras: list[LoraRequest]
    defaults: StyleDefaults
    control: ControlRequest | None
    postprocess: PostprocessRequest | None


def _join(*parts: str) -> str:
    return ", ".join(part for part in parts if part.strip())


def apply_styles(styles: Sequence[Style], prompt: str, negative_prompt: str) -> StyledPrompt:
    """Stack `styles` in order over the user's prompt; the user's negative prompt comes first."""
    loras: dict[str, float] = {}
    defaults: dict[str, object] = {}
    control = None
    postprocess = None
    for style in styles:
        prompt = style.prompt.replace(PLACEHOLDER, prompt)
        negative_prompt = _join(negative_prompt, style.negative_prompt)
        for lora in style.loras:
            loras.pop(lora.name, None)
            loras[lora.name] = lora.weight
        defaults.update({k: v for k, v in msgspec.structs.asdict(style.defaults).items() if v is not None})
        control = style.control or control
        postprocess = style.postprocess or postprocess
    return StyledPrompt(
        prompt=prompt,
        negative_prompt=negative_prompt,
        loras=[LoraRequest(name=name, weight=weight) for name, weight in loras.items()],
        defaults=StyleDefaults(**defaults),  # type: ignore[arg-type]
        control=control,
        postprocess=postprocess,
    )
