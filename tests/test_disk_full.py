"""A full disk (a real one: a small tmpfs under the data directory): the server keeps running, refuses new
work with 503 `storage_full`, holds what it accepted in memory, and records it once space is freed."""

from __future__ import annotations

import errno
import io
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest
from PIL import Image

from tests.conftest import server_config, start_server
from tests.helpers import submit, wait_for_state

pytestmark = pytest.mark.anyio


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(disk)], capture_output=True)
    if mounted.returncode != 0:  # not root: a full disk cannot be made without filling a real one
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", "--lazy", str(disk)], check=False)


def _fill(disk: Path) -> Path:
    """Take every free byte (tmpfs gives out whole pages, so end with page-sized writes)."""
    filler = disk / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        for chunk in (1 << 20, 4096):
            try:
                while True:
                    os.write(descriptor, b"\0" * chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
    finally:
        os.close(descriptor)
    return filler


async def test_a_full_disk_pauses_accepted_work_and_loses_none_of_it(small_disk: Path, tiny_model: Path) -> None:
    async for server in start_server(server_config(small_disk / "data", tiny_model)):
        client = server.client
        accepted = await submit(client, width=512, height=512, steps=40)
        await wait_for_state(client, accepted["id"], {"running"})
        filler = _fill(small_disk)

        # Its images (and its next state) cannot be written: it waits, and the server says so.
        with anyio.fail_after(120):
            while not (await client.get("/readyz")).json()["storage_full"]:
                await anyio.sleep(0.1)
        ready = await client.get("/readyz")
        assert ready.status_code == 503 and not ready.json()["ready"]
        refused = await client.post("/v1/generations", json={"prompt": "a bard"})
        assert refused.status_code == 503 and refused.headers["Retry-After"]
        assert refused.json()["error"]["code"] == "storage_full"
        png = io.BytesIO()
        Image.new("RGB", (256, 256), "red").save(png, format="PNG")
        upload = await client.post("/v1/uploads", content=png.getvalue(), headers={"Content-Type": "image/png"})
        assert upload.status_code == 503 and upload.json()["error"]["code"] == "storage_full"
        waiting = (await client.get(f"/v1/generations/{accepted['id']}")).json()
        assert waiting["state"] in {"running", "postprocessing"} and waiting["error"] is None
        assert "chara_forge_writes_waiting_for_disk_space 1.0" in (await client.get("/metrics")).text

        filler.unlink()
        done = await wait_for_state(client, accepted["id"], timeout_s=60)
        assert done["state"] == "succeeded" and len(done["images"]) == 1
        image = await client.get(done["images"][0]["url"])
        assert image.status_code == 200 and image.content.startswith(b"\x89PNG")
        ready = await client.get("/readyz")
        assert ready.status_code == 200 and not ready.json()["storage_full"]
        assert "chara_forge_writes_waiting_for_disk_space 0.0" in (await client.get("/metrics")).text
        after = await submit(client, steps=2)
        assert (await wait_for_state(client, after["id"]))["state"] == "succeeded"
