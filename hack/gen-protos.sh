#!/usr/bin/env bash
# Regenerates modelcache/v1/*_pb2*.py(i) from protos/. Checked-in output must match:
# tests/test_protos.py fails when it is stale. Run: make protos
#
# The generator is pinned and old on purpose: grpcio-tools 1.62.3 (protoc 25, protobuf 4.25
# gencode) writes code with no runtime version gate, which loads on every protobuf the
# client supports (>= 5.26, tested up to the daemon's 7.x) and every grpcio >= 1.62 (newer
# grpcio-tools refuse an older grpcio at import). It lives in its own virtual environment,
# cached outside the repository and keyed by its pins.
#
#   hack/gen-protos.sh [OUT]        (default OUT: the repository root)
# Environment: PYTHON (a Python 3.10-3.12 to build the generator's venv from; default
# python3.11), MODELCACHE_PROTOC_CACHE (default ~/.cache/modelcache-protoc), PROTO_ROOT
# (default protos).
set -euo pipefail
cd "$(dirname "$0")/.."
TOOLS=("grpcio-tools==1.62.3" "grpcio==1.62.3" "protobuf==4.25.9")
KEY="$(printf '%s\n' "${TOOLS[@]}" | sha256sum | cut -c1-12)"
CACHE="${MODELCACHE_PROTOC_CACHE:-${HOME:-/root}/.cache/modelcache-protoc}"
VENV="$CACHE/venv-$KEY"
OUT=${1:-.}
if [[ ! -x $VENV/bin/python ]] || ! "$VENV/bin/python" -c 'import grpc_tools' 2>/dev/null; then
  base="${PYTHON:-python3.11}"
  command -v "$base" >/dev/null || base=python3
  mkdir -p "$CACHE"
  rm -rf "$VENV.tmp"
  "$base" -m venv "$VENV.tmp"
  "$VENV.tmp/bin/python" -m pip install -q --disable-pip-version-check --no-deps "${TOOLS[@]}" \
    setuptools >&2
  rm -rf "$VENV"
  mv "$VENV.tmp" "$VENV"
fi
mkdir -p "$OUT/modelcache/v1"
PROTOS="${PROTO_ROOT:-protos}"
"$VENV/bin/python" -m grpc_tools.protoc -I"$PROTOS" \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  "$PROTOS/modelcache/v1/modelcache.proto"
[ -f "$OUT/modelcache/v1/__init__.py" ] || : > "$OUT/modelcache/v1/__init__.py"
