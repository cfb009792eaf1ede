"""/metrics in Prometheus text format: counters and histograms move as generations run."""

from __future__ import annotations

import pytest

from tests.conftest import RunningServer
from tests.helpers import Samples, scrape_metrics, submit, wait_for_state

pytestmark = pytest.mark.anyio


async def _scrape(server: RunningServer) -> Samples:
    return await scrape_metrics(server.client)


async def test_metrics_follow_generations(server: RunningServer) -> None:
    client = server.client
    before = await _scrape(server)
    assert before[("chara_forge_queue_depth", ())] == 0
    assert before[("chara_forge_end_to_end_seconds_count", ())] == 0

    await wait_for_state(client, (await submit(client, num_images=2))["id"])
    await wait_for_state(client, (await submit(client, style="anime"))["id"])
    slow = await submit(client, steps=60, width=256, height=256)
    await client.post(f"/v1/generations/{slow['id']}/cancel")
    assert (await client.post("/v1/generations", json={"prompt": ""})).status_code == 422

    after = await _scrape(server)
    assert after[("chara_forge_generations_total", (("state", "succeeded"), ("style", "none")))] == 1
    assert after[("chara_forge_generations_total", (("state", "succeeded"), ("style", "anime")))] == 1
    assert after[("chara_forge_generations_total", (("state", "cancelled"), ("style", "none")))] == 1
    assert after[("chara_forge_images_total", ())] == 3
    assert after[("chara_forge_end_to_end_seconds_count", ())] == 2
    assert after[("chara_forge_postprocess_seconds_count", ())] == 2
    assert after[("chara_forge_queue_wait_seconds_count", ())] == 3
    assert after[("chara_forge_denoise_seconds_count", ())] == 2
    assert after[("chara_forge_rejections_total", (("code", "invalid_request"),))] >= 1
    assert after[("chara_forge_engine_busy_seconds_total", (("device", "cpu"),))] > 0
    assert 0 < after[("chara_forge_engine_busy_ratio", (("device", "cpu"),))] <= 1
    # The default model, loaded and warmed once at startup; generations do not load it again.
    loads = {labels: value for (name, labels), value in after.items() if name == "chara_forge_model_load_seconds_count"}
    assert list(loads.values()) == [1] and dict(next(iter(loads)))["device"] == "cpu"
    assert after[("chara_forge_model_load_seconds_sum", next(iter(loads)))] > 0
    print(f"/metrics after 3 generations: {len(after)} samples")
