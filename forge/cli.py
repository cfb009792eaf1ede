"""`chara-forge serve` runs the server; `chara-forge generate` runs the same engine once, without it."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import uuid
from pathlib import Path

import anyio

from forge.config import Config, load_config
from forge.errors import ConfigError, ForgeError
from forge.logs import setup_logging

log = logging.getLogger("chara_forge")
DEFAULT_CONFIG = Path("chara-forge.toml")
REPEAT_WINDOW_S = 1.0


def _setup_logging(level: str, fmt: str = "console") -> None:
    setup_logging(level, fmt)
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _config(args: argparse.Namespace, **explicit: object) -> Config:
    path = args.config if args.config else (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    return load_config(path, overrides={key: value for key, value in explicit.items() if value is not None})


async def _watch_signals(shutdown: anyio.Event, scope: anyio.CancelScope) -> None:
    first_at = 0.0
    with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
        async for signum in signals:
            name = signal.Signals(signum).name
            if not shutdown.is_set():
                log.info("%s received: graceful shutdown (send again to stop now)", name)
                first_at = time.monotonic()
                shutdown.set()
            # Ctrl-C reaches both `just` and the server, and `just` forwards it: one keypress, two signals.
            elif time.monotonic() - first_at > REPEAT_WINDOW_S:
                log.warning("second %s: stopping now", name)
                scope.cancel()
                return


async def _serve(config: Config) -> None:
    from actors.supervisor import serve

    shutdown = anyio.Event()
    async with anyio.create_task_group() as tg:
        tg.start_soon(_watch_signals, shutdown, tg.cancel_scope)
        await serve(config, shutdown=shutdown)
        tg.cancel_scope.cancel()


def cmd_serve(args: argparse.Namespace) -> int:
    config = _config(args, host=args.host, api_port=args.port, data_dir=args.data_dir, model=args.model)
    _setup_logging(config.log_level, config.log_format)
    from actors.supervision import ActorFailed

    try:
        anyio.run(_serve, config)
    except ActorFailed:  # logged first, with its traceback, when it happened
        return 1
    except BaseExceptionGroup as group:
        failed, rest = group.split(ActorFailed)
        if failed is None:
            raise
        if rest is not None:
            raise rest from None
        return 1
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from tqdm import tqdm

    from actors.engine import image_jobs, run_images
    from actors.files import DirectoryFiles
    from actors.postprocess import write_outputs
    from actors.supervisor import load_resources
    from engines.loader import backend_settings, load_engine, prepare_thread, visible_devices
    from engines.models import resolve_model
    from forge.engine import LoraWeight, job_for
    from forge.requests import GenerationRequest
    from forge.resolve import resolve_request
    from forge.validation import convert

    config = _config(args, data_dir=args.data_dir, model=args.model)
    _setup_logging("WARNING")
    fields = {
        "prompt": args.prompt,
        "negative_prompt": args.negative_prompt,
        "width": args.width,
        "height": args.height,
        "num_images": args.num_images,
        "steps": args.steps,
        "guidance_scale": args.guidance_scale,
        "seed": args.seed,
        "scheduler": args.scheduler,
        "output_format": args.output_format,
        "style": args.style,
    }
    request = convert({k: v for k, v in fields.items() if v is not None}, GenerationRequest)
    model = resolve_model(config.model, config.data_path, config.hub_timeout_s)
    if model.is_tiny:
        print(f"note: using the built-in tiny model {model.name} (random weights: images are noise)", file=sys.stderr)
    resources = load_resources(config)
    spec = resolve_request(request, model, resources)
    loras = [
        LoraWeight(name=lora.name, path=str(resources.loras.path(lora.name)), weight=lora.weight) for lora in spec.loras
    ]
    device = args.device or visible_devices(config.devices)[0]
    prepare_thread(device)
    engine = load_engine(backend_settings(config, [device]), model, device)
    bar = tqdm(total=spec.steps, desc="denoising", unit="step", file=sys.stderr)

    def on_progress(step: int, total: int, _preview: object) -> None:
        bar.total = total
        bar.n = step
        bar.refresh()

    created = time.time()
    job = job_for(spec, model, loras=loras, on_progress=on_progress)
    if spec.variants:  # each image its own prompt
        job = replace(job, views=image_jobs(spec, job, hires_of=lambda image: None))
    result = run_images(engine, job) if job.views else engine.run(job)
    bar.close()
    task_id = uuid.uuid4().hex
    images, _ = write_outputs(
        DirectoryFiles(Path(args.output)),
        task_id=task_id,
        spec=spec,
        images=result.images,
        model=model,
        device=device,
        attempt=1,
        denoise_s=result.denoise_s,
        created_at=created,
    )
    for image in images:
        print(Path(args.output) / image)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from actors.backends import key_store

    config = _config(args, data_dir=args.data_dir)
    store = key_store(config)
    if args.action == "create":
        if args.plan not in config.plans:
            raise ConfigError(f"unknown plan {args.plan!r}; plans: {', '.join(config.plans)}", field="plan")
        key, token = store.create(args.owner, args.plan, ["generate", *args.scope])
        print(f"key {key.id} for {key.owner} (plan {key.plan}, scopes {' '.join(key.scopes)}):")
        print(token)
        print("keep it safe: it is not stored and cannot be shown again", file=sys.stderr)
    elif args.action == "list":
        for key in store.list():
            state = "revoked" if key.revoked_at else "active"
            print(f"{key.id}  {key.owner:20}  {key.plan:10}  {' '.join(key.scopes):20}  {state}")
    elif not store.revoke(args.id):
        print(f"no active key {args.id}", file=sys.stderr)
        return 1
    return 0


def cmd_store(args: argparse.Namespace) -> int:
    from actors.migrate import migrate
    from actors.sync_redis import sync_redis

    box = _config(args, data_dir=args.data_dir, store="sqlite", role="all")
    fleet = _config(args, data_dir=args.data_dir, store=args.to, role="all")
    if not fleet.uses_redis:
        raise ConfigError("--to must be a redis:// or rediss:// URL", field="to")
    client = sync_redis(fleet.store)
    try:
        done = migrate(box, fleet, client)
    except FileNotFoundError as exc:
        raise ConfigError(str(exc), field="data_dir") from None
    finally:
        client.close()
    print(
        f"copied {done.tasks} task(s) ({done.requeued} queued again), {done.files} file(s), {done.keys} key(s) "
        f"and {done.characters} character(s) from {box.database_path} into the Redis store"
    )
    for clash in done.name_clashes:
        print(f"not copied: the fleet has another character named {clash}; rename one and run again", file=sys.stderr)
    return 0


def cmd_cache(args: argparse.Namespace) -> int:
    from datetime import datetime

    from engines.cache_files import entries, prune

    root = _config(args, data_dir=args.data_dir).data_path / "engine-cache"
    if args.action == "list":
        listed, verb = entries(root), "in the engine cache"
    else:
        listed = prune(root, args.unused_days * 86400, dry_run=args.dry_run)
        verb = "would be freed" if args.dry_run else "freed"
    for entry in listed:
        used = datetime.fromtimestamp(entry.last_used).strftime("%Y-%m-%d %H:%M")
        print(f"{entry.size_bytes / 1e6:10.1f} MB  {used}  {entry.kind:17}  {entry.path}")
    total = sum(entry.size_bytes for entry in listed)
    print(f"{total / 1e9:.2f} GB {verb} ({len(listed)} parts, {root})", file=sys.stderr)
    return 0


def cmd_engine(args: argparse.Namespace) -> int:
    from engines.cache_artifacts import export_cache, import_cache

    root = _config(args, data_dir=args.data_dir).data_path / "engine-cache"
    file = Path(args.file)
    if args.action == "export-cache":
        keys, verb = export_cache(root, file), f"exported to {file}"
    else:
        keys, verb = import_cache(file, root), f"imported into {root}"
    for key in keys:
        print(key)
    print(f"compiled code for {len(keys)} torch/Triton/GPU combinations {verb}", file=sys.stderr)
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="chara-forge", description=__doc__)
    parser.add_argument("--config", type=Path, help="TOML config file (default: ./chara-forge.toml if present)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the server (REST + WebSocket)")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int, help="REST API port (FORGE_API_PORT)")
    serve.add_argument("--data-dir")
    serve.add_argument("--model", help="auto | tiny | a diffusers folder | a hub repo id")
    serve.set_defaults(func=cmd_serve)

    gen = sub.add_parser("generate", help="generate images once, without the server")
    gen.add_argument("prompt")
    gen.add_argument("-o", "--output", default="outputs", help="folder for the images (default: ./outputs)")
    gen.add_argument("--negative-prompt")
    gen.add_argument("--width", type=int)
    gen.add_argument("--height", type=int)
    gen.add_argument("-n", "--num-images", type=int)
    gen.add_argument("--steps", type=int)
    gen.add_argument("--guidance-scale", type=float)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--scheduler")
    gen.add_argument("--format", dest="output_format")
    gen.add_argument("--style", action="append", help="a style from the style files; repeat to stack them")
    gen.add_argument("--model")
    gen.add_argument("--device")
    gen.add_argument("--data-dir")
    gen.set_defaults(func=cmd_generate)

    keys = sub.add_parser("keys", help="manage API keys (stored hashed in the server's database)")
    keys.add_argument("--data-dir")
    actions = keys.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="make a key; it is printed once")
    create.add_argument("--owner", required=True, help="whose tasks the key reaches")
    create.add_argument("--plan", default="free", help="rate-limit plan (see `plans` in the config)")
    create.add_argument("--scope", action="append", default=[], help="extra scope, e.g. admin (repeatable)")
    actions.add_parser("list", help="every key, without its secret")
    revoke = actions.add_parser("revoke", help="revoke a key by id")
    revoke.add_argument("id")
    keys.set_defaults(func=cmd_keys)

    store = sub.add_parser("store", help="move a single box's store into a fleet's Redis")
    store.add_argument("--data-dir")
    store_actions = store.add_subparsers(dest="action", required=True)
    migrating = store_actions.add_parser(
        "migrate", help="copy tasks (unfinished ones are queued again), files, uploads, keys and characters into Redis"
    )
    migrating.add_argument("--from", dest="source", choices=["sqlite"], default="sqlite")
    migrating.add_argument("--to", required=True, help="the fleet's store, redis://[user:password@]host:port/db")
    store.set_defaults(func=cmd_store)

    cache = sub.add_parser("cache", help="what the engine cache holds (compiled code, TensorRT engines); prune it")
    cache.add_argument("--data-dir")
    steps = cache.add_subparsers(dest="action", required=True)
    steps.add_parser("list", help="each part with its size and last use, least recent first")
    pruning = steps.add_parser("prune", help="remove the parts no start has used for a while")
    pruning.add_argument("--unused-days", type=float, default=30, help="unused for this long (default: 30)")
    pruning.add_argument("--dry-run", action="store_true", help="list what would go, remove nothing")
    cache.set_defaults(func=cmd_cache)

    engine = sub.add_parser("engine", help="move compiled engines' code between machines (a fleet compiles once)")
    engine.add_argument("--data-dir")
    moves = engine.add_subparsers(dest="action", required=True)
    moves.add_parser("export-cache", help="write the compiled code this data directory holds to FILE").add_argument(
        "file"
    )
    moves.add_parser("import-cache", help="add the compiled code in FILE (from export-cache)").add_argument("file")
    engine.set_defaults(func=cmd_engine)
    return parser


def _first_leaf(group: BaseExceptionGroup[ForgeError]) -> ForgeError:
    first = group.exceptions[0]
    return _first_leaf(first) if isinstance(first, BaseExceptionGroup) else first


def _report(exc: ForgeError) -> int:
    where = f" ({exc.field})" if exc.field else ""
    print(f"chara-forge: error{where}: {exc.message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ForgeError as exc:
        return _report(exc)
    except BaseExceptionGroup as group:  # a startup error raised inside the server's task group
        matched, _ = group.split(ForgeError)
        if matched is None:
            raise
        return _report(_first_leaf(matched))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
