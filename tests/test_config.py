from __future__ import annotations

from pathlib import Path

import pytest

from engines.loader import backend_settings
from forge.config import load_config
from forge.errors import ConfigError


def test_defaults_match_the_documented_ports() -> None:
    config = load_config(None, environ={})
    assert (config.api_port, config.ui_port, config.mcp_port) == (8000, 7860, 8001)
    assert (config.model, config.backend, config.host) == ("auto", "eager", "127.0.0.1")


def test_toml_then_environment_then_overrides(tmp_path: Path) -> None:
    path = tmp_path / "forge.toml"
    path.write_text('api_port = 9000\nmodel = "tiny"\ndata_dir = "/srv/forge"\nenable_ui = true\n')
    environ = {"FORGE_API_PORT": "9100", "FORGE_ENABLE_UI": "false", "FORGE_BACKEND": "compiled", "HOME": "/x",
               "FORGE_COMPILED_SHAPES": "padded"}  # fmt: skip
    config = load_config(path, environ=environ, overrides={"host": "0.0.0.0"})
    assert config.api_port == 9100 and config.model == "tiny" and config.data_dir == "/srv/forge"
    assert config.enable_ui is False and config.backend == "compiled" and config.host == "0.0.0.0"
    settings = backend_settings(config, ["cuda:0"])  # what the compiled engines are built with
    assert settings.compiled_shapes == "padded" and settings.shapes.max_batch == 16


@pytest.mark.parametrize(
    ("environ", "mentions"),
    [
        ({"FORGE_API_PORT": "eighty"}, "FORGE_API_PORT"),
        ({"FORGE_API_PORT": "70000"}, "FORGE_API_PORT: Expected `int` <= 65535"),
        ({"FORGE_BACKEND": "onnx"}, "FORGE_BACKEND: Invalid enum value 'onnx'"),
        ({"FORGE_COMPILED_SHAPES": "static"}, "FORGE_COMPILED_SHAPES: Invalid enum value 'static'"),
        ({"FORGE_COLOUR": "red"}, "FORGE_COLOUR"),
        ({"FORGE_IP_ADAPTERS": "plus=h94"}, "FORGE_IP_ADAPTERS"),
        ({"FORGE_AUTH": "maybe"}, r"FORGE_AUTH: expected true/false, 1/0, yes/no or on/off, got 'maybe'"),
        ({"FORGE_IP_ADAPTERS": '{"x": {"source": "a"}}'}, "weight_name"),
    ],
)
def test_bad_settings_are_clear_errors(environ: dict[str, str], mentions: str) -> None:
    with pytest.raises(ConfigError, match=mentions):
        load_config(None, environ=environ)


def test_booleans_read_as_people_write_them_and_errors_name_the_variable() -> None:
    for word, meant in (("true", True), ("1", True), ("Yes", True), ("ON", True), ("false", False), ("0", False),
                        ("no", False), ("off", False)):  # fmt: skip
        assert load_config(None, environ={"FORGE_ENABLE_UI": word}).enable_ui is meant, word
    with pytest.raises(ConfigError) as error:
        load_config(None, environ={"FORGE_API_PORT": "eighty"})
    assert str(error.value).startswith("FORGE_API_PORT: ") and "$" not in str(error.value)


def test_ip_adapters_come_from_toml_tables_or_a_json_variable(tmp_path: Path) -> None:
    assert list(load_config(None, environ={}).ip_adapters) == ["plus"]  # the recommended one by default
    path = tmp_path / "forge.toml"
    path.write_text('[ip_adapters.face]\nsource = "h94/IP-Adapter"\nweight_name = "sdxl_models/face.safetensors"\n')
    assert load_config(path, environ={}).ip_adapters["face"].subfolder == "sdxl_models"
    environ = {"FORGE_IP_ADAPTERS": '{"local": {"source": "/srv/ip", "weight_name": "ip.safetensors"}}'}
    assert load_config(path, environ=environ).ip_adapters["local"].file_name == "ip.safetensors"
    environ = {"FORGE_INPAINTING_MODELS": "sdxl-base=diffusers/stable-diffusion-xl-1.0-inpainting-0.1"}
    assert load_config(None, environ=environ).inpainting_models == {
        "sdxl-base": "diffusers/stable-diffusion-xl-1.0-inpainting-0.1"
    }


def test_unreadable_toml_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "broken.toml"
    path.write_text("api_port = = 1")
    with pytest.raises(ConfigError, match=r"broken\.toml"):
        load_config(path, environ={})


@pytest.mark.parametrize("role", ["api", "worker"])
def test_fleet_roles_need_a_shared_store(role: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(None, environ={"FORGE_ROLE": role})
    assert "store (FORGE_STORE)" in refused.value.message and "role (FORGE_ROLE)" in refused.value.message
    config = load_config(None, environ={"FORGE_ROLE": role, "FORGE_STORE": "rediss://user:secret@cache:6380/2"})
    assert config.uses_redis and config.role == role
    with pytest.raises(ConfigError, match="FORGE_STORE: Expected"):
        load_config(None, environ={"FORGE_STORE": "postgres://db"})
