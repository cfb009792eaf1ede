"""The supervisor: one task group that creates every channel and starts every actor in dependency order.

Shutdown is an explicit sequence: stop accepting, drain running work with a deadline, interrupt what is
left (it goes back to the queue, same attempt), stop the HTTP server, cancel the rest.
"""

from __future__ import annotations

import logging
import math
from contextlib import AsyncExitStack
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path

import anyio
from anyio.abc import TaskStatus

from actors.backends import node_name, open_backends
from actors.box import BoxCanceller, BoxLive, BoxModels
from actors.character_library import CharacterLibrary
from actors.device_thread import DeviceThread
from actors.engine import SHUTDOWN, EngineActor, PreviewSettings
from actors.fleet import FleetCanceller, FleetLive, FleetModels, FleetWorker, Reaper, StoreHealth
from actors.hub import EventHub, Events
from actors.ingress import Ingress
from actors.keys import KeyStore
from actors.metrics import Metrics
from actors.model_catalog import ModelCatalog
from actors.postprocess import Postprocessor
from actors.redis_events import RedisEventHub
from actors.scheduler import FleetSettings, Scheduler
from actors.store import TaskStore
from actors.supervision import Supervision
from actors.uploads import UploadStore
from engines.background import MODEL_SUFFIX as BACKGROUND_SUFFIX
from engines.loader import (
    backend_settings,
    batch_policy,
    check_backend,
    cpu_threads_for_serving,
    memory_budget,
    visible_devices,
)
from engines.models import resolve_models
from engines.postprocess import ImageFilterSettings, PostprocessTools
from engines.upscale import UPSCALER_SUFFIXES
from forge.auth import ADMIN_SCOPE, Authenticator, JwtSettings, KeyRecord, Principal
from forge.batching import NO_BATCHING
from forge.config import Config
from forge.content_filter import DEFAULT_BLOCKED_TERMS, PromptFilter
from forge.embeddings import EmbeddingCatalog
from forge.engine import ModelInfo
from forge.errors import ConfigError
from forge.ip_adapters import fetch_hub_ip_adapters
from forge.loras import HubLora, LoraCatalog, fetch_hub_loras
from forge.messages import EngineInbox, PostprocessInbox, SchedulerInbox
from forge.model_files import ModelFiles
from forge.resolve import BackendLimits, Resources
from forge.styles import BUILTIN_STYLES_DIR, StyleRegistry
from forge.variations import PromptVariations
from protocols.http_server import HttpServer
from protocols.identity import is_loopback
from protocols.rest import Readiness, RestApi

log = logging.getLogger(__name__)

INTERRUPT_GRACE_S = 15.0
# The web UI's and MCP's event streams stay open for as long as a page or a client is connected, so
# waiting the REST server's graceful timeout for them to finish by themselves only delays every stop.
STREAM_SERVER_GRACE_S = 1.0


@dataclass(frozen=True)
class ServerHandle:
    """What a started server exposes to its caller (the CLI, tests)."""

    config: Config
    model: ModelInfo
    catalog: ModelCatalog
    resources: Resources
    api_port: int
    mcp_port: int | None
    ui_port: int | None
    ingress: Ingress
    scheduler: Scheduler
    hub: Events
    store: TaskStore
    metrics: Metrics


def announce_model(model: ModelInfo) -> None:
    if model.is_tiny:
        banner = "!" * 78
        log.warning(banner)
        log.warning("USING THE BUILT-IN TINY MODEL (%s): random weights, every image is noise.", model.name)
        log.warning("For real images set FORGE_MODEL to an SDXL diffusers folder or hub repo id.")
        log.warning(banner)
    else:
        log.info("model: %s (%s)", model.name, model.path)


def check_exposure(config: Config) -> None:
    """Without auth there is one user with every right: only this machine may reach it."""
    if config.auth:
        if config.jwt_secret and config.jwt_public_key_file:
            raise ConfigError("set jwt_secret or jwt_public_key_file, not both", field="jwt_secret")
        return
    if config.local_plan not in config.plans:
        raise ConfigError(f"local_plan {config.local_plan!r} is not one of the plans", field="local_plan")
    if not is_loopback(config.host):
        raise ConfigError(
            f"host {config.host} with auth off would let anyone on the network in; set FORGE_AUTH=true "
            "(then create keys with `chara-forge keys create`) or bind to 127.0.0.1",
            field="host",
        )


