"""`chara-forge generate` and model resolution, through the same loading path real weights take."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path

import huggingface_hub.constants
import pytest
from PIL import Image

from actors.encoding import read_parameters
from engines.models import resolve_model
from engines.tiny import TINY_MODEL_NAME, build_tiny_sdxl
from forge.variations import PromptVariations
from tests.helpers import free_port


def _generate(tmp_path: Path, model: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "forge.cli",
            "generate",
            *args,
            "--model",
            str(model),
            "--data-dir",
            str(tmp_path / "data"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"},
    )


def test_generate_writes_images_with_parameters(tmp_path: Path, tiny_model: Path) -> None:
    out = tmp_path / "out"
    result = _generate(
        tmp_path,
        tiny_model,
        "a goblin merchant",
        "-o",
        str(out),
        "-n",
        "2",
        "--seed",
        "9",
        "--width",
        "96",
        "--steps",
        "3",
        "--format",
        "webp",
    )
    assert result.returncode == 0, result.stderr
    files = [Path(line) for line in result.stdout.split()]
    assert len(files) == 2 and all(f.suffix == ".webp" and f.is_relative_to(out) for f in files)
    with Image.open(files[1]) as image:
        assert image.size == (96, 64)
        parameters = read_parameters(image)
    assert parameters is not None and "Seed: 10" in parameters and parameters.startswith("a goblin merchant")
    assert "denoising" in result.stderr  # the progress bar
    assert (files[0].parent / "metadata.json").exists()
    varied = _generate(tmp_path, tiny_model, "a {goblin|troll} merchant", "-o", str(out), "-n", "2", "--seed", "9",
                       "--steps", "2")  # fmt: skip
    prompts = []
    for line in varied.stdout.split():
        with Image.open(line) as image:
            prompts.append((read_parameters(image) or "").split("\n")[0])
    # each image the prompt its seed picks, as the server picks it
    assert prompts == PromptVariations(None).expand("a {goblin|troll} merchant", "random", [9, 10])


def test_generate_rejects_bad_options_with_the_field_named(tmp_path: Path, tiny_model: Path) -> None:
    result = _generate(tmp_path, tiny_model, "x", "--width", "100")
    assert result.returncode == 2
    assert "error (width)" in result.stderr and "multiple of 8" in result.stderr


@pytest.fixture
def empty_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


@pytest.mark.usefixtures("empty_hub_cache")
def test_auto_falls_back_to_tiny_when_the_hub_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{free_port()}")
    model = resolve_model("auto", tmp_path / "data", hub_timeout_s=3)
    assert model.is_tiny and model.name == TINY_MODEL_NAME
    assert Path(model.path, "model_index.json").exists()


@pytest.mark.usefixtures("empty_hub_cache")
def test_auto_gives_up_on_a_silent_hub_within_its_timeout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    build_tiny_sdxl(tmp_path / "data" / "models" / "tiny-sdxl")  # time the hub check alone, not the build
    with socket.create_server(("127.0.0.1", 0)) as silent:  # accepts connections, never answers
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
        started = time.monotonic()
        model = resolve_model("auto", tmp_path / "data", hub_timeout_s=1.5)
        elapsed = time.monotonic() - started
    assert model.is_tiny
    assert elapsed < 5, f"start was delayed {elapsed:.1f} s by an unanswering hub"


def test_a_local_tiny_folder_is_recognised(tiny_model: Path, tmp_path: Path) -> None:
    model = resolve_model(str(tiny_model), tmp_path, hub_timeout_s=1)
    assert model.is_tiny and model.path == str(tiny_model)


def test_serve_with_an_unavailable_backend_stops_with_a_clear_error(tmp_path: Path, tiny_model: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "forge.cli", "serve", "--model", str(tiny_model), "--data-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
        env={
            "PATH": "/usr/bin:/bin",
            "FORGE_BACKEND": "tensorrt",
            "FORGE_API_PORT": str(free_port()),
            "FORGE_MCP_PORT": str(free_port()),
        },
    )
    assert result.returncode == 2
    assert "error (backend): backend 'tensorrt' needs NVIDIA TensorRT" in result.stderr
    assert "REST API on" not in result.stderr  # nothing was served
