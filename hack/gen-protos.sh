#!/usr/bin/env bash
# Regenerates modelcache/v1/*_pb2*.py(i) from protos/. Checked-in output must match:
# tests/test_protos.py fails when it is stale. Run: make protos
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${1:-.}
mkdir -p "$OUT/modelcache/v1"
"$PY" -m grpc_tools.protoc -Iprotos \
  --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  protos/modelcache/v1/modelcache.proto
[ -f "$OUT/modelcache/v1/__init__.py" ] || : > "$OUT/modelcache/v1/__init__.py"
