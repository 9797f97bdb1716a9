# syntax=docker/dockerfile:1
# bitserve for NVIDIA GPUs:   docker build -t bitserve:0.1.0 .
#   docker run --gpus all -p 50051:50051 -p 9400:9400 bitserve:0.1.0              # the bundled demo model
#   docker run --gpus all -v /data/ckpt:/models:ro bitserve:0.1.0 --model /models/my-bitnet
# The entrypoint is `bitserve serve`; arguments are its flags. The process runs as
# UID 10001 and writes only to /tmp and /var/cache/bitserve (mount emptyDirs there
# with a read-only root filesystem; the Helm chart in helm/bitserve does).

# Any CUDA 12/13 runtime image works: PyPI's torch wheel brings its own CUDA libraries,
# the base image brings the NVIDIA container-runtime settings. Pin it by digest in production.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS build
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv \
 && rm -rf /var/lib/apt/lists/*
RUN python3 -m venv /opt/bitserve
ENV PATH=/opt/bitserve/bin:$PATH
WORKDIR /src
COPY requirements.lock ./
# The runtime part of the lock file (same pins as `make test`): test oracles, bench
# plotting and dev/chart tooling stay out. On Linux x86_64 PyPI's torch==2.13.0 is
# the CUDA build and triton==3.7.1 the Triton it pins (the CPU wheel is local to CI).
RUN grep -v -E '^(grpcio-tools|transformers|accelerate|matplotlib|pytest|pytest-timeout|helm-python-sdk|kubernetes-validate|yamllint|jsonschema)([=<>~! ]|$)' \
        requirements.lock > runtime.lock \
 && pip install -r runtime.lock
COPY pyproject.toml README.md ./
COPY server ./server
COPY plugins ./plugins
COPY kernels ./kernels
RUN pip install --no-deps . \
 && bitserve serve --help > /dev/null

FROM ${CUDA_IMAGE}
ENV DEBIAN_FRONTEND=noninteractive
# gcc + python3-dev: Triton compiles a small C launcher per kernel at run time.
# tini: PID 1 that forwards SIGTERM (the server drains on it) and reaps Ray's children.
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-dev gcc libc6-dev tini \
 && rm -rf /var/lib/apt/lists/* \
 && groupadd --gid 10001 bitserve \
 && useradd --uid 10001 --gid 10001 --home-dir /tmp --no-create-home --shell /usr/sbin/nologin bitserve \
 && install -d -o 10001 -g 10001 /var/cache/bitserve /models
COPY --from=build /opt/bitserve /opt/bitserve
ENV PATH=/opt/bitserve/bin:$PATH \
    HOME=/tmp \
    XDG_CACHE_HOME=/var/cache/bitserve \
    HF_HOME=/var/cache/bitserve/huggingface \
    TRITON_CACHE_DIR=/var/cache/bitserve/triton \
    TORCHINDUCTOR_CACHE_DIR=/var/cache/bitserve/inductor \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    TOKENIZERS_PARALLELISM=false \
    RAY_USAGE_STATS_ENABLED=0
USER 10001:10001
WORKDIR /tmp
# gRPC, Prometheus /metrics
EXPOSE 50051 9400
ENTRYPOINT ["/usr/bin/tini", "--", "bitserve", "serve"]
