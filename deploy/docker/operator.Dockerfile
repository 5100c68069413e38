# syntax=docker/dockerfile:1.7
# The modelcache operator (kopf): `python -m modelcache.operator`. Build from the repository
# root:
#
#   docker build -f deploy/docker/operator.Dockerfile -t REGISTRY/modelcache-operator:0.1.0 .
#
# Slim: the operator needs no torch, transformers or CUDA; only the packages below (with
# their dependencies pinned by constraints.txt), and modelcache itself without its
# dependencies. tests/test_dockerfiles.py checks that every module the operator imports
# comes from these packages. Runs as a non-root uid on a read-only root filesystem.
#
# PYTHON_IMAGE is any image with Python 3.11, venv and pip (python:3.11-slim, Debian
# bookworm's python3 + python3-venv). Offline builds (hack/kube-node.sh images, with buildah):
# PIP_NO_INDEX=1 PIP_FIND_LINKS=/wheels and a wheelhouse mounted at /wheels.

ARG PYTHON_IMAGE=python:3.11.14-slim-bookworm

# ---------------------------------------------------------------------------- build
FROM ${PYTHON_IMAGE} AS build
# Set only for offline builds (read by pip from the environment).
ARG PIP_NO_INDEX
ARG PIP_FIND_LINKS
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml constraints.txt README.md ./
RUN /opt/venv/bin/pip install --no-cache-dir -c constraints.txt \
        kopf kubernetes pydantic pydantic-settings PyYAML prometheus-client \
        grpcio grpcio-health-checking protobuf
COPY modelcache ./modelcache
RUN /opt/venv/bin/pip install --no-cache-dir --no-deps . \
 && /opt/venv/bin/python -m compileall -q /opt/venv/lib \
 && /opt/venv/bin/python -c "import modelcache.operator.handlers"

# ---------------------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE} AS runtime
ARG VERSION=0.1.0
LABEL org.opencontainers.image.title="modelcache operator" \
      org.opencontainers.image.description="Kubernetes operator for ModelCache resources" \
      org.opencontainers.image.version="${VERSION}"
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:${PATH} \
    HOME=/tmp \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
USER 10001:10001
WORKDIR /tmp
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "modelcache.operator"]
CMD ["--all-namespaces"]
