#!/usr/bin/env bash
# The GPU worker-speed benchmark in one command, for a CUDA machine that has torch,
# transformers and peft but maybe not the rest of FedMoE's dependencies.
#
#   bash benchmarks/gpu_speed.sh prepare     # where PyPI is reachable: wheels into .whl/
#   bash benchmarks/gpu_speed.sh [--no-7b]   # on the GPU machine (the checkout + .whl/)
#   bash benchmarks/gpu_speed.sh --smoke     # any machine: every arm for one step, tiny
#
# `prepare` downloads, for CPython 3.12 on manylinux x86-64 (override with WHEEL_PYTHON),
# the wheels the benchmark imports beyond torch/transformers/peft: pydantic (FedMoE's
# settings) and Liger Kernel (the fused-loss arm). The run installs them into a private
# directory only when an import is missing, writes benchmarks/results/worker-speed-gpu.json
# (and $OUT/worker-speed-gpu.json when OUT is set) and re-renders RESULTS.md. Budget about
# 6-8 minutes on an H100/H200 (torch.compile and flex attention compile first); --only TEXT
# (repeatable) runs the arms whose name contains TEXT, --no-7b skips the 7B shape.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="${PYTHON:-python3}"
WHEELS="$ROOT/.whl"
PACKAGES=(pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0
    typing-inspection==0.4.5 liger-kernel==0.8.5)

if [[ "${1:-}" == prepare ]]; then
    mkdir -p "$WHEELS"
    platforms=()
    for p in manylinux_2_28_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$p")
    done
    "$PYTHON" -m pip download --no-deps --only-binary=:all: -d "$WHEELS" \
        --python-version "${WHEEL_PYTHON:-3.12}" --implementation cp "${platforms[@]}" \
        "${PACKAGES[@]}"
    if exclude="$(git rev-parse --git-path info/exclude 2>/dev/null)"; then
        grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >>"$exclude"
    fi
    echo "wheels in $WHEELS; carry that folder to the GPU machine with the checkout"
    exit 0
fi

# The brought wheels (a consistent pydantic + pydantic-core pair, Liger Kernel) go first on
# the path whenever they are here; without them the machine's own pydantic must do.
if [[ -d "$WHEELS" ]] && compgen -G "$WHEELS/*.whl" >/dev/null; then
    site="${TMPDIR:-/tmp}/fedmoe-gpu-site"
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$site" "$WHEELS"/*.whl
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
elif ! "$PYTHON" -c "import pydantic, peft, transformers" 2>/dev/null; then
    echo "pydantic (or peft/transformers) missing and no wheels in $WHEELS: run '$0 prepare' first" >&2
    exit 1
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
"$PYTHON" -m benchmarks.gpu_speed "$@"
if [[ -n "${OUT:-}" && -f benchmarks/results/worker-speed-gpu.json ]]; then
    cp benchmarks/results/worker-speed-gpu.json "$OUT/"
fi
