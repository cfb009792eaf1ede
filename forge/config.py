"""Configuration: a frozen Struct read from a TOML file, then overridden by `FORGE_<KEY>` variables."""

from __future__ import annotations

import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Meta

from forge.auth import DEFAULT_PLANS, Plan
from forge.errors import ConfigError
from forge.ip_adapters import RECOMMENDED, IpAdapterSource

Backend = Literal["eager", "compiled", "tensorrt"]

Port = Annotated[int, Meta(ge=0, le=65535)]


class ModelEntry(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A model in `models` with settings of its own (a plain string is the source alone). Unset settings are
    read from the weights: a single file's `v_pred` / `ztsnr` keys, a diffusers folder's scheduler config.
    An entry under the default model's id with no source sets the default model's settings."""

    source: str = ""
    prediction: Literal["epsilon", "v"] | None = None
    zero_snr: bool | None = None
    # The guidance_rescale requests get when they name none (0.7 for zero-SNR models, else 0).
    guidance_rescale: Annotated[float, Meta(ge=0, le=1)] | None = None
    vae: str = ""  # a name from `vaes` used when a request names none; empty: the model's own


class Config(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    host: str = "127.0.0.1"
    api_port: Port = 8000
    ui_port: Port = 7860
    mcp_port: Port = 8001
    enable_ui: bool = True
    enable_mcp: bool = True
    # Comma-separated Host and Origin values MCP accepts (DNS-rebinding protection); empty: loopback only.
    mcp_allowed_hosts: str = ""
    mcp_allowed_origins: str = ""
    data_dir: str = "./data"
    # "auto": SDXL base from the Hugging Face cache or hub, else the built-in tiny model.
    # "tiny": always the built-in tiny model. Anything else: a local diffusers folder or a hub repo id.
    model: str = "auto"
    # More base models, loaded on demand: id -> a diffusers folder, a hub repo id or a single .safetensors file.
    # In FORGE_MODELS: "id=source,id=source", or a JSON object. A table sets a model's prediction ("epsilon" |
    # "v"), zero_snr, guidance_rescale and vae: models.anime = {source = "anime.safetensors", prediction = "v"}.
    models: dict[str, str | ModelEntry] = {}
    # VAEs requests may choose (`vae`), loaded once per engine and swapped in: name -> a diffusers folder or one
    # single file. In FORGE_VAES: "name=source,name=source".
    vaes: dict[str, str] = {}
    # Inpainting checkpoints (a 9-channel UNet): model id -> a diffusers folder or hub repo whose unet/ is one
    # (e.g. diffusers/stable-diffusion-xl-1.0-inpainting-0.1). A model without one inpaints with its own UNet.
    # In FORGE_INPAINTING_MODELS: "id=source,id=source".
    inpainting_models: dict[str, str] = {}
    # Memory per device for loaded models (least recently used ones are unloaded first; the default model is
    # pinned). 0: 80% of the GPU's memory, or half the RAM on a CPU.
    model_memory_gb: Annotated[float, Meta(ge=0)] = 0.0
    # SDXL ControlNets (a diffusers folder or hub repo id; empty: not installed). The tiny model builds its own.
    controlnet_openpose: str = ""
    controlnet_depth: str = ""
    controlnet_canny: str = ""
    # A transformers depth-estimation model (folder or repo id) for depth control from an ordinary image.
    depth_model: str = ""
    # Extra style files (TOML/YAML) on top of the shipped ones; a style with the same name replaces a shipped one.
    styles_dir: str = ""
    # LoRA files; empty: <data_dir>/models/loras.
    loras_dir: str = ""
    max_loras: Annotated[int, Meta(ge=0, le=16)] = 4
    # IP-Adapters for reference images (SDXL models; the tiny model builds its own): name -> {source (hub repo
    # or folder), weight_name, image_encoder}. Hub ones are fetched at start when the hub answers. In
    # FORGE_IP_ADAPTERS: a JSON object.
    ip_adapters: dict[str, IpAdapterSource] = msgspec.field(default_factory=lambda: {"plus": RECOMMENDED})
    max_references: Annotated[int, Meta(ge=0, le=16)] = 4
    # Bearer token for the admin endpoints (model load/unload); empty: only clients on this machine may call them.
    admin_key: str = ""
    # Identity: with auth on, every call needs an API key (`chara-forge keys create`) or a JWT; owners see
    # only their own tasks. Off: one local user, and the server only binds to loopback.
    auth: bool = False
    jwt_secret: str = ""  # HS256/384/512
    jwt_public_key_file: str = ""  # RS*/ES*/PS*; set one of the two
    jwt_issuer: str = ""
    jwt_audience: str = "chara-forge"
    # Bearer token /metrics asks for (Prometheus' `authorization` setting); empty: /metrics answers anyone, as
    # scrape endpoints usually do. It shows model, style and device names and error counts, never prompts.
    metrics_token: str = ""
    # Browser Origins allowed to open the WebSocket (comma-separated); clients that send none are fine.
    ws_allowed_origins: str = ""
    plans: dict[str, Plan] = msgspec.field(default_factory=lambda: dict(DEFAULT_PLANS))
    local_plan: str = "unlimited"
    # Post-processing models are files in <data_dir>/models/upscalers (.pth/.safetensors) and
    # <data_dir>/models/rembg (.onnx); these are used when a request names none.
    default_upscaler: str = "RealESRGAN_x4plus"
    default_background_model: str = "isnet-general-use"
    # Upscaling works tile by tile (pixels a side, 0: whole images) so memory stays bounded.
    upscale_tile: Annotated[int, Meta(ge=0, le=4096)] = 256
    # Prompts are checked against a term list (empty: the shipped configs/content_filter/blocked_terms.txt).
    content_filter: bool = True
    blocked_terms_file: str = ""
    # Generated images are checked by this transformers image classifier when set (a folder or repo id);
    # an image with one of the labels at or over the threshold is not stored and the task ends `filtered`.
    image_filter_model: str = ""
    image_filter_labels: str = "nsfw,porn,hentai,sexy"
    image_filter_threshold: Annotated[float, Meta(ge=0, le=1)] = 0.8
    # Largest image post-processing may produce (after upscaling), in pixels.
    max_output_pixels: Annotated[int, Meta(ge=4096)] = 4096 * 4096
    max_upload_bytes: Annotated[int, Meta(ge=1024)] = 16 * 1024 * 1024
    backend: Backend = "eager"
    # compiled: a torch.compile mode ("auto": reduce-overhead, with CUDA graphs, with compile_scope full on GPUs;
    # default otherwise; a max-autotune mode also turns on coordinate-descent tuning: far longer compiles), weight
    # quantisation through torchao ("int8", "fp8"; changes the images slightly) and fused QKV projections.
    compile_mode: Literal["auto", "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"] = "auto"
    # regional: the UNet's repeated blocks (transformer and ResNet), compiled once per shape and shared by every
    # copy: a cold start in minutes less, a restart in seconds; full: the whole UNet and VAE decoder as one graph
    # each (CUDA graphs possible); aot: the UNet compiled ahead of time (AOTInductor) into a package under the
    # data directory that later starts load in under a second.
    compile_scope: Literal["full", "regional", "aot"] = "regional"
    quantize: Literal["none", "int8", "fp8"] = "none"
    fuse_qkv: bool = True
    # How a compiled UNet meets batches, whose row count changes as tasks join and leave: padded: each call
    # padded to 1, 2, 4, 8... rows (up to the largest batch), each count compiled at warm-up as a static shape,
    # so serving never compiles; dynamic: one graph with symbolic sizes (slower kernels, longer compiles).
    compiled_shapes: Literal["dynamic", "padded"] = "padded"
    # Image sizes ("WIDTHxHEIGHT") the compiled backend compiles at warm-up besides the model's default size;
    # a size not listed compiles on its first request.
    compile_warm_sizes: list[Annotated[str, Meta(pattern=r"^[1-9][0-9]*x[1-9][0-9]*$")]] = []
    # compiled: LoRAs up to this rank on the UNet's attention projections stay compiled, swapped into max_loras
    # slots compiled in from the start (each slot costs a little on every request); 0: LoRAs run uncompiled.
    lora_rank: Annotated[int, Meta(ge=0, le=256)] = 0
    # tensorrt: the image sides (pixels) one engine covers; the batch range follows max_batch.
    tensorrt_min_side: Annotated[int, Meta(ge=64, le=4096, multiple_of=64)] = 512
    tensorrt_opt_side: Annotated[int, Meta(ge=64, le=4096, multiple_of=64)] = 1024
    tensorrt_max_side: Annotated[int, Meta(ge=64, le=4096, multiple_of=64)] = 1536
    # Dynamic batching: tasks that share model, LoRAs, size, steps and sampler (guidance scales may differ)
    # are denoised as one UNet batch of up to `max_batch` images (0: 8 on GPUs, 1 (off) on a CPU, where
    # batches gain nothing).
    # A part-filled batch waits at most `batch_wait_ms` for company, and only while nothing else is queued.
    max_batch: Annotated[int, Meta(ge=0, le=64)] = 0
    # step: tasks share the UNet call at every step whatever their step counts and samplers, join a running
    # batch at its next step and leave when done; request: a batch starts together and runs to its end.
    batching: Literal["step", "request"] = "step"
    batch_wait_ms: Annotated[float, Meta(ge=0, le=10_000)] = 20.0
    # "auto": every visible CUDA device, else one CPU engine. Otherwise a comma-separated list.
    devices: str = "auto"
    # Intra-op threads for a CPU engine; 0: all cores but one, which stays free for the event loop and I/O.
    cpu_threads: Annotated[int, Meta(ge=0, le=1024)] = 0
    hub_timeout_s: Annotated[float, Meta(gt=0, le=60)] = 3.0
    max_attempts: Annotated[int, Meta(ge=1, le=20)] = 3
    max_queue: Annotated[int, Meta(ge=1)] = 10_000
    # An identical request with a fixed seed (same model, every parameter, the same images) from the same owner
    # is answered by the earlier task's images instead of the GPU, while they are kept.
    result_cache: bool = True
    max_body_bytes: Annotated[int, Meta(ge=1024)] = 4 * 1024 * 1024
    max_prompt_chars: Annotated[int, Meta(ge=1, le=100_000)] = 2000
    # Work one request may ask for: width x height x images x steps (default: 8 images of 1024² at 60 steps).
    max_work: Annotated[int, Meta(ge=1)] = 1024 * 1024 * 8 * 60
    preview_every: Annotated[int, Meta(ge=0)] = 2  # steps between latent previews; 0 turns them off
    preview_size: Annotated[int, Meta(ge=16, le=512)] = 128
    drain_seconds: Annotated[float, Meta(ge=0)] = 30.0
    # Where tasks, the queue, events, keys, limits, uploads and results live: "sqlite" (one box, files under
    # data_dir) or a Redis URL (redis://[user:password@]host:port/db, rediss:// for TLS) that a fleet shares.
    store: Annotated[str, Meta(pattern=r"^(sqlite|rediss?://\S+)$")] = "sqlite"
    # all: every actor in this process (one box); api: ingress and the protocol adapters, no engine; worker:
    # engines and the post-processor, serving only /healthz, /readyz and /metrics. api and worker need Redis.
    role: Literal["all", "api", "worker"] = "all"
    # This process's name in the fleet (a worker's consumer name, shown in /v1/models); empty: host-pid.
    node_name: Annotated[str, Meta(pattern=r"^[A-Za-z0-9_.-]{0,64}$")] = ""
    # A claimed task whose worker has sent no heartbeat (it beats only while its engine makes progress) for
    # this long is queued again with attempt+1, by whichever node's reaper sees it first.
    claim_timeout_s: Annotated[float, Meta(ge=1, le=3600)] = 30.0
    # Redis store: how long finished tasks' images and metadata are kept in Redis (0: forever), unless
    # results_dir names a directory every node shares, which then holds them (and is never pruned).
    result_ttl_s: Annotated[int, Meta(ge=0)] = 7 * 86400
    results_dir: str = ""
    # Refuse to start (instead of warning) when Redis could lose accepted work (appendonly off, or a
    # maxmemory-policy that evicts).
    redis_require_durable: bool = False
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    # "json": one JSON object a line, with task_id and request_id on every line about a task.
    log_format: Literal["console", "json"] = "console"

    def __post_init__(self) -> None:
        if self.role != "all" and self.store == "sqlite":
            raise ValueError(
                f"role {self.role!r} needs a shared store: set store (FORGE_STORE) to a redis:// URL, "
                "or role (FORGE_ROLE) to 'all' for one box"
            )

    @property
    def uses_redis(self) -> bool:
        return self.store != "sqlite"

    @property
    def data_path(self) -> Path:
        return Path(self.data_dir).expanduser()

    @property
    def outputs_path(self) -> Path:
        return Path(self.results_dir).expanduser() if self.results_dir else self.data_path / "outputs"

    @property
    def database_path(self) -> Path:
        return self.data_path / "forge.sqlite3"

    @property
    def models_path(self) -> Path:
        return self.data_path / "models"

    @property
    def loras_path(self) -> Path:
        return Path(self.loras_dir).expanduser() if self.loras_dir else self.models_path / "loras"

    @property
    def embeddings_path(self) -> Path:
        """Textual-inversion embeddings (<name>.safetensors with clip_l and clip_g), as A1111's embeddings/."""
        return self.data_path / "embeddings"

    @property
    def wildcards_path(self) -> Path:
        """Wildcard files for prompt variations (<name>.txt, a choice per line), as Dynamic Prompts' wildcards/."""
        return self.data_path / "wildcards"

    @property
    def upscalers_path(self) -> Path:
        return self.models_path / "upscalers"

    @property
    def background_models_path(self) -> Path:
        return self.models_path / "rembg"

    @property
    def uploads_path(self) -> Path:
        return self.data_path / "uploads"


ENV_PREFIX = "FORGE_"


def env_overrides(environ: Mapping[str, str]) -> dict[str, object]:
    known = set(Config.__struct_fields__)
    overrides: dict[str, object] = {}
    for name, value in environ.items():
        if name.startswith(ENV_PREFIX):
            key = name[len(ENV_PREFIX) :].lower()
            if key not in known:
                raise ConfigError(f"unknown setting {name}", field=name)
            if key in MAPPING_KEYS and not (key == "models" and value.lstrip().startswith("{")):
                overrides[key] = _parse_mapping(name, value)
            elif key == "models" or key in JSON_KEYS:
                overrides[key] = _parse_json(name, value)
            elif key in LIST_KEYS:
                overrides[key] = [item.strip() for item in value.split(",") if item.strip()]
            elif key in BOOLEAN_KEYS:
                overrides[key] = _parse_bool(name, value)
            else:
                overrides[key] = value
    return overrides


BOOLEAN_KEYS = {field.name for field in msgspec.structs.fields(Config) if field.type is bool}
TRUE_WORDS, FALSE_WORDS = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


def _parse_bool(name: str, value: str) -> bool:
    """What people write in environment variables: true/false, 1/0, yes/no, on/off (any case)."""
    word = value.strip().lower()
    if word in TRUE_WORDS or word in FALSE_WORDS:
        return word in TRUE_WORDS
    raise ConfigError(f"{name}: expected true/false, 1/0, yes/no or on/off, got {value!r}", field=name)


MAPPING_KEYS = {"models", "inpainting_models", "vaes"}
JSON_KEYS = {"ip_adapters", "plans"}
LIST_KEYS = {"compile_warm_sizes"}  # comma-separated in the environment


def _parse_json(name: str, value: str) -> object:
    try:
        return msgspec.json.decode(value)
    except msgspec.DecodeError as exc:
        raise ConfigError(f"{name}: expected a JSON object ({exc})", field=name) from None


def _parse_mapping(name: str, value: str) -> dict[str, str]:
    mapping = {}
    for item in filter(None, (part.strip() for part in value.split(","))):
        key, sep, source = item.partition("=")
        if not sep or not key.strip() or not source.strip():
            raise ConfigError(f"{name}: expected id=source pairs separated by commas, got {item!r}", field=name)
        mapping[key.strip()] = source.strip()
    return mapping


def load_config(
    path: Path | None = None, *, environ: Mapping[str, str] | None = None, overrides: Mapping[str, object] = {}
) -> Config:
    """Merge, lowest first: defaults, the TOML file, `FORGE_*` variables (from os.environ unless `environ`
    is given), then `overrides` (command-line options)."""
    raw: dict[str, object] = {}
    where: dict[str, str] = {}  # each setting's source, for error messages
    if path is not None:
        try:
            from_file = tomllib.loads(path.read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"cannot read config file {path}: {exc}") from exc
        raw.update(from_file)
        where |= {key: f"{key} in {path}" for key in from_file}
    from_env = env_overrides(os.environ if environ is None else environ)
    raw.update(from_env)
    where |= {key: ENV_PREFIX + key.upper() for key in from_env}
    raw.update(overrides)
    where |= {key: f"--{key.replace('_', '-')}" for key in overrides}
    try:
        # strict=False lets environment strings become ints and floats.
        return msgspec.convert(raw, Config, strict=False)
    except msgspec.ValidationError as exc:
        message, _, at = str(exc).rpartition(" - at `")
        key = at.rstrip("`").removeprefix("$.").split(".")[0].split("[")[0]
        if message and key in where:
            raise ConfigError(f"{where[key]}: {message}", field=where[key]) from None
        raise ConfigError(f"invalid configuration: {exc}") from exc
