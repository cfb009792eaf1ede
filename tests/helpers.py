from __future__ import annotations

import io
import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass
class Burst:
    """Concurrent clients each submitting generations one after another: which were accepted (per client, in
    order), how many were refused as queue_full, and any other answer."""

    accepted: dict[int, list[str]]
    refused: int
    unexpected: list[str]

    @property
    def total_accepted(self) -> int:
        return sum(len(ids) for ids in self.accepted.values())

    def assert_kept_in_order(self, tasks: list[dict[str, object]]) -> None:
        """Every accepted task is among `tasks` (oldest first), each client's in the order it submitted them."""
        order = {task["id"]: position for position, task in enumerate(tasks)}
        for ids in self.accepted.values():
            assert all(task_id in order for task_id in ids)
            assert [order[task_id] for task_id in ids] == sorted(order[task_id] for task_id in ids)


async def submit_burst(
    client_for: Callable[[int], httpx.AsyncClient],
    clients: int,
    per_client: int,
    body: Callable[[int, int], dict[str, Any]],
) -> Burst:
    """`client_for(index)`: client `index`'s HTTP client; `body(index, n)`: its n-th request. Every answer
    must be 202 or 503 queue_full."""
    burst = Burst({index: [] for index in range(clients)}, 0, [])

    async def submitter(index: int) -> None:
        async with client_for(index) as client:
            for n in range(per_client):
                response = await client.post("/v1/generations", json=body(index, n))
                if response.status_code == 202:
                    burst.accepted[index].append(response.json()["id"])
                elif response.status_code == 503 and response.json()["error"]["code"] == "queue_full":
                    burst.refused += 1
                else:
                    burst.unexpected.append(f"{response.status_code} {response.text[:200]}")

    async with anyio.create_task_group() as tg:
        for index in range(clients):
            tg.start_soon(submitter, index)
    assert burst.unexpected == []
    assert burst.total_accepted + burst.refused == clients * per_client
    return burst


def on_a_thread(work: Callable[[], None]) -> None:
    """Run `work` as an engine runs: on a thread of its own, which then ends (its exception fails the caller)."""
    failures: list[BaseException] = []

    def run() -> None:
        try:
            work()
        except BaseException as exc:
            failures.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if failures:
        raise failures[0]
