"""The fleet's store against one box's, on the CPU with the tiny model: the same load (8 clients, each
following its tasks over the WebSocket) through a server on SQLite, then through one on a real
redis-server (one process: an API node and one worker).

Prints one JSON line: images/s through Redis divided by images/s through SQLite in the same run (target
>= 0.9), status p99 on the Redis node under that load (target < 20 ms), and Redis commands per task.
"""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import anyio
import redis

from bench.server_bench import CLIENTS, PER_CLIENT, _free_port, server_run
from engines.loader import quiet_libraries
from engines.tiny import build_tiny_sdxl

TARGET_RATIO, TARGET_P99_MS = 0.9, 20.0


def start_redis(directory: Path) -> tuple[subprocess.Popen[bytes], str]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("redis-server is not installed (Debian package redis-server)")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--appendonly", "yes",
         "--appendfsync", "always", "--save", "", "--logfile", str(directory / "redis.log")],
    )  # fmt: skip
    client = redis.Redis(port=port)
    deadline = time.monotonic() + 20
    while True:
        try:
            client.ping()
            return process, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def main() -> None:
    quiet_libraries()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        model = build_tiny_sdxl(root / "tiny")
        sqlite_rate, _ = anyio.run(server_run, model, root / "sqlite")
        (root / "redis").mkdir()
        process, url = start_redis(root / "redis")
        try:
            commands_before = int(redis.Redis.from_url(url).info("stats")["total_commands_processed"])
            settings = {"FORGE_STORE": url, "FORGE_NODE_NAME": "bench"}
            redis_rate, latencies = anyio.run(server_run, model, root / "fleet", settings)
            commands = int(redis.Redis.from_url(url).info("stats")["total_commands_processed"]) - commands_before
        finally:
            process.terminate()
            process.wait()
    quantiles = statistics.quantiles(latencies, n=100)
    images = CLIENTS * PER_CLIENT
    ratio, p99 = round(redis_rate / sqlite_rate, 3), round(quantiles[98], 2)
    result: dict[str, object] = {
        "bench": "fleet_cpu_tiny",
        "images": images,
        "sqlite_images_per_s": round(sqlite_rate, 3),
        "redis_images_per_s": round(redis_rate, 3),
        "ratio": ratio,
        "status_p50_ms": round(quantiles[49], 2),
        "status_p99_ms": p99,
        "status_samples": len(latencies),
        "redis_commands_per_task": round(commands / images, 1),
        "targets": {"ratio": f">= {TARGET_RATIO}", "status_p99_ms": f"< {TARGET_P99_MS}"},
    }
    result["meets_targets"] = ratio >= TARGET_RATIO and p99 < TARGET_P99_MS
    print(json.dumps(result))


if __name__ == "__main__":
    main()
