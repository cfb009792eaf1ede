"""Download the wheels `bench/gpu_run.sh` installs on a GPU machine that has PyTorch, transformers and
the scientific stack but none of this server's own packages, and no network. The versions are the ones
installed here, so the benchmark runs the code the tests ran."""

from __future__ import annotations

import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

# What the REST path and the engines import that such a machine lacks (no UI, no MCP: both switched off).
PACKAGES = [
    "diffusers",
    "msgspec",
    "starlette",
    "hypercorn",
    "h2",
    "hpack",
    "hyperframe",
    "priority",
    "wsproto",
    "aiosqlite",
    "structlog",
    "python-multipart",
    "importlib-metadata",
    "redis",  # the store module imports it at start, single box or fleet
    "dynamicprompts",  # request resolution expands prompt variations (jinja2 and pyparsing are in the image)
]
# Not installed here (the `fast` extra): torchao, for engines such as compiled+fp8. 0.18's kernels are built for
# torch 2.11 and newer, the GPU image's torch.
PINNED = {"torchao": "0.18.0"}
PYTHON = "3.12"  # the GPU image's Python
PLATFORMS = ["manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_28_x86_64"]


def main() -> None:
    target = Path(__file__).with_name("wheels")
    target.mkdir(exist_ok=True)
    pins = [f"{name}=={version(name)}" for name in PACKAGES] + [f"{name}=={pin}" for name, pin in PINNED.items()]
    platforms = [arg for platform in PLATFORMS for arg in ("--platform", platform)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               "--python-version", PYTHON, *platforms, "-d", str(target), *pins]  # fmt: skip
    subprocess.run(command, check=True)
    size = sum(f.stat().st_size for f in target.glob("*.whl"))
    print(f"{len(list(target.glob('*.whl')))} wheels, {size / 2**20:.1f} MiB in {target}")


if __name__ == "__main__":
    main()
