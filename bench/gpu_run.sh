#!/usr/bin/env bash
# The GPU benchmark on a CUDA machine that has PyTorch but not this server's other packages (and maybe no
# network): install the wheels carried in bench/wheels (made by `just bench-gpu-wheels`), then run
# bench.gpu_bench from this checkout. Arguments go to bench.gpu_bench (--help lists them).
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
if compgen -G "bench/wheels/*.whl" >/dev/null; then
    "$python" -m pip install --quiet --no-index --no-deps bench/wheels/*.whl
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec "$python" -m bench.gpu_bench "$@"