def authenticator(config: Config, keys: KeyStore) -> Authenticator:
    def verify(token: str) -> KeyRecord | None:
        key = keys.verify(token)
        return None if key is None else KeyRecord(key.owner, key.plan, key.scopes)

    jwt = JwtSettings(
        secret=config.jwt_secret,
        public_key_file=config.jwt_public_key_file,
        issuer=config.jwt_issuer,
        audience=config.jwt_audience,
    )
    local = Principal(owner="local", plan=config.local_plan, scopes=frozenset({ADMIN_SCOPE}))
    return Authenticator(config.auth, verify, jwt, local)


def load_resources(config: Config) -> Resources:
    """Styles (shipped, then the configured folder) and the LoRA catalog, with the hub LoRAs styles name."""
    style_dirs = [BUILTIN_STYLES_DIR] + ([Path(config.styles_dir).expanduser()] if config.styles_dir else [])
    styles = StyleRegistry.load(style_dirs)
    hub_loras = {
        lora.name: HubLora(repo=lora.hub, weight_name=lora.weight_name)
        for style in styles.all()
        for lora in style.loras
        if lora.hub is not None
    }
    return Resources(
        styles=styles,
        loras=LoraCatalog(config.loras_path, hub_loras),
        embeddings=EmbeddingCatalog(config.embeddings_path),
        variations=PromptVariations(config.wildcards_path),
        max_prompt_chars=config.max_prompt_chars,
        max_loras=config.max_loras,
        upscalers=ModelFiles(config.upscalers_path, UPSCALER_SUFFIXES),
        background_models=ModelFiles(config.background_models_path, (BACKGROUND_SUFFIX,)),
        default_upscaler=config.default_upscaler,
        default_background_model=config.default_background_model,
        max_output_pixels=config.max_output_pixels,
        max_work=config.max_work,
        max_references=config.max_references,
        prompt_filter=PromptFilter.from_file(
            Path(config.blocked_terms_file).expanduser() if config.blocked_terms_file else DEFAULT_BLOCKED_TERMS
        )
        if config.content_filter
        else None,
        backend=backend_limits(config),
    )


def backend_limits(config: Config) -> BackendLimits:
    if config.backend == "tensorrt":  # weights are baked into its engines, built for one range of sizes
        return BackendLimits(
            "tensorrt",
            loras=False,
            control=False,
            references=False,
            tiling=False,
            min_side=config.tensorrt_min_side,
            max_side=config.tensorrt_max_side,
        )
    return BackendLimits(config.backend)


