# syntax=docker/dockerfile:1
#
# predictq image: one image for the worker (default command), Flower and the
# CLI.  Build the CPU image with `docker build -t predictq .`, the GPU image
# with `docker build --build-arg EXTRAS=gpu -t predictq-gpu .` (installs
# `predictq[gpu]`, i.e. tensorflow[and-cuda]; run it with an NVIDIA runtime).

ARG PYTHON_IMAGE=python:3.11-slim

# --- build: turn the source tree into a wheel ----------------------------------
# A separate stage so the final image carries neither the source tree nor the
# build backend, only the installed package.
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
WORKDIR /src
COPY pyproject.toml ./
COPY predictq ./predictq
COPY workers ./workers
COPY producer ./producer
COPY predictq_ops ./predictq_ops
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels .

# --- runtime ---------------------------------------------------------------------
FROM ${PYTHON_IMAGE}

# "" installs `pip install .`'s dependencies (TensorFlow on CPU); "gpu" adds
# the CUDA libraries (`pip install .[gpu]`).
ARG EXTRAS=""

# TF_CPP_MIN_LOG_LEVEL=2: TensorFlow's C++ INFO and WARNING lines would drown
# the worker's own log.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore \
    TF_CPP_MIN_LOG_LEVEL=2

# An unprivileged user with a home directory (Keras writes ~/.keras on import)
# and a working directory it owns.
RUN groupadd --system --gid 10001 predictq \
    && useradd --system --uid 10001 --gid predictq --create-home \
       --home-dir /home/predictq --shell /usr/sbin/nologin predictq \
    && install -d -o predictq -g predictq /app

# The wheel is bind-mounted from the build stage, so it never lands in a layer.
RUN --mount=type=bind,from=build,source=/wheels,target=/tmp/wheels \
    set -eu; \
    wheel="$(ls /tmp/wheels/predictq-*.whl)"; \
    pip install --no-cache-dir "${wheel}${EXTRAS:+[${EXTRAS}]}"

WORKDIR /app
USER predictq:predictq

# 9808: Prometheus metrics of the worker process; 5555: Flower.
EXPOSE 9808 5555

# Healthy only once a worker in this container has loaded and warmed its model
# (the readiness record it keeps in Redis); TensorFlow's start and the model
# load take a while, hence the start period.  Flower overrides this check in
# docker-compose.yml.
HEALTHCHECK --interval=15s --timeout=10s --start-period=120s --retries=3 \
    CMD ["predictq", "health"]

# Celery's warm shutdown on SIGTERM: running jobs finish, unstarted ones go back
# to the queue.  Give it PREDICTQ_SHUTDOWN_TIMEOUT_S plus margin to stop
# (`docker stop -t 60`, compose's stop_grace_period).
STOPSIGNAL SIGTERM

CMD ["predictq", "worker"]
