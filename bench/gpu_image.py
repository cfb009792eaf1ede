"""An environment that holds only what the GPU machine's image holds (gpu_image_packages.txt, with what those
packages require) plus the packages `bench/wheels` carries there (bench.gpu_wheels.PACKAGES), taken from this
environment: a virtual environment whose site-packages links to them. `bench.gpu_bench` run in it fails on a
package the wheels forget, here on a CPU, rather than on a lent GPU."""

from __future__ import annotations

import re
import subprocess
import sys
from importlib.metadata import PackageNotFoundError, distribution
from pathlib import Path

from bench.gpu_wheels import PACKAGES, PINNED

IMAGE_PACKAGES = Path(__file__).with_name("gpu_image_packages.txt")


def _name(requirement: str) -> str:
    return re.split(r"[\s;<>=!~\[(]", requirement.strip(), maxsplit=1)[0].lower().replace("_", "-")


def image_packages() -> set[str]:
    lines = IMAGE_PACKAGES.read_text().splitlines()
    return {_name(line) for line in lines if line.strip() and not line.startswith("#")}


def _with_requirements(names: set[str]) -> set[str]:
    """`names` and, transitively, what they require here (extras and other platforms' markers left out)."""
    found, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in found:
            continue
        found.add(name)
        try:
            requires = distribution(name).requires or []
        except PackageNotFoundError:
            continue
        for requirement in requires:
            marker = requirement.partition(";")[2]
            if "extra" in marker:
                continue
            if marker and not _marker_holds(marker):
                continue
            todo.append(_name(requirement))
    return found


def _marker_holds(marker: str) -> bool:
    from packaging.markers import Marker

    return Marker(marker).evaluate()


def make_env(target: Path) -> Path:
    """A virtual environment at `target` with the image's packages and the carried wheels' packages linked in
    from this one; its python."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(target)], check=True)
    site = next((target / "lib").glob("python*/site-packages"))
    carried = {_name(name) for name in PACKAGES} | set(PINNED)
    for name in sorted(_with_requirements(image_packages()) | carried):
        try:
            files = distribution(name).files or []
            root = Path(str(distribution(name).locate_file("")))
        except PackageNotFoundError:
            continue  # on the image but not installed here (the image holds much this project never imports)
        for top in {Path(str(file)).parts[0] for file in files if not str(file).startswith("..")}:
            link = site / top
            if not link.exists() and (root / top).exists() and top != "__pycache__":
                link.symlink_to(root / top)
    return target / "bin" / "python"