async def serve(
    config: Config, *, shutdown: anyio.Event, task_status: TaskStatus[ServerHandle] = anyio.TASK_STATUS_IGNORED
) -> None:
    check_exposure(config)
    resources = load_resources(config)  # style files are checked here, before any model loads
    runs_engines = config.role != "api"
    setup = DeviceThread("model-setup")  # may build the tiny model with torch: a thread that then ends
    try:
        devices = await setup.run_sync(visible_devices, config.devices) if runs_engines else []
        backend = backend_settings(config, devices) if runs_engines else None
        if backend is not None:
            check_backend(backend)
        models = await setup.run_sync(resolve_models, config)
        models = [replace(model, embeddings_dir=str(config.embeddings_path)) for model in models]
        still_missing = await setup.run_sync(fetch_hub_loras, resources.loras, config.hub_timeout_s)
        if runs_engines:  # an API node leaves the adapters' weights to the workers, as it does the model's
            adapters = {name: source for model in models for name, source in model.ip_adapters.items()}
            missing_adapters = await setup.run_sync(fetch_hub_ip_adapters, adapters, config.hub_timeout_s)
            resources.missing_ip_adapters.update(missing_adapters)
    finally:
        setup.stop()
    catalog = ModelCatalog(models, models[0].id)
    model = catalog.default
    announce_model(model)
    if still_missing:
        log.warning("LoRAs not installed (styles using them are refused): %s", ", ".join(still_missing))
    if resources.missing_ip_adapters:
        log.warning(
            "IP-Adapters not installed (requests with references naming them are refused): %s",
            ", ".join(sorted(resources.missing_ip_adapters)),
        )
    name = node_name(config)

    async with open_backends(config) as backends:
        store, fleet_store = backends.store, backends.redis
        uploads = UploadStore(backends.uploads, config.max_upload_bytes)
        recovery = await store.recover(config.max_attempts)
        if recovery.retried or recovery.failed:
            log.warning(
                "recovered after an unclean stop: %d task(s) retried, %d failed as worker_lost",
                recovery.retried,
                recovery.failed,
            )
        hub: Events = EventHub() if fleet_store is None else RedisEventHub(fleet_store)
        to_scheduler, scheduler_inbox = anyio.create_memory_object_stream[SchedulerInbox](math.inf)
        to_postprocess, postprocess_inbox = anyio.create_memory_object_stream[PostprocessInbox](2 * len(devices) or 1)
        # Room for the tasks that join a running step-level batch while the engine takes the previous ones.
        engine_channels = {device: anyio.create_memory_object_stream[EngineInbox](16) for device in devices}
        channels = [to_scheduler, scheduler_inbox, to_postprocess, postprocess_inbox]
        channels += [end for pair in engine_channels.values() for end in pair]

        metrics = Metrics()
        hub.add_tap(metrics.observe)
        scheduler_batching = batch_policy(config, devices) if devices else NO_BATCHING
        scheduler = Scheduler(
            store,
            hub,
            scheduler_inbox,
            {d: send for d, (send, _) in engine_channels.items()},
            on_take=metrics.track,
            batching=scheduler_batching,
            holds_model=catalog.holds,
            fleet=None
            if fleet_store is None
            else FleetSettings(
                queue=fleet_store, worker=name, models_held=lambda device: list(catalog.loaded_on(device))
            ),
        )
        store_health = StoreHealth(fleet_store) if fleet_store is not None else None
        metrics.watch(
            # A fleet's queue is in Redis, the same on every node; a worker claims only what it runs.
            lambda: scheduler.statistics().queued if store_health is None else store_health.queued,
            lambda: scheduler.statistics().running,
            devices,
            lambda: store.disk.waiting,
        )
        postprocessor = Postprocessor(
            store=store,
            hub=hub,
            inbox=postprocess_inbox,
            results=backends.results,
            tools=PostprocessTools(
                config.upscalers_path,
                config.background_models_path,
                devices[0] if devices else "cpu",
                config.upscale_tile,
                image_filter=ImageFilterSettings(
                    source=config.image_filter_model,
                    labels=tuple(config.image_filter_labels.split(",")),
                    threshold=config.image_filter_threshold,
                )
                if config.image_filter_model
                else None,
            ),
            upscalers=resources.upscalers,
            background_models=resources.background_models,
        )
        engines = [
            EngineActor(
                device=device,
                backend=backend,
                catalog=catalog,
                loras=resources.loras,
                uploads=uploads,
                memory_budget=memory_budget(device, config.model_memory_gb),
                cpu_threads=cpu_threads_for_serving(config.cpu_threads),
                previews=PreviewSettings(config.preview_every, config.preview_size),
                store=store,
                hub=hub,
                inbox=receive,
                scheduler=to_scheduler,
                postprocess=to_postprocess,
                on_model_loaded=metrics.model_loaded,
                on_step=metrics.step_batch_images.observe,
                max_images=scheduler_batching.max_images,
            )
            for device, (_, receive) in engine_channels.items()
            if backend is not None
        ]
        ingress = Ingress(
            config=config,
            catalog=catalog,
            resources=resources,
            uploads=uploads,
            store=store,
            hub=hub,
            live=BoxLive(scheduler, hub) if fleet_store is None else FleetLive(fleet_store),
            canceller=BoxCanceller(to_scheduler) if fleet_store is None else FleetCanceller(fleet_store),
            models=BoxModels(catalog, engines) if fleet_store is None else FleetModels(fleet_store, catalog),
            characters=CharacterLibrary(backends.characters, uploads),
            results=backends.results,
            result_index=backends.result_index,
            scheduler_inbox=to_scheduler if fleet_store is None else None,
            on_submitted=metrics.submitted,
        )
        auth = authenticator(config, backends.keys)

        def readiness() -> Readiness:
            reachable = fleet_store is None or fleet_store.reachable
            return Readiness(
                engines={engine.device: engine.ready for engine in engines},
                needs_engines=runs_engines,
                accepting=ingress.accepting,
                storage_full=ingress.storage_full,
                store_reachable=reachable,
            )

        rest = RestApi(
            ingress=ingress,
            hub=hub,
            results=backends.results,
            readiness=readiness,
            metrics=metrics,
            auth=auth,
            ws_allowed_origins=frozenset(filter(None, (o.strip() for o in config.ws_allowed_origins.split(",")))),
            max_body_bytes=config.max_body_bytes,
            # a few images in base64, as AUTOMATIC1111 and OpenAI clients send them
            image_body_bytes=max(config.max_body_bytes, 4 * config.max_upload_bytes),
            admin_key=config.admin_key,
            metrics_token=config.metrics_token,
            caller_models=backends.caller_models,
        )
        serves_clients = config.role != "worker"
        http = HttpServer(rest.app() if serves_clients else rest.probes_app(), config.host, config.api_port)
        servers = [http]
        mcp_http: HttpServer | None = None
        if config.enable_mcp and serves_clients:  # imported only when on: the REST path runs without the MCP package
            try:
                from protocols.mcp_server import McpAdapter, transport_security
            except ImportError as exc:
                raise ConfigError(
                    f"the MCP server needs the 'mcp' extra ({exc}); install chara-forge[mcp] "
                    "or set FORGE_ENABLE_MCP=false",
                    field="enable_mcp",
                ) from exc

            mcp = McpAdapter(ingress=ingress, hub=hub, results=backends.results, auth=auth)
            security = transport_security(config.mcp_allowed_hosts, config.mcp_allowed_origins)
            mcp_http = HttpServer(
                mcp.app(security, stateless=config.uses_redis),
                config.host,
                config.mcp_port,
                graceful_timeout_s=STREAM_SERVER_GRACE_S,
            )
            servers.append(mcp_http)

        ui_http: HttpServer | None = None
        if config.enable_ui and serves_clients:
            try:
                from protocols.ui import WebUi
            except ImportError as exc:
                raise ConfigError(
                    f"the web UI needs the 'ui' extra ({exc}); install chara-forge[ui] or set FORGE_ENABLE_UI=false",
                    field="enable_ui",
                ) from exc
            ui = WebUi(ingress=ingress, hub=hub, results=backends.results, data_dir=config.data_path, auth=auth)
            ui_http = HttpServer(ui.app(), config.host, config.ui_port, graceful_timeout_s=STREAM_SERVER_GRACE_S)
            servers.append(ui_http)

        supervision = Supervision()
        async with AsyncExitStack() as stack, anyio.create_task_group() as tg:
            for channel in channels:
                stack.push_async_callback(channel.aclose)
            tg.start_soon(_relay, shutdown, supervision.stop)
            if isinstance(hub, RedisEventHub):
                await supervision.start(tg, "event hub", hub.run)
            if fleet_store is not None and store_health is not None:
                await supervision.start(tg, "store health", store_health.run)
                await supervision.start(
                    tg, "reaper", Reaper(fleet_store, config.claim_timeout_s, config.max_attempts).run
                )
            if runs_engines:
                await supervision.start(tg, "postprocessor", postprocessor.run)
                await supervision.start(tg, "scheduler", partial(scheduler.run, recovery.requeued))
                if fleet_store is not None:
                    worker = FleetWorker(
                        name=name,
                        store=fleet_store,
                        hub=hub,
                        scheduler=scheduler,
                        scheduler_inbox=to_scheduler,
                        catalog=catalog,
                        engines=engines,
                        claim_timeout_s=config.claim_timeout_s,
                    )
                    supervision.start_soon(tg, "fleet worker", worker.run)
            api_port = await supervision.start(tg, "REST server", http.run)
            log.info(
                "%s on http://%s:%d (role %s, node %s)",
                "REST API" if serves_clients else "probes",
                config.host,
                api_port,
                config.role,
                name,
            )
            mcp_port = None
            if mcp_http is not None:
                mcp_port = await supervision.start(tg, "MCP server", mcp_http.run)
                log.info("MCP on http://%s:%d/mcp (streamable HTTP) and /sse", config.host, mcp_port)
            ui_port = None
            if ui_http is not None:
                ui_port = await supervision.start(tg, "web UI server", ui_http.run)
                log.info("web UI on http://%s:%d", config.host, ui_port)
            for engine in engines:  # load concurrently; the scheduler dispatches to each once it is warm
                supervision.start_soon(tg, f"engine {engine.device}", engine.run)
            task_status.started(
                ServerHandle(
                    config=config,
                    model=model,
                    catalog=catalog,
                    resources=resources,
                    api_port=api_port,
                    mcp_port=mcp_port,
                    ui_port=ui_port,
                    ingress=ingress,
                    scheduler=scheduler,
                    hub=hub,
                    store=store,
                    metrics=metrics,
                )
            )
            await supervision.stop.wait()

            log.info("shutting down: refusing new work, draining for up to %.0f s", config.drain_seconds)
            ingress.close()
            scheduler.stop_dispatching()
            with anyio.move_on_after(config.drain_seconds):
                await scheduler.wait_no_running()
                await postprocessor.wait_idle()
            scheduler.interrupt_running(SHUTDOWN)
            with anyio.move_on_after(INTERRUPT_GRACE_S):
                await scheduler.wait_no_running()
                await postprocessor.wait_idle()
            for server in servers:
                server.stop()
            with anyio.move_on_after(INTERRUPT_GRACE_S):
                for server in servers:
                    await server.wait_stopped()
            tg.cancel_scope.cancel()
    log.info("stopped")
    if supervision.failure is not None:
        raise supervision.failure


async def _relay(shutdown: anyio.Event, stop: anyio.Event) -> None:
    await shutdown.wait()
    stop.set()
