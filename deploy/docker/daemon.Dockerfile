# syntax=docker/dockerfile:1.7
# The modelcache daemon: `modelcache serve`. Build from the repository root:
#
#   # GPU (the default): CUDA base, the CUDA build of torch
#   docker build -f deploy/docker/daemon.Dockerfile -t REGISTRY/modelcache:0.1.0 .
#   # CPU only (embedding caches without a GPU): any base with Python 3.11, the CPU build
#   docker build -f deploy/docker/daemon.Dockerfile -t REGISTRY/modelcache:0.1.0-cpu \
#     --build-arg BASE_IMAGE=python:3.11.14-slim-bookworm \
#     --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .
#
# * The daemon extra of pyproject.toml: torch and transformers pinned to exactly its versions
#   (every other package to constraints.txt): the host and the container resolve the same
#   versions (seed 002). tests/test_dockerfiles.py keeps these pins in step with it.
# * No model weights: models live on the ModelCache's volume, fetched by the operator's
#   `modelcache fetch` container (same image). HF_HUB_OFFLINE=1: the daemon never downloads.
# * Runs as a non-root uid (10001, any uid works: HOME is /tmp) on a read-only root
#   filesystem: bytecode is compiled at build time, caches go to /tmp (an emptyDir).
# * Python: the base image's python3.11 when it has one (python:3.11-slim, Debian bookworm),
#   else a standalone CPython 3.11 that uv installs into /opt/python (the CUDA base has none).
# * Offline builds (hack/kube-node.sh images, with buildah): UV_OFFLINE=1 UV_NO_INDEX=1
#   UV_FIND_LINKS=/wheels and a wheelhouse mounted at /wheels; nothing else changes.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-base-ubuntu24.04
ARG UV_IMAGE=ghcr.io/astral-sh/uv:0.13.9

FROM ${UV_IMAGE} AS uv

# ---------------------------------------------------------------------------- build
FROM ${BASE_IMAGE} AS build
ARG PYTHON_VERSION=3.11
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
ARG TORCH_VERSION=2.13.0
ARG TRANSFORMERS_VERSION=5.23.0
# Set only for offline builds (read by uv from the environment).
ARG UV_OFFLINE
ARG UV_NO_INDEX
ARG UV_FIND_LINKS
COPY --from=uv /uv /usr/local/bin/uv
ENV UV_PYTHON_INSTALL_DIR=/opt/python \
    UV_PYTHON_PREFERENCE=managed \
    UV_COMPILE_BYTECODE=1 \
    UV_LINK_MODE=copy \
    UV_NO_CACHE=1
RUN mkdir -p /opt/python \
 && uv venv --python "${PYTHON_VERSION}" /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
# torch alone first, from the index of the wanted build (CUDA or CPU); then its dependencies
# and everything else from PyPI, every version pinned by constraints.txt.
RUN uv pip install --python /opt/venv/bin/python --index-url "${TORCH_INDEX_URL}" --no-deps \
        "torch==${TORCH_VERSION}" \
 && uv pip install --python /opt/venv/bin/python -c constraints.txt -r pyproject.toml --extra daemon \
        "torch==${TORCH_VERSION}" "transformers==${TRANSFORMERS_VERSION}"
COPY modelcache ./modelcache
RUN uv pip install --python /opt/venv/bin/python --no-deps . \
 && /opt/venv/bin/python -c "import modelcache.cli, torch, transformers; print(torch.__version__, transformers.__version__)"

# ---------------------------------------------------------------------------- runtime
FROM ${BASE_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="modelcache daemon" \
      org.opencontainers.image.description="Keeps Hugging Face models loaded, verified and served over gRPC" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /opt/python /opt/python
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/tmp \
    HF_HOME=/tmp/hf \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
USER 10001:10001
WORKDIR /tmp
EXPOSE 50051 9400
ENTRYPOINT ["modelcache"]
CMD ["serve", "--config", "/etc/modelcache/config.yaml", "--host", "0.0.0.0", "--metrics-host", "0.0.0.0"]
