# Chara Forge tasks. Every recipe creates .venv and installs the project on first use.

set shell := ["bash", "-euo", "pipefail", "-c"]

venv := ".venv"
bin := venv / "bin"
# Torch and torchvision are installed first, as a matching pair (spandrel, the upscaler loader, needs
# torchvision). This pair comes from the local wheel mirror and runs on the CPU as well as on CUDA; an
# unpinned `torch` would fetch several GB more. Override with TORCH_SPEC on another machine.
torch_spec := env("TORCH_SPEC", "torch==2.14.1 torchvision==0.29.1")

default:
    @just --list

# Create .venv and install the project with its test tools at the versions in requirements.lock (again only
# when pyproject.toml or the lock changes)
setup:
    #!/usr/bin/env bash
    set -euo pipefail
    [ -x {{bin}}/python ] || python3 -m venv {{venv}}
    stamp="{{venv}}/.installed-$(cat pyproject.toml requirements.lock | sha256sum | cut -c1-16)"
    if [ ! -e "$stamp" ]; then
        {{bin}}/python -m pip install --quiet --upgrade pip
        {{bin}}/python -m pip install --quiet {{torch_spec}}
        {{bin}}/python -m pip install --quiet -c requirements.lock -e ".[dev]"
        touch "$stamp"
    fi

# Upgrade deliberately: resolve every dependency to its newest release in a fresh environment, run the whole
# suite there, and rewrite requirements.lock only when it passes
lock:
    #!/usr/bin/env bash
    set -euo pipefail
    fresh=$(mktemp -d)/venv
    python3 -m venv "$fresh"
    "$fresh/bin/python" -m pip install --quiet --upgrade pip
    "$fresh/bin/python" -m pip install --quiet {{torch_spec}}
    "$fresh/bin/python" -m pip install --quiet -e ".[dev]"
    "$fresh/bin/ruff" check . && "$fresh/bin/ruff" format --check . && "$fresh/bin/mypy"
    "$fresh/bin/python" -m pytest
    { sed -n '1,2p' requirements.lock
      "$fresh/bin/python" -m pip freeze --exclude-editable | grep -viE '^(torch|torchvision|triton|pip)(==| @)|^(nvidia|cuda)-'
    } > requirements.lock.new
    mv requirements.lock.new requirements.lock
    echo "requirements.lock rewritten; run 'just test' once more and commit it"

# Run the server (REST + WebSocket on :8000); options: --port, --model, --data-dir, --host
serve *ARGS: setup
    {{bin}}/chara-forge serve {{ARGS}}

# Generate images once without the server, e.g. just generate "a knight" -n 2 -o out
generate PROMPT *ARGS: setup
    {{bin}}/chara-forge generate "{{PROMPT}}" {{ARGS}}

# Lint, type-check and run the whole test suite
test *ARGS: setup lint
    {{bin}}/python -m pytest {{ARGS}}

# ruff (lint + format check) and mypy
lint: setup
    {{bin}}/ruff check .
    {{bin}}/ruff format --check .
    {{bin}}/mypy

# Benchmarks; each prints one JSON line
bench: setup
    {{bin}}/python -m bench.server_bench
    {{bin}}/python -m bench.postprocess_bench

# The fleet's Redis store against SQLite (tiny model, CPU, a real redis-server); prints one JSON line
bench-fleet: setup
    {{bin}}/python -m bench.fleet_bench

# Request-level against step-level batching: the server's batching decisions and engine loops on a simulated
# device (each cost curve in bench/cost_curves) and clock; goodput at p99 10 s and 20 s; prints one JSON line.
bench-batching *ARGS: setup
    {{bin}}/python -m bench.batching_sim {{ARGS}}

# GPU benchmark: stock diffusers against each engine and the whole server on SDXL's real architecture with
# random weights; prints one JSON line (also in $OUT/gpu_bench.json). Runs without .venv on a CUDA machine
# that has PyTorch: it installs the wheels in bench/wheels first. `--tiny` smoke-tests it on a CPU.
bench-gpu *ARGS:
    bash bench/gpu_run.sh {{ARGS}}

# Fetch the wheels bench-gpu installs on a machine without network (about 10 MiB, into bench/wheels)
bench-gpu-wheels: setup
    {{bin}}/python -m bench.gpu_wheels
