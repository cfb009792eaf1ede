from __future__ import annotations

import io
import socket
from typing import Any

import anyio
import httpx
import numpy as np
from PIL import Image, ImageDraw

FINAL_STATES = {"succeeded", "failed", "cancelled", "filtered"}


async def submit(client: httpx.AsyncClient, **fields: Any) -> dict[str, Any]:
    body = {"prompt": "a knight in silver armour", **fields}
    response = await client.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text
    result: dict[str, Any] = response.json()
    return result


async def wait_for_state(
    client: httpx.AsyncClient, task_id: str, states: set[str] = FINAL_STATES, timeout_s: float = 60
) -> dict[str, Any]:
    with anyio.fail_after(timeout_s):
        while True:
            view: dict[str, Any] = (await client.get(f"/v1/generations/{task_id}")).json()
            if view["state"] in states:
                return view
            await anyio.sleep(0.02)


async def generate_pixels(client: httpx.AsyncClient, **fields: Any) -> tuple[dict[str, Any], Any]:
    """Generate, wait for success, and return the task view and image 0's pixels (a numpy array)."""
    view = await wait_for_state(client, (await submit(client, **fields))["id"])
    assert view["state"] == "succeeded", view["error"]
    response = await client.get(view["images"][0]["url"])
    with Image.open(io.BytesIO(response.content)) as image:
        return view, np.asarray(image.convert("RGB"))


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def square_image(size: int = 64, box: tuple[int, int, int, int] = (16, 16, 47, 47)) -> Image.Image:
    image = Image.new("RGB", (size, size), "black")
    ImageDraw.Draw(image).rectangle(box, fill="white")
    return image


def gradient_image(size: int = 64, horizontal: bool = True) -> Image.Image:
    ramp = np.tile(np.linspace(0, 255, size, dtype=np.uint8), (size, 1))
    return Image.fromarray(ramp if horizontal else ramp.T).convert("RGB")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape_metrics(client: httpx.AsyncClient, url: str = "/metrics") -> Samples:
    """Every sample of a Prometheus scrape, by name and sorted labels."""
    from prometheus_client.parser import text_string_to_metric_families

    response = await client.get(url)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


async def all_tasks(client: httpx.AsyncClient) -> list[dict[str, object]]:
    """Every task, oldest first, through the list's pages."""
    found: list[dict[str, object]] = []
    cursor: str | None = None
    while True:
        page = (
            await client.get("/v1/generations", params={"limit": 100, **({"cursor": cursor} if cursor else {})})
        ).json()
        found += page["items"]
        cursor = page["next_cursor"]
        if cursor is None:
            return found[::-1]
